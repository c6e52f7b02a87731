//! The daemon's surfaces for operators and for the node: the local control API the CNI plugin
//! enrolls pods through (`api_server`), the admin API (`admin`), Prometheus metrics
//! (`metrics`), readiness, the run-time log filter (`logging`), and the HTTP/1.1 plumbing
//! behind them and the CLI (`http`).

pub(crate) mod admin;
pub(crate) mod api_server;
pub(crate) mod http;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod readiness;
