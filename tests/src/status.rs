//! `status`: what the lab looks like right now, for people.

use crate::daemon;
use crate::error::Result;
use crate::state::{Lab, state_path};
use crate::teardown::leftovers;

/// Prints nodes, pods and, for each live daemon, its own `ztunnel status`.
pub fn status() -> Result<()> {
    if !state_path().exists() {
        let left = leftovers();
        if left.is_empty() {
            println!("lab is down");
        } else {
            println!("lab is down but left these behind (run `cargo xtask lab down`):");
            for thing in left {
                println!("  {thing}");
            }
        }
        return Ok(());
    }
    let lab = Lab::load()?;
    println!(
        "lab is up ({}), state {}",
        if lab.with_ztunnel {
            "with ztunnel"
        } else {
            "plain network, no ztunnel"
        },
        state_path().display()
    );
    if lab.with_ztunnel {
        println!(
            "mesh config {} (every node's daemon runs from it)",
            crate::topology::MESH_CONFIG
        );
    }
    println!();
    for node in &lab.nodes {
        let daemon = match daemon::daemon_pid(&node.name) {
            Some(pid) => format!("running, pid {pid}"),
            None if lab.with_ztunnel => "NOT RUNNING".to_owned(),
            None => "none".to_owned(),
        };
        println!("node {}", node.name);
        println!("  netns      {}", node.netns.display());
        println!("  underlay   {}", node.underlay_ip);
        println!("  pods       {}", node.pod_subnet);
        println!("  daemon     {daemon}");
        println!("  api socket {}", node.api_socket.display());
        println!("  log        {}", node.log.display());
        println!("  conflist   {}", node.conflist.display());
    }
    println!();
    println!(
        "{:<5} {:<6} {:<10} {:<15} {:<20} CAPTURE",
        "POD", "NODE", "NAMESPACE", "IP", "IPV6"
    );
    for pod in &lab.pods {
        let capture = if pod.captured {
            "enrolled by ztunnel-cni".to_owned()
        } else if lab.with_ztunnel {
            format!("excluded (namespace {})", pod.namespace)
        } else {
            "none".to_owned()
        };
        let ip6 = pod.ip6.map(|ip| ip.to_string()).unwrap_or_default();
        println!(
            "{:<5} {:<6} {:<10} {:<15} {ip6:<20} {capture}",
            pod.name, pod.node, pod.namespace, pod.ip
        );
    }
    for node in &lab.nodes {
        if daemon::daemon_pid(&node.name).is_none() {
            continue;
        }
        println!();
        println!("--- ztunnel status of {} ---", node.name);
        match daemon::daemon_status(&node.name) {
            Ok(output) => {
                print!("{}", String::from_utf8_lossy(&output.stdout));
                print!("{}", String::from_utf8_lossy(&output.stderr));
            }
            Err(error) => println!("{error}"),
        }
    }
    Ok(())
}
