//! The operator's commands (`ztunnel status`, `pods`, `workloads`, `services`, `policies`,
//! `certs`, `connections`): each reads the running daemon's admin API and prints a table or
//! the JSON behind it.

mod output;

use crate::api::{ConfigDump, ConnectionRecord};
use crate::host::process::unix_now;
use crate::ops::http::{RequestError, request};
use crate::settings::DEFAULT_ADMIN_ADDR;
use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The operator's commands.
#[derive(Subcommand)]
pub enum Command {
    /// Readiness, the settings and mesh config in force, enrolled pods, certificates, kernel
    /// counters.
    Status(ClientArgs),
    /// The enrolled pods, their identities and capture hooks.
    Pods(ClientArgs),
    /// The workloads of the mesh config in force.
    Workloads(ClientArgs),
    /// The services of the mesh config in force, with their healthy endpoints.
    Services(ClientArgs),
    /// The authorization policies in force.
    Policies(ClientArgs),
    /// The workload certificates the daemon holds, and when they expire.
    Certs(ClientArgs),
    /// The connections the daemon proxied (open and recent).
    Connections(ClientArgs),
}

#[derive(Args)]
pub struct ClientArgs {
    /// The daemon's admin API.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    admin: SocketAddr,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    /// A part of `/config_dump`.
    Dump(Section),
    Connections,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Status,
    Pods,
    Workloads,
    Services,
    Policies,
    Certs,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot start the command's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("the admin API at {addr} answered something unreadable for {path}: {source}")]
    Decode {
        addr: SocketAddr,
        path: &'static str,
        source: serde_json::Error,
    },
}

/// Runs `command`: asks the daemon and prints the answer.
pub fn run(command: Command) -> Result<(), CliError> {
    let (args, view) = match command {
        Command::Status(args) => (args, View::Dump(Section::Status)),
        Command::Pods(args) => (args, View::Dump(Section::Pods)),
        Command::Workloads(args) => (args, View::Dump(Section::Workloads)),
        Command::Services(args) => (args, View::Dump(Section::Services)),
        Command::Policies(args) => (args, View::Dump(Section::Policies)),
        Command::Certs(args) => (args, View::Dump(Section::Certs)),
        Command::Connections(args) => (args, View::Connections),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let json = matches!(args.output, Format::Json);
    let text = runtime.block_on(show(args.admin, view, json))?;
    print!("{text}");
    Ok(())
}

/// What `view` prints, as a table or as JSON.
async fn show(admin: SocketAddr, view: View, json: bool) -> Result<String, CliError> {
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
            output::certificates_table(&dump.status.certificates, unix_now())
        }
    })
}

async fn fetch<T: serde::de::DeserializeOwned>(
    admin: SocketAddr,
    path: &'static str,
) -> Result<T, CliError> {
    let body = request(admin, Method::GET, path, TIMEOUT).await?;
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
