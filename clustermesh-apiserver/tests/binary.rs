//! The real binary against a real etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use model::{ClusterName, keys};
use test_support::{Etcd, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");

fn tls_dir(etcd: &Etcd) -> std::path::PathBuf {
    etcd.client_files().cert.parent().unwrap().to_owned()
}

#[test]
fn bad_flags_exit_non_zero_naming_every_problem() {
    let out = Command::new(BIN)
        .args(["--cluster-name", "Bad_Name", "--cluster-id", "99999"])
        .args([
            "--etcd-endpoints",
            "127.0.0.1:2379",
            "--etcd-tls-dir",
            "/nonexistent",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "--cluster-name",
        "--cluster-id",
        "--etcd-endpoints",
        "--etcd-tls-dir",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    let out = Command::new(BIN).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("CLUSTERMESH_CLUSTER_ID"));
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("clustermesh-apiserver {}\n", telemetry::version::LONG)
    );
    assert!(telemetry::version::LONG.contains(" (commit "));
}

#[test]
fn a_fatal_configuration_error_is_one_json_line_with_log_format_json() {
    let out = Command::new(BIN)
        .args(["--cluster-name", "Bad_Name", "--cluster-id", "1"])
        .args(["--etcd-endpoints", "https://127.0.0.1:2379"])
        .args(["--etcd-tls-dir", "/nonexistent", "--log-format", "json"])
        .args(["--lease-ttl", "1s"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    // Every line is a JSON log line (the start-up one, then the error), the error once.
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let errors: Vec<&serde_json::Value> = lines.iter().filter(|v| v["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 1, "{err}");
    let v = errors[0];
    assert_eq!(v["message"], "invalid configuration", "{v}");
    let text = v["error"].as_str().unwrap();
    assert!(
        text.starts_with("invalid configuration:\n  - --cluster-name: "),
        "{text}"
    );
    assert!(
        text.contains("--lease-ttl: 1s is out of range 5s..=1h"),
        "{text}"
    );
    assert!(
        !err.contains("error: "),
        "no bare line besides the log: {err}"
    );
}

#[test]
fn a_duration_without_a_unit_is_refused_with_a_hint() {
    let out = Command::new(BIN)
        .args(["--cluster-name", "east", "--cluster-id", "1"])
        .args(["--etcd-endpoints", "https://127.0.0.1:2379"])
        .args(["--etcd-tls-dir", "/nonexistent", "--leader-lease", "15"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid duration \"15\": add a unit (15s, 15ms, 1m30s)"),
        "{err}"
    );
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn registers_its_cluster_and_refuses_a_conflicting_id() {
    let etcd = Etcd::start().await.unwrap();
    let spawn = |id: &str| {
        Command::new(BIN)
            .args(["--cluster-name", "east", "--cluster-id", id])
            .args(["--etcd-endpoints", &etcd.endpoint()])
            .args(["--health-bind", "127.0.0.1:0"])
            .arg("--etcd-tls-dir")
            .arg(tls_dir(&etcd))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = Killed(spawn("3"));
    let c = etcd.client().await.unwrap();
    let key = keys::cluster_config(&ClusterName::new("east").unwrap());
    let record = eventually(
        "cluster record written",
        Duration::from_secs(20),
        || async { c.get_raw(&key).await.ok().flatten() },
    )
    .await;
    assert_eq!(
        wire::ClusterConfig::decode(&record.value).unwrap().id.get(),
        3
    );
    drop(first);

    let second = spawn("4");
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // Printed once: not by the log and again by main.
    assert_eq!(
        err.matches("refusing to register it as ID 4").count(),
        1,
        "{err}"
    );
    let record = c.get_raw(&key).await.unwrap().unwrap();
    assert_eq!(
        wire::ClusterConfig::decode(&record.value).unwrap().id.get(),
        3,
        "good state untouched"
    );
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("HOME", kubeconfig.parent().unwrap())
        .output()
        .expect("kubectl must be installed");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binary as a real process, driven by `kubectl annotate`: the service is exported, then
/// withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_annotate_exports_and_withdraws_a_service() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let etcd = Etcd::start().await.unwrap();
    let cluster = ClusterName::new("west").unwrap();
    let kube = kube_testserver::start(kube_testserver::Config::new(cluster.clone()))
        .await
        .unwrap();
    let kc = kube.kubeconfig().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("svc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  ports: [{name: http, port: 80}]\n",
    )
    .unwrap();
    kubectl(
        &kc,
        &[
            "apply",
            "--validate=false",
            "-f",
            manifest.to_str().unwrap(),
        ],
    );
    let _apiserver = Killed(
        Command::new(BIN)
            .args(["--cluster-name", "west", "--cluster-id", "9"])
            .args(["--etcd-endpoints", &etcd.endpoint()])
            .arg("--etcd-tls-dir")
            .arg(tls_dir(&etcd))
            .arg("--kubeconfig")
            .arg(&kc)
            .args(["--health-bind", "127.0.0.1:0", "--replica", "only"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = etcd.client().await.unwrap();
    let marker = keys::synced(keys::Scope::State, &cluster, keys::Kind::Services);
    eventually("initial sync", Duration::from_secs(30), || async {
        c.get_raw(&marker).await.ok().flatten()
    })
    .await;
    let key = keys::object_key(
        keys::Scope::State,
        &cluster,
        keys::Kind::Services,
        "default/web",
    );
    assert!(c.get_raw(&key).await.unwrap().is_none(), "not global yet");

    kubectl(
        &kc,
        &[
            "annotate",
            "service",
            "web",
            "service.cilium.io/global=true",
        ],
    );
    eventually("exported", Duration::from_secs(30), || async {
        c.get_raw(&key).await.ok().flatten()
    })
    .await;
    kubectl(
        &kc,
        &["annotate", "service", "web", "service.cilium.io/global-"],
    );
    eventually("withdrawn", Duration::from_secs(30), || async {
        c.get_raw(&key)
            .await
            .ok()
            .map(|v| v.is_none())
            .filter(|gone| *gone)
    })
    .await;
}
