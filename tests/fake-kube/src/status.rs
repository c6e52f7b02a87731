//! The API server's errors: `Status` objects with the HTTP code, reason and message a real
//! server gives, so clients (kube-rs's `ErrorResponse`, kubectl) read them as they would there.

use serde_json::{Value, json};

/// A failed request, answered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// The object the error is about (`details.name` and `details.kind`), when there is one.
    details: Option<(String, &'static str)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn about(mut self, name: &str, plural: &'static str) -> Self {
        self.details = Some((name.to_owned(), plural));
        self
    }

    pub fn not_found(plural: &'static str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{plural} \"{name}\" not found")).about(name, plural)
    }

    pub fn already_exists(plural: &'static str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{plural} \"{name}\" already exists"),
        )
        .about(name, plural)
    }

    pub fn conflict(plural: &'static str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        )
        .about(name, plural)
    }

    pub fn invalid(plural: &'static str, name: &str, why: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{plural} \"{name}\" is invalid: {why}"),
        )
        .about(name, plural)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }

    /// A path the server does not serve; the real server's 404 for it has no details.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
        )
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )
    }

    /// A body in a format not spoken here; `accepted` lists the media types that are.
    pub fn unsupported_media_type(content_type: &str, accepted: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted \
                 media types include: {accepted}"
            ),
        )
    }

    /// A watch from a resourceVersion older than the history kept (sent in a watch's `ERROR`
    /// event, as the real server does).
    pub fn gone(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// A resourceVersion the server has not reached (the real server waits a few seconds
    /// first; this one has nothing to wait for, as only its own writes move the counter).
    pub fn too_large(requested: u64, current: u64) -> Self {
        Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        )
    }

    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, kind)) = &self.details {
            status["details"] = json!({ "name": name, "kind": kind });
        }
        status
    }
}
