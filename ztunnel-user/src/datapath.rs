//! The kernel side, from userspace: loads the capture programs, owns their maps, and attaches
//! and detaches a pod's bpf_links.
//!
//! Layout under the bpffs directory (`--bpffs`):
//!
//! ```text
//! <dir>/maps/ZT_*                        every shared map
//! <dir>/pods/<uid>/{connect4,connect6,sock_ops,sk_lookup}   one pinned link per hook
//! ```

use crate::mounts::{Filesystem, is_on};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfError};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use ztunnel_common::maps::{
    EXCLUDE_INBOUND, EXCLUDE_OUTBOUND, OrigDst, PlaintextRuleKey, PodInfo, Settings, SocketKey,
    WorkloadEntry, names, programs,
};
use ztunnel_common::{Addr, Counter};

static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{0} is not on a bpffs mount (mount it with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs(PathBuf),
    #[error("{what} {path}: {source}")]
    Fs {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("pinning link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
}

/// What userspace sets in the kernel at start.
#[derive(Clone, Debug)]
pub struct DatapathSettings {
    pub pin_dir: PathBuf,
    pub mark: u32,
    pub excluded_cidrs: Vec<IpNet>,
    pub excluded_outbound_ports: Vec<u16>,
    pub excluded_inbound_ports: Vec<u16>,
}

pub struct Datapath {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    pods: Mutex<BpfHashMap<MapData, u64, PodInfo>>,
    orig_dst: Mutex<BpfHashMap<MapData, SocketKey, OrigDst>>,
    listeners: Mutex<SockHash<MapData, Addr>>,
    deliveries: Mutex<BpfHashMap<MapData, SocketKey, u8>>,
    workloads: Mutex<BpfHashMap<MapData, Addr, WorkloadEntry>>,
    plaintext_rules: Mutex<LpmTrie<MapData, PlaintextRuleKey, u32>>,
    counters: PerCpuArray<MapData, u64>,
}

/// What the kernel should know of the mesh config (built by `workload_map`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshMaps {
    pub workloads: BTreeMap<Addr, WorkloadEntry>,
    /// (prefix length, key) -> `PLAINTEXT_*` verdict.
    pub plaintext_rules: BTreeMap<(u32, PlaintextRuleKey), u32>,
}

/// The pinned links of one enrolled pod; dropping them does not detach (the pins hold them).
#[derive(Debug)]
pub struct PodLinks {
    pub dir: PathBuf,
    pub paths: Vec<PathBuf>,
}

impl Datapath {
    /// Loads the programs, pins the maps and applies the settings. Anything a previous run left
    /// in `pin_dir` is removed first.
    pub fn load(settings: &DatapathSettings) -> Result<Datapath, DatapathError> {
        let pin_dir = settings.pin_dir.clone();
        ensure_bpffs(pin_dir.parent().unwrap_or(&pin_dir))?;
        if pin_dir.exists() {
            tracing::warn!(dir = %pin_dir.display(), "removing eBPF state left by a previous run");
            remove_pins(&pin_dir)?;
        }
        for sub in ["maps", "pods"] {
            let dir = pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Fs {
                what: "creating",
                path: dir,
                source,
            })?;
        }

        let mut ebpf = Ebpf::load(PROGRAMS)?;
        for name in [programs::CONNECT4, programs::CONNECT6] {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        program::<SockOps>(&mut ebpf, programs::SOCK_OPS)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: programs::SOCK_OPS,
                source,
            })?;
        program::<SkLookup>(&mut ebpf, programs::SK_LOOKUP)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: programs::SK_LOOKUP,
                source,
            })?;

        for name in names::ALL {
            let map = ebpf.map(name).ok_or(DatapathError::Missing(name))?;
            let path = pin_dir.join("maps").join(name);
            map.pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        let mut settings_map: Array<MapData, Settings> = take_map(&mut ebpf, names::SETTINGS)?;
        settings_map
            .set(
                0,
                Settings {
                    proxy_mark: settings.mark,
                    _pad: 0,
                },
                0,
            )
            .map_err(|source| DatapathError::Map {
                name: names::SETTINGS,
                source,
            })?;
        let mut cidrs: LpmTrie<MapData, [u8; 16], u8> = take_map(&mut ebpf, names::EXCLUDED_CIDRS)?;
        for net in &settings.excluded_cidrs {
            cidrs
                .insert(&cidr_key(net), 1, 0)
                .map_err(|source| DatapathError::Map {
                    name: names::EXCLUDED_CIDRS,
                    source,
                })?;
        }
        let mut ports: BpfHashMap<MapData, u16, u8> = take_map(&mut ebpf, names::EXCLUDED_PORTS)?;
        for (port, bits) in excluded_port_bits(settings) {
            ports
                .insert(port, bits, 0)
                .map_err(|source| DatapathError::Map {
                    name: names::EXCLUDED_PORTS,
                    source,
                })?;
        }

        Ok(Datapath {
            pods: Mutex::new(take_map(&mut ebpf, names::PODS)?),
            orig_dst: Mutex::new(take_map(&mut ebpf, names::ORIG_DST)?),
            listeners: Mutex::new(take_map(&mut ebpf, names::INBOUND_LISTENERS)?),
            deliveries: Mutex::new(take_map(&mut ebpf, names::DELIVERIES)?),
            workloads: Mutex::new(take_map(&mut ebpf, names::WORKLOADS)?),
            plaintext_rules: Mutex::new(take_map(&mut ebpf, names::PLAINTEXT_RULES)?),
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            ebpf: Mutex::new(ebpf),
            pin_dir,
        })
    }

    /// Registers a pod's inbound listener for one of its addresses (sk_lookup's target).
    pub fn register_inbound_listener(
        &self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), DatapathError> {
        lock(&self.listeners)
            .insert(Addr::from(ip), listener.as_raw_fd(), 0)
            .map_err(|source| DatapathError::Map {
                name: names::INBOUND_LISTENERS,
                source,
            })
    }

    pub fn unregister_inbound_listener(&self, ip: IpAddr) -> Result<(), DatapathError> {
        ignore_missing(
            lock(&self.listeners).remove(&Addr::from(ip)),
            names::INBOUND_LISTENERS,
        )
    }

    pub fn insert_pod(&self, netns_cookie: u64, info: PodInfo) -> Result<(), DatapathError> {
        lock(&self.pods)
            .insert(netns_cookie, info, 0)
            .map_err(|source| DatapathError::Map {
                name: names::PODS,
                source,
            })
    }

    pub fn remove_pod(&self, netns_cookie: u64) -> Result<(), DatapathError> {
        ignore_missing(lock(&self.pods).remove(&netns_cookie), names::PODS)
    }

    /// Makes the workload and plaintext-rule maps hold exactly `wanted`, as a diff against
    /// what they hold: new and changed entries first, stale ones last, so a lookup during the
    /// update sees the old or the new entry of a key, never none.
    pub fn sync_mesh(&self, wanted: &MeshMaps) -> Result<(), DatapathError> {
        let map_error = |name| move |source| DatapathError::Map { name, source };
        let mut rules = lock(&self.plaintext_rules);
        let present_rules: Vec<(u32, PlaintextRuleKey)> = rules
            .keys()
            .filter_map(Result::ok)
            .map(|key| (key.prefix_len(), key.data()))
            .collect();
        for (&(prefix, key), &verdict) in &wanted.plaintext_rules {
            rules
                .insert(&LpmKey::new(prefix, key), verdict, 0)
                .map_err(map_error(names::PLAINTEXT_RULES))?;
        }
        let mut workloads = lock(&self.workloads);
        let present_workloads: Vec<Addr> = workloads.keys().filter_map(Result::ok).collect();
        for (addr, entry) in &wanted.workloads {
            if workloads.get(addr, 0).ok().as_ref() != Some(entry) {
                workloads
                    .insert(addr, entry, 0)
                    .map_err(map_error(names::WORKLOADS))?;
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

    /// Creates the pod's four bpf_links and pins them under `pods/<uid>/`. On failure, the
    /// links made so far are removed again.
    pub fn attach_pod(
        &self,
        uid: &str,
        cgroup: &impl AsFd,
        netns: &impl AsFd,
    ) -> Result<PodLinks, DatapathError> {
        let dir = self.pin_dir.join("pods").join(uid);
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Fs {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let mut links = PodLinks {
            dir,
            paths: Vec::new(),
        };
        let mut ebpf = lock(&self.ebpf);
        for hook in Hook::ALL {
            match hook.attach(&mut ebpf, cgroup, netns).and_then(|link| {
                let path = links.dir.join(hook.pin_name());
                link.pin(&path)
                    .map(|_| path.clone())
                    .map_err(|source| DatapathError::Pin { path, source })
            }) {
                Ok(path) => links.paths.push(path),
                Err(err) => {
                    detach_pod(&links);
                    return Err(err);
                }
            }
        }
        Ok(links)
    }

    /// Takes the original destination of a captured connection, by its client's address.
    pub fn take_orig_dst(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = SocketKey::new(Addr::from(client.ip()), client.port());
        let mut map = lock(&self.orig_dst);
        let orig = map.get(&key, 0).ok()?;
        // Best effort: the LRU evicts it anyway if the delete fails.
        let _ = map.remove(&key);
        Some(SocketAddr::new(IpAddr::from(orig.addr), orig.port))
    }

    /// Tells `sk_lookup` that the next connection from `source` into a pod is the proxy's own
    /// delivery to the app, so it is not steered back to the proxy.
    pub fn announce_delivery(&self, source: SocketAddr) -> Result<(), DatapathError> {
        let key = SocketKey::new(Addr::from(source.ip()), source.port());
        lock(&self.deliveries)
            .insert(key, 1, 0)
            .map_err(|source| DatapathError::Map {
                name: names::DELIVERIES,
                source,
            })
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
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

/// Unpins a pod's links, which detaches them, and removes its directory. Errors are logged:
/// a half-detached pod must still be torn down as far as possible.
pub fn detach_pod(links: &PodLinks) {
    for path in links.paths.iter().rev() {
        match PinnedLink::from_pin(path) {
            Ok(pinned) => match pinned.unpin() {
                Ok(link) => drop(link),
                Err(err) => tracing::error!(path = %path.display(), %err, "cannot unpin link"),
            },
            Err(err) => tracing::warn!(path = %path.display(), %err, "link already gone"),
        }
    }
    if let Err(err) = std::fs::remove_dir(&links.dir)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %links.dir.display(), %err, "cannot remove pod pin directory");
    }
}

/// One of the four attachments that capture a pod.
#[derive(Clone, Copy, Debug)]
enum Hook {
    SkLookup,
    SockOps,
    Connect6,
    Connect4,
}

impl Hook {
    /// Attach order: steering and re-keying are in place before `connect()` is rewritten.
    /// Detaching goes in reverse.
    const ALL: [Hook; 4] = [
        Hook::SkLookup,
        Hook::SockOps,
        Hook::Connect6,
        Hook::Connect4,
    ];

    /// The pin's file name.
    fn pin_name(self) -> &'static str {
        match self {
            Hook::SkLookup => "sk_lookup",
            Hook::SockOps => "sock_ops",
            Hook::Connect6 => "connect6",
            Hook::Connect4 => "connect4",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::SkLookup => programs::SK_LOOKUP,
            Hook::SockOps => programs::SOCK_OPS,
            Hook::Connect6 => programs::CONNECT6,
            Hook::Connect4 => programs::CONNECT4,
        }
    }

    /// Creates the bpf_link (cgroup hooks on the pod cgroup, `sk_lookup` on its netns).
    fn attach(
        self,
        ebpf: &mut Ebpf,
        cgroup: &impl AsFd,
        netns: &impl AsFd,
    ) -> Result<FdLink, DatapathError> {
        let name = self.program();
        let program_error = |source| DatapathError::Program { name, source };
        let fd_link = |link: Result<FdLink, _>| {
            link.map_err(|source| DatapathError::Link {
                path: PathBuf::from(name),
                source,
            })
        };
        // The two cgroup program types share no attach trait; the steps are the same.
        macro_rules! attach_to_cgroup {
            ($kind:ty) => {{
                let prog = program::<$kind>(ebpf, name)?;
                let id = prog
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(program_error)?;
                fd_link(prog.take_link(id).map_err(program_error)?.try_into())
            }};
        }
        match self {
            Hook::Connect4 | Hook::Connect6 => attach_to_cgroup!(CgroupSockAddr),
            Hook::SockOps => attach_to_cgroup!(SockOps),
            Hook::SkLookup => {
                let prog = program::<SkLookup>(ebpf, name)?;
                let id = prog.attach(netns.as_fd()).map_err(program_error)?;
                Ok(prog.take_link(id).map_err(program_error)?.into())
            }
        }
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DatapathError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    M::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a map handle cannot leave the handle itself inconsistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// LPM key of a CIDR in the 16-byte (v4-mapped) address space.
fn cidr_key(net: &IpNet) -> LpmKey<[u8; 16]> {
    let (addr, prefix) = mapped_prefix(net);
    LpmKey::new(prefix, addr.octets())
}

/// A CIDR in the kernel's 16-byte address space (IPv4 as v4-mapped IPv6): the network address
/// and the prefix length there.
pub fn mapped_prefix(net: &IpNet) -> (Addr, u32) {
    match net {
        IpNet::V4(v4) => (
            Addr::from(IpAddr::V4(v4.network())),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (
            Addr::from(IpAddr::V6(v6.network())),
            u32::from(v6.prefix_len()),
        ),
    }
}

fn excluded_port_bits(settings: &DatapathSettings) -> std::collections::BTreeMap<u16, u8> {
    let mut bits = std::collections::BTreeMap::new();
    for &port in &settings.excluded_outbound_ports {
        *bits.entry(port).or_insert(0) |= EXCLUDE_OUTBOUND;
    }
    for &port in &settings.excluded_inbound_ports {
        *bits.entry(port).or_insert(0) |= EXCLUDE_INBOUND;
    }
    bits
}

fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    // The pin directory's parent may not exist yet; check the closest existing ancestor.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let on_bpffs = is_on(existing, Filesystem::Bpffs).map_err(|source| DatapathError::Fs {
        what: "statfs",
        path: existing.to_owned(),
        source,
    })?;
    if on_bpffs {
        Ok(())
    } else {
        Err(DatapathError::NotBpffs(dir.to_owned()))
    }
}

/// Removes a pin tree; unpinning a link detaches it.
pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::Fs {
            what: "removing",
            path: dir.to_owned(),
            source: err,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_live_in_the_mapped_space() {
        let key = cidr_key(&"10.96.0.0/12".parse().unwrap());
        assert_eq!(key.prefix_len(), 108);
        assert_eq!(&key.data()[10..14], &[0xff, 0xff, 10, 96]);
        let key = cidr_key(&"fd00::/8".parse().unwrap());
        assert_eq!(key.prefix_len(), 8);
        assert_eq!(key.data()[0], 0xfd);
    }

    #[test]
    fn port_exclusions_merge_directions() {
        let settings = DatapathSettings {
            pin_dir: PathBuf::new(),
            mark: 1,
            excluded_cidrs: vec![],
            excluded_outbound_ports: vec![22, 443],
            excluded_inbound_ports: vec![22],
        };
        let bits = excluded_port_bits(&settings);
        assert_eq!(bits[&22], EXCLUDE_OUTBOUND | EXCLUDE_INBOUND);
        assert_eq!(bits[&443], EXCLUDE_OUTBOUND);
    }
}
