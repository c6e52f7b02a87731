//! The soak's clients: each a thread in which one pod opens short connections to a server, one
//! after the other (now and then a burst of several at once), each carrying bytes the server
//! hashes and reports back; and, at the end, the verdict on every connection given what was
//! going on when it ran.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ztunnel_lab::{burst_outcome_from, send_from};

/// Bounds on one connection (connect, and every read and write) and on one burst.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Sizes the sequential connections cycle through: under a segment, a few segments, a TLS
/// record and more, an odd length.
const SIZES: [u64; 4] = [700, 4 * 1024 + 3, 16 * 1024, 64 * 1024];
/// The most bytes any connection sends, so the underlay check knows how much of the stream
/// to look for.
pub const MAX_BYTES: u64 = 64 * 1024;
/// Every `BURST_EVERY`th attempt is a burst: `BURST_CONNECTIONS` connections open at once.
const BURST_EVERY: u64 = 10;
const BURST_CONNECTIONS: usize = 8;
const BURST_BYTES: u64 = 16 * 1024;
/// A breath between attempts, so that three loops leave the daemons some of a small machine.
const GAP: Duration = Duration::from_millis(10);
/// Bound on the attempts of one client, whatever the clock does.
const MAX_ATTEMPTS: u64 = 1_000_000;
/// How many failure messages of each kind a verdict keeps for the summary.
const EXAMPLES: usize = 5;

/// One client: who connects to what.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub label: &'static str,
    pub pod: &'static str,
    pub to: SocketAddrV4,
    /// Its connections go through node1's daemon, which the soak restarts.
    pub through_node1: bool,
    /// The flipping policy is about this client.
    pub policed: bool,
}

/// One attempt: a single connection, or a burst of several.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub started: Instant,
    pub finished: Instant,
    pub connections: u64,
    /// Connections whose bytes the server confirmed (length and SHA-256).
    pub ok: u64,
    /// What went wrong (a burst names its first few failures only).
    pub failures: Vec<String>,
}

impl Attempt {
    pub fn failed(&self) -> u64 {
        self.connections - self.ok
    }
}

/// What a client has done so far, for the progress lines.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    failed: AtomicU64,
}

struct Client {
    route: Route,
    live: Live,
    attempts: Mutex<Vec<Attempt>>,
    /// Held for the length of every attempt: whoever takes it knows none is in flight.
    busy: Mutex<()>,
}

/// What the clients and the soak share.
struct Shared {
    stop: AtomicBool,
    paused: AtomicBool,
    deadline: Instant,
}

/// The client threads; stopped (and joined) when dropped.
pub struct Churn {
    shared: Arc<Shared>,
    clients: Vec<Arc<Client>>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Churn {
    /// Starts one thread per route; each stops by itself at `deadline`.
    pub fn start(routes: &[Route], deadline: Instant) -> Churn {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            deadline,
        });
        let clients: Vec<Arc<Client>> = routes
            .iter()
            .map(|&route| {
                Arc::new(Client {
                    route,
                    live: Live::default(),
                    attempts: Mutex::new(Vec::new()),
                    busy: Mutex::new(()),
                })
            })
            .collect();
        let threads = clients
            .iter()
            .map(|client| {
                let (client, shared) = (client.clone(), shared.clone());
                std::thread::spawn(move || client_loop(&client, &shared))
            })
            .collect();
        Churn {
            shared,
            clients,
            threads,
        }
    }

    /// Stops new attempts and returns once none is in flight.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        for client in &self.clients {
            // An attempt holds `busy`; the next one looks at `paused` under it.
            drop(lock(&client.busy));
        }
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    /// (label, connections ok, connections failed) of each client so far.
    pub fn live(&self) -> Vec<(&'static str, u64, u64)> {
        self.clients
            .iter()
            .map(|client| {
                (
                    client.route.label,
                    client.live.ok.load(Ordering::Relaxed),
                    client.live.failed.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Stops the clients and returns every attempt of each, by route.
    pub fn finish(mut self) -> Vec<(Route, Vec<Attempt>)> {
        self.stop_threads();
        self.clients
            .iter()
            .map(|client| (client.route, std::mem::take(&mut *lock(&client.attempts))))
            .collect()
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("soak: a client thread panicked");
            }
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn client_loop(client: &Client, shared: &Shared) {
    let route = client.route;
    for iteration in 0..MAX_ATTEMPTS {
        if shared.stop.load(Ordering::SeqCst) || Instant::now() >= shared.deadline {
            return;
        }
        let busy = lock(&client.busy);
        if shared.paused.load(Ordering::SeqCst) {
            drop(busy);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let attempt = if iteration % BURST_EVERY == BURST_EVERY - 1 {
            burst(route)
        } else {
            single(route, SIZES[(iteration % SIZES.len() as u64) as usize])
        };
        drop(busy);
        client.live.ok.fetch_add(attempt.ok, Ordering::Relaxed);
        client
            .live
            .failed
            .fetch_add(attempt.failed(), Ordering::Relaxed);
        lock(&client.attempts).push(attempt);
        std::thread::sleep(GAP);
    }
}

fn single(route: Route, bytes: u64) -> Attempt {
    let started = Instant::now();
    let result = send_from(route.pod, route.to, bytes, None, CONNECTION_TIMEOUT);
    Attempt {
        started,
        finished: Instant::now(),
        connections: 1,
        ok: u64::from(result.is_ok()),
        failures: result.err().map(|e| e.to_string()).into_iter().collect(),
    }
}

fn burst(route: Route) -> Attempt {
    let started = Instant::now();
    let result = burst_outcome_from(
        route.pod,
        route.to,
        BURST_CONNECTIONS,
        BURST_BYTES,
        CONNECTION_TIMEOUT,
    );
    let (ok, failures) = match result {
        Ok(report) => (report.succeeded as u64, report.failures),
        Err(error) => (0, vec![error.to_string()]),
    };
    Attempt {
        started,
        finished: Instant::now(),
        connections: BURST_CONNECTIONS as u64,
        ok,
        failures,
    }
}

/// What the run says about an attempt, from what was going on while it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Nothing that could stop it: it must succeed.
    Success,
    /// It must fail (a DENY in force, the daemon down): success would be a bypass.
    Failure(&'static str),
    /// It overlapped a change (a policy being applied, the daemon stopping or starting):
    /// failing is allowed, corrupting data is not.
    Either(&'static str),
}

/// How a failure reads, for the tallies.
pub fn kind(failure: &str) -> &'static str {
    if is_corruption(failure) {
        "corrupted"
    } else if failure.contains("Connection refused") {
        "refused"
    } else if failure.contains("reset") {
        "reset"
    } else if failure.contains("reply \"\" is not a report") {
        "closed before the report"
    } else if failure.contains("timed out") || failure.contains("temporarily unavailable") {
        "timed out"
    } else if failure.contains("Broken pipe") {
        "broken pipe"
    } else {
        "other"
    }
}

/// The server got other bytes than the client sent, or its report arrived mangled: the one
/// outcome no window excuses. (A connection cut before the report reads as an empty reply.)
fn is_corruption(failure: &str) -> bool {
    failure.contains("received different data")
        || (failure.contains("is not a report") && !failure.contains("reply \"\" is not"))
}

/// Every attempt of one client, judged.
#[derive(Debug, Default)]
pub struct Verdict {
    pub label: &'static str,
    pub attempts: u64,
    pub connections: u64,
    pub ok: u64,
    /// Failures where failing was allowed or required, by reason and kind.
    pub expected_failures: BTreeMap<(&'static str, &'static str), u64>,
    /// Connections that had to fail and did, by reason.
    pub refused_as_required: BTreeMap<&'static str, u64>,
    /// Connections that had to succeed and failed.
    pub unexpected_failures: u64,
    /// Connections that had to fail and got through.
    pub got_through: u64,
    pub corrupted: u64,
    /// Messages of the three above, with when they happened.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn judge(
        label: &'static str,
        attempts: &[Attempt],
        start: Instant,
        expect: impl Fn(&Attempt) -> Expect,
    ) -> Verdict {
        let mut verdict = Verdict {
            label,
            ..Verdict::default()
        };
        for attempt in attempts {
            verdict.attempts += 1;
            verdict.connections += attempt.connections;
            verdict.ok += attempt.ok;
            let at = format!(
                "{:.1}-{:.1} s",
                attempt.started.duration_since(start).as_secs_f64(),
                attempt.finished.duration_since(start).as_secs_f64()
            );
            let corrupted = attempt.failures.iter().filter(|f| is_corruption(f)).count();
            if corrupted > 0 {
                verdict.corrupted += corrupted as u64;
                for failure in attempt.failures.iter().filter(|f| is_corruption(f)) {
                    verdict.example(format!("corrupted at {at}: {failure}"));
                }
            }
            let failed = attempt.failed();
            match expect(attempt) {
                Expect::Success if failed > 0 => {
                    verdict.unexpected_failures += failed;
                    for failure in &attempt.failures {
                        verdict.example(format!("failed at {at}, nothing excused it: {failure}"));
                    }
                }
                Expect::Success => {}
                Expect::Failure(reason) => {
                    *verdict.refused_as_required.entry(reason).or_default() += failed;
                    if attempt.ok > 0 {
                        verdict.got_through += attempt.ok;
                        verdict.example(format!(
                            "{} of {} connections got through at {at}, {reason}",
                            attempt.ok, attempt.connections
                        ));
                    }
                }
                Expect::Either(reason) => {
                    // A burst names only its first few failures; the rest count as the first.
                    let unnamed = failed.saturating_sub(attempt.failures.len() as u64);
                    let mut counted = 0;
                    for (index, failure) in attempt.failures.iter().enumerate() {
                        let count = if index == 0 { 1 + unnamed } else { 1 };
                        counted += count;
                        *verdict
                            .expected_failures
                            .entry((reason, kind(failure)))
                            .or_default() += count;
                    }
                    if counted < failed {
                        *verdict
                            .expected_failures
                            .entry((reason, "other"))
                            .or_default() += failed - counted;
                    }
                }
            }
        }
        verdict
    }

    fn example(&mut self, text: String) {
        if self.examples.len() < EXAMPLES * 2 {
            self.examples.push(text);
        }
    }

    /// Connections that failed where failing was allowed or required.
    pub fn failed_as_allowed(&self) -> u64 {
        self.expected_failures.values().sum::<u64>()
            + self.refused_as_required.values().sum::<u64>()
    }

    /// One line per figure, for the summary.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{}: {} attempts, {} connections: {} ok, {} failed where allowed, {} failed \
             unexpectedly, {} got through where they had to fail, {} corrupted",
            self.label,
            self.attempts,
            self.connections,
            self.ok,
            self.failed_as_allowed(),
            self.unexpected_failures,
            self.got_through,
            self.corrupted
        )];
        for (reason, count) in &self.refused_as_required {
            lines.push(format!("    refused as required ({reason}): {count}"));
        }
        for ((reason, kind), count) in &self.expected_failures {
            lines.push(format!("    failed {reason} ({kind}): {count}"));
        }
        for example in &self.examples {
            lines.push(format!("    ! {example}"));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(start: Instant, from_ms: u64, to_ms: u64, ok: u64, failures: &[&str]) -> Attempt {
        Attempt {
            started: start + Duration::from_millis(from_ms),
            finished: start + Duration::from_millis(to_ms),
            connections: ok + failures.len() as u64,
            ok,
            failures: failures.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    #[test]
    fn judges_each_attempt_by_its_window() {
        let start = Instant::now();
        let refused =
            "lab-tool send: connecting to 10.244.2.2:8080: Connection refused (os error 111)";
        let mismatch = "lab-tool send: the server received different data: sent 4096 bytes ...";
        let cut = "lab-tool send: the server's reply \"\" is not a report: EOF";
        let attempts = [
            attempt(start, 0, 10, 1, &[]),
            attempt(start, 20, 30, 0, &[refused]),
            attempt(start, 100, 110, 0, &[refused]),
            attempt(start, 120, 130, 1, &[]),
            attempt(start, 200, 210, 0, &[cut]),
            attempt(start, 220, 230, 0, &[mismatch]),
        ];
        let verdict = Verdict::judge("x", &attempts, start, |a| {
            match a.started.duration_since(start).as_millis() {
                0..100 => Expect::Success,
                100..200 => Expect::Failure("denied"),
                _ => Expect::Either("changing"),
            }
        });
        assert_eq!(
            (verdict.attempts, verdict.connections, verdict.ok),
            (6, 6, 2)
        );
        assert_eq!(verdict.unexpected_failures, 1);
        assert_eq!(verdict.refused_as_required["denied"], 1);
        assert_eq!(verdict.got_through, 1);
        assert_eq!(verdict.corrupted, 1);
        assert_eq!(
            verdict.expected_failures[&("changing", "closed before the report")],
            1
        );
        assert_eq!(verdict.expected_failures[&("changing", "corrupted")], 1);
        assert_eq!(verdict.examples.len(), 3);
    }

    #[test]
    fn a_bursts_unnamed_failures_count_as_its_first() {
        let start = Instant::now();
        let mut burst = attempt(
            start,
            0,
            10,
            2,
            &["a: Connection refused", "b: reset by peer"],
        );
        burst.connections = 8;
        let verdict = Verdict::judge("x", &[burst], start, |_| Expect::Either("changing"));
        assert_eq!(verdict.expected_failures[&("changing", "refused")], 5);
        assert_eq!(verdict.expected_failures[&("changing", "reset")], 1);
        assert_eq!(verdict.failed_as_allowed(), 6);
    }
}
