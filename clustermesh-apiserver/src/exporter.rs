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

pub mod translate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    Event, Namespace, Node as K8sNode, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::PostParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use kvstore::Session;
use kvstore::alloc::Allocator;
use model::keys::{self, Kind, Scope};
use model::status::ApiserverPhase;
use model::{ClusterId, ClusterName, Endpoint, Identity, Labels, NumericIdentity, PodRef};
use telemetry::metrics::Registry;
use tokio::sync::Notify;
use wire::Codec;

use crate::metrics as m;
use crate::readiness;

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
}

/// The services the exporter currently refuses to export, by `namespace/name`.
pub type Rejected = std::sync::Arc<std::sync::Mutex<Vec<model::status::RejectedService>>>;

const DIRTY_SERVICES: u8 = 1;
/// Every pod: a full recompute of endpoints (relist, namespace labels changed).
const DIRTY_PODS: u8 = 2;
const DIRTY_NODES: u8 = 4;
/// Only the pods in [`Dirty::pods`].
const DIRTY_POD_SET: u8 = 8;
/// Identity garbage collection.
const DIRTY_GC: u8 = 16;

/// Which kinds need a recompute, and a wake-up for the loop.
#[derive(Debug, Default)]
struct Dirty {
    bits: AtomicU8,
    notify: Notify,
    pods: std::sync::Mutex<HashSet<ObjectRef<Pod>>>,
}

impl Dirty {
    fn mark(&self, bits: u8) {
        self.bits.fetch_or(bits, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn pod(&self, pod: &Pod) {
        match self.pods.lock() {
            Ok(mut g) => g.insert(ObjectRef::from_obj(pod)),
            Err(p) => p.into_inner().insert(ObjectRef::from_obj(pod)),
        };
        self.mark(DIRTY_POD_SET);
    }

    fn take_pods(&self) -> HashSet<ObjectRef<Pod>> {
        match self.pods.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    fn take(&self) -> u8 {
        self.bits.swap(0, Ordering::SeqCst)
    }
}

/// Aborts the reflector tasks when the exporter is dropped (leadership lost, shutdown).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

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

struct IdentityEntry {
    id: NumericIdentity,
    labels: Labels,
    /// Pods using it.
    users: usize,
    unused_since: Option<Instant>,
}

/// Marks `bits` dirty on every change after the initial listing.
fn on_change<K>(dirty: &Arc<Dirty>, bits: u8) -> impl Fn(&watcher::Event<K>) + Send + 'static {
    let dirty = Arc::clone(dirty);
    move |ev| {
        if !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
            dirty.mark(bits);
        }
    }
}

/// The exporter while it leads.
struct Exporter {
    settings: Settings,
    client: kube::Client,
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
    let (services, t1) = reflect(
        Api::<Service>::all(client.clone()),
        slim_meta,
        on_change(&dirty, DIRTY_SERVICES),
        metrics.clone(),
    );
    let (slices, t2) = reflect(
        Api::<EndpointSlice>::all(client.clone()),
        slim_meta,
        on_change(&dirty, DIRTY_SERVICES),
        metrics.clone(),
    );
    let (pods, t3) = reflect(
        Api::<Pod>::all(client.clone()),
        slim_pod,
        {
            let dirty = Arc::clone(&dirty);
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
        on_change(&dirty, DIRTY_SERVICES | DIRTY_PODS),
        metrics.clone(),
    );
    let (nodes, t5) = reflect(
        Api::<K8sNode>::all(client.clone()),
        slim_meta,
        on_change(&dirty, DIRTY_NODES),
        metrics.clone(),
    );
    let _tasks = Tasks(vec![t1, t2, t3, t4, t5]);
    for (what, wait) in [
        ("services", services.wait_until_ready().boxed()),
        ("endpointslices", slices.wait_until_ready().boxed()),
        ("pods", pods.wait_until_ready().boxed()),
        ("namespaces", namespaces.wait_until_ready().boxed()),
        ("nodes", nodes.wait_until_ready().boxed()),
    ] {
        readiness::set(
            &ready,
            ApiserverPhase::Syncing,
            Some(format!("waiting for the initial list of {what}")),
            None,
        );
        wait.await
            .with_context(|| format!("initial list of {what}"))?;
    }

    let mut ex = Exporter {
        settings,
        client,
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
        dirty: Arc::clone(&dirty),
        pod_keys: HashMap::new(),
        key_owner: HashMap::new(),
    };
    // The initial pass covers every pod.
    dirty.take_pods();
    readiness::set(
        &ready,
        ApiserverPhase::Syncing,
        Some("writing the initial state".into()),
        None,
    );
    ex.initial_sync().await?;
    readiness::set(&ready, ApiserverPhase::Ready, None, None);
    tracing::info!(cluster = %ex.settings.cluster, "initial state exported; synced markers written");

    let gc_every = (ex.settings.identity_gc_grace / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut gc = tokio::time::interval(gc_every);
    let mut liveness = ex.session.liveness();
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
                set_phase(&ready, &liveness.borrow_and_update(), failing.as_ref());
                continue;
            }
        }
        let bits = dirty.take();
        if bits == 0 {
            continue;
        }
        ex.metrics.inc(m::PASSES, &[]);
        match ex.pass(bits).await {
            Ok(()) => {
                retry.healthy();
                if failing.take().is_some() {
                    tracing::info!("reconcile pass succeeded again");
                    set_phase(&ready, &liveness.borrow(), None);
                }
            }
            Err(e) => {
                // Keep what was written; the failed kinds are retried on the next pass.
                ex.metrics.inc(m::ERRORS, &["etcd"]);
                let error = telemetry::chain(e.as_ref()).to_string();
                let delay = retry.next_delay();
                // One line per outage and per changed error, not one per retry.
                if failing.as_ref().is_none_or(|(_, old)| *old != error) {
                    tracing::warn!(error = %error, retry_in = ?delay, "reconcile pass failed; retrying with backoff");
                }
                let since = failing.as_ref().map_or_else(unix_ms, |(t, _)| *t);
                failing = Some((since, error));
                set_phase(&ready, &liveness.borrow(), failing.as_ref());
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

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The phase of a leading exporter whose initial state is written: not ready while etcd does
/// not answer keep-alives (past the lease TTL: the lease is lost) or refuses writes, since when
/// the condition began (the exported state stays in etcd meanwhile).
fn phase(
    liveness: &kvstore::session::Liveness,
    failing: Option<&(i64, String)>,
) -> (ApiserverPhase, Option<(i64, String)>) {
    use kvstore::session::Liveness;
    match (liveness, failing) {
        (
            Liveness::Unreachable {
                since_unix_ms,
                error,
            },
            _,
        ) => (
            ApiserverPhase::EtcdUnreachable,
            Some((
                *since_unix_ms,
                format!("etcd unreachable: {error}; exported state kept"),
            )),
        ),
        (
            Liveness::LeaseLost {
                since_unix_ms,
                error,
            },
            _,
        ) => (
            ApiserverPhase::LeaseLost,
            Some((
                *since_unix_ms,
                format!(
                    "session lease lost (etcd unreachable for longer than its TTL, or it could not be re-created): {error}; peers see no heartbeat, exported state kept"
                ),
            )),
        ),
        (Liveness::Alive, Some((since, error))) => (
            ApiserverPhase::EtcdWritesFailing,
            Some((
                *since,
                format!("etcd writes failing: {error}; exported state kept"),
            )),
        ),
        (Liveness::Alive, None) => (ApiserverPhase::Ready, None),
    }
}

fn set_phase(
    ready: &readiness::Sender,
    liveness: &kvstore::session::Liveness,
    failing: Option<&(i64, String)>,
) {
    match phase(liveness, failing) {
        (p, Some((since_ms, reason))) => {
            readiness::set(ready, p, Some(reason), Some(since_ms / 1000))
        }
        (p, None) => readiness::set(ready, p, None, None),
    }
}

fn encode<T: Codec>(out: &mut BTreeMap<String, Vec<u8>>, object: &T) {
    out.insert(keys::object(Scope::State, object), object.encode());
}

impl Exporter {
    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&reflector::ObjectRef::new(name))
    }

    async fn initial_sync(&mut self) -> anyhow::Result<()> {
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
    async fn pass(&mut self, bits: u8) -> anyhow::Result<()> {
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

    async fn apply(
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
    async fn desired(&mut self, kind: Kind) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, ())> {
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

    async fn desired_services(&mut self, out: &mut BTreeMap<String, Vec<u8>>) {
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

    async fn warn_event(&self, svc: &Service, reason: &str, message: &str) {
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

    async fn identity_for(&mut self, labels: Labels) -> anyhow::Result<NumericIdentity> {
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

    fn use_identity(&mut self, canonical: &str) {
        if let Some(e) = self.identities.get_mut(canonical) {
            e.users += 1;
            e.unused_since = None;
        }
    }

    fn unuse_identity(&mut self, canonical: &str) {
        if let Some(e) = self.identities.get_mut(canonical) {
            e.users = e.users.saturating_sub(1);
            if e.users == 0 {
                e.unused_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// The endpoint keys and values of one pod and its identity's canonical labels; allocates
    /// the identity if it is new. `None` for pods without endpoints.
    async fn pod_export(
        &mut self,
        pod: &Pod,
    ) -> anyhow::Result<Option<(Vec<(String, Vec<u8>)>, String)>> {
        let Some((node, ips)) = translate::pod_addresses(pod) else {
            return Ok(None);
        };
        let ns = pod.namespace().unwrap_or_default();
        let namespace = self.namespace(&ns);
        let labels = match translate::pod_labels(&self.settings.cluster, pod, namespace.as_deref()) {
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
    async fn desired_endpoints(
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
    async fn pods_incremental(&mut self) -> anyhow::Result<()> {
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

    /// Identities in use, and unused ones still within their grace period; releases the rest.
    async fn desired_identities(&mut self, out: &mut BTreeMap<String, Vec<u8>>) {
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
