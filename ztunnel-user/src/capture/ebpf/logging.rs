//! The programs' debug lines (`--ebpf-log`): the daemon then loads the object built with them
//! (aya-log calls), and a thread forwards the lines from the programs' ring buffer into the
//! daemon's log. Without the flag it loads the object built without them.

use super::DatapathError;
use aya::{Ebpf, EbpfLoader};
use std::os::fd::AsFd;

/// The programs' log ring buffer (aya-log-ebpf's name for it). The object without logging
/// still defines it (both objects link aya-log-ebpf), unused.
const EBPF_LOG_MAP: &str = "AYA_LOGS";

/// Without `--ebpf-log`: the unused ring buffer gets one page instead of aya-log's default.
pub(super) fn shrink_unused_buffer(loader: &mut EbpfLoader<'_>) {
    loader.map_max_entries(EBPF_LOG_MAP, 1);
}

/// Forwards the programs' log lines into the daemon's log, from a thread that waits on their
/// ring buffer for as long as the process runs.
pub(super) fn forward(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let mut reader = aya_log::EbpfLogger::init_with_logger(ebpf, Unpadded)
        .map_err(|err| DatapathError::EbpfLog(err.into()))?;
    std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || {
            loop {
                let mut ready = [nix::poll::PollFd::new(
                    reader.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut ready, nix::poll::PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => reader.flush(),
                    Err(err) => {
                        tracing::error!(%err, "cannot wait for the eBPF programs' log lines; no more of them will be shown");
                        return;
                    }
                }
            }
        })
        .map_err(|err| DatapathError::EbpfLog(err.into()))?;
    tracing::info!(
        "the eBPF programs log their capture decisions at debug level, target {}",
        ztunnel_common::EBPF_LOG_TARGET
    );
    Ok(())
}

/// The daemon's logger, for the programs' lines without the spaces that pad their last
/// argument (a name: the programs can only send arguments of a fixed length).
struct Unpadded;

impl log::Log for Unpadded {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            let args = format_args!("{}", line.trim_end());
            log::logger().log(
                &log::Record::builder()
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(args)
                    .build(),
            );
        }
    }

    fn flush(&self) {
        log::logger().flush();
    }
}
