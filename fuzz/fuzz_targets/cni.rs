//! The CNI plugin (`cni::run`) on an arbitrary invocation: the runtime's `CNI_*` environment
//! and the network configuration on stdin, both from the input (see `ztunnel_fuzz::cni`). The
//! configuration's `apiSocket` is pointed at a path that does not exist, so no daemon is ever
//! reached; the plugin must answer in time, never panic, report errors in the spec's shape, and
//! pass an ADD's previous result through unchanged when it succeeds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use ztunnel_fuzz::bounded;
use ztunnel_fuzz::cni::Invocation;
use ztunnel_user::cni;
use ztunnel_user::fuzzing::cni_daemon_socket;

const BOUND: Duration = Duration::from_secs(5);

/// A socket path where nothing can listen: no file can be made in procfs, so nothing this
/// process or another does can put a daemon there (and nothing is left behind).
const NOWHERE: &str = "/proc/self/ztunnel-fuzz-no-daemon.sock";

fuzz_target!(|data: &[u8]| {
    let invocation = Invocation::parse(data);
    let Some(stdin) = pointed_nowhere(invocation.stdin.clone()) else {
        return;
    };
    let result = bounded("cni::run", BOUND, || {
        cni::run(|name| invocation.var(name), stdin.as_slice())
    });
    match result {
        Ok(Some(output)) => {
            if invocation.var("CNI_COMMAND").as_deref() == Some("ADD") {
                check_passed_through(&stdin, &output);
            }
        }
        Ok(None) => {}
        Err(failure) => {
            let error = failure.to_json();
            assert!(error["code"].as_u64().is_some(), "{error}");
            assert!(
                error["msg"].as_str().is_some_and(|msg| !msg.is_empty()),
                "{error}"
            );
            assert!(error["cniVersion"].as_str().is_some(), "{error}");
        }
    }
});

/// An ADD that succeeded without the daemon (an excluded namespace) returns the previous
/// plugin's result as it was, in the configuration's version.
fn check_passed_through(stdin: &[u8], output: &Value) {
    // (A configuration given as a JSON array has its fields by position.)
    let Ok(config @ Value::Object(_)) = serde_json::from_slice::<Value>(stdin) else {
        return;
    };
    let mut expected = config["prevResult"].clone();
    expected["cniVersion"] = config["cniVersion"].clone();
    assert_eq!(output, &expected, "ADD changed the previous result");
}

/// The plugin's stdin as it is when the plugin would call no daemon with it (it does not parse,
/// or its `apiSocket` is `NOWHERE`, as in the seeds), so that the parser sees the fuzzer's own
/// bytes; else a configuration object with its `apiSocket` replaced; else nothing to run.
fn pointed_nowhere(stdin: Vec<u8>) -> Option<Vec<u8>> {
    let nowhere =
        |stdin: &[u8]| cni_daemon_socket(stdin).is_none_or(|socket| socket == Path::new(NOWHERE));
    if nowhere(&stdin) {
        return Some(stdin);
    }
    let Ok(Value::Object(mut config)) = serde_json::from_slice::<Value>(&stdin) else {
        // (A configuration given as a JSON array has its fields by position.)
        return None;
    };
    config.insert("apiSocket".into(), NOWHERE.into());
    let stdin = serde_json::to_vec(&config).expect("a JSON object serializes");
    nowhere(&stdin).then_some(stdin)
}
