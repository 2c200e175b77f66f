//! End-to-end figures on the emulated lab (two clusters, real processes), printed with their
//! baselines from the same run:
//! - `kubectl annotate` (global=true / false) in east → programmed (withdrawn) on a node of
//!   west, p50/p99, against the time kubectl itself takes to return;
//! - failover and recovery from a client's point of view (`clustermesh drill`, both methods),
//!   against the active probes' detection floor (interval × fall), which the kernel's passive
//!   health undercuts.
//!
//! Run: `cargo bench -p multicluster --bench e2e` (as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use model::node_state::NodeState;
use multicluster::lab::Lab;

const ROUNDS: usize = 40;
const DRILLS: usize = 5;

async fn state(lab: &Lab, cluster: &str, node: &str) -> Option<NodeState> {
    lab.node_state(cluster, node).await.ok()
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    test_support::percentile(&v, p).as_secs_f64() * 1000.0
}

fn kubectl(kc: &std::path::Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kc)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// `kubectl annotate --overwrite` of east's `demo/echo`; returns how long kubectl took.
fn annotate_echo(kc: &std::path::Path, annotations: &[&str]) -> Duration {
    let mut args = vec![
        "--context",
        "east",
        "-n",
        "demo",
        "annotate",
        "--overwrite",
        "service",
        "echo",
    ];
    args.extend_from_slice(annotations);
    kubectl(kc, &args)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    lab.install_cluster("east", 1, 1).await.unwrap();
    lab.install_cluster("west", 2, 1).await.unwrap();
    let kc = lab.kubeconfig();
    let out = multicluster::clustermesh(
        &kc,
        &[
            "connect",
            "--context",
            "east",
            "--destination-context",
            "west",
            "--wait",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    lab.deploy("east", "demo/echo", 2, &BTreeMap::new())
        .await
        .unwrap();
    let global = BTreeMap::from([("service.cilium.io/global".to_owned(), "true".to_owned())]);
    lab.deploy("west", "demo/echo", 2, &global).await.unwrap();
    let east_ips: Vec<String> = lab
        .cluster("east")
        .unwrap()
        .pods
        .iter()
        .map(|p| format!("{}:8080", p.ip))
        .collect();
    let west_node = lab.cluster("west").unwrap().nodes[0].name.clone();
    let has_east = |s: &NodeState| {
        s.services.iter().any(|svc| {
            svc.programmed
                .iter()
                .flatten()
                .any(|b| east_ips.contains(&b.addr))
        })
    };

    let (mut add, mut withdraw, mut kubectl_only) = (Vec::new(), Vec::new(), Vec::new());
    let mut after_kubectl = Vec::new();
    for round in 0..ROUNDS {
        let value = if round % 2 == 0 { "true" } else { "false" };
        let t = Instant::now();
        let took = annotate_echo(&kc, &[&format!("service.cilium.io/global={value}")]);
        kubectl_only.push(took);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = state(&lab, "west", &west_node).await
                && has_east(&s) == (value == "true")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: not programmed in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        after_kubectl.push(t.elapsed().saturating_sub(took));
        if value == "true" {
            add.push(t.elapsed());
        } else {
            withdraw.push(t.elapsed());
        }
    }
    println!(
        "e2e: kubectl annotate in east -> programmed on west-node-1 ({} rounds each)",
        ROUNDS / 2
    );
    println!(
        "  baseline: kubectl annotate alone returns in p50 {:.1} ms, p99 {:.1} ms",
        pct(kubectl_only.clone(), 0.5),
        pct(kubectl_only, 0.99)
    );
    println!(
        "  global=true  -> east's backends programmed on west: p50 {:.1} ms, p99 {:.1} ms",
        pct(add.clone(), 0.5),
        pct(add, 0.99)
    );
    println!(
        "  global=false -> withdrawn on west:                  p50 {:.1} ms, p99 {:.1} ms",
        pct(withdraw.clone(), 0.5),
        pct(withdraw, 0.99)
    );
    println!(
        "  of which after kubectl returned (API write -> exporter -> etcd -> Mesh API -> importer -> etcd -> Mesh API -> agent -> maps): p50 {:.1} ms, p99 {:.1} ms",
        pct(after_kubectl.clone(), 0.5),
        pct(after_kubectl, 0.99)
    );

    // Failover drills from a client pod in east, against west's backends.
    annotate_echo(
        &kc,
        &[
            "service.cilium.io/global=true",
            "service.cilium.io/affinity=local",
        ],
    );
    let node = lab.cluster("east").unwrap().nodes[0].name.clone();
    let client = lab
        .add_pod("east", "default", "client", &node, &BTreeMap::new())
        .await
        .unwrap();
    let labbin = multicluster::lab::binary("clustermesh-lab").unwrap();
    let labdir = lab.state.dir.clone();
    let netns = format!("/run/netns/{}", client.netns);
    let cgroup = client.cgroup.display().to_string();
    for method in ["command", "not-ready"] {
        let (mut fo, mut rc) = (Vec::new(), Vec::new());
        for _ in 0..DRILLS {
            let down = format!(
                "{} backends --dir {} --cluster east --service demo/echo stop",
                labbin.display(),
                labdir.display()
            );
            let up = format!(
                "{} backends --dir {} --cluster east --service demo/echo start",
                labbin.display(),
                labdir.display()
            );
            let mut args = vec![
                "drill",
                "--context",
                "east",
                "--service",
                "demo/echo",
                "--client-netns",
                &netns,
                "--client-cgroup",
                &cgroup,
                "--method",
                method,
                "--hold",
                "500ms",
                "-o",
                "json",
                "--interval",
                "5ms",
            ];
            if method == "command" {
                args.extend(["--down-cmd", &down, "--up-cmd", &up]);
            }
            let out = multicluster::clustermesh(&kc, &args).await.unwrap();
            assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            fo.push(Duration::from_secs_f64(
                v["failover_ms"].as_f64().unwrap() / 1000.0,
            ));
            rc.push(Duration::from_secs_f64(
                v["recover_ms"].as_f64().unwrap() / 1000.0,
            ));
        }
        println!(
            "drill --method {method} ({DRILLS} runs, client connects every 5 ms): failover median {:.1} ms (max {:.1}), recover median {:.1} ms (max {:.1})",
            pct(fo.clone(), 0.5),
            pct(fo, 1.0),
            pct(rc.clone(), 0.5),
            pct(rc, 1.0)
        );
    }
    println!(
        "  baseline: the agent's active probes (deploy/'s defaults: every 200 ms, 2 failures) -> detection floor 200-400 ms without the kernel's passive health"
    );
    lab.teardown();
}
