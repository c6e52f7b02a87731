//! istiod's control-plane wire: delta xDS (the `Address` and `Authorization` resources) and
//! the Istio CA. For now only the protocol definitions (`proto`): messages, and gRPC clients
//! and servers, generated at build time from `ztunnel-user/proto/` without protoc.

pub mod proto;

#[cfg(test)]
mod tests;
