//! `cargo xtask lab ...`: drives the lab library.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};
use ztunnel_lab::topology;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Tear down any previous lab, then create nodes, daemons and pods from scratch.
    Up {
        /// Use the binaries already built instead of running `cargo build` first.
        #[arg(long)]
        no_build: bool,
        /// A plain pod network without ztunnel (no daemons, no ztunnel-cni plugin): a baseline
        /// for measurements and for debugging the wiring.
        #[arg(long, conflicts_with = "control_plane")]
        without_ztunnel: bool,
        /// Where the daemons take the mesh and their certificates from: the lab's mesh file
        /// and the built-in CA, or the lab's istiod (a fake one serving the same file over
        /// delta xDS, with Istio's CA).
        #[arg(long, value_enum, default_value_t = ztunnel_lab::ControlPlane::File)]
        control_plane: ztunnel_lab::ControlPlane,
        /// Enroll pods as the DaemonSet does, by the label `istio.io/dataplane-mode=ambient` of
        /// their namespace in a Kubernetes API: `fake` runs the lab's own API server (node1,
        /// port 6443), which holds the lab's namespaces, none labelled, and pods.
        #[arg(long, value_enum, conflicts_with = "without_ztunnel")]
        kube: Option<KubeApi>,
    },
    /// Remove everything the lab and ztunnel created (also after a crashed or killed run).
    Down,
    /// Show nodes, pods, daemons and what each daemon reports.
    Status,
    /// Run a command inside a pod (its netns and cgroup) or a node, e.g. `lab exec a1 -- ping 10.244.2.2`.
    Exec {
        /// Pod (a1, a2, b1, u1) or node (node1, node2).
        target: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// The Kubernetes API a lab's daemons read.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KubeApi {
    /// The lab's fake API server (`fake-kube-apiserver`).
    Fake,
}

pub fn run(command: LabCommand) -> Result<ExitCode> {
    match command {
        LabCommand::Up {
            no_build,
            without_ztunnel,
            control_plane,
            kube,
        } => {
            if !no_build {
                build_binaries(without_ztunnel, false)?;
            }
            // Held while the lab is built: it stays up after, for whoever comes next.
            let _lock = ztunnel_lab::LabLock::acquire("lab up")?;
            if without_ztunnel {
                ztunnel_lab::up_without_ztunnel()?;
            } else {
                ztunnel_lab::up_with(&ztunnel_lab::DaemonOptions {
                    control_plane,
                    kubernetes: kube.is_some(),
                    ..ztunnel_lab::DaemonOptions::default()
                })?;
            }
        }
        LabCommand::Down => {
            let _lock = ztunnel_lab::LabLock::acquire("lab down")?;
            ztunnel_lab::down()?;
            println!("down: nothing of the lab is left");
        }
        LabCommand::Status => ztunnel_lab::status()?,
        LabCommand::Exec { target, command } => return exec(&target, &command),
    }
    Ok(ExitCode::SUCCESS)
}

/// The binaries `up` runs. A plain-network lab needs no ztunnel, so it also needs no eBPF
/// toolchain.
/// `release` builds the optimized binaries (for benchmarks) instead of the debug ones.
pub fn build_binaries(without_ztunnel: bool, release: bool) -> Result<()> {
    let mut args = vec!["build", "-p", "ztunnel-lab"];
    if !without_ztunnel {
        args.extend([
            "-p",
            "ztunnel-user",
            "-p",
            "fake-istiod",
            "-p",
            "fake-kube-apiserver",
        ]);
    }
    args.push("--bins");
    if release {
        args.push("--release");
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(topology::workspace_root())
        .args(&args)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the lab's binaries failed ({status})");
    }
    Ok(())
}

/// Runs interactively with our stdio and exits with the command's status (128 + signal if it
/// was killed, as shells report it).
fn exec(target: &str, argv: &[String]) -> Result<ExitCode> {
    let mut command = if topology::pod_spec(target).is_ok() {
        ztunnel_lab::exec(target, argv)?
    } else {
        ztunnel_lab::exec_node(target, argv)?
    };
    let status = command
        .status()
        .with_context(|| format!("running {:?} in {target}", argv.join(" ")))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
