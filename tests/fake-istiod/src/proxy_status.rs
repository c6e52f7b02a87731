//! istiod's view of each proxy, as `istioctl proxy-status` shows it: the version of the mesh
//! file each node's proxy has ACKed for every type it subscribed to. Written as JSON
//! (`{"node1": "<version>", ...}`) after each change, so the lab's tests can wait until a
//! change has reached the daemons through xDS.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct ProxyStatus {
    path: PathBuf,
    /// By node: the stream that reported it, and the version it is synced to.
    synced: Arc<Mutex<BTreeMap<String, (u64, String)>>>,
}

impl ProxyStatus {
    pub fn new(path: PathBuf) -> ProxyStatus {
        let status = ProxyStatus {
            path,
            synced: Arc::default(),
        };
        status.write(&BTreeMap::new());
        status
    }

    /// `node`'s proxy, on stream `stream`, is synced to `version`; or, with None, is no
    /// longer (its stream ended: a later stream of the node is left alone).
    pub fn set(&self, node: &str, stream: u64, version: Option<&str>) {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        match version {
            Some(version) => {
                synced.insert(node.to_owned(), (stream, version.to_owned()));
            }
            None => {
                if synced.get(node).is_some_and(|(id, _)| *id == stream) {
                    synced.remove(node);
                }
            }
        }
        self.write(&synced);
    }

    fn write(&self, synced: &BTreeMap<String, (u64, String)>) {
        let versions: BTreeMap<&str, &str> = synced
            .iter()
            .map(|(node, (_, version))| (node.as_str(), version.as_str()))
            .collect();
        let text = serde_json::to_string(&versions).expect("strings serialize");
        // Renamed into place: a reader never sees half a file.
        let partial = self.path.with_extension("partial");
        let written =
            std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, &self.path));
        if let Err(err) = written {
            tracing::warn!(path = %self.path.display(), "cannot write the proxy status: {err}");
        }
    }
}
