//! The daemon's record of the connections it proxied: the open ones and the most recent
//! closed ones, for `ztunnel connections` and the tests.

use crate::api::{ConnectionRecord, Direction};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// How many connections are remembered (open ones first in line to stay, see `record`).
const CAPACITY: usize = 4096;

#[derive(Default)]
pub struct ConnectionLog {
    entries: Mutex<VecDeque<Arc<Mutex<ConnectionRecord>>>>,
}

/// A live connection's entry; the relay fills in the outcome when it ends.
pub struct Tracked(Arc<Mutex<ConnectionRecord>>);

impl ConnectionLog {
    pub fn record(
        &self,
        direction: Direction,
        pod: &str,
        source: SocketAddr,
        original_destination: SocketAddr,
    ) -> Tracked {
        let entry = Arc::new(Mutex::new(ConnectionRecord {
            direction,
            pod: pod.to_owned(),
            source,
            original_destination,
            bytes_sent: 0,
            bytes_received: 0,
            open: true,
            error: None,
        }));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY {
            entries.pop_front();
        }
        entries.push_back(entry.clone());
        Tracked(entry)
    }

    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }
}

impl Tracked {
    /// Records how a relay ended: `Ok((sent, received))`, where `sent` went from the client to
    /// the destination and `received` the other way, or the error that ended it.
    pub fn finish_with(&self, outcome: &std::io::Result<(u64, u64)>) {
        match outcome {
            Ok((sent, received)) => self.finish(*sent, *received, None),
            Err(err) => self.finish(0, 0, Some(err.to_string())),
        }
    }

    /// `sent` is what went from the client to the destination, `received` the other way.
    pub fn finish(&self, sent: u64, received: u64, error: Option<String>) {
        let mut record = self.0.lock().unwrap_or_else(|p| p.into_inner());
        record.bytes_sent = sent;
        record.bytes_received = received;
        record.open = false;
        record.error = error;
    }
}
