//! The Mesh API server: mutual TLS (a client without a certificate from this cluster's trust
//! bundle never gets past the handshake), authorization from the client certificate, and the
//! Watch and ClusterInfo RPCs over the [`WatchCache`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::{MeshIdentity, Reloader, Role};
use model::keys::{Kind, Scope};
use model::{ClusterId, ClusterName, NodeName};
use telemetry::metrics::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use wire::pb::mesh_server::{Mesh, MeshServer};
use wire::{Codec, pb};

use super::cache::{Item, Record, Start, Update, WatchCache};
use super::{grants, nodes};
use crate::metrics as m;

pub use meshapi::MAX_MESSAGE;
/// Changes per Watch message.
const BATCH: usize = 512;
/// Approximate bytes of changes per Watch message (well under [`MAX_MESSAGE`]).
const BATCH_BYTES: usize = 256 * 1024;

fn size(c: &pb::Change) -> usize {
    c.value.len() + c.name.len() + c.cluster.len() + 32
}

/// Connections the Mesh API holds at once (before and after the TLS handshake).
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections from one source address at once.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 128;
/// Concurrent HTTP/2 streams on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Open Watch streams of one peer identity (a peer needs one).
pub const MAX_WATCHES_PER_PEER: usize = 4;
/// Open Watch streams of one local identity (node agents of one node, one admin).
pub const MAX_WATCHES_PER_LOCAL: usize = 32;
/// Entries in a Watch filter (kinds or clusters).
pub const MAX_FILTER_ENTRIES: usize = 64;
/// Messages queued for one Watch client before it counts as slow (each ≤ about 256 KiB).
const CLIENT_QUEUE: usize = 2;
/// Bytes of Watch messages queued for all clients together: the send-buffer budget. A stream
/// that cannot get its share within [`BUDGET_WAIT`] ends (`RESOURCE_EXHAUSTED`; the client
/// reconnects and resyncs), so slow or stuck clients cannot hold the server's memory.
pub const SEND_BUDGET_BYTES: usize = 64 * 1024 * 1024;
/// How long a stream waits for send budget, or for its client to take a queued message.
const BUDGET_WAIT: Duration = Duration::from_secs(20);

/// One queued message and the budget it holds until the transport takes it.
type Queued = (
    Result<pb::WatchResponse, Status>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// The sending side of one Watch stream, under the shared send budget.
#[derive(Debug, Clone)]
struct Sink {
    tx: mpsc::Sender<Queued>,
    budget: Arc<tokio::sync::Semaphore>,
    /// Why the stream ended early: delivered after what is queued, even when the queue is full.
    failure: Arc<std::sync::Mutex<Option<Status>>>,
}

impl Sink {
    /// Queues `msg`; false when the stream is over (client gone, or too slow for the budget).
    async fn send(&self, msg: pb::WatchResponse) -> bool {
        let bytes = prost::Message::encoded_len(&msg).clamp(1, SEND_BUDGET_BYTES);
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let permit = match tokio::time::timeout(
            BUDGET_WAIT,
            Arc::clone(&self.budget).acquire_many_owned(bytes),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => {
                self.fail(Status::resource_exhausted(
                    "the Mesh API's send budget is exhausted; reconnect",
                ));
                return false;
            }
        };
        match tokio::time::timeout(BUDGET_WAIT, self.tx.send((Ok(msg), Some(permit)))).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::info!(
                    "Mesh API client did not read for {BUDGET_WAIT:?}; ending its stream"
                );
                self.fail(Status::resource_exhausted(
                    "this client did not read its watch in time; reconnect",
                ));
                false
            }
        }
    }

    fn fail(&self, status: Status) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(status);
        }
    }

    async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// The response stream of a Watch: releases each message's budget when the transport takes it.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Queued>,
    failure: Arc<std::sync::Mutex<Option<Status>>>,
}

impl futures::Stream for WatchStream {
    type Item = Result<pb::WatchResponse, Status>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some((item, _permit))) => std::task::Poll::Ready(Some(item)),
            std::task::Poll::Ready(None) => {
                std::task::Poll::Ready(self.failure.lock().ok().and_then(|mut f| f.take()).map(Err))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

fn sink(budget: &Arc<tokio::sync::Semaphore>) -> (Sink, WatchStream) {
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
    let failure = Arc::default();
    (
        Sink {
            tx,
            budget: Arc::clone(budget),
            failure: Arc::clone(&failure),
        },
        WatchStream { rx, failure },
    )
}

/// Counts held per key; a slot is released when its guard drops.
#[derive(Debug, Default)]
struct Slots {
    total: std::sync::Mutex<(usize, std::collections::HashMap<String, usize>)>,
}

/// A held slot of [`Slots`].
#[derive(Debug)]
struct SlotGuard {
    slots: Arc<Slots>,
    key: String,
}

impl Slots {
    /// Takes a slot for `key` unless `key` holds `per_key` or all hold `total`.
    fn acquire(self: &Arc<Self>, key: String, per_key: usize, total: usize) -> Option<SlotGuard> {
        let mut g = self.total.lock().ok()?;
        let (all, by_key) = &mut *g;
        let n = by_key.get(&key).copied().unwrap_or(0);
        if *all >= total || n >= per_key {
            return None;
        }
        *all += 1;
        by_key.insert(key.clone(), n + 1);
        Some(SlotGuard {
            slots: Arc::clone(self),
            key,
        })
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = self.slots.total.lock() {
            let (all, by_key) = &mut *g;
            *all = all.saturating_sub(1);
            if let Some(n) = by_key.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    by_key.remove(&self.key);
                }
            }
        }
    }
}

/// A TLS connection that holds its connection slot for as long as it lives.
#[derive(Debug)]
struct Guarded {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    _slot: SlotGuard,
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = <tokio_rustls::server::TlsStream<tokio::net::TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

/// What a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A peer cluster's apiserver: this cluster's own exports only.
    Peer(ClusterName),
    /// This cluster's node agents, admins and apiserver replicas: own exports and imports.
    Local(MeshIdentity),
}

/// The Mesh API service.
#[derive(Debug, Clone)]
pub struct MeshService {
    cluster: ClusterName,
    cluster_id: ClusterId,
    trust_bundle_sha256: String,
    cache: Arc<WatchCache>,
    grants: grants::Receiver,
    nodes: nodes::Receiver,
    metrics: Registry,
    stop: watch::Receiver<bool>,
    watches: Arc<Slots>,
    budget: Arc<tokio::sync::Semaphore>,
    /// The cluster's network policies; `None`: not served by this instance.
    policies: Option<crate::policies::Receiver>,
}

/// What an open stream's admission rests on, re-checked whenever it changes: a disconnected
/// peer's streams end at once (its grant is gone), and so do a node agent's when its Node is
/// deleted.
#[derive(Debug)]
pub(crate) enum Recheck {
    /// A peer: its grant must still list this certificate.
    Grant {
        identity: MeshIdentity,
        fingerprint: String,
        grants: grants::Receiver,
    },
    /// A node agent: its Node must still exist.
    Node {
        identity: MeshIdentity,
        node: NodeName,
        nodes: nodes::Receiver,
    },
}

impl Recheck {
    pub(crate) fn admitted(&self) -> Result<(), String> {
        match self {
            Self::Grant {
                identity,
                fingerprint,
                grants,
            } => match grants.borrow().as_deref() {
                Some(g) => g.admits(identity, fingerprint).map_err(|e| e.to_string()),
                None => Err("grants not loaded".into()),
            },
            Self::Node { node, nodes, .. } => match nodes.borrow().as_deref() {
                Some(n) => n.admits(node),
                None => Err("Nodes not listed".into()),
            },
        }
    }

    pub(crate) fn identity(&self) -> &MeshIdentity {
        match self {
            Self::Grant { identity, .. } | Self::Node { identity, .. } => identity,
        }
    }

    /// Resolves when what the admission rests on changes (never, once its source is gone).
    async fn changed(&mut self) {
        let changed = match self {
            Self::Grant { grants, .. } => grants.changed().await,
            Self::Node { nodes, .. } => nodes.changed().await,
        };
        if changed.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves when the caller's standing changes (never, for callers without a recheck).
pub(crate) async fn standing_changed(r: &mut Option<Recheck>) {
    match r {
        Some(rc) => rc.changed().await,
        None => std::future::pending().await,
    }
}

impl MeshService {
    /// The service of `cluster` over `cache`; peers are admitted by `grants`, node agents
    /// while their Node is in `nodes`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        trust_bundle_sha256: String,
        cache: Arc<WatchCache>,
        grants: grants::Receiver,
        nodes: nodes::Receiver,
        metrics: Registry,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            trust_bundle_sha256,
            cache,
            grants,
            nodes,
            metrics,
            stop,
            watches: Arc::default(),
            budget: Arc::new(tokio::sync::Semaphore::new(SEND_BUDGET_BYTES)),
            policies: None,
        }
    }

    /// Serves the cluster's network policies from `rx` to its node agents and admins.
    pub fn with_policies(mut self, rx: crate::policies::Receiver) -> Self {
        self.policies = Some(rx);
        self
    }

    fn caller<T>(req: &Request<T>) -> Result<(MeshIdentity, String), Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = MeshIdentity::from_cert_der(leaf.as_ref()).map_err(|e| {
            Status::permission_denied(format!(
                "the client certificate carries no mesh identity: {e}"
            ))
        })?;
        Ok((id, certs::fingerprint(leaf.as_ref())))
    }

    /// Who the caller is, from its certificate, and what it may see.
    pub fn authorize<T>(&self, req: &Request<T>) -> Result<View, Status> {
        self.admit(req).map(|(view, _)| view)
    }

    /// [`MeshService::authorize`], and for a peer or a node agent what its stream must keep
    /// re-checking.
    fn admit<T>(&self, req: &Request<T>) -> Result<(View, Option<Recheck>), Status> {
        let deny = |reason: String| {
            self.metrics.inc(m::MESH_DENIED, &[]);
            tracing::warn!(reason = %reason, "Mesh API request refused");
            Status::permission_denied(reason)
        };
        let (id, fingerprint) = match Self::caller(req) {
            Ok(c) => c,
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                return Err(deny(e.message().to_owned()));
            }
            Err(e) => return Err(e),
        };
        let own = id.cluster == self.cluster;
        match id.role {
            Role::Peer if !own && id.cluster_id != self.cluster_id => {
                if self.grants.borrow().is_none() {
                    return Err(Status::unavailable(
                        "this apiserver has not read its peer grants yet; retry",
                    ));
                }
                let recheck = Recheck::Grant {
                    identity: id,
                    fingerprint,
                    grants: self.grants.clone(),
                };
                recheck.admitted().map_err(deny)?;
                let view = View::Peer(recheck.identity().cluster.clone());
                Ok((view, Some(recheck)))
            }
            Role::Peer if !own => Err(deny(format!(
                "peer {} claims cluster ID {}, which is this cluster's ({})",
                id.cluster, id.cluster_id, self.cluster
            ))),
            Role::NodeAgent if own && id.cluster_id == self.cluster_id => {
                let Some(node) = id.node.clone() else {
                    return Err(deny(format!(
                        "a node-agent certificate of cluster {} names no node",
                        id.cluster
                    )));
                };
                if self.nodes.borrow().is_none() {
                    return Err(Status::unavailable(
                        "this apiserver has not listed the Nodes yet; retry",
                    ));
                }
                let recheck = Recheck::Node {
                    identity: id,
                    node,
                    nodes: self.nodes.clone(),
                };
                recheck.admitted().map_err(deny)?;
                Ok((View::Local(recheck.identity().clone()), Some(recheck)))
            }
            Role::Admin | Role::Apiserver if own && id.cluster_id == self.cluster_id => {
                Ok((View::Local(id), None))
            }
            role => Err(deny(format!(
                "a {role} certificate of cluster {} (ID {}) may not use the Mesh API of cluster {} (ID {})",
                id.cluster, id.cluster_id, self.cluster, self.cluster_id
            ))),
        }
    }
}

/// Which records a watch delivers.
#[derive(Debug, Clone)]
struct Filter {
    view: View,
    own: ClusterName,
    kinds: Option<HashSet<Kind>>,
    clusters: Option<HashSet<String>>,
}

impl Filter {
    fn admits(&self, r: &Record) -> bool {
        let visible = match &self.view {
            View::Peer(_) => r.scope == Scope::State && r.cluster == self.own,
            View::Local(_) => r.scope == Scope::Cache || r.cluster == self.own,
        };
        let kind = match &r.item {
            Item::Object(k, _) | Item::Synced(k) => *k,
        };
        visible
            && self.kinds.as_ref().is_none_or(|ks| ks.contains(&kind))
            && self
                .clusters
                .as_ref()
                .is_none_or(|cs| cs.contains(r.cluster.as_str()))
    }
}

impl Filter {
    /// What a peer may not see: the local backends of a service this cluster does not share
    /// (`service.cilium.io/shared: "false"`). They are in etcd for this cluster's own node
    /// agents only.
    fn redact(&self, mut c: pb::Change) -> pb::Change {
        if !matches!(self.view, View::Peer(_))
            || c.kind != Kind::Services.as_str()
            || c.value.is_empty()
        {
            return c;
        }
        if let Ok(mut gs) = model::GlobalService::decode(&c.value)
            && !gs.shared
            && !gs.backends.is_empty()
        {
            gs.backends.clear();
            c.value = gs.encode();
        }
        c
    }
}

fn change(r: &Record, deleted: bool) -> Option<pb::Change> {
    let Item::Object(kind, name) = &r.item else {
        return None;
    };
    Some(pb::Change {
        op: if deleted {
            pb::change::Op::Delete
        } else {
            pb::change::Op::Put
        } as i32,
        cluster: r.cluster.to_string(),
        kind: kind.to_string(),
        name: name.clone(),
        value: if deleted {
            Vec::new()
        } else {
            r.value.to_vec()
        },
        revision: r.revision,
        origin_unix_micros: r.seen_unix_micros,
    })
}

fn synced(r: &Record) -> Option<pb::SyncedMarker> {
    let Item::Synced(_) = &r.item else {
        return None;
    };
    <pb::SyncedMarker as prost::Message>::decode(r.value.as_ref()).ok()
}

async fn send_snapshot(
    tx: &Sink,
    filter: &Filter,
    records: Vec<Arc<Record>>,
    revision: i64,
) -> bool {
    let mut changes = Vec::new();
    let mut markers = Vec::new();
    let mut first = true;
    let mut bytes = 0;
    for r in records.iter().filter(|r| filter.admits(r)) {
        if let Some(c) = change(r, false).map(|c| filter.redact(c)) {
            bytes += size(&c);
            changes.push(c);
        } else if let Some(s) = synced(r) {
            markers.push(s);
        }
        if changes.len() == BATCH || bytes >= BATCH_BYTES {
            bytes = 0;
            let msg = pb::WatchResponse {
                reset: first,
                changes: std::mem::take(&mut changes),
                revision,
                ..Default::default()
            };
            first = false;
            if !tx.send(msg).await {
                return false;
            }
        }
    }
    let msg = pb::WatchResponse {
        reset: first,
        changes,
        synced: markers,
        revision,
        snapshot_complete: true,
    };
    tx.send(msg).await
}

async fn stream_updates(
    cache: Arc<WatchCache>,
    filter: Filter,
    start: Start,
    tx: Sink,
    metrics: Registry,
    mut stop: watch::Receiver<bool>,
    mut recheck: Option<Recheck>,
) {
    let Start {
        snapshot,
        replay,
        mut live,
        mut revision,
    } = start;
    if let Some(records) = snapshot
        && !send_snapshot(&tx, &filter, records, revision).await
    {
        return;
    }
    let mut pending: Vec<Update> = replay;
    loop {
        // Drain what is already there (up to a batch), then send one message.
        if pending.is_empty() {
            let next = tokio::select! {
                n = live.recv() => n,
                _ = stop.wait_for(|s| *s) => return,
                // A client that went away is noticed at once, not at the next send.
                () = tx.closed() => return,
                () = standing_changed(&mut recheck) => {
                    if let Some(rc) = &recheck
                        && let Err(reason) = rc.admitted()
                    {
                        metrics.inc(m::MESH_DENIED, &[]);
                        tracing::warn!(caller = %rc.identity(), reason = %reason, "ending a Mesh API stream: the caller is no longer admitted");
                        tx.fail(Status::permission_denied(reason));
                        return;
                    }
                    continue;
                }
            };
            match next {
                Ok(u) => pending.push(u),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    metrics.inc(m::MESH_RESYNCS, &[]);
                    tracing::info!(
                        missed = n,
                        "Mesh API client too slow; sending a fresh snapshot"
                    );
                    let start = cache.subscribe(0);
                    live = start.live;
                    revision = start.revision;
                    if !send_snapshot(&tx, &filter, start.snapshot.unwrap_or_default(), revision)
                        .await
                    {
                        return;
                    }
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
        while pending.len() < BATCH {
            match live.try_recv() {
                Ok(u) => pending.push(u),
                Err(_) => break,
            }
        }
        let mut msg = pb::WatchResponse::default();
        let mut bytes = 0;
        let batch: Vec<Update> = std::mem::take(&mut pending);
        let last = batch.len();
        for (i, u) in batch.into_iter().enumerate() {
            if filter.admits(&u.record) {
                if let Some(c) = change(&u.record, u.deleted).map(|c| filter.redact(c)) {
                    bytes += size(&c);
                    msg.changes.push(c);
                } else if !u.deleted
                    && let Some(s) = synced(&u.record)
                {
                    msg.synced.push(s);
                }
            }
            revision = revision.max(u.record.revision);
            if bytes >= BATCH_BYTES || i + 1 == last {
                // More updates of the newest revision (one etcd transaction) may still follow:
                // only the revision before it is known to be complete. A client resuming from
                // it gets that revision again, which is harmless (puts and deletes repeat).
                msg.revision = revision - 1;
                bytes = 0;
                let out = std::mem::take(&mut msg);
                if (!out.changes.is_empty() || !out.synced.is_empty()) && !tx.send(out).await {
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Mesh for MeshService {
    async fn cluster_info(
        &self,
        request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(pb::ClusterInfoResponse {
            name: self.cluster.to_string(),
            id: u32::from(self.cluster_id.get()),
            capabilities: vec!["watch-resume".into(), "gzip".into()],
            trust_bundle_sha256: self.trust_bundle_sha256.clone(),
            version: telemetry::version::REPORTED.into(),
        }))
    }

    type WatchStream = WatchStream;
    type PoliciesStream = crate::mesh::policy_stream::PoliciesStream;

    async fn policies(
        &self,
        request: Request<pb::PoliciesRequest>,
    ) -> Result<Response<Self::PoliciesStream>, Status> {
        let (view, recheck) = self.admit(&request)?;
        if let View::Peer(c) = &view {
            self.metrics.inc(m::MESH_DENIED, &[]);
            tracing::warn!(peer = %c, "Mesh API Policies refused: policies never leave their cluster");
            return Err(Status::permission_denied(format!(
                "peer {c} may not read cluster {}'s network policies: they never leave their cluster",
                self.cluster
            )));
        }
        let Some(rx) = self.policies.clone() else {
            return Err(Status::unavailable(
                "this apiserver does not serve network policies",
            ));
        };
        self.metrics.inc(m::POLICY_STREAMS, &[]);
        Ok(Response::new(crate::mesh::policy_stream::serve(
            rx,
            recheck,
            self.stop.clone(),
        )))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (view, recheck) = self.admit(&request)?;
        let slot = {
            let (key, per) = match &view {
                View::Peer(c) => (format!("peer/{c}"), MAX_WATCHES_PER_PEER),
                View::Local(id) => (id.to_uri(), MAX_WATCHES_PER_LOCAL),
            };
            self.watches
                .acquire(key.clone(), per, MAX_CONNECTIONS)
                .ok_or_else(|| {
                    self.metrics.inc(m::MESH_DENIED, &[]);
                    tracing::warn!(caller = %key, limit = per, "Mesh API watch refused: too many open watches for this identity");
                    Status::resource_exhausted(format!(
                        "{key} already has {per} open watches (the limit per identity)"
                    ))
                })?
        };
        let req = request.into_inner();
        if req.kinds.len() > MAX_FILTER_ENTRIES || req.clusters.len() > MAX_FILTER_ENTRIES {
            return Err(Status::invalid_argument(format!(
                "a watch filter holds at most {MAX_FILTER_ENTRIES} kinds and {MAX_FILTER_ENTRIES} clusters"
            )));
        }
        if let Some(c) = req
            .clusters
            .iter()
            .find(|c| ClusterName::new((*c).clone()).is_err())
        {
            return Err(Status::invalid_argument(format!(
                "watch filter: {:?} is not a cluster name",
                model::escape::bounded(c, 80)
            )));
        }
        let mut kinds = HashSet::new();
        for k in &req.kinds {
            kinds.insert(
                k.parse::<Kind>()
                    .map_err(|_| Status::invalid_argument(format!("unknown kind {k:?}")))?,
            );
        }
        let filter = Filter {
            view: view.clone(),
            own: self.cluster.clone(),
            kinds: (!kinds.is_empty()).then_some(kinds),
            clusters: (!req.clusters.is_empty()).then(|| req.clusters.iter().cloned().collect()),
        };
        self.cache.wait_ready().await;
        let start = self.cache.subscribe(req.resume_revision);
        tracing::info!(
            view = ?view,
            resume = req.resume_revision,
            snapshot = start.snapshot.is_some(),
            "Mesh API watch started"
        );
        self.metrics.inc(m::MESH_WATCHES, &[]);
        let (tx, rx) = sink(&self.budget);
        let (cache, metrics, stop) = (
            Arc::clone(&self.cache),
            self.metrics.clone(),
            self.stop.clone(),
        );
        tokio::spawn(async move {
            // The caller's watch slot is held until the stream ends.
            let _slot = slot;
            stream_updates(cache, filter, start, tx, metrics, stop, recheck).await;
        });
        Ok(Response::new(rx))
    }
}

/// Serves `service` on `listener` with mutual TLS from `tls` until the task is dropped. Generic
/// so that tests can stand up misbehaving peers behind the same TLS.
pub async fn serve<S: Mesh>(
    listener: TcpListener,
    tls: Arc<Reloader>,
    service: S,
    metrics: Registry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    serve_with(listener, tls, service, None, metrics, stop).await
}

/// [`serve`], also serving the flow relay (`Observer`) when given.
pub async fn serve_with<S: Mesh>(
    listener: TcpListener,
    tls: Arc<Reloader>,
    service: S,
    relay: Option<super::relay::Relay>,
    metrics: Registry,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut config = tls.server_config();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let connections: Arc<Slots> = Arc::default();
    let accept = async move {
        let mut accept_errors = telemetry::backoff::Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(500),
            Duration::from_secs(5),
        );
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => {
                    accept_errors.healthy();
                    c
                }
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    metrics.inc(m::MESH_HANDSHAKE_FAILURES, &[]);
                    tracing::warn!(error = %e, "Mesh API accept failed");
                    accept_errors.wait().await;
                    continue;
                }
            };
            // Capped before the handshake: unauthenticated connections cannot exhaust us.
            let Some(slot) = connections.acquire(
                addr.ip().to_string(),
                MAX_CONNECTIONS_PER_SOURCE,
                MAX_CONNECTIONS,
            ) else {
                metrics.inc(m::MESH_HANDSHAKE_FAILURES, &[]);
                tracing::debug!(client = %addr, "Mesh API connection refused: connection limit");
                drop(tcp);
                continue;
            };
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let conn = Guarded { tls, _slot: slot };
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(conn)).await;
                    }
                    Ok(Err(e)) => {
                        metrics.inc(m::MESH_HANDSHAKE_FAILURES, &[]);
                        tracing::warn!(client = %addr, error = %e, "Mesh API TLS handshake refused");
                    }
                    Err(_) => {
                        metrics.inc(m::MESH_HANDSHAKE_FAILURES, &[]);
                        tracing::warn!(client = %addr, "Mesh API TLS handshake timed out");
                    }
                }
            });
        }
    };
    let shutdown = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            MeshServer::new(service)
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_optional_service(relay.map(wire::pb::observer_server::ObserverServer::new))
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), shutdown);
    // The listener lives in `accept`: when this returns, the port is closed.
    tokio::select! {
        () = accept => Ok(()),
        r = server => Ok(r?),
        _ = stop.wait_for(|s| *s) => Ok(()),
    }
}

/// Binds `addr` and serves; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    tls: Arc<Reloader>,
    service: MeshService,
    relay: Option<super::relay::Relay>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let metrics = service.metrics.clone();
    let stop = service.stop.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = serve_with(listener, tls, service, relay, metrics, stop).await {
            tracing::error!(error = %e, "Mesh API server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::mesh::cache::CLIENT_BUFFER;
    use futures::StreamExt;

    /// A client that stops reading while more changes than its buffer holds arrive is not
    /// buffered for: when it reads again it gets a fresh snapshot (reset) with the full state.
    #[tokio::test]
    async fn a_slow_client_gets_a_fresh_snapshot() {
        let cache = WatchCache::detached();
        let own = ClusterName::new("alpha").unwrap();
        let key = |i: usize| {
            format!(
                "/clustermesh/v1/state/alpha/endpoints/10.0.{}.{}",
                i / 250,
                i % 250
            )
        };
        cache.put_for_test(&key(0), vec![1], 1);
        let filter = Filter {
            view: View::Peer(ClusterName::new("bravo").unwrap()),
            own,
            kinds: None,
            clusters: None,
        };
        let start = cache.subscribe(0);
        // A client queue that nobody reads for now.
        let budget = Arc::new(tokio::sync::Semaphore::new(SEND_BUDGET_BYTES));
        let (tx, mut rx) = sink(&budget);
        let (_stop_tx, stop) = watch::channel(false);
        let metrics = crate::metrics::registry();
        tokio::spawn(stream_updates(
            Arc::clone(&cache),
            filter,
            start,
            tx,
            metrics.clone(),
            stop,
            None,
        ));
        let first = rx.next().await.unwrap().unwrap();
        assert!(first.reset && first.snapshot_complete && first.changes.len() == 1);
        let n = CLIENT_BUFFER + 1000;
        for i in 1..=n {
            cache.put_for_test(&key(i), vec![1], 1 + i as i64);
        }
        // Read again: exactly one reset, after which the client has everything.
        let mut seen = std::collections::HashSet::new();
        let mut resets = 0;
        while seen.len() < n + 1 {
            let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if msg.reset {
                resets += 1;
                seen.clear();
            }
            seen.extend(msg.changes.into_iter().map(|c| c.name));
        }
        assert_eq!(resets, 1, "told to relist exactly once");
        assert_eq!(metrics.value(m::MESH_RESYNCS, &[]), 1.0);
    }

    /// Issue 12, case 4: a client that never reads holds at most its queue of the shared send
    /// budget, is ended with RESOURCE_EXHAUSTED after the budget wait, and everything it held
    /// is released.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_reads_is_ended_and_its_budget_released() {
        let cache = WatchCache::detached();
        for i in 0..3000usize {
            cache.put_for_test(
                &format!(
                    "/clustermesh/v1/state/alpha/endpoints/10.1.{}.{}",
                    i / 250,
                    i % 250
                ),
                vec![7; 300],
                1 + i as i64,
            );
        }
        let filter = Filter {
            view: View::Peer(ClusterName::new("bravo").unwrap()),
            own: ClusterName::new("alpha").unwrap(),
            kinds: None,
            clusters: None,
        };
        let budget = Arc::new(tokio::sync::Semaphore::new(SEND_BUDGET_BYTES));
        let (tx, mut rx) = sink(&budget);
        let (_stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(stream_updates(
            Arc::clone(&cache),
            filter,
            cache.subscribe(0),
            tx,
            crate::metrics::registry(),
            stop,
            None,
        ));
        tokio::time::sleep(BUDGET_WAIT / 2).await;
        let held = SEND_BUDGET_BYTES - budget.available_permits();
        assert!(
            held > 0 && held <= (CLIENT_QUEUE + 1) * (BATCH_BYTES + 64 * 1024),
            "held {held}"
        );
        tokio::time::timeout(BUDGET_WAIT * 3, task)
            .await
            .unwrap()
            .unwrap();
        let mut last = None;
        while let Some(item) = rx.next().await {
            last = Some(item);
        }
        let e = last.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert_eq!(
            budget.available_permits(),
            SEND_BUDGET_BYTES,
            "all released"
        );
    }

    #[test]
    fn peers_see_only_the_serving_clusters_state() {
        let own = ClusterName::new("alpha").unwrap();
        let rec = |scope, cluster: &str| Record {
            scope,
            cluster: ClusterName::new(cluster).unwrap(),
            item: Item::Object(Kind::Services, "default/web".into()),
            value: Arc::from(Vec::new()),
            revision: 1,
            seen_unix_micros: 0,
        };
        let peer = Filter {
            view: View::Peer(ClusterName::new("bravo").unwrap()),
            own: own.clone(),
            kinds: None,
            clusters: None,
        };
        assert!(peer.admits(&rec(Scope::State, "alpha")));
        assert!(
            !peer.admits(&rec(Scope::Cache, "charlie")),
            "never a copy of a third cluster"
        );
        let id = MeshIdentity::new(own.clone(), ClusterId::new(1).unwrap(), Role::NodeAgent);
        let local = Filter {
            view: View::Local(id),
            own,
            kinds: Some([Kind::Endpoints].into()),
            clusters: None,
        };
        assert!(!local.admits(&rec(Scope::State, "alpha")), "kind filter");
    }
}
