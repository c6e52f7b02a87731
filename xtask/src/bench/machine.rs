//! The facts about the machine and the code that go beside the figures.

use std::process::Command;

pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub commit: String,
    pub load_before: String,
    pub load_after: String,
    /// What idle CPUs did during the run.
    pub cpu_idle: String,
}

impl Machine {
    /// Everything but the load average after the run, which `finish` adds.
    pub fn now(cpu_idle: &str) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown".to_owned(), |(_, model)| model.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            commit: commit(),
            load_before: load_average(),
            load_after: String::new(),
            cpu_idle: cpu_idle.to_owned(),
        }
    }

    pub fn finish(&mut self) {
        self.load_after = load_average();
    }

    pub fn markdown(&self) -> String {
        format!(
            "- CPU: {}, {} cores; {:.1} GiB memory; Linux {}\n\
             - load average (1, 5, 15 min) before: {}; after: {}\n\
             - idle CPUs: {}\n\
             - code: {}\n",
            self.cpu_model,
            self.cores,
            self.memory_gib,
            self.kernel,
            self.load_before,
            self.load_after,
            self.cpu_idle,
            self.commit
        )
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The commit measured, marked when the work tree has changes on top of it.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(ztunnel_lab::topology::workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{head} with uncommitted changes"),
            _ => head,
        },
        None => "unknown (not a git checkout)".to_owned(),
    }
}
