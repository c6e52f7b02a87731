//! `cargo xtask test`: the whole suite, as CI runs it.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use ztunnel_lab::topology;

/// The crates whose tests need no lab (the eBPF crate only builds for the BPF target).
const HOST_CRATES: [&str; 6] = ["-p", "ztunnel-common", "-p", "ztunnel-user", "-p", "xtask"];

/// The fuzz targets are a workspace of their own (fuzz/), built for fuzzing with nightly by
/// `cargo xtask fuzz`; they are checked here like the rest, with the stable toolchain, in the
/// main target directory (their dependencies are the product's).
const FUZZ_FMT: [&str; 5] = [
    "fmt",
    "--manifest-path",
    "fuzz/Cargo.toml",
    "--all",
    "--check",
];
const FUZZ_CLIPPY: [&str; 9] = [
    "clippy",
    "--manifest-path",
    "fuzz/Cargo.toml",
    "--target-dir",
    "target",
    "--all-targets",
    "--",
    "-D",
    "warnings",
];

/// Test counts summed over every `test result:` line cargo printed.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Adds the counts of a line like `test result: ok. 10 passed; 0 failed; 0 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(summary) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in summary.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    cargo("format check", &["fmt", "--all", "--check"], None)?;
    cargo("format check of the fuzz targets", &FUZZ_FMT, None)?;
    // Lints and their levels are the workspace's (`[workspace.lints]`): a warning fails. The
    // fuzz targets' entry points (`ztunnel-user`'s feature `fuzzing`) are linted with the rest.
    let clippy = [
        "clippy",
        "--all-targets",
        "--features",
        "ztunnel-common/user,ztunnel-user/fuzzing",
    ];
    cargo("clippy", &clippy, None)?;
    cargo("clippy of the fuzz targets", &FUZZ_CLIPPY, None)?;
    crate::lab::build_binaries(false, false)?;

    let mut tally = Tally::default();
    let host_tests = [
        &["test", "--lib", "--bins", "--tests"][..],
        &HOST_CRATES,
        &["--features", "ztunnel-common/user"],
    ]
    .concat();
    let host = cargo("unit and CNI plugin tests", &host_tests, Some(&mut tally))
        .and_then(|()| python_peer_selftest(&mut tally));
    // Each end-to-end test brings up its own lab in the same fixed namespaces: one at a time.
    let lab_tests = [
        "test",
        "-p",
        "ztunnel-lab",
        "--lib",
        "--bins",
        "--tests",
        // One failing suite must not hide the others' results.
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ];
    let end_to_end =
        host.and_then(|()| cargo("end-to-end tests on the lab", &lab_tests, Some(&mut tally)));
    // A minute of everything at once: churn, policy flips, certificate rotation, a restart.
    let end_to_end = end_to_end.and_then(|()| crate::soak::soak(Duration::from_secs(60)));
    // Whatever happened, leave the machine clean.
    let down = ztunnel_lab::LabLock::acquire("test").and_then(|_lock| ztunnel_lab::down());
    println!("test: {} passed, {} failed", tally.passed, tally.failed);
    end_to_end?;
    down?;
    // The same lab under the kernels most nodes run, with cgroup v2 at /sys/fs/cgroup.
    let kernels = crate::vm::DEFAULT_KERNELS.map(str::to_owned);
    println!("test: the smoke under other kernels: cargo xtask vm-test (kernels {kernels:?})");
    crate::vm::run_kernels(&kernels)?;
    println!(
        "test: fuzzing: cargo xtask fuzz --seconds {}",
        crate::fuzz::TEST_SECONDS
    );
    crate::fuzz::run_targets(
        &crate::fuzz::TARGETS.map(str::to_owned),
        crate::fuzz::TEST_SECONDS,
    )
}

/// The independent HBONE peer's own tests (Python unittest, which reports on stderr).
fn python_peer_selftest(tally: &mut Tally) -> Result<()> {
    let script = "tests/hbone_peer/test_peer_selftest.py";
    println!("test: independent HBONE peer self-test: python3 -m unittest {script}");
    let output = Command::new("python3")
        .current_dir(topology::workspace_root())
        .args(["-m", "unittest", script])
        .stdin(Stdio::null())
        .output()
        .context("running python3")?;
    let report = String::from_utf8_lossy(&output.stderr);
    print!("{report}");
    let ran = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    if output.status.success() {
        tally.passed += ran;
        Ok(())
    } else {
        tally.failed += ran.max(1);
        bail!("the HBONE peer self-test failed ({})", output.status)
    }
}

/// Runs cargo in the workspace; with a tally, also counts the tests its output reports.
fn cargo(what: &str, args: &[&str], tally: Option<&mut Tally>) -> Result<()> {
    println!("test: {what}: cargo {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(topology::workspace_root()).args(args);
    let status = match tally {
        None => command.status().context("running cargo")?,
        Some(tally) => {
            let mut child = command
                .stdout(Stdio::piped())
                .spawn()
                .context("running cargo")?;
            let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
            for line in stdout.lines() {
                let line = line.context("reading cargo's output")?;
                println!("{line}");
                tally.add_line(&line);
            }
            child.wait().context("waiting for cargo")?
        }
    };
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tallies_cargo_result_lines() {
        let mut tally = Tally::default();
        tally.add_line("test result: ok. 10 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        tally.add_line(
            "test result: FAILED. 6 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        tally.add_line("test foo ... ok");
        assert_eq!((tally.passed, tally.failed), (16, 2));
    }
}
