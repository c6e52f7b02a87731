//! Names, keys and values of the maps shared by the eBPF programs and the daemon.

use crate::Addr;

/// Map names: the eBPF statics carry these names and the daemon pins them under them.
pub mod names {
    pub const PODS: &str = "ZT_PODS";
    pub const PENDING_ORIG_DST: &str = "ZT_PENDING_ORIG_DST";
    pub const ORIG_DST: &str = "ZT_ORIG_DST";
    pub const INBOUND_LISTENERS: &str = "ZT_INBOUND_LISTENERS";
    pub const EXCLUDED_CIDRS: &str = "ZT_EXCLUDED_CIDRS";
    pub const EXCLUDED_PORTS: &str = "ZT_EXCLUDED_PORTS";
    pub const SETTINGS: &str = "ZT_SETTINGS";
    pub const COUNTERS: &str = "ZT_COUNTERS";
    pub const DELIVERIES: &str = "ZT_DELIVERIES";
    pub const WORKLOADS: &str = "ZT_WORKLOADS";
    pub const PLAINTEXT_RULES: &str = "ZT_PLAINTEXT_RULES";

    pub const ALL: [&str; 11] = [
        PODS,
        PENDING_ORIG_DST,
        ORIG_DST,
        INBOUND_LISTENERS,
        EXCLUDED_CIDRS,
        EXCLUDED_PORTS,
        SETTINGS,
        COUNTERS,
        DELIVERIES,
        WORKLOADS,
        PLAINTEXT_RULES,
    ];
}

/// Program names (the functions in the eBPF crate).
pub mod programs {
    pub const CONNECT4: &str = "zt_connect4";
    pub const CONNECT6: &str = "zt_connect6";
    pub const SOCK_OPS: &str = "zt_sock_ops";
    pub const SK_LOOKUP: &str = "zt_sk_lookup";
    pub const BIND4: &str = "zt_bind4";
    pub const BIND6: &str = "zt_bind6";
}

/// The programs' load-time constants (read-only globals the loader sets).
pub mod globals {
    /// 1 when the kernel's `bpf_sk_lookup` has `ingress_ifindex` (Linux 5.17), else 0.
    pub const HAS_INGRESS_IFINDEX: &str = "ZT_HAS_INGRESS_IFINDEX";
}

// The maps' sizes as the programs define them. The daemon sets those of `PODS`,
// `INBOUND_LISTENERS` (twice `PODS`), `WORKLOADS` and `PLAINTEXT_RULES` at load from its
// settings, whose defaults these are.
/// Enrolled pods on the node.
pub const MAX_PODS: u32 = 4096;
/// Connections between `connect()` and the proxy's `accept()`; LRU so a burst evicts the oldest.
pub const MAX_IN_FLIGHT_CONNECTS: u32 = 65536;
/// Open connections the proxy delivered into pods; LRU: beyond it the oldest lose their
/// entry, which only their handshake needed.
pub const MAX_DELIVERIES: u32 = 65536;
pub const MAX_EXCLUDED_CIDRS: u32 = 1024;
pub const MAX_EXCLUDED_PORTS: u32 = 1024;
/// Addresses of the mesh's workloads (all nodes).
pub const MAX_WORKLOAD_ADDRESSES: u32 = 65536;
/// The verdicts for identity-less clients of this node's workloads.
pub const MAX_PLAINTEXT_RULES: u32 = 65536;

/// `PodInfo.flags`
pub const POD_HAS_IP4: u32 = 1 << 0;
pub const POD_HAS_IP6: u32 = 1 << 1;

/// Value of `PODS`, keyed by the pod's network namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PodInfo {
    pub ip4: Addr,
    pub ip6: Addr,
    pub flags: u32,
    /// The daemon's index of the pod, for diagnostics.
    pub pod_index: u32,
}

impl PodInfo {
    pub fn has_ip4(&self) -> bool {
        self.flags & POD_HAS_IP4 != 0
    }

    pub fn has_ip6(&self) -> bool {
        self.flags & POD_HAS_IP6 != 0
    }

    /// Whether `addr` is one of the pod's own addresses.
    pub fn owns(&self, addr: &Addr) -> bool {
        (self.has_ip4() && self.ip4 == *addr) || (self.has_ip6() && self.ip6 == *addr)
    }
}

/// Original destination of a captured connection (value of `PENDING_ORIG_DST` and `ORIG_DST`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A TCP connection's four-tuple, from its client's end (key of `ORIG_DST` and `DELIVERIES`):
/// an entry serves that one connection and no other.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowKey {
    pub const fn new(src: Addr, src_port: u16, dst: Addr, dst_port: u16) -> FlowKey {
        FlowKey {
            src,
            dst,
            src_port,
            dst_port,
        }
    }
}

/// `WorkloadEntry.flags`
pub const WORKLOAD_IN_MESH: u32 = 1 << 0;
pub const WORKLOAD_ON_THIS_NODE: u32 = 1 << 1;
pub const WORKLOAD_HAS_WAYPOINT: u32 = 1 << 2;
/// The workload has rules in `PLAINTEXT_RULES`: `sk_lookup` consults them.
pub const WORKLOAD_PLAINTEXT_RULES: u32 = 1 << 3;

/// Value of `WORKLOADS`, keyed by each of the workload's addresses. Identities stay in
/// userspace; the kernel keys on the daemon's indices.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct WorkloadEntry {
    pub workload: u32,
    pub identity: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// The data of a `PLAINTEXT_RULES` LPM key: the workload and port match exactly, the source
/// by prefix. Port 0 holds the rules for ports that have none of their own.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct PlaintextRuleKey {
    pub workload: u32,
    /// Host byte order; 0 = any port.
    pub port: u16,
    pub _pad: u16,
    pub source: Addr,
}

/// Bits of the key that always match exactly (workload, port, padding).
pub const PLAINTEXT_RULE_FIXED_BITS: u32 = 64;
/// `PLAINTEXT_RULES` values.
pub const PLAINTEXT_ALLOW: u32 = 0;
/// A DENY policy matches whatever the client's identity.
pub const PLAINTEXT_DENY_POLICY: u32 = 1;
/// ALLOW policies apply and none can match a client without an identity.
pub const PLAINTEXT_DENY_NEEDS_IDENTITY: u32 = 2;

/// `EXCLUDED_PORTS` values: which direction a port is excluded from.
pub const EXCLUDE_OUTBOUND: u8 = 1 << 0;
pub const EXCLUDE_INBOUND: u8 = 1 << 1;

/// The single entry of `SETTINGS`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Settings {
    /// Sockets carrying this `SO_MARK` belong to the proxy and are never captured.
    pub proxy_mark: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no implicit padding (explicit
    // `_pad` fields fill every gap), so any byte pattern the kernel returns is a valid value.
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::WorkloadEntry {}
    unsafe impl aya::Pod for super::PlaintextRuleKey {}
    unsafe impl aya::Pod for crate::Addr {}
}
