//! The kernel side of eBPF capture, from userspace: loading the programs (`load`, here), the
//! pinned maps a restart adopts or replaces (`pins`), each pod's bpf_links (`links`, moved on
//! to new programs by `syscalls`) and the map operations the daemon makes (`maps`).
//!
//! Layout under the bpffs directory (`--bpffs`):
//!
//! ```text
//! <dir>/maps/ZT_*                        every shared map
//! <dir>/pods/<uid>/{sk_lookup,sock_ops,bind6,bind4,connect6,connect4}   a pinned link per hook
//! ```
//!
//! Everything there outlives the daemon: while it is down the links keep capturing (new
//! connections are refused: nothing listens where they are steered), and the next run adopts
//! the maps and the links.

mod links;
mod logging;
mod maps;
mod pins;
mod syscalls;

pub(crate) use links::{PodLinks, detach_pod};

use crate::host::features::Node;
use crate::settings::{MapCapacity, Settings};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use std::path::PathBuf;
use std::sync::Mutex;
use ztunnel_common::Addr;
use ztunnel_common::maps::{
    FlowKey, OrigDst, PlaintextRuleKey, PodInfo, WorkloadEntry, globals, names, programs,
};

/// The programs, as `ztunnel-ebpf` builds them twice: without any logging code, and with
/// their debug lines for `--ebpf-log` (`logging`). Only the one loaded is ever read, so the
/// other costs no memory.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel"));
static PROGRAMS_LOGGING: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-logging"));

#[derive(Debug, thiserror::Error)]
pub(crate) enum DatapathError {
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
    #[error(
        "eBPF map {} is full: it holds {} entries; raise --{} ({}) to make it larger",
        .capacity.map, .capacity.entries, .capacity.flag, .capacity.env
    )]
    MapFull { capacity: MapCapacity },
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

pub(crate) struct Datapath {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    pods: Mutex<BpfHashMap<MapData, u64, PodInfo>>,
    /// Only read by `BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which needs no exclusive access.
    orig_dst: BpfHashMap<MapData, FlowKey, OrigDst>,
    listeners: Mutex<SockHash<MapData, Addr>>,
    deliveries: Mutex<BpfHashMap<MapData, FlowKey, u8>>,
    workloads: Mutex<BpfHashMap<MapData, Addr, WorkloadEntry>>,
    plaintext_rules: Mutex<LpmTrie<MapData, PlaintextRuleKey, u32>>,
    counters: PerCpuArray<MapData, u64>,
    /// The maps sized by the settings, for the error a full one gives.
    capacities: [MapCapacity; 4],
}

impl Datapath {
    /// Loads the programs and applies the settings. The maps a previous run pinned are
    /// adopted when every one of them is there with the layout these programs were built for,
    /// so its pods keep their kernel state across the restart. Otherwise (no maps, some
    /// missing, a layout an upgrade changed) the programs get new maps, pinned in place of
    /// the old ones; the old maps live on, read only by the old programs, until every old
    /// link has been moved on to the new programs (`capture_pod`) or removed. The settings
    /// size some maps (`Settings::map_capacities`); a pinned map of another size is replaced
    /// the same way, so a changed setting takes effect at the next start.
    pub(crate) fn load(settings: &Settings, node: &Node) -> Result<Datapath, DatapathError> {
        let pin_dir = settings.bpffs.clone();
        pins::ensure_bpffs(pin_dir.parent().unwrap_or(&pin_dir))?;
        for sub in ["maps", "pods"] {
            let dir = pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Fs {
                what: "creating",
                path: dir,
                source,
            })?;
        }
        let maps_dir = pin_dir.join("maps");
        let programs = if settings.ebpf_log {
            PROGRAMS_LOGGING
        } else {
            PROGRAMS
        };
        let object = aya_obj::Object::parse(programs).map_err(DatapathError::Parse)?;
        let capacities = settings.map_capacities();
        match pins::check_pinned_maps(&maps_dir, &object, &capacities) {
            pins::PinnedMaps::Absent => {
                tracing::info!(dir = %maps_dir.display(), "no maps pinned by a previous run; creating them")
            }
            pins::PinnedMaps::Fitting => {
                tracing::info!(dir = %maps_dir.display(), "adopting the maps pinned by the previous run")
            }
            pins::PinnedMaps::Unfit(problems) => {
                tracing::error!(dir = %maps_dir.display(), problems = %problems.join("; "),
                    "the maps pinned by the previous run do not fit these programs and settings; starting with new maps (the pods of the previous run move on to them, or are released)");
                pins::remove_pins(&maps_dir)?;
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
        for capacity in &capacities {
            loader.map_max_entries(capacity.map, capacity.entries);
        }
        if !settings.ebpf_log {
            logging::shrink_unused_buffer(&mut loader);
        }
        static WITH: u8 = 1;
        static WITHOUT: u8 = 0;
        let ingress_ifindex = if node.has_ingress_ifindex() {
            &WITH
        } else {
            &WITHOUT
        };
        loader.override_global(globals::HAS_INGRESS_IFINDEX, ingress_ifindex, true);
        let mut ebpf = loader.load(programs)?;
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::BIND4,
            programs::BIND6,
        ] {
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
            logging::forward(&mut ebpf)?;
        }
        maps::write_settings(&mut ebpf, settings)?;
        let deliveries = maps::cleared(&mut ebpf, names::DELIVERIES)?;
        let orig_dst = maps::cleared(&mut ebpf, names::ORIG_DST)?;
        maps::cleared::<u64, OrigDst>(&mut ebpf, names::PENDING_ORIG_DST)?;

        Ok(Datapath {
            pods: Mutex::new(take_map(&mut ebpf, names::PODS)?),
            orig_dst,
            listeners: Mutex::new(take_map(&mut ebpf, names::INBOUND_LISTENERS)?),
            deliveries: Mutex::new(deliveries),
            workloads: Mutex::new(take_map(&mut ebpf, names::WORKLOADS)?),
            plaintext_rules: Mutex::new(take_map(&mut ebpf, names::PLAINTEXT_RULES)?),
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            ebpf: Mutex::new(ebpf),
            pin_dir,
            capacities,
        })
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
