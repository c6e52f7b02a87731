//! The local control API's JSON (`api::Request`, which the daemon reads from the CNI plugin,
//! and `api::Response`, which the plugin reads back): decoding arbitrary bytes answers in time
//! and never panics, and whatever decodes is written and read back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::time::Duration;
use ztunnel_fuzz::bounded;
use ztunnel_user::api::{Request, Response};

const BOUND: Duration = Duration::from_secs(5);

fuzz_target!(|data: &[u8]| {
    bounded("the API's JSON", BOUND, || {
        round_trip::<Request>(data);
        round_trip::<Response>(data);
    });
});

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let Ok(decoded) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let written = serde_json::to_vec(&decoded).expect("a decoded message serializes");
    let again: T = serde_json::from_slice(&written).unwrap_or_else(|err| {
        panic!(
            "{decoded:?}, written as {}, does not decode: {err}",
            String::from_utf8_lossy(&written)
        )
    });
    assert_eq!(decoded, again);
}
