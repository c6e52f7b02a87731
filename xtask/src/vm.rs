//! `cargo xtask vm-test`: the lab's end-to-end smoke under other kernels, each booted in a
//! virtual machine over this machine's own files (virtme-ng): the guest sees the workspace,
//! the built binaries and the CNI plugins where the host has them, and runs the smoke with
//! its own network namespaces, cgroups and bpffs. The guest mounts cgroup v2 at
//! `/sys/fs/cgroup` alone (the unified layout), so the smoke also covers the layout every
//! current distribution uses, whatever this machine's is.
//!
//! Kernels come from Debian's packages (`linux-image-<series>*-amd64-unsigned`, the newest
//! generic image of the series apt knows), unpacked under `target/vm/kernels/`; the generic
//! images carry the 9p and virtio modules virtme-ng needs, the cloud ones do not. KVM is used when it works, else the guest is
//! emulated (nested KVM fails on some hosts at start: `failed to set MSR`).

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ztunnel_lab::topology;

/// The kernels the test suite boots besides the host's: Debian 12's, the oldest most nodes
/// run.
pub const DEFAULT_KERNELS: [&str; 1] = ["6.1"];

/// The smoke: for each end-to-end test binary, the tests that exercise every capture hook
/// (connect4 and sock_ops, sk_lookup, the plaintext rules, HBONE, and moving pinned links on
/// to a restarted daemon's programs).
const SMOKE: [(&str, &[&str]); 4] = [
    (
        "datapath",
        &[
            "cross_node_connection_is_captured_and_arrives_intact",
            "same_node_connection_is_captured_and_arrives_intact",
            "unenrolled_client_reaches_an_enrolled_pod_through_the_inbound_listener",
        ],
    ),
    (
        "hbone",
        &["cross_node_traffic_crosses_the_underlay_only_inside_tls"],
    ),
    (
        "policy",
        &["deny_by_source_ip_namespace_and_selected_workload"],
    ),
    (
        "restart",
        &["sigkilled_daemon_fails_closed_and_takes_its_pods_over_on_restart"],
    ),
];

/// How long one boot may take, the smoke included, before it counts as hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// The guest's size: the lab's nodes, pods and daemons fit in well under 1 GiB.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";

#[derive(Args)]
pub struct VmTestArgs {
    /// A kernel to boot (repeatable): a Debian series such as 6.1 or 6.12 (the newest
    /// `linux-image-<series>*-amd64-unsigned` package), or the directory a kernel package was
    /// unpacked into (boot/vmlinuz-* and lib/modules/*). [default: 6.1]
    #[arg(long = "kernel", value_name = "SERIES|DIR")]
    kernels: Vec<String>,
}

/// One kernel's outcome, for the matrix.
struct Outcome {
    kernel: String,
    layout: String,
    passed: bool,
    summary: String,
    took: Duration,
}

pub fn run(args: VmTestArgs) -> Result<()> {
    let kernels: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.map(str::to_owned).to_vec()
    } else {
        args.kernels
    };
    run_kernels(&kernels)
}

/// Runs the smoke under each of `kernels`; fails unless it passes under every one.
pub fn run_kernels(kernels: &[String]) -> Result<()> {
    crate::setup::run()?;
    crate::lab::build_binaries(false, false)?;
    let tests = build_smoke()?;
    let root = topology::workspace_root().join("target/vm");
    let mut outcomes = Vec::new();
    for kernel in kernels {
        let image = Kernel::fetch(kernel, &root)?;
        println!(
            "vm-test: {}: booting ({})...",
            image.release,
            image.vmlinuz.display()
        );
        outcomes.push(image.run_smoke(&tests, &root)?);
    }
    println!("\nvm-test: the matrix\n{}", matrix(&outcomes));
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.kernel.as_str())
        .collect();
    ensure!(
        failed.is_empty(),
        "the smoke failed under {}",
        failed.join(", ")
    );
    Ok(())
}

/// The smoke's test binaries, built for the host (the guest runs them from the workspace).
fn build_smoke() -> Result<Vec<(PathBuf, &'static [&'static str])>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(topology::workspace_root()).args([
        "test",
        "-p",
        "ztunnel-lab",
        "--no-run",
        "--message-format=json",
    ]);
    for (binary, _) in SMOKE {
        command.args(["--test", binary]);
    }
    println!("vm-test: building the smoke's test binaries");
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    ensure!(
        output.status.success(),
        "building the smoke's tests failed ({})",
        output.status
    );
    let mut built = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if let Some((_, tests)) = SMOKE.iter().find(|(binary, _)| *binary == name) {
            built.push((PathBuf::from(executable), *tests));
        }
    }
    ensure!(
        built.len() == SMOKE.len(),
        "cargo built {} of the smoke's {} test binaries",
        built.len(),
        SMOKE.len()
    );
    Ok(built)
}

/// A kernel unpacked where virtme-ng finds its modules: `<dir>/boot/vmlinuz-<release>` and
/// `<dir>/lib/modules/<release>`.
struct Kernel {
    /// What the user named it by.
    name: String,
    release: String,
    vmlinuz: PathBuf,
}

impl Kernel {
    /// The kernel `name` names: an unpacked directory, else the newest Debian package of
    /// that series, downloaded and unpacked under `root` once.
    fn fetch(name: &str, root: &Path) -> Result<Kernel> {
        let dir = Path::new(name);
        if dir.is_dir() {
            return Kernel::in_dir(name, dir);
        }
        let package = newest_package(name)?;
        let unpacked = root.join("kernels").join(&package);
        if !unpacked.join("boot").is_dir() {
            let debs = root.join("debs");
            std::fs::create_dir_all(&debs)
                .with_context(|| format!("creating {}", debs.display()))?;
            println!("vm-test: {name}: downloading {package}...");
            run_checked(
                Command::new("apt-get")
                    .current_dir(&debs)
                    .args(["download", &package]),
                "apt-get download",
            )?;
            let deb = find_file(&debs, |file| file.starts_with(&format!("{package}_")))?;
            let partial = unpacked.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial)?;
            run_checked(
                Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial),
                "dpkg-deb -x",
            )?;
            std::fs::rename(&partial, &unpacked)
                .with_context(|| format!("moving the kernel to {}", unpacked.display()))?;
        }
        Kernel::in_dir(name, &unpacked)
    }

    fn in_dir(name: &str, dir: &Path) -> Result<Kernel> {
        let vmlinuz = find_file(&dir.join("boot"), |file| file.starts_with("vmlinuz-"))?;
        let release = vmlinuz
            .file_name()
            .and_then(|file| file.to_str())
            .and_then(|file| file.strip_prefix("vmlinuz-"))
            .context("a vmlinuz without a release")?
            .to_owned();
        ensure!(
            dir.join("lib/modules").join(&release).is_dir(),
            "{} has no lib/modules/{release} beside its kernel",
            dir.display()
        );
        Ok(Kernel {
            name: name.to_owned(),
            release,
            vmlinuz,
        })
    }

    /// Boots the kernel and runs the smoke in it; the guest's results come back through a
    /// directory it may write.
    fn run_smoke(&self, tests: &[(PathBuf, &[&str])], root: &Path) -> Result<Outcome> {
        let out = root.join("out").join(&self.release);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let script = out.join("guest.sh");
        std::fs::write(&script, guest_script(tests, &out))
            .with_context(|| format!("writing {}", script.display()))?;
        let started = Instant::now();
        let kvm = Path::new("/dev/kvm").exists();
        if !kvm || !self.boot(&script, &out, true)? {
            if kvm {
                println!(
                    "vm-test: {}: the guest did not start with KVM (see its console.log); emulating it",
                    self.release
                );
            }
            self.boot(&script, &out, false)?;
        }
        let took = started.elapsed();
        let read = |file: &str| std::fs::read_to_string(out.join(file)).unwrap_or_default();
        let layout = read("layout").trim().to_owned();
        let failures = read("failed");
        let passed = out.join("done").exists() && failures.is_empty() && !layout.is_empty();
        let summary = if passed {
            read("summary").trim().to_owned()
        } else if !out.join("done").exists() {
            format!(
                "the guest did not finish: see {}",
                out.join("console.log").display()
            )
        } else {
            format!("failed: {}", failures.trim().replace('\n', "; "))
        };
        Ok(Outcome {
            kernel: format!("{} ({})", self.release, self.name),
            layout: if layout.is_empty() {
                "?".into()
            } else {
                layout
            },
            passed,
            summary,
            took,
        })
    }

    /// One boot, with KVM or emulated, its console kept in `console.log` and the smoke's own
    /// progress lines echoed; returns whether the guest started the smoke at all.
    fn boot(&self, script: &Path, out: &Path, kvm: bool) -> Result<bool> {
        // A guest that hangs is stopped (and its kernel's run fails) rather than hold CI.
        let mut command = Command::new("timeout");
        command
            .current_dir(topology::workspace_root())
            .args([
                "--kill-after=30s",
                &format!("{}s", RUN_TIMEOUT.as_secs()),
                "vng",
            ])
            .arg("--verbose")
            .arg("--run")
            .arg(&self.vmlinuz)
            .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
            .arg("--rwdir")
            .arg(out)
            .arg("--exec")
            .arg(format!("sh {}", script.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !kvm {
            command.arg("--disable-kvm");
        }
        let mut child = command
            .spawn()
            .context("running vng (cargo xtask setup installs virtme-ng)")?;
        // The guest's console reaches us on either stream (virtme-ng's console fallback
        // writes to stderr): follow both.
        let release = self.release.clone();
        let stderr = child.stderr.take().expect("stderr is piped");
        let errors = std::thread::spawn(move || follow(stderr, &release));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut console = follow(stdout, &self.release);
        if child.wait().is_ok_and(|status| status.code() == Some(124)) {
            println!("vm-test: {}: stopped after {RUN_TIMEOUT:?}", self.release);
        }
        console.push_str(&errors.join().unwrap_or_default());
        std::fs::write(out.join("console.log"), &console)
            .with_context(|| format!("writing {}", out.join("console.log").display()))?;
        Ok(out.join("layout").exists())
    }
}

/// Reads the guest's console from `stream` until it ends, echoing the smoke's progress lines.
fn follow(stream: impl std::io::Read, release: &str) -> String {
    let mut console = String::new();
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        if let Some((_, progress)) = line.split_once("vm-test: ") {
            println!("vm-test: {release}: {progress}");
        }
        let _ = writeln!(console, "{line}");
    }
    console
}

/// The newest `linux-image-<series>*-amd64-unsigned` package apt knows.
fn newest_package(series: &str) -> Result<String> {
    ensure!(
        series.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "{series:?} is neither a kernel series like 6.1 nor an unpacked kernel's directory"
    );
    let prefix = format!("linux-image-{series}.");
    let listed = Command::new("apt-cache")
        .args(["pkgnames", &prefix])
        .stdin(Stdio::null())
        .output()
        .context("running apt-cache")?;
    let mut packages: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        // The generic image: the cloud one lacks the 9p modules virtme-ng needs.
        .filter(|name| {
            name.ends_with("-amd64-unsigned") && !name.contains("-rt-") && !name.contains("-cloud-")
        })
        .map(str::to_owned)
        .collect();
    packages.sort_by_key(|name| version_key(name));
    match packages.pop() {
        Some(newest) => Ok(newest),
        None => bail!(
            "apt knows no {prefix}*-amd64-unsigned package (run apt-get update; Debian 12 has the \
             6.1 and 6.12 series)"
        ),
    }
}

/// The numbers in a package name, in order: sorts 6.1.0-9 before 6.1.0-57.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

fn find_file(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(&wanted) {
            return Ok(entry.path());
        }
    }
    bail!("nothing of the kind in {}", dir.display())
}

/// Runs a tool with our stdout and stderr, failing unless it succeeds.
pub(crate) fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// What the guest runs: it checks that cgroup v2 is mounted at `/sys/fs/cgroup` alone (the
/// unified layout), mounts bpffs, runs each test binary's smoke tests one at a time, and
/// leaves its results in `out`: `layout`, `summary`, `failed` (one line per failing binary),
/// `done` at the end, and each binary's output as `<binary>.log`.
fn guest_script(tests: &[(PathBuf, &[&str])], out: &Path) -> String {
    let out = out.display();
    let mut script = format!(
        "#!/bin/sh
# Written by cargo xtask vm-test; runs inside the guest.
out={out}
mounts=$(awk '$9 == \"cgroup2\" {{print $5}}' /proc/self/mountinfo)
if [ \"$mounts\" != /sys/fs/cgroup ]; then
    echo \"cgroup2 mounted at: $mounts (the smoke wants /sys/fs/cgroup alone)\" >> $out/failed
fi
echo \"cgroup2 at $mounts\" > $out/layout
mount -t bpf bpf /sys/fs/bpf
passed=0
"
    );
    for (binary, names) in tests {
        let name = binary
            .file_name()
            .and_then(|file| file.to_str())
            .and_then(|file| file.rsplit_once('-'))
            .map_or("tests", |(stem, _)| stem);
        let _ = write!(
            script,
            "echo \"vm-test: {name}...\"
start=$(date +%s)
if {} --exact --test-threads=1 {} > $out/{name}.log 2>&1; then
    passed=$((passed + {}))
    echo \"vm-test: {name}: passed in $(( $(date +%s) - start )) s\"
else
    echo \"{name} (see $out/{name}.log)\" >> $out/failed
    echo \"vm-test: {name}: FAILED in $(( $(date +%s) - start )) s\"
    tail -n 40 $out/{name}.log
fi
",
            binary.display(),
            names.join(" "),
            names.len()
        );
    }
    script.push_str("echo \"$passed tests passed\" > $out/summary\ntouch $out/done\n");
    script
}

/// The results as a table: kernel, cgroup layout, result, time.
fn matrix(outcomes: &[Outcome]) -> String {
    let mut table = String::from("| kernel | cgroup v2 | result | time |\n|---|---|---|---|\n");
    for outcome in outcomes {
        let _ = writeln!(
            table,
            "| {} | {} | {} {} | {} s |",
            outcome.kernel,
            outcome.layout,
            if outcome.passed { "passed:" } else { "FAILED:" },
            outcome.summary,
            outcome.took.as_secs()
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_of_a_series_sorts_by_its_numbers() {
        let mut names = [
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-100-amd64-unsigned",
        ];
        names.sort_by_key(|name| version_key(name));
        assert_eq!(names[2], "linux-image-6.1.0-100-amd64-unsigned");
        assert_eq!(names[0], "linux-image-6.1.0-9-amd64-unsigned");
    }

    #[test]
    fn the_guest_script_runs_each_binary_and_reports_into_out() {
        let tests = [(
            PathBuf::from("/w/target/debug/deps/datapath-0123abcd"),
            &["a", "b"][..],
        )];
        let script = guest_script(&tests, Path::new("/w/target/vm/out/6.1"));
        assert!(script.contains(
            "if /w/target/debug/deps/datapath-0123abcd --exact --test-threads=1 a b > $out/datapath.log"
        ));
        assert!(script.contains("passed=$((passed + 2))"));
        assert!(script.contains("out=/w/target/vm/out/6.1"));
        assert!(script.ends_with("touch $out/done\n"));
    }
}
