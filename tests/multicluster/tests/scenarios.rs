//! Every scenario of the mesh on the emulated lab, one lab for all of them (a lab takes a few
//! seconds to start; the scenarios build on each other the way a user's day would):
//! connect through the CLI, global services with affinity local / remote / none and
//! shared=false, failover and return (also as `clustermesh drill`, kill and not-ready), a peer
//! apiserver killed and restarted, a third cluster joining, ID conflicts refused, and
//! disconnect draining. Run as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use multicluster::lab::Lab;
use multicluster::{LabCluster, clustermesh, scenarios};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_scenarios_on_the_lab() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    lab.add_cluster("east", 1, 2).await.unwrap();
    lab.add_cluster("west", 2, 2).await.unwrap();
    let kc = lab.kubeconfig();
    let lab = Arc::new(Mutex::new(lab));
    let (east, west) = (
        LabCluster::new(&lab, "east").await,
        LabCluster::new(&lab, "west").await,
    );

    scenarios::connect(&kc, &east, &west).await.unwrap();
    eprintln!("connected east <-> west through the CLI");

    let (echo_east, _) = scenarios::global_services(&kc, &east, &west).await.unwrap();
    eprintln!("global services: affinity local/remote/none and shared=false as expected");

    let reports = scenarios::failover(&kc, &east, &west, echo_east)
        .await
        .unwrap();
    for r in &reports {
        eprintln!(
            "drill {}: failover {} ms, recover {} ms, {} failed connections",
            r["method"], r["failover_ms"], r["recover_ms"], r["failures"]
        );
    }

    let remote_east =
        std::net::IpAddr::V4(lab.lock().await.cluster("east").unwrap().services["demo/remote"]);
    scenarios::peer_apiserver_restart(&kc, &east, &west, remote_east)
        .await
        .unwrap();
    eprintln!("west's apiserver killed and restarted: no traffic impact, stale shown, no flap");

    scenarios::tampered_peer_secret_is_repaired(&kc, &east, &west, remote_east)
        .await
        .unwrap();
    eprintln!(
        "a foreign CA in east's peer Secret: refused and shown, traffic kept, connect repairs it"
    );

    // A third cluster joins east; its backends of demo/remote are used by east's client.
    lab.lock().await.add_cluster("north", 3, 1).await.unwrap();
    let north = LabCluster::new(&lab, "north").await;
    scenarios::connect(&kc, &east, &north).await.unwrap();
    let global = BTreeMap::from([("service.cilium.io/global".to_owned(), "true".to_owned())]);
    multicluster::Cluster::deploy(&north, "demo/remote", 1, &global)
        .await
        .unwrap();
    scenarios::until_answered_by(
        &east,
        "client",
        SocketAddr::new(remote_east, 80),
        &["north", "west"],
    )
    .await
    .unwrap();
    eprintln!("north joined: east's client reaches west and north");

    // A cluster reusing west's ID (or east's name) is refused by connect, and nothing is
    // written.
    lab.lock().await.add_cluster("twin", 2, 0).await.unwrap();
    let out = clustermesh(
        &kc,
        &[
            "connect",
            "--context",
            "east",
            "--destination-context",
            "twin",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("cluster ID 2") && out.stderr.contains("west"),
        "{}",
        out.stderr
    );
    let out = clustermesh(
        &kc,
        &[
            "connect",
            "--context",
            "west",
            "--destination-context",
            "twin",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("both have cluster ID 2"),
        "{}",
        out.stderr
    );
    let out = clustermesh(&kc, &["status", "--context", "twin", "-o", "json"])
        .await
        .unwrap();
    assert!(out.stdout.contains("\"peers\": []"), "{}", out.stdout);
    let out = clustermesh(
        &kc,
        &[
            "connect",
            "--context",
            "nowhere",
            "--destination-context",
            "west",
        ],
    )
    .await
    .unwrap();
    assert!(
        out.stderr.contains("context \"nowhere\" not found"),
        "{}",
        out.stderr
    );

    // Disconnect drains: west first (north still answers), then north with --force.
    scenarios::disconnect_drains(&kc, &east, &west, remote_east, false, &["north"])
        .await
        .unwrap();
    scenarios::disconnect_drains(&kc, &east, &north, remote_east, true, &["east"])
        .await
        .unwrap();
    eprintln!("disconnect drained west, then north (--force)");

    // Everything goes away: processes, namespaces, veths, bridge, cgroups, pins.
    let x = lab.lock().await.state.x;
    lab.lock().await.teardown();
    assert!(!std::path::Path::new(&format!("/sys/class/net/cmb{x}")).exists());
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/clustermesh-lab-{x}")).exists());
}
