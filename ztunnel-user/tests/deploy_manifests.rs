//! The Kubernetes manifests of `deploy/` against the daemon they deploy: every variable the
//! DaemonSet sets is one `ztunnel run` or `ztunnel install-cni` reads, with a value the
//! daemon's own parsers accept; the paths those settings name are mounted from the node; the
//! probe and ports are the daemon's; the privileges and the API rules are the documented ones.
//! Each failure names what drifted.

use clap::builder::{BoolishValueParser, TypedValueParser};
use clap::{Args, FromArgMatches};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use ztunnel_user::cni_install::InstallArgs;
use ztunnel_user::settings::{Enrollment, Settings};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const DAEMON: &str = "ztunnel";
const INSTALL_CNI: &str = "install-cni";

/// The resources `deploy/kustomization.yaml` lists, every document of each.
struct Manifests {
    resources: Vec<Value>,
}

impl Manifests {
    fn load() -> Manifests {
        let deploy = Path::new(DEPLOY);
        let kustomization = documents(&deploy.join("kustomization.yaml"));
        let files = kustomization[0]["resources"]
            .as_array()
            .expect("kustomization.yaml lists its resources");
        let resources = files
            .iter()
            .flat_map(|file| documents(&deploy.join(file.as_str().expect("a file name"))))
            .collect();
        Manifests { resources }
    }

    fn find(&self, kind: &str, name: &str) -> &Value {
        self.resources
            .iter()
            .find(|r| r["kind"] == kind && r["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("deploy/ has no {kind} {name}"))
    }

    fn daemonset(&self) -> &Value {
        self.find("DaemonSet", "ztunnel")
    }

    fn pod(&self) -> &Value {
        &self.daemonset()["spec"]["template"]["spec"]
    }

    fn container(&self, name: &str) -> &Value {
        self.pod()["containers"]
            .as_array()
            .and_then(|all| all.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("the DaemonSet has no container {name}"))
    }

    fn volume(&self, name: &str) -> &Value {
        self.pod()["volumes"]
            .as_array()
            .and_then(|all| all.iter().find(|v| v["name"] == name))
            .unwrap_or_else(|| panic!("the DaemonSet has no volume {name}"))
    }

    /// The container's mount that holds `path` (the deepest), and its volume.
    fn mount_of(&self, container: &str, path: &Path) -> Option<(&Value, &Value)> {
        let mounts = self.container(container)["volumeMounts"].as_array()?;
        let mount = mounts
            .iter()
            .filter(|m| path.starts_with(text(&m["mountPath"])))
            .max_by_key(|m| text(&m["mountPath"]).len())?;
        Some((mount, self.volume(text(&mount["name"]))))
    }

    /// Where the container's `path` is on the node, if it is on a hostPath volume.
    fn host_path(&self, container: &str, path: &Path) -> Option<PathBuf> {
        let (mount, volume) = self.mount_of(container, path)?;
        let below = path.strip_prefix(text(&mount["mountPath"])).ok()?;
        let host = volume["hostPath"]["path"].as_str()?;
        Some(Path::new(host).join(below))
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let yaml = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|err| panic!("parsing {}: {err}", path.display()))
        })
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// What drifted, gathered so that one run names every mismatch.
#[derive(Default)]
struct Drift(Vec<String>);

impl Drift {
    fn check(&mut self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            self.0.push(what());
        }
    }

    fn assert_none(self, of: &str) {
        assert!(
            self.0.is_empty(),
            "deploy/ drifted from {of}:\n- {}",
            self.0.join("\n- ")
        );
    }
}

/// The container's variables with a value written in the manifest (the downward API's are
/// the cluster's to give).
fn literal_env(container: &Value) -> Vec<(&str, &str)> {
    env(container)
        .filter_map(|var| Some((text(&var["name"]), var["value"].as_str()?)))
        .collect()
}

fn env(container: &Value) -> impl Iterator<Item = &Value> {
    container["env"].as_array().into_iter().flatten()
}

/// A subcommand as clap builds it from its arguments' type.
fn command<T: Args>(name: &'static str) -> clap::Command {
    T::augment_args(clap::Command::new(name))
}

/// The variables a subcommand reads.
fn variables<T: Args>() -> BTreeSet<String> {
    command::<T>("variables")
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

/// Each variable `container` sets that `T` does not read.
fn unknown_variables<T: Args>(manifests: &Manifests, container: &str, subcommand: &str) -> Drift {
    let known = variables::<T>();
    let mut drift = Drift::default();
    for var in env(manifests.container(container)) {
        let name = text(&var["name"]);
        drift.check(known.contains(name), || {
            format!("container {container} sets {name}, which `ztunnel {subcommand}` does not read")
        });
    }
    drift
}

/// What `container` runs with: its literal variables given to the subcommand's own parsers
/// (`T`), the rest defaults.
fn parse_env<T: Args + FromArgMatches>(manifests: &Manifests, container: &str) -> T {
    let command = command::<T>("ztunnel");
    let mut argv = vec!["ztunnel".to_owned()];
    for (name, value) in literal_env(manifests.container(container)) {
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_env() == Some(OsStr::new(name)))
        else {
            continue; // Reported by unknown_variables.
        };
        let long = arg
            .get_long()
            .expect("every variable's argument has a long flag");
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}={value}"));
        } else if BoolishValueParser::new()
            .parse_ref(&command, Some(arg), OsStr::new(value))
            .unwrap_or_else(|err| panic!("{name}={value}: {err}"))
        {
            argv.push(format!("--{long}"));
        }
    }
    let matches = command
        .try_get_matches_from(&argv)
        .unwrap_or_else(|err| panic!("container {container}'s env is refused ({argv:?}):\n{err}"));
    T::from_arg_matches(&matches).expect("the arguments")
}

fn daemon_settings(manifests: &Manifests) -> Settings {
    parse_env(manifests, DAEMON)
}

#[test]
fn ztunnel_run_reads_every_variable_the_daemonset_sets() {
    let manifests = Manifests::load();
    unknown_variables::<Settings>(&manifests, DAEMON, "run").assert_none("`ztunnel run`");
    // Every literal value parses (daemon_settings panics naming the one refused).
    let settings = daemon_settings(&manifests);
    // The settings that make it a cluster's daemon, as the manifest's comments say.
    assert_eq!(settings.enrollment, Enrollment::Kubernetes);
    assert_eq!(settings.istiod.xds_address, "istiod.istio-system.svc:15012");
    assert_eq!(settings.istiod.ca_address, settings.istiod.xds_address);
}

#[test]
fn the_downward_api_gives_the_daemon_its_node_and_pod() {
    let manifests = Manifests::load();
    let mut drift = Drift::default();
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
    ] {
        let given = env(manifests.container(DAEMON))
            .find(|var| var["name"] == name)
            .map(|var| text(&var["valueFrom"]["fieldRef"]["fieldPath"]));
        drift.check(given == Some(field), || {
            format!("{name} must come from the downward API's {field}, not {given:?}")
        });
    }
    drift.assert_none("the downward API");
}

#[test]
fn the_paths_the_daemon_uses_are_mounted_from_the_node() {
    let manifests = Manifests::load();
    let settings = daemon_settings(&manifests);
    let mut drift = Drift::default();
    let api_socket_dir = settings.api_socket.parent().expect("a directory");
    // The CNI plugin, run by the runtime on the node, dials the socket at the same path; the
    // runtime names netns paths on the node; the rest must outlive the container.
    let shared: [(&str, &Path); 5] = [
        ("the API socket's directory", api_socket_dir),
        ("the state dir", &settings.state_dir),
        ("bpffs", &settings.bpffs),
        (
            "the cgroup root",
            settings
                .cgroup_root
                .as_deref()
                .unwrap_or(Path::new("/sys/fs/cgroup")),
        ),
        ("the runtime's netns mounts", Path::new("/var/run/netns")),
    ];
    for (what, path) in shared {
        let host = manifests.host_path(DAEMON, path);
        drift.check(host.as_deref() == Some(path), || {
            format!(
                "{what} ({}) must be the node's own path, mounted by hostPath (found {host:?})",
                path.display()
            )
        });
    }
    // New pods' netns mounts appear after the container started.
    let netns = manifests.mount_of(DAEMON, Path::new("/var/run/netns"));
    drift.check(
        netns.is_some_and(|(mount, _)| mount["mountPropagation"] == "HostToContainer"),
        || "/var/run/netns needs mountPropagation HostToContainer".to_owned(),
    );

    for (what, root) in [
        ("XDS_ROOT_CA", &settings.istiod.xds_root_ca),
        ("CA_ROOT_CA", &settings.istiod.ca_root_ca),
    ] {
        drift.check(
            mounted_from(&manifests, Path::new(root), |volume, file| {
                volume["configMap"]["name"] == "istio-ca-root-cert" && file == "root-cert.pem"
            }),
            || format!("{what} ({root}) must be root-cert.pem of the ConfigMap istio-ca-root-cert"),
        );
    }
    let token = &settings.istiod.auth_token;
    drift.check(
        mounted_from(&manifests, token, |volume, file| {
            volume["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|source| {
                    let token = &source["serviceAccountToken"];
                    token["audience"] == "istio-ca" && token["path"] == file
                })
        }),
        || {
            format!(
                "AUTH_TOKEN ({}) must be a projected service-account token with audience istio-ca",
                token.display()
            )
        },
    );
    drift.assert_none("the paths `ztunnel run` uses");
}

/// Whether the daemon container's `path` is a file of a volume `holds` accepts (given the
/// file's path inside the volume).
fn mounted_from(manifests: &Manifests, path: &Path, holds: impl Fn(&Value, &str) -> bool) -> bool {
    manifests
        .mount_of(DAEMON, path)
        .is_some_and(|(mount, volume)| {
            let file = path.strip_prefix(text(&mount["mountPath"])).unwrap();
            holds(volume, &path_text(file))
        })
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[test]
fn probes_ports_and_grace_are_the_daemons() {
    let manifests = Manifests::load();
    let settings = daemon_settings(&manifests);
    let daemon = manifests.container(DAEMON);
    let mut drift = Drift::default();
    let probe = &daemon["readinessProbe"]["httpGet"];
    let readiness = settings.readiness_addr.port();
    drift.check(
        probe["path"] == "/healthz/ready" && probe["port"] == readiness,
        || format!("the readiness probe must GET /healthz/ready on {readiness}, not {probe}"),
    );
    let port = |name: &str| {
        daemon["ports"]
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["name"] == name))
            .map(|p| p["containerPort"].clone())
    };
    let metrics = settings.metrics_addr.port();
    drift.check(port("http-monitoring") == Some(metrics.into()), || {
        format!("the port http-monitoring must be the metrics port {metrics}")
    });
    drift.check(port("http-readiness") == Some(readiness.into()), || {
        format!("the port http-readiness must be the readiness port {readiness}")
    });
    let annotations = &manifests.daemonset()["spec"]["template"]["metadata"]["annotations"];
    drift.check(
        text(&annotations["prometheus.io/port"]).parse() == Ok(metrics)
            && annotations["prometheus.io/path"] == "/stats/prometheus"
            && annotations["prometheus.io/scrape"] == "true",
        || format!("the prometheus.io annotations must scrape /stats/prometheus on {metrics}"),
    );
    let grace = manifests.pod()["terminationGracePeriodSeconds"].as_u64();
    drift.check(
        grace.is_some_and(|grace| grace > settings.drain_timeout_secs),
        || {
            format!(
                "terminationGracePeriodSeconds ({grace:?}) must exceed the drain timeout ({} s)",
                settings.drain_timeout_secs
            )
        },
    );
    drift.assert_none("the daemon's ports and drain");
}

#[test]
fn install_cni_reads_every_variable_the_daemonset_sets_and_its_paths_are_the_nodes() {
    let manifests = Manifests::load();
    unknown_variables::<InstallArgs>(&manifests, INSTALL_CNI, INSTALL_CNI)
        .assert_none(&format!("`ztunnel {INSTALL_CNI}`"));
    let installer: InstallArgs = parse_env(&manifests, INSTALL_CNI);
    let mut drift = Drift::default();
    // The DaemonSet's command is a subcommand of the image's binary.
    let command = &manifests.container(INSTALL_CNI)["command"];
    let help = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(command.as_array().into_iter().flatten().skip(1).map(text))
        .arg("--help")
        .output()
        .expect("running ztunnel");
    drift.check(help.status.success(), || {
        format!(
            "container {INSTALL_CNI} runs {command}, which ztunnel refuses: {}",
            String::from_utf8_lossy(&help.stderr).trim()
        )
    });
    for (what, dir) in [
        ("the CNI bin dir", &installer.dirs.cni_bin_dir),
        ("the CNI config dir", &installer.dirs.cni_conf_dir),
    ] {
        let host = manifests.host_path(INSTALL_CNI, dir);
        drift.check(host.as_deref() == Some(dir.as_path()), || {
            format!(
                "{what} ({}) must be the node's own directory, mounted by hostPath (found {host:?})",
                dir.display()
            )
        });
    }
    // The plugin's entry names the socket the daemon listens on.
    let daemon = daemon_settings(&manifests);
    drift.check(installer.api_socket == daemon.api_socket, || {
        format!(
            "the plugin's apiSocket ({}) is not the daemon's socket ({})",
            installer.api_socket.display(),
            daemon.api_socket.display()
        )
    });
    drift.assert_none(&format!("`ztunnel {INSTALL_CNI}`"));
}

#[test]
fn privileges_are_the_documented_ones() {
    let manifests = Manifests::load();
    let pod = manifests.pod();
    let mut drift = Drift::default();
    // The daemon writes sysctls of pods' netns through /proc/sys: only a privileged
    // container's is writable (daemonset.yaml says what privileged covers besides).
    let daemon = &manifests.container(DAEMON)["securityContext"];
    drift.check(daemon["privileged"] == true, || {
        format!("container {DAEMON} must be privileged, as daemonset.yaml explains")
    });
    let installer = &manifests.container(INSTALL_CNI)["securityContext"];
    drift.check(
        installer["privileged"] != true
            && installer["allowPrivilegeEscalation"] == false
            && installer["capabilities"]["drop"] == serde_json::json!(["ALL"])
            && installer["capabilities"]["add"].is_null(),
        || format!("container {INSTALL_CNI} must drop every capability and add none"),
    );
    // Running pods' netns are found through /proc/<pid>; on a pod network, the sandbox of
    // this pod would wait for the plugin it installs.
    drift.check(pod["hostPID"] == true, || "hostPID must be true".to_owned());
    drift.check(pod["hostNetwork"] == true, || {
        "hostNetwork must be true".to_owned()
    });
    drift.check(pod["automountServiceAccountToken"] == true, || {
        "enrollment by the Kubernetes API needs the pod's service-account token".to_owned()
    });

    let account = text(&pod["serviceAccountName"]);
    let namespace = text(&manifests.daemonset()["metadata"]["namespace"]);
    manifests.find("ServiceAccount", account);
    let binding = manifests.find("ClusterRoleBinding", "ztunnel");
    drift.check(
        binding["subjects"]
            == serde_json::json!([
                {"kind": "ServiceAccount", "name": account, "namespace": namespace}
            ]),
        || format!("the ClusterRoleBinding must bind {namespace}/{account} alone"),
    );
    let role = text(&binding["roleRef"]["name"]);
    // Each grant as `group/resource verb` (the core group is empty).
    let mut rules = BTreeSet::new();
    let list = |value: &Value| value.as_array().cloned().unwrap_or_default();
    for rule in list(&manifests.find("ClusterRole", role)["rules"]) {
        for group in list(&rule["apiGroups"]) {
            for resource in list(&rule["resources"]) {
                for verb in list(&rule["verbs"]) {
                    rules.insert(format!(
                        "{}/{} {}",
                        text(&group),
                        text(&resource),
                        text(&verb)
                    ));
                }
            }
        }
    }
    // Watch the node's pods and the namespaces' labels; annotate captured pods.
    let documented: BTreeSet<String> = [
        "/pods get",
        "/pods list",
        "/pods watch",
        "/pods patch",
        "/namespaces get",
        "/namespaces list",
        "/namespaces watch",
    ]
    .map(str::to_owned)
    .into();
    for extra in rules.difference(&documented) {
        drift.0.push(format!(
            "the ClusterRole grants {extra}, beyond what the daemon asks"
        ));
    }
    for missing in documented.difference(&rules) {
        drift.0.push(format!(
            "the ClusterRole lacks {missing}, which the daemon asks"
        ));
    }
    drift.assert_none("the documented privileges");
}
