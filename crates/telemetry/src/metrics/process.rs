//! The standard `process_*` metrics of a Prometheus client (CPU seconds, resident and virtual
//! memory, open and maximum file descriptors, start time), read from `/proc/self` at each
//! scrape, and `clustermesh_build_info`.
//!
//! Must not fail a scrape: a value that cannot be read is left out.

use std::fmt::Write as _;

/// What `/proc/self/stat` and friends say about this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Sample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Fields of `/proc/<pid>/stat` after the command name: (utime, stime, starttime) in clock
/// ticks, vsize in bytes, rss in pages.
fn stat_fields(stat: &str) -> Option<(u64, u64, u64, u64, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some((n(14)?, n(15)?, n(22)?, n(23)?, n(24)?))
}

/// `btime` of `/proc/stat`: the boot time, Unix seconds.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads this process's figures.
pub(crate) fn sample() -> Sample {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as u64;
    let mut s = Sample::default();
    if let Some((utime, stime, start, vsize, rss)) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(stat_fields)
    {
        if ticks > 0.0 {
            s.cpu_seconds = Some((utime + stime) as f64 / ticks);
            s.start_time_seconds = std::fs::read_to_string("/proc/stat")
                .ok()
                .as_deref()
                .and_then(boot_time)
                .map(|b| b as f64 + start as f64 / ticks);
        }
        s.virtual_bytes = Some(vsize);
        s.resident_bytes = Some(rss * page);
    }
    s.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    s.max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    s
}

/// The Prometheus text of `s` and of the build info.
pub(crate) fn render(s: &Sample) -> String {
    let mut out = String::new();
    let mut one = |name: &str, kind: &str, help: &str, value: Option<String>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
    };
    one(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        s.cpu_seconds.map(|v| v.to_string()),
    );
    one(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        s.resident_bytes.map(|v| v.to_string()),
    );
    one(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        s.virtual_bytes.map(|v| v.to_string()),
    );
    one(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch in seconds.",
        s.start_time_seconds.map(|v| format!("{v:.2}")),
    );
    one(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        s.open_fds.map(|v| v.to_string()),
    );
    one(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        s.max_fds.map(|v| v.to_string()),
    );
    let _ = writeln!(
        out,
        "# HELP clustermesh_build_info The version and git commit this binary was built from; always 1."
    );
    let _ = writeln!(out, "# TYPE clustermesh_build_info gauge");
    let _ = writeln!(
        out,
        "clustermesh_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        crate::version::VERSION,
        crate::version::COMMIT
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 3 0 12345 10485760 2560 18446744073709551615";
        assert_eq!(stat_fields(stat), Some((150, 50, 12345, 10_485_760, 2560)));
        assert_eq!(stat_fields("garbage"), None);
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_reports_every_figure() {
        let s = sample();
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        assert!(s.resident_bytes.is_some_and(|b| b > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        let start = s.start_time_seconds.unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        assert!(
            start > 1_000_000_000.0 && start <= now + 1.0,
            "{start} {now}"
        );
        let text = render(&s);
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "clustermesh_build_info{version=\"",
        ] {
            assert!(text.contains(name), "{name}: {text}");
        }
    }
}
