//! Plain-text tables for the CLI.

use crate::api::{ConnectionRecord, Status};
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

pub fn status_table(status: &Status) -> String {
    let pods: Vec<Vec<String>> = status
        .pods
        .iter()
        .map(|p| {
            let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
            vec![
                format!("{}/{}", p.namespace, p.name),
                ips.join(","),
                p.identity.clone(),
                p.links.len().to_string(),
                p.cgroup.display().to_string(),
            ]
        })
        .collect();
    let counters: Vec<Vec<String>> = status
        .counters
        .iter()
        .map(|c| vec![c.name.clone(), c.value.to_string()])
        .collect();
    let certificates: Vec<Vec<String>> = status
        .certificates
        .iter()
        .map(|c| vec![c.identity.clone(), c.expires_unix.to_string()])
        .collect();
    format!(
        "node {}: {} enrolled pod(s)\n\n{}\n{}\n{}",
        status.node,
        status.pods.len(),
        table(&["POD", "IPS", "IDENTITY", "LINKS", "CGROUP"], &pods),
        table(&["CERTIFICATE", "EXPIRES (UNIX)"], &certificates),
        table(&["KERNEL COUNTER", "VALUE"], &counters)
    )
}

pub fn connections_table(connections: &[ConnectionRecord]) -> String {
    let rows: Vec<Vec<String>> = connections
        .iter()
        .map(|c| {
            vec![
                format!("{:?}", c.direction).to_lowercase(),
                c.pod.clone(),
                c.source.to_string(),
                c.original_destination.to_string(),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
                if c.open {
                    "open".into()
                } else {
                    c.error.clone().unwrap_or_else(|| "closed".into())
                },
            ]
        })
        .collect();
    table(
        &[
            "DIRECTION",
            "POD",
            "SOURCE",
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
}
