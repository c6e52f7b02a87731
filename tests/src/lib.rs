//! The ztunnel lab: network namespaces standing in for two Kubernetes nodes and their pods,
//! wired by the real CNI plugins, with a ztunnel daemon per node. Used by `cargo xtask lab` and
//! by the end-to-end tests.
//!
//! Everything is fixed by name (see [`topology`]): nodes `node1` and `node2`, pods `a1` and
//! `a2` on node1, `b1` and the unenrolled `u1` (namespace `legacy`) on node2.

mod bringup;
pub mod capture;
mod cgroup;
mod cluster_service;
mod cni;
mod command;
mod daemon;
mod endpoints;
mod error;
mod exec;
pub mod istiod;
pub mod kube;
mod lock;
pub mod mesh;
mod netns;
pub mod proxy_protocol;
mod state;
mod status;
mod teardown;
pub mod topology;
pub mod traffic;

pub use bringup::{up, up_with, up_without_ztunnel};
pub use cni::{CniResult, cni_add, cni_check, cni_del, write_conflist};
pub use command::run;
pub use daemon::{
    CONTROL_PLANE_VARIABLE, ControlPlane, DaemonOptions, Started, daemon_cli, daemon_config_dump,
    daemon_not_ready, daemon_pid, daemon_status, kill_daemon, start_daemon, start_daemon_until,
    stop_daemon,
};
pub use endpoints::{
    HeldConnections, Opening, PodServer, burst_from, burst_outcome_from, connect_rate_from,
    latency_from, send_bound_from, send_from, send_pausing_from,
};
pub use error::{LabError, Result};
pub use exec::{exec, exec_node};
pub use lock::LabLock;
pub use state::{Lab, Node, Pod, state_path};
pub use status::status;
pub use teardown::{down, leftovers};
