//! One lab user at a time. Every lab uses the same fixed namespaces, cgroups, pins and files,
//! so two at once (a test run without `--test-threads=1`, a demo beside a bench) would tear
//! each other's down. Each holds this lock while its lab exists; a second one waits, and says
//! so.

use crate::error::{LabError, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::path::Path;

/// Outside the lab's state directory, which `down` removes.
const LOCK_FILE: &str = "/run/lock/ztunnel-lab.lock";

/// The lab is ours until this is dropped.
pub struct LabLock {
    _held: Flock<File>,
}

impl LabLock {
    /// Takes the lock, waiting (with a line saying for what) while another user holds it.
    pub fn acquire(user: &str) -> Result<LabLock> {
        let path = Path::new(LOCK_FILE);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| LabError::io("creating", dir, e))?;
        }
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(|e| LabError::io("opening", path, e))
        };
        let file = match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(LabLock { _held: held }),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, errno)) => return Err(LabError::io("locking", path, errno.into())),
        };
        eprintln!("{user}: another lab user holds {LOCK_FILE}; waiting for it");
        let held = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| LabError::io("locking", path, errno.into()))?;
        Ok(LabLock { _held: held })
    }
}
