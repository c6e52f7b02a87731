//! What the daemon remembers of each enrolled pod, so that a restarted daemon can serve the
//! pods its previous run captured: one JSON record per pod in the state directory
//! (`--state-dir`), written atomically before the pod's links are pinned and removed after
//! they are gone, so pinned links never outlive their record.
//!
//! ```text
//! <state-dir>/pods/<uid, escaped>.json   {"version": 1, "pod": {spec, cgroup, netns_cookie}}
//! ```
//!
//! The default lives on tmpfs (`/var/run`), like bpffs: both are gone after a reboot, and so
//! is everything the records describe.

use crate::api::PodSpec;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever a record's meaning changes; a daemon refuses records of other versions.
const FORMAT_VERSION: u32 = 1;
const RECORD_SUFFIX: &str = ".json";
/// A record being written; one left behind is a write a crash interrupted.
const PARTIAL_SUFFIX: &str = ".partial";

#[derive(Debug, thiserror::Error)]
pub(crate) enum PodStateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing pod record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Everything re-opening an enrolled pod needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PodRecord {
    pub spec: PodSpec,
    /// The pod's cgroup-v2 directory (the cgroup hooks' target).
    pub cgroup: PathBuf,
    /// The cookie of the netns at enrollment: a netns path now naming another namespace
    /// has another cookie.
    pub netns_cookie: u64,
}

#[derive(Serialize, Deserialize)]
struct RecordFile {
    version: u32,
    pod: PodRecord,
}

/// The records of one daemon.
#[derive(Debug)]
pub(crate) struct PodStates {
    dir: PathBuf,
}

impl PodStates {
    /// Opens (creating, mode 0700) `<state_dir>/pods`. Records are written mode 0600.
    pub(crate) fn open(state_dir: &Path) -> Result<PodStates, PodStateError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("pods");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| PodStateError::Io {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        Ok(PodStates { dir })
    }

    /// Writes the record of `record.spec.uid`, replacing any earlier one in one step: a reader
    /// (or a restart) sees the old record or the new one, never part of one.
    pub(crate) fn save(&self, record: &PodRecord) -> Result<(), PodStateError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path_of(&record.spec.uid);
        let partial = path.with_extension(&PARTIAL_SUFFIX[1..]);
        let io = |what| {
            let path = partial.clone();
            move |source| PodStateError::Io { what, path, source }
        };
        let text = serde_json::to_vec_pretty(&RecordFile {
            version: FORMAT_VERSION,
            pod: record.clone(),
        })
        .expect("records always serialize");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io("creating"))?;
        file.write_all(&text).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&partial, &path).map_err(|source| PodStateError::Io {
            what: "renaming into place",
            path,
            source,
        })
    }

    /// Removes the record of `uid`; one already gone is fine.
    pub(crate) fn remove(&self, uid: &str) -> Result<(), PodStateError> {
        remove_file(&self.path_of(uid))
    }

    /// Every record, each read on its own: one unreadable record does not hide the others.
    /// Interrupted writes are removed on the way (their pod's links were never created).
    pub(crate) fn load_all(&self) -> Result<Vec<Result<PodRecord, PodStateError>>, PodStateError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| PodStateError::Io {
            what: "reading",
            path: self.dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| PodStateError::Io {
                    what: "reading",
                    path: self.dir.clone(),
                    source,
                })?
                .path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(PARTIAL_SUFFIX) {
                tracing::warn!(path = %path.display(), "removing a pod record whose write was interrupted");
                remove_file(&path)?;
                continue;
            }
            records.push(read_record(&path));
        }
        Ok(records)
    }

    /// Removes a record `load_all` refused, once its error has been reported.
    pub(crate) fn discard(&self, refused: &PodStateError) -> Result<(), PodStateError> {
        match refused {
            PodStateError::Corrupt { path, .. } if path.parent() == Some(&self.dir) => {
                remove_file(path)
            }
            _ => Ok(()),
        }
    }

    fn path_of(&self, uid: &str) -> PathBuf {
        self.dir.join(file_name_of(uid))
    }
}

fn remove_file(path: &Path) -> Result<(), PodStateError> {
    match std::fs::remove_file(path) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(PodStateError::Io {
            what: "removing",
            path: path.to_owned(),
            source,
        }),
        _ => Ok(()),
    }
}

fn read_record(path: &Path) -> Result<PodRecord, PodStateError> {
    let corrupt = |reason: String| PodStateError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| corrupt(format!("cannot read it: {e}")))?;
    let file: RecordFile =
        serde_json::from_slice(&text).map_err(|e| corrupt(format!("not a pod record: {e}")))?;
    if file.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {}, this daemon reads version {FORMAT_VERSION}",
            file.version
        )));
    }
    let record = file.pod;
    if record.spec.uid.is_empty() || record.spec.ips.is_empty() {
        return Err(corrupt("the pod has no uid or no address".to_owned()));
    }
    let expected = file_name_of(&record.spec.uid);
    if path.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        return Err(corrupt(format!(
            "it names pod uid {:?}, whose record is {expected}",
            record.spec.uid
        )));
    }
    Ok(record)
}

/// A uid as a file name: letters, digits, `-`, `_` and `.` stay, every other byte becomes
/// `%XX` (uids may contain `/`).
fn file_name_of(uid: &str) -> String {
    let mut name = String::with_capacity(uid.len() + RECORD_SUFFIX.len());
    for byte in uid.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.') {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    name.push_str(RECORD_SUFFIX);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> PodRecord {
        PodRecord {
            spec: PodSpec {
                name: "a1".into(),
                namespace: "demo".into(),
                uid: uid.into(),
                container_id: "c0ffee".into(),
                netns: "/run/netns/a1".into(),
                ips: vec!["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            },
            cgroup: "/sys/fs/cgroup/kubepods/poda1".into(),
            netns_cookie: 4097,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("pods"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn records_round_trip_and_leave_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let states = PodStates::open(dir.path()).unwrap();
        let first = record("00000000-0000-4000-8000-0000000000a1");
        let mut second = record("team/a2");
        states.save(&first).unwrap();
        states.save(&second).unwrap();
        second.netns_cookie = 4098;
        states.save(&second).unwrap();
        assert_eq!(
            files(dir.path()),
            [
                "00000000-0000-4000-8000-0000000000a1.json",
                "team%2Fa2.json"
            ]
        );

        let mut loaded: Vec<PodRecord> = states
            .load_all()
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        loaded.sort_by(|a, b| a.spec.uid.cmp(&b.spec.uid));
        assert_eq!(loaded, vec![first.clone(), second]);

        states.remove(&first.spec.uid).unwrap();
        states.remove(&first.spec.uid).unwrap();
        assert_eq!(files(dir.path()), ["team%2Fa2.json"]);
    }

    #[test]
    fn corrupt_records_are_refused_one_by_one_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let states = PodStates::open(dir.path()).unwrap();
        let good = record("good");
        states.save(&good).unwrap();
        let pods = dir.path().join("pods");
        std::fs::write(pods.join("truncated.json"), b"{\"version\": 1, \"pod\": {").unwrap();
        let mut future = serde_json::to_value(RecordFile {
            version: FORMAT_VERSION,
            pod: record("future"),
        })
        .unwrap();
        future["version"] = 2.into();
        std::fs::write(pods.join("future.json"), future.to_string()).unwrap();
        std::fs::copy(pods.join("good.json"), pods.join("renamed.json")).unwrap();
        std::fs::write(pods.join("interrupted.partial"), b"{").unwrap();

        let mut refused = Vec::new();
        let mut loaded = Vec::new();
        for result in states.load_all().unwrap() {
            match result {
                Ok(record) => loaded.push(record),
                Err(error) => refused.push(error),
            }
        }
        assert_eq!(loaded, vec![good]);
        let mut reasons: Vec<String> = refused.iter().map(ToString::to_string).collect();
        reasons.sort();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons[0].contains("future.json") && reasons[0].contains("format version 2"),
            "{}",
            reasons[0]
        );
        assert!(
            reasons[1].contains("renamed.json") && reasons[1].contains("good.json"),
            "{}",
            reasons[1]
        );
        assert!(
            reasons[2].contains("truncated.json") && reasons[2].contains("not a pod record"),
            "{}",
            reasons[2]
        );

        for error in &refused {
            states.discard(error).unwrap();
        }
        assert_eq!(files(dir.path()), ["good.json"]);
    }

    #[test]
    fn uids_become_file_names_that_cannot_escape_the_directory() {
        assert_eq!(file_name_of("a-b_c.d"), "a-b_c.d.json");
        assert_eq!(file_name_of("../x"), "..%2Fx.json");
        assert_eq!(file_name_of("ü"), "%C3%BC.json");
    }
}
