//! `cargo xtask demo`: the product on the lab, start to finish.

use anyhow::Result;
use clap::Args;
use std::net::SocketAddrV4;
use std::time::Duration;
use ztunnel_lab::{ControlPlane, DaemonOptions, Lab, PodServer, istiod, send_from};

#[derive(Args)]
pub struct DemoArgs {
    /// Where the daemons take the mesh and their certificates from: the lab's mesh file and
    /// the built-in CA, or the lab's istiod (delta xDS and Istio's CA, serving the same file).
    #[arg(long, value_enum, default_value_t = ControlPlane::File)]
    control_plane: ControlPlane,
}

const APP_PORT: u16 = 8080;
const BYTES: u64 = 10 * 1024 * 1024;

/// (client, server, what it shows)
const TRANSFERS: [(&str, &str, &str); 4] = [
    (
        "a1",
        "b1",
        "cross node: captured, carried over HBONE (mTLS), delivered into b1",
    ),
    (
        "a1",
        "a2",
        "same node: captured, delivered straight into a2",
    ),
    ("u1", "b1", "unenrolled client to an enrolled pod"),
    (
        "a1",
        "u1",
        "enrolled client to a pod outside the mesh (plain TCP)",
    ),
];

pub fn run(args: &DemoArgs) -> Result<()> {
    crate::setup::run()?;
    crate::lab::build_binaries(false, false)?;
    let _lock = ztunnel_lab::LabLock::acquire("demo")?;
    let lab = ztunnel_lab::up_with(&DaemonOptions {
        control_plane: args.control_plane,
        ..DaemonOptions::default()
    })?;
    let shown = show(&lab).and_then(|()| match args.control_plane {
        ControlPlane::File => Ok(()),
        ControlPlane::Istiod => show_istiod(),
    });
    println!("\ndemo: tearing the lab down");
    let down = ztunnel_lab::down();
    shown?;
    down?;
    println!("demo: done");
    Ok(())
}

fn show(lab: &Lab) -> Result<()> {
    println!("\ndemo: servers on port {APP_PORT} in b1, a2 and u1");
    let _servers = ["b1", "a2", "u1"]
        .into_iter()
        .map(|pod| PodServer::start(pod, APP_PORT))
        .collect::<Result<Vec<_>, _>>()?;

    println!(
        "\ndemo: {} MiB per connection; the server reports the peer address it saw",
        BYTES >> 20
    );
    for (client, server, what) in TRANSFERS {
        let to = SocketAddrV4::new(lab.pod(server)?.ip, APP_PORT);
        let report = send_from(client, to, BYTES, None, Duration::from_secs(60))?;
        println!(
            "  {client} ({}) -> {server} {to}: {} bytes intact (sha256 {}…), server saw peer {}  [{what}]",
            lab.pod(client)?.ip,
            report.server.bytes,
            &report.sent_sha256[..16],
            report.server.peer
        );
    }

    for node in ["node1", "node2"] {
        println!("\ndemo: what the {node} daemon proxied (`ztunnel connections`)");
        ztunnel(node, &["connections"])?;
        println!("\ndemo: {node} readiness, pods and kernel counters (`ztunnel status`)");
        ztunnel(node, &["status"])?;
    }
    Ok(())
}

/// What istiod did: the certificates its CA signed, and the version of the mesh each node
/// has ACKed.
fn show_istiod() -> Result<()> {
    println!(
        "\ndemo: istiod's CA signed (from {})",
        istiod::log_path().display()
    );
    let log = std::fs::read_to_string(istiod::log_path())?;
    for line in log
        .lines()
        .filter(|line| line.contains("issued a certificate"))
    {
        println!(
            "  {}",
            line.split_once("INFO")
                .map_or(line, |(_, rest)| rest.trim())
        );
    }
    println!("\ndemo: the mesh file's version each node has ACKed from istiod");
    for (node, version) in istiod::synced_versions() {
        println!("  {node}: {version}");
    }
    Ok(())
}

/// Runs the `ztunnel` CLI against the node's daemon and shows what it printed.
fn ztunnel(node: &str, args: &[&str]) -> Result<()> {
    let output = ztunnel_lab::daemon_cli(node, args)?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    anyhow::ensure!(
        output.status.success(),
        "ztunnel {} on {node} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
