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
//!
//! One module per concern: [`peer_dir`] (the peers directory and its scan), [`board`] (every
//! peer's status), [`own_space`] (this cluster's own addresses), [`validate`] (what a peer may
//! send), [`mirror`] (what is held of a peer, address admission), [`session`] (one connection).

mod board;
mod mirror;
mod own_space;
pub mod peer_dir;
pub mod session;
pub mod validate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use model::keys::{self, Kind, Scope};
use model::{ClusterId, ClusterName};
use telemetry::backoff::Backoff;
use telemetry::metrics::Registry;
use tokio::sync::watch;

pub use board::Board;
pub use model::status::{PeerStatus, Phase};
pub use peer_dir::PeerConfig;
pub use session::Error;
pub use validate::{MAX_OBJECT_BYTES, Refused};

use crate::metrics as m;
use mirror::load_mirror;
use own_space::{OwnSpace, follow_own_space};
use peer_dir::{Scan, scan};

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
        let result = session::session(&ctx, &cfg, &mut mirror, &mut own, &mut backoff).await;
        ctx.board.release_id(&cfg.name);
        if let Err(e) = &result
            && e.is_local()
        {
            // What was meant to be written may not be: start over from what etcd holds.
            mirror = load_mirror(&ctx, &cfg.name).await;
        }
        let e = match result {
            Ok(()) => "the peer closed the stream".to_owned(),
            Err(e) => telemetry::chain(&e).to_string(),
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
