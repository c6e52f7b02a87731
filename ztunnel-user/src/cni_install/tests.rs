use super::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use tempfile::TempDir;

/// A primary CNI's list as an operator might have written it: tabs, odd spacing, keys in no
/// sorted order, no final newline.
const PTP_LIST: &str = "{\n\t\"name\":  \"k8s-pod-network\", \"cniVersion\":\"1.0.0\",\n  \"plugins\": [ {\"type\": \"ptp\", \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.244.1.0/24\"}, \"ipMasq\": false},\n{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}\n]}";
const BRIDGE_CONF: &str = "{ \"type\": \"bridge\", \"name\": \"mynet\", \"cniVersion\": \"0.4.0\",\n  \"bridge\": \"cni0\", \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\"} }\n";

fn entry(timeout: u64) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "apiSocket": "/var/run/ztunnel/api.sock",
        "excludeNamespaces": ["kube-system"],
        "timeoutSeconds": timeout,
    })
}

fn conf_dir(files: &[(&str, &str)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn plugin_types(list: &Value) -> Vec<&str> {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|plugin| plugin["type"].as_str().unwrap())
        .collect()
}

fn keys(object: &Value) -> Vec<&str> {
    object
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

#[test]
fn the_entry_goes_last_in_the_list_and_every_other_key_keeps_its_order() {
    let dir = conf_dir(&[("10-ptp.conflist", PTP_LIST)]);
    let path = dir.path().join("10-ptp.conflist");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let installer = Installer::new(dir.path(), entry(30));

    assert_eq!(installer.insert().unwrap(), Outcome::Inserted);

    let list = read_json(&path);
    assert_eq!(plugin_types(&list), ["ptp", "portmap", PLUGIN_TYPE]);
    assert_eq!(list["plugins"][2], entry(30));
    assert_eq!(keys(&list), ["name", "cniVersion", "plugins"]);
    assert_eq!(keys(&list["plugins"][0]), ["type", "ipam", "ipMasq"]);
    let mut original: Value = serde_json::from_str(PTP_LIST).unwrap();
    original["plugins"].as_array_mut().unwrap().push(entry(30));
    assert_eq!(list, original, "nothing else changed");
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("{\n  \"name\": \"k8s-pod-network\",\n"),
        "{text}"
    );
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "the file keeps its permissions");
}

#[test]
fn a_single_plugin_config_becomes_a_list_under_the_conflist_name() {
    let dir = conf_dir(&[("10-bridge.conf", BRIDGE_CONF)]);
    let installer = Installer::new(dir.path(), entry(30));

    assert_eq!(installer.insert().unwrap(), Outcome::Converted);

    assert!(!dir.path().join("10-bridge.conf").exists());
    let list = read_json(&dir.path().join("10-bridge.conflist"));
    assert_eq!(keys(&list), ["cniVersion", "name", "plugins"]);
    assert_eq!(
        (&list["cniVersion"], &list["name"]),
        (&json!("0.4.0"), &json!("mynet"))
    );
    let bridge: Value = serde_json::from_str(BRIDGE_CONF).unwrap();
    assert_eq!(list["plugins"], json!([bridge, entry(30)]));
    assert_eq!(installer.insert().unwrap(), Outcome::Unchanged);
}

#[test]
fn inserting_again_with_the_same_settings_writes_nothing() {
    let dir = conf_dir(&[("10-ptp.conflist", PTP_LIST)]);
    let path = dir.path().join("10-ptp.conflist");
    let installer = Installer::new(dir.path(), entry(30));
    installer.insert().unwrap();
    let before = fs::metadata(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));

    assert_eq!(installer.insert().unwrap(), Outcome::Unchanged);

    let after = fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec()),
        (before.ino(), before.mtime(), before.mtime_nsec())
    );
}

#[test]
fn other_settings_replace_the_entry_in_place_and_the_original_is_kept() {
    let dir = conf_dir(&[("10-ptp.conflist", PTP_LIST)]);
    let path = dir.path().join("10-ptp.conflist");
    Installer::new(dir.path(), entry(30)).insert().unwrap();
    // The network plugin appended one of its own after ours.
    let mut list = read_json(&path);
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "bandwidth"}));
    fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();

    let installer = Installer::new(dir.path(), entry(5));
    assert_eq!(installer.insert().unwrap(), Outcome::Replaced);

    let list = read_json(&path);
    assert_eq!(
        plugin_types(&list),
        ["ptp", "portmap", PLUGIN_TYPE, "bandwidth"]
    );
    assert_eq!(list["plugins"][2], entry(5));
    let kept = Backups::in_conf_dir(dir.path());
    let original = kept.get(OsStr::new("10-ptp.conflist")).unwrap().unwrap();
    assert_eq!(
        original.bytes,
        PTP_LIST.as_bytes(),
        "the backup is still the original"
    );
}

#[test]
fn uninstall_restores_the_original_bytes_and_name() {
    let dir = conf_dir(&[
        ("10-ptp.conflist", PTP_LIST),
        ("20-bridge.conf", BRIDGE_CONF),
    ]);
    let installer = Installer::new(dir.path(), entry(30));
    installer.insert().unwrap();
    // Another config becomes the first: it gets the entry too, then other settings.
    fs::rename(
        dir.path().join("20-bridge.conf"),
        dir.path().join("05-bridge.conf"),
    )
    .unwrap();
    assert_eq!(installer.insert().unwrap(), Outcome::Converted);
    Installer::new(dir.path(), entry(9)).insert().unwrap();

    Installer::remove_entries(dir.path()).unwrap();

    let restored = fs::read(dir.path().join("10-ptp.conflist")).unwrap();
    assert_eq!(String::from_utf8(restored).unwrap(), PTP_LIST);
    let restored = fs::read(dir.path().join("05-bridge.conf")).unwrap();
    assert_eq!(String::from_utf8(restored).unwrap(), BRIDGE_CONF);
    let mut left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["05-bridge.conf", "10-ptp.conflist"],
        "no list, backup or temp file left"
    );
}

#[test]
fn uninstall_after_the_network_plugin_rewrote_its_config_removes_only_the_entry() {
    let dir = conf_dir(&[("10-ptp.conflist", PTP_LIST)]);
    let path = dir.path().join("10-ptp.conflist");
    Installer::new(dir.path(), entry(30)).insert().unwrap();
    let mut list = read_json(&path);
    list["plugins"][0]["ipMasq"] = json!(true);
    fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();

    Installer::remove_entries(dir.path()).unwrap();

    let after = read_json(&path);
    assert_eq!(plugin_types(&after), ["ptp", "portmap"]);
    assert_eq!(
        after["plugins"][0]["ipMasq"],
        json!(true),
        "its change stays"
    );
    assert!(!dir.path().join(".ztunnel-cni-backup").exists());
}

#[test]
fn uninstall_is_idempotent_and_leaves_configs_without_the_entry_alone() {
    let dir = conf_dir(&[("10-ptp.conflist", PTP_LIST), ("99-broken.conf", "{")]);
    Installer::remove_entries(dir.path()).unwrap();
    Installer::remove_entries(dir.path()).unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("10-ptp.conflist")).unwrap(),
        PTP_LIST
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("99-broken.conf")).unwrap(),
        "{"
    );
}

#[test]
fn the_runtimes_choice_is_the_first_config_by_name() {
    let dir = conf_dir(&[
        ("20-ptp.conflist", PTP_LIST),
        ("10-notes.txt", "not a config"),
        ("30-bridge.conf", BRIDGE_CONF),
    ]);
    // A directory with a config's name is no config.
    fs::create_dir(dir.path().join("00-dir.conflist")).unwrap();
    let installer = Installer::new(dir.path(), entry(30));
    installer.insert().unwrap();
    assert_eq!(
        plugin_types(&read_json(&dir.path().join("20-ptp.conflist")))[2],
        PLUGIN_TYPE
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("30-bridge.conf")).unwrap(),
        BRIDGE_CONF
    );

    fs::write(dir.path().join("15-new.json"), BRIDGE_CONF).unwrap();
    assert_eq!(installer.insert().unwrap(), Outcome::Converted);
    assert_eq!(
        plugin_types(&read_json(&dir.path().join("15-new.conflist"))),
        ["bridge", PLUGIN_TYPE]
    );
}

#[test]
fn bad_configs_are_named_and_left_as_they_are() {
    let installer = |dir: &TempDir| Installer::new(dir.path(), entry(30));
    let empty = conf_dir(&[]);
    let err = installer(&empty).insert().unwrap_err();
    assert!(matches!(err, InstallError::NoConfig { .. }), "{err}");

    for (name, text, expected) in [
        ("10-a.conflist", "{\"plugins\": [", "is not valid JSON"),
        ("10-a.conflist", "[1, 2]", "it is not a JSON object"),
        (
            "10-a.conflist",
            "{\"name\": \"x\"}",
            "a .conflist without \"plugins\"",
        ),
        (
            "10-a.conflist",
            "{\"plugins\": {}}",
            "its \"plugins\" is not a list",
        ),
        ("10-a.conf", "\"ptp\"", "it is not a JSON object"),
    ] {
        let dir = conf_dir(&[(name, text)]);
        let err = installer(&dir).insert().unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(expected), "{err}");
        assert_eq!(fs::read_to_string(dir.path().join(name)).unwrap(), text);
        assert!(!dir.path().join(".ztunnel-cni-backup").exists());
    }
}

#[test]
fn a_write_that_fails_leaves_the_config_whole() {
    let dir = conf_dir(&[("10-ptp.conflist", PTP_LIST)]);
    // The temporary file's place is taken (as root, a read-only mode would not stop us).
    fs::create_dir(dir.path().join("10-ptp.conflist.tmp")).unwrap();
    fs::write(dir.path().join("10-ptp.conflist.tmp/x"), "").unwrap();

    let err = Installer::new(dir.path(), entry(30)).insert().unwrap_err();

    assert!(
        matches!(err, InstallError::Write { .. }) && err.is_transient(),
        "{err}"
    );
    assert!(err.to_string().contains("10-ptp.conflist"), "{err}");
    assert_eq!(
        fs::read_to_string(dir.path().join("10-ptp.conflist")).unwrap(),
        PTP_LIST
    );
}

#[test]
fn a_single_plugin_config_is_not_converted_over_someone_elses_list() {
    let dir = conf_dir(&[("10-a.conf", BRIDGE_CONF), ("10-a.conflist", PTP_LIST)]);
    let err = Installer::new(dir.path(), entry(30)).insert().unwrap_err();
    assert!(matches!(err, InstallError::WouldReplace { .. }), "{err}");
    assert_eq!(
        fs::read_to_string(dir.path().join("10-a.conflist")).unwrap(),
        PTP_LIST
    );
}

#[test]
fn the_plugin_binary_is_copied_executable_and_removed() {
    let source = tempfile::tempdir().unwrap();
    let plugin = source.path().join("ztunnel-cni-build");
    fs::write(&plugin, b"\x7fELF a plugin").unwrap();
    let bin = tempfile::tempdir().unwrap();
    let installed = bin.path().join(PLUGIN_TYPE);

    copy_plugin(&plugin, bin.path()).unwrap();
    assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF a plugin");
    let meta = fs::metadata(&installed).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    copy_plugin(&plugin, bin.path()).unwrap();
    assert_eq!(
        fs::metadata(&installed).unwrap().ino(),
        meta.ino(),
        "not written again"
    );

    remove_plugin(bin.path()).unwrap();
    assert!(!installed.exists());
    remove_plugin(bin.path()).unwrap();
    let err = copy_plugin(&source.path().join("missing"), bin.path()).unwrap_err();
    assert!(err.to_string().contains("--plugin"), "{err}");
}

#[test]
fn the_entry_holds_the_flags_settings() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InstallArgs,
    }
    let parse = |flags: &[&str]| {
        let cli = Cli::try_parse_from(["install-cni"].iter().chain(flags)).map(|cli| cli.args);
        cli.map(|args| plugin_entry(&args))
    };
    assert_eq!(parse(&[]).unwrap(), entry(30));
    let entry = parse(&[
        "--api-socket=/run/zt.sock",
        "--exclude-namespace=a,b",
        "--timeout-seconds=2.5",
    ])
    .unwrap();
    assert_eq!(
        entry,
        json!({"type": PLUGIN_TYPE, "apiSocket": "/run/zt.sock", "excludeNamespaces": ["a", "b"], "timeoutSeconds": 2.5})
    );
    for bad in ["0", "-1", "NaN", "soon"] {
        let flag = format!("--timeout-seconds={bad}");
        assert!(parse(&[flag.as_str()]).is_err(), "{bad}");
    }
}
