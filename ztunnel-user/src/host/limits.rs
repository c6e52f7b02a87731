//! Process limits the daemon needs: every proxied connection holds two or three file
//! descriptors, so the default soft limit of 1024 open files caps a node at a few hundred
//! connections.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft RLIMIT_NOFILE to the hard limit, logs it and returns the limit in force. A
/// failure is logged, not fatal: the daemon still works, with fewer connections.
pub(crate) fn raise_open_files_limit() -> u64 {
    match raise_soft_to_hard() {
        Ok((before, now)) => {
            if before < now {
                tracing::info!(
                    before,
                    limit = now,
                    "raised the open files limit (RLIMIT_NOFILE)"
                );
            }
            now
        }
        Err(err) => {
            tracing::warn!(%err, "cannot raise the open files limit (RLIMIT_NOFILE)");
            getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Returns the soft limit of open files before and after.
fn raise_soft_to_hard() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let (_, now) = raise_soft_to_hard().unwrap();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (now, now));
    }
}
