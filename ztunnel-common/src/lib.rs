//! Types and decisions shared by the eBPF programs and the userspace daemon.
//!
//! Everything here is `no_std` and `#[repr(C)]` so the kernel and userspace agree on the
//! layout of every map key and value. The capture decisions live here as pure functions so
//! that the eBPF programs and the unit tests run the very same logic. With the `user` feature,
//! also what userspace reads off the node that both the daemon and the lab need (`cgroup2`).
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod addr;
#[cfg(feature = "user")]
pub mod cgroup2;
pub mod counters;
pub mod maps;
pub mod ports;
pub mod verdict;

pub use addr::Addr;
pub use counters::Counter;

/// The log target of the eBPF programs' debug lines (`ztunnel run --ebpf-log`): a filter
/// directive such as `ztunnel_ebpf=debug` selects them.
pub const EBPF_LOG_TARGET: &str = "ztunnel_ebpf";
