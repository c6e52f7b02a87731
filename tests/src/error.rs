//! The one error type of the lab library.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{what} {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{0}; run `cargo xtask setup`")]
    NotSetUp(String),
    #[error("no command given")]
    EmptyCommand,
    #[error("no pod or node named `{0}` in the lab (pods: a1 a2 b1 u1 w1, nodes: node1 node2)")]
    UnknownName(String),
    #[error("{} is missing; build it first (`cargo build -p ztunnel-user -p fake-istiod -p fake-kube-apiserver -p ztunnel-lab --bins`) or point ZTUNNEL_BIN_DIR at it", path.display())]
    MissingBinary { path: PathBuf },
    #[error("CNI plugin `{plugin}` not found in CNI_PATH {search_path}")]
    PluginNotFound { plugin: String, search_path: String },
    #[error(
        "CNI {command} for pod {pod}: plugin `{plugin}` failed with code {code}: {msg}{}",
        details_suffix(details)
    )]
    Plugin {
        command: &'static str,
        pod: String,
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
    #[error(
        "CNI {command} for pod {pod}: plugin `{plugin}` answered with unusable output: {reason}"
    )]
    PluginOutput {
        command: &'static str,
        pod: String,
        plugin: String,
        reason: String,
    },
    #[error("pod {pod} has no cached CNI ADD result to check against (was it added?)")]
    NotAdded { pod: String },
    #[error("CNI ADD for pod {pod} returned no IPv4 address")]
    NoPodAddress { pod: String },
    #[error("the lab state {}: {reason} (is the lab up? `cargo xtask lab up`)", path.display())]
    State { path: PathBuf, reason: String },
    #[error("the ztunnel daemon of {node} is not running")]
    DaemonNotRunning { node: String },
    #[error("the ztunnel daemon of {node} {problem}; last lines of {}:\n{tail}", log.display())]
    Daemon {
        node: String,
        problem: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{error}\nlast lines of the {node} daemon log:\n{tail}")]
    WithDaemonLog {
        error: Box<LabError>,
        node: String,
        tail: String,
    },
    #[error("down left these behind: {}", .0.join(", "))]
    Leftovers(Vec<String>),
}

fn details_suffix(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(" ({details})")
    }
}

impl LabError {
    /// Causes are part of the message (not `source()`), so printing an error shows it whole.
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        LabError::Io {
            what,
            path: path.into(),
            cause,
        }
    }
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;
