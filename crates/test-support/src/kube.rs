//! Kubernetes fixtures written as a real cluster's components write them.

use std::fmt::Debug;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Creates `obj`, then sets its `status` through the `status` subresource, as the kubelet
/// reports a Pod's phase and IP after the Pod was created: a create ignores `status` for every
/// kind that has the subresource.
pub async fn create_with_status<K>(api: &Api<K>, obj: &K) -> kube::Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let created = api.create(&PostParams::default(), obj).await?;
    let status = serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.get("status").cloned())
        .filter(|s| !s.is_null() && s.as_object().is_none_or(|m| !m.is_empty()));
    match status {
        Some(s) => {
            api.patch_status(
                &created.name_any(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": s })),
            )
            .await
        }
        None => Ok(created),
    }
}

/// Delete options that remove a Pod at once, as `kubectl delete --grace-period=0 --force`
/// does (a bound Pod otherwise terminates for its grace period, 30 s by default).
pub fn now() -> DeleteParams {
    DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    }
}
