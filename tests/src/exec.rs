//! Starting processes inside a pod or a node: in its network namespace *and* its cgroup, since
//! the eBPF capture keys on the cgroup.

use crate::error::{LabError, Result};
use crate::topology::{node_spec, pod_spec};
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::Mode;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// A command that runs inside pod `pod` (e.g. `exec("a1", &["ping", "-c1", "10.244.2.2"])`).
pub fn exec<S: AsRef<OsStr>>(pod: &str, argv: &[S]) -> Result<Command> {
    let (program, args) = argv.split_first().ok_or(LabError::EmptyCommand)?;
    let pod = pod_spec(pod)?;
    let placement = Placement::new(&pod.cgroup_path(), &pod.netns_path(), false)?;
    let mut command = placement.command(program.as_ref());
    command.args(args);
    Ok(command)
}

/// A command that runs on node `node`: in its netns and its `system` cgroup.
pub fn exec_node<S: AsRef<OsStr>>(node: &str, argv: &[S]) -> Result<Command> {
    let (program, args) = argv.split_first().ok_or(LabError::EmptyCommand)?;
    let node = node_spec(node)?;
    let placement = Placement::new(&node.system_cgroup(), &node.netns_path(), false)?;
    let mut command = placement.command(program.as_ref());
    command.args(args);
    Ok(command)
}

/// Where a child goes between fork and exec.
pub(crate) struct Placement {
    cgroup_procs: CString,
    netns: File,
    /// Detach from our session and process group, so the child outlives us and our ^C.
    new_session: bool,
}

impl Placement {
    /// Everything is opened and converted here, because the child may only make
    /// async-signal-safe calls (no allocation) between fork and exec.
    pub(crate) fn new(cgroup: &Path, netns: &Path, new_session: bool) -> Result<Placement> {
        let procs = cgroup.join("cgroup.procs");
        if !procs.is_file() {
            return Err(LabError::io(
                "no cgroup at",
                cgroup,
                std::io::ErrorKind::NotFound.into(),
            ));
        }
        let cgroup_procs = CString::new(procs.as_os_str().as_bytes()).map_err(|_| {
            LabError::io(
                "unusable cgroup path",
                cgroup,
                std::io::ErrorKind::InvalidInput.into(),
            )
        })?;
        let netns = File::open(netns).map_err(|e| LabError::io("opening netns", netns, e))?;
        Ok(Placement {
            cgroup_procs,
            netns,
            new_session,
        })
    }

    pub(crate) fn command(self, program: &OsStr) -> Command {
        let mut command = Command::new(program);
        // SAFETY: `enter` only makes async-signal-safe system calls on data prepared above.
        unsafe { command.pre_exec(move || self.enter()) };
        command
    }

    /// Runs in the forked child: cgroup first (writing "0" moves the writer itself), then netns.
    fn enter(&self) -> std::io::Result<()> {
        if self.new_session {
            nix::unistd::setsid()?;
        }
        let procs = open(
            self.cgroup_procs.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        nix::unistd::write(&procs, b"0")?;
        drop(procs);
        setns(&self.netns, CloneFlags::CLONE_NEWNET)?;
        Ok(())
    }
}
