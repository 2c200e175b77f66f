//! The real binary's configuration checks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_node-agent");

#[test]
fn bad_flags_exit_non_zero_naming_every_problem() {
    let out = Command::new(BIN)
        .args([
            "--cluster-name",
            "East",
            "--cluster-id",
            "5000",
            "--node-name",
            "Node_1",
        ])
        .args(["--cgroup", "/nonexistent/cg", "--bpffs", "/proc", "--check"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--cluster-name",
        "--cluster-id",
        "--node-name",
        "--cgroup",
        "not bpffs",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(
        Command::new(BIN)
            .arg("--help")
            .output()
            .unwrap()
            .status
            .success()
    );
    assert_eq!(
        Command::new(BIN)
            .arg("--bogus")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn a_cgroup_v2_root_is_refused() {
    let root = "/sys/fs/cgroup/unified";
    assert!(
        std::path::Path::new(root).is_dir(),
        "scripts/setup.sh mounts cgroup v2 at {root}"
    );
    let out = Command::new(BIN)
        .args([
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--node-name",
            "node-1",
        ])
        .args(["--cgroup", root, "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("child cgroup"));
}

#[test]
fn running_needs_the_apiserver_and_a_certificate() {
    let out = Command::new(BIN)
        .args([
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--node-name",
            "node-1",
        ])
        .args([
            "--cgroup",
            "/sys/fs/cgroup/unified",
            "--health-interval",
            "5ms",
            "--health-bind",
            "nowhere",
        ])
        .env_remove("CLUSTERMESH_APISERVER")
        .env_remove("CLUSTERMESH_TLS_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--apiserver",
        "--tls-dir",
        "--health-interval: 5ms is out of range 10ms..=1m",
        "--health-bind",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_fatal_configuration_error_is_one_json_line_with_log_format_json() {
    let out = Command::new(BIN)
        .args([
            "--cluster-name",
            "East",
            "--cluster-id",
            "1",
            "--node-name",
            "node-1",
            "--cgroup",
            "/nonexistent/cgroup",
            "--log-format",
            "json",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["level"], "ERROR", "{v}");
    assert_eq!(v["message"], "invalid configuration", "{v}");
    let text = v["error"].as_str().unwrap();
    assert!(
        text.starts_with("invalid configuration:\n  - --cluster-name: "),
        "{text}"
    );
    assert!(
        text.contains("--cgroup: /nonexistent/cgroup does not exist"),
        "{text}"
    );
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("node-agent {}\n", telemetry::version::LONG)
    );
}
