//! The capture programs of `main.rs` with their debug lines (`LOG`), for
//! `ztunnel run --ebpf-log`: the same sources, modules and program names, so the daemon loads
//! either object against the same maps and moves pinned links between them.
#![no_std]
#![no_main]

/// Whether the programs write debug lines about their decisions.
const LOG: bool = true;

#[path = "../capture.rs"]
mod capture;
#[path = "../log.rs"]
mod log;
#[path = "../maps.rs"]
mod maps;
#[path = "../runtime.rs"]
mod runtime;
