//! The operator's commands (`ztunnel status`, `pods`, `workloads`, `services`, `policies`,
//! `certs`, `connections`): each reads the running daemon's admin API and prints a table or
//! the JSON behind it.

use crate::api::{ConfigDump, ConnectionRecord};
use crate::output;
use crate::web::{self, RequestError};
use http::Method;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// A part of `/config_dump`.
    Dump(Section),
    Connections,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Status,
    Pods,
    Workloads,
    Services,
    Policies,
    Certs,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("the admin API at {addr} answered something unreadable for {path}: {source}")]
    Decode {
        addr: SocketAddr,
        path: &'static str,
        source: serde_json::Error,
    },
}

/// What `view` prints, as a table or as JSON.
pub async fn show(admin: SocketAddr, view: View, json: bool) -> Result<String, CliError> {
    let section = match view {
        View::Connections => {
            let connections: Vec<ConnectionRecord> = fetch(admin, "/connections").await?;
            return Ok(if json {
                to_json(&connections)
            } else {
                output::connections_table(&connections)
            });
        }
        View::Dump(section) => section,
    };
    let dump: ConfigDump = fetch(admin, "/config_dump").await?;
    Ok(match (section, json) {
        (Section::Status, true) => to_json(&dump),
        (Section::Status, false) => output::status_table(&dump),
        (Section::Pods, true) => to_json(&dump.status.pods),
        (Section::Pods, false) => output::pods_table(&dump.status.pods),
        (Section::Workloads, true) => to_json(&dump.workloads),
        (Section::Workloads, false) => output::workloads_table(&dump.workloads),
        (Section::Services, true) => to_json(&dump.services),
        (Section::Services, false) => output::services_table(&dump.services, &dump.workloads),
        (Section::Policies, true) => to_json(&dump.policies),
        (Section::Policies, false) => output::policies_table(&dump.policies),
        (Section::Certs, true) => to_json(&dump.status.certificates),
        (Section::Certs, false) => {
            output::certificates_table(&dump.status.certificates, crate::process::unix_now())
        }
    })
}

async fn fetch<T: serde::de::DeserializeOwned>(
    admin: SocketAddr,
    path: &'static str,
) -> Result<T, CliError> {
    let body = web::request(admin, Method::GET, path, TIMEOUT).await?;
    serde_json::from_str(&body).map_err(|source| CliError::Decode {
        addr: admin,
        path,
        source,
    })
}

fn to_json(value: &impl Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("API values serialize");
    text.push('\n');
    text
}
