//! The admin API (keep it on localhost): `/config_dump`, `/connections`, `/logging`,
//! `/quitquitquit`.

use super::api_server::ApiServer;
use super::http::{Call, Reply};
use super::logging::LogControl;
use crate::api::ConfigDump;
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

impl Admin {
    pub(crate) async fn handle(self: Arc<Self>, call: Call) -> Reply {
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
            workloads: config.workloads.clone(),
            services: config.services.clone(),
            policies: config.policies.all().to_vec(),
        }
    }
}

const INDEX: &str = "ztunnel admin API
GET  /config_dump          settings, status, enrolled pods and their hooks, certificates, kernel counters, mesh config
GET  /connections          open and recent proxied connections
GET  /logging              the log filter in force
POST /logging?level=F      change it (tracing EnvFilter syntax)
POST /quitquitquit         drain and exit
";
