//! `cargo xtask test`: the whole suite, as CI runs it.

use anyhow::{Result, bail};
use std::process::Command;
use ztunnel_lab::topology;

/// The crates whose tests need no lab (the eBPF crate only builds for the BPF target).
const HOST_CRATES: [&str; 6] = ["-p", "ztunnel-common", "-p", "ztunnel-user", "-p", "xtask"];

pub fn run() -> Result<()> {
    crate::setup::run()?;
    cargo("format check", &["fmt", "--all", "--check"])?;
    cargo(
        "clippy",
        &[
            "clippy",
            "--all-targets",
            "--features",
            "ztunnel-common/user",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    crate::lab::build_binaries(false)?;
    cargo(
        "unit and CNI plugin tests",
        &[
            &["test"][..],
            &HOST_CRATES,
            &["--features", "ztunnel-common/user"],
        ]
        .concat(),
    )?;
    // Each end-to-end test brings up its own lab in the same fixed namespaces: one at a time.
    let end_to_end = cargo(
        "end-to-end tests on the lab",
        &["test", "-p", "ztunnel-lab", "--", "--test-threads=1"],
    );
    // Whatever happened, leave the machine clean.
    let down = ztunnel_lab::down();
    end_to_end?;
    down?;
    println!("test: all suites passed");
    Ok(())
}

fn cargo(what: &str, args: &[&str]) -> Result<()> {
    println!("test: {what}: cargo {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(topology::workspace_root())
        .args(args)
        .status()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
