//! Plain-text tables for the CLI.

use crate::api::{CertificateInfo, ConfigDump, ConnectionRecord, EnrolledPod, PodWaiting};
use crate::mesh::authz::Policy;
use crate::mesh::config::{GatewayDestination, HealthStatus, Protocol, Service, Workload};
use crate::xds::client::XdsStatus;
use std::fmt::Write as _;

/// Left-aligned columns sized to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The xDS stream's state and each type's resources and last ACK or NACK.
fn xds_lines(xds: &XdsStatus) -> String {
    let mut out = format!(
        "istiod xDS: {}, {}, {} attempt(s)\n",
        if xds.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        if xds.ready {
            "synced"
        } else {
            "not synced yet"
        },
        xds.attempts
    );
    if let (false, Some(error)) = (xds.connected, &xds.last_error) {
        let _ = writeln!(out, "  last error: {error}");
    }
    for kind in &xds.types {
        let name = kind.type_url.rsplit('.').next().unwrap_or(&kind.type_url);
        let _ = write!(out, "  {name}: {} resource(s)", kind.resources);
        if let Some(ack) = &kind.last_ack {
            let _ = write!(out, ", last ACK nonce {}", ack.nonce);
        }
        out.push('\n');
        if let Some(nack) = &kind.last_nack {
            let _ = writeln!(out, "    last NACK nonce {}: {}", nack.nonce, nack.message);
        }
    }
    out
}

pub(super) fn status_table(dump: &ConfigDump) -> String {
    let status = &dump.status;
    let config = &status.mesh.config;
    let mut out = format!(
        "node {}: {}\n",
        status.node,
        match &dump.not_ready {
            None => "ready".to_owned(),
            Some(missing) => format!("NOT READY, waiting for {missing}"),
        }
    );
    match &config.path {
        Some(path) => {
            let _ = writeln!(
                out,
                "mesh config {} (version {}, generation {}): {} workloads, {} services, {} policies",
                path.display(),
                config.version,
                config.generation,
                status.mesh.workloads.len(),
                status.mesh.services,
                status.mesh.policies
            );
            if let Some(rejected) = &config.rejected {
                let _ = writeln!(
                    out,
                    "  newest file REFUSED, the version above stays in force: {rejected}"
                );
            }
        }
        None if status.xds.is_none() => {
            out.push_str(
                "no mesh config file and no istiod: every destination is outside the mesh\n",
            );
        }
        None => {}
    }
    if let Some(xds) = &status.xds {
        out.push_str(&xds_lines(xds));
    }
    let counters: Vec<Vec<String>> = status
        .counters
        .iter()
        .map(|c| vec![c.name.clone(), c.value.to_string()])
        .collect();
    let waiting = status.pods.iter().filter(|p| p.waiting.is_some()).count();
    let _ = write!(
        out,
        "\n{} enrolled pod(s), {} served, {} waiting (captured, connections refused)\n{}\n{}\n{}",
        status.pods.len(),
        status.pods.len() - waiting,
        waiting,
        pods_table(&status.pods),
        certificates_table(&status.certificates, crate::host::process::unix_now()),
        table(&["KERNEL COUNTER", "VALUE"], &counters)
    );
    out
}

pub(super) fn pods_table(pods: &[EnrolledPod]) -> String {
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            let hooks: Vec<String> = p
                .links
                .iter()
                .filter_map(|l| Some(l.file_name()?.to_string_lossy().into_owned()))
                .collect();
            let state = match &p.waiting {
                None => "serving".to_owned(),
                Some(PodWaiting { reason, attempts }) => {
                    format!("WAITING ({attempts} attempts): {reason}")
                }
            };
            vec![
                if p.name.is_empty() {
                    format!("uid {}", p.uid)
                } else {
                    format!("{}/{}", p.namespace, p.name)
                },
                list(&p.ips),
                dash(&p.identity),
                hooks.join(","),
                dash(&p.cgroup.display().to_string()),
                state,
            ]
        })
        .collect();
    table(
        &["POD", "IPS", "IDENTITY", "HOOKS", "CGROUP", "STATE"],
        &rows,
    )
}

pub(super) fn workloads_table(workloads: &[Workload]) -> String {
    let rows: Vec<Vec<String>> = workloads
        .iter()
        .map(|w| {
            vec![
                w.label(),
                list(&w.workload_ips),
                match w.protocol {
                    Protocol::Hbone => "HBONE".into(),
                    Protocol::Tcp => "TCP".into(),
                },
                dash(&w.node),
                w.identity().to_string(),
                w.waypoint
                    .as_ref()
                    .map_or("-".into(), |wp| waypoint_name(&wp.destination)),
                format!("{:?}", w.status),
            ]
        })
        .collect();
    table(
        &[
            "WORKLOAD", "IPS", "PROTOCOL", "NODE", "IDENTITY", "WAYPOINT", "STATUS",
        ],
        &rows,
    )
}

pub(super) fn services_table(services: &[Service], workloads: &[Workload]) -> String {
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let key = s.key();
            let endpoints = workloads.iter().filter(|w| w.services.contains_key(&key));
            let healthy = endpoints
                .clone()
                .filter(|w| w.status == HealthStatus::Healthy)
                .count();
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|(port, target)| match target {
                    0 => port.to_string(),
                    target => format!("{port}->{target}"),
                })
                .collect();
            vec![
                format!("{}/{}", s.namespace, s.name),
                s.hostname.clone(),
                list(&s.vips.iter().map(|v| v.ip).collect::<Vec<_>>()),
                ports.join(","),
                format!("{healthy}/{}", endpoints.count()),
                s.waypoint
                    .as_ref()
                    .map_or("-".into(), |wp| waypoint_name(&wp.destination)),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "HOSTNAME",
            "VIPS",
            "PORTS",
            "HEALTHY ENDPOINTS",
            "WAYPOINT",
        ],
        &rows,
    )
}

pub(super) fn policies_table(policies: &[Policy]) -> String {
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| {
            vec![
                p.key(),
                format!("{:?}", p.scope),
                format!("{:?}", p.action),
                p.rules.len().to_string(),
                if p.dry_run { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(&["POLICY", "SCOPE", "ACTION", "RULES", "DRY RUN"], &rows)
}

/// Certificates with their expiry, also as time left from `now` (Unix seconds).
pub(super) fn certificates_table(certificates: &[CertificateInfo], now: u64) -> String {
    let rows: Vec<Vec<String>> = certificates
        .iter()
        .map(|c| {
            let left = c.expires_unix.saturating_sub(now);
            vec![
                c.identity.clone(),
                c.expires_unix.to_string(),
                if left == 0 {
                    "EXPIRED".into()
                } else {
                    format!("{}h{:02}m{:02}s", left / 3600, left % 3600 / 60, left % 60)
                },
            ]
        })
        .collect();
    table(&["CERTIFICATE", "EXPIRES (UNIX)", "LEFT"], &rows)
}

fn list<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

fn waypoint_name(destination: &GatewayDestination) -> String {
    match destination {
        GatewayDestination::Address(address) => address.ip.to_string(),
        GatewayDestination::Hostname(name) => name.key().to_owned(),
    }
}

pub(super) fn connections_table(connections: &[ConnectionRecord]) -> String {
    let rows: Vec<Vec<String>> = connections
        .iter()
        .map(|c| {
            vec![
                format!("{:?}", c.direction).to_lowercase(),
                c.pod.clone(),
                c.source.to_string(),
                c.source_identity.clone(),
                c.original_destination.to_string(),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
                if c.open {
                    "open".into()
                } else {
                    match &c.error {
                        Some(error) => format!("{} {error}", c.response_flags),
                        None => "closed".into(),
                    }
                },
            ]
        })
        .collect();
    table(
        &[
            "DIRECTION",
            "POD",
            "SOURCE",
            "SOURCE IDENTITY",
            "ORIGINAL DESTINATION",
            "SENT",
            "RECEIVED",
            "STATE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let out = table(
            &["A", "B"],
            &[
                vec!["long cell".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, ["A          B", "long cell  x", "s          y"]);
    }

    #[test]
    fn certificates_show_the_time_left() {
        let certificates = [
            CertificateInfo {
                identity: "spiffe://td/ns/a/sa/b".into(),
                expires_unix: 10_000 + 3 * 3600 + 62,
            },
            CertificateInfo {
                identity: "spiffe://td/ns/a/sa/old".into(),
                expires_unix: 9_000,
            },
        ];
        let out = certificates_table(&certificates, 10_000);
        assert!(out.contains("3h01m02s"), "{out}");
        assert!(out.contains("EXPIRED"), "{out}");
    }
}
