//! This cluster's network policies, followed from Kubernetes for the Mesh API's `Policies`
//! stream to its own node agents (never to peers: policies are cluster-local).
//!
//! Three sources: `cilium.io/v2` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy, and
//! `networking.k8s.io/v1` NetworkPolicy. Each object is validated as a whole
//! ([`policy::parse`]); an invalid one is refused alone — logged with its field, counted, kept
//! in the set's `refused` list for `status`/`check` — and never served in part. A failed list
//! or a broken watch keeps the last good set of that source (a fault is not a deletion); only a
//! complete re-list or a delete event removes a policy. A CRD that is not installed (404) is a
//! source with nothing in it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use telemetry::metrics::Registry;
use tokio::sync::watch;

use crate::metrics as m;

/// A policy's key: kind, namespace (empty for cluster-wide), name.
pub type PolicyKey = (String, String, String);

/// The policies of the cluster as the apiserver serves them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PolicySet {
    /// Every source has been listed once: the set is complete.
    pub synced: bool,
    /// Valid policies: key → the object as Kubernetes stores it (JSON).
    pub valid: BTreeMap<PolicyKey, Arc<Vec<u8>>>,
    /// Invalid policies: key → why.
    pub refused: BTreeMap<PolicyKey, String>,
}

/// Validates one policy object (`Err`: why it is refused).
pub type Validate = Arc<dyn Fn(&serde_json::Value) -> Result<(), String> + Send + Sync>;

/// The receiving end the Mesh API serves from.
pub type Receiver = watch::Receiver<Arc<PolicySet>>;

/// The sources, in a fixed order.
const SOURCES: [(&str, &str, &str, &str, bool); 3] = [
    // kind, group, version, plural, namespaced
    (
        "CiliumNetworkPolicy",
        "cilium.io",
        "v2",
        "ciliumnetworkpolicies",
        true,
    ),
    (
        "CiliumClusterwideNetworkPolicy",
        "cilium.io",
        "v2",
        "ciliumclusterwidenetworkpolicies",
        false,
    ),
    (
        "NetworkPolicy",
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        true,
    ),
];

/// One source's objects, as complete lists and events leave them.
#[derive(Debug, Default)]
struct Source {
    listed: bool,
    objects: BTreeMap<(String, String), serde_json::Value>,
    relist: Option<BTreeMap<(String, String), serde_json::Value>>,
}

impl Source {
    /// Applies a watcher event; true when the source's objects (or its listed state) changed.
    fn apply(&mut self, ev: watcher::Event<DynamicObject>) -> bool {
        let key = |o: &DynamicObject| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        };
        let value = |o: &DynamicObject| serde_json::to_value(o).unwrap_or_default();
        match ev {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let Some(r) = self.relist.as_mut() {
                    r.insert(key(&o), value(&o));
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.objects = r;
                }
                self.listed = true;
                true
            }
            watcher::Event::Apply(o) => {
                self.objects.insert(key(&o), value(&o));
                true
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&key(&o));
                true
            }
        }
    }
}

/// Validates every object of `sources` into a set.
fn build(
    sources: &[Source],
    validate: &dyn Fn(&serde_json::Value) -> Result<(), String>,
) -> PolicySet {
    let mut set = PolicySet {
        synced: sources.iter().all(|s| s.listed),
        ..Default::default()
    };
    for ((kind, ..), src) in SOURCES.iter().zip(sources) {
        for ((ns, name), obj) in &src.objects {
            let key = ((*kind).to_owned(), ns.clone(), name.clone());
            match validate(obj) {
                Ok(()) => {
                    let json = serde_json::to_vec(obj).unwrap_or_default();
                    set.valid.insert(key, Arc::new(json));
                }
                Err(e) => {
                    set.refused.insert(key, e);
                }
            }
        }
    }
    set
}

/// The status patch that sets `obj`'s `Valid` condition (`refused`: why it is invalid), or
/// `None` when the stored condition already says so (the time of an unchanged condition stays).
fn condition_patch(obj: &serde_json::Value, refused: Option<&str>) -> Option<serde_json::Value> {
    let (status, reason, message) = match refused {
        Some(why) => ("False", "Invalid", format!("not enforced: {why}")),
        None => ("True", "Valid", "enforced by clustermesh".to_owned()),
    };
    let current = obj
        .pointer("/status/conditions")
        .and_then(serde_json::Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Valid"));
    if current.is_some_and(|c| c["status"] == status && c["message"] == message.as_str()) {
        return None;
    }
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut conditions: Vec<serde_json::Value> = obj
        .pointer("/status/conditions")
        .and_then(serde_json::Value::as_array)
        .map(|c| c.iter().filter(|c| c["type"] != "Valid").cloned().collect())
        .unwrap_or_default();
    conditions.push(serde_json::json!({
        "type": "Valid",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    }));
    Some(serde_json::json!({"status": {"conditions": conditions}}))
}

/// The reference an Event about `obj` names.
fn object_reference(
    obj: &serde_json::Value,
    kind: &str,
    api_version: &str,
) -> k8s_openapi::api::core::v1::ObjectReference {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(api_version.to_owned()),
        kind: Some(kind.to_owned()),
        namespace: s("/metadata/namespace"),
        name: s("/metadata/name"),
        uid: s("/metadata/uid"),
        resource_version: s("/metadata/resourceVersion"),
        field_path: None,
    }
}

/// Logs refusals that are new or changed, and the ones that went away.
fn log_refusals(before: &PolicySet, now: &PolicySet) {
    for (k, why) in &now.refused {
        if before.refused.get(k) != Some(why) {
            tracing::warn!(kind = %k.0, policy = %format!("{}/{}", k.1, k.2), reason = %why, "network policy refused: not enforced until fixed");
        }
    }
    for k in before
        .refused
        .keys()
        .filter(|k| !now.refused.contains_key(*k))
    {
        tracing::info!(kind = %k.0, policy = %format!("{}/{}", k.1, k.2), "network policy no longer refused");
    }
}

/// Follows the policies of `client`'s cluster into `tx`, validating each with `validate`.
pub async fn follow(
    client: kube::Client,
    replica: String,
    tx: watch::Sender<Arc<PolicySet>>,
    metrics: Registry,
    validate: Validate,
) {
    let mut streams = Vec::new();
    for (i, (kind, group, version, plural, _)) in SOURCES.iter().enumerate() {
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let s = watcher(api, watcher::Config::default()).map(move |ev| (i, ev));
        streams.push(s.boxed());
    }
    let mut merged = futures::stream::select_all(streams);
    let events = Recorder::new(
        client.clone(),
        Reporter {
            controller: "clustermesh-apiserver".into(),
            instance: Some(replica),
        },
    );
    let mut sources: Vec<Source> = SOURCES.iter().map(|_| Source::default()).collect();
    let mut failing: Vec<telemetry::backoff::Backoff> = SOURCES
        .iter()
        .map(|_| {
            telemetry::backoff::Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(5),
                Duration::from_secs(30),
            )
        })
        .collect();
    while let Some((i, ev)) = merged.next().await {
        let changed = match ev {
            Ok(ev) => {
                failing[i].healthy();
                sources[i].apply(ev)
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
                // The CRD is not installed: no such policy can exist.
                let newly = !sources[i].listed;
                if newly {
                    tracing::info!(
                        kind = SOURCES[i].0,
                        "not served by the Kubernetes API (CRD not installed): no such policies"
                    );
                }
                sources[i].listed = true;
                sources[i].objects.clear();
                failing[i].wait().await;
                newly
            }
            Err(e) => {
                metrics.inc(m::ERRORS, &["policies"]);
                tracing::warn!(kind = SOURCES[i].0, error = %e, "listing or watching network policies failed; serving the last good set");
                failing[i].wait().await;
                false
            }
        };
        if !changed {
            continue;
        }
        let next = build(&sources, validate.as_ref());
        for (src, (kind, group, version, plural, namespaced)) in sources.iter().zip(SOURCES) {
            if group != "cilium.io" {
                continue; // NetworkPolicy has no status to say it in: the log and metric do.
            }
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            );
            for ((ns, name), obj) in &src.objects {
                let key = (kind.to_owned(), ns.clone(), name.clone());
                let refused = next.refused.get(&key).map(String::as_str);
                if let Some(patch) = condition_patch(obj, refused) {
                    let api: Api<DynamicObject> = if namespaced {
                        Api::namespaced_with(client.clone(), ns, &ar)
                    } else {
                        Api::all_with(client.clone(), &ar)
                    };
                    if let Err(e) = api
                        .patch_status(
                            name,
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&patch),
                        )
                        .await
                    {
                        metrics.inc(m::ERRORS, &["policies"]);
                        tracing::warn!(kind, policy = %format!("{ns}/{name}"), error = %e, "could not write the policy's Valid condition");
                    }
                }
            }
        }
        metrics.set(m::POLICIES, &["valid"], next.valid.len() as f64);
        metrics.set(m::POLICIES, &["refused"], next.refused.len() as f64);
        // A Warning Event on each policy refused anew (or for a new reason).
        let before = tx.borrow().clone();
        for (key, why) in &next.refused {
            if before.refused.get(key) == Some(why) {
                continue;
            }
            let Some((i, obj)) = SOURCES.iter().position(|s| s.0 == key.0).and_then(|i| {
                sources[i]
                    .objects
                    .get(&(key.1.clone(), key.2.clone()))
                    .map(|o| (i, o))
            }) else {
                continue;
            };
            let (kind, group, version, ..) = SOURCES[i];
            let reference = object_reference(obj, kind, &format!("{group}/{version}"));
            let event = Event {
                type_: EventType::Warning,
                reason: "InvalidPolicy".into(),
                note: Some(format!("not enforced: {why}")),
                action: "Validate".into(),
                secondary: None,
            };
            if let Err(e) = events.publish(&event, &reference).await {
                metrics.inc(m::ERRORS, &["events"]);
                tracing::warn!(error = %e, "could not record a Warning event");
            }
        }
        tx.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            log_refusals(cur, &next);
            *cur = Arc::new(next);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj(ns: &str, name: &str, valid: bool) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"valid": valid},
        }))
        .unwrap()
    }

    fn validate(v: &serde_json::Value) -> Result<(), String> {
        if v["spec"]["valid"] == true {
            Ok(())
        } else {
            Err("spec.valid: must be true".into())
        }
    }

    #[test]
    fn the_valid_condition_is_written_only_when_it_changes() {
        let fresh = serde_json::json!({"metadata": {"name": "p"}});
        let bad = condition_patch(&fresh, Some("spec.egress[0]: wrong")).unwrap();
        let c = &bad["status"]["conditions"][0];
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("Invalid"))
        );
        assert_eq!(c["message"], "not enforced: spec.egress[0]: wrong");
        let stored = serde_json::json!({"status": bad["status"].clone()});
        assert!(condition_patch(&stored, Some("spec.egress[0]: wrong")).is_none());
        let fixed = condition_patch(&stored, None).unwrap();
        assert_eq!(fixed["status"]["conditions"][0]["status"], "True");
    }

    #[test]
    fn only_a_complete_list_or_a_delete_removes_and_invalid_ones_are_refused_alone() {
        use watcher::Event::*;
        let mut sources: Vec<Source> = SOURCES.iter().map(|_| Source::default()).collect();
        assert!(!build(&sources, &validate).synced);
        let s = &mut sources[0];
        s.apply(Init);
        s.apply(InitApply(obj("a", "good", true)));
        s.apply(InitApply(obj("a", "bad", false)));
        assert!(s.apply(InitDone));
        sources[1].listed = true;
        sources[2].listed = true;
        let set = build(&sources, &validate);
        assert!(set.synced);
        assert_eq!(set.valid.len(), 1);
        assert!(set.refused.values().all(|r| r.contains("spec.valid")));
        // A re-list that breaks off keeps everything; a delete removes one.
        let s = &mut sources[0];
        s.apply(Init);
        s.apply(InitApply(obj("a", "good", true)));
        assert_eq!(build(&sources, &validate).refused.len(), 1);
        sources[0].apply(Delete(obj("a", "bad", false)));
        let set = build(&sources, &validate);
        assert_eq!((set.valid.len(), set.refused.len()), (1, 0));
    }
}
