//! Running the external tools the lab drives (`ip`, `ztunnel status`, ...).

use crate::error::{LabError, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `command` to completion without stdin; fails with its stderr unless it exits 0.
pub fn run(command: &mut Command) -> Result<Output> {
    let display = describe(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Command {
            command: display.clone(),
            detail: source.to_string(),
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::Command {
            command: display,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// `ip <args>`.
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// `ip -n <netns> <args>`: configures a namespace without entering it.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").arg("-n").arg(netns).args(args)).map(drop)
}

pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Collects a spawned child's output, giving up after `timeout`: then the child is killed and
/// `None` returned. Its stdout and stderr must be piped.
pub fn output_within(child: Child, timeout: Duration) -> std::io::Result<Option<Output>> {
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match finished.recv_timeout(timeout) {
        Ok(output) => output.map(Some),
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                // The waiting thread reaps it once it dies.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            Ok(None)
        }
    }
}
