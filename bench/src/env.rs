//! Where a result was measured: machine, CPU, kernel, date and commit.

use std::process::Command;

pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: u64,
    pub commit: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Environment {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Self {
            date: sh("date", &["-u", "+%Y-%m-%d"]),
            kernel: sh("uname", &["-r"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            memory_gib: kib.div_ceil(1024 * 1024),
            commit: sh("git", &["rev-parse", "--short", "HEAD"]),
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "- date: {}\n- machine: {} cores, {} GiB, {}\n- kernel: {}\n- commit: {}",
            self.date, self.cores, self.memory_gib, self.cpu, self.kernel, self.commit
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "date": self.date, "kernel": self.kernel, "cpu": self.cpu, "cores": self.cores,
            "memory_gib": self.memory_gib, "commit": self.commit,
        })
    }
}
