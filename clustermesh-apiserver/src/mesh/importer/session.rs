//! One connection to a peer, in steps: the handshake (TLS, who answered, ClusterInfo, the
//! cluster ID checks), this cluster's own address space, the watch, and then the stream:
//! each message validated and admitted, writes coalesced across the messages already waiting,
//! a snapshot pruned per kind once the peer's synced marker arrived, the markers mirrored,
//! readiness and the status counts kept up to date. Must not write outside `cache/<peer>/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::Reloader;
use meshapi::client::{self, ConnectError};
use model::keys::{self, Kind, Scope};
use model::node::AddressSpace;
use model::status::Phase;
use model::{ClusterId, ClusterName};
use telemetry::backoff::Backoff;
use tonic::Streaming;
use tonic::transport::Channel;
use wire::pb;
use wire::pb::mesh_client::MeshClient;

use super::board::now_unix;
use super::mirror::{Mirror, claims_addresses};
use super::own_space::{OwnSpace, own_changed};
use super::validate::validate;
use super::{Context, PeerConfig};
use crate::metrics as m;

/// Why a session with a peer ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer's TLS files could not be loaded.
    #[error("peer TLS files")]
    Tls {
        /// Why.
        source: certs::Error,
    },
    /// No endpoint answered, or not with the peer's apiserver certificate.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The ClusterInfo call failed.
    #[error("ClusterInfo: {}: {}", .status.code(), .status.message())]
    ClusterInfo {
        /// What the server said.
        status: tonic::Status,
    },
    /// The peer's ClusterInfo contradicts its certificate.
    #[error(
        "the peer says it is cluster {said} (ID {said_id}) but its certificate says {cert} (ID {cert_id})"
    )]
    IdentityMismatch {
        /// The name it says.
        said: String,
        /// The ID it says.
        said_id: u32,
        /// The cluster its certificate names.
        cert: ClusterName,
        /// The ID its certificate names.
        cert_id: ClusterId,
    },
    /// The peer's certificate contradicts its configured cluster ID.
    #[error("peer {peer} has cluster ID {cert_id}, but its configuration says {configured}")]
    ConfiguredId {
        /// The peer.
        peer: ClusterName,
        /// The ID its certificate names.
        cert_id: ClusterId,
        /// The configured ID.
        configured: ClusterId,
    },
    /// The peer has this cluster's ID.
    #[error("peer {peer} has cluster ID {id}, which is this cluster's ({own}) ID")]
    OwnId {
        /// The peer.
        peer: ClusterName,
        /// Its ID.
        id: ClusterId,
        /// This cluster.
        own: ClusterName,
    },
    /// Another connected peer has the same ID.
    #[error("peer {peer} has cluster ID {id}, which connected peer {other} already has")]
    IdTaken {
        /// The peer.
        peer: ClusterName,
        /// Its ID.
        id: ClusterId,
        /// The peer that has it.
        other: ClusterName,
    },
    /// Nothing follows this cluster's own address space.
    #[error("this cluster's own address space is not followed")]
    OwnSpaceNotFollowed,
    /// This cluster's own nodes could not be listed from local etcd in time.
    #[error("local etcd: this cluster's own nodes (its address space) could not be listed")]
    OwnSpaceUnlisted,
    /// The Watch call failed.
    #[error("Watch: {}: {}", .status.code(), .status.message())]
    Watch {
        /// What the server said.
        status: tonic::Status,
    },
    /// The peer ended the watch.
    #[error("the peer ended the watch")]
    WatchEnded,
    /// The watch stream broke.
    #[error("watch stream: {}: {}", .status.code(), .status.message())]
    Stream {
        /// What the server said.
        status: tonic::Status,
    },
    /// This cluster's own etcd refused a write or read.
    #[error("local etcd")]
    LocalEtcd {
        /// Why.
        source: kvstore::Error,
    },
}

impl Error {
    /// Whether it concerns this cluster's own etcd: the importer's memory of what it wrote may
    /// then be wrong, and is reloaded before the next attempt.
    pub(super) fn is_local(&self) -> bool {
        matches!(self, Self::LocalEtcd { .. } | Self::OwnSpaceUnlisted)
    }
}

/// What [`session`] returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn local(source: kvstore::Error) -> Error {
    Error::LocalEtcd { source }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// One connection: connect, check who answered, watch, mirror. Returns why it ended.
pub(super) async fn session(
    ctx: &Context,
    cfg: &PeerConfig,
    mirror: &mut Mirror,
    own: &mut OwnSpace,
    backoff: &mut Backoff,
) -> Result<()> {
    let Handshake {
        mut api,
        endpoint,
        cert_id,
    } = handshake(ctx, cfg).await?;
    // Addresses are judged against this cluster's own space: it is known before anything is
    // imported (one listing of local etcd).
    let own_space = own_space_now(own).await?;
    let stream = api
        .watch(pb::WatchRequest {
            kinds: Vec::new(),
            clusters: vec![cfg.name.to_string()],
            resume_revision: mirror.revision,
        })
        .await
        .map_err(|status| Error::Watch { status })?
        .into_inner();
    let connected_unix = now_unix();
    ctx.board.set_phase(&cfg.name, Phase::Syncing);
    tracing::info!(peer = %cfg.name, endpoint = %endpoint, resume = mirror.revision, "watching peer");
    let mut sync = Sync::new(
        ctx,
        cfg,
        mirror,
        backoff,
        cert_id,
        own_space,
        connected_unix,
    );
    sync.run(stream, own).await
}

/// A peer whose identity is checked.
struct Handshake {
    api: MeshClient<Channel>,
    endpoint: String,
    cert_id: ClusterId,
}

/// Connects, checks that the server's certificate, its ClusterInfo and the configuration agree
/// on the peer's name and ID, and claims the ID among connected peers.
async fn handshake(ctx: &Context, cfg: &PeerConfig) -> Result<Handshake> {
    let tls = Reloader::load(cfg.tls.clone()).map_err(|source| Error::Tls { source })?;
    let connected = client::connect(&cfg.name, &cfg.endpoints, &tls).await?;
    let mut api = connected.client;
    ctx.board.update(&cfg.name, |s| {
        s.peer_cert_not_after_unix = Some(connected.server_not_after_unix);
        s.endpoint = Some(connected.endpoint.clone());
    });
    let info = api
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .map_err(|status| Error::ClusterInfo { status })?
        .into_inner();
    let cert_id = connected.server.cluster_id;
    if info.name != cfg.name.as_str() || info.id != u32::from(cert_id.get()) {
        return Err(Error::IdentityMismatch {
            said: info.name,
            said_id: info.id,
            cert: connected.server.cluster,
            cert_id,
        });
    }
    if let Some(configured) = cfg.cluster_id
        && configured != cert_id
    {
        return Err(Error::ConfiguredId {
            peer: cfg.name.clone(),
            cert_id,
            configured,
        });
    }
    if cert_id == ctx.own_id {
        return Err(Error::OwnId {
            peer: cfg.name.clone(),
            id: cert_id,
            own: ctx.own.clone(),
        });
    }
    ctx.board
        .claim_id(&cfg.name, cert_id)
        .map_err(|other| Error::IdTaken {
            peer: cfg.name.clone(),
            id: cert_id,
            other,
        })?;
    ctx.board.update(&cfg.name, |s| {
        s.cluster_id = Some(cert_id.get());
        // Peer-chosen text reaches status and terminals: escaped and bounded.
        s.version = (!info.version.is_empty()).then(|| model::escape::bounded(&info.version, 64));
    });
    Ok(Handshake {
        api,
        endpoint: connected.endpoint,
        cert_id,
    })
}

/// This cluster's own address space, once its nodes have been listed (10 s at most).
async fn own_space_now(own: &mut OwnSpace) -> Result<Arc<AddressSpace>> {
    match tokio::time::timeout(Duration::from_secs(10), own.wait_for(Option::is_some)).await {
        Ok(Ok(space)) => Ok(space.clone().unwrap_or_default()),
        Ok(Err(_)) => Err(Error::OwnSpaceNotFollowed),
        Err(_) => Err(Error::OwnSpaceUnlisted),
    }
}

/// A snapshot being received: what it named per kind, and which kinds the peer has synced.
#[derive(Default)]
struct Resync {
    seen: HashMap<Kind, HashSet<String>>,
    complete: bool,
    pruned: HashSet<Kind>,
}

/// What a message a peer sent may make this cluster hold beyond its quota: bytes summed only
/// once a new object comes.
#[derive(Default)]
struct QuotaTally {
    held_bytes: Option<usize>,
    over: usize,
}

/// What the stream gave.
enum Next {
    /// A message to take.
    Message(pb::WatchResponse),
    /// Nothing to take now (the pending writes were flushed, the counts updated, or our own
    /// space changed).
    Nothing,
}

/// The state of one watch stream.
struct Sync<'a> {
    ctx: &'a Context,
    cfg: &'a PeerConfig,
    mirror: &'a mut Mirror,
    backoff: &'a mut Backoff,
    cert_id: ClusterId,
    own_space: Arc<AddressSpace>,
    connected_unix: i64,
    resync: Option<Resync>,
    synced: HashSet<Kind>,
    markers: HashMap<Kind, Vec<u8>>,
    ready: bool,
    last_count: Instant,
    counts_dirty: bool,
    /// Propagation is observed only for changes made after this stream was in sync: what a
    /// snapshot or a resume replays is as old as the outage, not a propagation delay.
    live_since: Option<i64>,
    /// Writes not yet in local etcd (key → value, None = delete), coalesced across the
    /// messages that are already waiting.
    pending: BTreeMap<String, Option<Vec<u8>>>,
    /// The revision they complete.
    pending_revision: i64,
}

impl<'a> Sync<'a> {
    fn new(
        ctx: &'a Context,
        cfg: &'a PeerConfig,
        mirror: &'a mut Mirror,
        backoff: &'a mut Backoff,
        cert_id: ClusterId,
        own_space: Arc<AddressSpace>,
        connected_unix: i64,
    ) -> Self {
        let pending_revision = mirror.revision;
        let mut s = Self {
            ctx,
            cfg,
            ready: mirror.revision > 0,
            mirror,
            backoff,
            cert_id,
            own_space,
            connected_unix,
            resync: None,
            synced: HashSet::new(),
            markers: HashMap::new(),
            last_count: Instant::now(),
            counts_dirty: true,
            live_since: None,
            pending: BTreeMap::new(),
            pending_revision,
        };
        if s.ready {
            s.in_sync();
        }
        // Our own space may have changed while disconnected: judge what is held against it.
        s.mirror.readmit(&s.own_space, true, &mut s.pending);
        if s.ready {
            s.mirror.report(s.ctx);
        }
        s
    }

    /// Takes messages until the stream ends or a local write fails.
    async fn run(
        &mut self,
        mut stream: Streaming<pb::WatchResponse>,
        own: &mut OwnSpace,
    ) -> Result<()> {
        loop {
            self.follow_own_space(own);
            let msg = match self.next(&mut stream, own).await? {
                Next::Message(msg) => msg,
                Next::Nothing => continue,
            };
            self.receive(&msg);
            let control = msg.reset || msg.snapshot_complete || !msg.synced.is_empty();
            if !control && self.pending.len() < 5000 {
                if self.pending.is_empty() {
                    self.mirror.revision = self.pending_revision;
                }
                continue;
            }
            self.flush().await?;
            self.settle(&msg).await?;
        }
    }

    /// This cluster's own space changed: judge every endpoint and backend again.
    fn follow_own_space(&mut self, own: &mut OwnSpace) {
        let latest = own.borrow_and_update().clone();
        if let Some(latest) = latest
            && !Arc::ptr_eq(&latest, &self.own_space)
        {
            self.own_space = latest;
            self.mirror
                .readmit(&self.own_space, true, &mut self.pending);
            if self.settled() {
                self.mirror.report(self.ctx);
            }
        }
    }

    /// Whether the stream is settled: in sync, or past the end of a snapshot.
    fn settled(&self) -> bool {
        self.resync.as_ref().map_or(self.ready, |r| r.complete)
    }

    /// The next message. Blocks only when nothing is pending; otherwise takes what is already
    /// there or flushes. Idle for a moment, it brings the status counts up to date.
    async fn next(
        &mut self,
        stream: &mut Streaming<pb::WatchResponse>,
        own: &mut OwnSpace,
    ) -> Result<Next> {
        let next = if self.pending.is_empty() && self.counts_dirty {
            let next = async {
                tokio::select! {
                    r = stream.message() => Some(r),
                    () = own_changed(own) => None,
                }
            };
            match tokio::time::timeout(Duration::from_millis(200), next).await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(Next::Nothing),
                Err(_) => {
                    self.update_counts();
                    return Ok(Next::Nothing);
                }
            }
        } else if self.pending.is_empty() {
            tokio::select! {
                r = stream.message() => r,
                () = own_changed(own) => return Ok(Next::Nothing),
            }
        } else {
            match futures::FutureExt::now_or_never(stream.message()) {
                Some(r) => r,
                None => {
                    self.flush().await?;
                    return Ok(Next::Nothing);
                }
            }
        };
        match next {
            Ok(Some(m)) => Ok(Next::Message(m)),
            Ok(None) => Err(Error::WatchEnded),
            Err(status) => Err(Error::Stream { status }),
        }
    }

    /// Takes one message into the mirror and the pending writes.
    fn receive(&mut self, msg: &pb::WatchResponse) {
        let peer = self.cfg.name.as_str();
        self.ctx.metrics.add(
            m::PEER_BYTES,
            &[peer],
            prost::Message::encoded_len(msg) as f64,
        );
        if msg.reset {
            self.resync = Some(Resync::default());
            self.synced.clear();
            self.ready = false;
            self.live_since = None;
            self.ctx.board.set_phase(&self.cfg.name, Phase::Syncing);
        }
        let now = now_micros();
        let mut nodes_changed = false;
        let mut tally = QuotaTally::default();
        for c in &msg.changes {
            nodes_changed |= self.take_change(c, now, &mut tally);
        }
        // The peer's nodes changed: its advertised space may have, and with it what fits.
        if nodes_changed {
            let space = self.mirror.peer_space();
            if space != self.mirror.space {
                self.mirror.space = space;
                self.mirror
                    .readmit(&self.own_space, false, &mut self.pending);
            }
        }
        // Refusals are reported once the stream is settled: not in the middle of a snapshot,
        // whose nodes may still be on their way.
        if msg.snapshot_complete || self.settled() {
            self.mirror.report(self.ctx);
        }
        self.pending_revision = self.pending_revision.max(msg.revision);
        self.counts_dirty |= !msg.changes.is_empty();
    }

    /// Validates one change and admits it within the quota; true when it changed a node.
    fn take_change(&mut self, c: &pb::Change, now: i64, tally: &mut QuotaTally) -> bool {
        let (ctx, cfg) = (self.ctx, self.cfg);
        let peer = cfg.name.as_str();
        let (kind, name, value) = match validate(&cfg.name, self.cert_id, c) {
            Ok(v) => v,
            Err(e) => {
                let e = telemetry::chain(&e).to_string();
                ctx.metrics.inc(m::PEER_REJECTED, &[peer]);
                tracing::warn!(peer = %cfg.name, error = %e, "object refused");
                ctx.board.error(&cfg.name, &e);
                return false;
            }
        };
        if c.origin_unix_micros > 0 && self.live_since.is_some_and(|t| c.origin_unix_micros >= t) {
            let secs = (now - c.origin_unix_micros).max(0) as f64 / 1e6;
            ctx.metrics
                .observe(m::PEER_PROPAGATION_SECONDS, &[peer], secs);
        }
        let key = keys::object_key(Scope::Cache, &cfg.name, kind, &name);
        let mirror = &mut *self.mirror;
        match value {
            Some(v) => {
                if !mirror.held.contains_key(&(kind, name.clone())) {
                    let objects = mirror.held.len();
                    let bytes = *tally
                        .held_bytes
                        .get_or_insert_with(|| mirror.held.values().map(Vec::len).sum());
                    if objects >= ctx.quota.max_objects || bytes + v.len() > ctx.quota.max_bytes {
                        tally.over += 1;
                        if tally.over == 1 {
                            let e = format!(
                                "peer {peer} is over its quota ({objects} objects, {bytes} bytes held; limits {} objects, {} bytes): new objects refused, starting with {kind} {name:?}",
                                ctx.quota.max_objects, ctx.quota.max_bytes
                            );
                            tracing::warn!(peer = %cfg.name, error = %e, "object refused");
                            ctx.board.error(&cfg.name, &e);
                        }
                        ctx.metrics.inc(m::PEER_REJECTED, &[peer]);
                        return false;
                    }
                    tally.held_bytes = Some(bytes + v.len());
                }
                if let Some(r) = self.resync.as_mut() {
                    r.seen.entry(kind).or_default().insert(name.clone());
                }
                if claims_addresses(kind) {
                    mirror.admit(kind, name, v, true, &self.own_space, &mut self.pending);
                } else if mirror.held.get(&(kind, name.clone())) != Some(&v) {
                    self.pending.insert(key, Some(v.clone()));
                    mirror.held.insert((kind, name), v);
                    return kind == Kind::Nodes;
                }
                false
            }
            None => {
                if let Some(r) = self.resync.as_mut()
                    && let Some(seen) = r.seen.get_mut(&kind)
                {
                    seen.remove(&name);
                }
                mirror.withheld.remove(&(kind, name.clone()));
                if mirror.held.remove(&(kind, name)).is_some() {
                    self.pending.insert(key, None);
                    return kind == Kind::Nodes;
                }
                false
            }
        }
    }

    /// After a control message (reset, end of snapshot, synced markers) or a large batch, with
    /// the pending writes flushed: records the markers, prunes, mirrors the markers, becomes
    /// ready, updates the status.
    async fn settle(&mut self, msg: &pb::WatchResponse) -> Result<()> {
        for s in &msg.synced {
            if s.cluster != self.cfg.name.as_str() {
                continue;
            }
            if let Ok(kind) = s.kind.parse::<Kind>() {
                self.synced.insert(kind);
                self.markers.insert(kind, prost::Message::encode_to_vec(s));
            }
        }
        if msg.snapshot_complete
            && let Some(r) = self.resync.as_mut()
        {
            r.complete = true;
        }
        self.prune().await?;
        self.write_markers().await?;
        if self
            .resync
            .as_ref()
            .is_some_and(|r| Kind::ALL.iter().all(|k| r.pruned.contains(k)))
        {
            self.resync = None;
        }
        if !self.ready && self.resync.is_none() {
            self.in_sync();
            tracing::info!(peer = %self.cfg.name, objects = self.mirror.held.len(), "peer in sync");
            self.last_count = Instant::now() - Duration::from_secs(2);
        }
        if self.last_count.elapsed() >= Duration::from_secs(1) {
            self.update_counts();
        }
        let revision = self.mirror.revision;
        self.ctx
            .board
            .update(&self.cfg.name, |s| s.revision = revision);
        Ok(())
    }

    /// Prunes what a completed snapshot did not name, per kind, once the peer synced it.
    async fn prune(&mut self) -> Result<()> {
        let Some(r) = self.resync.as_mut() else {
            return Ok(());
        };
        if !r.complete {
            return Ok(());
        }
        let cfg = self.cfg;
        for kind in Kind::ALL {
            if !self.synced.contains(&kind) || r.pruned.contains(&kind) {
                continue;
            }
            r.pruned.insert(kind);
            let seen = r.seen.remove(&kind).unwrap_or_default();
            self.mirror
                .withheld
                .retain(|(k, n), _| *k != kind || seen.contains(n));
            let stale: Vec<(Kind, String)> = self
                .mirror
                .held
                .keys()
                .filter(|(k, n)| *k == kind && !seen.contains(n))
                .cloned()
                .collect();
            if stale.is_empty() {
                continue;
            }
            let keys: Vec<String> = stale
                .iter()
                .map(|(k, n)| keys::object_key(Scope::Cache, &cfg.name, *k, n))
                .collect();
            self.ctx.kv.delete_many(&keys).await.map_err(local)?;
            for s in stale {
                self.mirror.held.remove(&s);
            }
            if kind == Kind::Nodes {
                // Admits less from now on; withdraws nothing admitted (see `readmit`).
                self.mirror.space = self.mirror.peer_space();
            }
            tracing::info!(peer = %cfg.name, %kind, removed = keys.len(), "removed what the peer no longer has");
        }
        Ok(())
    }

    /// Mirrors the peer's synced markers once its state of that kind is in place.
    async fn write_markers(&mut self) -> Result<()> {
        for kind in self.synced.clone() {
            let pruned = self
                .resync
                .as_ref()
                .is_none_or(|r| r.pruned.contains(&kind));
            if pruned && let Some(v) = self.markers.remove(&kind) {
                self.ctx
                    .kv
                    .put_raw(&keys::synced(Scope::Cache, &self.cfg.name, kind), v)
                    .await
                    .map_err(local)?;
            }
        }
        Ok(())
    }

    /// In sync with the peer: the backoff resets, propagation is observed from now on, and an
    /// error from before this connection no longer applies.
    fn in_sync(&mut self) {
        self.ready = true;
        self.backoff.healthy();
        self.live_since = Some(now_micros());
        self.ctx.board.set_phase(&self.cfg.name, Phase::Ready);
        self.ctx
            .board
            .clear_error_before(&self.cfg.name, self.connected_unix);
    }

    /// Brings the status counts up to date.
    fn update_counts(&mut self) {
        self.counts_dirty = false;
        self.last_count = Instant::now();
        let (counts, refused) = (self.mirror.counts(), self.mirror.refused());
        self.ctx.board.update(&self.cfg.name, |s| {
            s.objects = counts;
            s.refused_objects = refused;
        });
    }

    /// Writes what is pending into local etcd; the mirror has then caught up with the
    /// revision those writes complete.
    async fn flush(&mut self) -> Result<()> {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (k, v) in std::mem::take(&mut self.pending) {
            match v {
                Some(v) => puts.push((k, v)),
                None => deletes.push(k),
            }
        }
        if !puts.is_empty() {
            self.ctx.kv.put_many(&puts, 0).await.map_err(local)?;
        }
        if !deletes.is_empty() {
            self.ctx.kv.delete_many(&deletes).await.map_err(local)?;
        }
        self.mirror.revision = self.pending_revision;
        Ok(())
    }
}
