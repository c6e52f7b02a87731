//! `cargo xtask image`: the OCI image of `ztunnel` and `ztunnel-cni`, built from scratch and
//! offline (no base image to pull): the release binaries, the loader and libraries `ldd` says
//! they need, and a minimal /etc, in two layers assembled with GNU tar and umoci. Timestamps
//! come from `SOURCE_DATE_EPOCH` or the last commit, so the same tree gives the same digest.

use crate::vm::run_checked;
use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use ztunnel_lab::topology;

const BINARIES: [&str; 2] = ["ztunnel", "ztunnel-cni"];
const BIN_DIR: &str = "usr/local/bin";
const ENTRYPOINT: &str = "/usr/local/bin/ztunnel";
/// What the daemon's pod runs when its manifest names no command.
const CMD: &str = "run";
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
/// glibc's default without the file would try DNS before /etc/hosts.
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";

#[derive(Args)]
pub struct ImageArgs {
    /// The image's name in the OCI layout [default: ztunnel:<ztunnel-user's version>].
    #[arg(long)]
    tag: Option<String>,
    /// Where to build: the OCI layout goes to <OUTPUT>/oci [default: target/image].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Then check the image as `cargo xtask test` does: its config, and both binaries run
    /// under chroot into its unpacked root filesystem (needs root).
    #[arg(long)]
    check: bool,
}

/// A built image: its OCI layout, the name it has there, and the version it carries.
struct Image {
    layout: PathBuf,
    tag: String,
    version: String,
}

pub fn run(args: ImageArgs) -> Result<()> {
    let version = product_version()?;
    let tag = args.tag.unwrap_or_else(|| format!("ztunnel:{version}"));
    let output = args
        .output
        .unwrap_or_else(|| topology::workspace_root().join("target/image"));
    let image = build(&output, &tag, version)?;
    if args.check {
        verify(&image, &output)?;
    }
    let reference = format!("oci:{}:{}", image.layout.display(), image.tag);
    println!("image: push it with `skopeo copy {reference} docker://<registry>/{tag}`");
    println!(
        "image: or hand it to podman with `skopeo copy {reference} containers-storage:{tag}`, \
         to docker with `skopeo copy {reference} docker-archive:ztunnel.tar:{tag}` and \
         `docker load -i ztunnel.tar`"
    );
    Ok(())
}

/// `cargo xtask test`'s phase: builds the default image, then verifies it.
pub fn check() -> Result<()> {
    let version = product_version()?;
    let output = topology::workspace_root().join("target/image");
    let image = build(&output, &format!("ztunnel:{version}"), version)?;
    verify(&image, &output)
}

/// Checks the image as a runtime would see it: its config, both binaries in the unpacked root
/// filesystem, and each run confined to that filesystem (so the image must carry every library
/// they load). Podman cannot run containers on this machine (hybrid cgroups), chroot can.
fn verify(image: &Image, output: &Path) -> Result<()> {
    let (_, manifest) = manifest(image)?;
    let config = blob(&image.layout, &manifest["config"])?;
    config_problems(&config, &image.version)
        .map_or(Ok(()), |problems| bail!("the image's config: {problems}"))?;
    println!("image: config checked (entrypoint {ENTRYPOINT}, cmd {CMD}, version label)");

    let bundle = output.join("check-bundle");
    remove_if_present(&bundle)?;
    let reference = format!("{}:{}", image.layout.display(), image.tag);
    run_checked(
        Command::new("umoci")
            .args(["unpack", "--image", &reference])
            .arg(&bundle),
        "umoci unpack",
    )?;
    let checked = run_confined(&bundle.join("rootfs"), &image.version);
    remove_if_present(&bundle)?;
    checked
}

/// Each binary of the unpacked image is executable and runs under `chroot` into it.
fn run_confined(rootfs: &Path, version: &str) -> Result<()> {
    for binary in BINARIES {
        let path = rootfs.join(BIN_DIR).join(binary);
        let mode = std::fs::metadata(&path)
            .with_context(|| format!("the image has no /{BIN_DIR}/{binary}"))?
            .permissions()
            .mode();
        ensure!(
            mode & 0o111 == 0o111,
            "/{BIN_DIR}/{binary} is not executable (mode {mode:o})"
        );
    }
    let reported = confined(rootfs, &["/usr/local/bin/ztunnel", "--version"], &[])?;
    ensure!(
        reported.trim() == format!("ztunnel {version}"),
        "`ztunnel --version` in the image printed {reported:?}, not \"ztunnel {version}\""
    );
    println!(
        "image: chroot rootfs {ENTRYPOINT} --version: {}",
        reported.trim()
    );
    // The CNI protocol's VERSION command needs no pod, no config and no daemon.
    let reported = confined(
        rootfs,
        &["/usr/local/bin/ztunnel-cni"],
        &[("CNI_COMMAND", "VERSION")],
    )?;
    let versions: Value = serde_json::from_str(&reported)
        .with_context(|| format!("ztunnel-cni's VERSION output is not JSON: {reported:?}"))?;
    ensure!(
        versions["supportedVersions"].is_array(),
        "ztunnel-cni's VERSION output has no supportedVersions: {reported}"
    );
    println!(
        "image: chroot rootfs /usr/local/bin/ztunnel-cni (CNI_COMMAND=VERSION): {}",
        reported.trim()
    );
    Ok(())
}

/// Runs `argv` under `chroot` into `rootfs` with `env` added; returns its stdout.
fn confined(rootfs: &Path, argv: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let output = Command::new("chroot")
        .arg(rootfs)
        .args(argv)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .context("running chroot (the check runs as root)")?;
    ensure!(
        output.status.success(),
        "`{}` in the image failed ({}): {}",
        argv.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8(output.stdout).context("the output is not UTF-8")
}

/// Builds the release binaries and the image `tag` in `<output>/oci`, replacing what was there.
fn build(output: &Path, tag: &str, version: String) -> Result<Image> {
    for (tool, package) in [("umoci", "umoci"), ("tar", "tar"), ("ldd", "libc-bin")] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        ensure!(
            found,
            "{tool} not found: run `cargo xtask setup` (it installs {package})"
        );
    }
    let root = topology::workspace_root();
    let args = ["build", "--release", "-p", "ztunnel-user", "--bins"];
    println!("image: cargo {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(args)
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "building the release binaries failed ({status})"
    );
    let binaries = BINARIES.map(|name| root.join("target/release").join(name));

    let epoch = source_date_epoch(&root)?;
    let created = rfc3339(epoch);
    let work = output.join("work");
    remove_if_present(&work)?;
    let runtime = work.join("runtime");
    let product = work.join("ztunnel");
    let mut libraries = BTreeSet::new();
    for binary in &binaries {
        libraries.extend(needed_libraries(binary)?);
    }
    stage_runtime(&runtime, &libraries)?;
    stage_product(&product, &binaries)?;

    let layout = output.join("oci");
    remove_if_present(&layout)?;
    let reference = format!("{}:{tag}", layout.display());
    println!("image: {} (created {created})", layout.display());
    run_checked(
        Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout),
        "umoci init",
    )?;
    run_checked(
        Command::new("umoci").args(["new", "--image", &reference]),
        "umoci new",
    )?;
    let layers = [
        (&runtime, "the dynamic loader, libraries and /etc"),
        (&product, "ztunnel and ztunnel-cni"),
    ];
    for (staged, what) in layers {
        let archive = staged.with_extension("tar");
        tar(staged, &archive, epoch)?;
        run_checked(
            Command::new("umoci")
                .args(["raw", "add-layer", "--image", &reference])
                .args(["--history.created", &created])
                .args(["--history.created_by", "cargo xtask image"])
                .args(["--history.comment", what])
                .arg(&archive),
            "umoci raw add-layer",
        )?;
        println!("image: layer added: {what}");
    }
    run_checked(
        Command::new("umoci")
            .args(["config", "--image", &reference])
            .args(config_args(&version, &created)),
        "umoci config",
    )?;
    // Each step above left a superseded manifest and config behind.
    run_checked(
        Command::new("umoci").args(["gc", "--layout"]).arg(&layout),
        "umoci gc",
    )?;
    remove_if_present(&work)?;

    let image = Image {
        layout,
        tag: tag.to_owned(),
        version,
    };
    summarize(&image)?;
    Ok(image)
}

/// `umoci config`'s arguments: how the image runs, and what it is.
fn config_args(version: &str, created: &str) -> Vec<String> {
    let label =
        |name: &str, value: &str| format!("--config.label=org.opencontainers.image.{name}={value}");
    vec![
        format!("--config.entrypoint={ENTRYPOINT}"),
        format!("--config.cmd={CMD}"),
        // For `kubectl exec <pod> -- ztunnel <operator command>`.
        "--config.env=PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
        "--config.workingdir=/".to_owned(),
        label("title", "ztunnel"),
        label("version", version),
        label("licenses", "Apache-2.0"),
        label("created", created),
        "--author=the ztunnel developers".to_owned(),
        format!("--created={created}"),
        format!("--history.created={created}"),
        "--history.created_by=cargo xtask image".to_owned(),
    ]
}

/// What is wrong with the image's config for a daemon of `version`, if anything.
fn config_problems(config: &Value, version: &str) -> Option<String> {
    let mut problems = Vec::new();
    let runs = &config["config"];
    if runs["Entrypoint"] != serde_json::json!([ENTRYPOINT]) {
        problems.push(format!(
            "entrypoint is {}, not [{ENTRYPOINT:?}]",
            runs["Entrypoint"]
        ));
    }
    if runs["Cmd"] != serde_json::json!([CMD]) {
        problems.push(format!("cmd is {}, not [{CMD:?}]", runs["Cmd"]));
    }
    let label = &runs["Labels"]["org.opencontainers.image.version"];
    if label != version {
        problems.push(format!("version label is {label}, not {version:?}"));
    }
    for (field, expected) in [("os", "linux"), ("architecture", "amd64")] {
        if config[field] != expected {
            problems.push(format!("{field} is {}, not {expected:?}", config[field]));
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// The loader and libraries `ldd` lists for `binary`, each where the loader looks for it.
fn needed_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .context("running ldd")?;
    ensure!(
        output.status.success(),
        "ldd {} failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("the libraries of {}", binary.display()))
}

/// The paths in `ldd`'s output: `name => /path (address)` for a library, `/path (address)` for
/// the loader; the kernel's vDSO has no file and is left out.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in output
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        let resolved = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("{} not found on this machine", name.trim());
                }
                rest
            }
            None => line,
        };
        match resolved.split_whitespace().next() {
            Some(path) if path.starts_with('/') => paths.push(PathBuf::from(path)),
            // linux-vdso.so.1, or "statically linked".
            _ => {}
        }
    }
    Ok(paths)
}

/// The first layer: the loader and libraries, a minimal /etc and /tmp.
fn stage_runtime(dir: &Path, libraries: &BTreeSet<PathBuf>) -> Result<()> {
    for library in libraries {
        let relative = library.strip_prefix("/").unwrap_or(library);
        copy_executable(library, dir, relative)?;
    }
    make_dir(dir, Path::new("etc"))?;
    for (name, text) in [
        ("passwd", PASSWD),
        ("group", GROUP),
        ("nsswitch.conf", NSSWITCH),
    ] {
        let path = dir.join("etc").join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        set_mode(&path, 0o644)?;
    }
    make_dir(dir, Path::new("tmp"))?;
    set_mode(&dir.join("tmp"), 0o1777)
}

/// The second layer: the binaries.
fn stage_product(dir: &Path, binaries: &[PathBuf]) -> Result<()> {
    for binary in binaries {
        let name = binary.file_name().context("a binary has no file name")?;
        copy_executable(binary, dir, &Path::new(BIN_DIR).join(name))?;
    }
    Ok(())
}

/// Copies `source` (following links) to `<dir>/<relative>`, mode 0755.
fn copy_executable(source: &Path, dir: &Path, relative: &Path) -> Result<()> {
    if let Some(parent) = relative.parent() {
        make_dir(dir, parent)?;
    }
    let target = dir.join(relative);
    std::fs::copy(source, &target)
        .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
    set_mode(&target, 0o755)
}

/// Creates `<dir>/<relative>` and each directory on the way, mode 0755 whatever the umask.
fn make_dir(dir: &Path, relative: &Path) -> Result<()> {
    let mut path = dir.to_path_buf();
    set_mode_if_created(&path)?;
    for component in relative.components() {
        path.push(component);
        set_mode_if_created(&path)?;
    }
    Ok(())
}

fn set_mode_if_created(path: &Path) -> Result<()> {
    if !path.is_dir() {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        set_mode(path, 0o755)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Archives `dir`'s contents as a layer: sorted, owned by root, every time `epoch`.
fn tar(dir: &Path, archive: &Path, epoch: u64) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    run_checked(
        Command::new("tar")
            .arg("--create")
            .arg("--file")
            .arg(archive)
            .arg("--directory")
            .arg(dir)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{epoch}"))
            // GNU headers carry no access or change times, which differ from run to run.
            .arg("--format=gnu")
            .args(entries),
        "tar",
    )
}

/// `SOURCE_DATE_EPOCH` if set (the reproducible-builds convention), else the last commit's
/// time, else (a copy of the tree outside git) 1970-01-01, as distroless images have.
fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        return value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"));
    }
    let last_commit = Command::new("git")
        .current_dir(root)
        .args(["log", "-1", "--format=%ct"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok());
    if last_commit.is_none() {
        println!("image: no git history here and no SOURCE_DATE_EPOCH: dating the image 1970");
    }
    Ok(last_commit.unwrap_or(0))
}

/// `epoch` as RFC 3339 (what OCI configs use), from bench's compact UTC timestamp.
fn rfc3339(epoch: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    let compact = crate::bench::utc_timestamp(time);
    // "YYYY-MM-DDTHHMMSSZ": separate hours, minutes and seconds.
    format!("{}:{}:{}", &compact[..13], &compact[13..15], &compact[15..])
}

/// ztunnel-user's version, which its binaries report.
fn product_version() -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(topology::workspace_root())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stdin(Stdio::null())
        .output()
        .context("running cargo metadata")?;
    ensure!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let metadata: Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata's output")?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "ztunnel-user")
        .and_then(|package| package["version"].as_str())
        .map(str::to_owned)
        .context("cargo metadata lists no ztunnel-user with a version")
}

/// The digest and content of the manifest `image.tag` names in the layout's index.
fn manifest(image: &Image) -> Result<(String, Value)> {
    let path = image.layout.join("index.json");
    let index: Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let descriptor = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|entry| {
            entry["annotations"]["org.opencontainers.image.ref.name"] == image.tag.as_str()
        })
        .with_context(|| format!("{} names no {}", path.display(), image.tag))?;
    let digest = descriptor["digest"].as_str().unwrap_or_default().to_owned();
    Ok((digest, blob(&image.layout, descriptor)?))
}

/// The JSON blob a descriptor points at.
fn blob(layout: &Path, descriptor: &Value) -> Result<Value> {
    let digest = descriptor["digest"]
        .as_str()
        .context("a descriptor has no digest")?;
    let path = layout.join("blobs").join(digest.replacen(':', "/", 1));
    serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))
}

/// Prints the image's digest, its layers and its size as a registry stores it (compressed).
fn summarize(image: &Image) -> Result<()> {
    let (digest, manifest) = manifest(image)?;
    let mut total = manifest["config"]["size"].as_u64().unwrap_or(0);
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let size = layer["size"].as_u64().unwrap_or(0);
        total += size;
        println!(
            "image: layer {} ({:.1} MB compressed)",
            layer["digest"].as_str().unwrap_or("?"),
            megabytes(size)
        );
    }
    println!(
        "image: {} {digest}, {:.1} MB compressed",
        image.tag,
        megabytes(total)
    );
    Ok(())
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_loader_and_libraries() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd5a1f2000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007fa010ea1000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fa00f41e000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007fa010ed7000)\n";
        let paths = parse_ldd(output).unwrap();
        assert_eq!(
            paths,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn a_missing_library_is_an_error() {
        let output = "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        let error = parse_ldd(output).unwrap_err().to_string();
        assert!(error.contains("libfoo.so.1"), "{error}");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
    }

    /// The config `umoci config` writes from `config_args` passes the check, and a config that
    /// runs something else does not.
    #[test]
    fn config_is_checked() {
        let args = config_args("1.2.3", "2024-02-29T23:59:59Z");
        assert!(args.contains(&format!("--config.entrypoint={ENTRYPOINT}")));
        assert!(args.contains(&"--config.label=org.opencontainers.image.version=1.2.3".to_owned()));
        let mut config = serde_json::json!({
            "os": "linux",
            "architecture": "amd64",
            "config": {
                "Entrypoint": [ENTRYPOINT],
                "Cmd": [CMD],
                "Labels": {"org.opencontainers.image.version": "1.2.3"},
            },
        });
        assert_eq!(config_problems(&config, "1.2.3"), None);
        let problems = config_problems(&config, "1.2.4").unwrap();
        assert!(problems.contains("version label"), "{problems}");
        config["config"]["Entrypoint"] = serde_json::json!(["/bin/sh"]);
        let problems = config_problems(&config, "1.2.3").unwrap();
        assert!(
            problems.starts_with("entrypoint is [\"/bin/sh\"]"),
            "{problems}"
        );
    }
}
