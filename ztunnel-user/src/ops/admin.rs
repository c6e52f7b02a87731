//! The admin API (keep it on localhost): `/config_dump`, `/connections`, `/logging`,
//! `/quitquitquit`. What changes the daemon (a POST) is taken only from a loopback address
//! and with the `x-ztunnel-admin` header: a browser sends no custom header cross-origin
//! without asking first (a CORS preflight this API never allows), so no web page can make a
//! browser on the node stop the daemon.

use super::api_server::ApiServer;
use super::http::{Call, Reply};
use super::logging::LogControl;
use crate::api::ConfigDump;
use crate::mesh::authz::Policy;
use crate::settings::Settings;
use http::{Method, StatusCode};
use std::sync::Arc;
use tokio::sync::Notify;

pub(crate) struct Admin {
    pub(crate) api: Arc<ApiServer>,
    pub(crate) log: LogControl,
    /// Notified by `/quitquitquit`: the daemon drains and exits, as on SIGTERM.
    pub(crate) quit: Arc<Notify>,
}

/// The header a POST must carry (any value).
pub(crate) const ADMIN_HEADER: &str = "x-ztunnel-admin";

impl Admin {
    pub(crate) async fn handle(self: Arc<Self>, call: Call) -> Reply {
        if call.method == Method::POST
            && let Err(refused) = may_change(&call)
        {
            return refused;
        }
        match (&call.method, call.path.as_str()) {
            (&Method::GET, "/") => Reply::text(StatusCode::OK, INDEX),
            (&Method::GET, "/config_dump") => Reply::json(&self.config_dump().await),
            (&Method::GET, "/connections") => Reply::json(&self.api.ctx.connections.snapshot()),
            (&Method::GET, "/logging") => Reply::text(
                StatusCode::OK,
                format!("log level: {}\n", self.log.current()),
            ),
            (&Method::POST, "/logging") => match call.param("level") {
                Some(level) => match self.log.change(&level) {
                    Ok(()) => {
                        tracing::info!(level, "log level changed through the admin API");
                        Reply::text(
                            StatusCode::OK,
                            format!("log level: {}\n", self.log.current()),
                        )
                    }
                    Err(err) => Reply::text(StatusCode::BAD_REQUEST, format!("{err}\n")),
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

    async fn config_dump(&self) -> ConfigDump {
        let ctx = &self.api.ctx;
        let config = ctx.mesh.current();
        ConfigDump {
            status: self.api.status().await,
            not_ready: self.api.readiness.check().err().map(|err| err.to_string()),
            settings: Settings::clone(&ctx.settings),
            limits: ctx.admission.limits().clone(),
            workloads: config.sorted_workloads(),
            services: config.sorted_services(),
            policies: config
                .policies
                .all()
                .iter()
                .map(|p| Policy::clone(p))
                .collect(),
            accepted_not_used: config.accepted_not_used().map(str::to_owned).collect(),
        }
    }
}

/// Whether `call` may change the daemon: from loopback, with the admin header.
fn may_change(call: &Call) -> Result<(), Reply> {
    if !call.peer.ip().to_canonical().is_loopback() {
        return Err(Reply::text(
            StatusCode::FORBIDDEN,
            format!("POST {} is taken from a loopback address only\n", call.path),
        ));
    }
    if !call.headers.contains_key(ADMIN_HEADER) {
        return Err(Reply::text(
            StatusCode::FORBIDDEN,
            format!(
                "POST {} needs the header `{ADMIN_HEADER}: true`\n",
                call.path
            ),
        ));
    }
    Ok(())
}

const INDEX: &str = "ztunnel admin API
GET  /config_dump          settings, status, enrolled pods and their hooks, certificates, kernel counters, mesh config
GET  /connections          open and recent proxied connections
GET  /logging              the log filter in force
POST /logging?level=F      change it (tracing EnvFilter syntax)
POST /quitquitquit         drain and exit
(a POST is taken from loopback only, with the header `x-ztunnel-admin: true`)
";

#[cfg(test)]
mod tests {
    use super::*;

    fn post(peer: &str, headers: &[(&'static str, &'static str)]) -> Call {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, http::HeaderValue::from_static(value));
        }
        Call {
            peer: peer.parse().unwrap(),
            method: Method::POST,
            path: "/quitquitquit".into(),
            query: String::new(),
            headers: map,
        }
    }

    #[test]
    fn a_post_needs_loopback_and_the_admin_header() {
        let with_header = [(ADMIN_HEADER, "true")];
        assert!(may_change(&post("127.0.0.1:40000", &with_header)).is_ok());
        assert!(may_change(&post("[::1]:40000", &with_header)).is_ok());
        assert!(may_change(&post("[::ffff:127.0.0.1]:40000", &with_header)).is_ok());
        for refused in [
            post("127.0.0.1:40000", &[("content-type", "text/plain")]),
            post("10.0.0.7:40000", &with_header),
        ] {
            let reply = may_change(&refused).unwrap_err();
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
        }
    }
}
