//! The ztunnel node proxy: the daemon (`app`), the operator's CLI (`cli`), the CNI plugin's
//! logic (`cni`) and its installer (`cni_install`).
//!
//! Top-level modules depend on each other in one direction only, roughly from the application
//! down to the leaves (docs/ARCHITECTURE.md; `cargo xtask layers` prints the exact graph, and
//! the test suite fails on a cycle):
//!
//! ```text
//! app, cli, cni, cni_install -> ops -> pods -> proxy -> {capture, hbone, delivery, telemetry}
//!     -> {api, xds} -> mesh -> {identity, relay, host, settings}
//! ```
#![warn(unreachable_pub)]

pub mod api;
pub mod app;
mod capture;
pub mod cli;
pub mod cni;
pub mod cni_install;
mod delivery;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hbone;
pub mod host;
pub mod identity;
pub mod istio_ca;
pub mod istiod;
mod kube;
pub mod mesh;
mod ops;
mod pods;
mod proxy;
mod relay;
pub mod settings;
mod telemetry;
pub mod xds;
