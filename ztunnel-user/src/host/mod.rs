//! The node the daemon runs on: network namespaces, mounts, process limits, the kernel
//! features capture needs, the process's own figures, the TCP options of its connections,
//! the changes of the files it follows, and files replaced in one step.

pub(crate) mod features;
pub(crate) mod file_watch;
pub(crate) mod files;
pub(crate) mod limits;
pub(crate) mod mounts;
pub(crate) mod netns;
pub mod process;
pub(crate) mod tcp;
