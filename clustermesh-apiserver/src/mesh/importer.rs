//! The importer: one task per configured peer, mirroring what the peer exports into this
//! cluster's etcd under `cache/<peer>/`.
//!
//! Peers are directories under the peers directory, one per peer, named after the peer
//! cluster and holding `endpoints` (one `host:port` per line), `ca.crt` (the peer's CA),
//! `tls.crt` and `tls.key` (this cluster's client certificate issued by the peer's CA), and
//! optionally `cluster-id`. The directory is watched: a new peer is connected, a removed one is
//! disconnected and drained, a changed one is reconnected (its cache is kept).
//!
//! Every received object is validated (its cluster is the peer; its name and kind make a key
//! inside the peer's prefix; it decodes and its content names the same cluster and name)
//! before it is written. On disconnect the last state stays, marked stale. On reconnect the
//! importer resumes from its revision, or takes a snapshot and deletes only what the peer no
//! longer has, and only once the peer's synced marker for that kind has arrived.
//!
//! # Identities and addresses a peer may claim
//!
//! Reserved identities (cluster ID 0: `host`, `world`, ...) mean the same in every cluster and
//! are never imported: neither an identity of that space nor an endpoint that carries one.
//!
//! A peer's *advertised address space* is its imported nodes' addresses and pod CIDRs, as this
//! cluster holds them; this cluster's own space is its own exported nodes (`state/<own>/nodes/`,
//! followed by one watch and known before any peer is imported). An endpoint is held only if
//! its IP lies inside the peer's space and outside ours; so is each backend of a service: a
//! service with foreign backends is held **without those backends** (the rest of the service
//! stays usable, and an address never reaches the cache where it does not belong). An unshared
//! service with backends stays refused as a whole (ADR 0012).
//!
//! An endpoint or backend that does not fit is held back (with the value the peer sent) and
//! judged again whenever the peer's nodes or our own change: it lands once a node of the peer
//! covers it. Whatever our own space grows over is withdrawn; the peer's space shrinking
//! withdraws nothing already admitted (a node goes before its pods do, and the peer deletes
//! those itself). So a legitimate peer is never refused for the order it sends things in: a
//! snapshot comes in key order (endpoints before nodes) and may span several messages, and a
//! live endpoint may precede its new node. A refusal is reported (logged once with the peer and
//! the object, counted in `clustermesh_peer_rejected_objects_total`, shown as the peer's
//! `last_error`) only once the stream is settled, never in the middle of a snapshot; a held-back
//! object that later fits is admitted without further ado. Each refusal concerns its object
//! alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{Reloader, TlsFiles};
use kvstore::watch::{Event as KvEvent, Watcher};
use model::keys::{self, Kind, Scope};
use model::node::AddressSpace;
use model::{ClusterId, ClusterName};
use telemetry::backoff::Backoff;
use telemetry::metrics::Registry;
use tokio::sync::watch;
use wire::{Codec, pb};

use super::client;
use crate::metrics as m;

/// One peer's configuration, read from its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer cluster.
    pub name: ClusterName,
    /// Its expected ID, when configured.
    pub cluster_id: Option<ClusterId>,
    /// `host:port` of its Mesh API.
    pub endpoints: Vec<String>,
    /// TLS files.
    pub tls: TlsFiles,
    /// The files' contents, to notice changes.
    fingerprint: Vec<u8>,
}

impl PeerConfig {
    /// Reads `dir` (named after the peer).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{}: not a peer directory", dir.display()))?;
        let name = ClusterName::new(name).map_err(|e| format!("{}: {e}", dir.display()))?;
        let read = |f: &str| {
            std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()))
        };
        let endpoints_raw = read("endpoints")?;
        let endpoints: Vec<String> = String::from_utf8_lossy(&endpoints_raw)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(format!("{}: no endpoints", dir.join("endpoints").display()));
        }
        let cluster_id = match std::fs::read_to_string(dir.join("cluster-id")) {
            Ok(s) => Some(
                s.trim()
                    .parse::<ClusterId>()
                    .map_err(|e| format!("{}: {e}", dir.join("cluster-id").display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("{}: {e}", dir.join("cluster-id").display())),
        };
        let tls = TlsFiles::in_dir(dir);
        let mut fingerprint = endpoints_raw;
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            fingerprint.extend(read(f)?);
        }
        if let Some(id) = cluster_id {
            fingerprint.extend(id.to_string().into_bytes());
        }
        Ok(Self {
            name,
            cluster_id,
            endpoints,
            tls,
            fingerprint,
        })
    }
}

pub use model::status::{PeerStatus, Phase};

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// A peer's status before anything happened.
fn new_status(peer: &ClusterName) -> PeerStatus {
    PeerStatus {
        name: peer.to_string(),
        cluster_id: None,
        phase: Phase::Connecting,
        since_unix: now_unix(),
        last_error: None,
        last_error_unix: None,
        objects: BTreeMap::new(),
        revision: 0,
        peer_cert_not_after_unix: None,
        endpoint: None,
        refused_objects: 0,
        version: None,
    }
}

/// The status of every peer, shared with `/status`, and its phase as the
/// `clustermesh_peer_ready` gauge (1 while `Ready`, 0 otherwise, gone with the peer).
#[derive(Debug, Default)]
pub struct Board {
    peers: Mutex<BTreeMap<String, PeerStatus>>,
    /// Connected peers' IDs, to refuse a collision.
    ids: Mutex<HashMap<ClusterId, ClusterName>>,
    /// Where the readiness gauge goes.
    metrics: Registry,
}

impl Board {
    /// A board that keeps `clustermesh_peer_ready` in `metrics`.
    pub fn new(metrics: Registry) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    fn update(&self, peer: &ClusterName, f: impl FnOnce(&mut PeerStatus)) {
        let mut g = match self.peers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let metrics = &self.metrics;
        let s = g.entry(peer.to_string()).or_insert_with(|| {
            metrics.set(m::PEER_READY, &[peer.as_str()], 0.0);
            new_status(peer)
        });
        f(s);
    }

    fn set_phase(&self, peer: &ClusterName, phase: Phase) {
        self.update(peer, |s| {
            if s.phase != phase {
                s.phase = phase;
                s.since_unix = now_unix();
            }
        });
        let ready = if phase == Phase::Ready { 1.0 } else { 0.0 };
        self.metrics.set(m::PEER_READY, &[peer.as_str()], ready);
    }

    /// Clears the last error if it happened before `unix` (it no longer applies).
    fn clear_error_before(&self, peer: &ClusterName, unix: i64) {
        self.update(peer, |s| {
            if s.last_error_unix.is_some_and(|t| t < unix) {
                s.last_error = None;
                s.last_error_unix = None;
            }
        });
    }

    fn error(&self, peer: &ClusterName, e: &str) {
        self.update(peer, |s| {
            // Peer-chosen text reaches status and terminals: escaped and bounded.
            s.last_error = Some(model::escape::bounded(e, model::escape::MAX_TEXT));
            s.last_error_unix = Some(now_unix());
        });
    }

    fn remove(&self, peer: &ClusterName) {
        if let Ok(mut g) = self.peers.lock() {
            g.remove(peer.as_str());
        }
        self.metrics.remove(m::PEER_READY, &[peer.as_str()]);
        self.release_id(peer);
    }

    fn claim_id(&self, peer: &ClusterName, id: ClusterId) -> Result<(), String> {
        let mut g = match self.ids.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.get(&id) {
            Some(other) if other != peer => Err(format!(
                "peer {peer} has cluster ID {id}, which connected peer {other} already has"
            )),
            _ => {
                g.retain(|_, n| n != peer);
                g.insert(id, peer.clone());
                Ok(())
            }
        }
    }

    fn release_id(&self, peer: &ClusterName) {
        if let Ok(mut g) = self.ids.lock() {
            g.retain(|_, n| n != peer);
        }
    }

    /// Every peer's status.
    pub fn snapshot(&self) -> Vec<PeerStatus> {
        match self.peers.lock() {
            Ok(g) => g.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        }
    }

    /// One peer's status.
    pub fn get(&self, peer: &str) -> Option<PeerStatus> {
        self.peers.lock().ok()?.get(peer).cloned()
    }
}

/// What every peer task shares.
#[derive(Debug, Clone)]
pub struct Context {
    /// Local etcd.
    pub kv: kvstore::Client,
    /// This cluster.
    pub own: ClusterName,
    /// Its ID.
    pub own_id: ClusterId,
    /// Status.
    pub board: Arc<Board>,
    /// Metrics.
    pub metrics: Registry,
    /// Wakes the directory scan before its next period (the peer Secret follower rings it
    /// after writing the directory).
    pub rescan_now: Arc<tokio::sync::Notify>,
    /// What one peer may make this cluster hold.
    pub quota: Quota,
}

/// Largest value one imported object may have: well under etcd's request limit (1.5 MiB), so
/// that an object between the two limits is refused alone instead of failing the local write
/// and putting the peer into a reconnect loop.
pub const MAX_OBJECT_BYTES: usize = 512 * 1024;

/// Per-peer limits (`--peer-max-objects`, `--peer-max-bytes`). Past them, new objects of the
/// peer are refused (named in its status, counted); what is held stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Objects held of one peer, all kinds together.
    pub max_objects: usize,
    /// Bytes of values held of one peer.
    pub max_bytes: usize,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_objects: 500_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// One scan of the peers directory.
#[derive(Debug, Default)]
struct Scan {
    /// Peers whose configuration loaded.
    found: HashMap<String, PeerConfig>,
    /// Every peer directory present, loadable or not.
    present: HashSet<String>,
    /// Problems, by path: a directory that could not be read or is invalid.
    problems: HashMap<PathBuf, String>,
    /// Whether the listing itself was complete. Only a complete listing can confirm that a
    /// peer's directory is gone.
    complete: bool,
}

fn scan(dir: &Path, own: &ClusterName) -> Scan {
    let mut out = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            out.problems
                .insert(dir.to_owned(), format!("list {}: {e}", dir.display()));
            return out;
        }
    };
    out.complete = true;
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                out.complete = false;
                out.problems
                    .insert(dir.to_owned(), format!("list {}: {err}", dir.display()));
                continue;
            }
        };
        let path = e.path();
        // Kubernetes Secret mounts hold `..data` links; only real peer directories count.
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => {
                // Cannot tell: count it as present so that its peer is not drained.
                out.present.insert(name);
                out.problems
                    .insert(path.clone(), format!("stat {}: {err}", path.display()));
                continue;
            }
        }
        out.present.insert(name.clone());
        match PeerConfig::load(&path) {
            Ok(cfg) if cfg.name == *own => {
                tracing::warn!(peer = %cfg.name, "ignoring a peer configuration for this cluster itself");
            }
            Ok(cfg) => {
                out.found.insert(name, cfg);
            }
            Err(e) => {
                out.problems.insert(path, e);
            }
        }
    }
    out
}

/// Watches `dir` and runs one task per peer until dropped.
///
/// Only a confirmed removal drains a peer: its directory absent from a complete listing. A
/// directory that cannot be listed or read (file descriptors exhausted, an I/O error) or whose
/// new contents are invalid keeps the peer running on its last good configuration, and the
/// problem is logged once and counted.
pub async fn run(ctx: Context, dir: PathBuf, rescan: Duration) {
    let (own_tx, own_space) = watch::channel(None);
    let _own = AbortOnDrop(tokio::spawn(follow_own_space(ctx.clone(), own_tx)));
    let mut tasks: HashMap<String, (PeerConfig, AbortOnDrop)> = HashMap::new();
    let mut reported: HashMap<PathBuf, String> = HashMap::new();
    loop {
        let Scan {
            found,
            present,
            problems,
            complete,
        } = scan(&dir, &ctx.own);
        reported.retain(|path, _| problems.contains_key(path));
        for (path, e) in problems {
            if reported.get(&path) != Some(&e) {
                tracing::warn!(path = %path.display(), error = %e, "cannot use a peer configuration; peers keep their last good configuration");
                ctx.metrics.inc(m::ERRORS, &["peer-config"]);
                reported.insert(path, e);
            }
        }
        // Removed peers (confirmed by a complete listing): disconnect and drain.
        let gone: Vec<String> = if complete {
            tasks
                .keys()
                .filter(|k| !present.contains(*k))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for name in gone {
            if let Some((cfg, task)) = tasks.remove(&name) {
                drop(task);
                tracing::info!(peer = %cfg.name, "peer configuration removed; draining its state");
                let prefix = keys::cluster_prefix(Scope::Cache, &cfg.name);
                if let Err(e) = ctx.kv.delete_prefix(&prefix).await {
                    tracing::warn!(peer = %cfg.name, error = %telemetry::chain(&e), "could not drain the peer's state");
                }
                ctx.board.remove(&cfg.name);
            }
        }
        // New or changed peers: (re)connect.
        for (name, cfg) in found {
            if tasks.get(&name).is_some_and(|(old, _)| *old == cfg) {
                continue;
            }
            if tasks.remove(&name).is_some() {
                tracing::info!(peer = %name, "peer configuration changed; reconnecting");
            } else {
                tracing::info!(peer = %name, endpoints = ?cfg.endpoints, "peer added; connecting");
            }
            let task = tokio::spawn(run_peer(ctx.clone(), cfg.clone(), own_space.clone()));
            tasks.insert(name, (cfg, AbortOnDrop(task)));
        }
        tokio::select! {
            () = tokio::time::sleep(rescan) => {}
            () = ctx.rescan_now.notified() => {}
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This cluster's own address space, as [`follow_own_space`] publishes it: `None` until its
/// nodes have been listed.
type OwnSpace = watch::Receiver<Option<Arc<AddressSpace>>>;

/// Follows this cluster's own exported nodes (`state/<own>/nodes/`, one watch for every peer)
/// and publishes their address space whenever it changes.
async fn follow_own_space(ctx: Context, tx: watch::Sender<Option<Arc<AddressSpace>>>) {
    let prefix = keys::kind_prefix(Scope::State, &ctx.own, Kind::Nodes);
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    loop {
        let mut watcher = Watcher::new(&ctx.kv, prefix.clone());
        let mut nodes: BTreeMap<String, model::Node> = BTreeMap::new();
        let mut listed = false;
        loop {
            let event = match watcher.next().await {
                Ok(event) => event,
                Err(e) => {
                    // Only the first listing fails; later faults are retried inside the watcher.
                    tracing::warn!(error = %telemetry::chain(&e), "cannot list this cluster's own nodes; peers wait");
                    ctx.metrics.inc(m::ERRORS, &["etcd"]);
                    break;
                }
            };
            let name = |key: &str| key.strip_prefix(&prefix).unwrap_or(key).to_owned();
            match event {
                KvEvent::Init => nodes.clear(),
                KvEvent::InitApply(kv) | KvEvent::Apply(kv) => {
                    match model::Node::decode(&kv.value) {
                        Ok(node) => {
                            nodes.insert(name(&kv.key), node);
                        }
                        Err(e) => {
                            tracing::warn!(key = %kv.key, error = %telemetry::chain(&e), "an own node does not decode; its addresses are not known as this cluster's");
                            nodes.remove(&name(&kv.key));
                        }
                    }
                }
                KvEvent::InitDone { .. } => {
                    listed = true;
                    backoff.healthy();
                }
                KvEvent::Delete { key, .. } => {
                    nodes.remove(&name(&key));
                }
            }
            if listed {
                let space = AddressSpace::of(nodes.values());
                tx.send_if_modified(|held| {
                    let changed = held.as_deref() != Some(&space);
                    if changed {
                        *held = Some(Arc::new(space));
                    }
                    changed
                });
            }
        }
        backoff.wait().await;
    }
}

/// Resolves when `own` changes; never if its sender is gone.
async fn own_changed(own: &mut OwnSpace) {
    if own.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// An endpoint or service held back, wholly or in part, for its addresses.
#[derive(Debug)]
struct Withheld {
    /// The value as the peer sent it, judged again when an address space changes.
    sent: Vec<u8>,
    /// Why, one entry per refused address.
    refused: Vec<String>,
    /// The entries of `refused` already logged, counted and shown.
    reported: BTreeSet<String>,
}

/// What this cluster holds of one peer.
struct Mirror {
    /// The peer.
    peer: ClusterName,
    /// (kind, name) → value, as written under `cache/<peer>/`.
    held: BTreeMap<(Kind, String), Vec<u8>>,
    /// The peer revision caught up with (0: none; the next watch takes a snapshot).
    revision: i64,
    /// The peer's advertised address space: its nodes in `held`.
    space: AddressSpace,
    /// Endpoints and services held back for their addresses, by (kind, name).
    withheld: BTreeMap<(Kind, String), Withheld>,
    /// Some refusal in `withheld` is not reported yet.
    unreported: bool,
}

async fn load_mirror(ctx: &Context, peer: &ClusterName) -> Mirror {
    let mut held = BTreeMap::new();
    for kind in Kind::ALL {
        let prefix = keys::kind_prefix(Scope::Cache, peer, kind);
        if let Ok((kvs, _)) = ctx.kv.list_raw(&prefix).await {
            for kv in kvs {
                held.insert((kind, kv.key[prefix.len()..].to_owned()), kv.value);
            }
        }
    }
    let mut mirror = Mirror {
        peer: peer.clone(),
        held,
        revision: 0,
        space: AddressSpace::default(),
        withheld: BTreeMap::new(),
        unreported: false,
    };
    mirror.space = mirror.peer_space();
    mirror
}

/// Whether objects of `kind` carry addresses judged against the address spaces.
fn claims_addresses(kind: Kind) -> bool {
    matches!(kind, Kind::Endpoints | Kind::Services)
}

/// What may be held of an endpoint or service a peer sent.
#[derive(Debug, PartialEq, Eq)]
struct Admission {
    /// The value to hold (`sent`, or a service without its refused backends); `None`: nothing.
    hold: Option<Vec<u8>>,
    /// One entry per refused address.
    refused: Vec<String>,
}

/// Judges the addresses of `sent` (an endpoint or a service that already passed [`validate`]):
/// each must lie outside this cluster's `own` space and, unless `space` is `None` (an object
/// admitted before, judged again because our own space changed), inside the peer's `space`.
fn admission(
    peer: &ClusterName,
    kind: Kind,
    name: &str,
    sent: &[u8],
    space: Option<&AddressSpace>,
    own: &AddressSpace,
) -> Admission {
    let misplaced = |ip: std::net::IpAddr| {
        if own.contains(ip) {
            Some("inside this cluster's own address space")
        } else if space.is_some_and(|s| !s.contains(ip)) {
            Some("outside the peer's advertised address space")
        } else {
            None
        }
    };
    const SPACE: &str = "(nodes' addresses and pod CIDRs)";
    match kind {
        Kind::Endpoints => match model::Endpoint::decode(sent) {
            Ok(e) => match misplaced(e.ip) {
                None => Admission {
                    hold: Some(sent.to_vec()),
                    refused: Vec::new(),
                },
                Some(why) => Admission {
                    hold: None,
                    refused: vec![format!(
                        "peer {peer} sent endpoint {}, which lies {why} {SPACE}: refused",
                        e.ip
                    )],
                },
            },
            Err(e) => Admission {
                hold: None,
                refused: vec![format!(
                    "peer {peer} sent an invalid endpoint {name:?}: {}",
                    telemetry::chain(&e)
                )],
            },
        },
        Kind::Services => match model::GlobalService::decode(sent) {
            Ok(mut svc) => {
                let mut refused = Vec::new();
                svc.backends.retain(|b| match misplaced(b.ip) {
                    None => true,
                    Some(why) => {
                        refused.push(format!(
                            "peer {peer} sent service {name} with backend {}, which lies {why} {SPACE}: backend refused",
                            b.ip
                        ));
                        false
                    }
                });
                let hold = if refused.is_empty() {
                    sent.to_vec()
                } else {
                    svc.encode()
                };
                Admission {
                    hold: Some(hold),
                    refused,
                }
            }
            Err(e) => Admission {
                hold: None,
                refused: vec![format!(
                    "peer {peer} sent an invalid service {name:?}: {}",
                    telemetry::chain(&e)
                )],
            },
        },
        Kind::Identities | Kind::Nodes => Admission {
            hold: Some(sent.to_vec()),
            refused: Vec::new(),
        },
    }
}

impl Mirror {
    /// The peer's advertised address space, from the nodes held.
    fn peer_space(&self) -> AddressSpace {
        let nodes: Vec<model::Node> = self
            .held
            .range((Kind::Nodes, String::new())..)
            .take_while(|((k, _), _)| *k == Kind::Nodes)
            .filter_map(|(_, v)| model::Node::decode(v).ok())
            .collect();
        AddressSpace::of(&nodes)
    }

    /// Holds what [`admission`] allows of `sent` (against the peer's space too when
    /// `arrived`), queueing the writes in `pending`, and keeps what it refuses to judge again.
    fn admit(
        &mut self,
        kind: Kind,
        name: String,
        sent: Vec<u8>,
        arrived: bool,
        own: &AddressSpace,
        pending: &mut BTreeMap<String, Option<Vec<u8>>>,
    ) {
        let space = arrived.then_some(&self.space);
        let a = admission(&self.peer, kind, &name, &sent, space, own);
        let key = keys::object_key(Scope::Cache, &self.peer, kind, &name);
        let k = (kind, name);
        match a.hold {
            Some(v) => {
                if self.held.get(&k) != Some(&v) {
                    pending.insert(key, Some(v.clone()));
                    self.held.insert(k.clone(), v);
                }
            }
            None => {
                if self.held.remove(&k).is_some() {
                    pending.insert(key, None);
                }
            }
        }
        if a.refused.is_empty() {
            self.withheld.remove(&k);
            return;
        }
        let w = self.withheld.entry(k).or_insert_with(|| Withheld {
            sent: Vec::new(),
            refused: Vec::new(),
            reported: BTreeSet::new(),
        });
        w.sent = sent;
        w.reported.retain(|r| a.refused.contains(r));
        self.unreported |= a.refused.iter().any(|r| !w.reported.contains(r));
        w.refused = a.refused;
    }

    /// Judges again what is held back, as if it arrived now (the peer's space changed); with
    /// `held_too` (our own space changed), also every endpoint and service held, against our
    /// own space only: the peer's space shrinking (a node going, its pods not yet) withdraws
    /// nothing that was admitted.
    fn readmit(
        &mut self,
        own: &AddressSpace,
        held_too: bool,
        pending: &mut BTreeMap<String, Option<Vec<u8>>>,
    ) {
        // A held-back object's value is the one the peer sent, not the part that is held.
        let mut judge: BTreeMap<(Kind, String), (Vec<u8>, bool)> = self
            .withheld
            .iter()
            .map(|(k, w)| (k.clone(), (w.sent.clone(), true)))
            .collect();
        if held_too {
            for kind in [Kind::Endpoints, Kind::Services] {
                for (k, v) in self
                    .held
                    .range((kind, String::new())..)
                    .take_while(|((k, _), _)| *k == kind)
                {
                    judge.entry(k.clone()).or_insert_with(|| (v.clone(), false));
                }
            }
        }
        for ((kind, name), (sent, arrived)) in judge {
            self.admit(kind, name, sent, arrived, own, pending);
        }
    }

    /// Logs, counts and shows every refusal not reported yet, once each.
    fn report(&mut self, ctx: &Context) {
        if !std::mem::take(&mut self.unreported) {
            return;
        }
        for ((kind, name), w) in &mut self.withheld {
            for r in &w.refused {
                if w.reported.insert(r.clone()) {
                    ctx.metrics.inc(m::PEER_REJECTED, &[self.peer.as_str()]);
                    tracing::warn!(peer = %self.peer, object = %format_args!("{kind}/{name}"), error = %r, "object refused");
                    ctx.board.error(&self.peer, r);
                }
            }
        }
    }
}

impl Mirror {
    /// Objects of the peer refused at the moment.
    fn refused(&self) -> usize {
        self.withheld
            .values()
            .filter(|w| !w.refused.is_empty())
            .count()
    }

    /// Objects held per kind.
    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            Kind::ALL.iter().map(|k| (k.to_string(), 0)).collect();
        for kind in Kind::ALL {
            let n = self
                .held
                .range((kind, String::new())..)
                .take_while(|((k, _), _)| *k == kind)
                .count();
            counts.insert(kind.to_string(), n);
        }
        counts
    }
}

async fn run_peer(ctx: Context, cfg: PeerConfig, mut own: OwnSpace) {
    let mut mirror = load_mirror(&ctx, &cfg.name).await;
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(1),
        Duration::from_secs(10),
    );
    ctx.board.update(&cfg.name, |s| {
        for kind in Kind::ALL {
            s.objects.insert(
                kind.to_string(),
                mirror.held.keys().filter(|(k, _)| *k == kind).count(),
            );
        }
    });
    loop {
        let had_state = !mirror.held.is_empty();
        if !had_state {
            ctx.board.set_phase(&cfg.name, Phase::Connecting);
        }
        let result = session(&ctx, &cfg, &mut mirror, &mut own, &mut backoff).await;
        ctx.board.release_id(&cfg.name);
        if let Err(e) = &result
            && e.starts_with(LOCAL_ETCD)
        {
            // What was meant to be written may not be: start over from what etcd holds.
            mirror = load_mirror(&ctx, &cfg.name).await;
        }
        let e = match result {
            Ok(()) => "the peer closed the stream".to_owned(),
            Err(e) => e,
        };
        ctx.metrics.inc(m::PEER_RECONNECTS, &[cfg.name.as_str()]);
        let e = model::escape::bounded(&e, model::escape::MAX_TEXT);
        tracing::warn!(peer = %cfg.name, error = %e, "peer connection lost");
        ctx.board.error(&cfg.name, &e);
        if !mirror.held.is_empty() {
            ctx.board.set_phase(&cfg.name, Phase::Stale);
        } else {
            ctx.board.set_phase(&cfg.name, Phase::Connecting);
        }
        // The workspace's resetting backoff: a peer that was in sync for a while is retried
        // from the minimum again, so the tenth outage heals as fast as the first.
        backoff.wait().await;
    }
}

/// A snapshot being received: what it named per kind, and which kinds the peer has synced.
#[derive(Default)]
struct Resync {
    seen: HashMap<Kind, HashSet<String>>,
    complete: bool,
    pruned: HashSet<Kind>,
}

fn validate(
    peer: &ClusterName,
    peer_id: ClusterId,
    c: &pb::Change,
) -> Result<(Kind, String, Option<Vec<u8>>), String> {
    if c.cluster != peer.as_str() {
        return Err(format!(
            "peer {peer} sent a {} object {:?} of cluster {:?}: refused",
            c.kind, c.name, c.cluster
        ));
    }
    if c.value.len() > MAX_OBJECT_BYTES {
        return Err(format!(
            "peer {peer} sent {} {:?} of {} bytes, over the {MAX_OBJECT_BYTES}-byte limit of one object: refused",
            c.kind,
            c.name,
            c.value.len()
        ));
    }
    let kind: Kind = c
        .kind
        .parse()
        .map_err(|_| format!("peer {peer} sent an object of unknown kind {:?}", c.kind))?;
    let key = keys::object_key(Scope::Cache, peer, kind, &c.name);
    match keys::parse(&key) {
        Ok(keys::Parsed::Object {
            cluster,
            kind: k,
            name,
            ..
        }) if cluster == *peer && k == kind && name == c.name => {}
        _ => {
            return Err(format!(
                "peer {peer} sent an object with an invalid name {:?}",
                c.name
            ));
        }
    }
    if c.op == pb::change::Op::Delete as i32 {
        return Ok((kind, c.name.clone(), None));
    }
    let check = |owner: &ClusterName, name: String| -> Result<(), String> {
        if owner != peer || name != c.name {
            return Err(format!(
                "peer {peer} sent {kind} {:?} whose content names cluster {owner} and name {name:?}: refused",
                c.name
            ));
        }
        Ok(())
    };
    let bad = |e: wire::Error| {
        format!(
            "peer {peer} sent an invalid {kind} {:?}: {}",
            c.name,
            telemetry::chain(&e)
        )
    };
    match kind {
        Kind::Services => {
            let o = model::GlobalService::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
            o.validate_from_peer()
                .map_err(|e| format!("peer {peer} sent an invalid {kind} {:?}: {e}", c.name))?;
        }
        Kind::Endpoints => {
            let o = model::Endpoint::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
            if o.identity.is_reserved() {
                return Err(format!(
                    "peer {peer} sent endpoint {} with reserved identity {}{}: reserved identities are never imported",
                    o.ip,
                    o.identity,
                    reserved_name(o.identity)
                ));
            }
            if o.identity.cluster() != Some(peer_id) {
                return Err(format!(
                    "peer {peer} (ID {peer_id}) sent endpoint {} with identity {} from another cluster's range: refused",
                    o.ip, o.identity
                ));
            }
        }
        Kind::Identities => {
            let o = model::Identity::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
            if o.id.is_reserved() {
                return Err(format!(
                    "peer {peer} sent identity {}{} of the reserved space: reserved identities are never imported",
                    o.id,
                    reserved_name(o.id)
                ));
            }
            if o.id.cluster() != Some(peer_id) {
                return Err(format!(
                    "peer {peer} (ID {peer_id}) sent identity {} from another cluster's range: refused",
                    o.id
                ));
            }
        }
        Kind::Nodes => {
            let o = model::Node::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
        }
    }
    Ok((kind, c.name.clone(), Some(c.value.clone())))
}

/// ` (host)` for a named reserved identity, nothing otherwise.
fn reserved_name(id: model::NumericIdentity) -> String {
    id.reserved_name()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

/// One connection: connect, check who answered, watch, mirror. Returns why it ended.
async fn session(
    ctx: &Context,
    cfg: &PeerConfig,
    mirror: &mut Mirror,
    own: &mut OwnSpace,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let tls = Reloader::load(cfg.tls.clone())
        .map_err(|e| format!("peer TLS files: {}", telemetry::chain(&e)))?;
    let connected = client::connect(&cfg.name, &cfg.endpoints, &tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut api = connected.client;
    ctx.board.update(&cfg.name, |s| {
        s.peer_cert_not_after_unix = Some(connected.server_not_after_unix);
        s.endpoint = Some(connected.endpoint.clone());
    });
    let info = api
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .map_err(|e| format!("ClusterInfo: {}: {}", e.code(), e.message()))?
        .into_inner();
    let cert_id = connected.server.cluster_id;
    if info.name != cfg.name.as_str() || info.id != u32::from(cert_id.get()) {
        return Err(format!(
            "the peer says it is cluster {} (ID {}) but its certificate says {} (ID {cert_id})",
            info.name, info.id, connected.server.cluster
        ));
    }
    if let Some(want) = cfg.cluster_id
        && want != cert_id
    {
        return Err(format!(
            "peer {} has cluster ID {cert_id}, but its configuration says {want}",
            cfg.name
        ));
    }
    if cert_id == ctx.own_id {
        return Err(format!(
            "peer {} has cluster ID {cert_id}, which is this cluster's ({}) ID",
            cfg.name, ctx.own
        ));
    }
    ctx.board.claim_id(&cfg.name, cert_id)?;
    ctx.board.update(&cfg.name, |s| {
        s.cluster_id = Some(cert_id.get());
        // Peer-chosen text reaches status and terminals: escaped and bounded.
        s.version = (!info.version.is_empty()).then(|| model::escape::bounded(&info.version, 64));
    });
    // Addresses are judged against this cluster's own space: it is known before anything is
    // imported (one listing of local etcd).
    let mut own_space: Arc<AddressSpace> =
        match tokio::time::timeout(Duration::from_secs(10), own.wait_for(Option::is_some)).await {
            Ok(Ok(space)) => space.clone().unwrap_or_default(),
            Ok(Err(_)) => return Err("this cluster's own address space is not followed".into()),
            Err(_) => {
                return Err(format!(
                    "{LOCAL_ETCD}this cluster's own nodes (its address space) could not be listed"
                ));
            }
        };

    let mut stream = api
        .watch(pb::WatchRequest {
            kinds: Vec::new(),
            clusters: vec![cfg.name.to_string()],
            resume_revision: mirror.revision,
        })
        .await
        .map_err(|e| format!("Watch: {}: {}", e.code(), e.message()))?
        .into_inner();
    let connected_unix = now_unix();
    ctx.board.set_phase(&cfg.name, Phase::Syncing);
    tracing::info!(peer = %cfg.name, endpoint = %connected.endpoint, resume = mirror.revision, "watching peer");
    let peer = cfg.name.as_str();
    let mut resync: Option<Resync> = None;
    let mut synced: HashSet<Kind> = HashSet::new();
    let mut markers: HashMap<Kind, Vec<u8>> = HashMap::new();
    let mut ready = mirror.revision > 0;
    let mut last_count = std::time::Instant::now();
    let mut counts_dirty = true;
    // Propagation is observed only for changes made after this stream was in sync: what a
    // snapshot or a resume replays is as old as the outage, not a propagation delay.
    let mut live_since: Option<i64> = None;
    if ready {
        backoff.healthy();
        live_since = Some(now_micros());
        ctx.board.set_phase(&cfg.name, Phase::Ready);
        // An error from before this connection no longer applies once in sync again.
        ctx.board.clear_error_before(&cfg.name, connected_unix);
    }
    // Writes not yet in local etcd (key → value, None = delete), coalesced across the messages
    // that are already waiting; the revision they complete.
    let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut pending_revision = mirror.revision;
    // Our own space may have changed while disconnected: judge what is held against it.
    mirror.readmit(&own_space, true, &mut pending);
    if ready {
        mirror.report(ctx);
    }
    loop {
        // This cluster's own space changed: judge every endpoint and backend again.
        let latest = own.borrow_and_update().clone();
        if let Some(latest) = latest
            && !Arc::ptr_eq(&latest, &own_space)
        {
            own_space = latest;
            mirror.readmit(&own_space, true, &mut pending);
            if resync.as_ref().map_or(ready, |r| r.complete) {
                mirror.report(ctx);
            }
        }
        // Block only when nothing is pending; otherwise take what is already there or flush.
        let next = if pending.is_empty() && counts_dirty {
            // Idle for a moment: bring the status counts up to date.
            let next = async {
                tokio::select! {
                    r = stream.message() => Some(r),
                    () = own_changed(own) => None,
                }
            };
            match tokio::time::timeout(Duration::from_millis(200), next).await {
                Ok(Some(r)) => Some(r),
                Ok(None) => continue,
                Err(_) => {
                    counts_dirty = false;
                    last_count = std::time::Instant::now();
                    let (counts, refused) = (mirror.counts(), mirror.refused());
                    ctx.board.update(&cfg.name, |s| {
                        s.objects = counts;
                        s.refused_objects = refused;
                    });
                    continue;
                }
            }
        } else if pending.is_empty() {
            tokio::select! {
                r = stream.message() => Some(r),
                () = own_changed(own) => continue,
            }
        } else {
            futures::FutureExt::now_or_never(stream.message())
        };
        let Some(next) = next else {
            flush(ctx, &mut pending).await?;
            mirror.revision = pending_revision;
            continue;
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the peer ended the watch".into()),
            Err(e) => return Err(format!("watch stream: {}: {}", e.code(), e.message())),
        };
        ctx.metrics.add(
            m::PEER_BYTES,
            &[peer],
            prost::Message::encoded_len(&msg) as f64,
        );
        if msg.reset {
            resync = Some(Resync::default());
            synced.clear();
            ready = false;
            live_since = None;
            ctx.board.set_phase(&cfg.name, Phase::Syncing);
        }
        let now = now_micros();
        let mut nodes_changed = false;
        // Quota: what this peer makes us hold (bytes summed only once a new object comes).
        let mut held_bytes: Option<usize> = None;
        let mut over_quota = 0usize;
        for c in &msg.changes {
            match validate(&cfg.name, cert_id, c) {
                Ok((kind, name, value)) => {
                    if c.origin_unix_micros > 0
                        && live_since.is_some_and(|t| c.origin_unix_micros >= t)
                    {
                        let secs = (now - c.origin_unix_micros).max(0) as f64 / 1e6;
                        ctx.metrics
                            .observe(m::PEER_PROPAGATION_SECONDS, &[peer], secs);
                    }
                    let key = keys::object_key(Scope::Cache, &cfg.name, kind, &name);
                    match value {
                        Some(v) => {
                            if !mirror.held.contains_key(&(kind, name.clone())) {
                                let objects = mirror.held.len();
                                let bytes = *held_bytes.get_or_insert_with(|| {
                                    mirror.held.values().map(Vec::len).sum()
                                });
                                if objects >= ctx.quota.max_objects
                                    || bytes + v.len() > ctx.quota.max_bytes
                                {
                                    over_quota += 1;
                                    if over_quota == 1 {
                                        let e = format!(
                                            "peer {peer} is over its quota ({objects} objects, {bytes} bytes held; limits {} objects, {} bytes): new objects refused, starting with {kind} {name:?}",
                                            ctx.quota.max_objects, ctx.quota.max_bytes
                                        );
                                        tracing::warn!(peer = %cfg.name, error = %e, "object refused");
                                        ctx.board.error(&cfg.name, &e);
                                    }
                                    ctx.metrics.inc(m::PEER_REJECTED, &[peer]);
                                    continue;
                                }
                                held_bytes = Some(bytes + v.len());
                            }
                            if let Some(r) = resync.as_mut() {
                                r.seen.entry(kind).or_default().insert(name.clone());
                            }
                            if claims_addresses(kind) {
                                mirror.admit(kind, name, v, true, &own_space, &mut pending);
                            } else if mirror.held.get(&(kind, name.clone())) != Some(&v) {
                                nodes_changed |= kind == Kind::Nodes;
                                pending.insert(key, Some(v.clone()));
                                mirror.held.insert((kind, name), v);
                            }
                        }
                        None => {
                            if let Some(r) = resync.as_mut()
                                && let Some(seen) = r.seen.get_mut(&kind)
                            {
                                seen.remove(&name);
                            }
                            mirror.withheld.remove(&(kind, name.clone()));
                            if mirror.held.remove(&(kind, name)).is_some() {
                                nodes_changed |= kind == Kind::Nodes;
                                pending.insert(key, None);
                            }
                        }
                    }
                }
                Err(e) => {
                    ctx.metrics.inc(m::PEER_REJECTED, &[peer]);
                    tracing::warn!(peer = %cfg.name, error = %e, "object refused");
                    ctx.board.error(&cfg.name, &e);
                }
            }
        }
        // The peer's nodes changed: its advertised space may have, and with it what fits.
        if nodes_changed {
            let space = mirror.peer_space();
            if space != mirror.space {
                mirror.space = space;
                mirror.readmit(&own_space, false, &mut pending);
            }
        }
        // Refusals are reported once the stream is settled: not in the middle of a snapshot,
        // whose nodes may still be on their way.
        if msg.snapshot_complete || resync.as_ref().map_or(ready, |r| r.complete) {
            mirror.report(ctx);
        }
        pending_revision = pending_revision.max(msg.revision);
        counts_dirty |= !msg.changes.is_empty();
        let control = msg.reset || msg.snapshot_complete || !msg.synced.is_empty();
        if !control && pending.len() < 5000 {
            if pending.is_empty() {
                mirror.revision = pending_revision;
            }
            continue;
        }
        flush(ctx, &mut pending).await?;
        mirror.revision = pending_revision;
        for s in &msg.synced {
            if s.cluster != peer {
                continue;
            }
            if let Ok(kind) = s.kind.parse::<Kind>() {
                synced.insert(kind);
                markers.insert(kind, prost::Message::encode_to_vec(s));
            }
        }
        if msg.snapshot_complete
            && let Some(r) = resync.as_mut()
        {
            r.complete = true;
        }
        // Prune what a completed snapshot did not name, per kind, once the peer synced it.
        if let Some(r) = resync.as_mut()
            && r.complete
        {
            for kind in Kind::ALL {
                if !synced.contains(&kind) || r.pruned.contains(&kind) {
                    continue;
                }
                r.pruned.insert(kind);
                let seen = r.seen.remove(&kind).unwrap_or_default();
                mirror
                    .withheld
                    .retain(|(k, n), _| *k != kind || seen.contains(n));
                let stale: Vec<(Kind, String)> = mirror
                    .held
                    .keys()
                    .filter(|(k, n)| *k == kind && !seen.contains(n))
                    .cloned()
                    .collect();
                if !stale.is_empty() {
                    let keys: Vec<String> = stale
                        .iter()
                        .map(|(k, n)| keys::object_key(Scope::Cache, &cfg.name, *k, n))
                        .collect();
                    ctx.kv.delete_many(&keys).await.map_err(|e| local(&e))?;
                    for s in stale {
                        mirror.held.remove(&s);
                    }
                    if kind == Kind::Nodes {
                        // Admits less from now on; withdraws nothing admitted (see `readmit`).
                        mirror.space = mirror.peer_space();
                    }
                    tracing::info!(peer = %cfg.name, %kind, removed = keys.len(), "removed what the peer no longer has");
                }
            }
        }
        // Mirror the peer's synced markers once its state of that kind is in place.
        for kind in synced.clone() {
            let pruned = resync.as_ref().is_none_or(|r| r.pruned.contains(&kind));
            if pruned && let Some(v) = markers.remove(&kind) {
                ctx.kv
                    .put_raw(&keys::synced(Scope::Cache, &cfg.name, kind), v)
                    .await
                    .map_err(|e| local(&e))?;
            }
        }
        if resync
            .as_ref()
            .is_some_and(|r| Kind::ALL.iter().all(|k| r.pruned.contains(k)))
        {
            resync = None;
        }
        if !ready && resync.is_none() {
            ready = true;
            backoff.healthy();
            live_since = Some(now_micros());
            ctx.board.set_phase(&cfg.name, Phase::Ready);
            // An error from before this connection no longer applies once in sync again.
            ctx.board.clear_error_before(&cfg.name, connected_unix);
            tracing::info!(peer = %cfg.name, objects = mirror.held.len(), "peer in sync");
            last_count = std::time::Instant::now() - Duration::from_secs(2);
        }
        if last_count.elapsed() >= Duration::from_secs(1) {
            last_count = std::time::Instant::now();
            counts_dirty = false;
            let (counts, refused) = (mirror.counts(), mirror.refused());
            ctx.board.update(&cfg.name, |s| {
                s.objects = counts;
                s.refused_objects = refused;
            });
        }
        ctx.board
            .update(&cfg.name, |s| s.revision = mirror.revision);
    }
}

/// Prefix of errors about this cluster's own etcd: the importer's memory of what it wrote may
/// then be wrong, and is reloaded before the next attempt.
const LOCAL_ETCD: &str = "local etcd: ";

fn local(e: &kvstore::Error) -> String {
    format!("{LOCAL_ETCD}{}", telemetry::chain(e))
}

async fn flush(
    ctx: &Context,
    pending: &mut BTreeMap<String, Option<Vec<u8>>>,
) -> Result<(), String> {
    let mut puts = Vec::new();
    let mut deletes = Vec::new();
    for (k, v) in std::mem::take(pending) {
        match v {
            Some(v) => puts.push((k, v)),
            None => deletes.push(k),
        }
    }
    if !puts.is_empty() {
        ctx.kv.put_many(&puts, 0).await.map_err(|e| local(&e))?;
    }
    if !deletes.is_empty() {
        ctx.kv.delete_many(&deletes).await.map_err(|e| local(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_peer_ready_gauge_follows_the_phase_and_leaves_with_the_peer() {
        let metrics = crate::metrics::registry();
        let board = Board::new(metrics.clone());
        let west = ClusterName::new("west").unwrap();
        board.update(&west, |_| {});
        assert!(
            metrics
                .render()
                .contains("clustermesh_peer_ready{peer=\"west\"} 0"),
            "{}",
            metrics.render()
        );
        board.set_phase(&west, Phase::Syncing);
        assert_eq!(metrics.value(m::PEER_READY, &["west"]), 0.0);
        board.set_phase(&west, Phase::Ready);
        assert_eq!(metrics.value(m::PEER_READY, &["west"]), 1.0);
        board.set_phase(&west, Phase::Stale);
        assert_eq!(metrics.value(m::PEER_READY, &["west"]), 0.0);
        board.remove(&west);
        assert!(
            !metrics.render().contains("peer=\"west\""),
            "{}",
            metrics.render()
        );
    }

    fn peer_dir(root: &Path, name: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("endpoints"), "127.0.0.1:1\n").unwrap();
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        d
    }

    /// Issue 12, case 3: a listing that fails is not an empty listing.
    #[test]
    fn an_unreadable_peers_directory_confirms_no_removal() {
        let own = ClusterName::new("east").unwrap();
        let root = tempfile::tempdir().unwrap();
        let s = scan(&root.path().join("missing"), &own);
        assert!(!s.complete, "a failed listing confirms nothing");
        assert_eq!(s.problems.len(), 1);
    }

    /// A peer directory whose files cannot be read (here `tls.crt` turned into a directory, an
    /// I/O error like EMFILE would be) is present: its peer keeps its last good configuration.
    #[test]
    fn a_peer_that_cannot_be_read_is_present_not_removed() {
        let own = ClusterName::new("east").unwrap();
        let root = tempfile::tempdir().unwrap();
        peer_dir(root.path(), "west");
        let south = peer_dir(root.path(), "south");
        std::fs::remove_file(south.join("tls.crt")).unwrap();
        std::fs::create_dir(south.join("tls.crt")).unwrap();
        let s = scan(root.path(), &own);
        assert!(s.complete);
        assert!(s.found.contains_key("west"));
        assert!(!s.found.contains_key("south"));
        assert!(s.present.contains("south"), "unreadable is not removed");
        assert!(s.problems.keys().any(|p| p.ends_with("south")));
        // A missing cluster-id is fine; an unreadable one is a problem, not "no ID".
        std::fs::create_dir(root.path().join("west").join("cluster-id")).unwrap();
        let s = scan(root.path(), &own);
        assert!(!s.found.contains_key("west") && s.present.contains("west"));
    }

    fn node(cluster: &str, name: &str, address: &str, pod_cidr: &str) -> model::Node {
        model::Node {
            cluster: ClusterName::new(cluster).unwrap(),
            name: model::NodeName::new(name).unwrap(),
            addresses: vec![address.parse().unwrap()],
            pod_cidrs: vec![pod_cidr.parse().unwrap()],
        }
    }

    fn endpoint(ip: &str) -> Vec<u8> {
        model::Endpoint {
            cluster: ClusterName::new("west").unwrap(),
            ip: ip.parse().unwrap(),
            identity: model::NumericIdentity::scoped(ClusterId::new(2).unwrap(), 7).unwrap(),
            node: model::NodeName::new("w1").unwrap(),
            pod: None,
        }
        .encode()
    }

    fn service(backends: &[&str]) -> Vec<u8> {
        let mut svc = model::GlobalService {
            cluster: ClusterName::new("west").unwrap(),
            name: model::service::ServiceName::new("default", "web").unwrap(),
            cluster_ips: vec![],
            ports: vec![],
            backends: backends
                .iter()
                .map(|ip| model::service::Backend {
                    ip: ip.parse().unwrap(),
                    ports: vec![],
                    conditions: model::service::BackendConditions::default(),
                    node: None,
                    zone: None,
                })
                .collect(),
            shared: true,
            affinity: model::service::Affinity::None,
            balancing: Default::default(),
        };
        svc.normalize();
        svc.encode()
    }

    fn backends(v: &[u8]) -> Vec<String> {
        model::GlobalService::decode(v)
            .unwrap()
            .backends
            .iter()
            .map(|b| b.ip.to_string())
            .collect()
    }

    /// Issue 12, item 6: an endpoint or backend lies inside the peer's space and outside ours.
    #[test]
    fn addresses_are_admitted_only_inside_the_peers_space_and_outside_ours() {
        let west = ClusterName::new("west").unwrap();
        let space = AddressSpace::of(&[node("west", "w1", "192.168.2.1", "10.2.1.0/24")]);
        let own = AddressSpace::of(&[node("east", "e1", "192.168.1.1", "10.1.1.0/24")]);
        let judge = |kind, v: &[u8]| admission(&west, kind, "x", v, Some(&space), &own);
        for ip in ["10.2.1.5", "192.168.2.1"] {
            let a = judge(Kind::Endpoints, &endpoint(ip));
            assert_eq!(a.hold, Some(endpoint(ip)), "{ip} is the peer's");
            assert!(a.refused.is_empty());
        }
        for (ip, why) in [
            ("10.1.1.5", "inside this cluster's own"),
            ("192.168.1.1", "inside this cluster's own"),
            ("10.9.0.1", "outside the peer's advertised"),
        ] {
            let a = judge(Kind::Endpoints, &endpoint(ip));
            assert_eq!(a.hold, None, "{ip}");
            assert!(
                a.refused.len() == 1 && a.refused[0].contains(why),
                "{ip}: {a:?}"
            );
            assert!(a.refused[0].contains(ip));
        }
        // Ours wins where both claim an address.
        let greedy = AddressSpace::of(&[node("west", "w1", "192.168.2.1", "10.0.0.0/8")]);
        let a = admission(
            &west,
            Kind::Endpoints,
            "x",
            &endpoint("10.1.1.5"),
            Some(&greedy),
            &own,
        );
        assert!(a.hold.is_none() && a.refused[0].contains("own"));
        // Admitted before, judged again against our own space only.
        let a = admission(
            &west,
            Kind::Endpoints,
            "x",
            &endpoint("10.9.0.1"),
            None,
            &own,
        );
        assert!(a.hold.is_some() && a.refused.is_empty());

        // A service keeps its good backends and loses the others, each refusal named.
        let sent = service(&["10.2.1.5", "10.1.1.5", "10.9.0.1"]);
        let a = judge(Kind::Services, &sent);
        assert_eq!(backends(&a.hold.unwrap()), ["10.2.1.5"]);
        assert_eq!(a.refused.len(), 2);
        assert!(a.refused.iter().any(|r| r.contains("10.1.1.5")));
        assert!(a.refused.iter().any(|r| r.contains("10.9.0.1")));
        let clean = service(&["10.2.1.5"]);
        assert_eq!(
            judge(Kind::Services, &clean).hold,
            Some(clean),
            "held as sent"
        );
    }

    /// A snapshot comes in key order (endpoints before nodes); the space of the moment decides,
    /// and a change of either space judges everything again.
    #[test]
    fn held_back_objects_are_judged_again_when_a_space_changes() {
        let west = ClusterName::new("west").unwrap();
        let mut mirror = Mirror {
            peer: west.clone(),
            held: BTreeMap::new(),
            revision: 0,
            space: AddressSpace::default(),
            withheld: BTreeMap::new(),
            unreported: false,
        };
        let own = AddressSpace::of(&[node("east", "e1", "192.168.1.1", "10.1.1.0/24")]);
        let mut pending = BTreeMap::new();
        let ep = (Kind::Endpoints, "10.2.1.5".to_owned());
        let svc = (Kind::Services, "default/web".to_owned());
        mirror.admit(
            ep.0,
            ep.1.clone(),
            endpoint("10.2.1.5"),
            true,
            &own,
            &mut pending,
        );
        let web = service(&["10.2.1.5"]);
        mirror.admit(svc.0, svc.1.clone(), web, true, &own, &mut pending);
        assert!(!mirror.held.contains_key(&ep) && mirror.withheld.contains_key(&ep));
        assert!(backends(&mirror.held[&svc]).is_empty());
        assert!(mirror.unreported);

        // The peer's node arrives: both fit now, as sent.
        mirror.held.insert(
            (Kind::Nodes, "w1".into()),
            node("west", "w1", "192.168.2.1", "10.2.1.0/24").encode(),
        );
        mirror.space = mirror.peer_space();
        mirror.readmit(&own, false, &mut pending);
        assert_eq!(mirror.held.get(&ep), Some(&endpoint("10.2.1.5")));
        assert_eq!(backends(&mirror.held[&svc]), ["10.2.1.5"]);
        assert!(mirror.withheld.is_empty());
        let key = keys::object_key(Scope::Cache, &west, Kind::Endpoints, &ep.1);
        assert_eq!(pending.get(&key), Some(&Some(endpoint("10.2.1.5"))));

        // The peer's node goes (its pods not yet): what was admitted stays.
        mirror.held.remove(&(Kind::Nodes, "w1".into()));
        mirror.space = mirror.peer_space();
        mirror.readmit(&own, false, &mut pending);
        assert!(mirror.held.contains_key(&ep) && mirror.withheld.is_empty());

        // Our own space grows over the address: withdrawn, and the backend dropped.
        let own = AddressSpace::of(&[
            node("east", "e1", "192.168.1.1", "10.1.1.0/24"),
            node("east", "e2", "192.168.1.2", "10.2.1.0/28"),
        ]);
        mirror.readmit(&own, true, &mut pending);
        assert!(!mirror.held.contains_key(&ep));
        assert_eq!(pending.get(&key), Some(&None));
        assert!(backends(&mirror.held[&svc]).is_empty());
        assert_eq!(mirror.withheld.len(), 2);
    }

    /// Issue 12, case 7: an object between the Mesh API's message limit and etcd's request
    /// limit is refused alone (it would fail the local write and loop the peer's stream).
    #[test]
    fn an_object_over_the_size_limit_is_refused_alone() {
        let peer = ClusterName::new("west").unwrap();
        let id = ClusterId::new(2).unwrap();
        let c = pb::Change {
            op: pb::change::Op::Put as i32,
            cluster: "west".into(),
            kind: "services".into(),
            name: "demo/big".into(),
            value: vec![0; MAX_OBJECT_BYTES + 1],
            revision: 1,
            origin_unix_micros: 0,
        };
        let e = validate(&peer, id, &c).unwrap_err();
        assert!(e.contains("limit of one object"), "{e}");
    }

    /// The peer Secret follower swaps a symlink: the scan sees the peer through it.
    #[test]
    fn a_symlinked_peer_directory_counts() {
        let own = ClusterName::new("east").unwrap();
        let root = tempfile::tempdir().unwrap();
        peer_dir(root.path(), ".v-west-1");
        std::os::unix::fs::symlink(".v-west-1", root.path().join("west")).unwrap();
        let s = scan(root.path(), &own);
        assert!(s.found.contains_key("west"));
        assert_eq!(s.found.len(), 1, "versioned directories are not peers");
    }
}
