//! Handing the allocator's free memory back to the kernel.
//!
//! glibc's malloc returns memory to the kernel only from the top of a heap. Each connection's
//! set-up state (handshakes, routing, the boxed set-up steps) is freed once the connection
//! carries bytes, and after a burst of connections those holes lie between the connections'
//! long-lived parts; once the burst's connections close, most of the heap is holes. Left
//! alone, all of it stays resident. `malloc_trim(0)` gives every whole free page inside the
//! heaps back (`MADV_DONTNEED`). Both it and the statistics that say whether to (`mallinfo2`)
//! walk the heaps under their locks, so they run on a thread of their own, never on a runtime
//! worker; a trim only follows a move of `TRIM_AFTER_BYTES` in the memory in use since the
//! last one: a daemon whose connections come and go steadily never trims.

use std::time::{Duration, Instant};

/// How often the memory in use is looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How far the memory in use must have moved, up or down, since the last trim.
const TRIM_AFTER_BYTES: u64 = 1 << 20;

/// Bytes the allocator has handed out and not had back (all arenas).
fn in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.uordblks as u64
}

/// Gives the free pages of every heap back to the kernel; returns whether any were.
fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers; 0 keeps no extra slack at the top.
    let released = unsafe { libc::malloc_trim(0) };
    released == 1
}

/// Whether the memory in use moved far enough since `at_last_trim` for a trim to pay.
fn worth_trimming(at_last_trim: u64, now: u64) -> bool {
    at_last_trim.abs_diff(now) >= TRIM_AFTER_BYTES
}

/// Trims in the background for the daemon's life.
pub fn spawn_trimmer() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(|| {
            let mut at_last_trim = in_use();
            loop {
                std::thread::sleep(CHECK_INTERVAL);
                let now = in_use();
                if !worth_trimming(at_last_trim, now) {
                    continue;
                }
                at_last_trim = now;
                let started = Instant::now();
                let released = trim();
                tracing::debug!(in_use = now, released, took = ?started.elapsed(), "heap trimmed");
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_gives_the_holes_between_live_allocations_back() {
        const BLOCKS: usize = 4096;
        const BLOCK: usize = 16 * 1024;
        // Big blocks with a small live allocation after each, as connections leave their
        // freed set-up state between their long-lived parts: the freed blocks cannot merge
        // into the top of the heap, so only a trim can return them.
        let mut blocks = Vec::with_capacity(BLOCKS);
        let mut keepers = Vec::with_capacity(BLOCKS);
        for i in 0..BLOCKS {
            blocks.push(vec![i as u8; BLOCK]);
            keepers.push(Box::new(i));
        }
        drop(blocks);
        let resident = || crate::process::sample().unwrap().resident_bytes;
        let before = resident();
        trim();
        let after = resident();
        let holes = (BLOCKS * BLOCK) as u64;
        assert!(
            before.saturating_sub(after) > holes / 2,
            "resident {before} -> {after} bytes, with {holes} bytes of holes"
        );
        // The live allocations stay until here, where the holes were measured.
        drop(keepers);
    }

    #[test]
    fn trims_only_after_the_memory_in_use_moved() {
        let mib = 1 << 20;
        assert!(!worth_trimming(10 * mib, 10 * mib));
        assert!(!worth_trimming(10 * mib, 10 * mib + mib - 1));
        assert!(worth_trimming(10 * mib, 11 * mib));
        assert!(worth_trimming(11 * mib, 10 * mib));
    }
}
