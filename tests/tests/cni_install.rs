//! `ztunnel install-cni` and `uninstall-cni` on the lab: the real binaries against a node's
//! network config directory (`/run/ztunnel-lab/<node>/`) and its own CNI bin dir, with pods
//! added through the CNI chain the way a container runtime does. Run serially
//! (`--test-threads=1`): every test brings up its own lab and tears it down.

mod support;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::Duration;
use support::*;
use ztunnel_lab::DaemonOptions;
use ztunnel_lab::topology::{self, EXCLUDED_NAMESPACES, NodeSpec};

const PLUGIN: &str = "ztunnel-cni";

fn node1() -> &'static NodeSpec {
    topology::node_spec("node1").unwrap()
}

/// `ztunnel <command>` for node1's directories, its daemon's socket and the lab's excluded
/// namespaces.
fn ztunnel(command: &str) -> Command {
    let node = node1();
    let binary = DaemonOptions::load()
        .unwrap()
        .daemon_binary("ztunnel")
        .unwrap();
    let mut ztunnel = Command::new(binary);
    ztunnel
        .arg(command)
        .arg("--cni-conf-dir")
        .arg(node.dir())
        .arg("--cni-bin-dir")
        .arg(node.cni_bin_dir());
    if command == "install-cni" {
        ztunnel
            .arg("--api-socket")
            .arg(node.api_socket())
            .arg("--exclude-namespace")
            .arg(EXCLUDED_NAMESPACES.join(","));
    }
    ztunnel
}

fn succeeded(output: Output) {
    assert!(
        output.status.success(),
        "{}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn plugin_types(conflist: &Path) -> Vec<String> {
    let list: Value = serde_json::from_slice(&std::fs::read(conflist).unwrap()).unwrap();
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|plugin| plugin["type"].as_str().unwrap().to_owned())
        .collect()
}

fn has_our_entry(conflist: &Path) -> bool {
    plugin_types(conflist).last().map(String::as_str) == Some(PLUGIN)
}

fn enrolled(s: &LabSession, pod: &str) -> bool {
    status(&s.lab, "node1").pods.iter().any(|p| p.name == pod)
}

/// Node1's network config as its network plugin wrote it, before any installer: ptp alone.
/// a2 goes first, so that it can come back through that config.
fn node_without_our_plugin(s: &LabSession) -> Vec<u8> {
    ztunnel_lab::cni_del("a2").expect("CNI DEL of a2");
    assert!(!enrolled(s, "a2"));
    let node = node1();
    ztunnel_lab::write_conflist(node, false).unwrap();
    assert_eq!(plugin_types(&node.conflist_path()), ["ptp"]);
    std::fs::read(node.conflist_path()).unwrap()
}

#[test]
fn installed_plugin_captures_new_pods_and_uninstall_restores_the_config() {
    let s = LabSession::start();
    let node = node1();
    let conflist = node.conflist_path();
    let original = node_without_our_plugin(&s);
    ztunnel_lab::cni_add("a2").expect("CNI ADD of a2 without ztunnel-cni");
    assert!(
        !enrolled(&s, "a2"),
        "nothing captures a pod before the install"
    );
    ztunnel_lab::cni_del("a2").unwrap();

    std::fs::create_dir_all(node.cni_bin_dir()).unwrap();
    succeeded(ztunnel("install-cni").arg("--once").output().unwrap());

    assert_eq!(plugin_types(&conflist), ["ptp", PLUGIN]);
    let built = DaemonOptions::load()
        .unwrap()
        .daemon_binary(PLUGIN)
        .unwrap();
    let installed = node.cni_bin_dir().join(PLUGIN);
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(built).unwrap()
    );
    // Pods now start through the installed plugin (the node's bin dir is searched first).
    let added = ztunnel_lab::cni_add("a2").expect("CNI ADD of a2 with ztunnel-cni");
    assert!(enrolled(&s, "a2"), "a2 ({}) is captured", added.ip);
    ztunnel_lab::cni_check("a2").expect("CNI CHECK of a2");
    // Installing again changes nothing.
    let before = std::fs::read(&conflist).unwrap();
    succeeded(ztunnel("install-cni").arg("--once").output().unwrap());
    assert_eq!(std::fs::read(&conflist).unwrap(), before);

    succeeded(ztunnel("uninstall-cni").output().unwrap());

    assert_eq!(
        std::fs::read(&conflist).unwrap(),
        original,
        "the network plugin's bytes, exactly"
    );
    assert!(!installed.exists(), "the plugin binary is gone");
    succeeded(ztunnel("uninstall-cni").output().unwrap());
    assert_eq!(std::fs::read(&conflist).unwrap(), original);
}

/// The watching installer, killed when the test ends however it ends.
struct Watching(Child);

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_watching_installer_puts_the_entry_back_and_leaves_it_when_stopped() {
    let s = LabSession::start();
    let node = node1();
    let conflist = node.conflist_path();
    let plain = node_without_our_plugin(&s);
    std::fs::create_dir_all(node.cni_bin_dir()).unwrap();
    let mut watching = Watching(ztunnel("install-cni").spawn().unwrap());
    eventually("the installer put its entry in", || {
        has_our_entry(&conflist)
    });

    // The network plugin replaces its config with its own version, without our entry.
    let replacement = node.dir().join("10-ztlab.conflist.new");
    std::fs::write(&replacement, &plain).unwrap();
    std::fs::rename(&replacement, &conflist).unwrap();
    assert!(!has_our_entry(&conflist));
    eventually_within("the entry is back", Duration::from_secs(5), || {
        has_our_entry(&conflist)
    });
    ztunnel_lab::cni_add("a2").expect("CNI ADD of a2");
    assert!(enrolled(&s, "a2"));

    let pid = Pid::from_raw(i32::try_from(watching.0.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let exit = watching.0.wait().unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        has_our_entry(&conflist),
        "the entry stays after SIGTERM, so pods keep starting captured"
    );
}
