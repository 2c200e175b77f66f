//! Helpers the datapath benchmarks share: shell commands, bpftool readings, percentiles and
//! the namespace's listen-queue overflows.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

/// Runs `cmd` with `sh -c`; its stdout. Panics (naming it) when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (run_time_ns, run_cnt) of program `id` (bpf_stats must be on).
pub fn prog_stats(id: u64) -> (u64, u64) {
    let v: Value = serde_json::from_str(&sh(&format!("bpftool prog show id {id} -j"))).unwrap();
    (
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    )
}

/// The ID of the program named `name` attached to `cgroup`.
pub fn attached(cgroup: &Path, name: &str) -> u64 {
    let v: Value =
        serde_json::from_str(&sh(&format!("bpftool cgroup show {} -j", cgroup.display()))).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("{name} not attached to {}", cgroup.display()))
}

/// Kernel memory of the map pinned at `path` (`bytes_memlock`); 0 when it is not there.
pub fn memlock(path: &Path) -> u64 {
    Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(path)
        .arg("-j")
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice::<Value>(&out.stdout).ok())
        .and_then(|v| v["bytes_memlock"].as_u64())
        .unwrap_or(0)
}

/// Microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// p50, p90, p99 in µs.
pub fn pcts(v: &[Duration]) -> Value {
    json!(
        [0.5, 0.9, 0.99]
            .iter()
            .map(|p| us(test_support::percentile(v, *p)))
            .collect::<Vec<f64>>()
    )
}

/// `TcpExtListenOverflows` of this network namespace.
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    lines[0]
        .split_whitespace()
        .zip(lines[1].split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Removes a bench's pins, links and cgroup (moving this process back to the root cgroup)
/// and restores `kernel.bpf_stats_enabled`, also when a row panics.
pub struct Cleanup {
    pub pins: PathBuf,
    pub cgroup: PathBuf,
    pub stats_before: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            "/sys/fs/cgroup/unified/cgroup.procs",
            std::process::id().to_string(),
        );
        let _ = node_agent::datapath::remove(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::process::Command::new("sysctl")
            .arg("-qw")
            .arg(format!("kernel.bpf_stats_enabled={}", self.stats_before))
            .status();
    }
}
