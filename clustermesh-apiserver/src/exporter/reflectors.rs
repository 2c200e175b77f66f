//! The exporter's reflectors: one watch per kind it reads (Services, EndpointSlices, Pods,
//! Namespaces, Nodes), slimmed to what it reads, each change marking the kinds it affects
//! dirty. Must not write anything: it only keeps the Kubernetes side in memory.

use std::sync::Arc;

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node as K8sNode, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use model::status::ApiserverPhase;
use telemetry::metrics::Registry;

use super::dirty::{DIRTY_NODES, DIRTY_PODS, DIRTY_SERVICES, Dirty, on_change};
use crate::metrics as m;
use crate::readiness;

/// What the reflectors hold.
pub(super) struct Reflectors {
    pub(super) services: Store<Service>,
    pub(super) slices: Store<EndpointSlice>,
    pub(super) pods: Store<Pod>,
    pub(super) namespaces: Store<Namespace>,
    pub(super) nodes: Store<K8sNode>,
    /// Stops them when dropped.
    pub(super) tasks: Tasks,
}

impl Reflectors {
    /// Starts one reflector per kind; their changes mark `dirty`.
    pub(super) fn start(client: &kube::Client, dirty: &Arc<Dirty>, metrics: &Registry) -> Self {
        let (services, t1) = reflect(
            Api::<Service>::all(client.clone()),
            slim_meta,
            on_change(dirty, DIRTY_SERVICES),
            metrics.clone(),
        );
        let (slices, t2) = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            slim_meta,
            on_change(dirty, DIRTY_SERVICES),
            metrics.clone(),
        );
        let (pods, t3) = reflect(
            Api::<Pod>::all(client.clone()),
            slim_pod,
            {
                let dirty = Arc::clone(dirty);
                move |ev: &watcher::Event<Pod>| match ev {
                    watcher::Event::Apply(p) | watcher::Event::Delete(p) => dirty.pod(p),
                    watcher::Event::InitDone => dirty.mark(DIRTY_PODS),
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            },
            metrics.clone(),
        );
        let (namespaces, t4) = reflect(
            Api::<Namespace>::all(client.clone()),
            slim_meta,
            on_change(dirty, DIRTY_SERVICES | DIRTY_PODS),
            metrics.clone(),
        );
        let (nodes, t5) = reflect(
            Api::<K8sNode>::all(client.clone()),
            slim_meta,
            on_change(dirty, DIRTY_NODES),
            metrics.clone(),
        );
        Self {
            services,
            slices,
            pods,
            namespaces,
            nodes,
            tasks: Tasks(vec![t1, t2, t3, t4, t5]),
        }
    }

    /// Waits until every reflector has listed once, saying in `ready` which one it waits for.
    pub(super) async fn wait_listed(&self, ready: &readiness::Sender) -> anyhow::Result<()> {
        for (what, wait) in [
            ("services", self.services.wait_until_ready().boxed()),
            ("endpointslices", self.slices.wait_until_ready().boxed()),
            ("pods", self.pods.wait_until_ready().boxed()),
            ("namespaces", self.namespaces.wait_until_ready().boxed()),
            ("nodes", self.nodes.wait_until_ready().boxed()),
        ] {
            readiness::set(
                ready,
                ApiserverPhase::Syncing,
                Some(format!("waiting for the initial list of {what}")),
                None,
            );
            wait.await
                .with_context(|| format!("initial list of {what}"))?;
        }
        Ok(())
    }
}

/// Aborts the reflector tasks when the exporter is dropped (leadership lost, shutdown).
pub(super) struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn reflect<K>(
    api: Api<K>,
    slim: fn(&mut K),
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
    metrics: Registry,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    // Only what the exporter reads is kept in memory.
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(slim),
    )
    .default_backoff();
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                // The store already holds the change when the event comes out.
                Ok(ev) => on_event(&ev),
                Err(e) => {
                    metrics.inc(m::ERRORS, &["kubernetes"]);
                    tracing::warn!(kind = K::kind(&K::DynamicType::default()).as_ref(), error = %e, "watch failed; retrying");
                }
            }
        }
    });
    (reader, task)
}

/// Drops what no exporter path reads: managed fields (often the largest part of an object).
fn slim_meta<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// A pod as the exporter needs it: identity labels, node, host networking, phase, addresses.
fn slim_pod(p: &mut Pod) {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    p.metadata.managed_fields = None;
    p.metadata.annotations = None;
    p.metadata.owner_references = None;
    p.spec = p.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        ..Default::default()
    });
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..Default::default()
    });
}
