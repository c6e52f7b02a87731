//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch read as a merge patch
//! (the same for labels and annotations, which is what is patched here; list merge keys and
//! `$patch` directives are not understood), and JSON patch (RFC 6902).

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    StrategicMerge,
    Json,
}

impl PatchType {
    /// The media types a PATCH may have.
    pub const ACCEPTED: &str = "application/json-patch+json, application/merge-patch+json, \
                                application/strategic-merge-patch+json";

    /// The patch type a Content-Type names (parameters such as `charset` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/json-patch+json" => Some(Self::Json),
            _ => None,
        }
    }

    pub fn apply(self, target: &Value, patch: &Value) -> Result<Value, String> {
        match self {
            Self::Merge | Self::StrategicMerge => {
                if !patch.is_object() {
                    return Err("a merge patch must be a JSON object".to_owned());
                }
                let mut patched = target.clone();
                merge(&mut patched, patch);
                Ok(patched)
            }
            Self::Json => json_patch(target, patch),
        }
    }
}

/// RFC 7386: objects merge key by key, `null` removes a key, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// RFC 6902: the operations in order, all or nothing.
fn json_patch(target: &Value, operations: &Value) -> Result<Value, String> {
    let operations = operations
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let mut document = target.clone();
    for operation in operations {
        let field = |name: &str| {
            operation
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {operation} has no string {name:?}"))
        };
        let path = field("path")?;
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| format!("operation {operation} has no \"value\""))
        };
        match field("op")? {
            "add" => add(&mut document, path, value()?)?,
            "remove" => drop(remove(&mut document, path)?),
            "replace" => {
                remove(&mut document, path)?;
                add(&mut document, path, value()?)?;
            }
            "move" => {
                let moved = remove(&mut document, field("from")?)?;
                add(&mut document, path, moved)?;
            }
            "copy" => {
                let copied = document
                    .pointer(field("from")?)
                    .cloned()
                    .ok_or_else(|| format!("no value at {:?}", field("from").unwrap_or("")))?;
                add(&mut document, path, copied)?;
            }
            "test" => {
                if document.pointer(path) != Some(&value()?) {
                    return Err(format!("test failed at {path:?}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(document)
}

/// A JSON pointer's parent and last token, unescaped (`~1` is `/`, `~0` is `~`).
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn add(document: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *document = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match document.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| format!("invalid array index in {path:?}"))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!(
            "no object or array at {parent:?} to add {path:?} to"
        )),
    }
}

fn remove(document: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let removed = match document.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&last),
        Some(Value::Array(items)) => last
            .parse::<usize>()
            .ok()
            .filter(|i| *i < items.len())
            .map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| format!("no value at {path:?} to remove"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_adds_replaces_and_null_removes() {
        let pod = json!({ "metadata": { "name": "a", "annotations": { "keep": "1", "old": "x" } },
            "spec": { "containers": [ { "name": "c" } ] } });
        let patch = json!({ "metadata": { "annotations": {
            "ambient.istio.io/redirection": "enabled", "old": null, "absent": null } },
            "spec": { "containers": [] } });
        let patched = PatchType::Merge.apply(&pod, &patch).unwrap();
        assert_eq!(
            patched,
            json!({ "metadata": { "name": "a", "annotations": {
                "keep": "1", "ambient.istio.io/redirection": "enabled" } },
                "spec": { "containers": [] } })
        );
        let created = PatchType::StrategicMerge
            .apply(
                &json!({ "metadata": { "name": "a" } }),
                &json!({ "metadata": { "labels": { "k": "v" } } }),
            )
            .unwrap();
        assert_eq!(
            created,
            json!({ "metadata": { "name": "a", "labels": { "k": "v" } } })
        );
        assert!(PatchType::Merge.apply(&pod, &json!([1])).is_err());
    }

    #[test]
    fn json_patch_applies_each_operation() {
        let doc = json!({ "metadata": { "labels": { "a": "1" } }, "list": [1, 3] });
        let patch = json!([
            { "op": "test", "path": "/metadata/labels/a", "value": "1" },
            { "op": "add", "path": "/metadata/labels/istio.io~1dataplane-mode", "value": "ambient" },
            { "op": "remove", "path": "/metadata/labels/a" },
            { "op": "add", "path": "/list/1", "value": 2 },
            { "op": "add", "path": "/list/-", "value": 4 },
            { "op": "replace", "path": "/list/0", "value": 0 },
            { "op": "copy", "from": "/list/3", "path": "/copied" },
            { "op": "move", "from": "/copied", "path": "/moved" },
        ]);
        let patched = PatchType::Json.apply(&doc, &patch).unwrap();
        assert_eq!(
            patched,
            json!({ "metadata": { "labels": { "istio.io/dataplane-mode": "ambient" } },
                "list": [0, 2, 3, 4], "moved": 4 })
        );
        for bad in [
            json!({}),
            json!([{ "op": "remove", "path": "/nothing" }]),
            json!([{ "op": "test", "path": "/list/0", "value": 9 }]),
            json!([{ "op": "add", "path": "/list/7", "value": 9 }]),
            json!([{ "op": "frobnicate", "path": "/list" }]),
        ] {
            assert!(PatchType::Json.apply(&doc, &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_types_name_patch_types() {
        let merge = PatchType::from_content_type("application/merge-patch+json; charset=utf-8");
        assert_eq!(merge, Some(PatchType::Merge));
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml"),
            None
        );
    }
}
