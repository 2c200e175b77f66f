//! The status ConfigMap: the leader writes its status document there, so that
//! `clustermesh status` needs nothing but a kubeconfig. Must not write any other object.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use model::objects::{STATUS_CONFIGMAP, STATUS_KEY};
use model::status::{ClusterStatus, STATUS_HEARTBEAT_SECS};
use telemetry::metrics::Registry;

use crate::metrics as m;

/// Why the status ConfigMap could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The status document could not be encoded.
    #[error("encode the status document")]
    Encode {
        /// Why.
        source: serde_json::Error,
    },
    /// The ConfigMap could not be patched.
    #[error("patch ConfigMap {STATUS_CONFIGMAP}")]
    Patch {
        /// Why.
        source: kube::Error,
    },
    /// The ConfigMap did not exist and could not be created.
    #[error("create ConfigMap {STATUS_CONFIGMAP}")]
    Create {
        /// Why.
        source: kube::Error,
    },
}

/// What [`write_status`] returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds between writes of a status whose only changes are counts and revisions.
const COUNTS_EVERY_SECS: i64 = 2;

/// `s` without what changes with every exported or imported object.
fn significant(s: &ClusterStatus) -> ClusterStatus {
    let mut s = s.clone();
    s.exported.clear();
    for p in &mut s.peers {
        p.objects.clear();
        p.revision = 0;
    }
    if let Some(a) = &mut s.node_agents {
        a.checked_unix = 0;
    }
    s
}

/// Writes `status()` into the status ConfigMap when its phase, readiness or errors change
/// (checked every `interval`), when only counts changed at most every 2 s, and at least every
/// [`STATUS_HEARTBEAT_SECS`] seconds. Runs until dropped.
pub async fn publish_status(
    api: Api<ConfigMap>,
    status: impl Fn() -> ClusterStatus,
    interval: Duration,
    metrics: Registry,
) {
    let mut last: Option<(ClusterStatus, i64)> = None;
    loop {
        let mut current = status();
        let now = now_unix();
        // A change of phase, readiness or error is written at once; counts and revisions move
        // with every change under churn, so a change of those alone waits COUNTS_EVERY_SECS.
        let due = match &last {
            Some((s, at)) => {
                significant(s) != significant(&current)
                    || (*s != current && now - at >= COUNTS_EVERY_SECS)
                    || now - at >= STATUS_HEARTBEAT_SECS
            }
            None => true,
        };
        if due {
            current.updated_unix = now;
            match write_status(&api, &current).await {
                Ok(()) => {
                    current.updated_unix = 0;
                    last = Some((current, now));
                }
                Err(e) => {
                    metrics.inc(m::ERRORS, &["status-configmap"]);
                    tracing::warn!(error = %telemetry::chain(&e), "could not write the status ConfigMap");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
async fn write_status(api: &Api<ConfigMap>, s: &ClusterStatus) -> Result<()> {
    let json = serde_json::to_string_pretty(s).map_err(|source| Error::Encode { source })?;
    let patch = serde_json::json!({ "data": { STATUS_KEY: json } });
    match api
        .patch(
            STATUS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": STATUS_CONFIGMAP,
                    "labels": { "app.kubernetes.io/name": "clustermesh-apiserver" },
                },
                "data": { STATUS_KEY: json },
            }))
            .map_err(|source| Error::Encode { source })?;
            api.create(&PostParams::default(), &cm)
                .await
                .map(|_| ())
                .map_err(|source| Error::Create { source })
        }
        Err(source) => Err(Error::Patch { source }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_alone_are_not_a_significant_change() {
        let status: ClusterStatus = serde_json::from_value(serde_json::json!({
            "cluster": "east", "cluster_id": 1, "replica": "r", "leader": true, "ready": true,
            "reason": null, "exported": {"endpoints": 3},
            "peers": [{"name": "west", "cluster_id": 2, "phase": "ready", "since_unix": 1,
                "last_error": null, "last_error_unix": null, "objects": {"endpoints": 5},
                "revision": 7, "peer_cert_not_after_unix": null, "endpoint": null}],
        }))
        .unwrap();
        let mut counts = status.clone();
        counts.exported.insert("endpoints".into(), 4);
        counts.peers[0].objects.insert("endpoints".into(), 6);
        counts.peers[0].revision = 8;
        assert_ne!(counts, status);
        assert_eq!(significant(&counts), significant(&status));
        let mut phase = status.clone();
        phase.peers[0].phase = model::status::Phase::Stale;
        assert_ne!(significant(&phase), significant(&status));
        let mut error = status.clone();
        error.peers[0].last_error = Some("x".into());
        assert_ne!(significant(&error), significant(&status));
    }
}
