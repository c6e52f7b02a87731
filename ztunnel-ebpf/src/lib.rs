// The library target only exists so that ztunnel-user can name this crate as a build
// dependency (cargo then rebuilds the daemon when the programs change).
#![no_std]
