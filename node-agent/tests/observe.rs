//! Who may read flows, and what a caller with a legitimate certificate can make the servers do:
//! the node agent's `Observer` (port 9883) and the apiserver's relay on the Mesh API port, both
//! over real mutual TLS with certificates minted at test time. A refused caller must never get
//! a flow; abusive requests are refused or bounded; a follower that leaves or stops reading
//! must not hold anything that others need. No root needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{Ca, LeafSpec, MeshIdentity, Reloader, Role, TlsFiles};
use clustermesh_apiserver::config::Config;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use model::{ClusterId, ClusterName, NodeName};
use node_agent::flows::Store;
use node_agent::observe_server::{self, ObserveService};
use serde_json::json;
use test_support::{Etcd, eventually};
use tonic::transport::{Channel, Endpoint};
use wire::pb;
use wire::pb::observe_response::What;
use wire::pb::observer_client::ObserverClient;

const T: Duration = Duration::from_secs(30);
/// The agent's stream limit (`observe_server::MAX_STREAMS`).
const AGENT_STREAMS: usize = 64;
/// The relay's stream limit (`relay::MAX_STREAMS`).
const RELAY_STREAMS: usize = 32;

fn east() -> (ClusterName, ClusterId) {
    (
        ClusterName::new("east").unwrap(),
        ClusterId::new(1).unwrap(),
    )
}

fn node_agent_id(node: &str) -> MeshIdentity {
    let (c, id) = east();
    MeshIdentity::node_agent(c, id, NodeName::new(node).unwrap())
}

fn id(cluster: &str, cluster_id: u64, role: Role) -> MeshIdentity {
    MeshIdentity::new(
        ClusterName::new(cluster).unwrap(),
        ClusterId::new(cluster_id).unwrap(),
        role,
    )
}

/// A flow observed by `node`.
fn flow(node: &str, i: i64) -> pb::Flow {
    pb::Flow {
        time_unix_nanos: 1_000 + i,
        node: node.into(),
        cluster: "east".into(),
        direction: "egress".into(),
        protocol: "TCP".into(),
        verdict: "forwarded".into(),
        // Room for the HTTP/2 windows to fill with few flows.
        reason: "x".repeat(200),
        socket_cookie: i as u64,
        ..Default::default()
    }
}

/// A connection through `connect_with_connector` that hands out one established TLS stream.
#[derive(Clone)]
struct OneStream(Arc<Mutex<Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>>);

impl tonic::codegen::Service<http::Uri> for OneStream {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let s = self.0.lock().unwrap().take();
        std::future::ready(
            s.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::other("used")),
        )
    }
}

/// Dials `addr` with `config` (which verifies the server); an error when the TLS session
/// cannot be set up.
async fn dial(
    mut config: rustls::ClientConfig,
    addr: SocketAddr,
) -> Result<ObserverClient<Channel>, String> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    // Agents are verified by identity, the apiserver by its IP SAN.
    let name = rustls_pki_types::ServerName::from(addr.ip());
    let tls = tokio::time::timeout(T, connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    let channel = Endpoint::from_static("http://server")
        .connect_with_connector(OneStream(Arc::new(Mutex::new(Some(tls)))))
        .await
        .map_err(|e| format!("channel: {e}"))?;
    Ok(ObserverClient::new(channel))
}

/// What one `Observe` call gave: flows and notices until the backlog was complete, or why
/// it failed (a refused handshake or a status).
#[derive(Debug)]
struct Answer {
    flows: Vec<pb::Flow>,
    notices: Vec<pb::ObserveNotice>,
}

/// Calls `Observe` and reads until the (relay's or agent's) `backlog_complete` notice.
async fn observe(
    client: Result<ObserverClient<Channel>, String>,
    req: pb::ObserveRequest,
) -> Result<(Answer, tonic::Streaming<pb::ObserveResponse>), String> {
    let mut client = client?;
    let mut stream = tokio::time::timeout(T, client.observe(req))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut a = Answer {
        flows: Vec::new(),
        notices: Vec::new(),
    };
    loop {
        let m = tokio::time::timeout(T, stream.message())
            .await
            .map_err(|_| "no backlog_complete".to_owned())?
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .ok_or("the stream ended before backlog_complete")?;
        match m.what {
            Some(What::Flow(f)) => a.flows.push(f),
            // The agent's (its node) or the relay's (every node's, relayed ones consumed).
            Some(What::Notice(n)) if n.state == "backlog_complete" => {
                a.notices.push(n);
                return Ok((a, stream));
            }
            Some(What::Notice(n)) => a.notices.push(n),
            None => {}
        }
    }
}

fn backlog(last: u32) -> pb::ObserveRequest {
    pb::ObserveRequest {
        last,
        ..Default::default()
    }
}

/// A CA of cluster east, certificates from it, and the agents' `Observer`s.
struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            ca: Ca::generate(&east().0, certs::issue::DEFAULT_CA_VALIDITY).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn files(&self, ca: &Ca, who: &MeshIdentity) -> TlsFiles {
        let leaf = ca
            .issue(&LeafSpec::new(who.clone()).ips(["127.0.0.1".parse().unwrap()]))
            .unwrap();
        let dir = self.dir.path().join(test_support::unique_name("tls"));
        test_support::write_tls(&dir, ca, &leaf).unwrap()
    }

    /// A client presenting `who`'s certificate from `ca`, verifying the agent of `node`
    /// against this cluster's CA.
    fn client_config(&self, ca: &Ca, who: &MeshIdentity, node: &str) -> rustls::ClientConfig {
        let files = self.files(ca, who);
        let expected = node_agent_id(node);
        certs::identity_client_config(
            self.ca.cert_pem(),
            &std::fs::read_to_string(&files.cert).unwrap(),
            &std::fs::read_to_string(&files.key).unwrap(),
            move |id| *id == expected,
        )
        .unwrap()
    }

    /// The `Observer` of the agent of `node` at `addr`, serving `store`.
    async fn agent(&self, node: &str, addr: SocketAddr, store: Arc<Store>) -> SocketAddr {
        let (c, id) = east();
        let tls = Reloader::load(self.files(&self.ca, &node_agent_id(node))).unwrap();
        observe_server::spawn(addr, tls, ObserveService::new(c, id, node.into(), store))
            .await
            .unwrap()
    }
}

/// An admin of east, dialling the agent of `node` at `addr`.
async fn as_admin(pki: &Pki, node: &str, addr: SocketAddr) -> ObserverClient<Channel> {
    let admin = id("east", 1, Role::Admin);
    dial(pki.client_config(&pki.ca, &admin, node), addr)
        .await
        .unwrap()
}

fn store_with(node: &str, n: i64, capacity: usize) -> Arc<Store> {
    let s = Arc::new(Store::new(capacity));
    for i in 0..n {
        s.push(flow(node, i));
    }
    s
}

/// Attack 1: every certificate but an admin's or apiserver's of this cluster (name and ID) is
/// refused before any flow is sent: node agents (of another node and of this very node),
/// peers, admins and apiservers of another cluster or claiming another ID, a certificate from
/// another CA that claims this cluster, and no certificate at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_and_apiservers_of_this_cluster_read_a_nodes_flows() {
    let pki = Pki::new();
    let addr = pki
        .agent(
            "n1",
            "127.0.0.1:0".parse().unwrap(),
            store_with("n1", 3, 16),
        )
        .await;
    let foreign = Ca::generate(&east().0, certs::issue::DEFAULT_CA_VALIDITY).unwrap();

    for (who, ok) in [
        (id("east", 1, Role::Admin), true),
        (id("east", 1, Role::Apiserver), true),
        (node_agent_id("n1"), false),
        (node_agent_id("n2"), false),
        (id("east", 1, Role::Peer), false),
        (id("west", 2, Role::Peer), false),
        (id("west", 2, Role::Admin), false),
        (id("west", 2, Role::Apiserver), false),
        (id("west", 1, Role::Admin), false),
        (id("east", 2, Role::Admin), false),
        (id("east", 2, Role::Apiserver), false),
    ] {
        let r = observe(
            dial(pki.client_config(&pki.ca, &who, "n1"), addr).await,
            backlog(10),
        )
        .await;
        if ok {
            let (a, _) = r.unwrap_or_else(|e| panic!("{who} must be served: {e}"));
            assert_eq!(a.flows.len(), 3, "{who}");
        } else {
            let e = r.expect_err(&format!("{who} must be refused"));
            assert!(e.starts_with("PermissionDenied"), "{who}: {e}");
        }
    }

    // Another CA's "admin of east": the handshake or the first call fails, never a flow.
    let r = observe(
        dial(
            pki.client_config(&foreign, &id("east", 1, Role::Admin), "n1"),
            addr,
        )
        .await,
        backlog(10),
    )
    .await;
    assert!(r.is_err(), "a foreign CA's admin got {r:?}");

    // No client certificate.
    let anonymous = certs::identity_anonymous_client_config(pki.ca.cert_pem(), |_| true).unwrap();
    let r = observe(dial(anonymous, addr).await, backlog(10)).await;
    assert!(r.is_err(), "an anonymous client got {r:?}");
}

/// Attack 3 (requests): oversized filters, unknown verdicts and too many nodes are refused
/// (`InvalidArgument`); `last = u32::MAX` gets what is kept, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_refused_and_last_is_bounded_by_what_is_kept() {
    let pki = Pki::new();
    let addr = pki
        .agent(
            "n1",
            "127.0.0.1:0".parse().unwrap(),
            store_with("n1", 100, 40),
        )
        .await;
    let client = as_admin(&pki, "n1", addr).await;
    let long = "x".repeat(513);
    let bad: Vec<(&str, pb::ObserveRequest)> = vec![
        (
            "pod",
            pb::ObserveRequest {
                pod: long.clone(),
                ..Default::default()
            },
        ),
        (
            "label",
            pb::ObserveRequest {
                label: "k".repeat(100_000),
                ..Default::default()
            },
        ),
        (
            "verdict",
            pb::ObserveRequest {
                verdict: "allowed".into(),
                ..Default::default()
            },
        ),
        (
            "nodes",
            pb::ObserveRequest {
                nodes: (0..10_001).map(|i| format!("n{i}")).collect(),
                ..Default::default()
            },
        ),
    ];
    for (what, req) in bad {
        let e = observe(Ok(client.clone()), req).await.unwrap_err();
        assert!(e.starts_with("InvalidArgument"), "{what}: {e}");
    }
    let (a, _) = observe(Ok(client.clone()), backlog(u32::MAX))
        .await
        .unwrap();
    assert_eq!(a.flows.len(), 40, "only the kept ones");
    assert_eq!(a.flows.last().unwrap().socket_cookie, 99, "the newest last");
    // The agent still serves.
    let (a, _) = observe(Ok(client), backlog(1)).await.unwrap();
    assert_eq!(a.flows.len(), 1);
}

/// Attack 3 (streams): 64 streams at once, then `ResourceExhausted` (not a hang, not memory);
/// a stream whose client left frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_65th_stream_is_refused_and_a_stream_whose_client_left_frees_its_slot() {
    let pki = Pki::new();
    let addr = pki
        .agent(
            "n1",
            "127.0.0.1:0".parse().unwrap(),
            store_with("n1", 5, 16),
        )
        .await;
    let client = as_admin(&pki, "n1", addr).await;
    let follow = pb::ObserveRequest {
        follow: true,
        last: 1,
        ..Default::default()
    };
    let mut open = Vec::new();
    for _ in 0..AGENT_STREAMS {
        let (_, s) = observe(Ok(client.clone()), follow.clone()).await.unwrap();
        open.push(s);
    }
    let e = observe(Ok(client.clone()), follow.clone())
        .await
        .unwrap_err();
    assert!(e.starts_with("ResourceExhausted"), "{e}");
    // Another connection is refused too (the limit is the agent's, not the connection's).
    let e = observe(Ok(as_admin(&pki, "n1", addr).await), follow.clone())
        .await
        .unwrap_err();
    assert!(e.starts_with("ResourceExhausted"), "{e}");
    drop(open.pop());
    eventually("a slot freed by the client that left", T, || {
        let (client, follow) = (client.clone(), follow.clone());
        async move { observe(Ok(client), follow).await.ok() }
    })
    .await;
}

/// Attack 3 (slow follower): a follower that never reads does not hold back the reader (the
/// store's `push` never waits) nor another follower; when it reads again it is told how
/// many flows it lost, and then follows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_never_reads_is_told_what_it_lost_and_blocks_nobody() {
    let pki = Pki::new();
    let store = Arc::new(Store::new(64));
    let addr = pki
        .agent("n1", "127.0.0.1:0".parse().unwrap(), Arc::clone(&store))
        .await;
    let follow = pb::ObserveRequest {
        follow: true,
        ..Default::default()
    };
    let (_, mut stuck) = observe(Ok(as_admin(&pki, "n1", addr).await), follow.clone())
        .await
        .unwrap();
    let (_, mut reader) = observe(Ok(as_admin(&pki, "n1", addr).await), follow)
        .await
        .unwrap();
    // Far more than the live feed (4,096), the stream's channel (256) and the HTTP/2 windows
    // hold, in rounds the reading follower keeps up with.
    const ROUNDS: i64 = 40;
    const PER_ROUND: i64 = 1_000;
    let mut got = 0i64;
    for r in 0..ROUNDS {
        let pushed = tokio::task::spawn_blocking({
            let store = Arc::clone(&store);
            move || {
                for i in 0..PER_ROUND {
                    store.push(flow("n1", r * PER_ROUND + i));
                }
            }
        });
        tokio::time::timeout(T, pushed)
            .await
            .expect("push never waits for a follower")
            .unwrap();
        while got < (r + 1) * PER_ROUND {
            let m = tokio::time::timeout(T, reader.message())
                .await
                .expect("the reading follower is not held back")
                .unwrap()
                .unwrap();
            match m.what {
                Some(What::Flow(f)) => {
                    assert_eq!(f.socket_cookie, got as u64, "in order, none skipped");
                    got += 1;
                }
                other => panic!("the reading follower lost nothing: {other:?}"),
            }
        }
    }
    // The stuck one reads now: a `lost` notice counts what it missed.
    let mut flows = 0u64;
    let mut lost = 0u64;
    let deadline = tokio::time::Instant::now() + T;
    while flows + lost < (ROUNDS * PER_ROUND) as u64 {
        let m = tokio::time::timeout_at(deadline, stuck.message())
            .await
            .unwrap_or_else(|_| panic!("{flows} flows and {lost} lost so far"))
            .unwrap()
            .unwrap();
        match m.what {
            Some(What::Flow(_)) => flows += 1,
            Some(What::Notice(n)) => {
                assert_eq!(n.state, "lost", "{n:?}");
                assert!(n.lost > 0, "{n:?}");
                lost += n.lost;
            }
            None => {}
        }
    }
    assert!(lost > 0, "the stuck follower must be told it lost flows");
    assert_eq!(flows + lost, (ROUNDS * PER_ROUND) as u64);
    // And it follows again.
    store.push(flow("n1", 1_000_000));
    let m = tokio::time::timeout(T, stuck.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(m.what, Some(What::Flow(ref f)) if f.socket_cookie == 1_000_000),
        "{m:?}"
    );
}

/// Cluster east with an apiserver (relay on the Mesh API port) and the `Observer`s of two
/// nodes' agents at their InternalIPs.
struct Relayed {
    pki: Pki,
    _etcd: Etcd,
    _kube: kube_testserver::Handle,
    apiserver: clustermesh_apiserver::Running,
    agents: Vec<SocketAddr>,
}

impl Relayed {
    async fn start(stores: [Arc<Store>; 2]) -> Self {
        let pki = Pki::new();
        let (east, east_id) = east();
        let etcd = Etcd::start().await.unwrap();
        let kube = kube_testserver::start(kube_testserver::Config::new(east.clone()))
            .await
            .unwrap();
        let client = kube.client().await.unwrap();
        let port = test_support::free_port().unwrap();
        let mut agents = Vec::new();
        for (i, store) in stores.into_iter().enumerate() {
            let node = format!("n{}", i + 1);
            let ip = format!("127.0.83.{}", i + 1);
            let node_obj: Node = serde_json::from_value(json!({
                "metadata": {"name": node},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
            }))
            .unwrap();
            test_support::kube::create_with_status(&Api::all(client.clone()), &node_obj)
                .await
                .unwrap();
            let addr = format!("{ip}:{port}").parse().unwrap();
            agents.push(pki.agent(&node, addr, store).await);
        }
        let mesh_tls = pki.files(
            &pki.ca,
            &MeshIdentity::new(east.clone(), east_id, Role::Apiserver),
        );
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
            node_agent_observe_port: port,
            grants_dir: None,
        })
        .await
        .unwrap();
        Self {
            pki,
            _etcd: etcd,
            _kube: kube,
            apiserver,
            agents,
        }
    }

    /// A client of the relay presenting `who`'s certificate from `ca`.
    async fn client(&self, ca: &Ca, who: &MeshIdentity) -> Result<ObserverClient<Channel>, String> {
        let files = self.pki.files(ca, who);
        let tls = Reloader::load(files).unwrap();
        dial(tls.client_config(), self.apiserver.mesh_addr().unwrap()).await
    }
}

/// Attack 2: on the Mesh API port, only admins of this cluster are relayed flows; the
/// apiserver's own role, node agents, peers and other clusters are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_admins_of_its_own_cluster_only() {
    let r = Relayed::start([store_with("n1", 3, 16), store_with("n2", 2, 16)]).await;
    let ca = &r.pki.ca;
    let admin = id("east", 1, Role::Admin);
    let (a, _) = eventually("the relay serves an admin both nodes' flows", T, || async {
        let (a, s) = observe(r.client(ca, &admin).await, backlog(100))
            .await
            .ok()?;
        (a.flows.len() == 5).then_some((a, s))
    })
    .await;
    let mut times: Vec<i64> = a.flows.iter().map(|f| f.time_unix_nanos).collect();
    let sorted = {
        let mut t = times.clone();
        t.sort();
        t
    };
    assert_eq!(times, sorted, "merged by time");
    times.dedup();
    for who in [
        id("east", 1, Role::Apiserver),
        node_agent_id("n1"),
        node_agent_id("n2"),
        id("west", 2, Role::Peer),
        id("west", 2, Role::Admin),
        id("east", 2, Role::Admin),
        id("west", 1, Role::Admin),
    ] {
        let e = observe(r.client(ca, &who).await, backlog(100))
            .await
            .expect_err(&format!("{who} must be refused by the relay"));
        assert!(
            e.starts_with("PermissionDenied") || e.starts_with("Unauthenticated"),
            "{who}: {e}"
        );
    }
    let foreign = Ca::generate(&east().0, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let e = observe(r.client(&foreign, &admin).await, backlog(100)).await;
    assert!(e.is_err(), "a foreign CA's admin got {e:?}");
}

/// Attack 3/5 (relay): a careless user stops `clustermesh observe --follow` (with a filter
/// nothing matches yet) again and again. Each relayed stream the client left must end, and
/// with it the agent streams it opened: otherwise the relay's 32 slots and the agents' 64 fill
/// with streams nobody reads, and observing stops for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_follower_that_leaves_releases_its_relay_slot_and_every_agent_stream() {
    let r = Relayed::start([store_with("n1", 3, 16), store_with("n2", 3, 16)]).await;
    let admin = id("east", 1, Role::Admin);
    let quiet = pb::ObserveRequest {
        follow: true,
        verdict: "denied".into(),
        ..Default::default()
    };
    // More followers than the relay has slots, each leaving after its backlog.
    for i in 0..=RELAY_STREAMS {
        let client = r.client(&r.pki.ca, &admin).await;
        let (_, stream) = observe(client, quiet.clone())
            .await
            .unwrap_or_else(|e| panic!("follower {i} (the ones before left): {e}"));
        drop(stream);
    }
    // Every agent serves its full number of streams again: the relay let go of its own.
    for (i, addr) in r.agents.clone().into_iter().enumerate() {
        let client = as_admin(&r.pki, &format!("n{}", i + 1), addr).await;
        eventually("the agent's streams are free again", T, || {
            let client = client.clone();
            async move {
                let mut open = Vec::new();
                for _ in 0..AGENT_STREAMS {
                    let (_, s) = observe(Ok(client.clone()), quiet_direct()).await.ok()?;
                    open.push(s);
                }
                Some(())
            }
        })
        .await;
    }
}

fn quiet_direct() -> pb::ObserveRequest {
    pb::ObserveRequest {
        follow: true,
        verdict: "denied".into(),
        ..Default::default()
    }
}

/// Attack 5 (one node-agent credential): a node's agent says its flows are another node's,
/// of another cluster. The relay shows them as the flows of the node whose certificate the
/// agent presented, of this cluster, and keeps relaying after one dated at the end of time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_pass_its_flows_off_as_another_nodes() {
    let forged = Arc::new(Store::new(16));
    for i in 0..2 {
        let mut f = flow("n1", 10 + i);
        f.cluster = "west".into();
        forged.push(f);
    }
    let r = Relayed::start([store_with("n1", 2, 16), Arc::clone(&forged)]).await;
    let admin = id("east", 1, Role::Admin);
    let follow = pb::ObserveRequest {
        last: 100,
        follow: true,
        ..Default::default()
    };
    let (a, mut stream) = eventually("the relay serves both nodes", T, || async {
        let (a, s) = observe(r.client(&r.pki.ca, &admin).await, follow.clone())
            .await
            .ok()?;
        (a.flows.len() == 4).then_some((a, s))
    })
    .await;
    let by = |node: &str| a.flows.iter().filter(|f| f.node == node).count();
    assert_eq!((by("n1"), by("n2")), (2, 2), "{:#?}", a.flows);
    assert!(
        a.flows.iter().all(|f| f.cluster == "east"),
        "{:#?}",
        a.flows
    );
    // Live: a forged flow from the end of time, then a plain one; both relayed as n2's.
    let mut late = flow("n1", 0);
    late.time_unix_nanos = i64::MAX;
    forged.push(late);
    forged.push(flow("n1", 99));
    let mut live = Vec::new();
    while live.len() < 2 {
        let m = tokio::time::timeout(T, stream.message())
            .await
            .expect("relayed")
            .unwrap()
            .unwrap();
        if let Some(What::Flow(f)) = m.what {
            live.push(f);
        }
    }
    assert!(live.iter().all(|f| f.node == "n2"), "{live:#?}");
}
