//! The lab's cluster services (istiod, the Kubernetes API server): each a binary of this
//! workspace run in node1's netns and system cgroup, as a pod on some node would be, reached
//! by the daemons over the underlay. Started in the background, it outlives the caller.

use crate::daemon::{is_alive, log_output_to, signal_and_wait};
use crate::error::{LabError, Result};
use crate::exec::Placement;
use crate::topology::{self, NODES};
use nix::sys::signal::Signal;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts `program` with `args` on node1, its output appended to `log`, and waits until a line
/// of its log (written since) contains `ready`. Returns its pid.
pub(crate) fn start(program: &str, args: &[String], log: &Path, ready: &str) -> Result<u32> {
    let binary = topology::binary_in(&topology::bin_dir(), program)?;
    let node = &NODES[0];
    let mut command = Placement::new(&node.system_cgroup(), &node.netns_path(), true)?
        .command(binary.as_os_str());
    command.args(args).stdin(Stdio::null());
    log_output_to(&mut command, log)?;
    let logged_before = std::fs::metadata(log).map_or(0, |m| m.len());
    let child = command
        .spawn()
        .map_err(|e| error(program, format!("could not be started: {e}")))?;
    let pid = child.id();
    // Not waited for: it outlives us, as the daemons do.
    drop(child);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if !is_alive(pid) {
            return Err(error(
                program,
                format!("exited while starting; see {}", log.display()),
            ));
        }
        let text = std::fs::read(log).unwrap_or_default();
        let new = text.get(logged_before as usize..).unwrap_or_default();
        if String::from_utf8_lossy(new).contains(ready) {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            signal_and_wait(pid, Signal::SIGKILL, STOP_TIMEOUT);
            return Err(error(
                program,
                format!("did not listen within {}s", START_TIMEOUT.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A failure of the service `program`.
pub(crate) fn error(program: &str, problem: String) -> LabError {
    LabError::Command {
        command: program.to_owned(),
        detail: problem,
    }
}
