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

use multicluster::lab::{Lab, TlsDir};
use multicluster::{LabCluster, clustermesh, scenarios};
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_scenarios_on_the_lab() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    // Both brought up by `clustermesh install` from deploy/, their pods run by the lab
    // kubelet.
    lab.install_cluster("east", 1, 2).await.unwrap();
    lab.install_cluster("west", 2, 2).await.unwrap();
    let kc = lab.kubeconfig();
    let lab = Arc::new(Mutex::new(lab));
    let (east, west) = (
        LabCluster::new(&lab, "east").await,
        LabCluster::new(&lab, "west").await,
    );

    scenarios::connect(&kc, &east, &west).await.unwrap();
    eprintln!("connected east <-> west through the CLI");

    for cluster in ["east", "west"] {
        only_the_apiserver_opens_etcd(&*lab.lock().await, cluster).await;
    }
    eprintln!("etcd refuses every mesh credential (peer, node agent, admin, Mesh API server)");
    node_state_is_for_admins_only(&*lab.lock().await).await;
    eprintln!(
        "a node's /state is served to this cluster's admins only (mTLS), not on the open port"
    );

    let (echo_east, _) = scenarios::global_services(&kc, &east, &west).await.unwrap();
    unshared_pods_export_their_identity_not_their_backends(&*lab.lock().await).await;
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
    scenarios::interrupted_drill_restores(&kc, &east, &west, echo_east)
        .await
        .unwrap();
    let took = scenarios::cluster_weights(&kc, &east, &west, echo_east)
        .await
        .unwrap();
    eprintln!(
        "cluster weights: 0/100, 50/50 and removed, in effect on east's client node after {took:?} (kubectl annotate → first matching connections)"
    );

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
    lab.lock()
        .await
        .install_cluster("north", 3, 1)
        .await
        .unwrap();
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
    lab.lock()
        .await
        .install_cluster("twin", 2, 0)
        .await
        .unwrap();
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

/// Issue 12, case 1: etcd is a trust domain of its own. Every credential that leaves the
/// apiserver (the peer certificate `clustermesh connect` handed to the other cluster, a node
/// agent's, an admin's as `clustermesh services` mints it, the Mesh API's own server
/// certificate) is refused by the cluster's etcd, for reads and for writes; the apiserver's etcd
/// client certificate (the positive control) is accepted. The client is `etcdctl`, not our code.
async fn only_the_apiserver_opens_etcd(lab: &Lab, cluster: &str) {
    let c = lab.cluster(cluster).unwrap();
    let other = if cluster == "east" { "west" } else { "east" };
    let endpoint = format!("https://{}", lab.etcd_addr(cluster).await.unwrap());
    let etcd_tls = lab.tls_dir(cluster, &TlsDir::EtcdClient).await.unwrap();
    let etcd_ca = etcd_tls.join("ca.crt");
    // An admin certificate from the cluster CA, as `clustermesh services` issues it.
    let ca = certs::Ca::from_pem(
        &std::fs::read_to_string(c.dir.join("ca/ca.crt")).unwrap(),
        &std::fs::read_to_string(c.dir.join("ca/ca.key")).unwrap(),
    )
    .unwrap();
    let admin = ca
        .issue(&certs::LeafSpec::new(certs::MeshIdentity::new(
            model::ClusterName::new(cluster).unwrap(),
            model::ClusterId::new(u64::from(c.id)).unwrap(),
            certs::Role::Admin,
        )))
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let admin_dir = scratch.path().join("admin");
    test_support::write_tls(&admin_dir, &ca, &admin).unwrap();
    // The peer certificate for this cluster's Mesh API sits in the other cluster's peers dir.
    let peer_dir = lab
        .tls_dir(other, &TlsDir::Peer(cluster.to_owned()))
        .await
        .unwrap();
    assert!(
        peer_dir.join("tls.crt").is_file(),
        "connect wrote {}",
        peer_dir.display()
    );
    let node_dir = lab
        .tls_dir(cluster, &TlsDir::NodeAgent(c.nodes[0].name.clone()))
        .await
        .unwrap();
    let refused = [
        ("peer", peer_dir),
        ("node-agent", node_dir),
        ("admin", admin_dir),
        (
            "mesh-server",
            lab.tls_dir(cluster, &TlsDir::MeshServer).await.unwrap(),
        ),
    ];
    let etcdctl = |dir: &std::path::Path, args: &[&str]| {
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg(format!("--cacert={}", etcd_ca.display()))
            // An installed etcd's certificate names its pod's DNS name, which only pods
            // resolve: the client certificate is what is tested here.
            .arg("--insecure-skip-tls-verify")
            .arg(format!("--cert={}", dir.join("tls.crt").display()))
            .arg(format!("--key={}", dir.join("tls.key").display()))
            .args(["--dial-timeout=2s", "--command-timeout=3s"])
            .args(args);
        cmd.output().unwrap()
    };
    let ok = etcdctl(
        &etcd_tls,
        &["get", "/clustermesh/", "--prefix", "--keys-only"],
    );
    assert!(
        ok.status.success() && !ok.stdout.is_empty(),
        "the apiserver's etcd certificate works: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (who, dir) in refused {
        let read = etcdctl(&dir, &["get", "/clustermesh/", "--prefix", "--keys-only"]);
        assert!(
            !read.status.success() && read.stdout.is_empty(),
            "{cluster}'s etcd must refuse a {who} certificate (read): {}",
            String::from_utf8_lossy(&read.stdout)
        );
        let key = format!("/clustermesh/v1/state/south/services/demo/{who}");
        let write = etcdctl(&dir, &["put", &key, "x"]);
        assert!(
            !write.status.success(),
            "{cluster}'s etcd must refuse a {who} certificate (write)"
        );
    }
    let after = etcdctl(
        &etcd_tls,
        &[
            "get",
            "/clustermesh/v1/state/south/",
            "--prefix",
            "--keys-only",
        ],
    );
    assert!(
        after.status.success() && after.stdout.is_empty(),
        "nothing was written"
    );
}

/// Issue 12, case 8: a node's `/state` (every backend, unshared services' included) is not on
/// the open health port (403 to anyone but loopback), and over mutual TLS it is served to an
/// admin of the node's cluster only: a peer certificate gets 403, another cluster's admin and a
/// client without a certificate do not get past the handshake.
async fn node_state_is_for_admins_only(lab: &Lab) {
    let east = lab.cluster("east").unwrap();
    let node = &east.nodes[0];
    let open = SocketAddr::from((node.ip, model::node_state::NODE_AGENT_PORT));
    let r = test_support::http_get(open, "/state").await.unwrap();
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = test_support::http_get(open, "/metrics").await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "metrics stay open");
    // The admin of east is served.
    let s = lab.node_state("east", &node.name).await.unwrap();
    assert_eq!(s.cluster, "east");
    let addr = format!("{}:{}", node.ip, model::node_state::NODE_AGENT_STATE_PORT);
    let fetch = |ca: &certs::Ca, id: certs::MeshIdentity| {
        let leaf = ca.issue(&certs::LeafSpec::new(id)).unwrap();
        let ca_pem = std::fs::read_to_string(east.dir.join("ca/ca.crt")).unwrap();
        let addr = addr.clone();
        let node = model::NodeName::new(node.name.as_str()).unwrap();
        async move {
            meshapi::node_state::fetch(
                &addr,
                &model::ClusterName::new("east").unwrap(),
                model::ClusterId::new(1).unwrap(),
                &node,
                &ca_pem,
                &leaf.cert_pem,
                &leaf.key_pem,
                std::time::Duration::from_secs(5),
            )
            .await
        }
    };
    let east_ca = certs::Ca::from_pem(
        &std::fs::read_to_string(east.dir.join("ca/ca.crt")).unwrap(),
        &std::fs::read_to_string(east.dir.join("ca/ca.key")).unwrap(),
    )
    .unwrap();
    let west_ca = certs::Ca::from_pem(
        &std::fs::read_to_string(lab.cluster("west").unwrap().dir.join("ca/ca.crt")).unwrap(),
        &std::fs::read_to_string(lab.cluster("west").unwrap().dir.join("ca/ca.key")).unwrap(),
    )
    .unwrap();
    let west = model::ClusterName::new("west").unwrap();
    let west_id = model::ClusterId::new(2).unwrap();
    // west's peer certificate for east (signed by east's CA): a valid client, not an admin.
    let e = fetch(
        &east_ca,
        certs::MeshIdentity::new(west.clone(), west_id, certs::Role::Peer),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    // west's own admin: east's agent does not trust west's CA.
    let e = fetch(
        &west_ca,
        certs::MeshIdentity::new(west, west_id, certs::Role::Admin),
    )
    .await
    .unwrap_err();
    assert!(!e.to_string().contains("200"), "{e}");
}

/// Issue 13, case 7 (ADR 0012 addendum): the pods behind east's unshared `demo/private` reach
/// west as endpoints (IP → identity, for identity-based policy), never as backends. Read from
/// west's etcd with `etcdctl` and the apiserver's etcd certificate.
async fn unshared_pods_export_their_identity_not_their_backends(lab: &Lab) {
    let east = lab.cluster("east").unwrap();
    let private: Vec<String> = east
        .pods
        .iter()
        .filter(|p| p.service.as_deref() == Some("demo/private"))
        .map(|p| p.ip.to_string())
        .collect();
    assert!(!private.is_empty(), "east backs demo/private");
    let endpoint = format!("https://{}", lab.etcd_addr("west").await.unwrap());
    let tls = lab.tls_dir("west", &TlsDir::EtcdClient).await.unwrap();
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--insecure-skip-tls-verify")
            .arg(format!("--cacert={}", tls.join("ca.crt").display()))
            .arg(format!("--cert={}", tls.join("tls.crt").display()))
            .arg(format!("--key={}", tls.join("tls.key").display()))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let keys = String::from_utf8_lossy(&etcdctl(&[
        "get",
        "/clustermesh/v1/cache/east/endpoints/",
        "--prefix",
        "--keys-only",
    ]))
    .into_owned();
    for ip in &private {
        assert!(
            keys.contains(&format!("/endpoints/{ip}")),
            "{ip} exported as an endpoint: {keys}"
        );
    }
    let svc = etcdctl(&[
        "get",
        "/clustermesh/v1/cache/east/services/demo/private",
        "--print-value-only",
    ]);
    assert!(
        !svc.is_empty(),
        "the unshared service itself is known to west"
    );
    for ip in &private {
        let raw: Vec<u8> = ip.split('.').map(|o| o.parse::<u8>().unwrap()).collect();
        assert!(
            !svc.windows(4).any(|w| w == raw.as_slice()),
            "backend {ip} must not reach west"
        );
    }
}
