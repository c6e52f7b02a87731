//! The ztunnel node proxy: daemon, eBPF loader, proxy and the CNI plugin's logic.

pub mod api;
pub mod api_server;
pub mod authz;
pub mod cgroup;
pub mod cni;
pub mod config;
pub mod connections;
pub mod datapath;
pub mod features;
pub mod hbone;
pub mod identity;
pub mod limits;
pub mod mesh;
pub mod mounts;
pub mod netlink;
pub mod netns;
pub mod output;
pub mod pods;
pub mod proxy;
pub mod workload_map;
