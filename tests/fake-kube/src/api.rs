//! The HTTP surface: the real server's paths, methods, query parameters, bodies and codes
//! for namespaces and pods, and the discovery documents clients read first.

use crate::Config;
use crate::patch::PatchType;
use crate::resource::Resource;
use crate::selector::{FieldSelector, Filter, LabelSelector};
use crate::status::ApiError;
use crate::store::{Start, Store};
use crate::watch::{self, Watch};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch as signal};
use tokio::time::Instant;

pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// The real server's limit on a request body.
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How many events a watch's response holds before the watch waits for its client.
const WATCH_BUFFER: usize = 64;

pub struct Api {
    pub store: Arc<Store>,
    pub config: Config,
    pub shutdown: signal::Receiver<bool>,
}

/// What a path names.
enum Target {
    /// `/api/v1/pods`, `/api/v1/namespaces`, `/api/v1/namespaces/{ns}/pods`.
    Collection {
        resource: Resource,
        namespace: Option<String>,
    },
    /// One object, or (`status`) its status subresource.
    Object {
        resource: Resource,
        namespace: String,
        name: String,
        status: bool,
    },
    Discovery(Value),
}

impl Api {
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        match self.route(request).await {
            Ok(response) => response,
            Err(error) => json_response(
                StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &error.status(),
            ),
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<ResponseBody>, ApiError> {
        let target = target(request.uri().path())?;
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let method = request.method().clone();
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let store = &self.store;
        let ok = |object: Value| Ok(json_response(StatusCode::OK, &object));
        match (target, method) {
            (Target::Discovery(document), Method::GET) => ok(document),
            (
                Target::Collection {
                    resource,
                    namespace,
                },
                Method::GET,
            ) => {
                let filter = filter(resource, namespace, &query)?;
                if is_true(query.get("watch")) {
                    return self.watch(resource, filter, &query);
                }
                let (items, resource_version) = store.list(resource, |o| filter.matches(o));
                ok(list(resource, items, resource_version))
            }
            (
                Target::Collection {
                    resource,
                    namespace,
                },
                Method::POST,
            ) if resource.namespaced() == namespace.is_some() => {
                let body = json_body(request, &content_type).await?;
                let created = store.create(resource, namespace.as_deref().unwrap_or(""), body)?;
                Ok(json_response(StatusCode::CREATED, &created))
            }
            (
                Target::Object {
                    resource,
                    namespace,
                    name,
                    ..
                },
                Method::GET,
            ) => ok(store.get(resource, &namespace, &name)?),
            (
                Target::Object {
                    resource,
                    namespace,
                    name,
                    status,
                },
                Method::PATCH,
            ) => {
                let patch_type = PatchType::from_content_type(&content_type).ok_or_else(|| {
                    ApiError::unsupported_media_type(&content_type, PatchType::ACCEPTED)
                })?;
                let patch = parse_json(&read_body(request).await?)?;
                let updated = store.update(resource, &namespace, &name, |current| {
                    let patched = patch_type
                        .apply(current, &patch)
                        .map_err(ApiError::bad_request)?;
                    Ok(scope_to(status, current, patched))
                })?;
                ok(updated)
            }
            (
                Target::Object {
                    resource,
                    namespace,
                    name,
                    status,
                },
                Method::PUT,
            ) => {
                let body = json_body(request, &content_type).await?;
                let updated = store.update(resource, &namespace, &name, |current| {
                    Ok(scope_to(status, current, body))
                })?;
                ok(updated)
            }
            (
                Target::Object {
                    resource,
                    namespace,
                    name,
                    status: false,
                },
                Method::DELETE,
            ) => ok(store.delete(resource, &namespace, &name)?),
            (_, method) => Err(ApiError::method_not_allowed(method.as_str())),
        }
    }

    fn watch(
        &self,
        resource: Resource,
        filter: Filter,
        query: &HashMap<String, String>,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let version = query
            .get("resourceVersion")
            .map(String::as_str)
            .unwrap_or("");
        // Unset and "0" both start now, after synthetic additions of what is there
        // (`sendInitialEvents=false` asks for none).
        let after = match version {
            "" | "0" => None,
            text => Some(text.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version {text:?}"))
            })?),
        };
        // Absent or 0: the server's own length.
        let timeout = match query.get("timeoutSeconds").map(|text| text.parse::<u64>()) {
            Some(Ok(0)) | None => self.config.watch_timeout,
            Some(Ok(seconds)) => Duration::from_secs(seconds),
            Some(Err(_)) => return Err(ApiError::bad_request("invalid timeoutSeconds")),
        };
        let send_initial = query.get("sendInitialEvents").map(String::as_str);
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        let mut subscription = match self.store.subscribe(resource, after) {
            Ok(subscription) => subscription,
            Err(gone) if gone.code == 410 => {
                let body = Full::new(watch::error_line(&gone)).boxed();
                return Ok(streaming_response(body));
            }
            Err(error) => return Err(error),
        };
        if send_initial == Some("false") && after.is_none() {
            subscription.start = Start::Now(Vec::new());
        }
        let watch = Watch {
            resource,
            filter,
            bookmarks: is_true(query.get("allowWatchBookmarks")),
            initial_events_end: send_initial == Some("true"),
            bookmark_interval: self.config.bookmark_interval,
            deadline: Instant::now() + timeout,
        };
        tokio::spawn(watch.run(subscription, sender, self.shutdown.clone()));
        Ok(streaming_response(ChannelBody(receiver).boxed()))
    }
}

/// A write to a status subresource changes only the status; a write to the object, all but
/// the status (the real server's split for both resources).
fn scope_to(status: bool, current: &Value, written: Value) -> Value {
    let (mut result, from) = if status {
        (current.clone(), &written)
    } else {
        (written.clone(), current)
    };
    // A body that is not an object is left for the store to refuse.
    if let Value::Object(result_map) = &mut result {
        match from.get("status") {
            Some(value) => result_map.insert("status".to_owned(), value.clone()),
            None => result_map.remove("status"),
        };
    }
    result
}

fn filter(
    resource: Resource,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Filter, ApiError> {
    let selector = |name: &str| query.get(name).map(String::as_str).unwrap_or("");
    Ok(Filter {
        namespace,
        labels: LabelSelector::parse(selector("labelSelector")).map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(selector("fieldSelector"), resource)
            .map_err(ApiError::bad_request)?,
    })
}

/// A boolean parameter, spelled any way the real server (Go's `ParseBool`) reads as true.
fn is_true(value: Option<&String>) -> bool {
    matches!(
        value.map(String::as_str),
        Some("true" | "1" | "t" | "T" | "TRUE" | "True")
    )
}

/// A list as the real server writes it: its items without kind and apiVersion, no continue
/// token (everything comes in one page, whatever `limit` said).
fn list(resource: Resource, items: Vec<Value>, resource_version: u64) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut item| {
            if let Value::Object(map) = &mut item {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    json!({
        "kind": resource.list_kind(),
        "apiVersion": "v1",
        "metadata": { "resourceVersion": resource_version.to_string() },
        "items": items,
    })
}

fn target(path: &str) -> Result<Target, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resource = |plural: &str| Resource::from_plural(plural).ok_or_else(ApiError::no_route);
    let object = |resource, namespace: &str, name: &str, status| Target::Object {
        resource,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        status,
    };
    let target = match segments.as_slice() {
        ["api"] => Target::Discovery(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "" }],
        })),
        ["apis"] => Target::Discovery(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [],
        })),
        ["api", "v1"] => {
            let resources: Vec<Value> = [Resource::Namespaces, Resource::Pods]
                .into_iter()
                .flat_map(Resource::discovery)
                .collect();
            Target::Discovery(json!({
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": resources,
            }))
        }
        ["version"] => Target::Discovery(json!({
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-fake",
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "rustc",
            "platform": "linux/amd64",
        })),
        ["api", "v1", plural] => Target::Collection {
            resource: resource(plural)?,
            namespace: None,
        },
        ["api", "v1", "namespaces", name] => object(Resource::Namespaces, "", name, false),
        ["api", "v1", "namespaces", name, "status"] => object(Resource::Namespaces, "", name, true),
        ["api", "v1", "namespaces", namespace, plural] => match resource(plural)? {
            Resource::Pods => Target::Collection {
                resource: Resource::Pods,
                namespace: Some((*namespace).to_owned()),
            },
            Resource::Namespaces => return Err(ApiError::no_route()),
        },
        ["api", "v1", "namespaces", namespace, "pods", name] => {
            object(Resource::Pods, namespace, name, false)
        }
        ["api", "v1", "namespaces", namespace, "pods", name, "status"] => {
            object(Resource::Pods, namespace, name, true)
        }
        _ => return Err(ApiError::no_route()),
    };
    Ok(target)
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

/// A create's or replace's body: JSON (YAML and protobuf are not spoken here).
async fn json_body(request: Request<Incoming>, content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.is_empty() && media != "application/json" && media != "*/*" {
        return Err(ApiError::unsupported_media_type(
            content_type,
            "application/json",
        ));
    }
    parse_json(&read_body(request).await?)
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn streaming_response(body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A response body fed by a watch's task, a chunk per event; it ends when the task does.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(Frame::data(bytes))))
    }
}
