//! The status of every peer (shared with `/status`) and the `clustermesh_peer_ready` gauge;
//! the cluster IDs of connected peers, to refuse a collision. Must not talk to a peer or etcd.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use model::status::{PeerStatus, Phase};
use model::{ClusterId, ClusterName};
use telemetry::metrics::Registry;

use crate::metrics as m;

pub(super) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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

    pub(super) fn update(&self, peer: &ClusterName, f: impl FnOnce(&mut PeerStatus)) {
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

    pub(super) fn set_phase(&self, peer: &ClusterName, phase: Phase) {
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
    pub(super) fn clear_error_before(&self, peer: &ClusterName, unix: i64) {
        self.update(peer, |s| {
            if s.last_error_unix.is_some_and(|t| t < unix) {
                s.last_error = None;
                s.last_error_unix = None;
            }
        });
    }

    pub(super) fn error(&self, peer: &ClusterName, e: &str) {
        self.update(peer, |s| {
            // Peer-chosen text reaches status and terminals: escaped and bounded.
            s.last_error = Some(model::escape::bounded(e, model::escape::MAX_TEXT));
            s.last_error_unix = Some(now_unix());
        });
    }

    pub(super) fn remove(&self, peer: &ClusterName) {
        if let Ok(mut g) = self.peers.lock() {
            g.remove(peer.as_str());
        }
        self.metrics.remove(m::PEER_READY, &[peer.as_str()]);
        self.release_id(peer);
    }

    /// Claims `id` for `peer`; refused with the peer that holds it already.
    pub(super) fn claim_id(&self, peer: &ClusterName, id: ClusterId) -> Result<(), ClusterName> {
        let mut g = match self.ids.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.get(&id) {
            Some(other) if other != peer => Err(other.clone()),
            _ => {
                g.retain(|_, n| n != peer);
                g.insert(id, peer.clone());
                Ok(())
            }
        }
    }

    pub(super) fn release_id(&self, peer: &ClusterName) {
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
}
