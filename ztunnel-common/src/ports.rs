//! Well-known ports and marks of the node proxy (Istio's ztunnel values).

/// Where captured outbound connections land, inside the pod netns.
pub const OUTBOUND: u16 = 15001;
/// Where inbound plaintext connections are steered, inside the pod netns.
pub const INBOUND_PLAINTEXT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mTLS), inside the pod netns.
pub const HBONE: u16 = 15008;
pub const ADMIN: u16 = 15000;
pub const METRICS: u16 = 15020;
pub const READINESS: u16 = 15021;
pub const DNS: u16 = 15053;

/// The proxy's listeners inside every enrolled pod's netns: the pod's processes may not bind
/// them, and nothing is delivered to them. Every other port is the app's, and captured.
pub const POD_PORTS: [u16; 3] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE];

pub fn is_pod_port(port: u16) -> bool {
    let mut i = 0;
    // A plain loop keeps the eBPF verifier's view simple (no iterator adaptors).
    while i < POD_PORTS.len() {
        if POD_PORTS[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// `SO_MARK` carried by every socket the proxy opens (0x539).
pub const DEFAULT_MARK: u32 = 1337;

/// `SO_MARK` of the proxy's delivery sockets (bound to a client's address inside a pod). A
/// policy rule in the pod netns routes packets with this mark to the local table, which brings
/// the app's replies back to the proxy. Distinct from `DEFAULT_MARK` so the proxy's own
/// outbound connections are routed normally.
pub const DELIVERY_MARK: u32 = 0x111;

/// Interface index of `lo`, the same in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;
