//! `cargo xtask bench`: what a user comparing node proxies looks at first (throughput, latency,
//! connection rate, CPU cost, memory), measured on the lab between real pods, for each path
//! (direct pod network, mesh), cross node and same node, release build.
//!
//! Runs are interleaved (direct, mesh, direct, mesh, ...), each on a fresh lab, so drift on a
//! shared machine hits every path alike; figures are medians with min and max, comparisons are
//! taken within each run. Results go to `target/bench/<UTC time>/` (report.md, chart.png,
//! results.json) and `target/bench/latest` points at the newest.

mod chart;
mod cpu;
mod handshakes;
mod idle;
mod machine;
mod measure;
mod memory;
mod path;
mod report;
mod results;
mod scale;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use machine::Machine;
use measure::Settings;
use path::Path;
use results::Results;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use ztunnel_lab::topology;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    suite: Option<Suite>,
    /// Runs per path; each figure is the median (with min and max) over them
    /// [default: 3; with --quick: 2].
    #[arg(long)]
    runs: Option<usize>,
    /// Length of each measurement, in seconds [default: 5; with --quick: 2].
    #[arg(long)]
    seconds: Option<u64>,
    /// Idle proxied connections held open for the memory figures
    /// [default: 10000; with --quick: 1000].
    #[arg(long)]
    idle_connections: Option<usize>,
    /// A short run that checks everything works, not figures for the record (flags given
    /// explicitly still win).
    #[arg(long)]
    quick: bool,
    /// Let idle vCPUs halt, as the machine is configured, instead of holding them in polling
    /// for the run (latency then includes the host's wake-ups; see docs/PERFORMANCE.md).
    #[arg(long)]
    allow_cpu_idle: bool,
    /// Also measure the mesh as another build runs it, beside this build's: DIR holds that
    /// build's release binaries, and its `ztunnel` and `ztunnel-cni` run the extra path's lab
    /// (the load tools are this build's). The report puts every figure of the two side by
    /// side with the ratio.
    #[arg(long, value_name = "DIR")]
    baseline: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Suite {
    /// The criterion micro-benchmarks of the hot pure code (every file in
    /// ztunnel-user/benches: policy evaluation, mesh config lookups, HBONE requests); reports
    /// land in target/criterion.
    Micro,
    /// What the size of the mesh costs a node: applying a full mesh config and a single
    /// change at growing sizes, the daemon's RSS and idle CPU (report in
    /// target/bench/scale-<UTC time>/).
    Scale(scale::ScaleArgs),
}

impl BenchArgs {
    fn settings(&self) -> Result<Settings> {
        let (runs, seconds, idle_connections) = if self.quick {
            (2, 2, 1000)
        } else {
            (3, 5, 10_000)
        };
        let baseline = self.baseline.as_deref().map(baseline_dir).transpose()?;
        let settings = Settings {
            paths: Path::all(baseline),
            runs: self.runs.unwrap_or(runs),
            length: Duration::from_secs(self.seconds.unwrap_or(seconds)),
            idle_connections: self.idle_connections.unwrap_or(idle_connections),
        };
        ensure!(
            settings.runs >= 1 && !settings.length.is_zero() && settings.idle_connections >= 1,
            "--runs, --seconds and --idle-connections must be at least 1"
        );
        Ok(settings)
    }
}

/// Sets up the machine and builds the lab's binaries optimized, then has the lab run those.
fn build_release_binaries() -> Result<()> {
    crate::setup::run()?;
    crate::lab::build_binaries(false, true)?;
    // SAFETY: set before any thread is started; the lab reads it to find the binaries.
    unsafe {
        std::env::set_var(
            "ZTUNNEL_BIN_DIR",
            topology::workspace_root().join("target/release"),
        )
    };
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    match &args.suite {
        Some(Suite::Micro) => return micro(),
        Some(Suite::Scale(scale)) => return scale::run(scale),
        None => {}
    }
    let settings = args.settings()?;
    build_release_binaries()?;
    let _lock = ztunnel_lab::LabLock::acquire("bench")?;
    let bench_dir = topology::workspace_root().join("target/bench");
    let out = bench_dir.join(utc_timestamp(SystemTime::now()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let idle = idle::IdlePolicy::for_run(args.allow_cpu_idle);
    let mut machine = Machine::now(&idle.description);
    let paths = settings.paths.clone();
    let turns = settings.runs * paths.len();
    println!(
        "bench: {} runs x {} paths ({}), {} s per measurement, {} idle connections; {turns} \
         labs, one at a time; load average now {}; idle CPUs {}",
        settings.runs,
        paths.len(),
        paths
            .iter()
            .map(|path| path.label())
            .collect::<Vec<_>>()
            .join(", "),
        settings.length.as_secs(),
        settings.idle_connections,
        machine.load_before,
        machine.cpu_idle
    );
    let mut results = Results::default();
    for round in 1..=settings.runs {
        for &path in &paths {
            measure::turn(round, path, &settings, &mut results)?;
        }
    }
    machine.finish();
    drop(idle);

    let report = report::markdown(&results, &settings, &machine);
    println!("\n{report}");
    write(&out.join("report.md"), &report)?;
    write(
        &out.join("results.json"),
        &serde_json::to_string_pretty(&results.to_json(&paths))?,
    )?;
    let title = format!(
        "ztunnel on the lab: {} runs per path, {} s each",
        settings.runs,
        settings.length.as_secs()
    );
    chart::draw(&results, &paths, &out.join("chart.png"), &title)?;
    point_latest_at(&bench_dir, &out)?;
    println!(
        "bench: report.md, chart.png and results.json written to {} (also {})",
        out.display(),
        bench_dir.join("latest").display()
    );
    Ok(())
}

/// The `--baseline` directory, checked, made absolute and kept for the whole run.
fn baseline_dir(dir: &std::path::Path) -> Result<&'static std::path::Path> {
    use std::os::unix::fs::PermissionsExt;
    let absolute = std::fs::canonicalize(dir)
        .with_context(|| format!("--baseline {}: no such directory", dir.display()))?;
    for binary in ["ztunnel", "ztunnel-cni"] {
        let path = absolute.join(binary);
        let executable = std::fs::metadata(&path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
        ensure!(
            executable,
            "--baseline {}: no executable {binary} in it (it should hold another build's \
             release binaries: ztunnel, ztunnel-cni)",
            dir.display()
        );
    }
    // One directory per run, for as long as the run: its paths refer to it.
    Ok(Box::leak(absolute.into_boxed_path()))
}

fn write(file: &std::path::Path, text: &str) -> Result<()> {
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

/// `latest` -> the newest results folder, replaced in one rename.
fn point_latest_at(bench_dir: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let name = out.file_name().context("results folder without a name")?;
    let staged = bench_dir.join("latest.new");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(name, &staged)
        .with_context(|| format!("creating {}", staged.display()))?;
    std::fs::rename(&staged, bench_dir.join("latest")).context("replacing target/bench/latest")
}

/// `YYYY-MM-DDTHHMMSSZ` (no colons, so the name works everywhere).
pub(crate) fn utc_timestamp(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}{:02}{:02}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Every criterion benchmark of ztunnel-user (one per file in its `benches/`).
fn micro() -> Result<()> {
    let benches = topology::workspace_root().join("ztunnel-user/benches");
    let mut names: Vec<String> = std::fs::read_dir(&benches)
        .with_context(|| format!("listing {}", benches.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    let mut args = vec!["bench".to_owned(), "-p".into(), "ztunnel-user".into()];
    for name in &names {
        args.extend(["--bench".into(), name.clone()]);
    }
    println!("bench: cargo {}", args.join(" "));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(topology::workspace_root())
        .args(&args)
        .status()
        .context("running cargo bench")?;
    if !status.success() {
        bail!("the micro-benchmarks failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::utc_timestamp;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T000000Z");
        // 2024-02-29 23:59:59 UTC, a leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(utc_timestamp(leap), "2024-02-29T235959Z");
    }
}
