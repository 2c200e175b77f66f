//! Endpoints: every pod's addresses with its identity, recomputed from scratch (relist,
//! namespace labels changed) or only for the pods that changed (incremental). Must not
//! export an endpoint before its identity.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use model::keys::{self, Kind, Scope};
use model::{Endpoint, PodRef};
use wire::Codec;

use super::{Exporter, translate};
use crate::metrics as m;

impl Exporter {
    /// The endpoint keys and values of one pod and its identity's canonical labels; allocates
    /// the identity if it is new. `None` for pods without endpoints.
    pub(super) async fn pod_export(
        &mut self,
        pod: &Pod,
    ) -> anyhow::Result<Option<(Vec<(String, Vec<u8>)>, String)>> {
        let Some((node, ips)) = translate::pod_addresses(pod) else {
            return Ok(None);
        };
        let ns = pod.namespace().unwrap_or_default();
        let namespace = self.namespace(&ns);
        let labels = match translate::pod_labels(&self.settings.cluster, pod, namespace.as_deref())
        {
            Ok(l) => l,
            Err(e) => {
                self.metrics.inc(m::SKIPPED_PODS, &["invalid-labels"]);
                tracing::warn!(pod = format!("{ns}/{}", pod.name_any()), error = %e, "pod has no endpoint");
                return Ok(None);
            }
        };
        let canonical = labels.canonical();
        let identity = self.identity_for(labels).await?;
        let mut items = Vec::with_capacity(ips.len());
        for ip in ips {
            let ep = Endpoint {
                cluster: self.settings.cluster.clone(),
                ip,
                identity,
                node: node.clone(),
                pod: Some(PodRef {
                    namespace: ns.clone(),
                    name: pod.name_any(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                }),
            };
            items.push((keys::object(Scope::State, &ep), ep.encode()));
        }
        Ok(Some((items, canonical)))
    }

    /// Every pod from scratch.
    pub(super) async fn desired_endpoints(
        &mut self,
        out: &mut BTreeMap<String, Vec<u8>>,
    ) -> anyhow::Result<()> {
        for e in self.identities.values_mut() {
            e.users = 0;
        }
        self.pod_keys.clear();
        self.key_owner.clear();
        let mut pods = self.pods.state();
        // Deterministic when two pods claim one address (a reused IP): the newest wins.
        pods.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .cmp(&b.metadata.creation_timestamp)
        });
        for pod in pods {
            let Some((items, canonical)) = self.pod_export(&pod).await? else {
                continue;
            };
            self.use_identity(&canonical);
            let r = ObjectRef::from_obj(pod.as_ref());
            let keys = items.iter().map(|(k, _)| k.clone()).collect();
            for (k, v) in items {
                self.key_owner.insert(k.clone(), r.clone());
                out.insert(k, v);
            }
            self.pod_keys.insert(r, (keys, canonical));
        }
        let now = Instant::now();
        for e in self.identities.values_mut() {
            if e.users == 0 {
                e.unused_since.get_or_insert(now);
            }
        }
        Ok(())
    }

    /// Only the pods that changed: their endpoints are written or removed, the identities
    /// they use are updated; nothing else is recomputed.
    pub(super) async fn pods_incremental(&mut self) -> anyhow::Result<()> {
        // The reflector task adds to the set; this pass takes what is there now.
        let refs = self.dirty.take_pods();
        let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
        let mut candidates = Vec::new();
        for r in refs {
            if let Some((keys, canonical)) = self.pod_keys.remove(&r) {
                for k in keys {
                    if self.key_owner.get(&k) == Some(&r) {
                        self.key_owner.remove(&k);
                        candidates.push(k);
                    }
                }
                self.unuse_identity(&canonical);
            }
            let Some(pod) = self.pods.get(&r) else {
                continue;
            };
            let Some((items, canonical)) = self.pod_export(&pod).await? else {
                continue;
            };
            self.use_identity(&canonical);
            let keys = items.iter().map(|(k, _)| k.clone()).collect();
            for (k, v) in items {
                self.key_owner.insert(k.clone(), r.clone());
                puts.push((k, v));
            }
            self.pod_keys.insert(r, (keys, canonical));
        }
        let deletes: Vec<String> = candidates
            .into_iter()
            .filter(|k| !self.key_owner.contains_key(k))
            .collect();
        // Identities first, so that an endpoint is never exported before its identity.
        let (identities, _) = self.desired(Kind::Identities).await?;
        self.apply(Kind::Identities, identities).await?;
        let started = Instant::now();
        let wrote = !puts.is_empty() || !deletes.is_empty();
        if !puts.is_empty() {
            let n = puts.len();
            self.session
                .put_many(puts)
                .await
                .context("write endpoints")?;
            self.metrics
                .add(m::KEYS_WRITTEN, &["endpoints", "put"], n as f64);
        }
        if !deletes.is_empty() {
            self.session
                .delete_many(&deletes)
                .await
                .context("delete endpoints")?;
            self.metrics.add(
                m::KEYS_WRITTEN,
                &["endpoints", "delete"],
                deletes.len() as f64,
            );
        }
        if wrote {
            self.metrics.observe(
                m::WRITE_SECONDS,
                &["endpoints"],
                started.elapsed().as_secs_f64(),
            );
        }
        self.metrics
            .set(m::EXPORTED, &["endpoints"], self.key_owner.len() as f64);
        Ok(())
    }
}
