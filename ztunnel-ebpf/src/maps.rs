//! The maps, named as `ztunnel_common::maps::names` says, and the counter helper.

use aya_ebpf::Global;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash};
use ztunnel_common::Addr;
use ztunnel_common::Counter;
use ztunnel_common::maps::{
    FlowKey, MAX_DELIVERIES, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_IN_FLIGHT_CONNECTS,
    MAX_PLAINTEXT_RULES, MAX_PODS, MAX_WORKLOAD_ADDRESSES, OrigDst, PLAINTEXT_ALLOW,
    PLAINTEXT_DENY_POLICY, PLAINTEXT_RULE_FIXED_BITS, PlaintextRuleKey, PodInfo, Settings,
    WORKLOAD_PLAINTEXT_RULES, WorkloadEntry,
};

/// Enrolled pods by network namespace cookie.
#[map(name = "ZT_PODS")]
pub static PODS: HashMap<u64, PodInfo> = HashMap::with_max_entries(MAX_PODS, 0);

/// Original destination by socket cookie, between `connect()` and `TCP_CONNECT_CB`.
#[map(name = "ZT_PENDING_ORIG_DST")]
pub static PENDING_ORIG_DST: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(MAX_IN_FLIGHT_CONNECTS, 0);

/// Original destination by the captured connection's four-tuple, read and deleted by the
/// proxy.
#[map(name = "ZT_ORIG_DST")]
pub static ORIG_DST: LruHashMap<FlowKey, OrigDst> =
    LruHashMap::with_max_entries(MAX_IN_FLIGHT_CONNECTS, 0);

/// The proxy's 15006 listener of each enrolled pod, keyed by the pod's address.
#[map(name = "ZT_INBOUND_LISTENERS")]
pub static INBOUND_LISTENERS: SockHash<Addr> = SockHash::with_max_entries(MAX_PODS * 2, 0);

/// Destinations never captured (16-byte addresses, IPv4 as v4-mapped).
#[map(name = "ZT_EXCLUDED_CIDRS")]
pub static EXCLUDED_CIDRS: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_EXCLUDED_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Ports never captured, with the directions as `EXCLUDE_*` bits.
#[map(name = "ZT_EXCLUDED_PORTS")]
pub static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_EXCLUDED_PORTS, 0);

/// Deliveries the proxy is making into a pod, by their four-tuple (the client's address the
/// proxy's socket is bound to, and the app's): `sk_lookup` lets their SYNs through to the app.
/// The proxy withdraws each when the connection closes: a SYN-cookie ACK or a retransmitted
/// SYN may come long after its connect returned.
#[map(name = "ZT_DELIVERIES")]
pub static DELIVERIES: LruHashMap<FlowKey, u8> = LruHashMap::with_max_entries(MAX_DELIVERIES, 0);

/// The mesh's workloads by address, as the daemon's mesh config has them.
#[map(name = "ZT_WORKLOADS")]
pub static WORKLOADS: HashMap<Addr, WorkloadEntry> =
    HashMap::with_max_entries(MAX_WORKLOAD_ADDRESSES, 0);

/// What authorization decides for plaintext (identity-less) clients of a workload, by
/// (workload, port, source prefix): `PLAINTEXT_*` values.
#[map(name = "ZT_PLAINTEXT_RULES")]
pub static PLAINTEXT_RULES: LpmTrie<PlaintextRuleKey, u32> =
    LpmTrie::with_max_entries(MAX_PLAINTEXT_RULES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "ZT_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "ZT_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: per-CPU slot, and programs do not migrate CPUs while running.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn port_excluded(port: u16, direction: u8) -> bool {
    // SAFETY: the value is a plain u8 read in place.
    matches!(unsafe { EXCLUDED_PORTS.get(&port) }, Some(bits) if bits & direction != 0)
}

#[inline(always)]
pub fn cidr_excluded(addr: &Addr) -> bool {
    EXCLUDED_CIDRS
        .get(aya_ebpf::maps::lpm_trie::Key::new(128, addr.octets()))
        .is_some()
}

/// Whether the kernel's `bpf_sk_lookup` has `ingress_ifindex` (Linux 5.17), set by the loader.
/// The global is read-only once loaded, so the verifier takes it for a constant.
#[unsafe(no_mangle)]
pub static ZT_HAS_INGRESS_IFINDEX: Global<u8> = Global::new(1);

#[inline(always)]
pub fn proxy_mark() -> u32 {
    SETTINGS
        .get(0)
        .map_or(ztunnel_common::ports::DEFAULT_MARK, |s| s.proxy_mark)
}

/// Why authorization refuses a plaintext connection from `remote` to `local:port` whatever
/// its identity, if it does: the counter to count it under.
#[inline(always)]
pub fn plaintext_denied(local: &Addr, port: u16, remote: &Addr) -> Option<Counter> {
    // SAFETY: the value is read in place and copied out.
    let workload = unsafe { WORKLOADS.get(local) }?;
    if workload.flags & WORKLOAD_PLAINTEXT_RULES == 0 {
        return None;
    }
    let prefix = PLAINTEXT_RULE_FIXED_BITS + 128;
    let mut key = PlaintextRuleKey {
        workload: workload.workload,
        port,
        _pad: 0,
        source: *remote,
    };
    // The port's own rules, else the rules for every other port.
    let verdict = match PLAINTEXT_RULES.get(aya_ebpf::maps::lpm_trie::Key::new(prefix, key)) {
        Some(verdict) => *verdict,
        None => {
            key.port = 0;
            *PLAINTEXT_RULES.get(aya_ebpf::maps::lpm_trie::Key::new(prefix, key))?
        }
    };
    match verdict {
        PLAINTEXT_ALLOW => None,
        PLAINTEXT_DENY_POLICY => Some(Counter::InboundDeniedByPolicy),
        _ => Some(Counter::InboundDeniedNeedsIdentity),
    }
}
