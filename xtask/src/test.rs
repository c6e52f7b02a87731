//! `cargo xtask test`: the whole suite, as CI runs it.

mod tally;

use anyhow::{Context, Result, bail, ensure};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tally::{Tally, tests_in_sources};
use ztunnel_lab::topology;

/// The crates whose tests need no lab (the eBPF crate only builds for the BPF target).
const HOST_CRATES: [&str; 10] = [
    "-p",
    "ztunnel-common",
    "-p",
    "ztunnel-user",
    "-p",
    "fake-istiod",
    "-p",
    "fake-kube-apiserver",
    "-p",
    "xtask",
];

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

/// The Rust sources whose tests each phase runs (for the count it must reach).
const HOST_TEST_SOURCES: [&str; 8] = [
    "ztunnel-common/src",
    "ztunnel-common/tests",
    "ztunnel-user/src",
    "ztunnel-user/tests",
    "tests/fake-istiod/src",
    "tests/fake-kube/src",
    "tests/fake-kube/tests",
    "xtask/src",
];
const LAB_TEST_SOURCES: [&str; 2] = ["tests/src", "tests/tests"];
/// The end-to-end suites run a second time with the daemons on the lab's istiod (delta xDS
/// and Istio's CA) instead of the mesh file and the built-in CA.
const ISTIOD_SUITES: [&str; 7] = [
    "datapath",
    "hbone",
    "policy",
    "restart",
    "kubernetes",
    "locality",
    "app_tunnel",
];
const PEER_SELFTEST: &str = "tests/hbone_peer/test_peer_selftest.py";

pub fn run() -> Result<()> {
    let mut summary = Summary::new();
    crate::setup::run()?;
    cargo("format check", &["fmt", "--all", "--check"])?;
    cargo("format check of the fuzz targets", &FUZZ_FMT)?;
    // Lints and their levels are the workspace's (`[workspace.lints]`): a warning fails. The
    // fuzz targets' entry points (`ztunnel-user`'s feature `fuzzing`) are linted with the rest.
    let clippy = [
        "clippy",
        "--all-targets",
        "--features",
        "ztunnel-common/user,ztunnel-user/fuzzing",
    ];
    cargo("clippy", &clippy)?;
    cargo("clippy of the fuzz targets", &FUZZ_CLIPPY)?;
    crate::lab::build_binaries(false, false)?;
    summary.prepared = summary.started.elapsed();

    // The DaemonSet and the rest of deploy/, rendered as `kubectl apply -k` would and checked
    // against the API's schemas; the unit tests check it against the daemon's settings.
    summary.phase("Kubernetes manifests", crate::manifests::run);
    let host_tests = [
        &["test", "--lib", "--bins", "--tests", "--no-fail-fast"][..],
        &HOST_CRATES,
        &["--features", "ztunnel-common/user"],
    ]
    .concat();
    summary.tests(
        "unit and CNI plugin tests",
        &host_tests,
        &HOST_TEST_SOURCES,
        &[],
    );
    summary.phase("independent HBONE peer self-test", python_peer_selftest);
    // Each end-to-end test brings up its own lab in the same fixed namespaces: the lab's lock
    // makes them take turns, and so does --test-threads=1 (in order, one output at a time).
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
    summary.tests(
        "end-to-end tests on the lab",
        &lab_tests,
        &LAB_TEST_SOURCES,
        &[],
    );
    let mut istiod_tests = vec!["test", "-p", "ztunnel-lab"];
    istiod_tests.extend(ISTIOD_SUITES.iter().flat_map(|suite| ["--test", suite]));
    istiod_tests.extend(["--no-fail-fast", "--", "--test-threads=1"]);
    let istiod_sources = ISTIOD_SUITES.map(|suite| format!("tests/tests/{suite}.rs"));
    summary.tests(
        "end-to-end suites against istiod",
        &istiod_tests,
        &istiod_sources.each_ref().map(String::as_str),
        &[(ztunnel_lab::CONTROL_PLANE_VARIABLE, "istiod")],
    );
    // A minute of everything at once: churn, policy flips, certificate rotation, a restart.
    summary.phase("soak", || crate::soak::soak(Duration::from_secs(60)));
    // Whatever happened, leave the machine clean.
    summary.always("lab down", || {
        Ok(ztunnel_lab::LabLock::acquire("test").and_then(|_lock| ztunnel_lab::down())?)
    });
    // The release image, unpacked and run: its config, and both binaries under chroot into
    // its root filesystem (so it carries every library they load).
    summary.phase(
        "container image: cargo xtask image, then `ztunnel --version` and `ztunnel-cni` \
         (CNI_COMMAND=VERSION) under chroot into the unpacked image",
        crate::image::check,
    );
    // The same lab under the kernels most nodes run, with cgroup v2 at /sys/fs/cgroup.
    let kernels = crate::vm::DEFAULT_KERNELS.map(str::to_owned);
    summary.phase(&format!("the smoke under kernels {kernels:?}"), || {
        crate::vm::run_kernels(&kernels)
    });
    summary.phase(
        &format!("fuzzing, {} s a target", crate::fuzz::TEST_SECONDS),
        || {
            crate::fuzz::run_targets(
                &crate::fuzz::TARGETS.map(str::to_owned),
                crate::fuzz::TEST_SECONDS,
            )
        },
    );
    summary.print()
}

/// Every phase of the run and how it ended, printed at the end: a phase that failed, or that
/// did not run because one before it failed, fails the run and is named. Each phase's time is
/// shown, so the run's budget (CI gives it 90 minutes) can be watched phase by phase.
struct Summary {
    started: Instant,
    /// Set-up, format checks, clippy and the build, before the first phase.
    prepared: Duration,
    phases: Vec<Phase>,
}

struct Phase {
    name: String,
    outcome: Outcome,
    took: Duration,
}

enum Outcome {
    Passed(String),
    Failed(String),
    NotRun,
}

impl Summary {
    fn new() -> Self {
        Summary {
            started: Instant::now(),
            prepared: Duration::ZERO,
            phases: Vec::new(),
        }
    }

    fn failed(&self) -> bool {
        self.phases
            .iter()
            .any(|phase| !matches!(phase.outcome, Outcome::Passed(_)))
    }

    fn record(&mut self, name: &str, outcome: Outcome, started: Instant) {
        self.phases.push(Phase {
            name: name.to_owned(),
            outcome,
            took: started.elapsed(),
        });
    }

    /// Runs `phase` unless an earlier one failed.
    fn phase(&mut self, name: &str, phase: impl FnOnce() -> Result<()>) {
        if self.failed() {
            self.record(name, Outcome::NotRun, Instant::now());
        } else {
            self.always(name, phase);
        }
    }

    /// Runs `phase` whatever happened before (the lab's teardown).
    fn always(&mut self, name: &str, phase: impl FnOnce() -> Result<()>) {
        println!("test: {name}");
        let started = Instant::now();
        let outcome = match phase() {
            Ok(()) => Outcome::Passed("passed".to_owned()),
            Err(error) => Outcome::Failed(format!("{error:#}")),
        };
        self.record(name, outcome, started);
    }

    /// Runs the tests of `cargo args` with `env` set, which must account for every test in
    /// `sources`.
    fn tests(&mut self, name: &str, args: &[&str], sources: &[&str], env: &[(&str, &str)]) {
        if self.failed() {
            self.record(name, Outcome::NotRun, Instant::now());
            return;
        }
        let started = Instant::now();
        let outcome = match run_tests(name, args, sources, env) {
            Ok((tally, expected)) => match tally.problem(expected) {
                None => Outcome::Passed(tally.to_string()),
                Some(problem) => Outcome::Failed(format!("{tally}: {problem}")),
            },
            Err(error) => Outcome::Failed(format!("{error:#}")),
        };
        self.record(name, outcome, started);
    }

    fn print(&self) -> Result<()> {
        println!("\ntest: summary");
        println!(
            "  {:>5}s  set-up, format, clippy and build",
            self.prepared.as_secs()
        );
        for phase in &self.phases {
            let (verdict, detail) = match &phase.outcome {
                Outcome::Passed(detail) => ("PASS", detail.as_str()),
                Outcome::Failed(detail) => ("FAIL", detail.as_str()),
                Outcome::NotRun => ("NOT RUN", "an earlier phase failed"),
            };
            let (took, name) = (phase.took.as_secs(), &phase.name);
            println!("  {took:>5}s  {verdict:<7} {name}: {detail}");
        }
        println!("  {:>5}s  in all", self.started.elapsed().as_secs());
        if self.failed() {
            bail!("the test suite failed (see the summary above)");
        }
        Ok(())
    }
}

/// The independent HBONE peer's own tests (Python unittest, which reports on stderr); they
/// must all run.
fn python_peer_selftest() -> Result<()> {
    let root = topology::workspace_root();
    println!("test: python3 -m unittest {PEER_SELFTEST}");
    let output = Command::new("python3")
        .current_dir(&root)
        .args(["-m", "unittest", PEER_SELFTEST])
        .stdin(Stdio::null())
        .output()
        .context("running python3")?;
    let report = String::from_utf8_lossy(&output.stderr);
    print!("{report}");
    let ran = report.lines().find_map(|l| {
        l.strip_prefix("Ran ")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    let script = std::fs::read_to_string(root.join(PEER_SELFTEST))
        .with_context(|| format!("reading {PEER_SELFTEST}"))?;
    let expected = script
        .lines()
        .filter(|l| l.trim_start().starts_with("def test_"))
        .count() as u64;
    ensure!(
        output.status.success(),
        "the HBONE peer self-test failed ({})",
        output.status
    );
    ensure!(
        ran == Some(expected),
        "the HBONE peer self-test ran {ran:?} of the {expected} tests in {PEER_SELFTEST}"
    );
    Ok(())
}

/// Runs a cargo test command, its output shown and tallied, and counts the tests of
/// `sources` it must have run.
fn run_tests(
    what: &str,
    args: &[&str],
    sources: &[&str],
    env: &[(&str, &str)],
) -> Result<(Tally, u64)> {
    let root = topology::workspace_root();
    let expected = tests_in_sources(&root, sources).context("counting the tests in the sources")?;
    println!("test: {what}: cargo {}", args.join(" "));
    // One pipe for both streams, so that each binary's result follows its `Running` line.
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let mut command = Command::new(cargo_binary());
    command
        .current_dir(&root)
        .args(args)
        .envs(env.iter().copied())
        .stdout(writer.try_clone().context("duplicating the pipe")?)
        .stderr(writer);
    let mut child = command.spawn().context("running cargo")?;
    // Our copies of the writing end go with `command`, so the reader sees the end.
    drop(command);
    let mut tally = Tally::default();
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading cargo's output")?;
        println!("{line}");
        tally.add_line(&line);
    }
    tally.finish();
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() && tally.problem(expected).is_none() {
        // Cargo failed in a way no test showed (a build error, say).
        bail!("cargo failed ({status}) with no test failing: {tally}");
    }
    Ok((tally, expected))
}

/// Runs cargo in the workspace.
fn cargo(what: &str, args: &[&str]) -> Result<()> {
    println!("test: {what}: cargo {}", args.join(" "));
    let status = Command::new(cargo_binary())
        .current_dir(topology::workspace_root())
        .args(args)
        .status()
        .context("running cargo")?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

fn cargo_binary() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}
