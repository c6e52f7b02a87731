//! Each enrolled pod's four bpf_links: attached and pinned under `pods/<uid>/`, found again
//! by a restarted daemon and moved on to its programs, or unpinned (which detaches them).

use super::{Datapath, DatapathError, bpf_link, lock, program};
use aya::Ebpf;
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use ztunnel_common::maps::programs;

/// The pinned links of one enrolled pod; dropping them does not detach (the pins hold them).
#[derive(Debug)]
pub(crate) struct PodLinks {
    pub(crate) dir: PathBuf,
    pub(crate) paths: Vec<PathBuf>,
}

impl Datapath {
    /// Creates the pod's four bpf_links and pins them under `pods/<uid>/`. On failure, the
    /// links made so far are removed again.
    pub(crate) fn attach_pod(
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
    pub(crate) fn adopt_pod(&self, uid: &str) -> Result<PodLinks, DatapathError> {
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
    pub(crate) fn pod_links(&self, uid: &str) -> PodLinks {
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
    pub(crate) fn pinned_pods(&self) -> Vec<String> {
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
}

/// Unpins a pod's links, which detaches them, and removes its directory. Errors are logged:
/// a half-detached pod must still be torn down as far as possible.
pub(crate) fn detach_pod(links: &PodLinks) {
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
