//! The facts about the machine and the code that go beside the figures.

use procfs::{CpuInfo, Current, LoadAverage, Meminfo};
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
        let cpu_model = CpuInfo::current()
            .ok()
            .and_then(|info| info.model_name(0).map(|model| model.trim().to_owned()))
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_bytes = Meminfo::current().map_or(0, |meminfo| meminfo.mem_total);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            memory_gib: memory_bytes as f64 / (1024.0 * 1024.0 * 1024.0),
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

/// The 1, 5 and 15 minute load averages, as /proc/loadavg shows them.
fn load_average() -> String {
    LoadAverage::current().map_or(String::new(), |load| {
        format!("{:.2} {:.2} {:.2}", load.one, load.five, load.fifteen)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_of_this_machine() {
        let machine = Machine::now("polling");
        assert_ne!(machine.cpu_model, "unknown");
        assert!(machine.memory_gib > 0.1, "{}", machine.memory_gib);
        let load: Vec<f64> = machine
            .load_before
            .split(' ')
            .map(|figure| figure.parse().unwrap())
            .collect();
        assert_eq!(load.len(), 3, "{}", machine.load_before);
    }
}
