//! The objects, the one resourceVersion counter every write bumps, and the bounded history of
//! changes a watch resumes from. One lock orders it all: a change is numbered, kept and
//! published under it, so a watch that subscribes under it misses nothing and sees no
//! change twice.

use crate::meta;
use crate::resource::Resource;
use crate::status::ApiError;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One write, as watches see it.
#[derive(Debug)]
pub struct Change {
    pub resource_version: u64,
    pub resource: Resource,
    pub change_type: ChangeType,
    /// The object after the write; for a deletion, its last state at the deletion's version.
    pub object: Value,
    /// The object before a modification: a watch whose selector it matched but the new one
    /// does not sees the change as a deletion, and the reverse as an addition.
    pub previous: Option<Value>,
}

/// Where a watch starts.
pub enum Start {
    /// At the current version, after synthetic additions of the objects there now.
    Now(Vec<Value>),
    /// After the given version: the kept changes since then.
    After(Vec<Arc<Change>>),
}

pub struct Subscription {
    pub start: Start,
    /// The version the start reflects.
    pub resource_version: u64,
    pub changes: broadcast::Receiver<Arc<Change>>,
}

/// (resource, namespace or "" when cluster-scoped, name)
type Key = (Resource, String, String);

struct Inner {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Change>>,
}

pub struct Store {
    inner: Mutex<Inner>,
    history_limit: usize,
    changes: broadcast::Sender<Arc<Change>>,
}

impl Store {
    /// A store that keeps the last `history_limit` changes, and lets a watch fall at most
    /// `watch_backlog` changes behind before it is ended (its client then resumes).
    pub fn new(history_limit: usize, watch_backlog: usize) -> Self {
        let (changes, _) = broadcast::channel(watch_backlog.max(1));
        Self {
            inner: Mutex::new(Inner {
                resource_version: 1,
                objects: BTreeMap::new(),
                history: VecDeque::with_capacity(history_limit),
            }),
            history_limit,
            changes,
        }
    }

    /// The lock is only held for plain data operations, none of which leaves the store half
    /// written if it panicked, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The objects of `resource` that `select` takes, in name order, and the current version.
    pub fn list(&self, resource: Resource, select: impl Fn(&Value) -> bool) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = objects_of(&inner, resource)
            .filter(|object| select(object))
            .cloned()
            .collect();
        (items, inner.resource_version)
    }

    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&key(resource, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource.plural(), name))
    }

    pub fn create(
        &self,
        resource: Resource,
        namespace: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let Value::Object(mut object) = body else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        check_type(resource, &object)?;
        let mut inner = self.lock();
        let metadata = metadata_of(&mut object)?;
        let name = name_for_create(resource, metadata, inner.resource_version)?;
        if resource.namespaced() {
            match metadata.get("namespace").and_then(Value::as_str) {
                Some(given) if !given.is_empty() && given != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace \
                         sent on the request",
                    ));
                }
                _ => {}
            }
            metadata.insert("namespace".to_owned(), json!(namespace));
            if !inner
                .objects
                .contains_key(&key(Resource::Namespaces, "", namespace))
            {
                return Err(ApiError::not_found(
                    Resource::Namespaces.plural(),
                    namespace,
                ));
            }
        } else {
            metadata.remove("namespace");
        }
        let key = key(resource, namespace, &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(resource.plural(), &name));
        }
        // A uid given in the body is kept (a real server ignores it): the lab's pods have
        // fixed uids that name their cgroups.
        let has_uid = metadata
            .get("uid")
            .and_then(Value::as_str)
            .is_some_and(|uid| !uid.is_empty());
        if !has_uid {
            metadata.insert("uid".to_owned(), json!(meta::new_uid()));
        }
        metadata.insert("creationTimestamp".to_owned(), json!(meta::now()));
        default_for_create(resource, &name, &mut object);
        let mut object = Value::Object(object);
        object["kind"] = json!(resource.kind());
        object["apiVersion"] = json!("v1");
        let object = self.record(&mut inner, resource, ChangeType::Added, object, None);
        inner.objects.insert(key, object.clone());
        Ok(object)
    }

    /// Replaces an object with what `update` makes of it. Server-owned fields (uid, creation
    /// time) are kept; a resourceVersion that is given must be the current one; a write that
    /// changes nothing is not a change (no new version, no event), as on a real server.
    pub fn update(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        update: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = key(resource, namespace, name);
        let current = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource.plural(), name))?;
        let Value::Object(mut updated) = update(&current)? else {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        };
        check_type(resource, &updated)?;
        let metadata = metadata_of(&mut updated)?;
        let text = |m: &Map<String, Value>, field: &str| {
            m.get(field).and_then(Value::as_str).map(str::to_owned)
        };
        if text(metadata, "name").as_deref() != Some(name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                text(metadata, "name").unwrap_or_default()
            )));
        }
        if resource.namespaced()
            && text(metadata, "namespace").is_some_and(|given| given != namespace)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on \
                 the request",
            ));
        }
        let current_version = current.pointer("/metadata/resourceVersion").cloned();
        let current_uid = current.pointer("/metadata/uid").cloned();
        let stale = |field: &str, now: &Option<Value>| {
            metadata.get(field).is_some_and(|given| {
                !given.as_str().unwrap_or("").is_empty() && Some(given) != now.as_ref()
            })
        };
        if stale("resourceVersion", &current_version) || stale("uid", &current_uid) {
            return Err(ApiError::conflict(resource.plural(), name));
        }
        for field in ["uid", "creationTimestamp", "resourceVersion", "namespace"] {
            match current.pointer(&format!("/metadata/{field}")) {
                Some(value) => metadata.insert(field.to_owned(), value.clone()),
                None => metadata.remove(field),
            };
        }
        let mut updated = Value::Object(updated);
        updated["kind"] = json!(resource.kind());
        updated["apiVersion"] = json!("v1");
        if updated == current {
            return Ok(current);
        }
        let object = self.record(
            &mut inner,
            resource,
            ChangeType::Modified,
            updated,
            Some(current),
        );
        inner.objects.insert(key, object.clone());
        Ok(object)
    }

    /// Deletes an object at once (no graceful termination: there is no kubelet to finish it)
    /// and answers with its last state. Deleting a namespace deletes its pods first, as the
    /// namespace controller would.
    pub fn delete(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = key(resource, namespace, name);
        if !inner.objects.contains_key(&key) {
            return Err(ApiError::not_found(resource.plural(), name));
        }
        if resource == Resource::Namespaces {
            let pods: Vec<Key> = inner
                .objects
                .keys()
                .filter(|(r, ns, _)| *r == Resource::Pods && ns == name)
                .cloned()
                .collect();
            for pod in pods {
                self.remove(&mut inner, pod)?;
            }
        }
        self.remove(&mut inner, key)
    }

    fn remove(&self, inner: &mut Inner, key: Key) -> Result<Value, ApiError> {
        let resource = key.0;
        let Some(mut object) = inner.objects.remove(&key) else {
            return Err(ApiError::not_found(resource.plural(), &key.2));
        };
        object["metadata"]["deletionTimestamp"] = json!(meta::now());
        Ok(self.record(inner, resource, ChangeType::Deleted, object, None))
    }

    /// Numbers a write, stamps the object with its version, keeps it in the history and
    /// tells the watches; returns the stamped object.
    fn record(
        &self,
        inner: &mut Inner,
        resource: Resource,
        change_type: ChangeType,
        mut object: Value,
        previous: Option<Value>,
    ) -> Value {
        let resource_version = inner.resource_version + 1;
        inner.resource_version = resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        let change = Arc::new(Change {
            resource_version,
            resource,
            change_type,
            object: object.clone(),
            previous,
        });
        if inner.history.len() >= self.history_limit {
            inner.history.pop_front();
        }
        if self.history_limit > 0 {
            inner.history.push_back(change.clone());
        }
        // No watch listening is not an error.
        let _ = self.changes.send(change);
        object
    }

    /// Starts a watch on `resource`: now (`None`), or after a version, which must be within
    /// the history kept (else 410 Gone) and not in the future.
    pub fn subscribe(
        &self,
        resource: Resource,
        after: Option<u64>,
    ) -> Result<Subscription, ApiError> {
        let inner = self.lock();
        let current = inner.resource_version;
        let start = match after {
            None => Start::Now(objects_of(&inner, resource).cloned().collect()),
            Some(version) if version > current => {
                return Err(ApiError::too_large(version, current));
            }
            Some(version) => {
                // Every change after `version` must still be kept.
                let oldest_kept = inner
                    .history
                    .front()
                    .map_or(current + 1, |change| change.resource_version);
                if version + 1 < oldest_kept {
                    return Err(ApiError::gone(version, oldest_kept - 1));
                }
                Start::After(
                    inner
                        .history
                        .iter()
                        .filter(|c| c.resource_version > version && c.resource == resource)
                        .cloned()
                        .collect(),
                )
            }
        };
        Ok(Subscription {
            start,
            resource_version: current,
            changes: self.changes.subscribe(),
        })
    }
}

fn key(resource: Resource, namespace: &str, name: &str) -> Key {
    let namespace = if resource.namespaced() { namespace } else { "" };
    (resource, namespace.to_owned(), name.to_owned())
}

fn objects_of(inner: &Inner, resource: Resource) -> impl Iterator<Item = &Value> {
    inner
        .objects
        .range((resource, String::new(), String::new())..)
        .take_while(move |((r, _, _), _)| *r == resource)
        .map(|(_, object)| object)
}

/// A body's kind and apiVersion, when given, must be the resource's; its metadata, spec and
/// status objects, and its labels and annotations maps of strings (what the real server's
/// decoding insists on, and what the rest of this server relies on).
fn check_type(resource: Resource, object: &Map<String, Value>) -> Result<(), ApiError> {
    let object_or_absent =
        |value: Option<&Value>| value.is_none_or(|v| v.is_object() || v.is_null());
    let metadata = object.get("metadata");
    let shapes_ok = object_or_absent(metadata)
        && object_or_absent(object.get("spec"))
        && object_or_absent(object.get("status"))
        && ["labels", "annotations"].into_iter().all(|field| {
            match metadata.and_then(|m| m.get(field)) {
                None | Some(Value::Null) => true,
                Some(Value::Object(map)) => map.values().all(Value::is_string),
                Some(_) => false,
            }
        });
    if !shapes_ok {
        return Err(ApiError::bad_request(format!(
            "the body is not a valid {}: metadata, spec and status must be objects, labels \
             and annotations maps of strings",
            resource.kind()
        )));
    }
    let given = |field: &str| {
        object
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if let Some(kind) = given("kind").filter(|kind| *kind != resource.kind()) {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({kind}) does not match the resource ({})",
            resource.kind()
        )));
    }
    if let Some(version) = given("apiVersion").filter(|v| *v != "v1") {
        return Err(ApiError::bad_request(format!(
            "the API version of the object ({version}) is not v1"
        )));
    }
    Ok(())
}

fn metadata_of(object: &mut Map<String, Value>) -> Result<&mut Map<String, Value>, ApiError> {
    let metadata = object.entry("metadata").or_insert_with(|| json!({}));
    if metadata.is_null() {
        *metadata = json!({});
    }
    metadata
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be a JSON object"))
}

/// The name a new object gets: its own, or its generateName with a suffix (unique here: it
/// comes from the version counter, which only grows).
fn name_for_create(
    resource: Resource,
    metadata: &mut Map<String, Value>,
    resource_version: u64,
) -> Result<String, ApiError> {
    let given = |field: &str| {
        metadata
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let name = match (given("name"), given("generateName")) {
        (Some(name), _) => name,
        (None, Some(prefix)) => format!("{prefix}{:05x}", resource_version + 1),
        (None, None) => {
            return Err(ApiError::invalid(
                resource.plural(),
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
    };
    let valid = name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid {
        return Err(ApiError::invalid(
            resource.plural(),
            &name,
            "metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of \
             lower case alphanumeric characters, '-' or '.'",
        ));
    }
    metadata.insert("name".to_owned(), json!(name));
    Ok(name)
}

/// What the real server (or, for a pod's phase, the kubelet) fills in on creation.
fn default_for_create(resource: Resource, name: &str, object: &mut Map<String, Value>) {
    match resource {
        Resource::Namespaces => {
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            let spec = object_field(object, "spec");
            if spec.get("finalizers").is_none() {
                spec["finalizers"] = json!(["kubernetes"]);
            }
            object.insert("status".to_owned(), json!({ "phase": "Active" }));
        }
        Resource::Pods => {
            object_field(object, "spec");
            let status = object_field(object, "status");
            // No kubelet runs the pod: it is Running once created, unless the body says.
            if status.get("phase").is_none() {
                status["phase"] = json!("Running");
            }
        }
    }
}

/// `object[field]` as an object, made one if absent or null (`check_type` has refused any
/// other shape).
fn object_field<'a>(object: &'a mut Map<String, Value>, field: &str) -> &'a mut Value {
    let value = object.entry(field).or_insert_with(|| json!({}));
    if value.is_null() {
        *value = json!({});
    }
    value
}
