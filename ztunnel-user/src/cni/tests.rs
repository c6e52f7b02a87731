//! The plugin's logic without a daemon: configs, arguments, results and errors as the CNI
//! spec defines them.

use super::*;

fn conf(json: Value) -> Result<NetConf, CniError> {
    NetConf::parse(json.to_string().as_bytes())
}

#[test]
fn cni_args_from_a_kubelet() {
    let args = PodArgs::parse(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a1;\
         K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678",
    );
    assert_eq!(
        args,
        PodArgs {
            name: Some("a1".into()),
            namespace: Some("demo".into()),
            uid: Some("1234-5678".into()),
        }
    );
}

#[test]
fn cni_args_with_odd_spacing_and_junk() {
    let args =
        PodArgs::parse(" K8S_POD_NAME = a1 ;;garbage; K8S_POD_NAMESPACE=demo;K8S_POD_UID=;x=a=b");
    assert_eq!(args.name.as_deref(), Some("a1"));
    assert_eq!(args.namespace.as_deref(), Some("demo"));
    assert_eq!(args.uid, None, "an empty value counts as missing");
}

#[test]
fn empty_cni_args() {
    let args = PodArgs::parse("");
    assert_eq!(args, PodArgs::default());
    assert!(matches!(
        args.uid(),
        Err(CniError::MissingArg("K8S_POD_UID"))
    ));
    assert_eq!(args.name().unwrap_err().code(), 4);
}

#[test]
fn netconf_defaults() {
    let conf = conf(json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ztunnel-cni"})).unwrap();
    assert_eq!(conf.api_socket, Path::new(DEFAULT_API_SOCKET));
    assert_eq!(conf.exclude_namespaces, ["kube-system"]);
    assert_eq!(conf.timeout, Duration::from_secs(30));
    assert_eq!(conf.prev_result, None);
    assert!(conf.excludes("kube-system"));
    assert!(!conf.excludes("demo"));
}

#[test]
fn netconf_overrides_and_foreign_keys() {
    let conf = conf(json!({
        "cniVersion": "0.4.0",
        "name": "k8s",
        "type": "ztunnel-cni",
        "apiSocket": "/tmp/z.sock",
        "excludeNamespaces": ["infra", "monitoring"],
        "timeoutSeconds": 2.5,
        "ipam": {"type": "host-local"},
        "runtimeConfig": {"portMappings": []},
        "prevResult": {"ips": []},
    }))
    .unwrap();
    assert_eq!(conf.cni_version, "0.4.0");
    assert_eq!(conf.api_socket, Path::new("/tmp/z.sock"));
    assert!(conf.excludes("monitoring"));
    assert!(
        !conf.excludes("kube-system"),
        "an explicit list replaces the default"
    );
    assert_eq!(conf.timeout, Duration::from_millis(2500));
    assert_eq!(conf.prev_result, Some(json!({"ips": []})));
}

#[test]
fn netconf_rejects_bad_timeouts_and_types() {
    for timeout in [json!(0), json!(-1)] {
        let error = conf(json!({"cniVersion": "1.0.0", "timeoutSeconds": timeout})).unwrap_err();
        assert_eq!(error.code(), 7, "{timeout}");
    }
    let error = conf(json!({"cniVersion": "1.0.0", "excludeNamespaces": "demo"})).unwrap_err();
    assert_eq!(error.code(), 6);
    assert_eq!(NetConf::parse(b"not json").unwrap_err().code(), 6);
    assert_eq!(NetConf::parse(b"").unwrap_err().code(), 6);
}

#[test]
fn version_check() {
    for version in SUPPORTED_VERSIONS {
        assert!(conf(json!({"cniVersion": version})).is_ok(), "{version}");
    }
    for version in ["0.2.0", "1.1.0", ""] {
        let error = conf(json!({"cniVersion": version})).unwrap_err();
        assert!(matches!(&error, CniError::UnsupportedVersion(v) if v == version));
        assert_eq!(error.code(), 1);
    }
}

#[test]
fn ips_from_a_1_0_0_result() {
    let result = json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:00", "sandbox": "/var/run/netns/x"},
        ],
        "ips": [
            {"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 1},
            {"address": "fd00:10:244:1::2/64", "interface": 1},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
    });
    let ips = pod_ips(result.as_object().unwrap()).unwrap();
    assert_eq!(
        ips,
        [
            "10.244.1.2".parse::<IpAddr>().unwrap(),
            "fd00:10:244:1::2".parse().unwrap()
        ]
    );
}

#[test]
fn ips_from_a_0_4_0_result() {
    let result = json!({
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
    });
    assert_eq!(
        pod_ips(result.as_object().unwrap()).unwrap(),
        ["10.244.1.2".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn results_without_usable_ips() {
    for result in [
        json!({}),
        json!({"ips": []}),
        json!({"ips": "10.0.0.1/24"}),
        json!({"ips": [{"gateway": "10.0.0.1"}]}),
        json!({"ips": [{"address": "10.0.0.300/24"}]}),
    ] {
        let error = pod_ips(result.as_object().unwrap()).unwrap_err();
        assert_eq!(error.code(), 7, "{result}");
    }
}

#[test]
fn chained_result_takes_the_config_version() {
    let conf = conf(json!({
        "cniVersion": "1.0.0",
        "prevResult": {"cniVersion": "0.4.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}},
    }))
    .unwrap();
    assert_eq!(
        conf.chained_result().unwrap(),
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}})
    );
}

#[test]
fn error_json_shape() {
    let failure = Failure {
        cni_version: "0.4.0".into(),
        error: CniError::Refused {
            action: "enroll",
            pod: "demo/a1".into(),
            message: "no such netns".into(),
        },
    };
    assert_eq!(
        failure.to_json(),
        json!({
            "cniVersion": "0.4.0",
            "code": 999,
            "msg": "the ztunnel daemon refused to enroll pod demo/a1",
            "details": "no such netns",
        })
    );
    let failure = Failure {
        cni_version: CNI_VERSION.into(),
        error: CniError::NotChained,
    };
    let out = failure.to_json();
    assert_eq!(out["code"], 7);
    assert!(out.get("details").is_none());
}

#[test]
fn errors_are_reported_in_a_supported_config_version() {
    assert_eq!(reply_version(br#"{"cniVersion": "0.3.1"}"#), "0.3.1");
    assert_eq!(reply_version(br#"{"cniVersion": "9.9.9"}"#), CNI_VERSION);
    assert_eq!(reply_version(b"{"), CNI_VERSION);
}

#[test]
fn daemon_errors() {
    let socket = Path::new("/run/z.sock");
    let timeout = Duration::from_secs(3);
    let map = |error| daemon_error(error, socket, timeout, "enroll", "demo/a1");
    let io = |kind| io::Error::from(kind);

    let error = map(ApiError::Unreachable {
        path: socket.into(),
        source: io(io::ErrorKind::NotFound),
    });
    assert_eq!(error.code(), 11);
    assert!(error.to_string().contains("/run/z.sock"));
    let error = map(ApiError::Io {
        path: socket.into(),
        source: io(io::ErrorKind::WouldBlock),
    });
    assert!(matches!(error, CniError::DaemonTimeout { timeout: t, .. } if t == timeout));
    assert_eq!(error.code(), 11);
    let error = map(ApiError::Io {
        path: socket.into(),
        source: io(io::ErrorKind::ConnectionReset),
    });
    assert_eq!(error.code(), 5);
    let error = map(ApiError::Refused("netns is gone".into()));
    assert_eq!(error.code(), 999);
    assert_eq!(
        error.to_string(),
        "the ztunnel daemon refused to enroll pod demo/a1"
    );
    assert_eq!(error.details().as_deref(), Some("netns is gone"));
}

#[test]
fn version_output() {
    assert_eq!(
        version_info().to_string(),
        r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#
    );
}

#[test]
fn commands() {
    assert_eq!("ADD".parse::<Command>().unwrap(), Command::Add);
    assert_eq!("CHECK".parse::<Command>().unwrap(), Command::Check);
    assert_eq!("add".parse::<Command>().unwrap_err().code(), 4);
    assert_eq!("GC".parse::<Command>().unwrap_err().code(), 4);
}
