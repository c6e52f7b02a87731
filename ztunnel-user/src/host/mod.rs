//! The node the daemon runs on: network namespaces, mounts, process limits, the kernel
//! features capture needs, and the process's own figures.

pub(crate) mod features;
pub(crate) mod limits;
pub(crate) mod mounts;
pub(crate) mod netns;
pub mod process;
