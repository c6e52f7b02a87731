//! What a test run really showed: every test binary cargo started and whether it reported,
//! the counts of its `test result:` line, and how many tests the sources hold, so that a
//! binary that crashed, a link failure or a test that was never built cannot read as a pass.

use std::fmt;
use std::path::Path;

/// The tests one cargo invocation ran, from its output in order (stdout and stderr merged:
/// cargo's `Running` lines go to stderr, each binary's result to stdout).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered: u64,
    /// Every test binary cargo started.
    pub binaries: Vec<String>,
    /// Binaries that started and printed no result: crashed, aborted or killed.
    pub unreported: Vec<String>,
    /// The binary started last, until its result line comes.
    running: Option<String>,
}

impl Tally {
    /// Reads one line of cargo's output.
    pub fn add_line(&mut self, line: &str) {
        let line = line.trim();
        if let Some(started) = line.strip_prefix("Running ") {
            self.close_running();
            // `Running tests/foo.rs (target/debug/deps/foo-0123)`: the source names it.
            let name = started.split(" (").next().unwrap_or(started).to_owned();
            self.binaries.push(name.clone());
            self.running = Some(name);
        } else if let Some(summary) = line.strip_prefix("test result: ") {
            self.running = None;
            for part in summary.split(';') {
                // `ok. 10 passed`, ` 1 ignored`, ` 2 filtered out`, ` finished in 0.01s`.
                let words: Vec<&str> = part.split_whitespace().collect();
                let Some(at) = words.iter().rposition(|w| w.parse::<u64>().is_ok()) else {
                    continue;
                };
                let count: u64 = words[at].parse().unwrap_or_default();
                match words[at + 1..].join(" ").as_str() {
                    "passed" => self.passed += count,
                    "failed" => self.failed += count,
                    "ignored" => self.ignored += count,
                    "filtered out" => self.filtered += count,
                    _ => {}
                }
            }
        }
    }

    /// Cargo's output is over: a binary still waiting for its result never gave one.
    pub fn finish(&mut self) {
        self.close_running();
    }

    fn close_running(&mut self) {
        if let Some(binary) = self.running.take() {
            self.unreported.push(binary);
        }
    }

    /// Tests that ran to a verdict or were skipped on purpose.
    pub fn counted(&self) -> u64 {
        self.passed + self.failed + self.ignored
    }

    /// Why this run cannot count as a pass, if it cannot: failures, binaries without a
    /// result, fewer tests than `expected` (the sources' count) or none at all.
    pub fn problem(&self, expected: u64) -> Option<String> {
        let mut problems = Vec::new();
        if self.failed > 0 {
            problems.push(format!("{} failed", self.failed));
        }
        if !self.unreported.is_empty() {
            problems.push(format!(
                "no result from {} (crashed or killed)",
                self.unreported.join(", ")
            ));
        }
        if self.counted() + self.filtered != expected {
            problems.push(format!(
                "ran {} of the {expected} tests in the sources",
                self.counted()
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} ignored, {} filtered out, in {} binaries",
            self.passed,
            self.failed,
            self.ignored,
            self.filtered,
            self.binaries.len()
        )
    }
}

/// How many tests the Rust `sources` (files, or directories searched whole) declare:
/// `#[test]` and `#[tokio::test]` attributes at the start of a line.
pub fn tests_in_sources(root: &Path, sources: &[&str]) -> std::io::Result<u64> {
    let mut count = 0;
    let mut pending: Vec<_> = sources.iter().map(|source| root.join(source)).collect();
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            count += std::fs::read_to_string(&path)?
                .lines()
                .map(str::trim_start)
                .filter(|l| l.starts_with("#[test]") || l.starts_with("#[tokio::test"))
                .count() as u64;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(lines: &[&str]) -> Tally {
        let mut tally = Tally::default();
        for line in lines {
            tally.add_line(line);
        }
        tally.finish();
        tally
    }

    #[test]
    fn counts_every_kind_of_result() {
        let tally = tally(&[
            "     Running unittests src/lib.rs (target/debug/deps/a-01)",
            "test result: ok. 10 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 0.00s",
            "     Running tests/b.rs (target/debug/deps/b-02)",
            "test foo ... ok",
            "test result: FAILED. 6 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        ]);
        assert_eq!(
            (tally.passed, tally.failed, tally.ignored, tally.filtered),
            (16, 2, 1, 2)
        );
        assert_eq!(tally.binaries, ["unittests src/lib.rs", "tests/b.rs"]);
        assert!(tally.unreported.is_empty());
        assert_eq!(tally.problem(21).as_deref(), Some("2 failed"));
    }

    #[test]
    fn a_binary_that_crashed_is_named() {
        let tally = tally(&[
            "     Running tests/a.rs (target/debug/deps/a-01)",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "     Running tests/b.rs (target/debug/deps/b-02)",
            "test x ... ",
            "error: test failed, to rerun pass `--test b`",
            "     Running tests/c.rs (target/debug/deps/c-03)",
        ]);
        assert_eq!(tally.unreported, ["tests/b.rs", "tests/c.rs"]);
        let problem = tally.problem(3).unwrap();
        assert!(
            problem.contains("no result from tests/b.rs, tests/c.rs"),
            "{problem}"
        );
    }

    #[test]
    fn fewer_tests_than_the_sources_hold_is_a_failure() {
        // A link failure: nothing ran at all.
        assert_eq!(
            tally(&["error: linking with `cc` failed"])
                .problem(12)
                .as_deref(),
            Some("ran 0 of the 12 tests in the sources")
        );
        let all = tally(&["test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured"]);
        assert_eq!(all.problem(12), None);
    }

    #[test]
    fn the_sources_of_this_crate_hold_this_test() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert!(tests_in_sources(root, &["src/test"]).unwrap() >= 4);
    }
}
