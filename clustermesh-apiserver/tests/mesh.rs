//! The Mesh API and the importer: several apiservers in-process, each with its own real etcd
//! and Kubernetes API test server, talking mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{Ca, LeafSpec, MeshIdentity, Reloader, Role, TlsFiles};
use clustermesh_apiserver::config::Config;
use clustermesh_apiserver::mesh::importer::Phase;
use clustermesh_apiserver::readiness::Readiness;
use clustermesh_apiserver::{Running, metrics as m};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kvstore::watch::{Event as KvEvent, Watcher};
use model::keys::{self, Kind, Scope};
use model::{ClusterId, ClusterName, GlobalService};
use serde_json::json;
use test_support::{Etcd, eventually};
use wire::{Codec, pb};

const T: Duration = Duration::from_secs(30);

fn write_tls(dir: &Path, ca: &Ca, leaf: &certs::Leaf) {
    test_support::write_tls(dir, ca, leaf).unwrap();
}

struct Cluster {
    name: ClusterName,
    id: ClusterId,
    etcd: Etcd,
    kube: kube_testserver::Handle,
    client: kube::Client,
    kv: kvstore::Client,
    ca: Ca,
    dir: tempfile::TempDir,
    mesh_port: u16,
    apiserver: Option<Running>,
}

impl Cluster {
    async fn new(name: &str, id: u64) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let name = ClusterName::new(name).unwrap();
        let id = ClusterId::new(id).unwrap();
        let etcd = Etcd::start().await.unwrap();
        let kube = kube_testserver::start(kube_testserver::Config::new(name.clone()))
            .await
            .unwrap();
        let client = kube.client().await.unwrap();
        let kv = etcd.client().await.unwrap();
        let ca = Ca::generate(&name, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = ca
            .issue(
                &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Apiserver))
                    .ips(["127.0.0.1".parse().unwrap()]),
            )
            .unwrap();
        write_tls(&dir.path().join("mesh-tls"), &ca, &server);
        std::fs::create_dir_all(dir.path().join("peers")).unwrap();
        std::fs::create_dir_all(dir.path().join("grants")).unwrap();
        Self {
            name,
            id,
            etcd,
            kube,
            client,
            kv,
            ca,
            dir,
            mesh_port: test_support::free_port().unwrap(),
            apiserver: None,
        }
    }

    fn config(&self) -> Config {
        Config {
            cluster_name: self.name.clone(),
            cluster_id: self.id,
            etcd: self.etcd.config(),
            lease_ttl: Duration::from_secs(30),
            kubeconfig: Some(self.kube.kubeconfig().to_owned()),
            kube_context: None,
            namespace: "kube-system".into(),
            replica: format!("{}-0", self.name),
            leader_lease: Duration::from_secs(10),
            identity_gc_grace: Duration::from_secs(60),
            health_bind: "127.0.0.1:0".parse().unwrap(),
            mesh_bind: format!("127.0.0.1:{}", self.mesh_port).parse().unwrap(),
            mesh_tls: Some(TlsFiles::in_dir(&self.dir.path().join("mesh-tls"))),
            peers_dir: Some(self.peers_dir()),
            peers_from_secrets: false,
            peer_quota: Default::default(),
            node_agent_state_port: model::node_state::NODE_AGENT_STATE_PORT,
            node_agent_observe_port: meshapi::observe::NODE_AGENT_OBSERVE_PORT,
            grants_dir: Some(self.dir.path().join("grants")),
        }
    }

    fn peers_dir(&self) -> PathBuf {
        self.dir.path().join("peers")
    }

    async fn up(&mut self) {
        self.up_with(self.config()).await;
    }

    async fn up_with(&mut self, config: Config) {
        let r = clustermesh_apiserver::start(config).await.unwrap();
        let mut ready = r.ready();
        tokio::time::timeout(T, ready.wait_for(Readiness::is_ready))
            .await
            .unwrap()
            .unwrap();
        self.apiserver = Some(r);
    }

    fn running(&self) -> &Running {
        self.apiserver.as_ref().unwrap()
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.mesh_port)
    }

    /// A client certificate of `identity` issued by this cluster's CA, as TLS files in `dir`.
    fn client_files(&self, dir: &Path, identity: MeshIdentity) -> TlsFiles {
        let leaf = self.ca.issue(&LeafSpec::new(identity)).unwrap();
        write_tls(dir, &self.ca, &leaf);
        TlsFiles::in_dir(dir)
    }

    /// Makes `self` import from `peer`: what `clustermesh connect` writes.
    fn import_from(&self, peer: &Cluster) {
        let staging = self.dir.path().join(format!(".staging-{}", peer.name));
        peer.client_files(
            &staging,
            MeshIdentity::new(self.name.clone(), self.id, Role::Peer),
        );
        std::fs::write(staging.join("endpoints"), format!("{}\n", peer.endpoint())).unwrap();
        // The serving side's grant for this certificate, as `clustermesh connect` writes it.
        peer.grant(&self.name, self.id, &staging.join("tls.crt"));
        // Appear at once, as a Secret mount does.
        std::fs::rename(&staging, self.peers_dir().join(peer.name.as_str())).unwrap();
    }

    /// Grants `client` (ID `id`) access with the certificate in `cert`.
    fn grant(&self, client: &ClusterName, id: ClusterId, cert: &Path) {
        let dir = self.dir.path().join("grants");
        let staging = dir.join(format!(".staging-{client}"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("cluster-id"), id.to_string()).unwrap();
        let fp = certs::fingerprint_pem(&std::fs::read(cert).unwrap()).unwrap();
        std::fs::write(staging.join("sha256"), fp).unwrap();
        let _ = std::fs::remove_dir_all(dir.join(client.as_str()));
        std::fs::rename(&staging, dir.join(client.as_str())).unwrap();
    }

    /// Removes `client`'s grant, as `clustermesh disconnect` does.
    fn revoke(&self, client: &ClusterName) {
        std::fs::remove_dir_all(self.dir.path().join("grants").join(client.as_str())).unwrap();
    }

    async fn create_service(&self, name: &str, ips: &[&str]) {
        let svcs: Api<Service> = Api::default_namespaced(self.client.clone());
        svcs.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": {"service.cilium.io/global": "true"}},
                "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
        self.set_backends(name, ips).await;
    }

    async fn set_backends(&self, name: &str, ips: &[&str]) {
        let slices: Api<EndpointSlice> = Api::default_namespaced(self.client.clone());
        let endpoints: Vec<_> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}))
            .collect();
        let slice = json!({
            "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        });
        if slices
            .get_opt(&format!("{name}-1"))
            .await
            .unwrap()
            .is_some()
        {
            slices
                .patch(
                    &format!("{name}-1"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"endpoints": slice["endpoints"]})),
                )
                .await
                .unwrap();
        } else {
            slices
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(slice).unwrap(),
                )
                .await
                .unwrap();
        }
    }

    /// A Kubernetes Node with `address` and pod CIDR `pod_cidr`: the address space the
    /// cluster advertises, where peers accept its endpoints and backends.
    async fn add_node(&self, name: &str, address: &str, pod_cidr: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"podCIDRs": [pod_cidr]},
                    "status": {"addresses": [{"type": "InternalIP", "address": address}]}
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }

    /// A Node `name` (as [`Cluster::add_node`]) and a certificate of its node agent, as TLS
    /// files in `dir`; returns once the Mesh API admits that agent.
    async fn node_agent(&self, dir: &Path, name: &str, address: &str, pod_cidr: &str) -> TlsFiles {
        self.add_node(name, address, pod_cidr).await;
        let files = self.client_files(
            dir,
            MeshIdentity::node_agent(
                self.name.clone(),
                self.id,
                model::NodeName::new(name).unwrap(),
            ),
        );
        eventually(
            "the node agent is admitted once its Node is listed",
            T,
            || async { raw_watch(self, &files).await.ok().map(drop) },
        )
        .await;
        files
    }

    /// The services this cluster holds of `peer`.
    async fn cached_services(
        &self,
        peer: &ClusterName,
    ) -> std::collections::BTreeMap<String, GlobalService> {
        let prefix = keys::kind_prefix(Scope::Cache, peer, Kind::Services);
        let (kvs, _) = self.kv.list_raw(&prefix).await.unwrap();
        kvs.into_iter()
            .map(|kv| {
                (
                    kv.key[prefix.len()..].to_owned(),
                    GlobalService::decode(&kv.value).unwrap(),
                )
            })
            .collect()
    }

    fn phase(&self, peer: &ClusterName) -> Option<Phase> {
        self.running().peers().get(peer.as_str()).map(|s| s.phase)
    }
}

async fn backends_of(c: &Cluster, peer: &ClusterName, svc: &str) -> Option<Vec<String>> {
    let s = c.cached_services(peer).await;
    s.get(&format!("default/{svc}"))
        .map(|g| g.backends.iter().map(|b| b.ip.to_string()).collect())
}

/// A Mesh API client of `target` with `files`, watching.
async fn watch(
    target: &Cluster,
    files: TlsFiles,
) -> Result<tonic::Streaming<pb::WatchResponse>, String> {
    let tls = Reloader::load(files).unwrap();
    let c = clustermesh_apiserver::mesh::client::connect(&target.name, &[target.endpoint()], &tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut api = c.client;
    api.watch(pb::WatchRequest::default())
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
}

/// What a watch client sees: (cluster, kind, name) → value.
type View = Arc<Mutex<std::collections::BTreeMap<(String, String, String), Vec<u8>>>>;

/// Collects a watch stream's view: (cluster, kind, name) → value.
fn follow(mut stream: tonic::Streaming<pb::WatchResponse>) -> View {
    let view = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let sink = Arc::clone(&view);
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            let mut v = sink.lock().unwrap();
            if msg.reset {
                v.clear();
            }
            for c in msg.changes {
                let k = (c.cluster, c.kind, c.name);
                if c.op == pb::change::Op::Delete as i32 {
                    v.remove(&k);
                } else {
                    v.insert(k, c.value);
                }
            }
        }
    });
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_propagate_to_peers_and_node_agents() {
    let mut a = Cluster::new("alpha", 11).await;
    let mut b = Cluster::new("bravo", 12).await;
    let mut c = Cluster::new("charlie", 13).await;
    a.up().await;
    b.up().await;
    c.up().await;
    // charlie → alpha → bravo: bravo must never see charlie through alpha.
    a.import_from(&c);
    b.import_from(&a);
    c.add_node("n1", "192.168.13.1", "10.3.0.0/24").await;
    c.create_service("third", &["10.3.0.1"]).await;
    eventually("alpha imports charlie's service", T, || async {
        backends_of(&a, &c.name, "third").await
    })
    .await;

    a.add_node("n1", "192.168.11.1", "10.1.0.0/24").await;
    a.create_service("web", &["10.1.0.1", "10.1.0.2"]).await;
    let got = eventually("bravo imports alpha's service", T, || async {
        backends_of(&b, &a.name, "web")
            .await
            .filter(|v| v.len() == 2)
    })
    .await;
    assert_eq!(got, ["10.1.0.1", "10.1.0.2"]);
    eventually("bravo's peer alpha is ready", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;
    // Counts in the status follow within moments.
    let status = eventually("status counts alpha's service", T, || async {
        b.running()
            .peers()
            .get("alpha")
            .filter(|s| s.objects.get("services") == Some(&1))
    })
    .await;
    assert_eq!(status.cluster_id, Some(11));
    assert!(status.peer_cert_not_after_unix.unwrap() > 0);
    // The peer's version as it reported it, and this apiserver's own, for skew checks.
    assert_eq!(
        status.version.as_deref(),
        Some(telemetry::version::REPORTED)
    );
    let response = http_get(b.running().health_addr(), "/status").await;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let doc: model::status::ClusterStatus = serde_json::from_str(body).unwrap();
    assert_eq!(doc.version.as_deref(), Some(telemetry::version::REPORTED));
    assert!(
        b.cached_services(&c.name).await.is_empty(),
        "a peer serves only its own exports"
    );
    let (third, _) =
        b.kv.list_raw(&keys::cluster_prefix(Scope::Cache, &c.name))
            .await
            .unwrap();
    assert!(third.is_empty());
    assert!(
        b.kv.get_raw(&keys::synced(Scope::Cache, &a.name, Kind::Services))
            .await
            .unwrap()
            .is_some(),
        "alpha's synced marker mirrored"
    );

    // A node agent of bravo sees bravo's own exports and what bravo imported (its Node
    // exists: a node agent is admitted only then).
    let na = b
        .node_agent(
            &b.dir.path().join("na"),
            "n1",
            "192.168.12.1",
            "10.12.0.0/24",
        )
        .await;
    let view = follow(watch(&b, na).await.unwrap());
    let key = (
        "alpha".to_owned(),
        "services".to_owned(),
        "default/web".to_owned(),
    );
    eventually("node agent sees alpha's service", T, || async {
        view.lock().unwrap().contains_key(&key).then_some(())
    })
    .await;

    // Updates and deletes follow, to bravo's etcd and to the node agent.
    a.set_backends("web", &["10.1.0.1", "10.1.0.2", "10.1.0.3"])
        .await;
    eventually("update at bravo", T, || async {
        backends_of(&b, &a.name, "web")
            .await
            .filter(|v| v.len() == 3)
    })
    .await;
    eventually("update at node agent", T, || async {
        let v = view.lock().unwrap().get(&key).cloned()?;
        (GlobalService::decode(&v).unwrap().backends.len() == 3).then_some(())
    })
    .await;
    let svcs: Api<Service> = Api::default_namespaced(a.client.clone());
    svcs.delete("web", &DeleteParams::default()).await.unwrap();
    eventually("delete at bravo", T, || async {
        backends_of(&b, &a.name, "web")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    eventually("delete at node agent", T, || async {
        (!view.lock().unwrap().contains_key(&key)).then_some(())
    })
    .await;
    assert!(
        b.running()
            .metrics()
            .observations(m::PEER_PROPAGATION_SECONDS, &["alpha"])
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_outage_keeps_stale_state_and_resyncs_without_spurious_deletes() {
    let mut a = Cluster::new("alpha", 21).await;
    let mut b = Cluster::new("bravo", 22).await;
    a.up().await;
    b.up().await;
    a.add_node("n1", "192.168.21.1", "10.2.0.0/24").await;
    for i in 0..10 {
        a.create_service(&format!("s{i}"), &[&format!("10.2.0.{}", i + 1)])
            .await;
    }
    b.import_from(&a);
    eventually("bravo has alpha's 10 services", T, || async {
        (b.cached_services(&a.name).await.len() == 10).then_some(())
    })
    .await;
    eventually("ready", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;

    // Record every change to bravo's copy of alpha.
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut w = Watcher::new(&b.kv, keys::cluster_prefix(Scope::Cache, &a.name));
    let sink = Arc::clone(&events);
    let recorder = tokio::spawn(async move {
        while let Ok(e) = w.next().await {
            sink.lock().unwrap().push(e);
        }
    });
    eventually("recorder listed", T, || async {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, KvEvent::InitDone { .. }))
            .then_some(())
    })
    .await;

    // Kill alpha's apiserver: bravo keeps everything, marked stale with a timestamp.
    a.apiserver.take().unwrap().kill();
    eventually("stale", T, || async {
        (b.phase(&a.name) == Some(Phase::Stale)).then_some(())
    })
    .await;
    let st = b.running().peers().get("alpha").unwrap();
    assert!(st.since_unix > 0 && st.last_error.is_some());
    assert_eq!(
        b.cached_services(&a.name).await.len(),
        10,
        "stale state is kept"
    );
    // While alpha is down: one service goes away, one is added.
    let svcs: Api<Service> = Api::default_namespaced(a.client.clone());
    svcs.delete("s3", &DeleteParams::default()).await.unwrap();
    a.create_service("s10", &["10.2.0.11"]).await;

    a.up().await;
    eventually("ready again", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;
    let names = eventually("resynced", T, || async {
        let s = b.cached_services(&a.name).await;
        (s.len() == 10 && s.contains_key("default/s10") && !s.contains_key("default/s3"))
            .then_some(s.into_keys().collect::<Vec<_>>())
    })
    .await;
    assert!(names.contains(&"default/s0".to_owned()));
    let deletes: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            KvEvent::Delete { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        deletes,
        vec![keys::object_key(
            Scope::Cache,
            &a.name,
            Kind::Services,
            "default/s3"
        )],
        "only the real deletion"
    );

    // Removing the peer configuration drains alpha.
    std::fs::remove_dir_all(b.peers_dir().join("alpha")).unwrap();
    eventually("drained", T, || async {
        let (kvs, _) =
            b.kv.list_raw(&keys::cluster_prefix(Scope::Cache, &a.name))
                .await
                .unwrap();
        (kvs.is_empty() && b.running().peers().get("alpha").is_none()).then_some(())
    })
    .await;
    recorder.abort();
}

/// Writes a peer configuration of `peer_name` by hand (for the rejection tests).
fn write_peer(dir: &Path, peer_name: &str, endpoint: &str, ca_pem: &str, leaf: &certs::Leaf) {
    let staging = dir.join(format!(".staging-{peer_name}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("tls.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(staging.join("tls.key"), &leaf.key_pem).unwrap();
    std::fs::write(staging.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(staging.join("endpoints"), format!("{endpoint}\n")).unwrap();
    std::fs::rename(&staging, dir.join(peer_name)).unwrap();
}

async fn last_error(c: &Cluster, peer: &str, needle: &str) -> String {
    eventually(
        &format!("status of {peer} shows an error with {needle:?}"),
        T,
        || async {
            let st = c.running().peers().get(peer)?;
            st.last_error
                .filter(|e| e.contains(needle) && st.phase == Phase::Connecting)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn untrusted_mismatched_expired_plaintext_and_unauthorized_clients_are_refused() {
    let mut a = Cluster::new("alpha", 31).await;
    let mut b = Cluster::new("bravo", 32).await;
    let mut c = Cluster::new("charlie", 33).await;
    a.up().await;
    b.up().await;
    c.up().await;
    let bravo_peer = MeshIdentity::new(b.name.clone(), b.id, Role::Peer);

    // A client certificate from a CA alpha does not trust: refused in the handshake.
    let foreign = Ca::generate(&b.name, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let leaf = foreign.issue(&LeafSpec::new(bravo_peer.clone())).unwrap();
    write_peer(
        &b.peers_dir(),
        "alpha",
        &a.endpoint(),
        a.ca.cert_pem(),
        &leaf,
    );
    let e = eventually("untrusted client refused", T, || async {
        let st = b.running().peers().get("alpha")?;
        st.last_error.filter(|_| st.phase == Phase::Connecting)
    })
    .await;
    // The server counts the refusal once its side of the handshake returns.
    eventually(
        &format!("alpha counted the refused handshake ({e})"),
        T,
        || async {
            (a.running().metrics().value(m::MESH_HANDSHAKE_FAILURES, &[]) >= 1.0).then_some(())
        },
    )
    .await;
    std::fs::remove_dir_all(b.peers_dir().join("alpha")).unwrap();

    // Configured as alpha, but the endpoint is charlie's: its certificate names charlie.
    let leaf = c.ca.issue(&LeafSpec::new(bravo_peer.clone())).unwrap();
    write_peer(
        &b.peers_dir(),
        "alpha",
        &c.endpoint(),
        c.ca.cert_pem(),
        &leaf,
    );
    let e = last_error(&b, "alpha", "charlie").await;
    assert!(e.contains("not of cluster alpha"), "{e}");
    std::fs::remove_dir_all(b.peers_dir().join("alpha")).unwrap();

    // A configured cluster ID that disagrees with the peer's certificate.
    let staging = b.dir.path().join(".staging-id");
    a.client_files(&staging, bravo_peer.clone());
    a.grant(&b.name, b.id, &staging.join("tls.crt"));
    std::fs::write(staging.join("endpoints"), a.endpoint()).unwrap();
    std::fs::write(staging.join("cluster-id"), "99").unwrap();
    std::fs::rename(&staging, b.peers_dir().join("alpha")).unwrap();
    let e = last_error(&b, "alpha", "configuration says 99").await;
    assert!(e.contains("31"), "{e}");
    std::fs::remove_dir_all(b.peers_dir().join("alpha")).unwrap();

    // An expired client certificate.
    let expired =
        a.ca.issue(&LeafSpec::new(bravo_peer.clone()).validity(
            time::OffsetDateTime::now_utc() - time::Duration::days(3),
            Duration::from_secs(86_400),
        ))
        .unwrap();
    let dir = b.dir.path().join("expired");
    write_tls(&dir, &a.ca, &expired);
    assert!(
        watch(&a, TlsFiles::in_dir(&dir)).await.is_err(),
        "expired certificate refused"
    );

    // Plaintext gRPC to the TLS port.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://{}", a.endpoint())).unwrap();
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => wire::pb::mesh_client::MeshClient::new(ch)
            .watch(pb::WatchRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "plaintext refused");

    // A node agent of another cluster, even with a certificate from alpha's CA.
    let files = a.client_files(
        &b.dir.path().join("na-bravo"),
        MeshIdentity::node_agent(b.name.clone(), b.id, model::NodeName::new("n1").unwrap()),
    );
    let e = watch(&a, files).await.unwrap_err();
    assert!(
        e.contains("PermissionDenied") && e.contains("node-agent"),
        "{e}"
    );
    // A peer certificate claiming alpha's own ID.
    let files = a.client_files(
        &b.dir.path().join("peer-dup"),
        MeshIdentity::new(b.name.clone(), a.id, Role::Peer),
    );
    let e = watch(&a, files).await.unwrap_err();
    assert!(e.contains("PermissionDenied"), "{e}");
    assert!(a.running().metrics().value(m::MESH_DENIED, &[]) >= 2.0);
    // alpha's own node agent (of a Node that exists) is served.
    let files = a
        .node_agent(
            &a.dir.path().join("na"),
            "n1",
            "192.168.31.1",
            "10.31.0.0/24",
        )
        .await;
    assert!(watch(&a, files).await.is_ok());

    // After all that, a correct configuration works.
    b.import_from(&a);
    eventually("bravo connects to alpha", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;

    // A second peer with alpha's ID is refused while alpha is connected.
    let mut d = Cluster::new("delta", 31).await;
    d.up().await;
    b.import_from(&d);
    let e = last_error(&b, "delta", "already has").await;
    assert!(e.contains("alpha") && e.contains("31"), "{e}");
    assert_eq!(
        b.phase(&a.name),
        Some(Phase::Ready),
        "the connected peer is unaffected"
    );
    // And the status shows it over HTTP.
    let body = http_get(b.running().health_addr(), "/status").await;
    assert!(
        body.contains("\"delta\"") && body.contains("already has"),
        "{body}"
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    test_support::http_get(addr, path).await.unwrap()
}

/// A peer that sends objects of other clusters, garbage and an oversized message.
#[derive(Clone)]
struct EvilPeer {
    name: ClusterName,
    id: ClusterId,
}

fn encoded_service(cluster: &str, name: &str) -> Vec<u8> {
    GlobalService {
        cluster: ClusterName::new(cluster).unwrap(),
        name: model::service::ServiceName::new("default", name).unwrap(),
        cluster_ips: vec![],
        ports: vec![],
        backends: vec![],
        shared: true,
        affinity: model::service::Affinity::None,
        balancing: Default::default(),
    }
    .encode()
}

#[tonic::async_trait]
impl wire::pb::mesh_server::Mesh for EvilPeer {
    async fn cluster_info(
        &self,
        _: tonic::Request<pb::ClusterInfoRequest>,
    ) -> Result<tonic::Response<pb::ClusterInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ClusterInfoResponse {
            name: self.name.to_string(),
            id: u32::from(self.id.get()),
            ..Default::default()
        }))
    }

    type WatchStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchResponse, tonic::Status>>;
    type PoliciesStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::PoliciesResponse, tonic::Status>>;

    async fn policies(
        &self,
        _: tonic::Request<pb::PoliciesRequest>,
    ) -> Result<tonic::Response<Self::PoliciesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "a fake peer serves no policies",
        ))
    }

    async fn watch(
        &self,
        _: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let me = self.name.to_string();
        let put = |cluster: &str, name: &str, value: Vec<u8>| pb::Change {
            op: pb::change::Op::Put as i32,
            cluster: cluster.to_owned(),
            kind: "services".into(),
            name: name.to_owned(),
            value,
            revision: 5,
            origin_unix_micros: 0,
        };
        let snapshot = pb::WatchResponse {
            reset: true,
            changes: vec![
                put(&me, "default/good", encoded_service(&me, "good")),
                put(
                    "victim",
                    "default/stolen",
                    encoded_service("victim", "stolen"),
                ),
                put(&me, "default/liar", encoded_service("victim", "liar")),
                put(&me, "default/garbled", vec![0xff, 0x00, 0x13, 0x37]),
                put(
                    &me,
                    "default/x/../../../clusters/alpha",
                    encoded_service(&me, "x"),
                ),
                pb::Change {
                    kind: "secrets".into(),
                    ..put(&me, "default/s", vec![])
                },
            ],
            synced: Kind::ALL
                .iter()
                .map(|k| pb::SyncedMarker {
                    cluster: me.clone(),
                    kind: k.to_string(),
                    revision: 5,
                    written_unix_ms: 0,
                })
                .collect(),
            revision: 5,
            snapshot_complete: true,
        };
        let huge = pb::WatchResponse {
            changes: vec![put(&me, "default/huge", vec![7u8; 5 * 1024 * 1024])],
            revision: 6,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _ = tx.send(Ok(snapshot)).await;
            let _ = tx.send(Ok(huge)).await;
            tx.closed().await;
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malicious_peer_cannot_corrupt_the_cache() {
    let mut b = Cluster::new("bravo", 42).await;
    b.up().await;
    let evil = ClusterName::new("evil").unwrap();
    let evil_id = ClusterId::new(43).unwrap();
    let ca = Ca::generate(&evil, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let server = ca
        .issue(
            &LeafSpec::new(MeshIdentity::new(evil.clone(), evil_id, Role::Apiserver))
                .ips(["127.0.0.1".parse().unwrap()]),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_tls(&dir.path().join("server"), &ca, &server);
    let tls = Reloader::load(TlsFiles::in_dir(&dir.path().join("server"))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(clustermesh_apiserver::mesh::server::serve(
        listener,
        tls,
        EvilPeer {
            name: evil.clone(),
            id: evil_id,
        },
        telemetry::metrics::Registry::new(),
        stop_rx,
    ));
    let leaf = ca
        .issue(&LeafSpec::new(MeshIdentity::new(
            b.name.clone(),
            b.id,
            Role::Peer,
        )))
        .unwrap();
    write_peer(
        &b.peers_dir(),
        "evil",
        &addr.to_string(),
        ca.cert_pem(),
        &leaf,
    );

    // The valid object lands; the oversized message breaks the stream, which reconnects.
    eventually("the valid object is imported", T, || async {
        b.cached_services(&evil)
            .await
            .contains_key("default/good")
            .then_some(())
    })
    .await;
    eventually("reconnected after the oversized message", T, || async {
        (b.running().metrics().value(m::PEER_RECONNECTS, &["evil"]) >= 2.0).then_some(())
    })
    .await;
    let held = b.cached_services(&evil).await;
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        ["default/good"],
        "nothing else reached the cache"
    );
    let (all, _) = b.kv.list_raw(keys::ROOT).await.unwrap();
    assert!(
        all.iter()
            .all(|kv| !kv.key.contains("victim") && !kv.key.contains("/huge"))
    );
    assert!(b.running().metrics().value(m::PEER_REJECTED, &["evil"]) >= 5.0);
    let st = b.running().peers().get("evil").unwrap();
    assert!(st.last_error.is_some());
    // bravo itself is unharmed.
    assert!(b.running().ready().borrow().is_ready());
    server.abort();
}

/// A Mesh API watch with a plain tonic client (not the project's client code): the TLS files
/// of a peer directory or of a client certificate.
async fn raw_watch(
    target: &Cluster,
    files: &TlsFiles,
) -> Result<tonic::Streaming<pb::WatchResponse>, tonic::Status> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&files.ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(&files.cert).unwrap(),
            std::fs::read(&files.key).unwrap(),
        ))
        .domain_name("127.0.0.1");
    let channel = Endpoint::from_shared(format!("https://{}", target.endpoint()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    wire::pb::mesh_client::MeshClient::new(channel)
        .watch(pb::WatchRequest::default())
        .await
        .map(|r| r.into_inner())
}

/// Issue 12, case 2: disconnect revokes. A peer is admitted only while the serving cluster
/// holds a grant naming its cluster ID and the fingerprint of the very certificate issued to
/// it. Removing the grant ends the peer's open streams and refuses the saved certificate; a
/// certificate minted for a cluster that was never connected, or a second certificate for a
/// connected one, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_revokes_the_peer_certificate_and_only_the_issued_one_is_admitted() {
    let mut a = Cluster::new("alpha", 41).await;
    let mut b = Cluster::new("bravo", 42).await;
    a.up().await;
    b.up().await;
    a.add_node("n1", "192.168.41.1", "10.41.0.0/24").await;
    a.create_service("web", &["10.41.0.1"]).await;
    b.import_from(&a);
    eventually("bravo imports alpha's service", T, || async {
        backends_of(&b, &a.name, "web").await
    })
    .await;
    // The certificate bravo holds, saved by an attacker who had it.
    let saved = b.dir.path().join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::copy(b.peers_dir().join("alpha").join(f), saved.join(f)).unwrap();
    }
    let saved = TlsFiles::in_dir(&saved);
    let mut open = raw_watch(&a, &saved).await.expect("granted: served");
    let first = open.message().await.unwrap().unwrap();
    assert!(first.reset, "a snapshot first");

    // A peer certificate from alpha's own CA for a cluster that was never connected.
    let south = MeshIdentity::new(
        ClusterName::new("south").unwrap(),
        ClusterId::new(9).unwrap(),
        Role::Peer,
    );
    let files = a.client_files(&b.dir.path().join("south"), south);
    let e = raw_watch(&a, &files).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("not a connected peer"), "{e}");

    // A second certificate for bravo's identity, not the one `connect` issued and granted.
    let files = a.client_files(
        &b.dir.path().join("second"),
        MeshIdentity::new(b.name.clone(), b.id, Role::Peer),
    );
    let e = raw_watch(&a, &files).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("not the one issued"), "{e}");

    // Disconnect: alpha's grant for bravo goes. The open stream ends, the saved certificate
    // is refused from then on.
    let denied_before = a.running().metrics().value(m::MESH_DENIED, &[]);
    a.revoke(&b.name);
    let ended = tokio::time::timeout(T, async {
        loop {
            match open.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the open stream ends after the revocation");
    let status = ended.expect("ended with an error, not a clean close");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    let e = raw_watch(&a, &saved).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(a.running().metrics().value(m::MESH_DENIED, &[]) > denied_before);
    // bravo keeps what it had, marked stale: losing access is not a withdrawal of alpha's
    // services (only alpha deleting them, or bravo's own disconnect, removes them).
    eventually("bravo sees the peer as not ready", T, || async {
        (b.phase(&a.name) != Some(Phase::Ready)).then_some(())
    })
    .await;
    assert!(backends_of(&b, &a.name, "web").await.is_some());

    // Connect again (a new certificate and grant): admitted again; the saved one stays out.
    std::fs::remove_dir_all(b.peers_dir().join("alpha")).unwrap();
    b.import_from(&a);
    eventually("bravo reconnects to alpha", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;
    let e = raw_watch(&a, &saved).await.unwrap_err();
    assert!(e.message().contains("not the one issued"), "{e}");
}

/// Reads `stream` until it ends or `deadline` passes: `Some(status)` when it ended with an
/// error, `None` when it closed cleanly; panics at the deadline.
async fn ended(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    deadline: Duration,
) -> Option<tonic::Status> {
    tokio::time::timeout(deadline, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream ends within the deadline")
}

/// Reads `stream` until a put of service `name` arrives; panics if it ends first.
async fn sees_service(stream: &mut tonic::Streaming<pb::WatchResponse>, name: &str) {
    tokio::time::timeout(T, async {
        loop {
            let msg = stream
                .message()
                .await
                .expect("the stream is still served")
                .expect("the stream is still open");
            if msg
                .changes
                .iter()
                .any(|c| c.kind == Kind::Services.as_str() && c.name.ends_with(name))
            {
                return;
            }
        }
    })
    .await
    .expect("the service reaches the stream");
}

/// Issue 12, case 2 (node agents): a node agent's certificate names its node, and the Mesh API
/// admits it only while a Kubernetes Node of that name exists. A certificate for a name that
/// is not a Node is refused (PERMISSION_DENIED naming it); deleting the Node ends that agent's
/// open stream with PERMISSION_DENIED at once, while other nodes' agents are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_agent_is_admitted_only_while_its_node_exists() {
    let mut a = Cluster::new("alpha", 71).await;
    a.up().await;

    // (a) A certificate from alpha's own CA for a node that is not a Node.
    let ghost = a.client_files(
        &a.dir.path().join("na-ghost"),
        MeshIdentity::node_agent(a.name.clone(), a.id, model::NodeName::new("ghost").unwrap()),
    );
    let e = raw_watch(&a, &ghost).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("ghost"), "{e}");

    // (b) Agents of existing Nodes are admitted (`node_agent` waits for that).
    let n1 = a
        .node_agent(
            &a.dir.path().join("na-n1"),
            "n1",
            "192.168.71.1",
            "10.71.1.0/24",
        )
        .await;
    let n2 = a
        .node_agent(
            &a.dir.path().join("na-n2"),
            "n2",
            "192.168.71.2",
            "10.71.2.0/24",
        )
        .await;
    let mut open1 = raw_watch(&a, &n1).await.expect("n1 exists: admitted");
    let mut open2 = raw_watch(&a, &n2).await.expect("n2 exists: admitted");
    for open in [&mut open1, &mut open2] {
        let first = open.message().await.unwrap().unwrap();
        assert!(first.reset, "a snapshot first");
    }
    // Still refused: the ghost is no Node.
    let e = raw_watch(&a, &ghost).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // (c) Node n1 is deleted: its agent's open stream ends with PERMISSION_DENIED.
    let denied_before = a.running().metrics().value(m::MESH_DENIED, &[]);
    let nodes: Api<Node> = Api::all(a.client.clone());
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    let status = ended(&mut open1, Duration::from_secs(10))
        .await
        .expect("ended with an error, not a clean close");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(status.message().contains("n1"), "{status}");
    let e = raw_watch(&a, &n1).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("n1"), "{e}");
    assert!(a.running().metrics().value(m::MESH_DENIED, &[]) > denied_before);
    // n2's agent keeps its stream and gets new exports.
    a.create_service("after", &["10.71.2.5"]).await;
    sees_service(&mut open2, "after").await;
}

/// Issue 12, cases 2 and 3 (node agents): a Node list that fails is not a deletion. While the
/// Kubernetes API fails every request and forgets its change log (so the Nodes must be listed
/// again), admitted node agents keep their streams and are still admitted; the failure is
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_node_list_does_not_end_node_agent_streams() {
    let mut a = Cluster::new("alpha", 72).await;
    a.up().await;
    let n1 = a
        .node_agent(
            &a.dir.path().join("na-n1"),
            "n1",
            "192.168.72.1",
            "10.72.1.0/24",
        )
        .await;
    let mut open = raw_watch(&a, &n1).await.expect("admitted");
    assert!(open.message().await.unwrap().unwrap().reset);

    // Every watch breaks; the re-watch finds the log compacted (a re-list is needed), and
    // requests fail meanwhile. Repeated until the Node follower has met the fault.
    let errors = || a.running().metrics().value(m::ERRORS, &["nodes"]);
    let before = errors();
    eventually("the Node follower meets the failing list", T, || async {
        if errors() > before {
            return Some(());
        }
        if a.kube.pending_failures() == 0 {
            a.kube.compact();
            a.kube.fail_next(40, 500);
            a.kube.close_watches();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        None
    })
    .await;
    // While failures are still served, the agent is admitted and its stream stays open.
    if a.kube.pending_failures() > 0 {
        raw_watch(&a, &n1)
            .await
            .expect("admitted during the fault: the last good Node list holds");
    }
    eventually("the injected failures are all served", T, || async {
        (a.kube.pending_failures() == 0).then_some(())
    })
    .await;
    a.create_service("after", &["10.72.1.5"]).await;
    sees_service(&mut open, "after").await;
    raw_watch(&a, &n1)
        .await
        .expect("still admitted after the fault");
}

/// Issue 12, cases 3 and 4: unauthenticated connections are capped per source before the
/// handshake (other sources are still served), a peer identity holds a bounded number of
/// watches, and an oversized filter is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_watch_and_filter_limits_hold_while_others_are_served() {
    use clustermesh_apiserver::mesh::server::{
        MAX_CONNECTIONS_PER_SOURCE, MAX_FILTER_ENTRIES, MAX_WATCHES_PER_PEER,
    };
    let mut a = Cluster::new("alpha", 51).await;
    let mut b = Cluster::new("bravo", 52).await;
    a.up().await;
    b.up().await;
    b.import_from(&a);
    eventually("bravo connects to alpha", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;

    // Many TCP connections from 127.0.0.2 that never start a handshake.
    let target: std::net::SocketAddr = a.endpoint().parse().unwrap();
    let n = MAX_CONNECTIONS_PER_SOURCE + 100;
    let mut socks = Vec::new();
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socks.push(s.connect(target).await.unwrap());
    }
    let closed = eventually(
        "the server closes what is over the per-source cap",
        T,
        || {
            let socks = &socks;
            async move {
                let mut closed = 0;
                for s in socks {
                    let mut buf = [0u8; 1];
                    if matches!(s.try_read(&mut buf), Ok(0)) {
                        closed += 1;
                    }
                }
                (closed >= n - MAX_CONNECTIONS_PER_SOURCE).then_some(closed)
            }
        },
    )
    .await;
    assert!(
        closed <= n - MAX_CONNECTIONS_PER_SOURCE + 5,
        "the first ones stay: {closed}"
    );

    // Another source is served meanwhile, and the peer stays in sync.
    let files = TlsFiles::in_dir(&b.peers_dir().join("alpha"));
    let mut extra = Vec::new();
    // bravo's importer holds one watch already.
    for _ in 1..MAX_WATCHES_PER_PEER {
        extra.push(
            raw_watch(&a, &files)
                .await
                .expect("within the per-peer limit"),
        );
    }
    let e = raw_watch(&a, &files).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert_eq!(b.phase(&a.name), Some(Phase::Ready));
    // Closing watches frees their slots at once.
    drop(extra);
    eventually("a freed slot is usable again", T, || async {
        raw_watch(&a, &files).await.ok().map(|_| ())
    })
    .await;

    // An oversized filter is refused, not held.
    let node = a
        .node_agent(
            &a.dir.path().join("na-filter"),
            "n1",
            "192.168.51.1",
            "10.51.0.0/24",
        )
        .await;
    let tls = Reloader::load(node).unwrap();
    let c = clustermesh_apiserver::mesh::client::connect(&a.name, &[a.endpoint()], &tls)
        .await
        .unwrap();
    let mut api = c.client;
    let req = pb::WatchRequest {
        clusters: (0..=MAX_FILTER_ENTRIES).map(|i| format!("c{i}")).collect(),
        ..Default::default()
    };
    let e = api.watch(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let req = pb::WatchRequest {
        clusters: vec!["x".repeat(3_000_000)],
        ..Default::default()
    };
    let e = api.watch(req).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e}"
    );
    drop(socks);
}

/// A peer that claims addresses: it serves `snapshot` (in the real server's key order,
/// endpoints before nodes, over several messages), then whatever is sent on `live`.
#[derive(Clone)]
struct ClaimingPeer {
    name: ClusterName,
    id: ClusterId,
    snapshot: Vec<pb::WatchResponse>,
    live: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<pb::WatchResponse>>>>,
}

#[tonic::async_trait]
impl wire::pb::mesh_server::Mesh for ClaimingPeer {
    async fn cluster_info(
        &self,
        _: tonic::Request<pb::ClusterInfoRequest>,
    ) -> Result<tonic::Response<pb::ClusterInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ClusterInfoResponse {
            name: self.name.to_string(),
            id: u32::from(self.id.get()),
            ..Default::default()
        }))
    }

    type WatchStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::WatchResponse, tonic::Status>>;
    type PoliciesStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::PoliciesResponse, tonic::Status>>;

    async fn policies(
        &self,
        _: tonic::Request<pb::PoliciesRequest>,
    ) -> Result<tonic::Response<Self::PoliciesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "a fake peer serves no policies",
        ))
    }

    async fn watch(
        &self,
        _: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let snapshot = self.snapshot.clone();
        let live = self.live.lock().unwrap().take();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for m in snapshot {
                let _ = tx.send(Ok(m)).await;
            }
            if let Some(mut live) = live {
                while let Some(m) = live.recv().await {
                    let _ = tx.send(Ok(m)).await;
                }
            }
            tx.closed().await;
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

fn put_change(cluster: &ClusterName, kind: Kind, name: &str, value: Vec<u8>) -> pb::Change {
    pb::Change {
        op: pb::change::Op::Put as i32,
        cluster: cluster.to_string(),
        kind: kind.to_string(),
        name: name.to_owned(),
        value,
        revision: 5,
        origin_unix_micros: 0,
    }
}

/// Issue 12, item 6: a peer cannot claim addresses that are not its own, nor reserved
/// identities. Its endpoints and backends land only inside its advertised space (its nodes'
/// addresses and pod CIDRs) and never inside ours; one that does not fit yet is admitted once
/// the node that covers it arrives, and one that our own space grows over is withdrawn. Every
/// refusal is counted once, and a legitimate object of the same snapshot lands even though the
/// snapshot brings endpoints before nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_cannot_claim_addresses_outside_its_own_space_nor_reserved_identities() {
    use model::{Endpoint, Identity, Label, Labels, NumericIdentity};
    let mut b = Cluster::new("bravo", 62).await;
    b.up().await;
    // Our own space: node 192.168.62.1, pods 10.62.1.0/24.
    b.add_node("n1", "192.168.62.1", "10.62.1.0/24").await;
    eventually("bravo exports its node", T, || async {
        b.kv.get_raw(&keys::object_key(Scope::State, &b.name, Kind::Nodes, "n1"))
            .await
            .unwrap()
    })
    .await;

    let evil = ClusterName::new("mallory").unwrap();
    let evil_id = ClusterId::new(63).unwrap();
    let mine = NumericIdentity::scoped(evil_id, 1).unwrap();
    let endpoint = |ip: &str, identity: NumericIdentity| {
        let e = Endpoint {
            cluster: evil.clone(),
            ip: ip.parse().unwrap(),
            identity,
            node: model::NodeName::new("m1").unwrap(),
            pod: None,
        };
        put_change(&evil, Kind::Endpoints, ip, e.encode())
    };
    let identity = |id: NumericIdentity| {
        let i = Identity {
            cluster: evil.clone(),
            id,
            labels: Labels::new().with(Label::new("k8s", "app", "x").unwrap()),
        };
        put_change(&evil, Kind::Identities, &id.to_string(), i.encode())
    };
    let node = |name: &str, address: &str, pod_cidr: &str| {
        let n = model::Node {
            cluster: evil.clone(),
            name: model::NodeName::new(name).unwrap(),
            addresses: vec![address.parse().unwrap()],
            pod_cidrs: vec![pod_cidr.parse().unwrap()],
        };
        put_change(&evil, Kind::Nodes, name, n.encode())
    };
    let service = |name: &str, backends: &[&str]| {
        let mut s = GlobalService::decode(&encoded_service(evil.as_str(), name)).unwrap();
        s.backends = backends
            .iter()
            .map(|ip| model::service::Backend {
                ip: ip.parse().unwrap(),
                ports: vec![],
                conditions: model::service::BackendConditions {
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                node: None,
                zone: None,
            })
            .collect();
        s.normalize();
        put_change(
            &evil,
            Kind::Services,
            &format!("default/{name}"),
            s.encode(),
        )
    };
    let snapshot = vec![
        pb::WatchResponse {
            reset: true,
            changes: vec![
                // One of our pods, our node, outside its space, not covered by its nodes (yet),
                // a reserved identity: refused.
                endpoint("10.62.1.7", mine),
                endpoint("192.168.62.1", mine),
                endpoint("10.99.0.1", mine),
                endpoint("10.63.2.9", mine),
                endpoint("10.63.1.6", NumericIdentity::HOST),
                identity(NumericIdentity::WORLD),
                // Its own pod and its own node's address, before its node arrives: they land.
                endpoint("10.63.1.5", mine),
                endpoint("192.168.63.1", mine),
                identity(mine),
            ],
            revision: 5,
            ..Default::default()
        },
        pb::WatchResponse {
            changes: vec![
                node("m1", "192.168.63.1", "10.63.1.0/24"),
                service("far", &["10.99.0.1"]),
                service("steal", &["192.168.62.1"]),
                service("web", &["10.63.1.5", "10.62.1.7"]),
            ],
            synced: Kind::ALL
                .iter()
                .map(|k| pb::SyncedMarker {
                    cluster: evil.to_string(),
                    kind: k.to_string(),
                    revision: 5,
                    written_unix_ms: 0,
                })
                .collect(),
            revision: 5,
            snapshot_complete: true,
            ..Default::default()
        },
    ];
    let (live_tx, live_rx) = tokio::sync::mpsc::channel(4);
    let ca = Ca::generate(&evil, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let server = ca
        .issue(
            &LeafSpec::new(MeshIdentity::new(evil.clone(), evil_id, Role::Apiserver))
                .ips(["127.0.0.1".parse().unwrap()]),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_tls(&dir.path().join("server"), &ca, &server);
    let tls = Reloader::load(TlsFiles::in_dir(&dir.path().join("server"))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(clustermesh_apiserver::mesh::server::serve(
        listener,
        tls,
        ClaimingPeer {
            name: evil.clone(),
            id: evil_id,
            snapshot,
            live: Arc::new(Mutex::new(Some(live_rx))),
        },
        telemetry::metrics::Registry::new(),
        stop_rx,
    ));
    let leaf = ca
        .issue(&LeafSpec::new(MeshIdentity::new(
            b.name.clone(),
            b.id,
            Role::Peer,
        )))
        .unwrap();
    write_peer(
        &b.peers_dir(),
        evil.as_str(),
        &addr.to_string(),
        ca.cert_pem(),
        &leaf,
    );

    let held = |kind: Kind| {
        let prefix = keys::kind_prefix(Scope::Cache, &evil, kind);
        let kv = b.kv.clone();
        async move {
            let (kvs, _) = kv.list_raw(&prefix).await.unwrap();
            kvs.into_iter()
                .map(|kv| kv.key[prefix.len()..].to_owned())
                .collect::<Vec<_>>()
        }
    };
    let rejected = || b.running().metrics().value(m::PEER_REJECTED, &["mallory"]);
    eventually("the peer is in sync", T, || async {
        (b.phase(&evil) == Some(Phase::Ready)).then_some(())
    })
    .await;
    assert_eq!(
        held(Kind::Endpoints).await,
        ["10.63.1.5", "192.168.63.1"],
        "only endpoints inside the peer's space and outside ours"
    );
    assert_eq!(held(Kind::Identities).await, [mine.to_string()]);
    assert_eq!(held(Kind::Nodes).await, ["m1"]);
    assert_eq!(
        backends_of(&b, &evil, "web").await.unwrap(),
        ["10.63.1.5"],
        "the foreign backend is dropped, the service and its own backend kept"
    );
    assert_eq!(
        backends_of(&b, &evil, "steal").await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        backends_of(&b, &evil, "far").await.unwrap(),
        Vec::<String>::new()
    );
    // Four endpoints and three backends for their addresses, two reserved identities.
    eventually("every refusal counted", T, || async {
        (rejected() == 9.0).then_some(())
    })
    .await;
    let st = b.running().peers().get("mallory").unwrap();
    let e = st.last_error.unwrap();
    assert!(e.contains("mallory") && e.contains("refused"), "{e}");

    // The node that covers 10.63.2.9 arrives: the endpoint held back lands, nothing recounted.
    live_tx
        .send(pb::WatchResponse {
            changes: vec![node("m2", "192.168.63.2", "10.63.2.0/24")],
            revision: 6,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("the covered endpoint lands", T, || async {
        (held(Kind::Endpoints).await == ["10.63.1.5", "10.63.2.9", "192.168.63.1"]).then_some(())
    })
    .await;
    assert_eq!(rejected(), 9.0, "a refusal is counted once");

    // Its node m2 goes before its pods do: what was admitted stays, nothing is refused.
    live_tx
        .send(pb::WatchResponse {
            changes: vec![pb::Change {
                op: pb::change::Op::Delete as i32,
                value: vec![],
                ..node("m2", "192.168.63.2", "10.63.2.0/24")
            }],
            revision: 7,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("the peer's node is gone", T, || async {
        (held(Kind::Nodes).await == ["m1"]).then_some(())
    })
    .await;
    assert_eq!(
        held(Kind::Endpoints).await,
        ["10.63.1.5", "10.63.2.9", "192.168.63.1"]
    );
    assert_eq!(rejected(), 9.0);

    // Our own space grows over 10.63.1.0/28: the peer's endpoint and backend there go.
    b.add_node("n2", "192.168.62.2", "10.63.1.0/28").await;
    eventually("what is now ours is withdrawn", T, || async {
        (held(Kind::Endpoints).await == ["10.63.2.9", "192.168.63.1"]
            && backends_of(&b, &evil, "web").await == Some(vec![]))
        .then_some(())
    })
    .await;
    eventually("counted", T, || async {
        (rejected() == 11.0).then_some(())
    })
    .await;
    let e = b
        .running()
        .peers()
        .get("mallory")
        .unwrap()
        .last_error
        .unwrap();
    assert!(e.contains("inside this cluster's own address space"), "{e}");
    assert_eq!(
        b.running()
            .metrics()
            .value(m::PEER_RECONNECTS, &["mallory"]),
        0.0,
        "one stream throughout"
    );
    assert!(b.running().ready().borrow().is_ready());
    server.abort();
}

/// Issue 12, case 7: a per-peer quota. Past it, the peer's new objects are refused (counted,
/// named in its status), what is held stays, and the stream is not broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_over_its_quota_gets_new_objects_refused_and_keeps_the_rest() {
    let mut a = Cluster::new("alpha", 61).await;
    let mut b = Cluster::new("bravo", 62).await;
    a.up().await;
    let mut config = b.config();
    config.peer_quota = clustermesh_apiserver::mesh::importer::Quota {
        max_objects: 2,
        max_bytes: 1 << 20,
    };
    b.up_with(config).await;
    for name in ["one", "two", "three", "four"] {
        a.create_service(name, &[]).await;
    }
    eventually("alpha exports four services", T, || async {
        let (kvs, _) =
            a.kv.list_raw(&keys::kind_prefix(Scope::State, &a.name, Kind::Services))
                .await
                .ok()?;
        (kvs.len() == 4).then_some(())
    })
    .await;
    b.import_from(&a);
    let e = eventually("bravo's status names the quota", T, || async {
        b.running()
            .peers()
            .get("alpha")?
            .last_error
            .filter(|e| e.contains("over its quota"))
    })
    .await;
    assert!(e.contains("limits 2 objects"), "{e}");
    eventually("the stream stays in sync", T, || async {
        (b.phase(&a.name) == Some(Phase::Ready)).then_some(())
    })
    .await;
    let held = b.cached_services(&a.name).await;
    assert_eq!(
        held.len(),
        2,
        "two held, the rest refused: {:?}",
        held.keys()
    );
    assert!(b.running().metrics().value(m::PEER_REJECTED, &["alpha"]) >= 2.0);
    // The stream is not broken by it: a delete still propagates.
    let gone = held
        .keys()
        .next()
        .unwrap()
        .trim_start_matches("default/")
        .to_owned();
    let svcs: Api<Service> = Api::default_namespaced(a.client.clone());
    svcs.delete(&gone, &DeleteParams::default()).await.unwrap();
    eventually("the delete reaches bravo", T, || async {
        (!b.cached_services(&a.name)
            .await
            .contains_key(&format!("default/{gone}")))
        .then_some(())
    })
    .await;
}
