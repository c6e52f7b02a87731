//! kube-rs, as the daemon uses it (its client, `runtime::watcher`, merge patches), against the
//! server: what it sends is understood and what it reads parses.

use fake_kube_apiserver::FakeKube;
use fake_kube_apiserver::client::pod;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use std::time::Duration;

const REDIRECTION: &str = "ambient.istio.io/redirection";

/// A kube-rs client configured from the server's kubeconfig, as `Config::infer` would.
async fn kube_client(server: &FakeKube) -> kube::Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn kube_rs_watches_lists_gets_and_patches() {
    let server = FakeKube::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let fake = server.client();
    fake.create_namespace("demo", &[("istio.io/dataplane-mode", "ambient")])
        .await
        .unwrap();
    fake.create_pod(&pod("demo", "first", "uid-first", "node-a", "10.0.0.1"))
        .await
        .unwrap();
    let client = kube_client(&server).await;

    // The daemon's watch: this node's pods, list then watch.
    let pods: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut applied = watcher(pods.clone(), config).applied_objects().boxed();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), applied.next())
            .await
            .expect("a pod within 10 s")
            .expect("the watcher to go on")
            .expect("no watcher error")
    };
    assert_eq!(next().await.metadata.name.as_deref(), Some("first"));
    fake.create_pod(&pod("demo", "elsewhere", "uid-e", "node-b", "10.0.0.2"))
        .await
        .unwrap();
    fake.create_pod(&pod("demo", "second", "uid-second", "node-a", "10.0.0.3"))
        .await
        .unwrap();
    let second = next().await;
    assert_eq!(second.metadata.name.as_deref(), Some("second"));
    assert_eq!(second.metadata.uid.as_deref(), Some("uid-second"));

    // Its annotation, set and removed by merge patches.
    let in_demo: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let patch = Patch::Merge(json!({ "metadata": { "annotations": { REDIRECTION: "enabled" } } }));
    let patched = in_demo
        .patch("second", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.annotations.unwrap()[REDIRECTION],
        "enabled"
    );
    let modified = next().await;
    assert_eq!(
        modified.metadata.annotations.unwrap()[REDIRECTION],
        "enabled"
    );
    let patch = Patch::Merge(json!({ "metadata": { "annotations": { REDIRECTION: null } } }));
    in_demo
        .patch("second", &PatchParams::default(), &patch)
        .await
        .unwrap();
    let fetched = in_demo.get("second").await.unwrap();
    assert!(fetched.metadata.annotations.unwrap_or_default().is_empty());
    assert_eq!(fetched.status.unwrap().phase.as_deref(), Some("Running"));

    // Refusals parse as the API's errors.
    match in_demo.get("absent").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected a 404, got {other:?}"),
    }
    assert!(in_demo.get_opt("absent").await.unwrap().is_none());

    // Namespaces, listed by label.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ambient = namespaces
        .list(&ListParams::default().labels("istio.io/dataplane-mode=ambient"))
        .await
        .unwrap();
    let names: Vec<_> = ambient
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names, ["demo"]);
}

#[tokio::test]
async fn kube_rs_streaming_lists_get_the_initial_events() {
    let server = FakeKube::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let fake = server.client();
    fake.create_namespace("demo", &[]).await.unwrap();
    fake.create_pod(&pod("demo", "there", "uid-t", "node-a", "10.0.0.1"))
        .await
        .unwrap();
    let client = kube_client(&server).await;
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher(pods, config).boxed();
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitApply(pod) => seen.push(pod.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["there"]);
}
