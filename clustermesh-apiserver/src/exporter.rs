//! The exporter: this cluster's Kubernetes objects → the mesh state in etcd.
//!
//! Reflectors keep the Services, EndpointSlices, Pods, Namespaces and Nodes in memory. Every
//! change marks the kinds it affects dirty; one reconcile loop recomputes the desired keys of
//! the dirty kinds from the reflectors, diffs them against the keys its etcd session holds and
//! writes only the difference, in transactions of up to [`kvstore::MAX_TXN_OPS`] keys. Changes
//! that arrive while a pass is writing are coalesced into the next pass: a burst of 10,000
//! changes becomes a handful of passes, not 10,000 round trips.
//!
//! The initial pass runs once every reflector has listed, removes keys this cluster no longer
//! exports (left by an earlier run), and only then writes the synced markers. A restarted
//! exporter adopts its predecessor's etcd lease while it is alive, so keys that did not change
//! are neither rewritten nor deleted.

mod dirty;
mod endpoints;
mod events;
mod identities;
mod phase;
mod reconcile;
mod reflectors;
mod services;
pub mod translate;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Node as K8sNode, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kvstore::Session;
use kvstore::alloc::Allocator;
use model::keys::{self, Scope};
use model::status::ApiserverPhase;
use model::{ClusterId, ClusterName};
use telemetry::metrics::Registry;
use wire::Codec;

use crate::metrics as m;
use crate::readiness;
use dirty::{DIRTY_GC, DIRTY_POD_SET, DIRTY_PODS, Dirty};
use identities::IdentityEntry;
use reflectors::Reflectors;

/// What the exporter needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// TTL of the etcd lease exported keys are attached to.
    pub lease_ttl: Duration,
    /// How long an identity no pod uses is kept before it is released.
    pub identity_gc_grace: Duration,
    /// Where the services it refuses to export are shown (the status document reads it).
    pub rejected: Rejected,
    /// This replica's name, as its Events report it.
    pub replica: String,
}

/// The services the exporter currently refuses to export, by `namespace/name`.
pub type Rejected = std::sync::Arc<std::sync::Mutex<Vec<model::status::RejectedService>>>;

/// The exporter while it leads.
struct Exporter {
    settings: Settings,
    kv: kvstore::Client,
    session: Session,
    allocator: Allocator,
    metrics: Registry,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    nodes: Store<K8sNode>,
    /// By canonical label text.
    identities: BTreeMap<String, IdentityEntry>,
    /// Services reported as invalid, with the message, so each problem is reported once.
    reported: HashMap<String, String>,
    /// The services' keys and values found in etcd at start, for the initial sync only: a
    /// service refused before this process exported it keeps what an earlier run exported.
    previous_services: BTreeMap<String, Vec<u8>>,
    dirty: Arc<Dirty>,
    /// The endpoint keys of each pod, and its identity's canonical labels.
    pod_keys: HashMap<ObjectRef<Pod>, (Vec<String>, String)>,
    /// Which pod an endpoint key belongs to (an address can move between pods).
    key_owner: HashMap<String, ObjectRef<Pod>>,
    /// Warning Events, aggregated into series.
    events: kube::runtime::events::Recorder,
    /// The reflector tasks, stopped with the exporter.
    _reflectors: reflectors::Tasks,
}

/// Runs the exporter until an unrecoverable error; stop it by dropping the future. `ready` is
/// set once the initial state and its synced markers are in etcd.
pub async fn run(
    settings: Settings,
    client: kube::Client,
    kv: kvstore::Client,
    metrics: Registry,
    ready: readiness::Sender,
) -> anyhow::Result<()> {
    let mut ex = Exporter::start(settings, client, kv, metrics, &ready).await?;
    ex.export_initial_state(&ready).await?;
    ex.reconcile_loop(&ready).await
}

impl Exporter {
    /// Resumes the etcd session, starts the allocator and the reflectors, and waits until every
    /// reflector has listed.
    async fn start(
        settings: Settings,
        client: kube::Client,
        kv: kvstore::Client,
        metrics: Registry,
        ready: &readiness::Sender,
    ) -> anyhow::Result<Self> {
        let cluster = settings.cluster.clone();
        let (session, adopted) = Session::resume(
            &kv,
            settings.lease_ttl,
            &keys::session(&cluster),
            &keys::cluster_prefix(Scope::State, &cluster),
        )
        .await
        .context("start the etcd session")?;
        let lease = session.lease().await;
        tracing::info!(adopted, lease = format_args!("{lease:x}"), "etcd session");
        let allocator = Allocator::new(&kv, cluster.clone(), settings.cluster_id)
            .await
            .context("start the identity allocator")?;

        let dirty = Arc::new(Dirty::default());
        let reflectors = Reflectors::start(&client, &dirty, &metrics);
        reflectors.wait_listed(ready).await?;
        let Reflectors {
            services,
            slices,
            pods,
            namespaces,
            nodes,
            tasks,
        } = reflectors;
        let events = events::recorder(client, &settings.replica);
        Ok(Self {
            settings,
            kv,
            session,
            allocator,
            metrics,
            services,
            slices,
            pods,
            namespaces,
            nodes,
            identities: BTreeMap::new(),
            reported: HashMap::new(),
            previous_services: BTreeMap::new(),
            dirty,
            pod_keys: HashMap::new(),
            key_owner: HashMap::new(),
            events,
            _reflectors: tasks,
        })
    }

    /// The initial pass, then the synced markers; `ready` says so once they are written.
    async fn export_initial_state(&mut self, ready: &readiness::Sender) -> anyhow::Result<()> {
        // The initial pass covers every pod.
        self.dirty.take_pods();
        readiness::set(
            ready,
            ApiserverPhase::Syncing,
            Some("writing the initial state".into()),
            None,
        );
        self.initial_sync().await?;
        readiness::set(ready, ApiserverPhase::Ready, None, None);
        tracing::info!(cluster = %self.settings.cluster, "initial state exported; synced markers written");
        Ok(())
    }

    /// One pass per wake-up (changes, identity GC ticks), coalescing what arrived meanwhile;
    /// a failed pass is retried with backoff and readiness says why.
    async fn reconcile_loop(&mut self, ready: &readiness::Sender) -> anyhow::Result<()> {
        let dirty = Arc::clone(&self.dirty);
        let gc_every = (self.settings.identity_gc_grace / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let mut gc = tokio::time::interval(gc_every);
        let mut liveness = self.session.liveness();
        let mut retry = telemetry::backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
            Duration::from_secs(10),
        );
        // The last failed pass, so that readiness says why while etcd refuses writes.
        let mut failing: Option<(i64, String)> = None;
        loop {
            tokio::select! {
                _ = dirty.notify.notified() => {}
                _ = gc.tick() => dirty.mark(DIRTY_GC),
                changed = liveness.changed() => {
                    if changed.is_err() {
                        anyhow::bail!("the etcd session ended");
                    }
                    phase::set_phase(ready, &liveness.borrow_and_update(), failing.as_ref());
                    continue;
                }
            }
            let bits = dirty.take();
            if bits == 0 {
                continue;
            }
            self.metrics.inc(m::PASSES, &[]);
            match self.pass(bits).await {
                Ok(()) => {
                    retry.healthy();
                    if failing.take().is_some() {
                        tracing::info!("reconcile pass succeeded again");
                        phase::set_phase(ready, &liveness.borrow(), None);
                    }
                }
                Err(e) => {
                    // Keep what was written; the failed kinds are retried on the next pass.
                    self.metrics.inc(m::ERRORS, &["etcd"]);
                    let error = telemetry::chain(e.as_ref()).to_string();
                    let delay = retry.next_delay();
                    // One line per outage and per changed error, not one per retry.
                    if failing.as_ref().is_none_or(|(_, old)| *old != error) {
                        tracing::warn!(error = %error, retry_in = ?delay, "reconcile pass failed; retrying with backoff");
                    }
                    let since = failing.as_ref().map_or_else(phase::unix_ms, |(t, _)| *t);
                    failing = Some((since, error));
                    phase::set_phase(ready, &liveness.borrow(), failing.as_ref());
                    // Incremental state may be ahead of etcd: recompute everything affected.
                    let full = if bits & DIRTY_POD_SET != 0 {
                        DIRTY_PODS
                    } else {
                        0
                    };
                    dirty.mark(bits | full);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&reflector::ObjectRef::new(name))
    }
}

fn encode<T: Codec>(out: &mut BTreeMap<String, Vec<u8>>, object: &T) {
    out.insert(keys::object(Scope::State, object), object.encode());
}
