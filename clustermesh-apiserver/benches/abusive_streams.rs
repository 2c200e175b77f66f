//! Mesh API memory under abusive clients: 1,000 Watch streams that never read, against a
//! state of 20,000 endpoints (a full snapshot is ~3 MB), apiserver as a real process. The
//! baseline, measured in the same run, is the same process's RSS after one well-behaved client
//! read the whole snapshot. The bound stated (and checked) is: baseline + the send budget
//! (`SEND_BUDGET_BYTES`, 64 MiB) + 128 KiB per admitted connection (its TLS buffers, HTTP/2
//! window and task state; measured at about 60 KiB here).
//! Abusers: 1,000 streams over 1,000 connections with 1,000 distinct node-agent identities (each
//! admitted, each holding its queue), then 1,000 stream attempts with one peer certificate
//! (capped at `MAX_WATCHES_PER_PEER`).
//! Run: `cargo bench -p clustermesh-apiserver --bench abusive_streams`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::rss_kib;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use certs::{Ca, LeafSpec, MeshIdentity, Role};
use clustermesh_apiserver::mesh::server::{MAX_WATCHES_PER_PEER, SEND_BUDGET_BYTES};
use model::keys::{self, Scope};
use model::{ClusterId, ClusterName, Endpoint, NodeName, NumericIdentity};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint as Ep, Identity};
use wire::{Codec, pb};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh-apiserver");
const ENDPOINTS: usize = 20_000;
const ABUSERS: usize = 1_000;

async fn channel(port: u16, ca: &Ca, leaf: &certs::Leaf) -> tonic::transport::Channel {
    channel_from(port, ca, leaf, Ipv4Addr::LOCALHOST).await
}

/// From a given loopback source address (the Mesh API caps connections per source).
async fn channel_from(
    port: u16,
    ca: &Ca,
    leaf: &certs::Leaf,
    source: Ipv4Addr,
) -> tonic::transport::Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem))
        .domain_name("127.0.0.1");
    Ep::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .local_address(Some(IpAddr::V4(source)))
        .connect()
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let name = ClusterName::new("alpha").unwrap();
    let id = ClusterId::new(1).unwrap();
    let etcd = test_support::Etcd::start().await.unwrap();
    let kv = etcd.client().await.unwrap();
    let kube = kube_testserver::start(kube_testserver::Config::new(name.clone()))
        .await
        .unwrap();
    let ca = Ca::generate(&name, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = ca
        .issue(
            &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Apiserver))
                .ips([IpAddr::V4(Ipv4Addr::LOCALHOST)]),
        )
        .unwrap();
    test_support::write_tls(&dir.path().join("mesh"), &ca, &server).unwrap();
    let grants = dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    // One granted peer ("bravo").
    let bravo = ClusterName::new("bravo").unwrap();
    let bravo_id = ClusterId::new(2).unwrap();
    let peer = ca
        .issue(&LeafSpec::new(MeshIdentity::new(
            bravo.clone(),
            bravo_id,
            Role::Peer,
        )))
        .unwrap();
    std::fs::create_dir_all(grants.join("bravo")).unwrap();
    std::fs::write(grants.join("bravo/cluster-id"), "2").unwrap();
    std::fs::write(
        grants.join("bravo/sha256"),
        certs::fingerprint_pem(peer.cert_pem.as_bytes()).unwrap(),
    )
    .unwrap();

    // The state: 20,000 endpoints imported from bravo (the cache prefix: the exporter does not
    // prune it, and local identities see it).
    let items: Vec<(String, Vec<u8>)> = (0..ENDPOINTS)
        .map(|i| {
            let ep = Endpoint {
                cluster: bravo.clone(),
                ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1)),
                identity: NumericIdentity::scoped(bravo_id, 1000 + (i % 100) as u16).unwrap(),
                node: NodeName::new(format!("node-{}", i % 50)).unwrap(),
                pod: Some(model::PodRef {
                    namespace: "default".into(),
                    name: format!("pod-{i}"),
                    uid: String::new(),
                }),
            };
            (keys::object(Scope::Cache, &ep), ep.encode())
        })
        .collect();
    kv.put_many(&items, 0).await.unwrap();

    let port = test_support::free_port().unwrap();
    let health = test_support::free_port().unwrap();
    let mut child = Command::new(BIN)
        .args(["--cluster-name", "alpha", "--cluster-id", "1"])
        .args(["--etcd-endpoints", &etcd.endpoint()])
        .arg("--etcd-tls-dir")
        .arg(etcd.client_files().cert.parent().unwrap())
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(["--replica", "bench", "--log", "warn"])
        .args(["--health-bind", &format!("127.0.0.1:{health}")])
        .args(["--mesh-bind", &format!("127.0.0.1:{port}")])
        .arg("--mesh-tls-dir")
        .arg(dir.path().join("mesh"))
        .arg("--grants-dir")
        .arg(&grants)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !test_support::http_get(([127, 0, 0, 1], health).into(), "/readyz")
        .await
        .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(Instant::now() < deadline, "apiserver not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Baseline: one well-behaved client reads the whole snapshot.
    let admin = ca
        .issue(&LeafSpec::new(MeshIdentity::new(
            name.clone(),
            id,
            Role::Admin,
        )))
        .unwrap();
    let mut api = pb::mesh_client::MeshClient::new(channel(port, &ca, &admin).await)
        .max_decoding_message_size(64 << 20);
    let mut s = api
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (mut bytes, mut changes) = (0usize, 0usize);
    let t = Instant::now();
    while let Some(m) = s.message().await.unwrap() {
        bytes += prost::Message::encoded_len(&m);
        changes += m.changes.len();
        if m.snapshot_complete {
            break;
        }
    }
    let snapshot = t.elapsed();
    drop(s);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_kib(pid);

    // 1,000 node-agent identities, one never-reading stream each.
    let mut held = Vec::new();
    let t = Instant::now();
    for i in 0..ABUSERS {
        let leaf = ca
            .issue(&LeafSpec::new(MeshIdentity::node_agent(
                name.clone(),
                id,
                NodeName::new(format!("abuser-{i}")).unwrap(),
            )))
            .unwrap();
        // 100 connections per loopback source address, under the per-source cap.
        let source = Ipv4Addr::new(127, 0, 1, 1 + (i / 100) as u8);
        let mut api =
            pb::mesh_client::MeshClient::new(channel_from(port, &ca, &leaf, source).await);
        let stream = api
            .watch(pb::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        held.push((api, stream));
    }
    let opened = t.elapsed();
    // Let every stream fill what it may hold.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let abused = rss_kib(pid);
    // One peer certificate, 1,000 attempts: capped.
    let mut peer_ok = 0;
    let mut peer_streams = Vec::new();
    let ch = channel(port, &ca, &peer).await;
    for _ in 0..ABUSERS {
        let mut api = pb::mesh_client::MeshClient::new(ch.clone());
        if let Ok(s) = api.watch(pb::WatchRequest::default()).await {
            peer_ok += 1;
            peer_streams.push(s.into_inner());
        }
    }
    let after_peer = rss_kib(pid);
    let bound_kib = baseline + (SEND_BUDGET_BYTES as u64 / 1024) + 128 * ABUSERS as u64;

    println!("## Mesh API under abusive streams\n");
    println!("| figure | value |\n|---|---|");
    println!(
        "| state | {changes} endpoints, snapshot {:.1} MB, read in {:.0} ms |",
        bytes as f64 / 1e6,
        snapshot.as_secs_f64() * 1000.0
    );
    println!(
        "| baseline RSS (after one full snapshot) | {:.1} MiB |",
        baseline as f64 / 1024.0
    );
    println!(
        "| RSS with {ABUSERS} never-reading streams (1,000 identities) | {:.1} MiB (+{:.1} MiB; opened in {:.1} s) |",
        abused as f64 / 1024.0,
        (abused.saturating_sub(baseline)) as f64 / 1024.0,
        opened.as_secs_f64()
    );
    println!(
        "| peer streams admitted of {ABUSERS} attempts with one certificate | {peer_ok} (cap {MAX_WATCHES_PER_PEER}) |"
    );
    println!(
        "| RSS after the peer attempts | {:.1} MiB |",
        after_peer as f64 / 1024.0
    );
    println!(
        "| stated bound: baseline + send budget + 64 KiB/stream | {:.1} MiB |",
        bound_kib as f64 / 1024.0
    );
    let within = abused.max(after_peer) <= bound_kib;
    println!("| within the bound | {within} |");
    drop(held);
    drop(peer_streams);
    let _ = child.kill();
    let _ = child.wait();
    assert!(peer_ok <= MAX_WATCHES_PER_PEER, "peer cap");
    assert!(
        within,
        "RSS {} KiB over the bound {bound_kib} KiB",
        abused.max(after_peer)
    );
}
