//! The node agent end to end: a real apiserver (etcd, Kubernetes API test server, Mesh API
//! over mutual TLS) feeds it; it programs the kernel; clients in the node's cgroup connect.
//! Remote backends are written into the apiserver's etcd under `cache/west/`, as its importer
//! would (the importer itself is tested in clustermesh-apiserver).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use certs::{Ca, LeafSpec, MeshIdentity, Role, TlsFiles};
use clustermesh_apiserver::config::Config;
use common::{BackendProcess, Node, counts, free_port};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use model::keys::{self, Scope};
use model::service::{
    Affinity, Backend, BackendConditions, BackendPort, GlobalService, Protocol, ServiceName,
    ServicePort,
};
use model::{ClusterId, ClusterName, NodeName};
use node_agent::agent::{self, Agent, HealthConfig, Settings};
use serde_json::{Value, json};
use telemetry::metrics::Registry;
use test_support::{Etcd, eventually};
use wire::Codec;

const T: Duration = Duration::from_secs(30);

fn write_tls(dir: &std::path::Path, ca: &Ca, leaf: &certs::Leaf) -> TlsFiles {
    test_support::write_tls(dir, ca, leaf).unwrap()
}

fn all_start_with(v: &Value, prefix: &str) -> bool {
    let c = counts(v);
    !c.is_empty() && c.keys().all(|k| k.starts_with(prefix))
}

/// Cluster east: etcd, the Kubernetes API test server, an apiserver serving the Mesh API, and a
/// node agent certificate.
struct East {
    etcd: Etcd,
    _kube: kube_testserver::Handle,
    client: kube::Client,
    apiserver: clustermesh_apiserver::Running,
    agent_tls: TlsFiles,
    _dir: tempfile::TempDir,
}

impl East {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let east = ClusterName::new("east").unwrap();
        let east_id = ClusterId::new(1).unwrap();
        let etcd = Etcd::start().await.unwrap();
        let kube = kube_testserver::start(kube_testserver::Config::new(east.clone()))
            .await
            .unwrap();
        let client = kube.client().await.unwrap();
        // The agent's Node: the Mesh API admits a node agent only while its Node exists.
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
            )
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(&east, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
        let server = ca
            .issue(
                &LeafSpec::new(MeshIdentity::new(east.clone(), east_id, Role::Apiserver))
                    .ips(["127.0.0.1".parse().unwrap()]),
            )
            .unwrap();
        let mesh_tls = write_tls(&dir.path().join("mesh"), &ca, &server);
        let agent_leaf = ca
            .issue(&LeafSpec::new(MeshIdentity::node_agent(
                east.clone(),
                east_id,
                NodeName::new("n1").unwrap(),
            )))
            .unwrap();
        let agent_tls = write_tls(&dir.path().join("agent"), &ca, &agent_leaf);
        let apiserver = clustermesh_apiserver::start(Config {
            cluster_name: east.clone(),
            cluster_id: east_id,
            etcd: etcd.config(),
            lease_ttl: Duration::from_secs(30),
            kubeconfig: Some(kube.kubeconfig().to_owned()),
            kube_context: None,
            namespace: "kube-system".into(),
            replica: "east-0".into(),
            leader_lease: Duration::from_secs(10),
            identity_gc_grace: Duration::from_secs(60),
            health_bind: "127.0.0.1:0".parse().unwrap(),
            mesh_bind: "127.0.0.1:0".parse().unwrap(),
            mesh_tls: Some(mesh_tls),
            peers_dir: None,
            peers_from_secrets: false,
            peer_quota: Default::default(),
            node_agent_state_port: model::node_state::NODE_AGENT_STATE_PORT,
            node_agent_observe_port: meshapi::observe::NODE_AGENT_OBSERVE_PORT,
            grants_dir: None,
        })
        .await
        .unwrap();
        Self {
            etcd,
            _kube: kube,
            client,
            apiserver,
            agent_tls,
            _dir: dir,
        }
    }

    /// The node agent's settings for `node`.
    fn settings(&self, node: &Node) -> Settings {
        Settings {
            cluster: ClusterName::new("east").unwrap(),
            apiserver: vec![self.apiserver.mesh_addr().unwrap().to_string()],
            tls: self.agent_tls.clone(),
            pin_dir: node.dir.clone(),
            cgroup: node.cgroup.clone(),
            sizes: Default::default(),
            tcp_peer_rewrite: true,
            node: NodeName::new("n1").unwrap(),
            policy_any_cluster: false,
            flows: Some(1024),
            health: HealthConfig {
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(100),
                fall: 2,
                rise: 2,
                sweep_rate: 50,
                retry_rate: 200,
                max_in_flight: 64,
                quarantine: Duration::from_secs(10),
                syn_timeout: None,
            },
        }
    }

    /// Creates global service `name` (one port `http` 80 → `port`) with ready backends `ips`;
    /// returns its frontend.
    async fn global_service(
        &self,
        name: &str,
        affinity: &str,
        port: u16,
        ips: &[&str],
    ) -> SocketAddr {
        let svcs: Api<Service> = Api::default_namespaced(self.client.clone());
        let svc = svcs
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": name, "annotations": {"service.cilium.io/global": "true", "service.cilium.io/affinity": affinity}},
                    "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        let endpoints: Vec<Value> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "n1"}))
            .collect();
        let slices: Api<EndpointSlice> = Api::default_namespaced(self.client.clone());
        slices
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                    "endpoints": endpoints
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        SocketAddr::new(svc.spec.unwrap().cluster_ip.unwrap().parse().unwrap(), 80)
    }

    /// Writes west's share of `default/<name>` into east's cache, as east's importer would.
    async fn west_shares(&self, name: &str, port: u16, ips: &[std::net::IpAddr]) {
        let west = GlobalService {
            cluster: ClusterName::new("west").unwrap(),
            name: ServiceName::new("default", name).unwrap(),
            cluster_ips: vec!["10.200.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            backends: ips
                .iter()
                .map(|ip| Backend {
                    ip: *ip,
                    ports: vec![BackendPort {
                        name: "http".into(),
                        port,
                        protocol: Protocol::Tcp,
                    }],
                    conditions: BackendConditions {
                        ready: true,
                        serving: true,
                        terminating: false,
                    },
                    node: None,
                    zone: None,
                })
                .collect(),
            shared: true,
            affinity: Affinity::None,
            balancing: Default::default(),
        };
        let kv = self.etcd.client().await.unwrap();
        kv.put_raw(&keys::object(Scope::Cache, &west), west.encode())
            .await
            .unwrap();
    }
}

fn start_agent(settings: &Settings) -> (Agent, Registry, Ready) {
    let metrics = agent::registry();
    let (tx, rx) = tokio::sync::watch::channel(Err("starting".to_owned()));
    let a = Agent::start(settings.clone(), metrics.clone(), tx).unwrap();
    (a, metrics, rx)
}

type Ready = tokio::sync::watch::Receiver<Result<(), String>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_the_mesh_fails_over_recovers_and_restarts_without_disruption() {
    let east = East::start().await;
    // Backends: two local, two "remote", all on one port.
    let port = free_port();
    let addr = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
    let mut locals = vec![
        BackendProcess::start("local-1", addr("127.0.1.1")),
        BackendProcess::start("local-2", addr("127.0.1.2")),
    ];
    let _remotes = [
        BackendProcess::start("remote-1", addr("127.0.2.1")),
        BackendProcess::start("remote-2", addr("127.0.2.2")),
    ];

    // The global service in east, and west's share of it in east's cache.
    let vip = east
        .global_service("web", "local", port, &["127.0.1.1", "127.0.1.2"])
        .await;
    let remote_ips = ["127.0.2.1".parse().unwrap(), "127.0.2.2".parse().unwrap()];
    east.west_shares("web", port, &remote_ips).await;

    // The node agent.
    let node = Node::new();
    let settings = east.settings(&node);
    let (agent1, metrics1, mut ready) = start_agent(&settings);
    tokio::time::timeout(T, ready.wait_for(Result::is_ok))
        .await
        .unwrap()
        .unwrap();
    let n = 200;
    let first = eventually("local backends serve the service", T, || async {
        let v = node.client(true, "tcp", vip, n);
        (v["failures"] == 0 && all_start_with(&v, "local")).then_some(v)
    })
    .await;
    println!("affinity local: {first}");

    // Kill every local backend: once health checks notice, new connections go to west with
    // zero failures.
    let killed = Instant::now();
    locals.clear();
    eventually("both local backends marked unhealthy", T, || async {
        (metrics1.value(agent::m::FAILOVERS, &[]) >= 2.0).then_some(())
    })
    .await;
    let detected = killed.elapsed();
    let failover = node.client(true, "tcp", vip, n);
    println!("after failover (detected in {detected:?}): {failover}");
    assert_eq!(failover["failures"], 0, "{failover}");
    assert!(all_start_with(&failover, "remote"), "{failover}");

    // Local backends come back: new connections return to them.
    locals = vec![
        BackendProcess::start("local-1", addr("127.0.1.1")),
        BackendProcess::start("local-2", addr("127.0.1.2")),
    ];
    eventually("local backends healthy again", T, || async {
        (metrics1.value(agent::m::RECOVERIES, &[]) >= 2.0).then_some(())
    })
    .await;
    let back = node.client(true, "tcp", vip, n);
    assert_eq!(back["failures"], 0);
    assert!(all_start_with(&back, "local"), "{back}");

    // Restart the agent in the middle of a connection loop: no failed connection, and the new
    // agent finds the maps as they should be (it writes nothing).
    let mut looping = node.spawn_client(vip, 300, 0.005);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(agent1);
    let (agent2, metrics2, mut ready2) = start_agent(&settings);
    tokio::time::timeout(T, ready2.wait_for(Result::is_ok))
        .await
        .unwrap()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        let status = looping.wait().unwrap();
        let mut s = String::new();
        use std::io::Read;
        looping
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        (status, s)
    })
    .await
    .unwrap();
    assert!(out.0.success());
    let v: Value = serde_json::from_str(&out.1).unwrap();
    println!("connection loop across the restart: {v}");
    assert_eq!(v["failures"], 0, "{v}");
    assert_eq!(
        metrics2.value(agent::m::MAP_OPS, &["write"]),
        0.0,
        "the restarted agent rewrote nothing"
    );
    assert_eq!(metrics2.value(agent::m::MAP_OPS, &["delete"]), 0.0);

    // Negative control: a process outside the node's cgroup is not load-balanced.
    let outside = node.client(false, "tcp", vip, 2);
    assert_eq!(outside["failures"], 2);
    drop(agent2);
    drop(locals);
    east.apiserver.stop().await.unwrap();
}

/// Issue 12 item 5: a peer shares a service with 300 ready backends (a tier holds 256). The
/// agent refuses that service alone and says so in its metrics and `/state`; while it is the
/// only service, the agent is not ready; a new local service is programmed, serves, and makes
/// it ready. Once the peer's share shrinks, the service is programmed and the refusal goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_service_with_too_many_backends_is_refused_alone() {
    let east = East::start().await;
    let port = free_port();
    let addr = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
    let _backends = [
        BackendProcess::start("web-local", addr("127.0.5.1")),
        BackendProcess::start("api-1", addr("127.0.5.2")),
        BackendProcess::start("web-remote", addr("127.0.6.1")),
    ];
    let vip_web = east
        .global_service("web", "local", port, &["127.0.5.1"])
        .await;
    let many: Vec<std::net::IpAddr> = (0..300u16)
        .map(|i| std::net::IpAddr::from([127, 0, 7 + (i / 250) as u8, (i % 250) as u8 + 1]))
        .collect();
    east.west_shares("web", port, &many).await;

    let node = Node::new();
    let (agent, metrics, ready) = start_agent(&east.settings(&node));
    let refused = || metrics.value(agent::m::SERVICES_REFUSED, &["tier_full"]);
    eventually("web refused", T, || async {
        (refused() == 1.0).then_some(())
    })
    .await;
    eventually("not ready while nothing could be programmed", T, || async {
        let r = ready.borrow().clone();
        r.err().filter(|e| e.contains("could be programmed"))
    })
    .await;
    let state = (agent.state_fn())().unwrap();
    assert_eq!(state.refused.len(), 1, "{state:?}");
    let r = &state.refused[0];
    assert_eq!(r.frontend, format!("{vip_web}/tcp"));
    assert_eq!(r.service.as_deref(), Some("default/web"));
    assert_eq!(r.reason, "tier_full");
    assert!(
        r.message.contains("300") && r.message.contains("MAX_TIER_SLOTS"),
        "{}",
        r.message
    );
    assert!(!r.kept_previous);

    // A new local service: programmed and serving, and the agent is ready.
    let vip_api = east
        .global_service("api", "none", port, &["127.0.5.2"])
        .await;
    let run = eventually("the new local service serves", T, || async {
        let v = node.client(true, "tcp", vip_api, 20);
        (v["failures"] == 0 && all_start_with(&v, "api")).then_some(v)
    })
    .await;
    println!("new local service next to a refused one: {run}");
    eventually("ready", T, || async {
        ready.borrow().is_ok().then_some(())
    })
    .await;
    assert_eq!(refused(), 1.0);
    assert_eq!(agent.refused().len(), 1);

    // West's share shrinks: web is programmed, the refusal goes away.
    east.west_shares("web", port, &["127.0.6.1".parse().unwrap()])
        .await;
    eventually("the refusal goes away", T, || async {
        (refused() == 0.0 && agent.refused().is_empty()).then_some(())
    })
    .await;
    let web = node.client(true, "tcp", vip_web, 20);
    assert_eq!(web["failures"], 0, "{web}");
    assert!(all_start_with(&web, "web-local"), "{web}");
    let state = (agent.state_fn())().unwrap();
    assert!(state.refused.is_empty() && state.in_sync, "{state:?}");
    assert!(ready.borrow().is_ok());
    drop(agent);
    east.apiserver.stop().await.unwrap();
}
