//! Warning Events about the Services the exporter refuses, through kube-runtime's
//! [`Recorder`]: `events.k8s.io/v1` Events, a repeat of the same reason for the same Service
//! aggregated into the first Event's series (count, last observed) instead of a new Event.
//! Must not fail the pass: an Event that cannot be written is logged and counted.

use k8s_openapi::api::core::v1::Service;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::Exporter;
use crate::metrics as m;

/// The component that reports the Events (`reportingController`).
pub(super) const REPORTER: &str = "clustermesh-apiserver";

/// The Event recorder of one replica (`reportingInstance`: the replica's name).
pub(super) fn recorder(client: kube::Client, replica: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: REPORTER.into(),
            instance: Some(replica.to_owned()),
        },
    )
}

impl Exporter {
    /// Records a Warning Event about `svc`: `reason` (PascalCase) and `message`.
    pub(super) async fn warn_event(&self, svc: &Service, reason: &str, message: &str) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(message.to_owned()),
            action: "Export".into(),
            secondary: None,
        };
        if let Err(e) = self.events.publish(&event, &svc.object_ref(&())).await {
            self.metrics.inc(m::ERRORS, &["events"]);
            tracing::warn!(error = %e, "could not record a Warning event");
        }
    }
}
