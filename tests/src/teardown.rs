//! Removing everything the lab or the product created, whatever state a previous run left.
//! Only things named `ztlab-*` or `ztunnel-lab` are ever touched.

use crate::cgroup;
use crate::cni;
use crate::daemon::{self, is_alive, signal_and_wait};
use crate::error::{LabError, Result};
use crate::netns::{self, NetnsId};
use crate::topology::{BPFFS_ROOT, CGROUP_SUBTREE, NODES, PODS, STATE_DIR, cgroup_root};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(5);
const PROCESS_KILL_TIMEOUT: Duration = Duration::from_secs(5);
const CGROUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Tears the lab down and checks that nothing is left. Idempotent.
pub fn down() -> Result<()> {
    disenroll_pods();
    stop_daemons();
    if crate::istiod::stop_istiod()? {
        println!("down: stopped istiod");
    }
    kill_netns_processes();
    let cgroups = cgroup_root();
    if cgroups.is_dir() {
        cgroup::kill_all(&cgroups, PROCESS_KILL_TIMEOUT)?;
    }
    remove_pins()?;
    for name in netns::lab_namespaces() {
        netns::delete(&name)?;
        println!("down: deleted netns {name}");
    }
    let removed = cgroup::remove_tree(&cgroups, CGROUP_TIMEOUT)?;
    if !removed.is_empty() {
        println!(
            "down: removed {} cgroups under {}",
            removed.len(),
            cgroups.display()
        );
    }
    if Path::new(STATE_DIR).exists() {
        std::fs::remove_dir_all(STATE_DIR).map_err(|e| LabError::io("removing", STATE_DIR, e))?;
        println!("down: removed {STATE_DIR}");
    }
    let left = leftovers();
    if left.is_empty() {
        Ok(())
    } else {
        Err(LabError::Leftovers(left))
    }
}

/// Everything of the lab that still exists: netns, cgroups, bpffs pins, processes, state dir.
pub fn leftovers() -> Vec<String> {
    let mut left: Vec<String> = netns::lab_namespaces()
        .into_iter()
        .map(|name| format!("netns {name}"))
        .collect();
    left.extend(
        cgroup::tree(&cgroup_root())
            .into_iter()
            .map(|dir| format!("cgroup {}", dir.display())),
    );
    left.extend(
        walk(Path::new(BPFFS_ROOT))
            .into_iter()
            .map(|pin| format!("bpffs {}", pin.display())),
    );
    left.extend(
        lab_processes()
            .into_iter()
            .map(|pid| format!("process {pid} ({})", process_name(pid))),
    );
    if Path::new(STATE_DIR).exists() {
        left.push(format!("state dir {STATE_DIR}"));
    }
    left
}

/// Lets live daemons release their pods the normal way first. Best effort: whatever fails
/// is removed by force below.
fn disenroll_pods() {
    for pod in &PODS {
        if daemon::daemon_pid(pod.node.name).is_none() || !pod.netns_path().exists() {
            continue;
        }
        match cni::cni_del(pod.name) {
            Ok(()) => println!("down: CNI DEL pod {}", pod.name),
            Err(error) => println!(
                "down: CNI DEL pod {} failed, removing it by force: {error}",
                pod.name
            ),
        }
    }
}

fn stop_daemons() {
    for node in &NODES {
        let Some(pid) = daemon::daemon_pid(node.name) else {
            continue;
        };
        if signal_and_wait(pid, Signal::SIGTERM, DAEMON_STOP_TIMEOUT) {
            println!("down: stopped the {} daemon (pid {pid})", node.name);
        } else {
            signal_and_wait(pid, Signal::SIGKILL, DAEMON_STOP_TIMEOUT);
            println!(
                "down: killed the {} daemon (pid {pid}), it ignored SIGTERM",
                node.name
            );
        }
    }
}

/// Processes inside a lab namespace but outside the lab cgroups, e.g. `ip netns exec` shells.
fn kill_netns_processes() {
    let deadline = Instant::now() + PROCESS_KILL_TIMEOUT;
    loop {
        let pids = netns_processes();
        if pids.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in pids {
            println!("down: killing process {pid} ({})", process_name(pid));
            signal_and_wait(pid, Signal::SIGKILL, Duration::ZERO);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Unpinning is what detaches the daemons' links and frees their maps.
fn remove_pins() -> Result<()> {
    let pins = walk(Path::new(BPFFS_ROOT));
    if pins.is_empty() {
        return Ok(());
    }
    std::fs::remove_dir_all(BPFFS_ROOT).map_err(|e| LabError::io("removing", BPFFS_ROOT, e))?;
    println!(
        "down: removed {} bpffs entries under {BPFFS_ROOT}",
        pins.len()
    );
    Ok(())
}

/// `root` and everything below it (no symlinks followed).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            pending.extend(entries.flatten().map(|entry| entry.path()));
        }
        found.push(path);
    }
    found
}

fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|pid| *pid != std::process::id())
        .collect()
}

fn netns_processes() -> Vec<u32> {
    let lab: Vec<NetnsId> = netns::lab_namespaces()
        .iter()
        .filter_map(|name| NetnsId::of(&netns::path_of(name)))
        .collect();
    if lab.is_empty() {
        return Vec::new();
    }
    all_pids()
        .into_iter()
        .filter(|pid| {
            NetnsId::of(Path::new(&format!("/proc/{pid}/ns/net")))
                .is_some_and(|id| lab.contains(&id))
                && is_alive(*pid)
        })
        .collect()
}

/// Processes in a lab netns or a lab cgroup.
fn lab_processes() -> Vec<u32> {
    let cgroup_prefix = format!("0::{CGROUP_SUBTREE}");
    let mut pids: Vec<u32> = all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cgroups| {
                cgroups.lines().any(|line| {
                    line == cgroup_prefix || line.starts_with(&format!("{cgroup_prefix}/"))
                })
            }) && is_alive(*pid)
        })
        .collect();
    for pid in netns_processes() {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    pids
}

fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim().to_owned())
        .unwrap_or_else(|_| "gone".to_owned())
}
