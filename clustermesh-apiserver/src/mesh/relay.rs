//! The flow relay ([ADR 0024](../../../docs/architecture/adr/0024-flow-visibility.md)):
//! `Observer` on the Mesh API port for this cluster's admins, fanned in from every node
//! agent's `Observer` (dialled at each Node's InternalIP over mutual TLS, presenting this
//! apiserver's Mesh API certificate and accepting only that node's agent). One client
//! connection, however many nodes.
//!
//! The backlog (`last`) is merged across nodes by time before the live flows; with `follow`, a
//! node whose stream breaks is dialled again (the client is told), asking for the flows since
//! the last one it sent, so the gap is filled from what the agent kept. Must not write
//! anything anywhere, and must not serve a peer cluster or a node agent: flows name this
//! cluster's pods.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use certs::{MeshIdentity, Role};
use futures::Stream;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use model::{ClusterId, ClusterName, NodeName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wire::pb;
use wire::pb::observe_response::What;
use wire::pb::observer_server::Observer;

/// Relayed streams at once.
const MAX_STREAMS: usize = 32;
/// Most flows of the nodes' backlogs one request holds (about 0.5 KiB each).
const MAX_BACKLOG: usize = 50_000;
/// How long the backlog may take to arrive from every node.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling one agent may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// The relay.
#[derive(Clone)]
pub struct Relay {
    cluster: ClusterName,
    cluster_id: ClusterId,
    tls: certs::TlsFiles,
    port: u16,
    nodes: Api<Node>,
    streams: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("cluster", &self.cluster)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Who may observe: admins of this cluster.
pub fn may_observe(id: &MeshIdentity, cluster: &ClusterName, cluster_id: ClusterId) -> bool {
    id.role == Role::Admin && id.cluster == *cluster && id.cluster_id == cluster_id
}

/// What one node's task reports.
enum NodeMsg {
    Flow(Box<pb::Flow>),
    BacklogDone(String),
    Notice(pb::ObserveNotice),
}

fn notice(node: &str, state: &str, message: String) -> pb::ObserveNotice {
    pb::ObserveNotice {
        node: node.to_owned(),
        state: state.to_owned(),
        message,
        lost: 0,
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Relay {
    /// Relays from the agents' `Observer` on `port`, presenting the certificate in `tls`.
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        tls: certs::TlsFiles,
        port: u16,
        client: kube::Client,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            tls,
            port,
            nodes: Api::all(client),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }

    /// The nodes to ask: name and `Observer` address.
    async fn targets(&self, only: &[String]) -> Result<Vec<(String, Option<String>)>, Status> {
        let list = self.nodes.list(&ListParams::default()).await.map_err(|e| {
            Status::unavailable(format!("list the Kubernetes Nodes: {}", chain(&e)))
        })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|n| {
                let name = n.metadata.name.clone()?;
                if !only.is_empty() && !only.contains(&name) {
                    return None;
                }
                let addr = n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                    .and_then(|a| a.address.parse::<std::net::IpAddr>().ok())
                    .map(|ip| std::net::SocketAddr::new(ip, self.port).to_string());
                Some((name, addr))
            })
            .collect())
    }
}

/// One node: dial, stream, and (with follow) dial again after a break.
async fn follow_node(
    relay: Relay,
    node: String,
    addr: Option<String>,
    mut req: pb::ObserveRequest,
    tx: mpsc::Sender<NodeMsg>,
) {
    let Some(addr) = addr else {
        let _ = tx
            .send(NodeMsg::Notice(notice(
                &node,
                "unreachable",
                "the Node has no InternalIP address".into(),
            )))
            .await;
        let _ = tx.send(NodeMsg::BacklogDone(node)).await;
        return;
    };
    let follow = req.follow;
    let mut backlog_done = false;
    let mut last_seen = 0i64;
    let mut backoff = telemetry::backoff::Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(5),
        Duration::from_secs(30),
    );
    loop {
        let attempt = async {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()))
            };
            let (ca, cert, key) = (
                read(&relay.tls.ca)?,
                read(&relay.tls.cert)?,
                read(&relay.tls.key)?,
            );
            let node_name =
                NodeName::new(node.clone()).map_err(|e| format!("node name {node:?}: {e}"))?;
            let mut client = meshapi::observe::dial_agent(
                &addr,
                &relay.cluster,
                relay.cluster_id,
                &node_name,
                &ca,
                &cert,
                &key,
                DIAL_TIMEOUT,
            )
            .await
            .map_err(|e| chain(&e))?;
            client
                .observe(req.clone())
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("Observe: {}: {}", s.code(), s.message()))
        };
        // The client may leave while an agent is dialled or quiet: stop at once then, or
        // this task (and the agent's stream) would live until the agent sends something.
        let attempt = tokio::select! {
            r = attempt => r,
            () = tx.closed() => return,
        };
        match attempt {
            Ok(mut stream) => {
                backoff.healthy();
                let _ = tx
                    .send(NodeMsg::Notice(notice(&node, "connected", addr.clone())))
                    .await;
                let ended = loop {
                    let m = tokio::select! {
                        m = stream.message() => m,
                        () = tx.closed() => return,
                    };
                    match m {
                        Ok(Some(pb::ObserveResponse {
                            what: Some(What::Flow(mut f)),
                        })) => {
                            // The agent proved to be this node's (its certificate): its
                            // flows are this node's, whatever they say.
                            f.node.clone_from(&node);
                            f.cluster = relay.cluster.to_string();
                            last_seen = last_seen.max(f.time_unix_nanos);
                            if tx.send(NodeMsg::Flow(Box::new(f))).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(pb::ObserveResponse {
                            what: Some(What::Notice(mut n)),
                        })) => {
                            n.node.clone_from(&node);
                            if n.state == "backlog_complete" {
                                if !backlog_done {
                                    backlog_done = true;
                                    if tx.send(NodeMsg::BacklogDone(node.clone())).await.is_err() {
                                        return;
                                    }
                                }
                            } else if tx.send(NodeMsg::Notice(n)).await.is_err() {
                                return;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break "the stream ended".to_owned(),
                        Err(s) => break format!("{}: {}", s.code(), s.message()),
                    }
                };
                if !follow {
                    break;
                }
                let _ = tx
                    .send(NodeMsg::Notice(notice(&node, "reconnecting", ended)))
                    .await;
            }
            Err(e) => {
                let _ = tx
                    .send(NodeMsg::Notice(notice(
                        &node,
                        if follow {
                            "reconnecting"
                        } else {
                            "unreachable"
                        },
                        e,
                    )))
                    .await;
                if !follow {
                    break;
                }
            }
        }
        if !backlog_done {
            backlog_done = true;
            if tx.send(NodeMsg::BacklogDone(node.clone())).await.is_err() {
                return;
            }
        }
        // Again, for what came after the last flow relayed (the agent's kept flows fill the
        // gap; a restarted agent kept none of it).
        req.last = 0;
        if last_seen > 0 {
            req.since_unix_nanos = last_seen.saturating_add(1);
        } else {
            req.since_unix_nanos = req.since_unix_nanos.max(1);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = tx.closed() => return,
        }
    }
    if !backlog_done {
        let _ = tx.send(NodeMsg::BacklogDone(node)).await;
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<pb::ObserveResponse, Status>> + Send>>;

fn out_flow(f: pb::Flow) -> pb::ObserveResponse {
    pb::ObserveResponse {
        what: Some(What::Flow(f)),
    }
}

fn out_notice(n: pb::ObserveNotice) -> pb::ObserveResponse {
    pb::ObserveResponse {
        what: Some(What::Notice(n)),
    }
}

#[tonic::async_trait]
impl Observer for Relay {
    type ObserveStream = FlowStream;

    async fn observe(
        &self,
        request: Request<pb::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let leaf = request
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = MeshIdentity::from_cert_der(leaf.as_ref()).map_err(|e| {
            Status::permission_denied(format!(
                "the client certificate carries no mesh identity: {e}"
            ))
        })?;
        if !may_observe(&id, &self.cluster, self.cluster_id) {
            tracing::warn!(caller = %id.to_uri(), "Observe refused: not an admin of this cluster");
            return Err(Status::permission_denied(
                "flows name this cluster's workloads: admins of this cluster only",
            ));
        }
        let req = request.into_inner();
        meshapi::observe::validate(&req).map_err(Status::invalid_argument)?;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("more than {MAX_STREAMS} relayed Observe streams"))
        })?;
        let targets = self.targets(&req.nodes).await?;
        tracing::info!(caller = %id.to_uri(), nodes = targets.len(), follow = req.follow, "Observe relayed");
        let (node_tx, mut node_rx) = mpsc::channel::<NodeMsg>(1024);
        let mut waiting: std::collections::BTreeSet<String> =
            targets.iter().map(|(n, _)| n.clone()).collect();
        for (node, addr) in targets {
            tokio::spawn(follow_node(
                self.clone(),
                node,
                addr,
                req.clone(),
                node_tx.clone(),
            ));
        }
        drop(node_tx);
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let _permit = permit;
            // 1. The backlog of every node, merged by time; the last `last` of it.
            let mut backlog: BTreeMap<(i64, u64), pb::Flow> = BTreeMap::new();
            let mut notices = Vec::new();
            let mut n = 0u64;
            let mut truncated = 0u64;
            let deadline = tokio::time::Instant::now() + BACKLOG_TIMEOUT;
            while !waiting.is_empty() {
                let msg = tokio::select! {
                    m = node_rx.recv() => m,
                    () = tx.closed() => return,
                    () = tokio::time::sleep_until(deadline) => {
                        for node in std::mem::take(&mut waiting) {
                            notices.push(notice(&node, "unreachable", "no backlog within 10s".into()));
                        }
                        break;
                    }
                };
                match msg {
                    None => break,
                    Some(NodeMsg::Flow(f)) => {
                        n += 1;
                        backlog.insert((f.time_unix_nanos, n), *f);
                        // Bounded: the newest are kept, the client is told.
                        if backlog.len() > MAX_BACKLOG {
                            backlog.pop_first();
                            truncated += 1;
                        }
                    }
                    Some(NodeMsg::BacklogDone(node)) => {
                        waiting.remove(&node);
                    }
                    Some(NodeMsg::Notice(x)) => notices.push(x),
                }
            }
            if truncated > 0 {
                notices.push(pb::ObserveNotice {
                    node: String::new(),
                    state: "lost".into(),
                    message: format!(
                        "the nodes' backlog held more than {MAX_BACKLOG} matching flows; the oldest {truncated} were left out (narrow the filters or --since)"
                    ),
                    lost: truncated,
                });
            }
            let skip = if req.last > 0 {
                backlog.len().saturating_sub(req.last as usize)
            } else {
                0
            };
            for x in notices {
                if tx.send(Ok(out_notice(x))).await.is_err() {
                    return;
                }
            }
            for f in backlog.into_values().skip(skip) {
                if tx.send(Ok(out_flow(f))).await.is_err() {
                    return;
                }
            }
            let done = notice("", "backlog_complete", "every node's backlog".into());
            if tx.send(Ok(out_notice(done))).await.is_err() || !req.follow {
                return;
            }
            // 2. Live, as it comes, until the client leaves (returning drops `node_rx`, which
            // ends every node's task and with it the agent's stream).
            loop {
                let msg = tokio::select! {
                    m = node_rx.recv() => m,
                    () = tx.closed() => return,
                };
                let Some(msg) = msg else { return };
                let out = match msg {
                    NodeMsg::Flow(f) => out_flow(*f),
                    NodeMsg::Notice(x) => out_notice(x),
                    NodeMsg::BacklogDone(_) => continue,
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_admins_of_this_cluster_observe() {
        let east = ClusterName::new("east").unwrap();
        let id1 = ClusterId::new(1).unwrap();
        let id = |c: &str, n: u64, role| {
            MeshIdentity::new(
                ClusterName::new(c).unwrap(),
                ClusterId::new(n).unwrap(),
                role,
            )
        };
        assert!(may_observe(&id("east", 1, Role::Admin), &east, id1));
        assert!(!may_observe(&id("east", 1, Role::Apiserver), &east, id1));
        assert!(!may_observe(&id("east", 1, Role::Peer), &east, id1));
        assert!(!may_observe(&id("west", 2, Role::Admin), &east, id1));
        let na = MeshIdentity::node_agent(east.clone(), id1, NodeName::new("n1").unwrap());
        assert!(
            !may_observe(&na, &east, id1),
            "a node agent sees no other node's flows"
        );
    }
}
