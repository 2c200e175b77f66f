//! Where this replica stands: the phase the status document reports (`ready`, `standby`,
//! `etcd-unreachable`, `lease-lost`, ...), since when, and why it is not ready. The supervisor
//! sets `starting` and `standby`; the exporter sets `syncing`, `ready` and the etcd faults.
//! `/status` and tests read it.
//!
//! Must not decide anything: a phase describes; whatever it is, the exported state stays in
//! etcd (ADR 0013). `/readyz` is not this: it says whether the replica can serve the Mesh API.

use model::status::ApiserverPhase;
use tokio::sync::watch;

/// A phase, since when, and why not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The phase.
    pub phase: ApiserverPhase,
    /// Since when (Unix seconds).
    pub since_unix: i64,
    /// Why not ready, when not.
    pub reason: Option<String>,
}

impl Readiness {
    /// Whether this replica leads and exports, its initial state written and etcd answering.
    pub fn is_ready(&self) -> bool {
        self.phase == ApiserverPhase::Ready
    }
}

/// Sets the readiness.
pub type Sender = watch::Sender<Readiness>;
/// Follows the readiness.
pub type Receiver = watch::Receiver<Readiness>;

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A channel starting in [`ApiserverPhase::Starting`].
pub fn channel() -> (Sender, Receiver) {
    watch::channel(Readiness {
        phase: ApiserverPhase::Starting,
        since_unix: now_unix(),
        reason: Some("starting".into()),
    })
}

/// Moves to `phase` (`reason`: why not ready). Since when: `since_unix` when the caller knows
/// when the condition began, else kept while the phase stays, else now.
pub fn set(tx: &Sender, phase: ApiserverPhase, reason: Option<String>, since_unix: Option<i64>) {
    tx.send_if_modified(|r| {
        let since = since_unix.unwrap_or(if r.phase == phase {
            r.since_unix
        } else {
            now_unix()
        });
        let next = Readiness {
            phase,
            since_unix: since,
            reason,
        };
        let changed = *r != next;
        *r = next;
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_when_is_kept_while_the_phase_stays() {
        let (tx, rx) = channel();
        set(
            &tx,
            ApiserverPhase::Standby,
            Some("no leader yet".into()),
            Some(5),
        );
        set(&tx, ApiserverPhase::Standby, Some("r2 leads".into()), None);
        let r = rx.borrow().clone();
        assert_eq!((r.phase, r.since_unix), (ApiserverPhase::Standby, 5));
        assert_eq!(r.reason.as_deref(), Some("r2 leads"));
        assert!(!r.is_ready());
        set(
            &tx,
            ApiserverPhase::EtcdUnreachable,
            Some("x".into()),
            Some(9),
        );
        assert_eq!(rx.borrow().since_unix, 9, "the caller knows when it began");
        set(&tx, ApiserverPhase::Ready, None, None);
        let r = rx.borrow().clone();
        assert!(r.is_ready());
        assert!(r.since_unix > 9, "a new phase starts now");
    }
}
