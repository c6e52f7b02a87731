//! Access logs: one line per proxied connection when it ends, as text or JSON. Lines are
//! formatted where the connection ends and handed to a writer thread through a bounded queue:
//! the proxy never waits for the log's output, and the writer writes them in batches. When
//! the queue is full the line is dropped and counted (`ztunnel_access_log_dropped_total`), so
//! a slow disk cannot stall traffic.

use crate::settings::{AccessLogFormat, AccessLogOutput};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// How long lines gather before they are written together (how late a line may appear).
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// One finished connection, as the log line shows it.
#[derive(Debug, Serialize)]
pub(crate) struct Entry<'a> {
    /// RFC 3339, UTC, when the connection ended.
    pub time: String,
    pub direction: &'a str,
    /// The pod (namespace/name) the proxy served the connection for.
    pub pod: &'a str,
    pub src_addr: String,
    pub dst_addr: String,
    pub src_workload: &'a str,
    pub src_namespace: &'a str,
    pub src_identity: &'a str,
    pub dst_workload: &'a str,
    pub dst_namespace: &'a str,
    pub dst_identity: &'a str,
    pub dst_service: &'a str,
    /// Bytes from the source to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source.
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub response_flags: &'a str,
    pub error: Option<&'a str>,
}

impl Entry<'_> {
    fn line(&self, format: AccessLogFormat) -> String {
        match format {
            AccessLogFormat::Json => serde_json::to_string(self).expect("entries serialize"),
            AccessLogFormat::Text | AccessLogFormat::Off => {
                let mut line = format!(
                    "{} connection complete direction={} pod={} src.addr={} dst.addr={} src.workload={} src.namespace={} src.identity={} dst.workload={} dst.namespace={} dst.identity={} dst.service={} bytes_sent={} bytes_received={} duration_ms={} response_flags={}",
                    self.time,
                    self.direction,
                    self.pod,
                    self.src_addr,
                    self.dst_addr,
                    self.src_workload,
                    self.src_namespace,
                    self.src_identity,
                    self.dst_workload,
                    self.dst_namespace,
                    self.dst_identity,
                    self.dst_service,
                    self.bytes_sent,
                    self.bytes_received,
                    self.duration_ms,
                    self.response_flags,
                );
                if let Some(error) = self.error {
                    line.push_str(&format!(" error={error:?}"));
                }
                line
            }
        }
    }
}

pub(crate) struct AccessLog {
    format: AccessLogFormat,
    queue: Option<SyncSender<String>>,
    dropped: Counter,
}

impl AccessLog {
    /// A log that writes nothing.
    pub(crate) fn off() -> AccessLog {
        AccessLog {
            format: AccessLogFormat::Off,
            queue: None,
            dropped: Counter::default(),
        }
    }

    /// Starts the writer thread; `dropped` counts the lines the queue had no room for.
    pub(crate) fn start(
        format: AccessLogFormat,
        output: AccessLogOutput,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        if format == AccessLogFormat::Off {
            return Ok(AccessLog::off());
        }
        let writer: Box<dyn Write + Send> = match &output {
            AccessLogOutput::Stdout => Box::new(std::io::stdout()),
            AccessLogOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("opening the access log {}: {e}", path.display()),
                        )
                    })?,
            ),
        };
        let (queue, lines) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, writer))?;
        Ok(AccessLog {
            format,
            queue: Some(queue),
            dropped,
        })
    }

    pub(crate) fn write(&self, entry: &Entry) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(entry.line(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
            }
            // The writer ended (its output failed and it said so): nothing more to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The writer thread. It waits for a line only when there is none; then it lets lines gather
/// for `GATHER` and writes them all at once: a busy proxy's lines cost a few writes a
/// second, and the proxy's threads never wake this one for each line (a send wakes only a
/// receiver that is waiting, and this one is asleep or busy).
fn write_lines(lines: Receiver<String>, writer: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, writer);
    while let Ok(first) = lines.recv() {
        std::thread::sleep(GATHER);
        let mut result = writeln!(out, "{first}");
        for line in lines.try_iter() {
            if result.is_err() {
                break;
            }
            result = writeln!(out, "{line}");
        }
        if let Err(err) = result.and_then(|()| out.flush()) {
            tracing::error!(%err, "the access log cannot be written; no more access log lines");
            return;
        }
    }
}

/// Now, as RFC 3339 in UTC with milliseconds.
pub(crate) fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(error: Option<&str>) -> Entry<'_> {
        Entry {
            time: now_rfc3339(),
            direction: "outbound",
            pod: "demo/a1",
            src_addr: "10.244.1.2:40000".into(),
            dst_addr: "10.244.2.2:8080".into(),
            src_workload: "a1",
            src_namespace: "demo",
            src_identity: "spiffe://cluster.local/ns/demo/sa/sa-a",
            dst_workload: "b1",
            dst_namespace: "demo",
            dst_identity: "spiffe://cluster.local/ns/demo/sa/sa-b",
            dst_service: "unknown",
            bytes_sent: 1000,
            bytes_received: 20,
            duration_ms: 5,
            response_flags: "-",
            error,
        }
    }

    fn written(format: AccessLogFormat, entries: &[Entry]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(
            format,
            AccessLogOutput::File(path.clone()),
            Counter::default(),
        )
        .unwrap();
        for entry in entries {
            log.write(entry);
        }
        drop(log); // the writer drains the queue and ends
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == entries.len() || std::time::Instant::now() > deadline {
                return text.lines().map(str::to_owned).collect();
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let lines = written(
            AccessLogFormat::Json,
            &[entry(None), entry(Some("reset by peer"))],
        );
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let expected = serde_json::json!({
            "direction": "outbound",
            "pod": "demo/a1",
            "src_addr": "10.244.1.2:40000",
            "dst_addr": "10.244.2.2:8080",
            "src_workload": "a1",
            "src_namespace": "demo",
            "src_identity": "spiffe://cluster.local/ns/demo/sa/sa-a",
            "dst_workload": "b1",
            "dst_namespace": "demo",
            "dst_identity": "spiffe://cluster.local/ns/demo/sa/sa-b",
            "dst_service": "unknown",
            "bytes_sent": 1000,
            "bytes_received": 20,
            "duration_ms": 5,
            "response_flags": "-",
            "error": null,
        });
        // Every field, each with its value; the time is checked as RFC 3339.
        let mut fields = first.as_object().unwrap().clone();
        let time = fields.remove("time").expect("a time field");
        assert!(
            is_rfc3339_utc(time.as_str().unwrap()),
            "time {time} is not RFC 3339 UTC"
        );
        assert_eq!(serde_json::Value::Object(fields), expected);
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["error"], "reset by peer");
    }

    /// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
    fn is_rfc3339_utc(time: &str) -> bool {
        let Some(rest) = time.strip_suffix('Z') else {
            return false;
        };
        let (whole, fraction) = rest.split_once('.').unwrap_or((rest, "0"));
        let digits_at = |text: &str, at: &[usize]| {
            at.iter()
                .all(|&i| text.as_bytes().get(i).is_some_and(u8::is_ascii_digit))
        };
        whole.len() == 19
            && whole.as_bytes()[4] == b'-'
            && whole.as_bytes()[10] == b'T'
            && whole.as_bytes()[13] == b':'
            && digits_at(whole, &[0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18])
            && fraction.bytes().all(|b| b.is_ascii_digit())
    }

    #[test]
    fn text_lines_are_key_value_with_quoted_errors() {
        let lines = written(AccessLogFormat::Text, &[entry(Some("reset \"by\" peer"))]);
        let line = &lines[0];
        assert!(
            line.contains(" connection complete direction=outbound pod=demo/a1 "),
            "{line}"
        );
        assert!(
            line.contains(" bytes_sent=1000 bytes_received=20 "),
            "{line}"
        );
        assert!(line.ends_with(r#"error="reset \"by\" peer""#), "{line}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A writer that never drains: a queue no one reads from.
        let (queue, _lines) = sync_channel(1);
        let dropped = Counter::default();
        let log = AccessLog {
            format: AccessLogFormat::Json,
            queue: Some(queue),
            dropped: dropped.clone(),
        };
        for _ in 0..3 {
            log.write(&entry(None));
        }
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn an_unwritable_file_is_a_clear_error() {
        let err = AccessLog::start(
            AccessLogFormat::Json,
            AccessLogOutput::File("/nonexistent/dir/access.log".into()),
            Counter::default(),
        )
        .err()
        .expect("refused");
        assert!(
            err.to_string().contains("/nonexistent/dir/access.log"),
            "{err}"
        );
    }
}
