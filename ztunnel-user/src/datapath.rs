//! The kernel side, from userspace: loads the capture programs, owns their maps, and attaches
//! and detaches a pod's bpf_links.
//!
//! Layout under the bpffs directory (`--bpffs`):
//!
//! ```text
//! <dir>/maps/ZT_*                        every shared map
//! <dir>/pods/<uid>/{connect4,connect6,sock_ops,sk_lookup}   one pinned link per hook
//! ```
//!
//! Everything there outlives the daemon: while it is down the links keep capturing (new
//! connections are refused: nothing listens where they are steered), and the next run adopts
//! the maps and the links.

mod bpf_link;

use crate::mounts::{Filesystem, is_on};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, MapInfo, PerCpuArray, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
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
    #[error("parsing the eBPF object: {0}")]
    Parse(aya_obj::ParseError),
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
    #[error("the pinned links in {dir} are incomplete: no {}", missing.join(", "))]
    MissingPins {
        dir: PathBuf,
        missing: Vec<&'static str>,
    },
    #[error("the target (cgroup or netns) of link {path} is gone")]
    LinkTargetGone { path: PathBuf },
    #[error("moving link {path} on to the new program: {source}")]
    LinkUpdate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("forwarding the eBPF programs' log: {0}")]
    EbpfLog(Box<dyn std::error::Error + Send + Sync>),
}

/// What userspace sets in the kernel at start.
#[derive(Clone, Debug)]
pub struct DatapathSettings {
    pub pin_dir: PathBuf,
    pub mark: u32,
    pub excluded_cidrs: Vec<IpNet>,
    pub excluded_outbound_ports: Vec<u16>,
    pub excluded_inbound_ports: Vec<u16>,
    /// The programs' debug lines in the daemon's log (`--ebpf-log`).
    pub ebpf_log: bool,
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
    /// Loads the programs and applies the settings. The maps a previous run pinned are
    /// adopted when every one of them is there with the layout these programs were built for,
    /// so its pods keep their kernel state across the restart. Otherwise (no maps, some
    /// missing, a layout an upgrade changed) the programs get new maps, pinned in place of
    /// the old ones; the old maps live on, read only by the old programs, until every old
    /// link has been moved on to the new programs (`adopt_pod`) or removed.
    pub fn load(settings: &DatapathSettings) -> Result<Datapath, DatapathError> {
        let pin_dir = settings.pin_dir.clone();
        ensure_bpffs(pin_dir.parent().unwrap_or(&pin_dir))?;
        for sub in ["maps", "pods"] {
            let dir = pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Fs {
                what: "creating",
                path: dir,
                source,
            })?;
        }
        let maps_dir = pin_dir.join("maps");
        let object = aya_obj::Object::parse(PROGRAMS).map_err(DatapathError::Parse)?;
        match check_pinned_maps(&maps_dir, &object) {
            PinnedMaps::Absent => {
                tracing::info!(dir = %maps_dir.display(), "no maps pinned by a previous run; creating them")
            }
            PinnedMaps::Fitting => {
                tracing::info!(dir = %maps_dir.display(), "adopting the maps pinned by the previous run")
            }
            PinnedMaps::Unfit(problems) => {
                tracing::error!(dir = %maps_dir.display(), problems = %problems.join("; "),
                    "the maps pinned by the previous run do not fit these programs; starting with new maps (the pods of the previous run move on to them, or are released)");
                remove_pins(&maps_dir)?;
                std::fs::create_dir_all(&maps_dir).map_err(|source| DatapathError::Fs {
                    what: "creating",
                    path: maps_dir.clone(),
                    source,
                })?;
            }
        }

        // Pinned maps are opened, missing ones created and pinned.
        let mut loader = EbpfLoader::new();
        for name in names::ALL {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        // Every log call of the programs is behind `level <= AYA_LOG_LEVEL`, a constant to
        // the verifier: at 0 it removes the logging code. Their ring buffer then gets one page.
        let log_level = if settings.ebpf_log {
            aya_log::Level::Debug as u8
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        if !settings.ebpf_log {
            loader.map_max_entries(EBPF_LOG_MAP, 1);
        }
        let mut ebpf = loader.load(PROGRAMS)?;
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
        if settings.ebpf_log {
            start_ebpf_log(&mut ebpf)?;
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
        // Adopted maps hold the previous run's exclusions, which may differ from these.
        let mut cidrs: LpmTrie<MapData, [u8; 16], u8> = take_map(&mut ebpf, names::EXCLUDED_CIDRS)?;
        let present: Vec<(u32, [u8; 16])> = cidrs
            .keys()
            .filter_map(Result::ok)
            .map(|key| (key.prefix_len(), key.data()))
            .collect();
        write_exactly(
            names::EXCLUDED_CIDRS,
            &mut cidrs,
            present,
            &excluded_cidr_keys(settings),
            |map, (prefix, addr), value| map.insert(&LpmKey::new(prefix, addr), value, 0),
            |map, (prefix, addr)| map.remove(&LpmKey::new(prefix, addr)),
        )?;
        let mut ports: BpfHashMap<MapData, u16, u8> = take_map(&mut ebpf, names::EXCLUDED_PORTS)?;
        let present: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        write_exactly(
            names::EXCLUDED_PORTS,
            &mut ports,
            present,
            &excluded_port_bits(settings),
            |map, port, bits| map.insert(port, bits, 0),
            |map, port| map.remove(&port),
        )?;

        // The previous run's delivery announcements: their sockets died with it, and one left
        // would let a later SYN from that address and port past the proxy.
        let mut deliveries: BpfHashMap<MapData, SocketKey, u8> =
            take_map(&mut ebpf, names::DELIVERIES)?;
        let announced: Vec<SocketKey> = deliveries.keys().filter_map(Result::ok).collect();
        for key in announced {
            ignore_missing(deliveries.remove(&key), names::DELIVERIES)?;
        }

        Ok(Datapath {
            pods: Mutex::new(take_map(&mut ebpf, names::PODS)?),
            orig_dst: Mutex::new(take_map(&mut ebpf, names::ORIG_DST)?),
            listeners: Mutex::new(take_map(&mut ebpf, names::INBOUND_LISTENERS)?),
            deliveries: Mutex::new(deliveries),
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

    /// Moves the pinned links of a pod a previous run captured on to this daemon's programs,
    /// one atomic `BPF_LINK_UPDATE` per hook, in attach order: the pod never goes uncaptured,
    /// and afterwards no link runs a program that reads maps nobody writes. On failure the
    /// pod's links are removed.
    pub fn adopt_pod(&self, uid: &str) -> Result<PodLinks, DatapathError> {
        let links = self.pod_links(uid);
        let missing: Vec<&'static str> = Hook::ALL
            .iter()
            .map(|hook| hook.pin_name())
            .filter(|name| !links.paths.contains(&links.dir.join(name)))
            .collect();
        let adopted = if missing.is_empty() {
            let ebpf = lock(&self.ebpf);
            Hook::ALL
                .iter()
                .try_for_each(|hook| replace_program(&ebpf, *hook, &links.dir))
        } else {
            Err(DatapathError::MissingPins {
                dir: links.dir.clone(),
                missing,
            })
        };
        match adopted {
            Ok(()) => Ok(links),
            Err(err) => {
                detach_pod(&links);
                Err(err)
            }
        }
    }

    /// The links pinned for pod `uid` (the ones present, in attach order).
    pub fn pod_links(&self, uid: &str) -> PodLinks {
        let dir = self.pin_dir.join("pods").join(uid);
        let paths = Hook::ALL
            .iter()
            .map(|hook| dir.join(hook.pin_name()))
            .filter(|path| path.exists())
            .collect();
        PodLinks { dir, paths }
    }

    /// The uids that have pinned links (a directory under `pods/` holding pins; uids with a
    /// `/` are nested directories).
    pub fn pinned_pods(&self) -> Vec<String> {
        let root = self.pin_dir.join("pods");
        let mut uids = Vec::new();
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut holds_pins = false;
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                    Ok(_) => holds_pins = true,
                    Err(_) => {}
                }
            }
            if holds_pins && let Ok(uid) = dir.strip_prefix(&root) {
                uids.push(uid.to_string_lossy().into_owned());
            }
        }
        uids
    }

    /// The netns cookies `ZT_PODS` holds.
    pub fn pod_cookies(&self) -> Vec<u64> {
        lock(&self.pods).keys().filter_map(Result::ok).collect()
    }

    /// Takes the original destination of a captured connection, by its client's address.
    pub fn take_orig_dst(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = socket_key(client);
        let mut map = lock(&self.orig_dst);
        let orig = map.get(&key, 0).ok()?;
        // Best effort: the LRU evicts it anyway if the delete fails.
        let _ = map.remove(&key);
        Some(SocketAddr::new(IpAddr::from(orig.addr), orig.port))
    }

    /// Tells `sk_lookup` that the next connection from `source` into a pod is the proxy's own
    /// delivery to the app, so it is not steered back to the proxy.
    pub fn announce_delivery(&self, source: SocketAddr) -> Result<(), DatapathError> {
        let key = socket_key(source);
        lock(&self.deliveries)
            .insert(key, 1, 0)
            .map_err(|source| DatapathError::Map {
                name: names::DELIVERIES,
                source,
            })
    }

    /// Withdraws an announcement no SYN consumed; nothing if one did.
    pub fn withdraw_delivery(&self, source: SocketAddr) {
        let key = socket_key(source);
        if let Err(err) = ignore_missing(lock(&self.deliveries).remove(&key), names::DELIVERIES) {
            tracing::warn!(%source, %err, "cannot withdraw a delivery announcement");
        }
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

/// The programs' log ring buffer (aya-log-ebpf's name for it).
const EBPF_LOG_MAP: &str = "AYA_LOGS";

/// Forwards the programs' log lines (`--ebpf-log`) into the daemon's log, from a thread that
/// waits on their ring buffer for as long as the process runs.
fn start_ebpf_log(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let mut reader = aya_log::EbpfLogger::init_with_logger(ebpf, Unpadded)
        .map_err(|err| DatapathError::EbpfLog(err.into()))?;
    std::thread::Builder::new()
        .name("ebpf-log".into())
        .spawn(move || {
            loop {
                let mut ready = [nix::poll::PollFd::new(
                    reader.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut ready, nix::poll::PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => reader.flush(),
                    Err(err) => {
                        tracing::error!(%err, "cannot wait for the eBPF programs' log lines; no more of them will be shown");
                        return;
                    }
                }
            }
        })
        .map_err(|err| DatapathError::EbpfLog(err.into()))?;
    tracing::info!(
        "the eBPF programs log their capture decisions at debug level, target {}",
        ztunnel_common::EBPF_LOG_TARGET
    );
    Ok(())
}

/// The daemon's logger, for the programs' lines without the spaces that pad their last
/// argument (a name: the programs can only send arguments of a fixed length).
struct Unpadded;

impl log::Log for Unpadded {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            let args = format_args!("{}", line.trim_end());
            log::logger().log(
                &log::Record::builder()
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(args)
                    .build(),
            );
        }
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// The daemon's log filter: `filter`, after a directive that shows the eBPF programs' lines
/// when they log (`--ebpf-log`); a directive of `filter` for their target takes precedence.
pub fn log_filter(filter: &str, ebpf_log: bool) -> String {
    match (ebpf_log, filter.is_empty()) {
        (false, _) => filter.to_owned(),
        (true, true) => format!("{}=debug", ztunnel_common::EBPF_LOG_TARGET),
        (true, false) => format!("{}=debug,{filter}", ztunnel_common::EBPF_LOG_TARGET),
    }
}

/// Points the link of `hook` pinned in `dir` at this daemon's program for that hook.
fn replace_program(ebpf: &Ebpf, hook: Hook, dir: &Path) -> Result<(), DatapathError> {
    let name = hook.program();
    let program = ebpf
        .program(name)
        .ok_or(DatapathError::Missing(name))?
        .fd()
        .map_err(|source| DatapathError::Program { name, source })?;
    let path = dir.join(hook.pin_name());
    bpf_link::replace_program(&path, program.as_fd()).map_err(|source| {
        if source.raw_os_error() == Some(libc::ENOLINK) {
            DatapathError::LinkTargetGone { path }
        } else {
            DatapathError::LinkUpdate { path, source }
        }
    })
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

/// The maps' key for a socket address.
fn socket_key(addr: SocketAddr) -> SocketKey {
    SocketKey::new(Addr::from(addr.ip()), addr.port())
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

/// What `load` found in `maps/`.
enum PinnedMaps {
    Absent,
    /// Every map is pinned with the layout the programs expect.
    Fitting,
    /// What does not fit, one entry per map.
    Unfit(Vec<String>),
}

/// The shape of a map, as the kernel created it: what the programs were verified against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapLayout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl MapLayout {
    fn of_definition(map: &aya_obj::Map) -> MapLayout {
        MapLayout {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        }
    }

    fn of_pin(path: &Path) -> Result<MapLayout, MapError> {
        let info = MapInfo::from_pin(path)?;
        Ok(MapLayout {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Compares the maps pinned in `dir` with the definitions in `object`. Pins of maps these
/// programs do not have (an upgrade removed them) are removed.
fn check_pinned_maps(dir: &Path, object: &aya_obj::Object) -> PinnedMaps {
    remove_unknown_pins(dir);
    let mut found = 0;
    let mut problems = Vec::new();
    for name in names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            problems.push(format!("{name} is not pinned"));
            continue;
        }
        found += 1;
        let Some(definition) = object.maps.get(name) else {
            problems.push(format!("{name} is not in the eBPF object"));
            continue;
        };
        if let Some(problem) = layout_problem(
            name,
            MapLayout::of_pin(&path),
            MapLayout::of_definition(definition),
        ) {
            problems.push(problem);
        }
    }
    match (found, problems.is_empty()) {
        (0, _) => PinnedMaps::Absent,
        (_, true) => PinnedMaps::Fitting,
        (_, false) => PinnedMaps::Unfit(problems),
    }
}

/// Why a pinned map cannot serve programs that expect `wanted`, if it cannot.
fn layout_problem(
    name: &str,
    pinned: Result<MapLayout, MapError>,
    wanted: MapLayout,
) -> Option<String> {
    match pinned {
        Ok(pinned) if pinned == wanted => None,
        Ok(pinned) => Some(format!(
            "{name} is pinned as {pinned}, the programs need {wanted}"
        )),
        Err(err) => Some(format!("{name} is pinned but unreadable as a map: {err}")),
    }
}

fn remove_unknown_pins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let known = entry
            .file_name()
            .to_str()
            .is_some_and(|name| names::ALL.contains(&name));
        if known {
            continue;
        }
        tracing::warn!(path = %path.display(), "removing a pin these programs do not use");
        if let Err(err) = remove_pins(&path) {
            tracing::warn!(%err, "cannot remove the unused pin");
        }
    }
}

/// The `ZT_EXCLUDED_CIDRS` entries: (prefix length, address) in the 16-byte (v4-mapped)
/// address space.
fn excluded_cidr_keys(settings: &DatapathSettings) -> BTreeMap<(u32, [u8; 16]), u8> {
    settings
        .excluded_cidrs
        .iter()
        .map(|net| {
            let (addr, prefix) = mapped_prefix(net);
            ((prefix, addr.octets()), 1)
        })
        .collect()
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

fn excluded_port_bits(settings: &DatapathSettings) -> BTreeMap<u16, u8> {
    let mut bits = BTreeMap::new();
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

/// Removes a pin or a tree of pins; unpinning a link detaches it.
fn remove_pins(path: &Path) -> Result<(), DatapathError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(err) => Err(err),
    };
    match removed {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(DatapathError::Fs {
            what: "removing",
            path: path.to_owned(),
            source: err,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DatapathSettings {
        DatapathSettings {
            pin_dir: PathBuf::new(),
            mark: 1,
            excluded_cidrs: vec!["10.96.0.0/12".parse().unwrap(), "fd00::/8".parse().unwrap()],
            excluded_outbound_ports: vec![22, 443],
            excluded_inbound_ports: vec![22],
            ebpf_log: false,
        }
    }

    #[test]
    fn the_ebpf_log_directive_comes_first() {
        assert_eq!(log_filter("info", false), "info");
        assert_eq!(log_filter("info", true), "ztunnel_ebpf=debug,info");
        assert_eq!(log_filter("", true), "ztunnel_ebpf=debug");
    }

    #[test]
    fn cidr_keys_live_in_the_mapped_space() {
        let keys: Vec<(u32, [u8; 16])> = excluded_cidr_keys(&settings()).into_keys().collect();
        // Ordered by prefix length: fd00::/8, then 10.96.0.0/12 as ::ffff:10.96.0.0/108.
        let (v6, v4) = (keys[0], keys[1]);
        assert_eq!(v6.0, 8);
        assert_eq!(v6.1[0], 0xfd);
        assert_eq!(v4.0, 108);
        assert_eq!(&v4.1[10..14], &[0xff, 0xff, 10, 96]);
    }

    #[test]
    fn port_exclusions_merge_directions() {
        let bits = excluded_port_bits(&settings());
        assert_eq!(bits[&22], EXCLUDE_OUTBOUND | EXCLUDE_INBOUND);
        assert_eq!(bits[&443], EXCLUDE_OUTBOUND);
    }

    #[test]
    fn a_pinned_map_fits_only_with_the_same_layout() {
        let wanted = MapLayout {
            map_type: 1,
            key_size: 8,
            value_size: 40,
            max_entries: 4096,
            flags: 0,
        };
        assert_eq!(layout_problem("ZT_PODS", Ok(wanted), wanted), None);
        let grown = MapLayout {
            value_size: 44,
            ..wanted
        };
        assert_eq!(
            layout_problem("ZT_PODS", Ok(grown), wanted).unwrap(),
            "ZT_PODS is pinned as type 1, key 8 B, value 44 B, 4096 entries, flags 0x0, \
             the programs need type 1, key 8 B, value 40 B, 4096 entries, flags 0x0"
        );
        let unreadable = layout_problem(
            "ZT_PODS",
            Err(MapError::InvalidName { name: "x".into() }),
            wanted,
        );
        assert!(
            unreadable
                .unwrap()
                .starts_with("ZT_PODS is pinned but unreadable as a map")
        );
    }

    #[test]
    fn the_programs_define_every_map_the_daemon_pins() {
        let object = aya_obj::Object::parse(PROGRAMS).unwrap();
        for name in names::ALL {
            assert!(object.maps.contains_key(name), "{name}");
        }
    }
}
