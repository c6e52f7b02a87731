//! Process limits the daemon needs: every proxied connection holds two or three file
//! descriptors, so the default soft limit of 1024 open files caps a node at a few hundred
//! connections.

use std::io;

/// Raises the soft RLIMIT_NOFILE to the hard limit and logs the limit in force. A failure is
/// logged, not fatal: the daemon still works, with fewer connections.
pub fn raise_open_files_limit() {
    match raise_soft_to_hard() {
        Ok((before, now)) if before < now => {
            tracing::info!(
                before,
                limit = now,
                "raised the open files limit (RLIMIT_NOFILE)"
            )
        }
        Ok((_, now)) => tracing::info!(limit = now, "open files limit (RLIMIT_NOFILE)"),
        Err(err) => {
            tracing::warn!(%err, "cannot raise the open files limit (RLIMIT_NOFILE)")
        }
    }
}

/// Returns the soft limit of open files before and after.
fn raise_soft_to_hard() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit, read from the kernel above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, limit.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let (_, now) = raise_soft_to_hard().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((limit.rlim_cur, limit.rlim_max), (now, now));
    }
}
