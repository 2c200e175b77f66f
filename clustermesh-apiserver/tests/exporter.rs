//! The exporter against the Kubernetes API test server and a real etcd with mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_apiserver::config::Config;
use clustermesh_apiserver::leader::Leadership;
use clustermesh_apiserver::readiness::Readiness;
use clustermesh_apiserver::{Running, metrics as m};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kvstore::watch::{Event as KvEvent, Watcher};
use model::keys::{self, Kind, Scope};
use model::status::{ApiserverPhase, ClusterStatus};
use model::{ClusterId, ClusterName, Endpoint, GlobalService, Identity};
use serde_json::json;
use test_support::{Etcd, eventually};
use wire::Codec;

const T: Duration = Duration::from_secs(30);

struct Lab {
    etcd: Etcd,
    kube: kube_testserver::Handle,
    client: kube::Client,
    kv: kvstore::Client,
    cluster: ClusterName,
}

impl Lab {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let etcd = Etcd::start().await.unwrap();
        let cluster = ClusterName::new("east").unwrap();
        let kube = kube_testserver::start(kube_testserver::Config::new(cluster.clone()))
            .await
            .unwrap();
        let client = kube.client().await.unwrap();
        let kv = etcd.client().await.unwrap();
        Self {
            etcd,
            kube,
            client,
            kv,
            cluster,
        }
    }

    fn config(&self, replica: &str) -> Config {
        self.config_with_lease(replica, Duration::from_secs(10))
    }

    /// A config with a given leader lease (short only where a test needs a quick failover:
    /// under a loaded CI machine a 2 s lease can change hands in the middle of a test).
    fn config_with_lease(&self, replica: &str, leader_lease: Duration) -> Config {
        Config {
            cluster_name: self.cluster.clone(),
            cluster_id: ClusterId::new(7).unwrap(),
            etcd: self.etcd.config(),
            lease_ttl: Duration::from_secs(30),
            kubeconfig: Some(self.kube.kubeconfig().to_owned()),
            kube_context: None,
            namespace: "kube-system".into(),
            replica: replica.into(),
            leader_lease,
            identity_gc_grace: Duration::from_secs(1),
            health_bind: "127.0.0.1:0".parse().unwrap(),
            mesh_bind: "127.0.0.1:0".parse().unwrap(),
            mesh_tls: None,
            peers_dir: None,
            peers_from_secrets: false,
            peer_quota: Default::default(),
            node_agent_state_port: model::node_state::NODE_AGENT_STATE_PORT,
            node_agent_observe_port: meshapi::observe::NODE_AGENT_OBSERVE_PORT,
            grants_dir: None,
        }
    }

    async fn apiserver(&self, replica: &str) -> Running {
        clustermesh_apiserver::start(self.config(replica))
            .await
            .unwrap()
    }

    async fn apiserver_with_lease(&self, replica: &str, lease: Duration) -> Running {
        clustermesh_apiserver::start(self.config_with_lease(replica, lease))
            .await
            .unwrap()
    }

    /// Every exported key of one kind with its value.
    async fn state(&self, kind: Kind) -> BTreeMap<String, Vec<u8>> {
        let prefix = keys::kind_prefix(Scope::State, &self.cluster, kind);
        let (kvs, _) = self.kv.list_raw(&prefix).await.unwrap();
        kvs.into_iter()
            .map(|kv| (kv.key[prefix.len()..].to_owned(), kv.value))
            .collect()
    }

    async fn services(&self) -> BTreeMap<String, GlobalService> {
        self.state(Kind::Services)
            .await
            .into_iter()
            .map(|(k, v)| (k, GlobalService::decode(&v).unwrap()))
            .collect()
    }

    async fn endpoints(&self) -> BTreeMap<String, Endpoint> {
        self.state(Kind::Endpoints)
            .await
            .into_iter()
            .map(|(k, v)| (k, Endpoint::decode(&v).unwrap()))
            .collect()
    }

    async fn identities(&self) -> BTreeMap<String, Identity> {
        self.state(Kind::Identities)
            .await
            .into_iter()
            .map(|(k, v)| (k, Identity::decode(&v).unwrap()))
            .collect()
    }

    async fn apply<K>(&self, ns: Option<&str>, obj: serde_json::Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns.unwrap_or("default"));
        let obj: K = serde_json::from_value(obj).unwrap();
        test_support::kube::create_with_status(&api, &obj)
            .await
            .unwrap();
    }
}

async fn ready(r: &Running) {
    let mut rx = r.ready();
    tokio::time::timeout(T, rx.wait_for(Readiness::is_ready))
        .await
        .expect("apiserver ready in time")
        .unwrap();
}

fn pod(name: &str, ip: &str, app: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn global_service(name: &str, annotations: serde_json::Value) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

fn slice(name: &str, service: &str, endpoints: serde_json::Value) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

async fn create_namespace(lab: &Lab, name: &str, annotations: serde_json::Value) {
    let api: Api<Namespace> = Api::all(lab.client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": name}, "annotations": annotations}})).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_services_endpoints_identities_nodes_and_converges() {
    let lab = Lab::start().await;
    create_namespace(&lab, "shop", json!({})).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "node-1"},
                "spec": {"podCIDRs": ["10.1.1.0/24"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.1"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    lab.apply::<Service>(
        Some("shop"),
        global_service(
            "web",
            json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}),
        ),
    )
    .await;
    lab.apply::<Service>(Some("shop"), global_service("private", json!({})))
        .await;
    lab.apply::<EndpointSlice>(
        Some("shop"),
        slice("web-1", "web", json!([
            {"addresses": ["10.1.1.10"], "conditions": {"ready": true}, "nodeName": "node-1", "zone": "a"},
            {"addresses": ["10.1.1.11"], "conditions": {"ready": true}, "nodeName": "node-1", "zone": "a"}
        ])),
    )
    .await;
    lab.apply::<Pod>(Some("shop"), pod("web-a", "10.1.1.10", "web"))
        .await;
    lab.apply::<Pod>(Some("shop"), pod("web-b", "10.1.1.11", "web"))
        .await;

    let apiserver = lab.apiserver("r1").await;
    ready(&apiserver).await;

    // Initial state, read from etcd directly.
    let services = lab.services().await;
    assert_eq!(services.keys().collect::<Vec<_>>(), ["shop/web"]);
    let web = &services["shop/web"];
    assert_eq!(web.affinity, model::service::Affinity::Local);
    assert_eq!(
        web.backends
            .iter()
            .map(|b| b.ip.to_string())
            .collect::<Vec<_>>(),
        ["10.1.1.10", "10.1.1.11"]
    );
    assert_eq!(
        web.cluster_ips.len(),
        1,
        "the Service's cluster IP is carried"
    );
    let endpoints = lab.endpoints().await;
    assert_eq!(
        endpoints.keys().collect::<Vec<_>>(),
        ["10.1.1.10", "10.1.1.11"]
    );
    assert_eq!(
        endpoints["10.1.1.10"].identity, endpoints["10.1.1.11"].identity,
        "same labels, same identity"
    );
    let identities = lab.identities().await;
    assert_eq!(identities.len(), 1);
    let id = identities.values().next().unwrap();
    assert_eq!(id.id.cluster(), Some(ClusterId::new(7).unwrap()));
    let canonical = id.labels.canonical();
    for l in [
        "k8s:app=web",
        "k8s-ns:team=shop",
        "mesh:cluster=east",
        "mesh:namespace=shop",
    ] {
        assert!(canonical.contains(l), "{canonical}");
    }
    let node_state = lab.state(Kind::Nodes).await;
    let node = model::Node::decode(&node_state["node-1"]).unwrap();
    assert_eq!(node.pod_cidrs[0].to_string(), "10.1.1.0/24");
    for kind in Kind::ALL {
        assert!(
            lab.kv
                .get_raw(&keys::synced(Scope::State, &lab.cluster, kind))
                .await
                .unwrap()
                .is_some(),
            "synced marker for {kind}"
        );
    }

    // Scale up: a new pod and its backend; one backend stops being ready.
    lab.apply::<Pod>(Some("shop"), pod("web-c", "10.1.1.12", "web"))
        .await;
    let slices: Api<EndpointSlice> = Api::namespaced(lab.client.clone(), "shop");
    slices
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [
                {"addresses": ["10.1.1.10"], "conditions": {"ready": false, "serving": false, "terminating": true}, "nodeName": "node-1"},
                {"addresses": ["10.1.1.11"], "conditions": {"ready": true}, "nodeName": "node-1"},
                {"addresses": ["10.1.1.12"], "conditions": {"ready": true}, "nodeName": "node-1"}
            ]})),
        )
        .await
        .unwrap();
    eventually("three backends, one terminating", T, || async {
        let s = lab.services().await;
        let web = s.get("shop/web")?;
        (web.backends.len() == 3
            && web.backends[0].conditions.terminating
            && !web.backends[0].conditions.ready)
            .then_some(())
    })
    .await;
    eventually("three endpoints", T, || async {
        (lab.endpoints().await.len() == 3).then_some(())
    })
    .await;

    // shared=false: stored with shared=false and its backends (for this cluster's own node
    // agents; the Mesh API strips them for peers, see the multicluster scenarios).
    let svcs: Api<Service> = Api::namespaced(lab.client.clone(), "shop");
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"service.cilium.io/shared": "false"}}})),
    )
    .await
    .unwrap();
    eventually("unshared service, backends kept locally", T, || async {
        let s = lab.services().await;
        let web = s.get("shop/web")?;
        (!web.shared && !web.backends.is_empty()).then_some(())
    })
    .await;

    // A malformed annotation: not exported, a Warning Event, a metric; others unaffected.
    lab.apply::<Service>(
        Some("shop"),
        global_service(
            "bad",
            json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "sideways"}),
        ),
    )
    .await;
    // An events.k8s.io/v1 Event, as kube-runtime's Recorder writes it.
    let events: Api<Event> = Api::namespaced(lab.client.clone(), "shop");
    let ev = eventually("a Warning event about shop/bad", T, || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad"))
    })
    .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.reason.as_deref(), Some("InvalidGlobalServiceAnnotation"));
    assert_eq!(
        ev.reporting_controller.as_deref(),
        Some("clustermesh-apiserver")
    );
    assert!(ev.note.as_deref().unwrap().contains("sideways"));
    assert_eq!(
        apiserver
            .metrics()
            .value(m::INVALID_SERVICES, &["InvalidGlobalServiceAnnotation"]),
        1.0
    );
    assert!(!lab.services().await.contains_key("shop/bad"));
    assert!(lab.services().await.contains_key("shop/web"));
    // Another refusal for the same reason: the same Event, its series counted (a patch the
    // strict test server validates as kube-apiserver does), not a second Event.
    svcs.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"service.cilium.io/affinity": "upwards"}}}),
        ),
    )
    .await
    .unwrap();
    let series = eventually("the Warning event's series", T, || async {
        let ev = events
            .get(&ev.metadata.name.clone().unwrap())
            .await
            .unwrap();
        ev.series.filter(|s| s.count == 2)
    })
    .await;
    assert!(series.last_observed_time.0 >= ev.event_time.clone().unwrap().0);
    let about_bad = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad"))
        .count();
    assert_eq!(about_bad, 1, "one Event, with a series");
    // Fixing the annotation exports it.
    svcs.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"service.cilium.io/affinity": "remote"}}}),
        ),
    )
    .await
    .unwrap();
    eventually("fixed service exported", T, || async {
        lab.services().await.contains_key("shop/bad").then_some(())
    })
    .await;

    // A namespace default makes its services global; a service opts out.
    create_namespace(
        &lab,
        "all-global",
        json!({"clustermesh.dev/global-services": "true"}),
    )
    .await;
    lab.apply::<Service>(Some("all-global"), global_service("a", json!({})))
        .await;
    lab.apply::<Service>(
        Some("all-global"),
        global_service("b", json!({"service.cilium.io/global": "false"})),
    )
    .await;
    eventually(
        "namespace-default service exported, opted-out one not",
        T,
        || async {
            let s = lab.services().await;
            (s.contains_key("all-global/a") && !s.contains_key("all-global/b")).then_some(())
        },
    )
    .await;

    // Withdraw: annotation removed, service deleted.
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"service.cilium.io/global": null}}})),
    )
    .await
    .unwrap();
    svcs.delete("bad", &DeleteParams::default()).await.unwrap();
    eventually("withdrawn services", T, || async {
        let s = lab.services().await;
        (!s.contains_key("shop/web") && !s.contains_key("shop/bad")).then_some(())
    })
    .await;

    // Pods go (force-deleted): endpoints withdrawn at once, the identity after its grace
    // period.
    let pods: Api<Pod> = Api::namespaced(lab.client.clone(), "shop");
    for p in ["web-a", "web-b", "web-c"] {
        pods.delete(p, &test_support::kube::now()).await.unwrap();
    }
    eventually("endpoints withdrawn", T, || async {
        lab.endpoints().await.is_empty().then_some(())
    })
    .await;
    eventually("unused identity released", T, || async {
        lab.identities().await.is_empty().then_some(())
    })
    .await;
    assert!(apiserver.metrics().value(m::IDENTITIES_RELEASED, &[]) >= 1.0);

    // /metrics, /healthz, /readyz over HTTP.
    let body = http_get(apiserver.health_addr(), "/metrics").await;
    assert!(
        body.contains("clustermesh_exported_objects{kind=\"services\"}"),
        "{body}"
    );
    assert!(body.contains("clustermesh_leader 1"), "{body}");
    assert!(
        http_get(apiserver.health_addr(), "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    apiserver.stop().await.unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    test_support::http_get(addr, path).await.unwrap()
}

/// Records every etcd event under the cluster's state prefix.
fn record(lab: &Lab) -> (Arc<Mutex<Vec<KvEvent>>>, tokio::task::JoinHandle<()>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut w = Watcher::new(&lab.kv, keys::cluster_prefix(Scope::State, &lab.cluster));
    let sink = Arc::clone(&events);
    let task = tokio::spawn(async move {
        while let Ok(e) = w.next().await {
            sink.lock().unwrap().push(e);
        }
    });
    (events, task)
}

fn deletes(events: &Mutex<Vec<KvEvent>>) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            KvEvent::Delete { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

async fn churn_pods(client: kube::Client, from: usize, to: usize) {
    let pods: Api<Pod> = Api::namespaced(client, "default");
    for i in from..to {
        let p: Pod = serde_json::from_value(pod(
            &format!("churn-{i}"),
            &format!("10.2.{}.{}", i / 250, i % 250 + 1),
            &format!("app{}", i % 5),
        ))
        .unwrap();
        test_support::kube::create_with_status(&pods, &p)
            .await
            .unwrap();
    }
}

/// Restart (graceful and crash) in the middle of churn: zero spurious deletes, exact state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_churn_has_no_spurious_deletes() {
    let lab = Lab::start().await;
    lab.apply::<Service>(
        None,
        global_service("web", json!({"service.cilium.io/global": "true"})),
    )
    .await;
    lab.apply::<EndpointSlice>(
        None,
        slice(
            "web-1",
            "web",
            json!([{"addresses": ["10.2.0.1"], "nodeName": "node-1"}]),
        ),
    )
    .await;
    churn_pods(lab.client.clone(), 0, 100).await;
    let first = lab.apiserver("r1").await;
    ready(&first).await;
    eventually("100 endpoints", T, || async {
        (lab.endpoints().await.len() == 100).then_some(())
    })
    .await;
    let (events, recorder) = record(&lab);
    eventually("recorder listed", T, || async {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, KvEvent::InitDone { .. }))
            .then_some(())
    })
    .await;

    // Graceful restart while pods are being created.
    let churn = tokio::spawn(churn_pods(lab.client.clone(), 100, 200));
    first.stop().await.unwrap();
    let second = lab.apiserver("r2").await;
    ready(&second).await;
    churn.await.unwrap();
    eventually("200 endpoints", T, || async {
        (lab.endpoints().await.len() == 200).then_some(())
    })
    .await;

    // Crash while pods are being created.
    let churn = tokio::spawn(churn_pods(lab.client.clone(), 200, 300));
    second.kill();
    let third = lab.apiserver("r3").await;
    ready(&third).await;
    churn.await.unwrap();
    eventually("300 endpoints", T, || async {
        (lab.endpoints().await.len() == 300).then_some(())
    })
    .await;

    assert_eq!(
        deletes(&events),
        Vec::<String>::new(),
        "no key was deleted across the restarts"
    );
    // Unchanged keys were not rewritten either: the service key kept its revision.
    let svc_key = keys::object_key(Scope::State, &lab.cluster, Kind::Services, "default/web");
    let rewrites = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, KvEvent::Apply(kv) if kv.key == svc_key))
        .count();
    assert_eq!(
        rewrites, 0,
        "an unchanged service is not rewritten by a restarted exporter"
    );
    assert_eq!(lab.identities().await.len(), 5);
    recorder.abort();
    third.stop().await.unwrap();
}

/// Two replicas: one leads; killing it hands over within the lease; a replica whose lease is
/// taken stops exporting; no identity ID is ever given to two label sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_and_step_down() {
    let lab = Lab::start().await;
    churn_pods(lab.client.clone(), 0, 20).await;
    let a = lab
        .apiserver_with_lease("replica-a", Duration::from_secs(2))
        .await;
    ready(&a).await;
    let b = lab
        .apiserver_with_lease("replica-b", Duration::from_secs(2))
        .await;
    let mut b_lead = b.leadership();
    tokio::time::timeout(
        T,
        b_lead.wait_for(|l| *l == Leadership::Follower(Some("replica-a".into()))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(b.ready().borrow().phase, ApiserverPhase::Standby);
    // Readiness is not leadership: the standby can serve, so it is Ready (a rolling update of
    // the Deployment completes while another replica holds the Lease); /status says who leads.
    eventually("the standby is Ready", T, || async {
        http_get(b.health_addr(), "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    let status = http_get(b.health_addr(), "/status").await;
    assert!(status.contains("\"leader\": false"), "{status}");

    // Kill the leader: B takes over once A's lease runs out, and exports new pods.
    a.kill();
    tokio::time::timeout(T, b_lead.wait_for(|l| *l == Leadership::Leader))
        .await
        .unwrap()
        .unwrap();
    ready(&b).await;
    churn_pods(lab.client.clone(), 20, 40).await;
    eventually("40 endpoints after failover", T, || async {
        (lab.endpoints().await.len() == 40).then_some(())
    })
    .await;

    // Someone else takes the Lease: B steps down and stops exporting at once.
    let leases: Api<Lease> = Api::namespaced(lab.client.clone(), "kube-system");
    // A MicroTime, as a real apiserver parses it (RFC 3339 with exactly six fractional digits).
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap();
    leases
        .patch(
            clustermesh_apiserver::LEADER_LEASE_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "leaseDurationSeconds": 3}})),
        )
        .await
        .unwrap();
    tokio::time::timeout(
        T,
        b_lead.wait_for(|l| *l == Leadership::Follower(Some("intruder".into()))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(b.metrics().value(m::LEADER, &[]), 0.0);
    let mut b_ready = b.ready();
    tokio::time::timeout(T, b_ready.wait_for(|r| !r.is_ready()))
        .await
        .unwrap()
        .unwrap();
    // The intruder never renews: B takes over again and exports what changed meanwhile.
    churn_pods(lab.client.clone(), 40, 50).await;
    tokio::time::timeout(T, b_lead.wait_for(|l| *l == Leadership::Leader))
        .await
        .unwrap()
        .unwrap();
    eventually("50 endpoints", T, || async {
        (lab.endpoints().await.len() == 50).then_some(())
    })
    .await;

    // No ID was handed out twice: allocator records and exported identities agree 1:1.
    let (ids, _) = lab
        .kv
        .list_raw(&keys::alloc_ids_prefix(&lab.cluster))
        .await
        .unwrap();
    let labels: BTreeSet<Vec<u8>> = ids.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(labels.len(), ids.len(), "one label set per ID");
    let exported = lab.identities().await;
    let by_labels: BTreeSet<String> = exported.values().map(|i| i.labels.canonical()).collect();
    assert_eq!(by_labels.len(), exported.len(), "one ID per label set");
    b.stop().await.unwrap();
}

/// 10,000 pods become endpoint keys in batches, not one round trip each; deleting them all is
/// again a few batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_are_batched() {
    const PODS: usize = 10_000;
    let lab = Lab::start().await;
    let pods: Api<Pod> = Api::namespaced(lab.client.clone(), "default");
    futures::stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let p: Pod = serde_json::from_value(pod(
                    &format!("p{i}"),
                    &format!("10.3.{}.{}", i / 250, i % 250 + 1),
                    "burst",
                ))
                .unwrap();
                test_support::kube::create_with_status(&pods, &p)
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let apiserver = lab.apiserver("r1").await;
    ready(&apiserver).await;
    assert_eq!(lab.endpoints().await.len(), PODS);
    let batches_before = apiserver
        .metrics()
        .observations(m::WRITE_SECONDS, &["endpoints"]);
    assert!(
        batches_before <= 2,
        "the initial 10,000 endpoints went out in one batch: {batches_before}"
    );

    // A burst: every pod force-deleted at once (graceful deletions would trickle in as each
    // pod's grace period ends).
    pods.delete_collection(&test_support::kube::now(), &ListParams::default())
        .await
        .unwrap();
    eventually(
        "all endpoints withdrawn",
        Duration::from_secs(120),
        || async { lab.endpoints().await.is_empty().then_some(()) },
    )
    .await;
    // The metrics are updated once the write returns, a moment after etcd shows it.
    eventually("every deletion counted", T, || async {
        (apiserver
            .metrics()
            .value(m::KEYS_WRITTEN, &["endpoints", "delete"])
            == PODS as f64)
            .then_some(())
    })
    .await;
    let batches = apiserver
        .metrics()
        .observations(m::WRITE_SECONDS, &["endpoints"])
        - batches_before;
    println!("10,000 pod deletions: {batches} write batches");
    // Not one round trip per change: on average at least ten changes per write.
    assert!(
        batches <= (PODS / 10) as u64,
        "10,000 deletions took {batches} write batches"
    );
    apiserver.stop().await.unwrap();
}

/// Issue 13, cases 1 and 2: an apiserver cut from its etcd (etcd itself up) for longer than its
/// session lease, with no Kubernetes change. Nothing it exported is deleted (not one delete
/// event), its phase says `etcd-unreachable` and then `lease-lost` with since-when while the
/// cut lasts (also in `/status`), and after the cut the apiserver is `ready` again by itself,
/// and a change made during the cut lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_cut_longer_than_the_lease_withdraws_nothing() {
    etcd_cut_withdraws_nothing(Duration::from_secs(8)).await;
}

/// The same, shorter than the lease (2 s) and far longer (20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_cuts_shorter_and_far_longer_than_the_lease_withdraw_nothing() {
    let (short, long) = tokio::join!(
        etcd_cut_withdraws_nothing(Duration::from_secs(2)),
        etcd_cut_withdraws_nothing(Duration::from_secs(20)),
    );
    let ((), ()) = (short, long);
}

/// Cuts the apiserver (session lease 5 s) from its etcd for `hold`, with no Kubernetes change
/// but one pod added during the cut.
async fn etcd_cut_withdraws_nothing(hold: Duration) {
    const LEASE: Duration = Duration::from_secs(5);
    let lab = Lab::start().await;
    create_namespace(&lab, "shop", json!({})).await;
    lab.apply::<Service>(
        Some("shop"),
        global_service("web", json!({"service.cilium.io/global": "true"})),
    )
    .await;
    lab.apply::<EndpointSlice>(
        Some("shop"),
        slice(
            "web-1",
            "web",
            json!([
                {"addresses": ["10.1.1.10"], "conditions": {"ready": true}, "nodeName": "node-1"},
            ]),
        ),
    )
    .await;
    lab.apply::<Pod>(Some("shop"), pod("web-a", "10.1.1.10", "web"))
        .await;
    let proxy = test_support::Proxy::start(([127, 0, 0, 1], lab.etcd.port()).into())
        .await
        .unwrap();
    let mut config = lab.config("r1");
    config.etcd = lab.etcd.config_via(proxy.addr());
    config.etcd.connect_timeout = Duration::from_secs(1);
    config.lease_ttl = LEASE;
    let apiserver = clustermesh_apiserver::start(config).await.unwrap();
    ready(&apiserver).await;
    let before: BTreeMap<String, Vec<u8>> = {
        let (kvs, _) = lab
            .kv
            .list_raw(&keys::cluster_prefix(Scope::State, &lab.cluster))
            .await
            .unwrap();
        kvs.into_iter().map(|kv| (kv.key, kv.value)).collect()
    };
    assert!(before.len() >= 3, "service, endpoint, identity: {before:?}");
    let mut w = Watcher::new(&lab.kv, keys::cluster_prefix(Scope::State, &lab.cluster));
    loop {
        if matches!(w.next().await.unwrap(), KvEvent::InitDone { .. }) {
            break;
        }
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let watcher = tokio::spawn(async move {
        while let Ok(e) = w.next().await {
            sink.lock().unwrap().push(e);
        }
    });

    // Every phase the apiserver goes through.
    let mut readiness = apiserver.ready();
    let phases = Arc::new(Mutex::new(Vec::new()));
    let recorder = {
        let (mut rx, sink) = (readiness.clone(), Arc::clone(&phases));
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let r: Readiness = rx.borrow_and_update().clone();
                let mut seen = sink.lock().unwrap();
                if seen.last() != Some(&r.phase) {
                    seen.push(r.phase);
                }
            }
        })
    };
    proxy.set_blocked(true);
    proxy.cut();
    let cut_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let healed_at = tokio::time::Instant::now() + hold;
    // A change during the cut waits; it is not lost.
    lab.apply::<Pod>(Some("shop"), pod("web-b", "10.1.1.11", "web"))
        .await;
    if hold > LEASE {
        // Past the lease TTL: the session record expires; the exports must not. And
        // readiness says why.
        eventually("the session record expired", T, || async {
            lab.kv
                .get_raw(&keys::session(&lab.cluster))
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
        let lost = tokio::time::timeout(
            T,
            readiness.wait_for(|r| r.phase == ApiserverPhase::LeaseLost),
        )
        .await
        .expect("the phase says the lease is lost")
        .unwrap()
        .clone();
        let reason = lost.reason.unwrap_or_default();
        assert!(reason.contains("etcd unreachable"), "{reason}");
        assert!(
            lost.since_unix >= cut_at,
            "lost since {} (cut at {cut_at})",
            lost.since_unix
        );
        // The status document says the same, with since-when.
        let body = http_get(apiserver.health_addr(), "/status").await;
        let status: ClusterStatus =
            serde_json::from_str(body.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap();
        assert_eq!(status.phase, Some(ApiserverPhase::LeaseLost), "{body}");
        assert_eq!(status.phase_since_unix, Some(lost.since_unix));
        assert!(!status.ready);
        // Unreachable first (a write may fail before the keep-alive notices), the lease lost
        // past its TTL. The recorder task may see the last change a moment after we did.
        eventually("the recorder saw the lease lost", T, || async {
            (phases.lock().unwrap().last() == Some(&ApiserverPhase::LeaseLost)).then_some(())
        })
        .await;
        let seen: Vec<ApiserverPhase> = phases
            .lock()
            .unwrap()
            .iter()
            .copied()
            .skip_while(|p| *p == ApiserverPhase::Ready)
            .collect();
        let unreachable = seen
            .iter()
            .position(|p| *p == ApiserverPhase::EtcdUnreachable);
        assert!(
            unreachable.is_some_and(|i| i + 2 == seen.len())
                && seen.last() == Some(&ApiserverPhase::LeaseLost)
                && seen[..unreachable.unwrap_or(0)]
                    .iter()
                    .all(|p| *p == ApiserverPhase::EtcdWritesFailing),
            "{seen:?}"
        );
    }
    // The fault lasts `hold` (a fault's duration, not a wait for a condition).
    tokio::time::sleep_until(healed_at).await;
    proxy.set_blocked(false);
    tokio::time::timeout(T, readiness.wait_for(Readiness::is_ready))
        .await
        .expect("ready again after the cut")
        .unwrap();
    eventually("the change made during the cut lands", T, || async {
        lab.endpoints()
            .await
            .contains_key("10.1.1.11")
            .then_some(())
    })
    .await;
    eventually("the session record is back", T, || async {
        lab.kv
            .get_raw(&keys::session(&lab.cluster))
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    let (kvs, _) = lab
        .kv
        .list_raw(&keys::cluster_prefix(Scope::State, &lab.cluster))
        .await
        .unwrap();
    let after: BTreeMap<String, Vec<u8>> = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{k} kept unchanged");
    }
    watcher.abort();
    let deletes: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            KvEvent::Delete { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    assert!(deletes.is_empty(), "no exported key deleted: {deletes:?}");
    assert!(apiserver.ready().borrow().is_ready());
    recorder.abort();
    if hold > LEASE {
        assert_eq!(
            phases.lock().unwrap().last(),
            Some(&ApiserverPhase::Ready),
            "{:?}",
            phases.lock().unwrap()
        );
    }
}

/// A pod deleted gracefully, on a server that deletes as a real apiserver does (first a
/// `deletionTimestamp`, the pod gone only when its grace period has passed): it stays an
/// endpoint while it terminates, its backend is exported as terminating-but-serving when its
/// EndpointSlice says so, and it is withdrawn only once the pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_pods_stay_endpoints_until_gone() {
    const GRACE: i64 = 10;
    let lab = Lab::start().await;
    create_namespace(&lab, "shop", json!({})).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    test_support::kube::create_with_status(
        &nodes,
        &serde_json::from_value(json!({
            "metadata": {"name": "node-1"},
            "spec": {"podCIDRs": ["10.1.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.1"}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    lab.apply::<Service>(
        Some("shop"),
        global_service("web", json!({"service.cilium.io/global": "true"})),
    )
    .await;
    lab.apply::<EndpointSlice>(
        Some("shop"),
        slice(
            "web-1",
            "web",
            json!([{"addresses": ["10.1.1.10"], "conditions": {"ready": true}, "nodeName": "node-1"}]),
        ),
    )
    .await;
    let mut p = pod("web-a", "10.1.1.10", "web");
    p["spec"]["terminationGracePeriodSeconds"] = json!(GRACE);
    lab.apply::<Pod>(Some("shop"), p).await;
    let apiserver = lab.apiserver("r1").await;
    ready(&apiserver).await;
    eventually("the pod is an endpoint", T, || async {
        lab.endpoints()
            .await
            .contains_key("10.1.1.10")
            .then_some(())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(lab.client.clone(), "shop");
    pods.delete("web-a", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = pods.get("web-a").await.unwrap();
    assert!(
        terminating.metadata.deletion_timestamp.is_some(),
        "a bound pod terminates for its grace period"
    );
    assert_eq!(
        terminating.metadata.deletion_grace_period_seconds,
        Some(GRACE)
    );
    // The EndpointSlice controller: not ready, still serving, terminating.
    let slices: Api<EndpointSlice> = Api::namespaced(lab.client.clone(), "shop");
    slices
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [
                {"addresses": ["10.1.1.10"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node-1"}
            ]})),
        )
        .await
        .unwrap();
    eventually(
        "the backend is exported as terminating and serving",
        T,
        || async {
            let s = lab.services().await;
            let b = s.get("shop/web")?.backends.first()?.clone();
            (!b.conditions.ready && b.conditions.serving && b.conditions.terminating).then_some(())
        },
    )
    .await;
    // Read the export, then the pod: if the pod still existed after the read, its endpoint
    // must have been in it.
    let endpoints = lab.endpoints().await;
    let still_there = pods.get_opt("web-a").await.unwrap().is_some();
    assert!(
        still_there,
        "the pod outlived its {GRACE} s grace period before the check"
    );
    assert!(
        endpoints.contains_key("10.1.1.10"),
        "a terminating pod keeps its endpoint: {endpoints:?}"
    );

    eventually("the pod is gone after its grace period", T, || async {
        pods.get_opt("web-a").await.unwrap().is_none().then_some(())
    })
    .await;
    eventually("its endpoint is withdrawn", T, || async {
        (!lab.endpoints().await.contains_key("10.1.1.10")).then_some(())
    })
    .await;
    apiserver.stop().await.unwrap();
}

/// Applies `deploy/base/rbac.yaml` (as edited by `edit`) to the lab's server with kubectl and
/// returns a kubeconfig that authenticates as the apiserver's ServiceAccount.
fn deploy_rbac(lab: &Lab, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rbac = std::fs::read_to_string(repo.join("deploy/base/rbac.yaml")).unwrap();
    let dir = lab.kube.kubeconfig().parent().unwrap().to_owned();
    let file = dir.join("rbac.yaml");
    std::fs::write(&file, edit(rbac)).unwrap();
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.kube.kubeconfig())
        .args(["-n", "kube-system", "apply", "-f"])
        .arg(&file)
        .env("HOME", &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = lab
        .kube
        .service_account_token("kube-system", "clustermesh-apiserver")
        .unwrap();
    let mut kc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.kube.kubeconfig()).unwrap()).unwrap();
    kc["users"][0]["user"] = json!({ "token": token });
    let path = dir.join("apiserver-sa.kubeconfig");
    std::fs::write(&path, serde_json::to_vec(&kc).unwrap()).unwrap();
    path
}

const APISERVER_SA: &str = "system:serviceaccount:kube-system:clustermesh-apiserver";

/// The apiserver runs as its ServiceAccount with exactly the RBAC `deploy/` grants (the test
/// server enforces it): it exports, nothing it asks is refused, and a rule it does not need
/// shows up in the audit listing of unused rules. Without one verb (`list` on EndpointSlices)
/// it is refused and never becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_exactly_the_rbac_deploy_grants() {
    let lab = Lab::start().await;
    create_namespace(&lab, "shop", json!({})).await;
    lab.apply::<Service>(
        Some("shop"),
        global_service("web", json!({"service.cilium.io/global": "true"})),
    )
    .await;
    // deploy/'s RBAC plus one rule the apiserver never needs.
    let kubeconfig = deploy_rbac(&lab, |rbac| {
        format!(
            "{rbac}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: unneeded}}\nrules: [{{apiGroups: [\"\"], resources: [pods], verbs: [delete]}}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: unneeded}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: unneeded}}\nsubjects: [{{kind: ServiceAccount, name: clustermesh-apiserver, namespace: kube-system}}]\n"
        )
    });
    let mut config = lab.config("r1");
    config.kubeconfig = Some(kubeconfig);
    let apiserver = clustermesh_apiserver::start(config).await.unwrap();
    ready(&apiserver).await;
    eventually("the service exported", T, || async {
        lab.services().await.contains_key("shop/web").then_some(())
    })
    .await;
    let audit = lab.kube.audit();
    let refused: Vec<_> = audit
        .refused
        .iter()
        .filter(|(u, _)| u == APISERVER_SA)
        .collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(
        audit.allowed.iter().any(|(u, what, _)| u == APISERVER_SA
            && what.starts_with("watch discovery.k8s.io/endpointslices")),
        "{:?}",
        audit.allowed
    );
    let unused = lab
        .kube
        .unused_rules("kube-system", "clustermesh-apiserver");
    assert!(
        unused
            .iter()
            .any(|(r, _)| r.role == "Role kube-system/unneeded"),
        "the unneeded rule is listed: {unused:?}"
    );
    apiserver.stop().await.unwrap();

    // Without `list` on EndpointSlices: refused, said so, not ready.
    let lab = Lab::start().await;
    let kubeconfig = deploy_rbac(&lab, |rbac| {
        rbac.replace(
            "resources: [endpointslices]\n    verbs: [get, list, watch]",
            "resources: [endpointslices]\n    verbs: [get, watch]",
        )
    });
    let mut config = lab.config("r1");
    config.kubeconfig = Some(kubeconfig);
    let apiserver = clustermesh_apiserver::start(config).await.unwrap();
    eventually("the missing verb refused", T, || async {
        lab.kube
            .audit()
            .refused
            .iter()
            .any(|(u, m)| {
                u == APISERVER_SA
                    && m.contains(
                        "cannot list resource \"endpointslices\" in API group \"discovery.k8s.io\"",
                    )
            })
            .then_some(())
    })
    .await;
    assert!(
        !apiserver.ready().borrow().is_ready(),
        "an exporter that cannot list EndpointSlices is not ready"
    );
    apiserver.stop().await.unwrap();
}
