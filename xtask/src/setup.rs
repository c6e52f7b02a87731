//! `cargo xtask setup`: installs and checks what building and running the project needs.
//! Idempotent and non-interactive (it runs in CI as root without a terminal).

use anyhow::{Context, Result, bail};
use std::process::{Command, Output, Stdio};
use ztunnel_common::cgroup2;

const DEBIAN_PACKAGES: [&str; 19] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "containernetworking-plugins",
    "iproute2",
    "iperf3",
    "tcpdump",
    // `ping`, for checking the lab's wiring by hand.
    "iputils-ping",
    // The tests read the metrics, admin and readiness endpoints as a scraper or probe does.
    "curl",
    // The iptables capture baseline the benchmark compares eBPF capture with.
    "iptables",
    // Looking at the pinned maps and programs by hand; a test freezes a map with it to make
    // the daemon's writes fail, as a full map would.
    "bpftool",
    // The font of `cargo xtask bench`'s chart.
    "fonts-dejavu-core",
    // Building jemalloc, the daemon's allocator (its build runs configure and make).
    "make",
    // `cargo xtask vm-test`: the virtual machine (emulated where KVM cannot run), the guest's
    // early userspace, and depmod for the kernels it unpacks.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    // `cargo xtask image`: the OCI layout and its layers; skopeo pushes or exports the image.
    "umoci",
    "skopeo",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
/// The Python `h2` package the independent HBONE peer (tests/hbone_peer) needs.
const PYTHON_H2: &str = "h2>=4,<5";
/// virtme-ng, which boots the kernels of `cargo xtask vm-test` over the host's own files.
const VIRTME_NG_VERSION: &str = "1.42";
/// kubernetes-validate, which `cargo xtask manifests` checks the rendered manifests with
/// (the API's schemas are in the package: no cluster, no network).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn run() -> Result<()> {
    build_tools()?;
    pip_package(PYTHON_H2, python_h2_importable)?;
    pip_package(
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
        virtme_ng_installed,
    )?;
    kubectl()?;
    pip_package(
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        kubernetes_validate_installed,
    )?;
    bpffs()?;
    cgroup2()?;
    println!("setup: done");
    Ok(())
}

/// What building the product and its fuzz targets needs (`cargo xtask fuzz` installs only
/// this): the Debian packages, the nightly toolchain with `rust-src` (the eBPF programs, and
/// cargo-fuzz's libFuzzer builds), `bpf-linker` and `cargo-fuzz`.
pub fn build_tools() -> Result<()> {
    debian_packages()?;
    nightly_toolchain()?;
    bpf_linker()?;
    cargo_fuzz()
}

fn step(name: &str, state: &str) {
    println!("setup: {name}: {state}");
}

/// Runs a command with no stdin; returns its output, failing only if it could not start.
fn output(command: &mut Command) -> std::io::Result<Output> {
    command.stdin(Stdio::null()).output()
}

/// Runs a command with no stdin and our stdout/stderr, failing unless it succeeds.
fn run_visibly(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("{what}: could not start it"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn debian_packages() -> Result<()> {
    const STEP: &str = "debian packages";
    let missing = missing_packages()?;
    if missing.is_empty() {
        step(STEP, "present");
        return Ok(());
    }
    step(STEP, &format!("installing {}...", missing.join(" ")));
    apt_install(&missing)?;
    let still_missing = missing_packages()?;
    if !still_missing.is_empty() {
        bail!(
            "apt-get reported success but these are still not installed: {}",
            still_missing.join(" ")
        );
    }
    step(STEP, "installed");
    Ok(())
}

/// `apt-get install` of `packages`, after refreshing the package lists.
fn apt_install(packages: &[&str]) -> Result<()> {
    run_visibly(
        Command::new("apt-get").arg("update"),
        "apt-get update (are you root, is the network up?)",
    )?;
    run_visibly(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(packages),
        &format!("apt-get install {} (are you root?)", packages.join(" ")),
    )
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        let query = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
            .context("running dpkg-query (setup supports Debian and its derivatives)")?;
        if String::from_utf8_lossy(&query.stdout).trim() != "install ok installed" {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// The nightly toolchain (the eBPF programs and the fuzz targets build with it) and its
/// `rust-src` (the eBPF programs build their own `core`), each installed when missing.
fn nightly_toolchain() -> Result<()> {
    const STEP: &str = "nightly toolchain with rust-src";
    let installed_components = || {
        output(Command::new("rustup").args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))
        .context("running rustup (install it from https://rustup.rs)")
    };
    let mut installed = installed_components()?;
    if !installed.status.success() {
        // rustup refuses to list the components of a toolchain it does not have.
        step(STEP, "no nightly toolchain; installing it with rustup...");
        run_visibly(
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
            "rustup toolchain install nightly (is the network up?)",
        )?;
        installed = installed_components()?;
        if !installed.status.success() {
            bail!(
                "rustup installed the nightly toolchain but cannot list its components: {}",
                String::from_utf8_lossy(&installed.stderr).trim()
            );
        }
    }
    let listed = String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|line| line.trim() == "rust-src" || line.starts_with("rust-src-"));
    if listed {
        step(STEP, "present");
        return Ok(());
    }
    step(STEP, "installing rust-src...");
    run_visibly(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )?;
    step(STEP, "installed");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let step_name = format!("bpf-linker {BPF_LINKER_VERSION}");
    if installed_bpf_linker().as_deref() == Some(BPF_LINKER_VERSION) {
        step(&step_name, "present");
        return Ok(());
    }
    step(
        &step_name,
        "installing with cargo install (builds against LLVM 22, takes about 4 minutes)...",
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_visibly(
        Command::new(cargo)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
        "cargo install bpf-linker",
    )?;
    match installed_bpf_linker() {
        Some(version) if version == BPF_LINKER_VERSION => {
            step(&step_name, "installed");
            Ok(())
        }
        found => bail!(
            "bpf-linker was installed but `bpf-linker --version` reports {found:?}: \
             put cargo's bin directory (usually ~/.cargo/bin) first in PATH"
        ),
    }
}

/// cargo-fuzz, which `cargo xtask fuzz` runs the fuzz targets with (on nightly): any version
/// already installed, else the pinned one.
fn cargo_fuzz() -> Result<()> {
    let step_name = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    let present = output(Command::new("cargo-fuzz").arg("--version"))
        .ok()
        .filter(|reported| reported.status.success());
    if let Some(reported) = present {
        let version = String::from_utf8_lossy(&reported.stdout);
        step("cargo-fuzz", &format!("present ({})", version.trim()));
        return Ok(());
    }
    step(&step_name, "installing with cargo install...");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_visibly(
        Command::new(cargo).args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ]),
        "cargo install cargo-fuzz",
    )?;
    step(&step_name, "installed");
    Ok(())
}

/// The version `bpf-linker --version` reports ("bpf-linker 0.13.0"), if it runs at all.
fn installed_bpf_linker() -> Option<String> {
    let reported = output(Command::new("bpf-linker").arg("--version")).ok()?;
    let text = String::from_utf8_lossy(&reported.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn is_mounted(target: &str, fstype: &str) -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(target) && fields.next() == Some(fstype)
    }))
}

fn bpffs() -> Result<()> {
    let step_name = format!("bpffs at {BPFFS}");
    if is_mounted(BPFFS, "bpf")? {
        step(&step_name, "present");
        return Ok(());
    }
    step(&step_name, "mounting...");
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    run_visibly(
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        "mount -t bpf (are you root?)",
    )?;
    step(&step_name, "mounted");
    Ok(())
}

/// cgroup v2, wherever the machine mounts it; on a machine with cgroup v1 alone, mounted where
/// systemd's hybrid layout puts it (beside the v1 controllers), or at `/sys/fs/cgroup` when
/// nothing is mounted there.
fn cgroup2() -> Result<()> {
    const STEP: &str = "cgroup2";
    if let Ok(found) = cgroup2::find() {
        step(STEP, &format!("present at {found}"));
        return Ok(());
    }
    let target = if is_mounted(cgroup2::UNIFIED_MOUNT, "tmpfs")? {
        cgroup2::HYBRID_MOUNT
    } else {
        cgroup2::UNIFIED_MOUNT
    };
    step(STEP, &format!("none mounted; mounting at {target}..."));
    std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    run_visibly(
        Command::new("mount").args(["-t", "cgroup2", "none", target]),
        "mount -t cgroup2 (are you root?)",
    )?;
    let found = cgroup2::find().context("cgroup2 is still not in the mount table")?;
    step(STEP, &format!("mounted at {found}"));
    Ok(())
}

/// Installs a Python package with pip unless `installed` says it is there.
fn pip_package(requirement: &str, installed: impl Fn() -> Result<bool>) -> Result<()> {
    let step_name = format!("python {requirement}");
    if installed()? {
        step(&step_name, "present");
        return Ok(());
    }
    step(&step_name, "installing with pip...");
    run_visibly(
        Command::new("python3").args(["-m", "pip", "install", "--quiet", requirement]),
        &format!("python3 -m pip install {requirement} (is pip installed, is the network up?)"),
    )?;
    if !installed()? {
        bail!("pip reported success but {requirement} is still not usable");
    }
    step(&step_name, "installed");
    Ok(())
}

/// kubectl, which renders the manifests (`kubectl kustomize`): any that runs, else Debian's
/// `kubernetes-client` (its kustomize renders `deploy/` as a newer kubectl does).
fn kubectl() -> Result<()> {
    const STEP: &str = "kubectl";
    let runs = || {
        output(Command::new("kubectl").args(["version", "--client"]))
            .is_ok_and(|reported| reported.status.success())
    };
    if runs() {
        step(STEP, "present");
        return Ok(());
    }
    step(STEP, "installing kubernetes-client...");
    apt_install(&["kubernetes-client"])?;
    if !runs() {
        bail!("kubernetes-client is installed but `kubectl version --client` fails");
    }
    step(STEP, "installed");
    Ok(())
}

/// kubernetes-validate, for `cargo xtask manifests`: the pinned version, run as python3 runs
/// it there?
fn kubernetes_validate_installed() -> Result<bool> {
    let reported = output(Command::new("python3").args(["-m", "kubernetes_validate", "--version"]))
        .context("running python3 (install it: `cargo xtask manifests` needs it)")?;
    Ok(String::from_utf8_lossy(&reported.stdout).trim() == KUBERNETES_VALIDATE_VERSION)
}

/// `h2`, for the independent HBONE peer (tests/hbone_peer): importable?
fn python_h2_importable() -> Result<bool> {
    let import = output(Command::new("python3").args(["-c", "import h2"]))
        .context("running python3 (install it: the HBONE peer in tests/hbone_peer needs it)")?;
    Ok(import.status.success())
}

/// virtme-ng, which `cargo xtask vm-test` boots kernels with: the pinned version on PATH?
fn virtme_ng_installed() -> Result<bool> {
    let reported = output(Command::new("vng").arg("--version"));
    Ok(reported.is_ok_and(|out| {
        String::from_utf8_lossy(&out.stdout).trim() == format!("virtme-ng {VIRTME_NG_VERSION}")
    }))
}
