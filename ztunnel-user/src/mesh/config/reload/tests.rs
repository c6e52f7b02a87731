//! The watch, on real files and real inotify in a temporary directory.

use super::*;
use crate::host::file_watch::SETTLE_AT_MOST;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;

/// A mesh config of `count` workloads.
fn workloads(count: usize) -> String {
    let mut text = String::from("workloads:\n");
    for i in 0..count {
        text.push_str(&format!(
            "- {{uid: w{i}, name: w{i}, namespace: demo, workloadIps: [10.0.{}.{}]}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    text
}

/// A config file watched in a temporary directory, applied to a model, with the summary of
/// every content applied.
struct Watched {
    dir: tempfile::TempDir,
    file: Arc<ConfigFile>,
    model: Arc<Mutex<Arc<MeshConfig>>>,
    applied: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watched {
    /// Watches `name` in a new directory, once `arrange` put there what it wants.
    fn start(name: &str, arrange: impl FnOnce(&Path)) -> Watched {
        let dir = tempfile::tempdir().unwrap();
        arrange(dir.path());
        let file = Arc::new(ConfigFile::new(dir.path().join(name)));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let model = Arc::new(Mutex::new(Arc::new(MeshConfig::default())));
        let (in_force, updated, recorded) = (model.clone(), model.clone(), applied.clone());
        let current = move || in_force.lock().unwrap().clone();
        let task = tokio::spawn(file.clone().watch(current, move |changes| {
            let mut model = updated.lock().unwrap();
            *model = Arc::new(model.updated(changes.changes(&model)).config);
            recorded.lock().unwrap().push(changes.summary().to_owned());
            Ok::<(), std::convert::Infallible>(())
        }));
        Watched {
            dir,
            file,
            model,
            applied,
            task,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn applied(&self) -> Vec<String> {
        self.applied.lock().unwrap().clone()
    }

    /// Waits until the last content applied has `count` workloads.
    async fn wait_applied(&self, count: usize) {
        let wanted = format!("{count} workloads,");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self
            .applied()
            .last()
            .is_some_and(|summary| summary.starts_with(&wanted))
        {
            assert!(
                Instant::now() < deadline,
                "{count} workloads never applied: {:?}, {:?}",
                self.applied(),
                self.file.status()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Long enough for any event to have been seen and settled.
async fn quiet() {
    tokio::time::sleep(SETTLE_AT_MOST * 2).await;
}

#[tokio::test]
async fn a_write_in_place_is_applied() {
    let watched = Watched::start("mesh.yaml", |dir| {
        std::fs::write(dir.join("mesh.yaml"), workloads(1)).unwrap()
    });
    watched.wait_applied(1).await;
    std::fs::write(watched.path("mesh.yaml"), workloads(2)).unwrap();
    watched.wait_applied(2).await;
    assert_eq!(watched.file.status().generation, 2);
    let model = watched.model.lock().unwrap().clone();
    assert_eq!(model.workload_count(), 2);
    assert!(model.workload_by_uid("w1").is_some());
}

#[tokio::test]
async fn a_file_replaced_by_rename_is_applied() {
    let watched = Watched::start("mesh.yaml", |dir| {
        std::fs::write(dir.join("mesh.yaml"), workloads(1)).unwrap()
    });
    watched.wait_applied(1).await;
    std::fs::write(watched.path(".mesh.yaml.swp"), workloads(3)).unwrap();
    std::fs::rename(watched.path(".mesh.yaml.swp"), watched.path("mesh.yaml")).unwrap();
    watched.wait_applied(3).await;
}

/// The file a symlink leads to, outside the watched directory, written in place.
#[tokio::test]
async fn a_write_to_a_symlinks_target_elsewhere_is_applied() {
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("mesh.yaml");
    std::fs::write(&target, workloads(1)).unwrap();
    let watched = Watched::start("mesh.yaml", |dir| {
        std::os::unix::fs::symlink(&target, dir.join("mesh.yaml")).unwrap()
    });
    watched.wait_applied(1).await;
    std::fs::write(&target, workloads(6)).unwrap();
    watched.wait_applied(6).await;
}

/// A ConfigMap volume as the kubelet writes it: the file is a symlink through `..data`, a
/// symlink to the version's directory; a new version is a new directory, a new `..data`
/// renamed over the old one, then the old directory removed.
#[tokio::test]
async fn a_configmap_swap_of_its_data_link_is_applied() {
    let publish = |dir: &Path, version: &str, count: usize| {
        std::fs::create_dir(dir.join(version)).unwrap();
        std::fs::write(dir.join(version).join("mesh.yaml"), workloads(count)).unwrap();
        std::os::unix::fs::symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    };
    let watched = Watched::start("mesh.yaml", |dir| {
        publish(dir, "..2025_01_01_00_00_00.1", 1);
        std::os::unix::fs::symlink("..data/mesh.yaml", dir.join("mesh.yaml")).unwrap();
    });
    watched.wait_applied(1).await;
    publish(watched.dir.path(), "..2025_01_01_00_01_00.2", 4);
    std::fs::remove_dir_all(watched.path("..2025_01_01_00_00_00.1")).unwrap();
    watched.wait_applied(4).await;
    quiet().await;
    assert_eq!(watched.applied().len(), 2, "{:?}", watched.applied());
}

#[tokio::test]
async fn a_deleted_file_keeps_the_config_in_force_until_it_is_back() {
    let watched = Watched::start("mesh.yaml", |dir| {
        std::fs::write(dir.join("mesh.yaml"), workloads(1)).unwrap()
    });
    watched.wait_applied(1).await;
    let in_force = watched.file.status();
    std::fs::remove_file(watched.path("mesh.yaml")).unwrap();
    quiet().await;
    let status = watched.file.status();
    assert_eq!((&status.version, status.generation), (&in_force.version, 1));
    let rejected = status.rejected.unwrap_or_default();
    assert!(rejected.contains("cannot read"), "{rejected}");
    std::fs::write(watched.path("mesh.yaml"), workloads(5)).unwrap();
    watched.wait_applied(5).await;
    assert_eq!(watched.file.status().rejected, None);
}

#[tokio::test]
async fn a_file_missing_at_start_is_applied_once_it_appears() {
    let watched = Watched::start("mesh.yaml", |_| {});
    quiet().await;
    let status = watched.file.status();
    assert_eq!(status.generation, 0);
    assert!(status.rejected.is_some_and(|r| r.contains("cannot read")));
    std::fs::write(watched.path("mesh.yaml"), workloads(2)).unwrap();
    watched.wait_applied(2).await;
}

#[tokio::test]
async fn a_burst_of_writes_is_applied_once_with_its_last_content() {
    let watched = Watched::start("mesh.yaml", |dir| {
        std::fs::write(dir.join("mesh.yaml"), workloads(1)).unwrap()
    });
    watched.wait_applied(1).await;
    for count in 2..=20 {
        std::fs::write(watched.path("mesh.yaml"), workloads(count)).unwrap();
    }
    watched.wait_applied(20).await;
    quiet().await;
    assert_eq!(watched.applied().len(), 2, "{:?}", watched.applied());
}

/// Nothing is read while the file does not change, even with other files of its directory
/// changing; a write that leaves the content as it was is read, and applies nothing.
#[tokio::test]
async fn an_idle_file_is_not_read() {
    let watched = Watched::start("mesh.yaml", |dir| {
        std::fs::write(dir.join("mesh.yaml"), workloads(1)).unwrap()
    });
    watched.wait_applied(1).await;
    quiet().await;
    let reads = watched.file.status().reads;
    for i in 0..10 {
        std::fs::write(watched.path("other.yaml"), format!("{i}\n")).unwrap();
    }
    quiet().await;
    assert_eq!(watched.file.status().reads, reads);

    std::fs::write(watched.path("mesh.yaml"), workloads(1)).unwrap();
    quiet().await;
    assert!(watched.file.status().reads > reads);
    assert_eq!(watched.applied().len(), 1);
    assert_eq!(watched.file.status().generation, 1);
}

#[tokio::test]
async fn a_config_whose_application_failed_is_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "workloads: []\n").unwrap();
    let file = Arc::new(ConfigFile::new(path));
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let current = || Arc::new(MeshConfig::default());
    let watching = tokio::spawn(file.clone().watch(current, move |_changes| {
        match counted.fetch_add(1, Ordering::Relaxed) {
            0 => Err("ZT_WORKLOADS is full"),
            _ => Ok(()),
        }
    }));
    tokio::time::sleep(RETRY_FIRST * 3).await;
    watching.abort();
    let status = file.status();
    assert_eq!(attempts.load(Ordering::Relaxed), 2);
    assert_eq!((status.generation, status.rejected), (1, None));
}

#[test]
fn a_bad_file_is_refused_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "workloads: [").unwrap();
    let file = ConfigFile::new(path.clone());
    let empty = MeshConfig::default();
    assert!(file.read_if_changed(&empty).is_none());
    assert!(file.status().rejected.is_some());
    assert!(file.read_if_changed(&empty).is_none());
    std::fs::write(&path, "workloads: []\n").unwrap();
    assert!(file.read_if_changed(&empty).is_some());
}
