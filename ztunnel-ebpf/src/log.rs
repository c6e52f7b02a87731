//! Debug lines about the capture decisions, for `ztunnel run --ebpf-log`.
//!
//! The programs are built twice (see `main.rs`): `LOG` is false in the object the daemon
//! loads by default, so the compiler removes every line and everything computed for it (that
//! object has no logging code at all); it is true in the one `--ebpf-log` loads, where
//! aya-log-ebpf writes each line to the ring buffer the daemon reads.
//!
//! Everything a line needs is computed inside the macro's arguments, which are evaluated only
//! behind that check; nothing is computed for logging outside it.

use ztunnel_common::Counter;

/// Logs a decision at debug level under the target `ztunnel_ebpf`, in the object built with
/// `LOG`; in the other, it is nothing.
macro_rules! decision {
    ($ctx:expr, $($format:tt)+) => {
        if crate::LOG {
            aya_log_ebpf::debug!($ctx, target: ztunnel_common::EBPF_LOG_TARGET, $($format)+)
        }
    };
}
pub(crate) use decision;

/// Room for the longest counter name; shorter ones are padded with spaces.
const NAME_WIDTH: usize = 32;

/// The counters' names, all of one length: a log argument's length must be known when the
/// program is built (a string of run-time length would need a copy loop the verifier cannot
/// bound), so each name is padded, and the daemon trims the padding off the line.
static COUNTER_NAMES: [[u8; NAME_WIDTH]; Counter::COUNT as usize] = padded_counter_names();

const fn padded_counter_names() -> [[u8; NAME_WIDTH]; Counter::COUNT as usize] {
    let mut table = [[b' '; NAME_WIDTH]; Counter::COUNT as usize];
    let mut i = 0;
    while i < Counter::ALL.len() {
        table[i] = padded(Counter::ALL[i].name().as_bytes());
        i += 1;
    }
    table
}

/// What `counter_name` gives for an index outside the table (none is).
static UNKNOWN: [u8; NAME_WIDTH] = padded(b"?");

const fn padded(name: &[u8]) -> [u8; NAME_WIDTH] {
    assert!(name.len() <= NAME_WIDTH, "a counter name is too long");
    let mut row = [b' '; NAME_WIDTH];
    let mut i = 0;
    while i < name.len() {
        row[i] = name[i];
        i += 1;
    }
    row
}

/// The counter's name, padded to `NAME_WIDTH`, as a log argument.
#[inline(always)]
pub fn counter_name(counter: Counter) -> &'static str {
    let row = COUNTER_NAMES
        .get(counter.index() as usize)
        .unwrap_or(&UNKNOWN);
    // SAFETY: every row is ASCII: a counter name and spaces.
    unsafe { core::str::from_utf8_unchecked(row) }
}
