//! Waiting for what install applied to be ready, the way `kubectl rollout status` decides it:
//! the controller has seen the current spec (`observedGeneration`), every replica (or node) runs
//! the current template and is available. Progress is printed when it changes.
//!
//! [`rollout`] is the pure decision; [`until_ready`] polls the objects.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::DynamicObject;
use serde_json::Value;

use super::render::Kind;

/// Where one workload's rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rollout {
    /// `deployment/clustermesh-apiserver`.
    pub object: String,
    /// Whether it is complete.
    pub done: bool,
    /// What it waits for, or that it is ready.
    pub detail: String,
}

fn int(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// The rollout of a Deployment, StatefulSet or DaemonSet as stored (`obj`).
pub(crate) fn rollout(kind: &str, name: &str, obj: &Value) -> Rollout {
    let object = format!("{}/{name}", kind.to_lowercase());
    let generation = int(obj, "/metadata/generation");
    let observed = obj
        .pointer("/status/observedGeneration")
        .and_then(Value::as_i64);
    if observed.is_none_or(|o| o < generation) {
        return Rollout {
            object,
            done: false,
            detail: "its controller has not seen the current spec yet".into(),
        };
    }
    let (done, detail) = match kind {
        "DaemonSet" => {
            let desired = int(obj, "/status/desiredNumberScheduled");
            let updated = int(obj, "/status/updatedNumberScheduled");
            let available = int(obj, "/status/numberAvailable");
            (
                updated >= desired && available >= desired,
                format!("{available} of {desired} nodes available, {updated} updated"),
            )
        }
        "StatefulSet" => {
            let want = obj
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let ready = int(obj, "/status/readyReplicas");
            let updated = int(obj, "/status/updatedReplicas");
            (
                ready >= want && updated >= want,
                format!("{ready} of {want} replicas ready, {updated} updated"),
            )
        }
        _ => {
            let want = obj
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let updated = int(obj, "/status/updatedReplicas");
            let available = int(obj, "/status/availableReplicas");
            let total = int(obj, "/status/replicas");
            (
                updated >= want && available >= want && total <= want,
                format!(
                    "{available} of {want} replicas available, {updated} updated, {total} in all"
                ),
            )
        }
    };
    Rollout {
        object,
        done,
        detail: if done { "ready".into() } else { detail },
    }
}

/// Polls the `workloads` (kind, name) in `namespace` until every rollout is complete or
/// `timeout` passes; prints a line to stderr whenever one's state changes.
pub(crate) async fn until_ready(
    client: &kube::Client,
    namespace: &str,
    workloads: &[(Kind, String)],
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shown: Vec<Option<String>> = vec![None; workloads.len()];
    loop {
        let mut pending = Vec::new();
        for ((kind, name), shown) in workloads.iter().zip(shown.iter_mut()) {
            let api: kube::Api<DynamicObject> =
                kube::Api::namespaced_with(client.clone(), namespace, &kind.api_resource());
            let obj = api
                .get(name)
                .await
                .with_context(|| format!("read {}/{name}", kind.lower()))?;
            let r = rollout(kind.kind, name, &serde_json::to_value(&obj)?);
            if shown.as_deref() != Some(r.detail.as_str()) {
                if r.done {
                    eprintln!("{}: ready", r.object);
                } else {
                    eprintln!("waiting for {}: {}", r.object, r.detail);
                }
                *shown = Some(r.detail.clone());
            }
            if !r.done {
                pending.push(r);
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let what: Vec<String> = pending
                .iter()
                .map(|r| format!("{}: {}", r.object, r.detail))
                .collect();
            bail!(
                "not ready after {} (--timeout): {}",
                telemetry::duration::format(timeout),
                what.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1).min(deadline - tokio::time::Instant::now()))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rollouts_complete_as_kubectl_rollout_status_decides() {
        let cases = [
            (
                "Deployment",
                json!({"metadata": {"generation": 2}, "spec": {"replicas": 2}}),
                false,
            ),
            (
                "Deployment",
                json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
                "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}}),
                false,
            ),
            (
                "Deployment",
                json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
                "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}}),
                false,
            ),
            (
                "Deployment",
                json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
                "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}}),
                true,
            ),
            (
                "StatefulSet",
                json!({"metadata": {"generation": 1}, "spec": {"replicas": 1},
                "status": {"observedGeneration": 1, "readyReplicas": 0, "updatedReplicas": 1}}),
                false,
            ),
            (
                "StatefulSet",
                json!({"metadata": {"generation": 1}, "spec": {"replicas": 1},
                "status": {"observedGeneration": 1, "readyReplicas": 1, "updatedReplicas": 1}}),
                true,
            ),
            (
                "DaemonSet",
                json!({"metadata": {"generation": 1},
                "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 2}}),
                false,
            ),
            (
                "DaemonSet",
                json!({"metadata": {"generation": 1},
                "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 3}}),
                true,
            ),
        ];
        for (i, (kind, obj, done)) in cases.into_iter().enumerate() {
            assert_eq!(rollout(kind, "x", &obj).done, done, "case {i}: {obj}");
        }
        assert_eq!(
            rollout("DaemonSet", "x", &json!({"metadata": {"generation": 1}})).detail,
            "its controller has not seen the current spec yet"
        );
    }
}
