//! What the fuzz targets share: a time bound for every call (`bounded`), the CNI invocation a
//! fuzz input stands for (`cni`), and a reader of the HBONE server's responses on the wire
//! (`wire`).

pub mod cni;
pub mod wire;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the running call must have returned, in milliseconds since the watchdog started; 0
/// while no call runs.
static DEADLINE_MS: AtomicU64 = AtomicU64::new(0);

/// Runs `call`, aborting the process if it has not returned within `limit`: libFuzzer then
/// keeps the input as a crash reproducer, as for a panic. (libFuzzer's own `-timeout` is a
/// backstop with a longer limit.)
pub fn bounded<T>(what: &'static str, limit: Duration, call: impl FnOnce() -> T) -> T {
    let epoch = watchdog(what);
    let deadline = epoch.elapsed() + limit;
    DEADLINE_MS.store(millis(deadline).max(1), Ordering::SeqCst);
    let result = call();
    DEADLINE_MS.store(0, Ordering::SeqCst);
    result
}

/// Starts the thread that watches the deadline, once per process.
fn watchdog(what: &'static str) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let epoch = Instant::now();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let deadline = DEADLINE_MS.load(Ordering::SeqCst);
                if deadline != 0 && millis(epoch.elapsed()) > deadline {
                    eprintln!("fuzz: {what} ran past its time bound: a hang; aborting");
                    std::process::abort();
                }
            }
        });
        epoch
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
