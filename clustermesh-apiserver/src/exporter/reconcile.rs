//! Reconcile: the desired keys of the dirty kinds, diffed against what the etcd session holds,
//! and only the difference written; the initial pass, which also removes what an earlier run
//! left and then writes the synced markers. Must not write outside `state/<own cluster>/`.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Context;
use model::Identity;
use model::keys::{self, Kind, Scope};
use wire::Codec;

use super::dirty::{DIRTY_GC, DIRTY_NODES, DIRTY_POD_SET, DIRTY_PODS, DIRTY_SERVICES};
use super::identities::IdentityEntry;
use super::{Exporter, encode, translate};
use crate::metrics as m;

impl Exporter {
    pub(super) async fn initial_sync(&mut self) -> anyhow::Result<()> {
        let cluster = self.settings.cluster.clone();
        // Identities this cluster exported before keep their IDs and get a fresh grace period.
        let (existing, _) = self
            .kv
            .list_raw(&keys::cluster_prefix(Scope::State, &cluster))
            .await?;
        let now = Instant::now();
        let services_prefix = keys::kind_prefix(Scope::State, &cluster, Kind::Services);
        self.previous_services = existing
            .iter()
            .filter(|kv| kv.key.starts_with(&services_prefix))
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        let ids_prefix = keys::kind_prefix(Scope::State, &cluster, Kind::Identities);
        for kv in existing.iter().filter(|kv| kv.key.starts_with(&ids_prefix)) {
            if let Ok(identity) = Identity::decode(&kv.value) {
                self.identities.insert(
                    identity.labels.canonical(),
                    IdentityEntry {
                        id: identity.id,
                        labels: identity.labels,
                        users: 0,
                        unused_since: Some(now),
                    },
                );
            }
        }
        let mut desired = BTreeMap::new();
        for kind in [
            Kind::Services,
            Kind::Nodes,
            Kind::Endpoints,
            Kind::Identities,
        ] {
            let (kind_desired, _) = self.desired(kind).await?;
            desired.extend(kind_desired);
        }
        // Keys left by an earlier run that this cluster no longer exports.
        let synced_prefix = format!("{}synced/", keys::cluster_prefix(Scope::State, &cluster));
        let stale: Vec<String> = existing
            .into_iter()
            .map(|kv| kv.key)
            .filter(|k| !k.starts_with(&synced_prefix) && !desired.contains_key(k))
            .collect();
        // Identities first, so that an endpoint is never exported before its identity.
        for kind in [
            Kind::Identities,
            Kind::Nodes,
            Kind::Endpoints,
            Kind::Services,
        ] {
            let prefix = keys::kind_prefix(Scope::State, &cluster, kind);
            let items: Vec<(String, Vec<u8>)> = desired
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            self.metrics
                .set(m::EXPORTED, &[kind.as_str()], items.len() as f64);
            let started = Instant::now();
            let held = self.session.held(&prefix).await;
            let puts = items.iter().filter(|(k, v)| held.get(k) != Some(v)).count();
            self.session
                .put_many(items)
                .await
                .with_context(|| format!("write {kind}"))?;
            self.metrics
                .add(m::KEYS_WRITTEN, &[kind.as_str(), "put"], puts as f64);
            self.metrics.observe(
                m::WRITE_SECONDS,
                &[kind.as_str()],
                started.elapsed().as_secs_f64(),
            );
        }
        if !stale.is_empty() {
            tracing::info!(keys = stale.len(), "removing keys no longer exported");
            self.session
                .delete_many(&stale)
                .await
                .context("remove stale keys")?;
            for kind in Kind::ALL {
                let prefix = keys::kind_prefix(Scope::State, &cluster, kind);
                let n = stale.iter().filter(|k| k.starts_with(&prefix)).count();
                if n > 0 {
                    self.metrics
                        .add(m::KEYS_WRITTEN, &[kind.as_str(), "delete"], n as f64);
                }
            }
        }
        // From now on the session holds what is exported; an earlier run's values would be
        // stale (a service deleted and created again must not get them back).
        self.previous_services.clear();
        let rev = self.kv.current_revision().await?;
        for kind in Kind::ALL {
            self.session
                .mark_synced(Scope::State, &cluster, kind, rev)
                .await?;
        }
        Ok(())
    }

    /// Recomputes the dirty kinds and writes the differences.
    pub(super) async fn pass(&mut self, bits: u8) -> anyhow::Result<()> {
        if bits & DIRTY_PODS != 0 {
            // A full recompute covers the pods that changed individually.
            self.dirty.take_pods();
        } else if bits & DIRTY_POD_SET != 0 {
            self.pods_incremental().await?;
        } else if bits & (DIRTY_PODS | DIRTY_GC) == DIRTY_GC {
            let (identities, _) = self.desired(Kind::Identities).await?;
            self.apply(Kind::Identities, identities).await?;
        }
        let mut kinds = Vec::new();
        if bits & DIRTY_PODS != 0 {
            // Identities before the endpoints that use them.
            kinds.push(Kind::Identities);
            kinds.push(Kind::Endpoints);
        }
        if bits & DIRTY_NODES != 0 {
            kinds.push(Kind::Nodes);
        }
        if bits & DIRTY_SERVICES != 0 {
            kinds.push(Kind::Services);
        }
        let mut computed = HashMap::new();
        if bits & DIRTY_PODS != 0 {
            // Endpoints allocate identities; compute them first, then identities.
            let (endpoints, _) = self.desired(Kind::Endpoints).await?;
            computed.insert(Kind::Endpoints, endpoints);
            let (identities, _) = self.desired(Kind::Identities).await?;
            computed.insert(Kind::Identities, identities);
        }
        for kind in kinds {
            let desired = match computed.remove(&kind) {
                Some(d) => d,
                None => self.desired(kind).await?.0,
            };
            self.apply(kind, desired).await?;
        }
        Ok(())
    }

    pub(super) async fn apply(
        &mut self,
        kind: Kind,
        desired: BTreeMap<String, Vec<u8>>,
    ) -> anyhow::Result<()> {
        let prefix = keys::kind_prefix(Scope::State, &self.settings.cluster, kind);
        let held = self.session.held(&prefix).await;
        let puts: Vec<(String, Vec<u8>)> = desired
            .iter()
            .filter(|(k, v)| held.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let deletes: Vec<String> = held
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        self.metrics
            .set(m::EXPORTED, &[kind.as_str()], desired.len() as f64);
        if puts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        if !puts.is_empty() {
            self.session
                .put_many(puts.clone())
                .await
                .with_context(|| format!("write {kind}"))?;
        }
        if !deletes.is_empty() {
            self.session
                .delete_many(&deletes)
                .await
                .with_context(|| format!("delete {kind}"))?;
        }
        self.metrics.observe(
            m::WRITE_SECONDS,
            &[kind.as_str()],
            started.elapsed().as_secs_f64(),
        );
        self.metrics
            .add(m::KEYS_WRITTEN, &[kind.as_str(), "put"], puts.len() as f64);
        self.metrics.add(
            m::KEYS_WRITTEN,
            &[kind.as_str(), "delete"],
            deletes.len() as f64,
        );
        tracing::debug!(%kind, puts = puts.len(), deletes = deletes.len(), "exported");
        Ok(())
    }

    /// The keys and values `kind` should have now.
    pub(super) async fn desired(
        &mut self,
        kind: Kind,
    ) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, ())> {
        let mut out = BTreeMap::new();
        match kind {
            Kind::Services => self.desired_services(&mut out).await,
            Kind::Nodes => {
                for n in self.nodes.state() {
                    if let Some(node) = translate::node(&self.settings.cluster, &n) {
                        encode(&mut out, &node);
                    }
                }
            }
            Kind::Endpoints => self.desired_endpoints(&mut out).await?,
            Kind::Identities => self.desired_identities(&mut out).await,
        }
        Ok((out, ()))
    }
}
