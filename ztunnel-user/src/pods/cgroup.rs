//! Finding a pod's cgroup-v2 directory from its uid, as the kubelet names it.
//!
//! The kubelet creates the pod cgroup before the sandbox's network is set up, named
//! `pod<uid>` with the cgroupfs driver or `kubepods-<qos>-pod<uid_with_underscores>.slice`
//! with the systemd driver, somewhere below the kubepods cgroup (under a QoS level or not).

use std::path::{Path, PathBuf};

/// How deep below the root to look (root / qos / pod is the deepest kubelet layout).
const MAX_DEPTH: usize = 3;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup for pod uid {uid} under {root} (looked for pod{uid} and *pod{underscored}.slice)", underscored = uid.replace('-', "_"))]
    NotFound { uid: String, root: PathBuf },
}

/// Whether a cgroup directory name is the one the kubelet gives pod `uid`.
fn is_pod_cgroup_name(name: &str, uid: &str) -> bool {
    !uid.is_empty() && pod_uid_of_cgroup_name(name).as_deref() == Some(uid)
}

/// The pod uid a kubelet pod cgroup's name holds: `pod<uid>` (cgroupfs driver) or
/// `[<prefix>-]pod<uid with underscores>.slice` (systemd driver).
pub(crate) fn pod_uid_of_cgroup_name(name: &str) -> Option<String> {
    let uid = match name.strip_suffix(".slice") {
        Some(slice) => {
            let start = slice.rfind("-pod").map_or(0, |dash| dash + 1);
            slice[start..].strip_prefix("pod")?.replace('_', "-")
        }
        None => name.strip_prefix("pod")?.to_owned(),
    };
    (!uid.is_empty()).then_some(uid)
}

/// The pod's cgroup directory below `root`, breadth first.
pub(crate) fn find_pod_cgroup(root: &Path, uid: &str) -> Result<PathBuf, CgroupError> {
    let mut level = vec![root.to_owned()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let entries = std::fs::read_dir(&dir).map_err(|source| CgroupError::Read {
                path: dir.clone(),
                source,
            })?;
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if is_pod_cgroup_name(&entry.file_name().to_string_lossy(), uid) {
                    return Ok(entry.path());
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    Err(CgroupError::NotFound {
        uid: uid.to_owned(),
        root: root.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8f4b1c2e-0d1a-4b5c-9e6f-7a8b9c0d1e2f";

    #[test]
    fn kubelet_cgroup_names() {
        assert!(is_pod_cgroup_name(&format!("pod{UID}"), UID));
        assert!(is_pod_cgroup_name(
            "kubepods-besteffort-pod8f4b1c2e_0d1a_4b5c_9e6f_7a8b9c0d1e2f.slice",
            UID
        ));
        assert!(is_pod_cgroup_name(
            "kubepods-pod8f4b1c2e_0d1a_4b5c_9e6f_7a8b9c0d1e2f.slice",
            UID
        ));
        assert!(!is_pod_cgroup_name("pod8f4b1c2e", UID));
        assert!(!is_pod_cgroup_name(
            "xpod8f4b1c2e_0d1a_4b5c_9e6f_7a8b9c0d1e2f.slice",
            UID
        ));
        assert!(!is_pod_cgroup_name("pod", ""));
    }

    #[test]
    fn finds_the_pod_below_a_qos_level() {
        let root = std::env::temp_dir().join(format!("zt-cgroup-test-{}", std::process::id()));
        let pod = root.join("besteffort").join(format!("pod{UID}"));
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::create_dir_all(root.join("burstable").join("podother")).unwrap();
        assert_eq!(find_pod_cgroup(&root, UID).unwrap(), pod);
        assert!(matches!(
            find_pod_cgroup(&root, "missing"),
            Err(CgroupError::NotFound { .. })
        ));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
