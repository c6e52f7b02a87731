//! The operator's HTTP endpoints: the admin API (localhost only: `/config_dump`,
//! `/connections`, `/logging`, `/quitquitquit`), the Prometheus metrics (`/metrics`,
//! `/stats/prometheus`) and readiness (`/healthz/ready`).

use crate::api::ConfigDump;
use crate::api_server::ApiServer;
use crate::web::{Call, Reply};
use http::{Method, StatusCode};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";

/// Installs a log filter, or says why it cannot.
type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the daemon's log filter at run time.
pub struct LogControl {
    current: Mutex<String>,
    set: SetFilter,
}

impl LogControl {
    /// `set` installs a new filter (tracing EnvFilter syntax) or says why it cannot.
    pub fn new(
        initial: &str,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> LogControl {
        LogControl {
            current: Mutex::new(initial.to_owned()),
            set: Box::new(set),
        }
    }

    fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn change(&self, filter: &str) -> Result<(), String> {
        (self.set)(filter)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        Ok(())
    }
}

pub struct Admin {
    pub api: Arc<ApiServer>,
    pub log: LogControl,
    /// Notified by `/quitquitquit`: the daemon drains and exits, as on SIGTERM.
    pub quit: Arc<Notify>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, call: Call) -> Reply {
        match (&call.method, call.path.as_str()) {
            (&Method::GET, "/") => Reply::text(StatusCode::OK, INDEX),
            (&Method::GET, "/config_dump") => Reply::json(&self.config_dump().await),
            (&Method::GET, "/connections") => Reply::json(&self.api.ctx.connections.snapshot()),
            (&Method::GET, "/logging") => Reply::text(
                StatusCode::OK,
                format!("log level: {}\n", self.log.current()),
            ),
            (&Method::POST, "/logging") => match call.param("level") {
                Some(level) => match self.log.change(&percent_decoded(level)) {
                    Ok(()) => {
                        tracing::info!(level, "log level changed through the admin API");
                        Reply::text(
                            StatusCode::OK,
                            format!("log level: {}\n", self.log.current()),
                        )
                    }
                    Err(err) => Reply::text(
                        StatusCode::BAD_REQUEST,
                        format!("invalid log level {level:?}: {err}\n"),
                    ),
                },
                None => Reply::text(
                    StatusCode::BAD_REQUEST,
                    "POST /logging?level=<filter>, e.g. level=debug or level=info,ztunnel_user::proxy=debug\n",
                ),
            },
            (&Method::POST, "/quitquitquit") => {
                self.quit.notify_one();
                Reply::text(StatusCode::OK, "draining, then exiting\n")
            }
            _ => Reply::not_found(&call),
        }
    }

    pub async fn config_dump(&self) -> ConfigDump {
        let config = self.api.ctx.mesh.current();
        ConfigDump {
            status: self.api.status().await,
            not_ready: self.api.ctx.readiness.check().err(),
            workloads: config.workloads.clone(),
            services: config.services.clone(),
            policies: config.policies.all().to_vec(),
        }
    }
}

const INDEX: &str = "ztunnel admin API
GET  /config_dump          status, enrolled pods and their hooks, certificates, kernel counters, mesh config
GET  /connections          open and recent proxied connections
GET  /logging              the log filter in force
POST /logging?level=F      change it (tracing EnvFilter syntax)
POST /quitquitquit         drain and exit
";

/// `%2C` and friends, as curl or a browser may encode a filter.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/metrics` and `/stats/prometheus`.
pub fn metrics(registry: &Registry, call: &Call) -> Reply {
    match (&call.method, call.path.as_str()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => Reply {
            status: StatusCode::OK,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: crate::metrics::render(registry),
        },
        _ => Reply::not_found(call),
    }
}

/// `/healthz/ready`: 200 once ready, else 503 naming what is missing.
pub fn readiness(readiness: &crate::readiness::Readiness, call: &Call) -> Reply {
    match (&call.method, call.path.as_str()) {
        (&Method::GET, "/healthz/ready") => match readiness.check() {
            Ok(()) => Reply::text(StatusCode::OK, "ready\n"),
            Err(missing) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {missing}\n"),
            ),
        },
        _ => Reply::not_found(call),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_percent_decoded() {
        assert_eq!(
            percent_decoded("info%2Cztunnel_user%3A%3Aproxy%3Ddebug"),
            "info,ztunnel_user::proxy=debug"
        );
        assert_eq!(percent_decoded("debug"), "debug");
        assert_eq!(percent_decoded("bad%zz%"), "bad%zz%");
    }
}
