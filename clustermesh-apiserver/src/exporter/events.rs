//! Warning Events about the Services the exporter refuses. Must not fail the pass: an Event
//! that cannot be written is logged and counted.

use k8s_openapi::api::core::v1::{Event, ObjectReference, Service};
use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};

use super::Exporter;
use crate::metrics as m;

impl Exporter {
    pub(super) async fn warn_event(&self, svc: &Service, reason: &str, message: &str) {
        let ns = svc.namespace().unwrap_or_default();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let event = Event {
            metadata: kube::api::ObjectMeta {
                generate_name: Some(format!("{}.", svc.name_any())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some(Service::api_version(&()).into_owned()),
                kind: Some(Service::kind(&()).into_owned()),
                name: Some(svc.name_any()),
                namespace: Some(ns.clone()),
                uid: svc.uid(),
                resource_version: svc.resource_version(),
                ..Default::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("clustermesh-apiserver".into()),
                host: None,
            }),
            reporting_component: Some("clustermesh-apiserver".into()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            self.metrics.inc(m::ERRORS, &["events"]);
            tracing::warn!(error = %e, "could not record a Warning event");
        }
    }
}
