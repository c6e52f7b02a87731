//! Finding the network namespaces of pods that are already running, from the host: a process
//! whose cgroup lies below a pod's (the kubelet names pod cgroups by the pod's uid), and its
//! `/proc/<pid>/ns/net`, or rather the runtime's named mount of that netns when there is one
//! (a path that outlives any one process, so a restarted daemon finds it again). This is how
//! pods enroll without a CNI ADD: those running before the daemon, or before their namespace
//! was labelled.

use crate::pods::pod_uid_of_cgroup_name;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where pods' sandboxes are, by pod uid.
pub(crate) struct Sandboxes {
    by_uid: HashMap<String, Sandbox>,
    netns_dir: PathBuf,
}

/// One pod's sandbox as the host shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sandbox {
    pub(crate) pid: u32,
    /// The container the process runs in, when its cgroup names one (the runtime's id, as the
    /// CNI's `CNI_CONTAINERID` gives the sandbox's); empty otherwise.
    pub(crate) container_id: String,
}

impl Sandboxes {
    /// Every process under `proc_root` (`/proc`) whose cgroup is a pod's, the first (lowest
    /// pid, the sandbox's own process as a rule) for each pod.
    pub(crate) fn scan(proc_root: &Path, netns_dir: &Path) -> std::io::Result<Sandboxes> {
        let mut by_uid = HashMap::new();
        let mut pids: Vec<u32> = std::fs::read_dir(proc_root)?
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            // A process may exit while we look: what cannot be read is not a pod's.
            let Ok(text) = std::fs::read_to_string(proc_root.join(format!("{pid}/cgroup"))) else {
                continue;
            };
            let Some((uid, container_id)) = pod_of_cgroup(&text) else {
                continue;
            };
            by_uid.entry(uid).or_insert(Sandbox { pid, container_id });
        }
        Ok(Sandboxes {
            by_uid,
            netns_dir: netns_dir.to_owned(),
        })
    }

    pub(crate) fn get(&self, uid: &str) -> Option<&Sandbox> {
        self.by_uid.get(uid)
    }

    /// The path to open the sandbox's netns by: the named mount in the runtime's directory
    /// that is the same namespace, else the process's own link.
    pub(crate) fn netns_path(&self, proc_root: &Path, sandbox: &Sandbox) -> PathBuf {
        let own = proc_root.join(format!("{}/ns/net", sandbox.pid));
        let Ok(wanted) = std::fs::metadata(&own) else {
            return own;
        };
        let same = |path: &Path| {
            std::fs::metadata(path)
                .is_ok_and(|m| m.dev() == wanted.dev() && m.ino() == wanted.ino())
        };
        let named = std::fs::read_dir(&self.netns_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .find(|path| same(path));
        named.unwrap_or(own)
    }
}

/// The pod uid and container id a `/proc/<pid>/cgroup` text (cgroup v2: `0::<path>`) names.
fn pod_of_cgroup(text: &str) -> Option<(String, String)> {
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    let mut components = path.split('/').filter(|c| !c.is_empty());
    let uid = components.by_ref().find_map(pod_uid_of_component)?;
    let container_id = components
        .next_back()
        .and_then(container_id_of)
        .unwrap_or_default();
    Some((uid, container_id))
}

/// The pod uid of a path component that is a kubelet pod cgroup (a uid as the API server makes
/// them, so that no other cgroup named `pod...` passes).
fn pod_uid_of_component(name: &str) -> Option<String> {
    pod_uid_of_cgroup_name(name).filter(|uid| is_uid(uid))
}

/// A uid as the API server makes them (8-4-4-4-12 hex digits).
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container id in a container cgroup's name: `<runtime>-<id>.scope` (systemd driver) or
/// the bare id (cgroupfs driver).
fn container_id_of(name: &str) -> Option<String> {
    let id = name.strip_suffix(".scope").unwrap_or(name);
    let id = id.rsplit_once('-').map_or(id, |(_, id)| id);
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8f4b1c2e-0d1a-4b5c-9e6f-7a8b9c0d1e2f";
    const ID: &str = "4e1f0c9a8b7d6e5f4e1f0c9a8b7d6e5f4e1f0c9a8b7d6e5f4e1f0c9a8b7d6e5f";

    #[test]
    fn kubelet_cgroup_layouts_name_the_pod_and_container() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(
            pod_of_cgroup(&systemd),
            Some((UID.to_owned(), ID.to_owned()))
        );
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/{ID}\n");
        assert_eq!(
            pod_of_cgroup(&cgroupfs),
            Some((UID.to_owned(), ID.to_owned()))
        );
        // Seen from a container's own cgroup namespace, above it is `..`.
        let from_a_container = format!(
            "0::/../../kubepods-pod{}.slice/crio-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(
            pod_of_cgroup(&from_a_container),
            Some((UID.to_owned(), ID.to_owned()))
        );
        // A process in the pod's cgroup itself (the lab's sandboxes).
        let bare = format!("0::/ztunnel-lab/node1/kubepods/pod{UID}\n");
        assert_eq!(pod_of_cgroup(&bare), Some((UID.to_owned(), String::new())));
    }

    #[test]
    fn other_cgroups_are_no_pods() {
        for text in [
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/kubepods.slice/kubepods-podnotauid.slice\n",
            "12:memory:/kubepods/pod8f4b1c2e-0d1a-4b5c-9e6f-7a8b9c0d1e2f\n",
            "",
        ] {
            assert_eq!(pod_of_cgroup(text), None, "{text}");
        }
    }

    #[test]
    fn a_process_in_a_pod_cgroup_is_found_with_its_named_netns() {
        let proc_root = tempfile::tempdir().unwrap();
        let netns_dir = tempfile::tempdir().unwrap();
        let write = |pid: u32, cgroup: &str| {
            let dir = proc_root.path().join(format!("{pid}/ns"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(proc_root.path().join(format!("{pid}/cgroup")), cgroup).unwrap();
            std::fs::write(dir.join("net"), pid.to_string()).unwrap();
        };
        write(7, "0::/system.slice/sshd.service\n");
        write(42, &format!("0::/kubepods/pod{UID}/{ID}\n"));
        write(43, &format!("0::/kubepods/pod{UID}/{ID}\n"));
        std::fs::create_dir(proc_root.path().join("self")).unwrap();
        std::fs::hard_link(
            proc_root.path().join("42/ns/net"),
            netns_dir.path().join("cni-1234"),
        )
        .unwrap();
        let sandboxes = Sandboxes::scan(proc_root.path(), netns_dir.path()).unwrap();
        let sandbox = sandboxes.get(UID).expect("the pod's sandbox");
        assert_eq!(sandbox.pid, 42);
        assert_eq!(sandbox.container_id, ID);
        assert_eq!(
            sandboxes.netns_path(proc_root.path(), sandbox),
            netns_dir.path().join("cni-1234")
        );
        let unnamed = Sandbox {
            pid: 43,
            container_id: String::new(),
        };
        assert_eq!(
            sandboxes.netns_path(proc_root.path(), &unnamed),
            proc_root.path().join("43/ns/net")
        );
        assert!(
            sandboxes
                .get("00000000-0000-4000-8000-000000000000")
                .is_none()
        );
    }
}
