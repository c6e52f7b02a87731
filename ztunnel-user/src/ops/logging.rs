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

/// Logs to standard error from now on, through `filter`.
pub(crate) fn init(filter: &str) -> Result<LogControl, LogError> {
    let (filter_layer, handle) = reload::Layer::new(parse(filter)?);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    Ok(LogControl {
        current: Mutex::new(filter.to_owned()),
        handle,
    })
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
