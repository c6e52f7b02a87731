//! `cargo xtask bench`: cross-node throughput and request/response latency of the mesh path
//! (eBPF capture + HBONE through both nodes' proxies) against the direct pod-to-pod path, on
//! the lab, release build. Runs are interleaved (direct, mesh, direct, mesh, ...) so drift on a
//! shared machine hits both paths alike; figures are medians with min and max.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::process::Stdio;
use std::time::Duration;
use ztunnel_lab::{Lab, PodServer, round_trips_from, topology};

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 9000;
const CLIENT: &str = "a1";
const SERVER: &str = "b1";

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    suite: Option<Suite>,
    /// Runs per path (the figures are medians over them).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Length of each throughput and latency measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

#[derive(Subcommand)]
enum Suite {
    /// The criterion micro-benchmarks of the hot pure code (policy evaluation at scale);
    /// reports land in target/criterion.
    Micro,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    Mesh,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (no mesh)",
            Path::Mesh => "mesh (eBPF + HBONE, two proxies)",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    gbit_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(Suite::Micro) = args.suite {
        return micro();
    }
    anyhow::ensure!(
        args.runs >= 1 && args.seconds >= 1,
        "--runs and --seconds must be at least 1"
    );
    crate::setup::run()?;
    crate::lab::build_binaries(false, true)?;
    let bin_dir = topology::workspace_root().join("target/release");
    // SAFETY: set before any thread is started; the lab reads it to find the binaries.
    unsafe { std::env::set_var("ZTUNNEL_BIN_DIR", &bin_dir) };

    let load_before = load_average();
    let mut samples: Vec<(Path, Sample)> = Vec::new();
    for run in 1..=args.runs {
        for path in [Path::Direct, Path::Mesh] {
            println!("bench: run {run}/{}: {}", args.runs, path.name());
            let lab = match path {
                Path::Direct => ztunnel_lab::up_without_ztunnel()?,
                Path::Mesh => ztunnel_lab::up()?,
            };
            let measured = measure(&lab, Duration::from_secs(args.seconds));
            ztunnel_lab::down()?;
            let sample = measured?;
            println!(
                "bench:   {:.2} Gbit/s, RR p50 {:.0} us, p99 {:.0} us",
                sample.gbit_per_s, sample.p50_us, sample.p99_us
            );
            samples.push((path, sample));
        }
    }
    let report = report(&args, &samples, &load_before, &load_average());
    println!("\n{report}");
    let out = topology::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("hbone.md"), &report)?;
    println!("bench: written to {}", out.join("hbone.md").display());
    Ok(())
}

fn micro() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(topology::workspace_root())
        .args(["bench", "-p", "ztunnel-user", "--bench", "authz"])
        .status()
        .context("running cargo bench")?;
    if !status.success() {
        bail!("the micro-benchmarks failed ({status})");
    }
    Ok(())
}

/// One throughput measurement (iperf3, single stream) and one latency measurement.
fn measure(lab: &Lab, length: Duration) -> Result<Sample> {
    let server_ip = lab.pod(SERVER)?.ip;
    let gbit_per_s = iperf3(server_ip, length)?;
    let _echo = PodServer::start_echo(SERVER, ECHO_PORT)?;
    let latency = round_trips_from(CLIENT, SocketAddrV4::new(server_ip, ECHO_PORT), length)?;
    Ok(Sample {
        gbit_per_s,
        p50_us: latency.p50_us,
        p99_us: latency.p99_us,
    })
}

/// Single-stream throughput from the client pod to the server pod, in Gbit/s.
fn iperf3(server_ip: std::net::Ipv4Addr, length: Duration) -> Result<f64> {
    let port = IPERF_PORT.to_string();
    // --forceflush: the banner must reach our pipe at once, not when a buffer fills.
    let mut server =
        ztunnel_lab::exec(SERVER, &["iperf3", "-s", "-1", "--forceflush", "-p", &port])?
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
    let stdout = server.stdout.take().expect("piped");
    let (listening_tx, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Server listening") {
                let _ = listening_tx.send(());
            }
        }
    });
    if listening.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = server.kill();
        let _ = server.wait();
        bail!("iperf3 -s in {SERVER} did not start listening");
    }
    let seconds = length.as_secs().to_string();
    let output = ztunnel_lab::exec(
        CLIENT,
        &[
            "iperf3",
            "-c",
            &server_ip.to_string(),
            "-p",
            &port,
            "-t",
            &seconds,
            "-J",
            "--connect-timeout",
            "5000",
        ],
    )?
    .output()
    .context("running iperf3 -c")?;
    let _ = server.kill();
    let _ = server.wait();
    let result: Value = serde_json::from_slice(&output.stdout).context("iperf3 -J output")?;
    let bits = result["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no throughput: {}", result["error"]))?;
    Ok(bits / 1e9)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// (median, min, max)
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = if values.len() % 2 == 1 {
        values[values.len() / 2]
    } else {
        (values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0
    };
    (median, values[0], values[values.len() - 1])
}

fn report(
    args: &BenchArgs,
    samples: &[(Path, Sample)],
    load_before: &str,
    load_after: &str,
) -> String {
    let of = |path: Path, field: fn(&Sample) -> f64| {
        spread(
            samples
                .iter()
                .filter(|(p, _)| *p == path)
                .map(|(_, s)| field(s))
                .collect(),
        )
    };
    let cell = |(median, min, max): (f64, f64, f64), digits: usize| {
        format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Cross-node HBONE vs direct ({} runs per path, interleaved, {} s each, release build)\n",
        args.runs, args.seconds
    );
    let _ = writeln!(
        out,
        "| path | throughput, 1 stream, Gbit/s | RR p50, us | RR p99, us |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for path in [Path::Direct, Path::Mesh] {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            path.name(),
            cell(of(path, |s| s.gbit_per_s), 2),
            cell(of(path, |s| s.p50_us), 0),
            cell(of(path, |s| s.p99_us), 0)
        );
    }
    let ratio = of(Path::Mesh, |s| s.gbit_per_s).0 / of(Path::Direct, |s| s.gbit_per_s).0;
    let added_p50 = of(Path::Mesh, |s| s.p50_us).0 - of(Path::Direct, |s| s.p50_us).0;
    let added_p99 = of(Path::Mesh, |s| s.p99_us).0 - of(Path::Direct, |s| s.p99_us).0;
    let _ = writeln!(
        out,
        "\nmesh/direct throughput: {ratio:.2}; mesh adds {added_p50:.0} us at p50 and {added_p99:.0} us at p99 (medians)."
    );
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        out,
        "\nmachine: {cpus} CPUs, Linux {}, load average before {load_before}, after {load_after}.",
        kernel.trim()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn median_min_max() {
        assert_eq!(spread(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
