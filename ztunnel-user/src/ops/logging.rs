//! The daemon's log: to standard error, through a filter (tracing's EnvFilter syntax) that the
//! admin API's `/logging` changes at run time.

use std::sync::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

#[derive(Debug, thiserror::Error)]
pub(crate) enum LogError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("cannot install the log filter: {0}")]
    Reload(#[from] reload::Error),
}

/// Changes the daemon's log filter at run time.
pub(crate) struct LogControl {
    current: Mutex<String>,
    handle: reload::Handle<EnvFilter, Registry>,
}

/// Logs to standard error from now on, through `filter`; with `ebpf_log`, the eBPF programs'
/// lines too (`--ebpf-log`).
pub(crate) fn init(filter: &str, ebpf_log: bool) -> Result<LogControl, LogError> {
    let filter = with_ebpf_lines(filter, ebpf_log);
    let (filter_layer, handle) = reload::Layer::new(parse(&filter)?);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    Ok(LogControl {
        current: Mutex::new(filter),
        handle,
    })
}

/// `filter`, after a directive that shows the eBPF programs' lines when they log; a directive
/// of `filter` for their target takes precedence.
fn with_ebpf_lines(filter: &str, ebpf_log: bool) -> String {
    let target = ztunnel_common::EBPF_LOG_TARGET;
    match (ebpf_log, filter.is_empty()) {
        (false, _) => filter.to_owned(),
        (true, true) => format!("{target}=debug"),
        (true, false) => format!("{target}=debug,{filter}"),
    }
}

fn parse(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(filter).map_err(|source| LogError::Filter {
        filter: filter.to_owned(),
        source,
    })
}

impl LogControl {
    pub(crate) fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs `filter`, or says why it cannot (the filter in force stays).
    pub(crate) fn change(&self, filter: &str) -> Result<(), LogError> {
        self.handle.reload(parse(filter)?)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_lines_directive_comes_first() {
        assert_eq!(with_ebpf_lines("info", false), "info");
        assert_eq!(with_ebpf_lines("info", true), "ztunnel_ebpf=debug,info");
        assert_eq!(with_ebpf_lines("", true), "ztunnel_ebpf=debug");
    }
}
