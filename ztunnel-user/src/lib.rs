//! The ztunnel node proxy: daemon, eBPF loader, proxy and the CNI plugin's logic.

pub mod access_log;
pub mod admin;
pub mod api;
pub mod api_server;
pub mod authz;
pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod config;
pub mod connections;
pub mod datapath;
pub mod features;
pub mod hbone;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod mounts;
pub mod netlink;
pub mod netns;
pub mod output;
pub mod pods;
pub mod process;
pub mod proxy;
pub mod readiness;
pub mod web;
pub mod workload_map;
