//! Kubernetes change → etcd key written, through the real `clustermesh-apiserver` process, at a
//! steady churn of 100 and 1,000 endpoint changes per second on top of 10,000 pods; the
//! exporter's memory per 10,000 pods and endpoints; and, as the baseline in the same run, the
//! raw etcd put → watch latency on the same etcd.
//! Run: `cargo bench -p clustermesh-apiserver --bench export_latency`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{etcd_baseline, row, rss_kib};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kvstore::watch::{Event, Watcher};
use model::ClusterName;
use model::keys::{self, Kind, Scope};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
const BASE_PODS: usize = 10_000;

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 8 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("p{i}"), "labels": {"app": format!("app{}", i % 50)}},
        "spec": {"nodeName": format!("node-{}", i % 20), "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}]}
    }))
    .unwrap()
}

/// Arrival time of each endpoint key, by IP.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

fn record_endpoints(kv: &kvstore::Client, cluster: &ClusterName) -> Arrivals {
    let arrivals: Arrivals = Arc::default();
    let prefix = keys::kind_prefix(Scope::State, cluster, Kind::Endpoints);
    let mut w = Watcher::new(kv, prefix.clone());
    let sink = Arc::clone(&arrivals);
    tokio::spawn(async move {
        while let Ok(e) = w.next().await {
            if let Event::Apply(kv) | Event::InitApply(kv) = e {
                let now = Instant::now();
                sink.lock()
                    .unwrap()
                    .entry(kv.key[prefix.len()..].to_owned())
                    .or_insert(now);
            }
        }
    });
    arrivals
}

async fn wait_count(arrivals: &Arrivals, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrivals.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "exporter did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Creates pods `from..from + rate * secs` at `rate` per second; returns per-change latency.
async fn churn(
    pods: &Api<Pod>,
    arrivals: &Arrivals,
    from: usize,
    rate: u32,
    secs: u32,
) -> Vec<Duration> {
    let n = (rate * secs) as usize;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut inflight = Vec::with_capacity(n);
    for i in from..from + n {
        tick.tick().await;
        let pods = pods.clone();
        let sent = Arc::clone(&sent);
        inflight.push(tokio::spawn(async move {
            sent.lock().unwrap().insert(ip(i), Instant::now());
            test_support::kube::create_with_status(&pods, &pod(i))
                .await
                .unwrap();
        }));
    }
    for t in inflight {
        t.await.unwrap();
    }
    wait_count(arrivals, from + n).await;
    let arrivals = arrivals.lock().unwrap();
    let sent = sent.lock().unwrap();
    let mut lat: Vec<Duration> = sent
        .iter()
        .map(|(ip, t0)| arrivals[ip].duration_since(*t0))
        .collect();
    lat.sort();
    lat
}

/// Raw etcd: put one key, wait for its watch event.

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let etcd = test_support::Etcd::start().await.unwrap();
    let cluster = ClusterName::new("bench").unwrap();
    let kube = kube_testserver::start(kube_testserver::Config::new(cluster.clone()))
        .await
        .unwrap();
    let client = kube.client().await.unwrap();
    let kv = etcd.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    let mut child = Command::new(BIN)
        .args([
            "--cluster-name",
            "bench",
            "--cluster-id",
            "5",
            "--etcd-endpoints",
            &etcd.endpoint(),
        ])
        .arg("--etcd-tls-dir")
        .arg(etcd.client_files().cert.parent().unwrap())
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args([
            "--health-bind",
            "127.0.0.1:0",
            "--replica",
            "bench",
            "--log",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let marker = keys::synced(Scope::State, &cluster, Kind::Endpoints);
    let deadline = Instant::now() + Duration::from_secs(60);
    while kv.get_raw(&marker).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "apiserver did not sync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle = rss_kib(pid);

    let arrivals = record_endpoints(&kv, &cluster);
    futures::stream::iter(0..BASE_PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                test_support::kube::create_with_status(&pods, &pod(i))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    wait_count(&arrivals, BASE_PODS).await;
    let loaded = rss_kib(pid);

    let baseline = etcd_baseline(&kv, "/bench/export-baseline/").await;
    let low = churn(&pods, &arrivals, BASE_PODS, 100, 10).await;
    let high = churn(&pods, &arrivals, BASE_PODS + 1000, 1000, 5).await;
    let _ = child.kill();
    let _ = child.wait();

    let mut report = String::from("## Exporter: Kubernetes change → etcd key written\n\n");
    report.push_str(&format!(
        "Real `clustermesh-apiserver` process, Kubernetes API test server, etcd 3.4 with mTLS; {BASE_PODS} pods already exported; each change creates a pod (a new endpoint). Latency from the create request being sent to the endpoint key's watch event.\n\n"
    ));
    report.push_str("| path | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
    report.push_str(&row("baseline: raw etcd put → watch event", &baseline));
    report.push_str(&row("exporter at 100 changes/s", &low));
    report.push_str(&row("exporter at 1,000 changes/s", &high));
    report.push_str(&format!(
        "\nExporter memory (RSS): idle {:.1} MiB, with {BASE_PODS} pods + endpoints {:.1} MiB: {:.1} MiB per 10,000 pods and endpoints.\n",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        (loaded.saturating_sub(idle)) as f64 / 1024.0 * 10_000.0 / BASE_PODS as f64
    ));
    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("export_latency.md"), &report);
    }
}
