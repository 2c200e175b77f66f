//! Identities: allocated per distinct label set, counted by the pods that use them, released
//! once unused for the grace period (garbage collection). Must not release an identity a pod
//! still uses.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use model::{Identity, Labels, NumericIdentity};

use super::{Exporter, encode};
use crate::metrics as m;

pub(super) struct IdentityEntry {
    pub(super) id: NumericIdentity,
    pub(super) labels: Labels,
    /// Pods using it.
    pub(super) users: usize,
    pub(super) unused_since: Option<Instant>,
}

impl Exporter {
    pub(super) async fn identity_for(&mut self, labels: Labels) -> anyhow::Result<NumericIdentity> {
        let canonical = labels.canonical();
        if let Some(e) = self.identities.get_mut(&canonical) {
            e.unused_since = None;
            return Ok(e.id);
        }
        let id = self
            .allocator
            .allocate(&labels)
            .await
            .context("allocate an identity")?;
        self.identities.insert(
            canonical,
            IdentityEntry {
                id,
                labels,
                users: 0,
                unused_since: None,
            },
        );
        Ok(id)
    }

    pub(super) fn use_identity(&mut self, canonical: &str) {
        if let Some(e) = self.identities.get_mut(canonical) {
            e.users += 1;
            e.unused_since = None;
        }
    }

    pub(super) fn unuse_identity(&mut self, canonical: &str) {
        if let Some(e) = self.identities.get_mut(canonical) {
            e.users = e.users.saturating_sub(1);
            if e.users == 0 {
                e.unused_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Identities in use, and unused ones still within their grace period; releases the rest.
    pub(super) async fn desired_identities(&mut self, out: &mut BTreeMap<String, Vec<u8>>) {
        let grace = self.settings.identity_gc_grace;
        let expired: Vec<String> = self
            .identities
            .iter()
            .filter(|(_, e)| e.unused_since.is_some_and(|t| t.elapsed() >= grace))
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            let Some(e) = self.identities.remove(&k) else {
                continue;
            };
            match self.allocator.release(e.id, &e.labels).await {
                Ok(_) => {
                    self.metrics.inc(m::IDENTITIES_RELEASED, &[]);
                    tracing::info!(identity = %e.id, labels = %k, "released an unused identity");
                }
                Err(err) => {
                    self.metrics.inc(m::ERRORS, &["identities"]);
                    tracing::warn!(identity = %e.id, error = %telemetry::chain(&err), "could not release an identity; retrying");
                    self.identities.insert(k, e);
                }
            }
        }
        for e in self.identities.values() {
            encode(
                out,
                &Identity {
                    cluster: self.settings.cluster.clone(),
                    id: e.id,
                    labels: e.labels.clone(),
                },
            );
        }
    }
}
