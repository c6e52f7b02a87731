//! The map operations the daemon makes: the settings and exclusions written at start, each
//! pod's entry and inbound listeners, the mesh config's workloads and plaintext rules, the
//! original destinations of captured connections, the delivery announcements, and the
//! counters.

use super::{Datapath, DatapathError, lock, syscalls, take_map};
use crate::mesh::kernel::{KernelMaps, MapsDiff, MeshMaps, mapped_prefix};
use crate::settings::Settings;
use aya::Ebpf;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap, MapData, MapError};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use ztunnel_common::maps::{
    EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, FlowKey, OrigDst, PlaintextRuleKey, PodInfo,
    Settings as KernelSettings, names,
};
use ztunnel_common::{Addr, Counter, ports};

/// Writes this run's settings: the proxy mark, and the exclusions (adopted maps hold the
/// previous run's, which may differ).
pub(super) fn write_settings(ebpf: &mut Ebpf, settings: &Settings) -> Result<(), DatapathError> {
    let mut settings_map: Array<MapData, KernelSettings> = take_map(ebpf, names::SETTINGS)?;
    settings_map
        .set(
            0,
            KernelSettings {
                proxy_mark: settings.mark,
                _pad: 0,
            },
            0,
        )
        .map_err(|source| DatapathError::Map {
            name: names::SETTINGS,
            source,
        })?;
    let mut cidrs: LpmTrie<MapData, [u8; 16], u8> = take_map(ebpf, names::EXCLUDED_CIDRS)?;
    let present: Vec<(u32, [u8; 16])> = cidrs
        .keys()
        .filter_map(Result::ok)
        .map(|key| (key.prefix_len(), key.data()))
        .collect();
    write_exactly(
        names::EXCLUDED_CIDRS,
        &mut cidrs,
        present,
        &excluded_cidr_keys(&settings.exclude_cidrs),
        |map, (prefix, addr), value| map.insert(&LpmKey::new(prefix, addr), value, 0),
        |map, (prefix, addr)| map.remove(&LpmKey::new(prefix, addr)),
    )?;
    let mut ports: BpfHashMap<MapData, u16, u8> = take_map(ebpf, names::EXCLUDED_PORTS)?;
    let present: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
    write_exactly(
        names::EXCLUDED_PORTS,
        &mut ports,
        present,
        &excluded_port_bits(&settings.exclude_ports, &settings.exclude_inbound_ports),
        |map, port, bits| map.insert(port, bits, 0),
        |map, port| map.remove(&port),
    )?;
    Ok(())
}

/// `name`'s map, emptied of what the previous run left: the original destinations of
/// connections captured while it was down or draining (refused: nobody will take them), and
/// its delivery announcements (their sockets died with it; one left would let a later SYN
/// with that four-tuple past the proxy).
pub(super) fn cleared<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, DatapathError> {
    let mut map: BpfHashMap<MapData, K, V> = take_map(ebpf, name)?;
    let left: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in left {
        ignore_missing(map.remove(&key), name)?;
    }
    Ok(map)
}

impl Datapath {
    /// Registers a pod's inbound listener for one of its addresses (sk_lookup's target).
    pub(crate) fn register_inbound_listener(
        &self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), DatapathError> {
        lock(&self.listeners)
            .insert(Addr::from(ip), listener.as_raw_fd(), 0)
            .map_err(self.write_error(names::INBOUND_LISTENERS))
    }

    pub(crate) fn unregister_inbound_listener(&self, ip: IpAddr) -> Result<(), DatapathError> {
        ignore_missing(
            lock(&self.listeners).remove(&Addr::from(ip)),
            names::INBOUND_LISTENERS,
        )
    }

    pub(crate) fn insert_pod(&self, netns_cookie: u64, info: PodInfo) -> Result<(), DatapathError> {
        lock(&self.pods)
            .insert(netns_cookie, info, 0)
            .map_err(self.write_error(names::PODS))
    }

    pub(crate) fn remove_pod(&self, netns_cookie: u64) -> Result<(), DatapathError> {
        ignore_missing(lock(&self.pods).remove(&netns_cookie), names::PODS)
    }

    /// The netns cookies `ZT_PODS` holds.
    pub(crate) fn pod_cookies(&self) -> Vec<u64> {
        lock(&self.pods).keys().filter_map(Result::ok).collect()
    }

    /// Takes the original destination of the captured connection from `client` to its pod's
    /// outbound listener: capture recorded it under the whole four-tuple, the pod's own
    /// address and port to the same address's 15001, so no other connection can take it.
    /// One system call looks it up and deletes it, on every new connection.
    pub(crate) fn take_orig_dst(&self, client: SocketAddr) -> Option<SocketAddr> {
        let to_proxy = SocketAddr::new(client.ip(), ports::OUTBOUND);
        let key = flow_key(client, to_proxy);
        let orig: OrigDst = match syscalls::take(self.orig_dst.map().fd().as_fd(), &key) {
            Ok(orig) => orig?,
            Err(err) => {
                tracing::debug!(%client, %err, "cannot take the original destination");
                return None;
            }
        };
        Some(SocketAddr::new(IpAddr::from(orig.addr), orig.port))
    }

    /// Tells `sk_lookup` that the connection from `source` to `app` is the proxy's own
    /// delivery to the app, so its SYNs are not steered back to the proxy; `withdraw_delivery`
    /// once the connect returned.
    pub(crate) fn announce_delivery(
        &self,
        source: SocketAddr,
        app: SocketAddr,
    ) -> Result<(), DatapathError> {
        lock(&self.deliveries)
            .insert(flow_key(source, app), 1, 0)
            .map_err(|source| DatapathError::Map {
                name: names::DELIVERIES,
                source,
            })
    }

    pub(crate) fn withdraw_delivery(&self, source: SocketAddr, app: SocketAddr) {
        let removed = lock(&self.deliveries).remove(&flow_key(source, app));
        if let Err(err) = ignore_missing(removed, names::DELIVERIES) {
            tracing::warn!(%source, %app, %err, "cannot withdraw a delivery announcement");
        }
    }

    /// What a failed write to `name` is: `MapFull`, naming the setting that sizes it, when the
    /// map has no room left (a hash map answers E2BIG, an LPM trie ENOSPC).
    fn write_error(&self, name: &'static str) -> impl Fn(MapError) -> DatapathError + '_ {
        move |source| {
            let full = matches!(&source, MapError::SyscallError(err)
                if matches!(err.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)));
            match self.capacities.iter().find(|capacity| capacity.map == name) {
                Some(&capacity) if full => DatapathError::MapFull { capacity },
                _ => DatapathError::Map { name, source },
            }
        }
    }

    /// The kernel counters, summed over CPUs.
    pub(crate) fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let sum = self
                    .counters
                    .get(&c.index(), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (c, sum)
            })
            .collect()
    }
}

/// The maps' key for the connection from `from` to `to`.
fn flow_key(from: SocketAddr, to: SocketAddr) -> FlowKey {
    FlowKey::new(
        Addr::from(from.ip()),
        from.port(),
        Addr::from(to.ip()),
        to.port(),
    )
}

fn ignore_missing(result: Result<(), MapError>, name: &'static str) -> Result<(), DatapathError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other.map_err(|source| DatapathError::Map { name, source }),
    }
}

/// Makes `map` hold exactly `wanted`: every wanted entry is written first, then the present
/// keys not wanted are removed, so a lookup during the update finds the old or the new entry
/// of a key, never none.
fn write_exactly<M, K: Ord + Copy, V: Copy>(
    name: &'static str,
    map: &mut M,
    present: Vec<K>,
    wanted: &BTreeMap<K, V>,
    insert: impl Fn(&mut M, K, V) -> Result<(), MapError>,
    remove: impl Fn(&mut M, K) -> Result<(), MapError>,
) -> Result<(), DatapathError> {
    for (&key, &value) in wanted {
        insert(map, key, value).map_err(|source| DatapathError::Map { name, source })?;
    }
    for key in present {
        if !wanted.contains_key(&key) {
            ignore_missing(remove(map, key), name)?;
        }
    }
    Ok(())
}

/// The `ZT_EXCLUDED_CIDRS` entries: (prefix length, address) in the 16-byte (v4-mapped)
/// address space.
fn excluded_cidr_keys(cidrs: &[IpNet]) -> BTreeMap<(u32, [u8; 16]), u8> {
    cidrs
        .iter()
        .map(|net| {
            let (addr, prefix) = mapped_prefix(net);
            ((prefix, addr.octets()), 1)
        })
        .collect()
}

fn excluded_port_bits(outbound: &[u16], inbound: &[u16]) -> BTreeMap<u16, u8> {
    let mut bits = BTreeMap::new();
    for &port in outbound {
        *bits.entry(port).or_insert(0) |= EXCLUDE_OUTBOUND;
    }
    for &port in inbound {
        *bits.entry(port).or_insert(0) |= EXCLUDE_INBOUND;
    }
    bits
}

/// The mesh's view goes into `ZT_WORKLOADS` and `ZT_PLAINTEXT_RULES`: new and changed entries
/// first, stale ones last, so a lookup during an update sees the old or the new entry of a
/// key, never none.
impl KernelMaps for Datapath {
    type Error = DatapathError;

    /// A diff against what the maps hold.
    fn sync(&self, wanted: &MeshMaps) -> Result<(), DatapathError> {
        let mut rules = lock(&self.plaintext_rules);
        let present_rules: Vec<(u32, PlaintextRuleKey)> = rules
            .keys()
            .filter_map(Result::ok)
            .map(|key| (key.prefix_len(), key.data()))
            .collect();
        for (&(prefix, key), &verdict) in &wanted.plaintext_rules {
            rules
                .insert(&LpmKey::new(prefix, key), verdict, 0)
                .map_err(self.write_error(names::PLAINTEXT_RULES))?;
        }
        let mut workloads = lock(&self.workloads);
        let present_workloads: Vec<Addr> = workloads.keys().filter_map(Result::ok).collect();
        for (addr, entry) in &wanted.workloads {
            if workloads.get(addr, 0).ok().as_ref() != Some(entry) {
                workloads
                    .insert(addr, entry, 0)
                    .map_err(self.write_error(names::WORKLOADS))?;
            }
        }
        for addr in present_workloads {
            if !wanted.workloads.contains_key(&addr) {
                ignore_missing(workloads.remove(&addr), names::WORKLOADS)?;
            }
        }
        for (prefix, key) in present_rules {
            if !wanted.plaintext_rules.contains_key(&(prefix, key)) {
                ignore_missing(
                    rules.remove(&LpmKey::new(prefix, key)),
                    names::PLAINTEXT_RULES,
                )?;
            }
        }
        Ok(())
    }

    /// Only the keys `diff` names: nothing is read back.
    fn write(&self, diff: &MapsDiff) -> Result<(), DatapathError> {
        let mut rules = lock(&self.plaintext_rules);
        let mut workloads = lock(&self.workloads);
        for (&(prefix, key), verdict) in &diff.plaintext_rules {
            if let Some(verdict) = verdict {
                rules
                    .insert(&LpmKey::new(prefix, key), verdict, 0)
                    .map_err(self.write_error(names::PLAINTEXT_RULES))?;
            }
        }
        for (addr, entry) in &diff.workloads {
            if let Some(entry) = entry {
                workloads
                    .insert(addr, entry, 0)
                    .map_err(self.write_error(names::WORKLOADS))?;
            }
        }
        for (addr, entry) in &diff.workloads {
            if entry.is_none() {
                ignore_missing(workloads.remove(addr), names::WORKLOADS)?;
            }
        }
        for (&(prefix, key), verdict) in &diff.plaintext_rules {
            if verdict.is_none() {
                ignore_missing(
                    rules.remove(&LpmKey::new(prefix, key)),
                    names::PLAINTEXT_RULES,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_live_in_the_mapped_space() {
        let keys: Vec<(u32, [u8; 16])> =
            excluded_cidr_keys(&["10.96.0.0/12".parse().unwrap(), "fd00::/8".parse().unwrap()])
                .into_keys()
                .collect();
        // Ordered by prefix length: fd00::/8, then 10.96.0.0/12 as ::ffff:10.96.0.0/108.
        let (v6, v4) = (keys[0], keys[1]);
        assert_eq!(v6.0, 8);
        assert_eq!(v6.1[0], 0xfd);
        assert_eq!(v4.0, 108);
        assert_eq!(&v4.1[10..14], &[0xff, 0xff, 10, 96]);
    }

    #[test]
    fn port_exclusions_merge_directions() {
        let bits = excluded_port_bits(&[22, 443], &[22]);
        assert_eq!(bits[&22], EXCLUDE_OUTBOUND | EXCLUDE_INBOUND);
        assert_eq!(bits[&443], EXCLUDE_OUTBOUND);
    }
}
