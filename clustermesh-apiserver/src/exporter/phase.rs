//! The phase of a leading exporter whose initial state is written, as readiness reports it:
//! etcd unreachable, session lease lost, writes failing, or ready. Must not decide anything:
//! it only words what the reconcile loop saw.

use kvstore::session::Liveness;
use model::status::ApiserverPhase;

use crate::readiness;

pub(super) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The phase of a leading exporter whose initial state is written: not ready while etcd does
/// not answer keep-alives (past the lease TTL: the lease is lost) or refuses writes, since when
/// the condition began (the exported state stays in etcd meanwhile).
fn phase(
    liveness: &Liveness,
    failing: Option<&(i64, String)>,
) -> (ApiserverPhase, Option<(i64, String)>) {
    match (liveness, failing) {
        (
            Liveness::Unreachable {
                since_unix_ms,
                error,
            },
            _,
        ) => (
            ApiserverPhase::EtcdUnreachable,
            Some((
                *since_unix_ms,
                format!("etcd unreachable: {error}; exported state kept"),
            )),
        ),
        (
            Liveness::LeaseLost {
                since_unix_ms,
                error,
            },
            _,
        ) => (
            ApiserverPhase::LeaseLost,
            Some((
                *since_unix_ms,
                format!(
                    "session lease lost (etcd unreachable for longer than its TTL, or it could not be re-created): {error}; peers see no heartbeat, exported state kept"
                ),
            )),
        ),
        (Liveness::Alive, Some((since, error))) => (
            ApiserverPhase::EtcdWritesFailing,
            Some((
                *since,
                format!("etcd writes failing: {error}; exported state kept"),
            )),
        ),
        (Liveness::Alive, None) => (ApiserverPhase::Ready, None),
    }
}

pub(super) fn set_phase(
    ready: &readiness::Sender,
    liveness: &Liveness,
    failing: Option<&(i64, String)>,
) {
    match phase(liveness, failing) {
        (p, Some((since_ms, reason))) => {
            readiness::set(ready, p, Some(reason), Some(since_ms / 1000))
        }
        (p, None) => readiness::set(ready, p, None, None),
    }
}
