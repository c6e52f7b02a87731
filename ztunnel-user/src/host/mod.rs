//! The node the daemon runs on: network namespaces, mounts, process limits, the kernel
//! features capture needs, the process's own figures, and the TCP options of its
//! connections.

pub(crate) mod features;
pub(crate) mod limits;
pub(crate) mod mounts;
pub(crate) mod netns;
pub mod process;
pub(crate) mod tcp;
