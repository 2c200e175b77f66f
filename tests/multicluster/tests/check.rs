//! `clustermesh check` on the emulated lab: the exact ✔/✗ lines and exit codes in a healthy
//! mesh (one version: this build's) and in each failure it names — a node agent down, a rejected service, an expiring
//! certificate, etcd down, a peer apiserver down — and exit 2 for a context that does not
//! exist. Its own lab (unique cluster names), torn down on drop even when an assertion fails.
//! Run as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use certs::{Ca, LeafSpec, MeshIdentity, Role};
use model::{ClusterId, ClusterName};
use multicluster::lab::{Component, Lab};
use multicluster::{LabCluster, clustermesh, scenarios};
use tokio::sync::Mutex;

const EAST: &str = "ck-east";
const WEST: &str = "ck-west";

/// How long a failure may take to show (probes every 2–3 s, status written at once, a peer
/// stream noticing a dead apiserver, a status going stale after 15 s).
const SHOW: Duration = Duration::from_secs(90);

/// Stands for the replica (pod) name in [`healthy_lines`]: which of the two replicas leads is
/// the Lease's choice.
const REPLICA: &str = "<replica>";

/// `line` with the apiserver replica it names (after "apiserver " or "leader ") replaced by
/// [`REPLICA`].
fn any_replica(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        let after = i > 0 && matches!(words[i - 1], "apiserver" | "leader");
        out.push(if after && w.contains("-apiserver-") {
            REPLICA
        } else {
            w
        });
    }
    out.join(" ")
}

/// The ✔/✗ lines of one `check` run, and its exit code.
#[derive(Debug)]
struct Run {
    code: i32,
    lines: Vec<String>,
    out: String,
}

impl Run {
    fn failed(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.starts_with('✗'))
            .map(String::as_str)
            .collect()
    }
}

async fn check(kc: &Path) -> Result<Run> {
    let out = clustermesh(kc, &["check", "--context", EAST, "--context", WEST]).await?;
    Ok(Run {
        code: out.code,
        lines: out
            .stdout
            .lines()
            .filter(|l| l.starts_with('✔') || l.starts_with('✗'))
            .map(str::to_owned)
            .collect(),
        out: format!("{}{}", out.stdout, out.stderr),
    })
}

/// Runs `check` until its failed lines are exactly `want` (none: every line is one of
/// [`healthy_lines`]), within [`SHOW`]; then asserts the exit code.
async fn until_failed(kc: &Path, want: &[String], what: &str) -> Result<Run> {
    let deadline = tokio::time::Instant::now() + SHOW;
    loop {
        let run = check(kc).await?;
        let lines: Vec<String> = run.lines.iter().map(|l| any_replica(l)).collect();
        if run.failed() == want && (!want.is_empty() || lines == healthy_lines()) {
            let code = if want.is_empty() { 0 } else { 1 };
            if run.code != code {
                bail!("{what}: exit code {} (want {code}):\n{}", run.code, run.out);
            }
            if !want.is_empty() {
                eprintln!(
                    "--- {what}: `clustermesh check` exit {}\n{}",
                    run.code, run.out
                );
            }
            return Ok(run);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{what}: never failed exactly {want:#?}; last run:\n{}",
                run.out
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn healthy_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for (c, peer, nodes) in [(EAST, WEST, 2), (WEST, EAST, 1)] {
        lines.extend([
            format!("✔ {c}: apiserver {REPLICA} reporting"),
            format!("✔ {c}: clock within +5s/-15s of this machine's"),
            format!("✔ {c}: etcd answers"),
            format!("✔ {c}: leader {REPLICA} elected and ready"),
            format!("✔ {c}: peer {peer} connected and in sync"),
            format!("✔ {c}: {nodes}/{nodes} nodes connected and in sync"),
            format!("✔ {c}: certificates valid for more than 30 days"),
            format!("✔ {c}: no rejected services"),
            format!("✔ {c}: no refused peer objects"),
        ]);
    }
    lines.push("✔ cluster names and IDs unique across the checked clusters and their peers".into());
    // The lab's binaries are this build: one version, this test's own.
    let version = telemetry::version::Version::parse(telemetry::version::REPORTED)
        .expect("the reported version reads back");
    lines.push(format!(
        "✔ one version across the clusters and their peers: {version}"
    ));
    lines
}

/// Rotates `cluster`'s Mesh API certificate to one valid for `valid_for`, as an operator would:
/// the new certificate goes into Secret `clustermesh-apiserver-tls` (with the names `clustermesh
/// install` gives it), the kubelet updates the pods' volume and the apiserver reloads its
/// files within 5 s.
async fn rotate_apiserver_cert(lab: &Lab, cluster: &str, valid_for: Duration) -> Result<()> {
    let c = lab.cluster(cluster)?;
    let ca = Ca::from_pem(
        &std::fs::read_to_string(c.dir.join("ca/ca.crt"))?,
        &std::fs::read_to_string(c.dir.join("ca/ca.key"))?,
    )?;
    let id = MeshIdentity::new(
        ClusterName::new(cluster)?,
        ClusterId::new(u64::from(c.id))?,
        Role::Apiserver,
    );
    let leaf = ca.issue(
        &LeafSpec::new(id)
            .dns([
                "clustermesh-apiserver.kube-system.svc".to_owned(),
                "clustermesh-apiserver.kube-system.svc.cluster.local".to_owned(),
            ])
            .ips([IpAddr::V4(lab.host_ip())])
            .validity(time::OffsetDateTime::now_utc(), valid_for),
    )?;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(lab.client(cluster).await?, "kube-system");
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    secrets
        .patch(
            "clustermesh-apiserver-tls",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"data": {
                "ca.crt": b64(ca.cert_pem()),
                "tls.crt": b64(&leaf.cert_pem),
                "tls.key": b64(&leaf.key_pem),
            }})),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_failure_it_names() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    // Installed from deploy/ by `clustermesh install`, run by the lab kubelet.
    lab.install_cluster(EAST, 11, 2).await.unwrap();
    lab.install_cluster(WEST, 12, 1).await.unwrap();
    let kc = lab.kubeconfig();
    let lab = Arc::new(Mutex::new(lab));
    let (east, west) = (
        LabCluster::new(&lab, EAST).await,
        LabCluster::new(&lab, WEST).await,
    );
    scenarios::connect(&kc, &east, &west).await.unwrap();

    // Healthy: every line passes, exit 0; the same as JSON.
    let run = until_failed(&kc, &[], "healthy mesh").await.unwrap();
    let lines: Vec<String> = run.lines.iter().map(|l| any_replica(l)).collect();
    assert_eq!(lines, healthy_lines(), "{}", run.out);
    let json = clustermesh(
        &kc,
        &["check", "--context", EAST, "--context", WEST, "-o", "json"],
    )
    .await
    .unwrap();
    assert_eq!(json.code, 0, "{}{}", json.stdout, json.stderr);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    assert_eq!(
        v["checks"].as_array().map(Vec::len),
        Some(healthy_lines().len())
    );
    // `status` shows the node agents too.
    let status = clustermesh(&kc, &["status", "--context", EAST])
        .await
        .unwrap();
    assert!(
        status
            .stdout
            .contains(&format!("{EAST}: 2/2 nodes connected and in sync")),
        "{}",
        status.stdout
    );
    eprintln!("healthy: {} ✔ lines, exit 0", run.lines.len());

    // A node agent down.
    let node = format!("{EAST}-node-2");
    lab.lock()
        .await
        .hold_down(EAST, &Component::NodeAgent(node.clone()))
        .unwrap();
    until_failed(
        &kc,
        &[format!(
            "✗ {EAST}: 1/2 nodes connected and in sync ({node} unreachable)"
        )],
        "node agent down",
    )
    .await
    .unwrap();
    let status = clustermesh(&kc, &["status", "--context", EAST])
        .await
        .unwrap();
    assert_eq!(status.code, 1, "{}", status.stdout);
    lab.lock()
        .await
        .bring_back(EAST, &Component::NodeAgent(node))
        .await
        .unwrap();
    until_failed(&kc, &[], "node agent back").await.unwrap();
    eprintln!("node agent down: named, exit 1; back: exit 0");

    // A rejected service: a global service with an affinity the exporter does not know.
    let bad = BTreeMap::from([
        ("service.cilium.io/global".to_owned(), "true".to_owned()),
        (
            "service.cilium.io/affinity".to_owned(),
            "sideways".to_owned(),
        ),
    ]);
    lab.lock()
        .await
        .deploy(EAST, "demo/bad", 1, &bad)
        .await
        .unwrap();
    until_failed(
        &kc,
        &[format!("✗ {EAST}: rejected services: demo/bad")],
        "rejected service",
    )
    .await
    .unwrap();
    lab.lock().await.undeploy(EAST, "demo/bad").await.unwrap();
    until_failed(&kc, &[], "rejected service deleted")
        .await
        .unwrap();
    eprintln!("rejected service: named, exit 1; deleted: exit 0");

    // An expiring certificate: the apiserver's, rotated to one valid for 10 days.
    rotate_apiserver_cert(&*lab.lock().await, EAST, Duration::from_secs(10 * 86_400))
        .await
        .unwrap();
    until_failed(
        &kc,
        &[format!(
            "✗ {EAST}: certificates expiring within 30 days: apiserver certificate"
        )],
        "expiring certificate",
    )
    .await
    .unwrap();
    rotate_apiserver_cert(
        &*lab.lock().await,
        EAST,
        certs::issue::DEFAULT_LEAF_VALIDITY,
    )
    .await
    .unwrap();
    until_failed(&kc, &[], "certificate rotated").await.unwrap();
    eprintln!("expiring certificate: named, exit 1; rotated: exit 0");

    // etcd down.
    let leader = lab.lock().await.apiserver_leader(EAST).await.unwrap().name;
    lab.lock().await.hold_down(EAST, &Component::Etcd).unwrap();
    until_failed(
        &kc,
        &[
            format!("✗ {EAST}: etcd not answering"),
            format!("✗ {EAST}: leader {leader} elected, etcd-unreachable"),
        ],
        "etcd down",
    )
    .await
    .unwrap();
    lab.lock()
        .await
        .bring_back(EAST, &Component::Etcd)
        .await
        .unwrap();
    until_failed(&kc, &[], "etcd back").await.unwrap();
    eprintln!("etcd down: named, exit 1; back: exit 0");

    // A peer down: west's apiserver stopped.
    let leader = lab.lock().await.apiserver_leader(WEST).await.unwrap().name;
    lab.lock()
        .await
        .hold_down(WEST, &Component::Apiserver)
        .unwrap();
    until_failed(
        &kc,
        &[
            format!("✗ {EAST}: peer {WEST} stale"),
            format!("✗ {WEST}: apiserver {leader} not reporting"),
            format!("✗ {WEST}: clock not confirmed within -15s of this machine's"),
            format!("✗ {WEST}: other checks skipped: the status is not current"),
        ],
        "peer down",
    )
    .await
    .unwrap();
    lab.lock()
        .await
        .bring_back(WEST, &Component::Apiserver)
        .await
        .unwrap();
    until_failed(&kc, &[], "peer back").await.unwrap();
    eprintln!("peer apiserver down: named on both sides, exit 1; back: exit 0");

    // Cannot check: a context that does not exist.
    let out = clustermesh(&kc, &["check", "--context", "ck-nope"])
        .await
        .unwrap();
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .starts_with("error: cannot check: context \"ck-nope\" not found"),
        "{}",
        out.stderr
    );
}
