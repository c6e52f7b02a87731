//! Each enrolled pod's bpf_links (connect4/6, sock_ops and bind4/6 on its cgroup, sk_lookup on
//! its netns): attached and pinned under `pods/<uid>/`, found again by a restarted daemon and
//! moved on to its programs, or unpinned (which detaches them).

use super::{Datapath, DatapathError, lock, program, syscalls};
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
    /// Captures the pod: every hook's link pinned under `pods/<uid>/`. A hook pinned already
    /// (by a previous run, or before an enrollment that failed) keeps its link, moved on to
    /// this daemon's program with one atomic `BPF_LINK_UPDATE`, so the pod never goes
    /// uncaptured; a pinned link whose cgroup or netns is gone (the pod's sandbox was
    /// replaced) and a hook not pinned (a new pod, or one a previous version captured with
    /// fewer hooks) get a new link, cgroup hooks on `cgroup` and `sk_lookup` on `netns`, in
    /// attach order. On failure the links made here are removed again; the ones found pinned
    /// stay, and keep the pod captured (its connections refused while nobody serves it).
    pub(crate) fn capture_pod(
        &self,
        uid: &str,
        cgroup: &impl AsFd,
        netns: &impl AsFd,
    ) -> Result<PodLinks, DatapathError> {
        let dir = self.pod_dir(uid);
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Fs {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let mut made = PodLinks {
            dir: dir.clone(),
            paths: Vec::new(),
        };
        let mut ebpf = lock(&self.ebpf);
        for hook in Hook::ALL {
            let path = dir.join(hook.pin_name());
            match capture_hook(&mut ebpf, hook, &path, cgroup, netns) {
                Ok(Captured::Adopted) => {}
                Ok(Captured::Attached) => made.paths.push(path),
                Err(err) => {
                    detach_made(&made);
                    return Err(err);
                }
            }
        }
        Ok(self.pod_links(uid))
    }

    /// Moves the pinned links of pod `uid` on to this daemon's programs, where nothing else
    /// is known of the pod: `LinkTargetGone` says the pod's cgroup or netns is gone.
    pub(crate) fn relink_pod(&self, uid: &str) -> Result<(), DatapathError> {
        let ebpf = lock(&self.ebpf);
        let dir = self.pod_dir(uid);
        Hook::ALL
            .into_iter()
            .map(|hook| (hook, dir.join(hook.pin_name())))
            .filter(|(_, path)| path.exists())
            .try_for_each(|(hook, path)| replace_program(&ebpf, hook, &path))
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.pin_dir.join("pods").join(uid)
    }

    /// The links pinned for pod `uid` (the ones present, in attach order).
    pub(crate) fn pod_links(&self, uid: &str) -> PodLinks {
        let dir = self.pod_dir(uid);
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
    detach_made(links);
    if let Err(err) = std::fs::remove_dir(&links.dir)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %links.dir.display(), %err, "cannot remove pod pin directory");
    }
}

/// Unpins `links`, which detaches them; the directory stays for any other pin in it.
fn detach_made(links: &PodLinks) {
    links.paths.iter().rev().for_each(|path| unpin(path));
}

/// How `capture_hook` captured a hook.
enum Captured {
    /// The pinned link, moved on to this daemon's program.
    Adopted,
    /// A new link, pinned.
    Attached,
}

/// Adopts the link of `hook` pinned at `path`, or attaches and pins a new one where there is
/// none or its target is gone.
fn capture_hook(
    ebpf: &mut Ebpf,
    hook: Hook,
    path: &Path,
    cgroup: &impl AsFd,
    netns: &impl AsFd,
) -> Result<Captured, DatapathError> {
    if path.exists() {
        match replace_program(ebpf, hook, path) {
            Ok(()) => return Ok(Captured::Adopted),
            Err(DatapathError::LinkTargetGone { .. }) => {
                tracing::info!(path = %path.display(), "replacing a link whose cgroup or netns is gone");
                unpin(path);
            }
            Err(err) => return Err(err),
        }
    }
    let link = hook.attach(ebpf, cgroup, netns)?;
    link.pin(path).map_err(|source| DatapathError::Pin {
        path: path.to_owned(),
        source,
    })?;
    Ok(Captured::Attached)
}

/// Unpins one link, which detaches it unless something else holds it.
fn unpin(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(pinned) => match pinned.unpin() {
            Ok(link) => drop(link),
            Err(err) => tracing::error!(path = %path.display(), %err, "cannot unpin link"),
        },
        Err(err) => tracing::warn!(path = %path.display(), %err, "link already gone"),
    }
}

/// Points the link of `hook` pinned at `path` at this daemon's program for that hook.
fn replace_program(ebpf: &Ebpf, hook: Hook, path: &Path) -> Result<(), DatapathError> {
    let name = hook.program();
    let program = ebpf
        .program(name)
        .ok_or(DatapathError::Missing(name))?
        .fd()
        .map_err(|source| DatapathError::Program { name, source })?;
    syscalls::replace_program(path, program.as_fd()).map_err(|source| {
        let path = path.to_owned();
        if source.raw_os_error() == Some(libc::ENOLINK) {
            DatapathError::LinkTargetGone { path }
        } else {
            DatapathError::LinkUpdate { path, source }
        }
    })
}

/// One of the attachments that capture a pod.
#[derive(Clone, Copy, Debug)]
enum Hook {
    SkLookup,
    SockOps,
    Bind6,
    Bind4,
    Connect6,
    Connect4,
}

impl Hook {
    /// Attach order: steering, re-keying and the bind guard are in place before `connect()`
    /// is rewritten. Detaching goes in reverse.
    const ALL: [Hook; 6] = [
        Hook::SkLookup,
        Hook::SockOps,
        Hook::Bind6,
        Hook::Bind4,
        Hook::Connect6,
        Hook::Connect4,
    ];

    /// The pin's file name.
    fn pin_name(self) -> &'static str {
        match self {
            Hook::SkLookup => "sk_lookup",
            Hook::SockOps => "sock_ops",
            Hook::Bind6 => "bind6",
            Hook::Bind4 => "bind4",
            Hook::Connect6 => "connect6",
            Hook::Connect4 => "connect4",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::SkLookup => programs::SK_LOOKUP,
            Hook::SockOps => programs::SOCK_OPS,
            Hook::Bind6 => programs::BIND6,
            Hook::Bind4 => programs::BIND4,
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
            Hook::Connect4 | Hook::Connect6 | Hook::Bind4 | Hook::Bind6 => {
                attach_to_cgroup!(CgroupSockAddr)
            }
            Hook::SockOps => attach_to_cgroup!(SockOps),
            Hook::SkLookup => {
                let prog = program::<SkLookup>(ebpf, name)?;
                let id = prog.attach(netns.as_fd()).map_err(program_error)?;
                Ok(prog.take_link(id).map_err(program_error)?.into())
            }
        }
    }
}
