//! The ztunnel node proxy: daemon, eBPF loader, proxy and the CNI plugin's logic.

pub mod api;
pub mod cni;
