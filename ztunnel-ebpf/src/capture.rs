//! The four programs. Each reads what the decision needs, asks `ztunnel_common::verdict`, and
//! counts the outcome.

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie};
use aya_ebpf::macros::{cgroup_sock_addr, sk_lookup, sock_ops};
use aya_ebpf::programs::{SkLookupContext, SockAddrContext, SockOpsContext};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use ztunnel_common::maps::{EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, FlowKey, OrigDst};
use ztunnel_common::verdict::{self, Connect, Inbound, Lookup, Outbound};
use ztunnel_common::{Addr, Counter, ports};

use crate::log::{counter_name, decision};
use crate::maps::{
    DELIVERIES, INBOUND_LISTENERS, ORIG_DST, PENDING_ORIG_DST, PODS, ZT_HAS_INGRESS_IFINDEX,
    cidr_excluded, count, plaintext_denied, port_excluded, proxy_mark,
};

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

/// `cgroup/connect*` and `cgroup/bind*` return values (a refusal is EPERM to the caller).
const CONNECT_ALLOW: i32 = 1;
const CONNECT_REFUSE: i32 = 0;
const BIND_ALLOW: i32 = 1;
const BIND_REFUSE: i32 = 0;
/// `sk_lookup` return values: let the normal lookup (or our assignment) stand, or drop.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid context; 4-byte loads as the verifier requires.
    let dst = Addr::from_ip4_be(unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_ip4)) });
    connect(&ctx, dst, |sa, to| {
        // An IPv4 destination is always captured to the pod's IPv4 address.
        if let Some(ip4) = to.ip4_be() {
            // SAFETY: 4-byte store into the writable user_ip4.
            unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), ip4) }
        }
    })
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as above; each word is read on its own because the verifier only allows 4-byte
    // loads of user_ip6.
    let dst = unsafe { Addr::from_ip6_be(read_words(addr_of!((*sa).user_ip6))) };
    connect(&ctx, dst, |sa, to| {
        // SAFETY: 4-byte stores into the writable user_ip6 words (connect4 may not touch them,
        // which is why each program brings its own writer).
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), to.words[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), to.words[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), to.words[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), to.words[3]);
        }
    })
}

#[inline(always)]
fn connect(
    ctx: &SockAddrContext,
    dst: Addr,
    write_dst: impl FnOnce(*mut bpf_sock_addr, Addr),
) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: plain context reads; `sk` is always set for connect hooks.
    let (sock_type, protocol, user_port, mark) = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        ((*sa).type_, (*sa).protocol, (*sa).user_port, (*sk).mark)
    };
    let facts = Connect {
        is_tcp: sock_type == SOCK_STREAM && protocol == IPPROTO_TCP,
        marked: mark == proxy_mark(),
        dst,
        dst_port: u16::from_be(user_port as u16),
    };
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the map can change it.
    let pod = unsafe { PODS.get(&netns) }.copied();
    let decision = verdict::outbound(
        &facts,
        pod.as_ref(),
        |port| port_excluded(port, EXCLUDE_OUTBOUND),
        cidr_excluded,
    );
    let to = match decision {
        Outbound::Bypass(reason) => {
            count(reason);
            decision!(
                ctx,
                "connect to {:i}:{} bypassed: {}",
                dst.octets(),
                facts.dst_port,
                counter_name(reason)
            );
            return CONNECT_ALLOW;
        }
        Outbound::Refuse(reason) => {
            count(reason);
            decision!(
                ctx,
                "connect to {:i}:{} refused: {}",
                dst.octets(),
                facts.dst_port,
                counter_name(reason)
            );
            return CONNECT_REFUSE;
        }
        Outbound::Capture { to } => to,
    };

    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst,
        port: facts.dst_port,
        _pad: [0; 6],
    };
    if let Err(err) = PENDING_ORIG_DST.insert(&cookie, &orig, 0) {
        // Without the original destination the proxy could not route the connection: refuse
        // it rather than let it through uncaptured.
        count(Counter::OutboundRefusedMapFull);
        decision!(
            ctx,
            "connect to {:i}:{} refused: its original destination could not be stored (error {}): {}",
            dst.octets(),
            facts.dst_port,
            err,
            counter_name(Counter::OutboundRefusedMapFull)
        );
        return CONNECT_REFUSE;
    }
    write_dst(sa, to);
    // SAFETY: 4-byte store into the writable user_port.
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(ports::OUTBOUND.to_be()),
        )
    };
    count(Counter::OutboundCaptured);
    decision!(
        ctx,
        "connect to {:i}:{} captured: sent to {:i}:{} (socket cookie {})",
        dst.octets(),
        facts.dst_port,
        to.octets(),
        ports::OUTBOUND,
        cookie
    );
    CONNECT_ALLOW
}

/// The proxy's ports of the pod's netns are the proxy's: a pod's process may not bind them
/// (it could take the listener the proxy opens there, after a restart say, and with it the
/// pod's connections). The daemon's sockets are not in the pod's cgroup, so this never sees
/// them.
#[cgroup_sock_addr(bind4)]
pub fn zt_bind4(ctx: SockAddrContext) -> i32 {
    bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn zt_bind6(ctx: SockAddrContext) -> i32 {
    bind(&ctx)
}

#[inline(always)]
fn bind(ctx: &SockAddrContext) -> i32 {
    // SAFETY: a 4-byte context read; the port is in network byte order in its low half.
    let user_port = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) };
    let port = u16::from_be(user_port as u16);
    if verdict::bind_allowed(port) {
        return BIND_ALLOW;
    }
    count(Counter::BindRefusedPodPort);
    decision!(
        ctx,
        "bind to port {} refused: {}",
        port,
        counter_name(Counter::BindRefusedPodPort)
    );
    BIND_REFUSE
}

/// Once the SYN is about to leave, the local port is known: re-key the original destination
/// by the client's (address, port), which is what the proxy sees as its peer after `accept()`.
#[sock_ops]
pub fn zt_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { PENDING_ORIG_DST.get(&cookie) }).copied() else {
        // Bypassed connections have no entry; only a captured one (sent to 15001) is a miss.
        if u32::from_be(ctx.remote_port()) as u16 == ports::OUTBOUND {
            count(Counter::OrigDstMiss);
            decision!(
                &ctx,
                "connection to the proxy's {} without an original destination (socket cookie {}): {}",
                ports::OUTBOUND,
                cookie,
                counter_name(Counter::OrigDstMiss)
            );
        }
        return 1;
    };
    // Read both forms unconditionally: a branch per family lets the compiler compute the field
    // offset at run time, and the verifier refuses context access through a moved pointer.
    let ops = ctx.ops;
    // SAFETY: 4-byte context reads, one per word.
    let (local4, local6, remote4, remote6) = unsafe {
        (
            read_volatile(addr_of!((*ops).local_ip4)),
            read_words(addr_of!((*ops).local_ip6)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            read_words(addr_of!((*ops).remote_ip6)),
        )
    };
    let (local, remote) = if ctx.family() == AF_INET {
        (Addr::from_ip4_be(local4), Addr::from_ip4_be(remote4))
    } else {
        (Addr::from_ip6_be(local6), Addr::from_ip6_be(remote6))
    };
    let local_port = ctx.local_port() as u16;
    // The whole four-tuple (the remote end is the pod's own 15001 it was sent to): only the
    // connection that made the entry can take it, never another pod's with the same port.
    let key = FlowKey::new(
        local,
        local_port,
        remote,
        u32::from_be(ctx.remote_port()) as u16,
    );
    match ORIG_DST.insert(&key, &orig, 0) {
        Ok(()) => {
            count(Counter::OrigDstRecorded);
            decision!(
                &ctx,
                "original destination {:i}:{} recorded for client {:i}:{} (socket cookie {})",
                orig.addr.octets(),
                orig.port,
                local.octets(),
                local_port,
                cookie
            );
        }
        Err(err) => {
            count(Counter::OrigDstMiss);
            decision!(
                &ctx,
                "original destination {:i}:{} of client {:i}:{} could not be stored (error {}): {}",
                orig.addr.octets(),
                orig.port,
                local.octets(),
                local_port,
                err,
                counter_name(Counter::OrigDstMiss)
            );
        }
    }
    let _ = PENDING_ORIG_DST.remove(&cookie);
    1
}

/// Steers TCP connections arriving from outside the pod to the proxy's 15006 listener.
#[sk_lookup]
pub fn zt_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: 4-byte context reads. Both address forms are read unconditionally, for the same
    // reason as in `zt_sock_ops`.
    let (family, protocol, local_port, remote_port, local4, local6, remote4, remote6) = unsafe {
        (
            (*l).family,
            (*l).protocol,
            (*l).local_port,
            (*l).remote_port,
            read_volatile(addr_of!((*l).local_ip4)),
            read_words(addr_of!((*l).local_ip6)),
            read_volatile(addr_of!((*l).remote_ip4)),
            read_words(addr_of!((*l).remote_ip6)),
        )
    };
    // Linux 5.17 added the field; on older kernels its load would not pass the verifier,
    // which here never sees it (the loader's constant prunes the branch).
    let ingress_ifindex = if ZT_HAS_INGRESS_IFINDEX.load() != 0 {
        // SAFETY: a 4-byte context read.
        unsafe { read_volatile(addr_of!((*l).ingress_ifindex)) }
    } else {
        0
    };
    let (local, remote) = if family == AF_INET {
        (Addr::from_ip4_be(local4), Addr::from_ip4_be(remote4))
    } else {
        (Addr::from_ip6_be(local6), Addr::from_ip6_be(remote6))
    };
    let facts = Lookup {
        is_tcp: protocol == IPPROTO_TCP,
        ingress_ifindex,
        remote,
        local,
        local_port: local_port as u16,
    };
    // The proxy's delivery of exactly this connection, announced while it lives (so a
    // retransmitted SYN or a SYN-cookie ACK is let through as well as the first SYN).
    let delivery = FlowKey::new(remote, u16::from_be(remote_port), local, local_port as u16);
    let decision = verdict::inbound(
        &facts,
        |port| port_excluded(port, EXCLUDE_INBOUND),
        // SAFETY: only whether the entry exists is read.
        || unsafe { DELIVERIES.get(&delivery) }.is_some(),
    );
    // How the lines below name the connection (the addresses are formatted only when a line
    // is written).
    let (from_port, to_port) = (u16::from_be(remote_port), local_port as u16);
    if let Inbound::Pass(reason) = decision {
        count(reason);
        // Not TCP: every UDP datagram comes here; only connections are worth a line.
        if reason != Counter::InboundBypassNotTcp {
            decision!(
                &ctx,
                "connection from {:i}:{} to {:i}:{} passed: {}",
                remote.octets(),
                from_port,
                local.octets(),
                to_port,
                counter_name(reason)
            );
        }
        return SK_PASS;
    }
    // Refused here, the connection never costs the proxy an accept.
    if let Some(reason) = plaintext_denied(&local, local_port as u16, &remote) {
        count(reason);
        decision!(
            &ctx,
            "connection from {:i}:{} to {:i}:{} refused: {}",
            remote.octets(),
            from_port,
            local.octets(),
            to_port,
            counter_name(reason)
        );
        return SK_DROP;
    }
    let (refusal, err) = match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(Counter::InboundSteered);
            decision!(
                &ctx,
                "connection from {:i}:{} to {:i}:{} steered to the proxy's {}",
                remote.octets(),
                from_port,
                local.octets(),
                to_port,
                ports::INBOUND_PLAINTEXT
            );
            return SK_PASS;
        }
        // This program is only attached while the pod is enrolled, and the listener is
        // registered before it is attached: no listener means the proxy is down. Drop rather
        // than let the connection reach the app unproxied.
        Err(err) if err == -ENOENT => (Counter::InboundRefusedNoProxy, err),
        Err(err) => (Counter::InboundAssignFailed, err),
    };
    count(refusal);
    decision!(
        &ctx,
        "connection from {:i}:{} to {:i}:{} refused (error {}): {}",
        remote.octets(),
        from_port,
        local.octets(),
        to_port,
        err,
        counter_name(refusal)
    );
    SK_DROP
}

/// Reads an IPv6 address from a context field word by word: the verifier only allows 4-byte
/// loads there, and volatile keeps the compiler from merging them.
///
/// # Safety
/// `field` must point into the program's context.
#[inline(always)]
unsafe fn read_words(field: *const [u32; 4]) -> [u32; 4] {
    // SAFETY: per the contract above.
    unsafe {
        [
            read_volatile(addr_of!((*field)[0])),
            read_volatile(addr_of!((*field)[1])),
            read_volatile(addr_of!((*field)[2])),
            read_volatile(addr_of!((*field)[3])),
        ]
    }
}
