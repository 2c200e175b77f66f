//! Whether this cluster's etcd answers, for the status document: the leader asks etcd for its
//! revision every `interval` and records since when the answer is yes or no.
//!
//! Must not write to etcd; a probe is a count-only read of the mesh's root prefix.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::status::EtcdHealth;

/// How long etcd may take to answer one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the last answer is kept for the status document.
pub type Health = Arc<Mutex<Option<EtcdHealth>>>;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The health after a probe that answered `result` at `now`, given the one before.
pub fn next(previous: Option<&EtcdHealth>, result: Result<(), String>, now: i64) -> EtcdHealth {
    let healthy = result.is_ok();
    let since_unix = match previous {
        Some(p) if p.healthy == healthy => p.since_unix,
        _ => now,
    };
    EtcdHealth {
        healthy,
        since_unix,
        error: result.err(),
    }
}

/// Probes `kv` every `interval` into `out`, until dropped.
pub async fn run(kv: kvstore::Client, interval: Duration, out: Health) {
    loop {
        let result = match tokio::time::timeout(PROBE_TIMEOUT, kv.current_revision()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(crate::node_agents::chain(&e)),
            Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
        };
        {
            let mut g = match out.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let health = next(g.as_ref(), result, now_unix());
            if g.as_ref().is_none_or(|h| h.healthy != health.healthy) {
                match &health.error {
                    None => tracing::info!("etcd answers"),
                    Some(e) => tracing::warn!(error = %e, "etcd does not answer"),
                }
            }
            *g = Some(health);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_moves_only_when_the_answer_changes() {
        let up = next(None, Ok(()), 10);
        assert_eq!((up.healthy, up.since_unix), (true, 10));
        let still = next(Some(&up), Ok(()), 20);
        assert_eq!(still.since_unix, 10);
        let down = next(Some(&still), Err("connection refused".into()), 30);
        assert_eq!(
            (down.healthy, down.since_unix, down.error.as_deref()),
            (false, 30, Some("connection refused"))
        );
        assert_eq!(next(Some(&down), Err("x".into()), 40).since_unix, 30);
    }
}
