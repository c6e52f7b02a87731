//! Per-CPU decision counters, one slot per outcome of every program.

macro_rules! counters {
    ($($variant:ident => $name:literal,)*) => {
        /// Index into the per-CPU `COUNTERS` array.
        #[repr(u32)]
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub enum Counter {
            $($variant,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Stable name used in status output and metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    OutboundCaptured => "outbound_captured",
    OutboundBypassNotTcp => "outbound_bypass_not_tcp",
    OutboundBypassMarked => "outbound_bypass_marked",
    OutboundBypassLoopback => "outbound_bypass_loopback",
    OutboundBypassOwnIp => "outbound_bypass_own_ip",
    OutboundBypassExcludedPort => "outbound_bypass_excluded_port",
    OutboundBypassExcludedCidr => "outbound_bypass_excluded_cidr",
    OutboundBypassNoPodAddress => "outbound_bypass_no_pod_address",
    OutboundRefusedMapFull => "outbound_refused_map_full",
    OutboundRefusedNoPodEntry => "outbound_refused_no_pod_entry",
    OrigDstRecorded => "orig_dst_recorded",
    OrigDstMiss => "orig_dst_miss",
    InboundSteered => "inbound_steered",
    InboundBypassNotTcp => "inbound_bypass_not_tcp",
    InboundBypassLocal => "inbound_bypass_local",
    InboundBypassDelivery => "inbound_bypass_delivery",
    InboundBypassHbone => "inbound_bypass_hbone",
    InboundBypassExcludedPort => "inbound_bypass_excluded_port",
    InboundRefusedNoProxy => "inbound_refused_no_proxy",
    InboundAssignFailed => "inbound_assign_failed",
    InboundDeniedByPolicy => "inbound_denied_by_policy",
    InboundDeniedNeedsIdentity => "inbound_denied_needs_identity",
    BindRefusedPodPort => "bind_refused_pod_port",
}

impl Counter {
    pub const COUNT: u32 = Counter::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
    }
}
