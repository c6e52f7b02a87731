//! `ztunnel run`'s settings from the environment, as a DaemonSet's `env` gives them. A test
//! binary of its own with one test: it changes this process's environment, which no other
//! thread may read meanwhile.

use clap::Parser;
use ipnet::IpNet;
use std::path::PathBuf;
use ztunnel_user::settings::{CaptureMode, Settings};

#[derive(Parser)]
struct Run {
    #[command(flatten)]
    settings: Settings,
}

#[test]
fn every_setting_can_come_from_the_environment_and_a_flag_wins() {
    let environment = [
        ("NODE_NAME", "node7"),
        ("TRUST_DOMAIN", "example.org"),
        ("PACKET_MARK", "4242"),
        ("LOCAL_XDS_PATH", "/etc/ztunnel/mesh.yaml"),
        ("ZTUNNEL_CAPTURE", "iptables"),
        ("ZTUNNEL_EXCLUDE_CIDRS", "10.96.0.1/32,fd00::1/128"),
        ("ZTUNNEL_DRAIN_TIMEOUT_SECS", "7"),
    ];
    for (name, value) in environment {
        // SAFETY: this test binary runs this one test; no other thread reads the environment.
        unsafe { std::env::set_var(name, value) };
    }
    let settings = Run::try_parse_from(["ztunnel", "--drain-timeout-secs", "3"])
        .unwrap()
        .settings;
    assert_eq!(settings.node, "node7");
    assert_eq!(settings.trust_domain, "example.org");
    assert_eq!(settings.mark, 4242);
    assert_eq!(
        settings.config,
        Some(PathBuf::from("/etc/ztunnel/mesh.yaml"))
    );
    assert_eq!(settings.capture, CaptureMode::Iptables);
    let cidrs: Vec<IpNet> = vec![
        "10.96.0.1/32".parse().unwrap(),
        "fd00::1/128".parse().unwrap(),
    ];
    assert_eq!(settings.exclude_cidrs, cidrs);
    assert_eq!(
        settings.drain_timeout_secs, 3,
        "the flag wins over the variable"
    );

    // SAFETY: as above.
    unsafe { std::env::set_var("PACKET_MARK", "not-a-number") };
    let err = Run::try_parse_from(["ztunnel"]).err().expect("refused");
    assert!(err.to_string().contains("not-a-number"), "{err}");
}
