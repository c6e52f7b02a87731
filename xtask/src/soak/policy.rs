//! The flipping policy: every few seconds the lab's mesh config is written again, with or
//! without a DENY of u1's address in namespace `demo`, and each flip is timed from the write
//! until node2's daemon (b1's) says it applied it. Between those two instants u1's
//! connections to b1 may go either way; outside them, the policy in force decides.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ztunnel_lab::mesh::{MeshChanges, mesh_config_with, write_mesh_config_text};

/// How often the policy changes.
pub const FLIP_EVERY: Duration = Duration::from_secs(5);
/// The daemons read the file some 50 ms after it changed; applying must not take much longer.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The node whose daemon decides on u1's connections to b1.
const DECIDING_NODE: &str = "node2";
/// Bound on the flips, whatever the clock does.
const MAX_FLIPS: usize = 100_000;

/// One write of the config.
#[derive(Clone, Debug)]
pub struct Flip {
    /// The DENY is in the new config.
    pub deny: bool,
    pub written: Instant,
    /// When node2's daemon was seen to have applied it (None: it was not, see `problem`).
    pub applied: Option<Instant>,
    pub problem: Option<String>,
}

struct Shared {
    stop: AtomicBool,
    paused: AtomicBool,
    /// The DENY is in the file now.
    denying: AtomicBool,
    flips: Mutex<Vec<Flip>>,
    /// Held while a flip is written and awaited.
    busy: Mutex<()>,
    deadline: Instant,
    u1: Ipv4Addr,
}

/// The thread that flips the policy; stopped (and joined) when dropped.
pub struct Flipper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Flipper {
    /// Starts flipping (the lab's config, without the DENY, is in force now), until `deadline`.
    pub fn start(u1: Ipv4Addr, deadline: Instant) -> Flipper {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            denying: AtomicBool::new(false),
            flips: Mutex::new(Vec::new()),
            busy: Mutex::new(()),
            deadline,
            u1,
        });
        let flipping = shared.clone();
        let thread = std::thread::spawn(move || flip_loop(&flipping));
        Flipper {
            shared,
            thread: Some(thread),
        }
    }

    /// Stops flipping and returns once no flip is being written or awaited.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        drop(lock(&self.shared.busy));
    }

    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    pub fn denying(&self) -> bool {
        self.shared.denying.load(Ordering::SeqCst)
    }

    pub fn flip_count(&self) -> usize {
        lock(&self.shared.flips).len()
    }

    /// Stops flipping, leaves the config without the DENY (a last flip if needed), and
    /// returns every flip.
    pub fn finish(mut self) -> Vec<Flip> {
        self.stop_thread();
        if self.denying() {
            let last = flip(false, self.shared.u1);
            self.shared.denying.store(false, Ordering::SeqCst);
            lock(&self.shared.flips).push(last);
        }
        std::mem::take(&mut *lock(&self.shared.flips))
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("soak: the policy thread panicked");
        }
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn flip_loop(shared: &Shared) {
    let mut next = Instant::now() + FLIP_EVERY;
    for _ in 0..MAX_FLIPS {
        while Instant::now() < next {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if shared.stop.load(Ordering::SeqCst) || Instant::now() >= shared.deadline {
            return;
        }
        let busy = lock(&shared.busy);
        if shared.paused.load(Ordering::SeqCst) {
            drop(busy);
            next = Instant::now() + Duration::from_millis(100);
            continue;
        }
        let deny = !shared.denying.load(Ordering::SeqCst);
        let done = flip(deny, shared.u1);
        shared.denying.store(deny, Ordering::SeqCst);
        next = done.written + FLIP_EVERY;
        lock(&shared.flips).push(done);
    }
}

/// The lab's mesh config, with the DENY of `u1` or without.
pub fn config(deny: bool, u1: Ipv4Addr) -> String {
    let policy = format!(
        "policies:\n- {{name: soak-deny-u1, namespace: demo, scope: Namespace, action: Deny, \
         rules: [[[{{sourceIps: [{u1}/32]}}]]]}}\n"
    );
    let sections = if deny { policy.as_str() } else { "" };
    mesh_config_with(&MeshChanges {
        sections,
        ..MeshChanges::default()
    })
}

/// Writes the config and waits (bounded) until the deciding node applied it.
fn flip(deny: bool, u1: Ipv4Addr) -> Flip {
    let before = config_generation(DECIDING_NODE);
    let written = Instant::now();
    let mut done = Flip {
        deny,
        written,
        applied: None,
        problem: None,
    };
    if let Err(error) = write_mesh_config_text(&config(deny, u1)) {
        done.problem = Some(format!("writing the mesh config: {error}"));
        return done;
    }
    let before = match before {
        Ok((generation, _)) => generation,
        Err(error) => {
            done.problem = Some(format!("reading {DECIDING_NODE}'s config before: {error}"));
            return done;
        }
    };
    let mut last = String::new();
    while written.elapsed() < APPLY_TIMEOUT {
        match config_generation(DECIDING_NODE) {
            Ok((generation, None)) if generation > before => {
                done.applied = Some(Instant::now());
                return done;
            }
            Ok((generation, rejected)) => {
                last = format!("generation {generation} (was {before}), rejected: {rejected:?}");
            }
            Err(error) => last = error.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done.problem = Some(format!(
        "{DECIDING_NODE} did not apply it within {}s: {last}",
        APPLY_TIMEOUT.as_secs()
    ));
    done
}

/// The generation of the config in force on `node`, and why the file's newest content was
/// refused, if it was.
fn config_generation(node: &str) -> anyhow::Result<(u64, Option<String>)> {
    let dump = ztunnel_lab::daemon_config_dump(node)?;
    let config = &dump["mesh"]["config"];
    let generation = config["generation"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no mesh.config.generation in {node}'s status"))?;
    Ok((generation, config["rejected"].as_str().map(str::to_owned)))
}

/// What the policy says about a connection that ran from `started` to `finished`, given
/// every flip (the first config, in force from `since`, has no DENY).
pub fn expectation(
    flips: &[Flip],
    since: Instant,
    started: Instant,
    finished: Instant,
) -> super::churn::Expect {
    use super::churn::Expect;
    // The spans over which one config was certainly in force: from its apply (or `since`)
    // until the next write.
    let mut from = Some(since);
    let mut deny = false;
    let mut spans = Vec::with_capacity(flips.len() + 1);
    for flip in flips {
        if let Some(from) = from {
            spans.push((from, flip.written, deny));
        }
        from = flip.applied;
        deny = flip.deny;
    }
    let far = finished + Duration::from_secs(1);
    if let Some(from) = from {
        spans.push((from, far, deny));
    }
    match spans
        .iter()
        .find(|(from, until, _)| *from <= started && finished < *until)
    {
        Some((_, _, true)) => Expect::Failure("denied by the policy in force"),
        Some((_, _, false)) => Expect::Success,
        None => Expect::Either("while the policy changed"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::churn::Expect;
    use super::*;

    #[test]
    fn the_config_with_the_deny_names_u1() {
        let u1 = Ipv4Addr::new(10, 244, 2, 3);
        assert!(
            config(true, u1).contains("action: Deny, rules: [[[{sourceIps: [10.244.2.3/32]}]]]")
        );
        assert!(!config(false, u1).contains("policies:"));
        assert!(config(false, u1).starts_with(&ztunnel_lab::mesh::mesh_config()));
    }

    #[test]
    fn only_the_spans_a_config_was_certainly_in_force_decide() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let flips = [
            Flip {
                deny: true,
                written: at(1000),
                applied: Some(at(1400)),
                problem: None,
            },
            Flip {
                deny: false,
                written: at(2000),
                applied: Some(at(2300)),
                problem: None,
            },
            Flip {
                deny: true,
                written: at(3000),
                applied: None,
                problem: Some("not applied".into()),
            },
        ];
        let expect = |from, to| expectation(&flips, t0, at(from), at(to));
        assert_eq!(expect(0, 900), Expect::Success);
        assert_eq!(
            expect(900, 1100),
            Expect::Either("while the policy changed")
        );
        assert_eq!(
            expect(1200, 1300),
            Expect::Either("while the policy changed")
        );
        assert_eq!(
            expect(1400, 1990),
            Expect::Failure("denied by the policy in force")
        );
        assert_eq!(
            expect(1500, 2100),
            Expect::Either("while the policy changed")
        );
        assert_eq!(expect(2300, 2999), Expect::Success);
        // Never seen applied: nothing after its write is certain.
        assert_eq!(
            expect(3500, 3600),
            Expect::Either("while the policy changed")
        );
    }
}
