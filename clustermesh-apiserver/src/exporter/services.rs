//! Global services: every Service with its EndpointSlices through [`translate::service`]; a
//! refused one keeps its last good export, is listed in the status document and reported once
//! per problem (log, metric, Warning Event). Must not erase a good export for bad input.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use model::keys::{self, Kind, Scope};

use super::{Exporter, encode, translate};
use crate::metrics as m;

impl Exporter {
    pub(super) async fn desired_services(&mut self, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut by_service: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for s in self.slices.state() {
            let Some(svc) = s.labels().get(translate::SERVICE_NAME_LABEL).cloned() else {
                continue;
            };
            by_service
                .entry((s.namespace().unwrap_or_default(), svc))
                .or_default()
                .push(s);
        }
        let mut still_bad = HashMap::new();
        let mut rejected = Vec::new();
        for svc in self.services.state() {
            let ns = svc.namespace().unwrap_or_default();
            let key = (ns.clone(), svc.name_any());
            let namespace = self.namespace(&ns);
            let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
            match translate::service(
                &self.settings.cluster,
                &svc,
                namespace.as_deref(),
                slices.iter().map(AsRef::as_ref),
            ) {
                Ok(Some(gs)) => encode(out, &gs),
                Ok(None) => {}
                Err(e) => {
                    let id = format!("{}/{}", key.0, key.1);
                    let message = e.to_string();
                    // Bad input never erases good state: what was exported stays.
                    let exported_key =
                        keys::object_key(Scope::State, &self.settings.cluster, Kind::Services, &id);
                    let kept = match self.session.held_value(&exported_key).await {
                        Some(v) => Some(v),
                        None => self.previous_services.get(&exported_key).cloned(),
                    };
                    let kept_previous = kept.is_some();
                    if let Some(value) = kept {
                        out.insert(exported_key, value);
                    }
                    if self.reported.get(&id) != Some(&message) {
                        self.metrics.inc(m::INVALID_SERVICES, &[e.reason()]);
                        if kept_previous {
                            tracing::warn!(service = %id, reason = e.reason(), error = %message, "service refused; its last good export stays");
                        } else {
                            tracing::warn!(service = %id, reason = e.reason(), error = %message, "service not exported");
                        }
                        self.warn_event(&svc, e.reason(), &message).await;
                    }
                    rejected.push(model::status::RejectedService {
                        service: id.clone(),
                        reason: e.reason().to_owned(),
                        message: message.clone(),
                        kept_previous,
                    });
                    still_bad.insert(id, message);
                }
            }
        }
        rejected.sort_by(|a, b| a.service.cmp(&b.service));
        rejected.truncate(model::status::MAX_LISTED_SERVICES);
        match self.settings.rejected.lock() {
            Ok(mut r) => *r = rejected,
            Err(p) => *p.into_inner() = rejected,
        }
        self.reported = still_bad;
    }
}
