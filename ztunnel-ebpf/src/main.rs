//! Pod-scoped traffic capture: `connect4`/`connect6` and `sock_ops` on each enrolled pod's
//! cgroup steer outbound TCP into the proxy's 15001 listener; `sk_lookup` on each enrolled
//! pod's netns steers inbound TCP to the proxy's 15006 listener. The decisions themselves are
//! in `ztunnel_common::verdict`, shared with userspace and its tests.
//!
//! Two objects are built from these sources: this one, which the daemon loads, and
//! `ztunnel-logging` (`bin/ztunnel-logging.rs`), the same programs with their debug lines,
//! loaded with `ztunnel run --ebpf-log`. Without the flag the programs have no logging code,
//! so the lines cost nothing when off, not even an instruction.
#![no_std]
#![no_main]

/// Whether the programs write debug lines about their decisions.
const LOG: bool = false;

mod capture;
mod log;
mod maps;
mod runtime;
