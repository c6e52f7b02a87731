//! Label and field selectors, with the real server's syntax and meaning: requirements joined
//! by commas, all of which must hold; `!=` and `notin` hold for an object without the label.

use crate::resource::Resource;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_outside_parens(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(key, value) => label(key) == Some(value.as_str()),
            Requirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            Requirement::Exists(key) => label(key).is_some(),
            Requirement::NotExists(key) => label(key).is_none(),
            Requirement::In(key, values) => {
                label(key).is_some_and(|l| values.iter().any(|v| v == l))
            }
            Requirement::NotIn(key, values) => {
                !label(key).is_some_and(|l| values.iter().any(|v| v == l))
            }
        })
    }
}

/// Commas inside `in (a,b)` separate values, not requirements.
fn split_outside_parens(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(label_key(key.trim())?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(
            label_key(key.trim())?,
            label_value(value.trim())?,
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(
            label_key(key.trim())?,
            label_value(value.trim())?,
        ));
    }
    if let Some(open) = term.find('(') {
        let mut words = term[..open].split_whitespace();
        let (Some(key), Some(operator), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("unable to parse requirement: {term:?}"));
        };
        let Some(inside) = term[open + 1..].trim_end().strip_suffix(')') else {
            return Err(format!(
                "unable to parse requirement: {term:?}: missing ')'"
            ));
        };
        let values = inside
            .split(',')
            .map(|v| label_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let key = label_key(key)?;
        return match operator {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            other => Err(format!(
                "unable to parse requirement: unknown operator {other:?}"
            )),
        };
    }
    Ok(Requirement::Exists(label_key(term)?))
}

fn label_key(key: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn label_value(value: &str) -> Result<String, String> {
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

/// A parsed `fieldSelector`: each term is `field=value`, `field==value` or `field!=value` on
/// one of the fields the resource indexes; an absent field reads as "".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(&'static str, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str, resource: Resource) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((field, value)) = term.split_once("!=") {
                (field, false, value)
            } else if let Some((field, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (field, true, value)
            } else {
                return Err(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                ));
            };
            let pointer = resource
                .selectable_field(field.trim())
                .ok_or_else(|| format!("field label not supported: {}", field.trim()))?;
            terms.push((pointer, equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = match object.pointer(pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => String::new(),
            };
            (actual == *value) == *equal
        })
    }
}

/// What a list or watch selects: a namespace (or all), labels and fields.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        let in_namespace = self.namespace.as_deref().is_none_or(|namespace| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(namespace)
        });
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({ "metadata": { "name": "x", "labels": labels } })
    }

    #[test]
    fn label_selectors_have_the_real_servers_meaning() {
        let demo = labelled(json!({ "istio.io/dataplane-mode": "ambient", "app": "web" }));
        let bare = labelled(json!({}));
        let cases = [
            ("", true, true),
            ("istio.io/dataplane-mode=ambient", true, false),
            ("istio.io/dataplane-mode==ambient", true, false),
            ("istio.io/dataplane-mode!=ambient", false, true),
            ("istio.io/dataplane-mode!=none", true, true),
            ("app", true, false),
            ("!app", false, true),
            ("app=web,istio.io/dataplane-mode=ambient", true, false),
            ("app=web, !istio.io/dataplane-mode", false, false),
            ("app in (web,db)", true, false),
            ("app notin (web, db)", false, true),
            ("app in (db),app", false, false),
        ];
        for (text, on_demo, on_bare) in cases {
            let selector = LabelSelector::parse(text).unwrap();
            assert_eq!(selector.matches(&demo), on_demo, "{text} on demo");
            assert_eq!(selector.matches(&bare), on_bare, "{text} on bare");
        }
    }

    #[test]
    fn bad_label_selectors_are_refused() {
        for text in ["a b", "=x", "a in (b", "a within (b)", "a=b c", "a=(b)"] {
            assert!(LabelSelector::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn field_selectors_read_the_indexed_fields() {
        let scheduled = json!({ "metadata": { "name": "a", "namespace": "demo" },
            "spec": { "nodeName": "node-a", "hostNetwork": true }, "status": { "phase": "Running" } });
        let pending = json!({ "metadata": { "name": "b", "namespace": "demo" }, "spec": {} });
        let cases = [
            ("spec.nodeName=node-a", true, false),
            ("spec.nodeName=", false, true),
            ("spec.nodeName!=node-a", false, true),
            ("metadata.namespace==demo,metadata.name=a", true, false),
            ("status.phase=Running", true, false),
            ("spec.hostNetwork=true", true, false),
        ];
        for (text, on_scheduled, on_pending) in cases {
            let selector = FieldSelector::parse(text, Resource::Pods).unwrap();
            assert_eq!(selector.matches(&scheduled), on_scheduled, "{text}");
            assert_eq!(selector.matches(&pending), on_pending, "{text}");
        }
        let refused = FieldSelector::parse("spec.nodeName=a", Resource::Namespaces);
        assert_eq!(
            refused.unwrap_err(),
            "field label not supported: spec.nodeName"
        );
        assert!(FieldSelector::parse("spec.nodeName", Resource::Pods).is_err());
    }
}
