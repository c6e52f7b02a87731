//! istiod's control-plane wire: delta xDS (the `Address` and `Authorization` resources) and
//! the Istio CA. The protocol definitions (`proto`): messages, and gRPC clients and servers,
//! generated at build time from `ztunnel-user/proto/` without protoc; `convert`, which turns
//! delta-xDS resources into changes of the mesh model, naming each resource it refuses; and
//! `client`, the delta ADS client that streams them from istiod into an `XdsSink`.

pub mod client;
pub mod convert;
pub mod proto;

#[cfg(test)]
mod convert_tests;
#[cfg(test)]
mod tests;
