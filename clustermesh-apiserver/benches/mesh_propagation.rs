//! Mesh API propagation: a change written to cluster A's etcd → seen by a node agent of
//! cluster B (A's apiserver → Mesh API → B's importer → B's etcd → B's Mesh API → node agent),
//! both apiservers as real processes with mutual TLS; against raw etcd put → watch in the same
//! run. Also: resync time with 100,000 endpoints, bytes per endpoint change, and B's memory per
//! imported endpoint.
//! Run: `cargo bench -p clustermesh-apiserver --bench mesh_propagation`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{etcd_baseline, row, rss_kib};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certs::{Ca, LeafSpec, MeshIdentity, Reloader, Role, TlsFiles};
use model::keys::{self, Scope};
use model::{ClusterId, ClusterName, Endpoint, NodeName, NumericIdentity};
use wire::{Codec, pb};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
const BULK: usize = 100_000;

fn free_port() -> u16 {
    test_support::free_port().unwrap()
}

fn write_tls(dir: &Path, ca: &Ca, leaf: &certs::Leaf) {
    test_support::write_tls(dir, ca, leaf).unwrap();
}

struct Side {
    name: ClusterName,
    id: ClusterId,
    etcd: test_support::Etcd,
    kube: kube_testserver::Handle,
    ca: Ca,
    dir: tempfile::TempDir,
    mesh_port: u16,
    health_port: u16,
}

impl Side {
    async fn new(name: &str, id: u64) -> Self {
        let name = ClusterName::new(name).unwrap();
        let id = ClusterId::new(id).unwrap();
        let etcd = test_support::Etcd::start().await.unwrap();
        let kube = kube_testserver::start(kube_testserver::Config::new(name.clone()))
            .await
            .unwrap();
        let ca = Ca::generate(&name, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca
            .issue(
                &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Apiserver))
                    .ips([IpAddr::V4(Ipv4Addr::LOCALHOST)]),
            )
            .unwrap();
        write_tls(&dir.path().join("mesh"), &ca, &leaf);
        std::fs::create_dir_all(dir.path().join("peers")).unwrap();
        std::fs::create_dir_all(dir.path().join("grants")).unwrap();
        Self {
            name,
            id,
            etcd,
            kube,
            ca,
            dir,
            mesh_port: free_port(),
            health_port: free_port(),
        }
    }

    fn spawn(&self) -> Child {
        Command::new(BIN)
            .args([
                "--cluster-name",
                self.name.as_str(),
                "--cluster-id",
                &self.id.to_string(),
            ])
            .args(["--etcd-endpoints", &self.etcd.endpoint()])
            .arg("--etcd-tls-dir")
            .arg(self.etcd.client_files().cert.parent().unwrap())
            .arg("--kubeconfig")
            .arg(self.kube.kubeconfig())
            .args(["--replica", "bench", "--log", "warn"])
            .args(["--health-bind", &format!("127.0.0.1:{}", self.health_port)])
            .args(["--mesh-bind", &format!("127.0.0.1:{}", self.mesh_port)])
            .arg("--mesh-tls-dir")
            .arg(self.dir.path().join("mesh"))
            .arg("--peers-dir")
            .arg(self.dir.path().join("peers"))
            .arg("--grants-dir")
            .arg(self.dir.path().join("grants"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    fn import_from(&self, peer: &Side) {
        let staging = self.dir.path().join(".staging");
        let leaf = peer
            .ca
            .issue(&LeafSpec::new(MeshIdentity::new(
                self.name.clone(),
                self.id,
                Role::Peer,
            )))
            .unwrap();
        write_tls(&staging, &peer.ca, &leaf);
        // The serving side's grant, as `clustermesh connect` writes it.
        let grant = peer.dir.path().join("grants").join(self.name.as_str());
        std::fs::create_dir_all(&grant).unwrap();
        std::fs::write(grant.join("cluster-id"), self.id.to_string()).unwrap();
        std::fs::write(
            grant.join("sha256"),
            certs::fingerprint_pem(leaf.cert_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        std::fs::write(
            staging.join("endpoints"),
            format!("127.0.0.1:{}\n", peer.mesh_port),
        )
        .unwrap();
        std::fs::rename(
            &staging,
            self.dir.path().join("peers").join(peer.name.as_str()),
        )
        .unwrap();
    }

    async fn http(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.health_port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    }

    async fn metric(&self, line_prefix: &str) -> f64 {
        self.http("/metrics")
            .await
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix(line_prefix)
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_default()
    }

    async fn peer_ready(&self, peer: &str) -> bool {
        let Some(body) = self.http("/status").await else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            return false;
        };
        v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == peer && p["phase"] == "ready")
    }
}

fn endpoint(cluster: &ClusterName, id: ClusterId, i: usize) -> (String, Vec<u8>) {
    let ep = Endpoint {
        cluster: cluster.clone(),
        ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1)),
        identity: NumericIdentity::scoped(id, 1000 + (i % 100) as u16).unwrap(),
        node: NodeName::new(format!("node-{}", i % 50)).unwrap(),
        pod: Some(model::PodRef {
            namespace: "default".into(),
            name: format!("pod-{i}"),
            uid: String::new(),
        }),
    };
    (keys::object(Scope::State, &ep), ep.encode())
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < end, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A node agent of B: records when each alpha endpoint arrives.
async fn node_agent(b: &Side) -> Arrivals {
    let files = b.dir.path().join("na");
    let leaf =
        b.ca.issue(&LeafSpec::new(MeshIdentity::node_agent(
            b.name.clone(),
            b.id,
            NodeName::new("n1").unwrap(),
        )))
        .unwrap();
    write_tls(&files, &b.ca, &leaf);
    let tls = Reloader::load(TlsFiles::in_dir(&files)).unwrap();
    let c = clustermesh_apiserver::mesh::client::connect(
        &b.name,
        &[format!("127.0.0.1:{}", b.mesh_port)],
        &tls,
    )
    .await
    .unwrap();
    let mut api = c.client;
    let mut stream = api
        .watch(pb::WatchRequest {
            kinds: vec!["endpoints".into()],
            clusters: vec!["alpha".into()],
            resume_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let arrivals: Arrivals = Arc::default();
    let sink = Arc::clone(&arrivals);
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            let now = Instant::now();
            let mut a = sink.lock().unwrap();
            for ch in msg.changes {
                a.entry(ch.name).or_insert(now);
            }
        }
    });
    arrivals
}

async fn churn(
    kv: &kvstore::Client,
    a: &Side,
    arrivals: &Arrivals,
    from: usize,
    rate: u32,
    secs: u32,
) -> Vec<Duration> {
    let n = (rate * secs) as usize;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = Vec::new();
    for i in from..from + n {
        tick.tick().await;
        let (key, value) = endpoint(&a.name, a.id, i);
        let name = key.rsplit('/').next().unwrap().to_owned();
        let (kv, sent) = (kv.clone(), Arc::clone(&sent));
        tasks.push(tokio::spawn(async move {
            sent.lock().unwrap().insert(name, Instant::now());
            kv.put_raw(&key, value).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_until("all churn arrived", Duration::from_secs(120), async || {
        let a = arrivals.lock().unwrap();
        sent.lock().unwrap().keys().all(|k| a.contains_key(k))
    })
    .await;
    let a = arrivals.lock().unwrap();
    let mut lat: Vec<Duration> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|(k, t0)| a[k].duration_since(*t0))
        .collect();
    lat.sort();
    lat
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = Side::new("alpha", 1).await;
    let b = Side::new("bravo", 2).await;
    let kv_a = a.etcd.client().await.unwrap();
    // alpha's advertised address space: bravo imports only endpoints inside its nodes' pod
    // CIDRs (the bench's endpoints are 10.0.0.0/8).
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(a.kube.client().await.unwrap());
    nodes
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "alpha-node"},
                "spec": {"podCIDRs": ["10.0.0.0/8"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut pa = Killed(a.spawn());
    let pb_ = Killed(b.spawn());
    b.import_from(&a);
    wait_until("bravo imports alpha", Duration::from_secs(60), async || {
        b.peer_ready("alpha").await
    })
    .await;
    let arrivals = node_agent(&b).await;
    let rss_before = rss_kib(pb_.0.id());

    let baseline = etcd_baseline(&kv_a, "/bench/mesh-baseline/").await;
    let bytes0 = b
        .metric("clustermesh_peer_received_bytes_total{peer=\"alpha\"}")
        .await;
    let low = churn(&kv_a, &a, &arrivals, 0, 100, 10).await;
    let bytes1 = b
        .metric("clustermesh_peer_received_bytes_total{peer=\"alpha\"}")
        .await;
    let high = churn(&kv_a, &a, &arrivals, 1000, 1000, 5).await;

    // Reconvergence over repeated outages: A's apiserver killed (-9) and restarted three times
    // in a row; from A ready again to B's peer phase ready. Baseline: A's own restart → ready.
    let mut restart_ready = Vec::new();
    let mut reconverge = Vec::new();
    for _ in 0..3 {
        drop(pa);
        wait_until(
            "bravo sees alpha gone",
            Duration::from_secs(60),
            async || !b.peer_ready("alpha").await,
        )
        .await;
        let t0 = Instant::now();
        pa = Killed(a.spawn());
        wait_until("alpha ready", Duration::from_secs(60), async || {
            a.http("/readyz")
                .await
                .is_some_and(|body| body.starts_with("ready"))
        })
        .await;
        restart_ready.push(t0.elapsed());
        let t1 = Instant::now();
        wait_until("bravo reconverged", Duration::from_secs(60), async || {
            b.peer_ready("alpha").await
        })
        .await;
        reconverge.push(t1.elapsed());
    }

    // 100,000 endpoints.
    let start = 10_000;
    let items: Vec<(String, Vec<u8>)> = (start..start + BULK)
        .map(|i| endpoint(&a.name, a.id, i))
        .collect();
    let t0 = Instant::now();
    for chunk in items.chunks(5000) {
        kv_a.put_many(chunk, 0).await.unwrap();
    }
    wait_until(
        "100k at the node agent",
        Duration::from_secs(300),
        async || arrivals.lock().unwrap().len() >= 6000 + BULK,
    )
    .await;
    let bulk_initial = t0.elapsed();
    let rss_after = rss_kib(pb_.0.id());

    // Resync after alpha's apiserver restarts (bravo reconnects; its cache is kept).
    drop(pa);
    wait_until(
        "bravo sees alpha gone",
        Duration::from_secs(60),
        async || !b.peer_ready("alpha").await,
    )
    .await;
    let t0 = Instant::now();
    pa = Killed(a.spawn());
    wait_until("bravo resynced", Duration::from_secs(300), async || {
        b.peer_ready("alpha").await
    })
    .await;
    let resync = t0.elapsed();
    drop(pa);
    drop(pb_);

    let total = (6000 + BULK) as f64;
    let mut r = String::from("## Mesh API: cluster A etcd write → node agent of cluster B\n\n");
    r.push_str("Two `clustermesh-apiserver` processes, each with its own etcd 3.4 (mTLS); B imports A over the Mesh API (gRPC, mutual TLS, gzip); a node agent client watches B. Each change is one endpoint put into A's etcd; latency until the node agent receives it.\n\n");
    r.push_str("| path | samples | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
    r.push_str(&row(
        "baseline: raw etcd put → watch event (A's etcd)",
        &baseline,
    ));
    r.push_str(&row("A etcd → B node agent at 100 changes/s", &low));
    r.push_str(&row("A etcd → B node agent at 1,000 changes/s", &high));
    for (i, (up, conv)) in restart_ready.iter().zip(&reconverge).enumerate() {
        r.push_str(&format!(
            "| outage {} of A's apiserver: A restart → A ready (baseline) / A ready → B's peer ready | 1 | {:.0} / {:.0} | | |\n",
            i + 1,
            up.as_secs_f64() * 1000.0,
            conv.as_secs_f64() * 1000.0
        ));
    }
    r.push_str(&format!(
        "\n- Bytes per endpoint change (decoded Watch messages, before gzip): {:.1}\n",
        (bytes1 - bytes0) / low.len() as f64
    ));
    r.push_str(&format!(
        "- {BULK} endpoints written to A's etcd → all at B's node agent: {:.2} s\n",
        bulk_initial.as_secs_f64()
    ));
    r.push_str(&format!("- Resync after A's apiserver restarts, {total:.0} endpoints held: {:.2} s (A restart → B ready)\n", resync.as_secs_f64()));
    r.push_str(&format!(
        "- B's memory per imported endpoint: {:.0} bytes (RSS {:.1} → {:.1} MiB for {total:.0} endpoints; includes B's watch cache serving its node agents)\n",
        (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / total,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    ));
    print!("{r}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("mesh_propagation.md"), &r);
    }
}
