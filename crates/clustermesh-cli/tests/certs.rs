//! `clustermesh certs` as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_clear().output().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn status_json(dir: &Path) -> serde_json::Value {
    let out = run(&["certs", "status", p(dir), "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn init_issue_rotate_and_status_work_together() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let out = run(&["certs", "init", "--cluster-name", "east", "--out", p(&ca)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = run(&["certs", "init", "--cluster-name", "east", "--out", p(&ca)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    let server = tmp.path().join("server");
    let out = run(&[
        "certs",
        "issue",
        "--ca-dir",
        p(&ca),
        "--role",
        "apiserver",
        "--cluster-name",
        "east",
        "--cluster-id",
        "1",
        "--ip",
        "127.0.0.1",
        "--dns",
        "mesh.east.example",
        "--out",
        p(&server),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = status_json(&server);
    let leaf = &before[0];
    assert_eq!(leaf["identity"], "apiserver of cluster east (ID 1)");
    assert_eq!(leaf["state"], "ok");
    assert_eq!(before[1]["is_ca"], true);

    let out = run(&["certs", "rotate", "--ca-dir", p(&ca), "--dir", p(&server)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = status_json(&server);
    assert_eq!(after[0]["identity"], leaf["identity"], "same identity");
    assert_ne!(
        after[0]["fingerprint"], leaf["fingerprint"],
        "new certificate"
    );

    // A certificate expiring within --warn makes status fail, for scripts.
    let short = tmp.path().join("short");
    let out = run(&[
        "certs",
        "issue",
        "--ca-dir",
        p(&ca),
        "--role",
        "admin",
        "--cluster-name",
        "east",
        "--cluster-id",
        "1",
        "--valid-for",
        "1d",
        "--out",
        p(&short),
    ]);
    assert!(out.status.success());
    let out = run(&["certs", "status", p(&short), "--warn", "7d"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("expiring"));
}

#[test]
fn bad_issue_arguments_are_all_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[
        "certs",
        "issue",
        "--ca-dir",
        p(tmp.path()),
        "--role",
        "node-agent",
        "--cluster-name",
        "East",
        "--cluster-id",
        "0",
        "--out",
        p(tmp.path()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["--cluster-name", "--cluster-id", "--node is required"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let out = run(&["certs", "issue", "--role", "king"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(run(&["--help"]).status.success());
}

#[test]
fn status_fails_on_a_file_that_holds_no_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.crt");
    std::fs::write(&empty, "").unwrap();
    let key_only = tmp.path().join("key.pem");
    std::fs::write(
        &key_only,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    for file in [&empty, &key_only] {
        let out = run(&["certs", "status", p(file)]);
        assert_eq!(out.status.code(), Some(1), "{}", p(file));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.lines().nth(1).unwrap(),
            format!(
                "no-certificate      -  -                                             {}",
                p(file)
            )
        );
    }
    let out = run(&["certs", "status", p(&empty), "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["state"], "no-certificate");
    assert_eq!(rows[0]["not_after_unix"], serde_json::Value::Null);
}

#[test]
fn status_speaks_yaml_too() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    assert!(
        run(&["certs", "init", "--cluster-name", "east", "--out", p(&ca)])
            .status
            .success()
    );
    let out = run(&["certs", "status", p(&ca.join("ca.crt")), "-o", "yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("- path: "), "{text}");
    assert!(text.contains("is_ca: true"), "{text}");
    assert!(text.contains("state: ok"), "{text}");
}
