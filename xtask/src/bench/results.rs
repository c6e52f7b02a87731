//! Every value measured, by round, path, route and metric; the spreads and side-by-side
//! comparisons the report and the chart are made of.

use super::path::{Path, Route};
use serde_json::{Value, json};

/// Which node's proxy a memory figure is of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Daemon {
    /// The client pod's node.
    Source,
    /// The server pod's node.
    Destination,
}

impl Daemon {
    pub const ALL: [Daemon; 2] = [Daemon::Source, Daemon::Destination];

    pub fn name(self) -> &'static str {
        match self {
            Daemon::Source => "source",
            Daemon::Destination => "destination",
        }
    }
}

/// A kind of measurement, for the host's steal during it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Measured {
    Throughput,
    RequestResponse,
    NewConnections,
}

impl Measured {
    pub const ALL: [Measured; 3] = [
        Measured::Throughput,
        Measured::RequestResponse,
        Measured::NewConnections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measured::Throughput => "throughput",
            Measured::RequestResponse => "request/response",
            Measured::NewConnections => "new connections",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Measured::Throughput => "throughput",
            Measured::RequestResponse => "rr",
            Measured::NewConnections => "connections",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Metric {
    /// Gbit/s, iperf3, one stream.
    Throughput1,
    /// Gbit/s, iperf3 -P 8.
    Throughput8,
    /// Microseconds, request/response on one warm connection.
    LatencyP50,
    LatencyP99,
    /// New connections per second, one small request each.
    ConnectRate,
    /// Whole-machine busy CPU seconds per GB moved (1 stream, 8 streams).
    CpuPerGb1,
    CpuPerGb8,
    /// Whole-machine busy CPU seconds per 1,000 requests (round trips, new connections).
    CpuPerThousandRoundTrips,
    CpuPerThousandConnections,
    /// MiB, the node daemon with no connection.
    IdleRss(Daemon),
    /// MiB, the node daemon while the idle connections are held.
    HeldRss(Daemon),
    /// (held RSS - idle RSS) / connections.
    BytesPerConnection(Daemon),
    /// MiB, the node daemon once the idle connections are closed again.
    ClosedRss(Daemon),
    /// Percent of the machine's CPU time the host stole during such a measurement.
    Steal(Measured),
}

/// How a path's figure is put beside the baseline's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Comparison {
    /// path / baseline (throughput, rates, costs).
    Ratio,
    /// path - baseline (latency: what the path adds).
    Difference,
}

impl Metric {
    /// The figures measured on every route of every path.
    pub const ROUTE_FIGURES: [Metric; 9] = [
        Metric::Throughput1,
        Metric::Throughput8,
        Metric::LatencyP50,
        Metric::LatencyP99,
        Metric::ConnectRate,
        Metric::CpuPerGb1,
        Metric::CpuPerGb8,
        Metric::CpuPerThousandRoundTrips,
        Metric::CpuPerThousandConnections,
    ];

    pub fn label(self) -> String {
        match self {
            Metric::Throughput1 => "throughput, 1 stream, Gbit/s".into(),
            Metric::Throughput8 => "throughput, 8 streams, Gbit/s".into(),
            Metric::LatencyP50 => "request/response p50, us".into(),
            Metric::LatencyP99 => "request/response p99, us".into(),
            Metric::ConnectRate => "new connections per second".into(),
            Metric::CpuPerGb1 => "CPU s per GB, 1 stream".into(),
            Metric::CpuPerGb8 => "CPU s per GB, 8 streams".into(),
            Metric::CpuPerThousandRoundTrips => "CPU s per 1,000 round trips".into(),
            Metric::CpuPerThousandConnections => "CPU s per 1,000 connections".into(),
            Metric::IdleRss(daemon) => format!("{} daemon idle RSS, MiB", daemon.name()),
            Metric::HeldRss(daemon) => {
                format!("{} daemon RSS, idle connections held, MiB", daemon.name())
            }
            Metric::BytesPerConnection(daemon) => {
                format!("{} daemon bytes per idle connection", daemon.name())
            }
            Metric::ClosedRss(daemon) => {
                format!(
                    "{} daemon RSS, connections closed again, MiB",
                    daemon.name()
                )
            }
            Metric::Steal(measured) => {
                format!("host steal during {}, % of CPU time", measured.name())
            }
        }
    }

    /// A short name for the raw results file.
    pub fn key(self) -> String {
        match self {
            Metric::Throughput1 => "throughput_1_gbit_s".into(),
            Metric::Throughput8 => "throughput_8_gbit_s".into(),
            Metric::LatencyP50 => "rr_p50_us".into(),
            Metric::LatencyP99 => "rr_p99_us".into(),
            Metric::ConnectRate => "connections_per_s".into(),
            Metric::CpuPerGb1 => "cpu_s_per_gb_1".into(),
            Metric::CpuPerGb8 => "cpu_s_per_gb_8".into(),
            Metric::CpuPerThousandRoundTrips => "cpu_s_per_1000_rr".into(),
            Metric::CpuPerThousandConnections => "cpu_s_per_1000_connections".into(),
            Metric::IdleRss(daemon) => format!("{}_idle_rss_mib", daemon.name()),
            Metric::HeldRss(daemon) => format!("{}_held_rss_mib", daemon.name()),
            Metric::BytesPerConnection(daemon) => format!("{}_bytes_per_connection", daemon.name()),
            Metric::ClosedRss(daemon) => format!("{}_closed_rss_mib", daemon.name()),
            Metric::Steal(measured) => format!("steal_percent_{}", measured.key()),
        }
    }

    /// Decimal places worth showing.
    pub fn digits(self) -> usize {
        match self {
            Metric::Throughput1 | Metric::Throughput8 => 2,
            Metric::CpuPerGb1 | Metric::CpuPerGb8 => 2,
            Metric::CpuPerThousandRoundTrips | Metric::CpuPerThousandConnections => 3,
            Metric::IdleRss(_) | Metric::HeldRss(_) | Metric::ClosedRss(_) | Metric::Steal(_) => 1,
            _ => 0,
        }
    }

    /// The proxies' memory figures (measured on the cross-node route of the paths with
    /// proxies).
    pub fn memory_figures() -> Vec<Metric> {
        Daemon::ALL
            .into_iter()
            .flat_map(|daemon| {
                [
                    Metric::IdleRss(daemon),
                    Metric::HeldRss(daemon),
                    Metric::BytesPerConnection(daemon),
                    Metric::ClosedRss(daemon),
                ]
            })
            .collect()
    }

    pub fn comparison(self) -> Comparison {
        match self {
            Metric::LatencyP50 | Metric::LatencyP99 => Comparison::Difference,
            _ => Comparison::Ratio,
        }
    }
}

/// Median, min and max of several runs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// None for no values.
    pub fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.retain(|value| value.is_finite());
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    pub fn to_json(self) -> Value {
        json!({ "median": self.median, "min": self.min, "max": self.max })
    }

    /// "median (min–max)".
    pub fn show(self, digits: usize) -> String {
        if self.min == self.max {
            return format!("{:.digits$}", self.median);
        }
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median, self.min, self.max
        )
    }
}

/// One figure of two paths, and the first's over the second's, run by run.
pub struct SideBySide {
    pub route: Route,
    pub metric: Metric,
    pub path: Option<Spread>,
    pub other: Option<Spread>,
    /// path / other, always a ratio (latency too).
    pub ratio: Option<Spread>,
}

#[derive(Clone, Copy, Debug)]
pub struct Measurement {
    pub round: usize,
    pub path: Path,
    pub route: Route,
    pub metric: Metric,
    pub value: f64,
}

#[derive(Default)]
pub struct Results {
    pub measurements: Vec<Measurement>,
    /// Anything odd seen while measuring (failed connections, ...), for the report.
    pub anomalies: Vec<String>,
}

impl Results {
    pub fn record(&mut self, round: usize, path: Path, route: Route, metric: Metric, value: f64) {
        self.measurements.push(Measurement {
            round,
            path,
            route,
            metric,
            value,
        });
    }

    fn value(&self, round: usize, path: Path, route: Route, metric: Metric) -> Option<f64> {
        self.measurements
            .iter()
            .find(|m| m.round == round && m.path == path && m.route == route && m.metric == metric)
            .map(|m| m.value)
    }

    pub fn spread(&self, path: Path, route: Route, metric: Metric) -> Option<Spread> {
        Spread::of(
            self.measurements
                .iter()
                .filter(|m| m.path == path && m.route == route && m.metric == metric)
                .map(|m| m.value)
                .collect(),
        )
    }

    /// `path` against `baseline`, round by round (the two were measured side by side), as the
    /// metric's comparison says; the spread over the rounds.
    pub fn compared(
        &self,
        path: Path,
        baseline: Path,
        route: Route,
        metric: Metric,
    ) -> Option<Spread> {
        self.compared_as(path, baseline, route, metric, metric.comparison())
    }

    /// `compared`, by the given comparison rather than the metric's own.
    pub fn compared_as(
        &self,
        path: Path,
        baseline: Path,
        route: Route,
        metric: Metric,
        comparison: Comparison,
    ) -> Option<Spread> {
        let rounds = self.measurements.iter().map(|m| m.round).max().unwrap_or(0);
        Spread::of(
            (1..=rounds)
                .filter_map(|round| {
                    let value = self.value(round, path, route, metric)?;
                    let base = self.value(round, baseline, route, metric)?;
                    Some(match comparison {
                        Comparison::Ratio => value / base,
                        Comparison::Difference => value - base,
                    })
                })
                .collect(),
        )
    }

    /// Every figure measured of `path` or `other`, each beside the other with the ratio.
    pub fn side_by_side(&self, path: Path, other: Path) -> Vec<SideBySide> {
        let mut rows = Vec::new();
        for route in Route::ALL {
            for metric in Metric::ROUTE_FIGURES
                .into_iter()
                .chain(Metric::memory_figures())
            {
                let row = SideBySide {
                    route,
                    metric,
                    path: self.spread(path, route, metric),
                    other: self.spread(other, route, metric),
                    ratio: self.compared_as(path, other, route, metric, Comparison::Ratio),
                };
                if row.path.is_some() || row.other.is_some() {
                    rows.push(row);
                }
            }
        }
        rows
    }

    /// Every measurement, for `results.json`; with a baseline build's mesh among `paths`,
    /// also each of its figures beside this build's mesh, with the ratio.
    pub fn to_json(&self, paths: &[Path]) -> Value {
        let measurements: Vec<Value> = self
            .measurements
            .iter()
            .map(|m| {
                json!({
                    "round": m.round,
                    "path": m.path.name(),
                    "route": m.route.name(),
                    "metric": m.metric.key(),
                    "value": m.value,
                })
            })
            .collect();
        let described: Vec<Value> = paths
            .iter()
            .map(|path| {
                json!({
                    "name": path.name(),
                    "label": path.label(),
                    "description": path.description(),
                })
            })
            .collect();
        let mut out = json!({
            "paths": described,
            "measurements": measurements,
            "anomalies": self.anomalies,
        });
        for &path in paths {
            let Path::MeshBaseline(dir) = path else {
                continue;
            };
            let spread = |spread: Option<Spread>| spread.map_or(Value::Null, Spread::to_json);
            let figures: Vec<Value> = self
                .side_by_side(Path::Mesh, path)
                .into_iter()
                .map(|row| {
                    json!({
                        "route": row.route.name(),
                        "metric": row.metric.key(),
                        "mesh": spread(row.path),
                        "baseline": spread(row.other),
                        "mesh_over_baseline": spread(row.ratio),
                    })
                })
                .collect();
            out["baseline"] = json!({
                "dir": dir.display().to_string(),
                "path": path.name(),
                "compared_with": Path::Mesh.name(),
                "figures": figures,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let spread = |values: Vec<f64>| Spread::of(values).map(|s| (s.median, s.min, s.max));
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(vec![]), None);
    }

    #[test]
    fn comparisons_pair_the_paths_of_each_round() {
        let mut results = Results::default();
        let route = Route::CrossNode;
        for (round, direct, mesh) in [(1, 10.0, 6.0), (2, 8.0, 2.0), (3, 9.0, 4.5)] {
            for metric in [Metric::Throughput1, Metric::LatencyP50] {
                results.record(round, Path::Direct, route, metric, direct);
                results.record(round, Path::Mesh, route, metric, mesh);
            }
        }
        let ratio = results.compared(Path::Mesh, Path::Direct, route, Metric::Throughput1);
        assert_eq!(
            ratio.map(|s| (s.median, s.min, s.max)),
            Some((0.5, 0.25, 0.6))
        );
        let added = results.compared(Path::Mesh, Path::Direct, route, Metric::LatencyP50);
        assert_eq!(
            added.map(|s| (s.median, s.min, s.max)),
            Some((-4.5, -6.0, -4.0))
        );
    }

    #[test]
    fn the_baseline_build_is_beside_the_mesh_with_ratios_in_the_json() {
        let baseline = Path::MeshBaseline(std::path::Path::new("/opt/old"));
        let mut results = Results::default();
        let idle = Metric::IdleRss(Daemon::Source);
        for (round, mesh, old) in [(1, 10.0, 8.0), (2, 9.0, 9.0)] {
            results.record(
                round,
                Path::Mesh,
                Route::CrossNode,
                Metric::LatencyP50,
                mesh,
            );
            results.record(round, baseline, Route::CrossNode, Metric::LatencyP50, old);
            results.record(round, Path::Mesh, Route::CrossNode, idle, mesh);
            results.record(round, baseline, Route::CrossNode, idle, old * 2.0);
        }
        let rows = results.side_by_side(Path::Mesh, baseline);
        assert_eq!(rows.len(), 2);
        // Latency too is put as a ratio here: 10/8 and 9/9.
        assert_eq!(rows[0].metric, Metric::LatencyP50);
        assert_eq!(rows[0].ratio.map(|s| (s.min, s.max)), Some((1.0, 1.25)));
        assert_eq!(
            rows[1].ratio.map(|s| s.median),
            Some((10.0 / 16.0 + 0.5) / 2.0)
        );
        let json = results.to_json(&Path::all(Some(std::path::Path::new("/opt/old"))));
        assert_eq!(json["paths"][2]["label"], "mesh (baseline: /opt/old)");
        assert_eq!(json["baseline"]["dir"], "/opt/old");
        let figures = json["baseline"]["figures"].as_array().unwrap();
        assert_eq!(figures[1]["metric"], "source_idle_rss_mib");
        assert_eq!(figures[1]["baseline"]["max"], 18.0);
        assert_eq!(figures[1]["mesh_over_baseline"]["min"], 0.5);
        assert!(results.to_json(&Path::all(None))["baseline"].is_null());
    }
}
