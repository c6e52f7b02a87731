//! The server over real sockets on 127.0.0.1: what a client reads on the wire.

use fake_kube_apiserver::client::{Client, ClientError, WatchStream, pod};
use fake_kube_apiserver::{Config, FakeKube};
use http::Method;
use serde_json::{Value, json};
use std::time::Duration;

const REDIRECTION: &str = "ambient.istio.io/redirection";

async fn start() -> FakeKube {
    start_with(Config::default()).await
}

async fn start_with(config: Config) -> FakeKube {
    FakeKube::start_with("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// The next event, within a few seconds.
async fn next(watch: &mut WatchStream) -> Value {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an event within 5 s")
        .unwrap()
        .expect("the watch to go on")
}

fn version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn names(list: &Value) -> Vec<&str> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap())
        .collect()
}

fn summary(event: &Value) -> (String, String) {
    (
        event["type"].as_str().unwrap().to_owned(),
        event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
    )
}

async fn status_of(result: Result<Value, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Status {
            code,
            reason,
            message,
        }) => (code, reason, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn lab_objects(client: &Client) {
    client
        .create_namespace("demo", &[("istio.io/dataplane-mode", "ambient")])
        .await
        .unwrap();
    client.create_namespace("other", &[]).await.unwrap();
    for (namespace, name, node) in [
        ("demo", "a1", "node-a"),
        ("demo", "b1", "node-b"),
        ("other", "a2", "node-a"),
    ] {
        let mut object = pod(namespace, name, &format!("uid-{name}"), node, "10.0.0.1");
        object["metadata"]["labels"] = json!({ "app": name });
        client.create_pod(&object).await.unwrap();
    }
}

#[tokio::test]
async fn lists_select_by_namespace_labels_and_fields() {
    let server = start().await;
    let client = server.client();
    lab_objects(&client).await;

    let on_a = client
        .get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a")
        .await
        .unwrap();
    assert_eq!(on_a["kind"], "PodList");
    assert_eq!(on_a["apiVersion"], "v1");
    assert_eq!(names(&on_a), ["a1", "a2"]);
    // As the real server writes lists: items without kind and apiVersion.
    assert!(on_a["items"][0].get("kind").is_none());
    assert_eq!(on_a["items"][0]["metadata"]["uid"], "uid-a1");
    assert_eq!(version(&on_a), 6);

    let demo = client.get("/api/v1/namespaces/demo/pods").await.unwrap();
    assert_eq!(names(&demo), ["a1", "b1"]);
    let selected = client
        .get("/api/v1/namespaces/demo/pods?labelSelector=app%20in%20(b1,a2)&fieldSelector=spec.nodeName!%3Dnode-a")
        .await
        .unwrap();
    assert_eq!(names(&selected), ["b1"]);
    let ambient = client
        .get("/api/v1/namespaces?labelSelector=istio.io/dataplane-mode%3Dambient")
        .await
        .unwrap();
    assert_eq!(ambient["kind"], "NamespaceList");
    assert_eq!(names(&ambient), ["demo"]);
    let by_name = client
        .get("/api/v1/namespaces?labelSelector=kubernetes.io/metadata.name%3Dother")
        .await
        .unwrap();
    assert_eq!(names(&by_name), ["other"]);

    let (code, reason, _) = status_of(client.get("/api/v1/pods?labelSelector=a%20b").await).await;
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    let (code, _, message) = status_of(
        client
            .get("/api/v1/pods?fieldSelector=spec.hostname%3Dx")
            .await,
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(message, "field label not supported: spec.hostname");
}

#[tokio::test]
async fn a_watch_sees_the_changes_after_its_version_in_order_then_live_ones() {
    let server = start().await;
    let client = server.client();
    let namespace = client.create_namespace("demo", &[]).await.unwrap();
    let from = version(&namespace);
    client
        .create_pod(&pod("demo", "p", "uid-p", "node-a", "10.0.0.1"))
        .await
        .unwrap();
    client
        .annotate_pod("demo", "p", REDIRECTION, Some("enabled"))
        .await
        .unwrap();
    client.delete_pod("demo", "p").await.unwrap();

    let mut watch = client
        .watch(&format!(
            "/api/v1/pods?watch=true&resourceVersion={from}&fieldSelector=spec.nodeName%3Dnode-a"
        ))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next(&mut watch).await);
    }
    let kinds: Vec<_> = seen.iter().map(summary).collect();
    let expected = [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")];
    assert_eq!(kinds, expected.map(|(t, n)| (t.to_owned(), n.to_owned())));
    let versions: Vec<u64> = seen.iter().map(|e| version(&e["object"])).collect();
    assert_eq!(versions, [from + 1, from + 2, from + 3]);
    assert_eq!(seen[0]["object"]["kind"], "Pod");
    assert_eq!(
        seen[1]["object"]["metadata"]["annotations"][REDIRECTION],
        "enabled"
    );

    // Live: a pod elsewhere is not seen; one scheduled onto the node later is added then.
    client
        .create_pod(&pod("demo", "elsewhere", "uid-e", "node-b", "10.0.0.2"))
        .await
        .unwrap();
    let mut unscheduled = pod("demo", "late", "uid-l", "", "10.0.0.3");
    unscheduled["spec"]
        .as_object_mut()
        .unwrap()
        .remove("nodeName");
    client.create_pod(&unscheduled).await.unwrap();
    client
        .merge_patch(
            "/api/v1/namespaces/demo/pods/late",
            &json!({ "spec": { "nodeName": "node-a" } }),
        )
        .await
        .unwrap();
    assert_eq!(
        summary(&next(&mut watch).await),
        ("ADDED".to_owned(), "late".to_owned())
    );
    client
        .merge_patch(
            "/api/v1/namespaces/demo/pods/late",
            &json!({ "spec": { "nodeName": "node-b" } }),
        )
        .await
        .unwrap();
    assert_eq!(
        summary(&next(&mut watch).await),
        ("DELETED".to_owned(), "late".to_owned())
    );
}

#[tokio::test]
async fn a_watch_from_now_starts_with_what_is_there() {
    let server = start().await;
    let client = server.client();
    lab_objects(&client).await;
    let mut watch = client
        .watch("/api/v1/namespaces?watch=1&resourceVersion=0")
        .await
        .unwrap();
    assert_eq!(
        summary(&next(&mut watch).await),
        ("ADDED".to_owned(), "demo".to_owned())
    );
    assert_eq!(
        summary(&next(&mut watch).await),
        ("ADDED".to_owned(), "other".to_owned())
    );
    client
        .label_namespace("other", "istio.io/dataplane-mode", Some("ambient"))
        .await
        .unwrap();
    let labelled = next(&mut watch).await;
    assert_eq!(
        summary(&labelled),
        ("MODIFIED".to_owned(), "other".to_owned())
    );

    // A streaming list (`sendInitialEvents`): the additions, then a bookmark that ends them.
    let mut streaming = client
        .watch("/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&fieldSelector=spec.nodeName%3Dnode-a")
        .await
        .unwrap();
    let first = [next(&mut streaming).await, next(&mut streaming).await];
    assert_eq!(
        first
            .iter()
            .map(summary)
            .map(|(_, n)| n)
            .collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    let end = next(&mut streaming).await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(version(&end["object"]), version(&labelled["object"]));
}

#[tokio::test]
async fn watches_get_bookmarks_and_end_at_their_timeout() {
    let server = start_with(Config {
        bookmark_interval: Duration::from_millis(100),
        ..Config::default()
    })
    .await;
    let client = server.client();
    let namespace = client.create_namespace("demo", &[]).await.unwrap();
    let mut watch = client
        .watch("/api/v1/namespaces/demo/pods?watch=true&allowWatchBookmarks=true&resourceVersion=2&timeoutSeconds=1")
        .await
        .unwrap();
    let bookmark = next(&mut watch).await;
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["apiVersion"], "v1");
    assert_eq!(version(&bookmark["object"]), version(&namespace));
    loop {
        let ended = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
        match ended.expect("the watch to end at its timeout").unwrap() {
            Some(event) => assert_eq!(event["type"], "BOOKMARK"),
            None => break,
        }
    }
    // Without allowWatchBookmarks, none.
    let mut quiet = client
        .watch("/api/v1/namespaces/demo/pods?watch=true&resourceVersion=2&timeoutSeconds=1")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), quiet.next()).await;
    assert!(ended.unwrap().unwrap().is_none());
}

#[tokio::test]
async fn a_version_older_than_the_history_is_gone() {
    let server = start_with(Config {
        history_limit: 3,
        ..Config::default()
    })
    .await;
    let client = server.client();
    for name in ["a", "b", "c", "d", "e"] {
        client.create_namespace(name, &[]).await.unwrap();
    }
    // Versions 2..=6 were written; 4, 5 and 6 are kept, so a watch may start after 3.
    let mut expired = client
        .watch("/api/v1/namespaces?watch=true&resourceVersion=2")
        .await
        .unwrap();
    let error = next(&mut expired).await;
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert!(expired.next().await.unwrap().is_none());

    let mut kept = client
        .watch("/api/v1/namespaces?watch=true&resourceVersion=3")
        .await
        .unwrap();
    let names: Vec<_> = [
        next(&mut kept).await,
        next(&mut kept).await,
        next(&mut kept).await,
    ]
    .iter()
    .map(summary)
    .map(|(_, n)| n)
    .collect();
    assert_eq!(names, ["c", "d", "e"]);

    let (code, reason, _) = status_of(
        client
            .get("/api/v1/namespaces?watch=true&resourceVersion=99")
            .await,
    )
    .await;
    assert_eq!((code, reason.as_str()), (504, "Timeout"));
}

#[tokio::test]
async fn merge_patches_add_and_remove_annotations() {
    let server = start().await;
    let client = server.client();
    lab_objects(&client).await;
    let before = client.get_pod("demo", "a1").await.unwrap();
    let latest = version(&client.get("/api/v1/pods").await.unwrap());
    let enabled = client
        .annotate_pod("demo", "a1", REDIRECTION, Some("enabled"))
        .await
        .unwrap();
    assert_eq!(enabled["metadata"]["annotations"][REDIRECTION], "enabled");
    assert_eq!(version(&enabled), latest + 1);
    assert_eq!(enabled["metadata"]["uid"], "uid-a1");
    assert_eq!(
        enabled["metadata"]["creationTimestamp"],
        before["metadata"]["creationTimestamp"]
    );

    // The same patch again changes nothing: no new version (and no event).
    let again = client
        .annotate_pod("demo", "a1", REDIRECTION, Some("enabled"))
        .await
        .unwrap();
    assert_eq!(version(&again), version(&enabled));

    let removed = client
        .annotate_pod("demo", "a1", REDIRECTION, None)
        .await
        .unwrap();
    assert!(
        removed["metadata"]["annotations"]
            .get(REDIRECTION)
            .is_none()
    );
    assert_eq!(client.get_pod("demo", "a1").await.unwrap(), removed);

    // A strategic merge patch (kubectl's) and a JSON patch.
    let strategic = client
        .request(
            Method::PATCH,
            "/api/v1/namespaces/demo",
            "application/strategic-merge-patch+json",
            Some(&json!({ "metadata": { "labels": { "istio.io/dataplane-mode": null } } })),
        )
        .await
        .unwrap();
    assert!(
        strategic["metadata"]["labels"]
            .get("istio.io/dataplane-mode")
            .is_none()
    );
    let json_patched = client
        .request(
            Method::PATCH,
            "/api/v1/namespaces/demo/pods/a1",
            "application/json-patch+json",
            Some(&json!([{ "op": "add", "path": "/metadata/labels/extra", "value": "1" }])),
        )
        .await
        .unwrap();
    assert_eq!(json_patched["metadata"]["labels"]["extra"], "1");

    // A stale resourceVersion in the patch is a conflict.
    let stale = json!({ "metadata": { "resourceVersion": "1", "labels": { "x": "y" } } });
    let (code, reason, _) = status_of(
        client
            .merge_patch("/api/v1/namespaces/demo/pods/a1", &stale)
            .await,
    )
    .await;
    assert_eq!((code, reason.as_str()), (409, "Conflict"));

    // The object's writes leave the status alone, the status subresource's all but it.
    let object_write =
        json!({ "status": { "phase": "Failed" }, "metadata": { "labels": { "y": "z" } } });
    let written = client
        .merge_patch("/api/v1/namespaces/demo/pods/a1", &object_write)
        .await
        .unwrap();
    assert_eq!(written["status"]["phase"], "Running");
    assert_eq!(written["metadata"]["labels"]["y"], "z");
    let status_write =
        json!({ "status": { "phase": "Succeeded" }, "metadata": { "labels": { "y": null } } });
    let written = client
        .merge_patch("/api/v1/namespaces/demo/pods/a1/status", &status_write)
        .await
        .unwrap();
    assert_eq!(written["status"]["phase"], "Succeeded");
    assert_eq!(written["metadata"]["labels"]["y"], "z");

    // A replace (PUT) is conditional on the resourceVersion it carries, when it carries one.
    let mut replacement = client.get_pod("demo", "a1").await.unwrap();
    replacement["metadata"]["labels"] = json!({ "replaced": "yes" });
    let replaced = client
        .request(
            Method::PUT,
            "/api/v1/namespaces/demo/pods/a1",
            "application/json",
            Some(&replacement),
        )
        .await
        .unwrap();
    assert_eq!(replaced["metadata"]["labels"], json!({ "replaced": "yes" }));
    assert_eq!(replaced["metadata"]["uid"], "uid-a1");
    let stale_replace = client
        .request(
            Method::PUT,
            "/api/v1/namespaces/demo/pods/a1",
            "application/json",
            Some(&replacement),
        )
        .await;
    assert_eq!(status_of(stale_replace).await.0, 409);

    // Labels must stay strings.
    let bad = json!({ "metadata": { "labels": { "n": 1 } } });
    let (code, _, _) = status_of(client.merge_patch("/api/v1/namespaces/demo", &bad).await).await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn refusals_are_status_objects_with_the_real_codes() {
    let server = start().await;
    let client = server.client();
    lab_objects(&client).await;

    let missing = client.get_pod("demo", "nope").await;
    assert_eq!(
        status_of(missing).await,
        (
            404,
            "NotFound".to_owned(),
            "pods \"nope\" not found".to_owned()
        )
    );
    let duplicate = client.create_namespace("demo", &[]).await;
    assert_eq!(
        status_of(duplicate).await,
        (
            409,
            "AlreadyExists".to_owned(),
            "namespaces \"demo\" already exists".to_owned()
        )
    );
    let duplicate_pod = client
        .create_pod(&pod("demo", "a1", "uid-x", "node-a", "10.0.0.9"))
        .await;
    assert_eq!(status_of(duplicate_pod).await.0, 409);
    let nowhere = client
        .create_pod(&pod("absent", "p", "uid-y", "node-a", "10.0.0.9"))
        .await;
    assert_eq!(
        status_of(nowhere).await,
        (
            404,
            "NotFound".to_owned(),
            "namespaces \"absent\" not found".to_owned()
        )
    );
    assert_eq!(status_of(client.get("/api/v1/services").await).await.0, 404);
    assert_eq!(
        status_of(client.get("/apis/apps/v1/deployments").await)
            .await
            .0,
        404
    );
    let wrong_method = client
        .request(Method::DELETE, "/api/v1/pods", "", None)
        .await;
    assert_eq!(status_of(wrong_method).await.0, 405);
    let apply = client
        .request(
            Method::PATCH,
            "/api/v1/namespaces/demo",
            "application/apply-patch+yaml",
            Some(&json!({})),
        )
        .await;
    assert_eq!(status_of(apply).await.0, 415);
    let unnamed = client
        .request(
            Method::POST,
            "/api/v1/namespaces",
            "application/json",
            Some(&json!({ "metadata": {} })),
        )
        .await;
    assert_eq!(status_of(unnamed).await.0, 422);
    let wrong_kind = json!({ "kind": "Pod", "metadata": { "name": "x" } });
    let wrong_kind = client
        .request(
            Method::POST,
            "/api/v1/namespaces",
            "application/json",
            Some(&wrong_kind),
        )
        .await;
    assert_eq!(status_of(wrong_kind).await.0, 400);
    let not_an_object = client
        .request(
            Method::POST,
            "/api/v1/namespaces",
            "application/json",
            Some(&json!("x")),
        )
        .await;
    assert_eq!(status_of(not_an_object).await.0, 400);
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_pods() {
    let server = start().await;
    let client = server.client();
    lab_objects(&client).await;
    let mut watch = client
        .watch("/api/v1/pods?watch=true&resourceVersion=6")
        .await
        .unwrap();
    let deleted = client.delete_namespace("demo").await.unwrap();
    assert_eq!(deleted["kind"], "Namespace");
    let events = [next(&mut watch).await, next(&mut watch).await];
    let seen: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        seen,
        [
            ("DELETED".to_owned(), "a1".to_owned()),
            ("DELETED".to_owned(), "b1".to_owned())
        ]
    );
    assert_eq!(names(&client.get("/api/v1/pods").await.unwrap()), ["a2"]);
    assert_eq!(
        status_of(client.get("/api/v1/namespaces/demo").await)
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn discovery_and_the_kubeconfig_point_clients_at_the_server() {
    let server = start().await;
    let client = server.client();
    assert_eq!(client.get("/api").await.unwrap()["versions"], json!(["v1"]));
    let resources = client.get("/api/v1").await.unwrap();
    let pods = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .unwrap();
    assert_eq!(pods["namespaced"], true);
    assert!(pods["verbs"].as_array().unwrap().contains(&json!("watch")));
    assert_eq!(client.get("/version").await.unwrap()["major"], "1");
    let kubeconfig = server.kubeconfig();
    assert!(kubeconfig.contains(&format!("server: http://{}", server.address())));
    assert!(kubeconfig.contains("current-context: fake-kube"));
}

#[tokio::test]
async fn stopping_ends_the_watches() {
    let server = start().await;
    let client = server.client();
    let mut watch = client.watch("/api/v1/pods?watch=true").await.unwrap();
    server.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
    assert!(ended.expect("the watch to end").unwrap().is_none());
    assert!(client.get("/api").await.is_err());
}
