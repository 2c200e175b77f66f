//! Two emulated clusters, connected both ways: a global service reachable from a node of east
//! with local affinity, failing over to west's backends when east's die, and back.
//! The whole chain is real: Kubernetes API → exporter → etcd → Mesh API (mTLS) → importer →
//! etcd → Mesh API → node agent → eBPF in the kernel → connect() from the node's cgroup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use multicluster::Cluster;
use node_agent::agent;
use serde_json::{Value, json};
use test_support::eventually;

const T: Duration = Duration::from_secs(30);

const SERVER: &str = r#"
import socket, sys
name, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall((name + "\n").encode())
    finally:
        c.close()
"#;

const CLIENT: &str = r#"
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
counts, failures = {}, 0
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=2)
        name = s.recv(64).decode().strip()
        s.close()
        counts[name] = counts.get(name, 0) + 1
    except Exception:
        failures += 1
print(json.dumps({"counts": counts, "failures": failures}))
"#;

struct Backend(Child);

impl Backend {
    fn start(name: &str, addr: SocketAddr) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .args([
                "-c",
                SERVER,
                name,
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Self(child)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` connections to `vip` from inside `cgroup`.
fn client(cgroup: &std::path::Path, vip: SocketAddr, n: usize) -> Value {
    let cmd = format!(
        "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" {} {} {n}",
        cgroup.display(),
        vip.ip(),
        vip.port()
    );
    let out = Command::new("sh")
        .args(["-c", &cmd, CLIENT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}

fn only(v: &Value, prefix: &str) -> bool {
    let c = counts(v);
    v["failures"] == 0 && !c.is_empty() && c.keys().all(|k| k.starts_with(prefix))
}

/// A global service `web` with backends at `ips`:`port`; returns its cluster IP.
async fn global_web(c: &Cluster, ips: &[&str], port: u16) -> std::net::IpAddr {
    let svcs: Api<Service> = Api::default_namespaced(c.client.clone());
    let svc = svcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web", "annotations": {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::default_namespaced(c.client.clone());
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": endpoints
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    svc.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_service_fails_over_across_clusters_and_back() {
    let east = Cluster::start("east", 1).await.unwrap();
    let west = Cluster::start("west", 2).await.unwrap();
    east.import_from(&west).unwrap();
    west.import_from(&east).unwrap();

    let port = test_support::free_port().unwrap();
    let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
    let mut east_backends = vec![
        Backend::start("east-1", at("127.0.11.1")),
        Backend::start("east-2", at("127.0.11.2")),
    ];
    let _west_backends = [Backend::start("west-1", at("127.0.12.1"))];
    let vip = SocketAddr::new(
        global_web(&east, &["127.0.11.1", "127.0.11.2"], port).await,
        80,
    );
    global_web(&west, &["127.0.12.1"], port).await;

    // Both directions connected.
    for (c, peer) in [(&east, "west"), (&west, "east")] {
        eventually(&format!("{} imports {peer}", c.name), T, || async {
            let st = c.apiserver.as_ref().unwrap().peers().get(peer)?;
            (st.phase == clustermesh_apiserver::mesh::importer::Phase::Ready).then_some(())
        })
        .await;
    }

    let node = east.node("node-1").await.unwrap();
    // The node has east's and west's backends; with local affinity east's serve.
    let local = eventually("east's backends serve", T, || async {
        let v = client(&node.cgroup, vip, 100);
        only(&v, "east").then_some(v)
    })
    .await;
    println!("east, affinity local: {local}");

    // East's backends die: after detection, new connections go to west with zero failures.
    let killed = Instant::now();
    east_backends.clear();
    eventually("east's backends marked unhealthy", T, || async {
        (node.metrics.value(agent::m::FAILOVERS, &[]) >= 2.0).then_some(())
    })
    .await;
    println!("failover detected after {:?}", killed.elapsed());
    let failover = client(&node.cgroup, vip, 100);
    println!("after failover: {failover}");
    assert!(only(&failover, "west"), "{failover}");

    // They come back: new connections return to east.
    east_backends = vec![
        Backend::start("east-1", at("127.0.11.1")),
        Backend::start("east-2", at("127.0.11.2")),
    ];
    eventually("east's backends healthy again", T, || async {
        (node.metrics.value(agent::m::RECOVERIES, &[]) >= 2.0).then_some(())
    })
    .await;
    let back = client(&node.cgroup, vip, 100);
    assert!(only(&back, "east"), "{back}");
    drop(node);
    drop(east_backends);
}
