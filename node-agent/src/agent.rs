//! The node agent at run time: follow the local apiserver's Mesh API, program the datapath,
//! health-check backends.
//!
//! A desired service the datapath cannot hold is refused alone (logged once per change,
//! counted in [`m::SERVICES_REFUSED`], listed in `/state`); the rest is programmed and the
//! agent stays ready. It is not ready when nothing it should serve could be programmed.
//!
//! A lost Mesh API connection changes nothing in the maps (the node keeps serving what it
//! had); the agent reconnects with backoff and reprograms once the new snapshot is complete.
//! Health checks flip a backend's state in the backends map directly: when every backend of a
//! tier is down, the kernel serves the next tier on the very next connect().

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use certs::{Reloader, TlsFiles};
use model::ClusterName;
use model::keys::Kind;
use model::status::{ApiserverLink, NodeService, NodeState, ProgrammedBackend, RefusedService};
use telemetry::metrics::Registry;
use tokio::sync::watch;
use wire::{Codec, pb};

use crate::datapath::Datapath;
use crate::desired::{self, MeshView, Zones};
use crate::maps::{Frontend, Proto};
use crate::program::{DesiredService, Programmer, Reason, Refusal};

/// Metric names.
pub mod m {
    /// Services programmed.
    pub const SERVICES: &str = "clustermesh_datapath_services";
    /// Backends programmed.
    pub const BACKENDS: &str = "clustermesh_datapath_backends";
    /// Map operations, by op (write, delete).
    pub const MAP_OPS: &str = "clustermesh_datapath_map_ops_total";
    /// Backends by health (healthy, unhealthy).
    pub const BACKEND_HEALTH: &str = "clustermesh_datapath_backend_health";
    /// Backends marked unhealthy (each a failover away from them).
    pub const FAILOVERS: &str = "clustermesh_datapath_failovers_total";
    /// Backends marked healthy again.
    pub const RECOVERIES: &str = "clustermesh_datapath_recoveries_total";
    /// Desired services refused (not programmed, or kept as they were), by reason kind
    /// ([`Reason::kind`]).
    pub const SERVICES_REFUSED: &str = "clustermesh_datapath_services_refused";
    /// Desired states not programmed at all (a map operation failed, the IP cache over
    /// capacity).
    pub const REFUSED: &str = "clustermesh_datapath_refused_total";
    /// Mesh API reconnects.
    pub const RECONNECTS: &str = "clustermesh_node_mesh_reconnects_total";
    /// Time to apply a desired state.
    pub const APPLY_SECONDS: &str = "clustermesh_datapath_apply_seconds";
}

/// A registry with the node agent's metrics declared.
pub fn registry() -> Registry {
    let r = Registry::new();
    r.gauge(m::SERVICES, "Services programmed in the datapath.", &[]);
    r.gauge(m::BACKENDS, "Backends programmed in the datapath.", &[]);
    r.counter(m::MAP_OPS, "Map entries written or deleted.", &["op"]);
    r.gauge(
        m::BACKEND_HEALTH,
        "Backends by health: healthy (up or suspect) and unhealthy (confirmed down).",
        &["state"],
    );
    r.counter(m::FAILOVERS, "Backends confirmed down by probes.", &[]);
    r.counter(m::RECOVERIES, "Backends marked healthy again.", &[]);
    r.gauge(
        m::SERVICES_REFUSED,
        "Desired services the datapath refused, by reason.",
        &["reason"],
    );
    for kind in Reason::KINDS {
        r.set(m::SERVICES_REFUSED, &[kind], 0.0);
    }
    r.counter(
        m::REFUSED,
        "Desired states not programmed at all (map failures, IP cache over capacity).",
        &[],
    );
    r.counter(m::RECONNECTS, "Mesh API connections lost.", &[]);
    crate::health::register(&r);
    crate::enforce::register(&r);
    crate::flows::register(&r);
    r.histogram(
        m::APPLY_SECONDS,
        "Time to apply a desired state to the maps.",
        &[],
        telemetry::metrics::LATENCY_BUCKETS,
    );
    r
}

pub use crate::health::HealthConfig;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's cluster.
    pub cluster: ClusterName,
    /// The local apiserver's Mesh API endpoints (`host:port`).
    pub apiserver: Vec<String>,
    /// The node agent's client certificate (`tls.crt`, `tls.key`, `ca.crt`).
    pub tls: TlsFiles,
    /// Pin directory under bpffs.
    pub pin_dir: PathBuf,
    /// The node's cgroup.
    pub cgroup: PathBuf,
    /// How many entries the datapath's maps hold.
    pub sizes: crate::maps::Sizes,
    /// Whether `getpeername()` on a translated TCP socket shows the service (per-socket state,
    /// about 0.7 µs per connect) or the backend.
    pub tcp_peer_rewrite: bool,
    /// Health checks.
    pub health: HealthConfig,
    /// This node's name (its pods are the endpoints policy applies to).
    pub node: model::NodeName,
    /// Policy peer selectors without a cluster label select every cluster (the behaviour
    /// before Cilium 1.19) instead of the policy's own.
    pub policy_any_cluster: bool,
    /// Flow events: `Some(n)` records flows and keeps the last `n` in memory; `None` turns
    /// them off in the kernel.
    pub flows: Option<usize>,
}

/// What `/state` shows besides the maps: the last desired state and what was refused of it.
#[derive(Debug, Default)]
struct Report {
    desired: Mutex<Option<Vec<DesiredService>>>,
    refused: Mutex<Vec<Refusal>>,
    /// The Watch stream to the apiserver; `None` until the first attempt ends or succeeds.
    link: Mutex<Option<ApiserverLink>>,
    /// Names flows from each new state (when flows are on).
    namer: Option<Arc<crate::flows::Namer>>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Report {
    /// Records that the stream is up (at `endpoint`) or down (with `error`).
    fn set_link(&self, endpoint: Option<String>, error: Option<String>) {
        let mut link = lock(&self.link);
        let connected = endpoint.is_some();
        let since_unix = match link.as_ref() {
            Some(l) if l.connected == connected => l.since_unix,
            _ => now_unix(),
        };
        let revision = link.as_ref().map_or(0, |l| l.revision);
        *link = Some(ApiserverLink {
            connected,
            since_unix,
            endpoint,
            revision,
            last_error: error.or_else(|| link.as_ref().and_then(|l| l.last_error.clone())),
        });
    }

    /// Records the revision of the state just programmed.
    fn set_revision(&self, revision: i64) {
        if let Some(l) = lock(&self.link).as_mut() {
            l.revision = revision;
        }
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    programmer: Arc<Mutex<Programmer>>,
    policy: Arc<crate::enforce::Shared>,
    report: Arc<Report>,
    cluster: ClusterName,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    flows: Option<Arc<crate::flows::Store>>,
    stop_flows: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop_flows
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock<T>(p: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match p.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

impl Agent {
    /// Opens the datapath (reusing what is pinned) and starts following the Mesh API and
    /// health-checking. `ready` turns `Ok` after the first complete snapshot is programmed.
    pub fn start(
        settings: Settings,
        metrics: Registry,
        ready: watch::Sender<Result<(), String>>,
    ) -> anyhow::Result<Self> {
        let mut dp = Datapath::open_sized(&settings.pin_dir, &settings.cgroup, settings.sizes)?;
        dp.update_config(|c| {
            if settings.tcp_peer_rewrite {
                c.flags &= !crate::maps::CFG_NO_PEER_REWRITE;
            } else {
                c.flags |= crate::maps::CFG_NO_PEER_REWRITE;
            }
            if settings.flows.is_some() {
                c.flags |= crate::maps::CFG_FLOWS;
            } else {
                c.flags &= !crate::maps::CFG_FLOWS;
            }
        })?;
        let flow_ring = dp.flows.take();
        let programmer = Arc::new(Mutex::new(Programmer::new(dp)?));
        let policy = Arc::new(crate::enforce::Shared {
            cgroup: settings.cgroup.clone(),
            ..Default::default()
        });
        let stop_flows = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut flows = None;
        let mut namer = None;
        if let (Some(capacity), Some(ring)) = (settings.flows, flow_ring) {
            let shared = Arc::clone(&policy);
            let rules: crate::flows::RuleNamer =
                Arc::new(move |i| lock(&shared.origins).get(i).map(ToString::to_string));
            let n = Arc::new(crate::flows::Namer::new(
                settings.cluster.to_string(),
                settings.node.to_string(),
                settings.cgroup.clone(),
                rules,
            ));
            let store = Arc::new(crate::flows::Store::new(capacity));
            let (n2, s2, m2, stop) = (
                Arc::clone(&n),
                Arc::clone(&store),
                metrics.clone(),
                Arc::clone(&stop_flows),
            );
            std::thread::Builder::new()
                .name("flow-events".into())
                .spawn(move || crate::flows::read_ring(ring, n2, s2, m2, stop))?;
            flows = Some(store);
            namer = Some(n);
        }
        {
            let p = lock(&programmer);
            metrics.set(m::SERVICES, &[], p.services() as f64);
            metrics.set(m::BACKENDS, &[], p.backends() as f64);
        }
        let (targets_tx, targets_rx) = watch::channel(Vec::new());
        let (inputs_tx, inputs_rx) = watch::channel(Arc::default());
        let report = Arc::new(Report {
            namer,
            ..Default::default()
        });
        let follow = tokio::spawn(follow(
            settings.clone(),
            Arc::clone(&report),
            Arc::clone(&programmer),
            metrics.clone(),
            ready,
            targets_tx,
            inputs_tx,
        ));
        let enforce = tokio::spawn(crate::enforce::run(
            crate::enforce::Settings {
                cluster: settings.cluster.clone(),
                apiserver: settings.apiserver.clone(),
                tls: settings.tls.clone(),
                cgroup: settings.cgroup.clone(),
                any_cluster: settings.policy_any_cluster,
                rescan: std::time::Duration::from_secs(1),
            },
            inputs_rx,
            Arc::clone(&programmer),
            metrics.clone(),
            Arc::clone(&policy),
        ));
        let health = tokio::spawn(crate::health::run(
            settings.health,
            targets_rx,
            Arc::clone(&programmer),
            metrics,
        ));
        Ok(Self {
            programmer,
            policy,
            report,
            cluster: settings.cluster.clone(),
            tasks: vec![follow, health, enforce],
            flows,
            stop_flows,
        })
    }

    /// The flows kept in memory and their live feed (`None` when flows are off).
    pub fn flow_store(&self) -> Option<Arc<crate::flows::Store>> {
        self.flows.clone()
    }

    /// A function reading one local pod's policy back from the kernel (`/policy?pod=<uid>`).
    pub fn policy_fn(
        &self,
    ) -> impl Fn(&str) -> meshapi::node_state::PodPolicy + Send + Sync + 'static {
        let (programmer, shared) = (Arc::clone(&self.programmer), Arc::clone(&self.policy));
        move |uid| crate::enforce::pod_policy(&programmer, &shared, uid)
    }

    /// Backends and their health as programmed.
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        lock(&self.programmer).health()
    }

    /// The desired services the datapath refused at the last apply.
    pub fn refused(&self) -> Vec<Refusal> {
        lock(&self.report.refused).clone()
    }

    /// A function computing the agent's [`NodeState`]: what this node should have, against
    /// what its maps hold (read back from the kernel), per frontend, and what it refused.
    pub fn state_fn(&self) -> impl Fn() -> Result<NodeState, String> + Send + Sync + 'static {
        let (programmer, report) = (Arc::clone(&self.programmer), Arc::clone(&self.report));
        let cluster = self.cluster.to_string();
        move || {
            let (programmed, shares) = {
                let p = lock(&programmer);
                let programmed = p
                    .programmed()
                    .map_err(|e| format!("reading the maps: {e}"))?;
                (programmed, p.shares())
            };
            let desired = lock(&report.desired).clone();
            let refused = lock(&report.refused).clone();
            let mut state = node_state_at(
                cluster.clone(),
                desired,
                programmed,
                &refused,
                &shares,
                crate::maps::monotonic_ns(),
            );
            state.apiserver = lock(&report.link).clone().or_else(|| {
                Some(ApiserverLink {
                    connected: false,
                    since_unix: 0,
                    endpoint: None,
                    revision: 0,
                    last_error: Some("connecting for the first time".into()),
                })
            });
            Ok(state)
        }
    }
}

/// Desired against programmed, per frontend (a frontend desired twice shows the service that
/// claims it: the first by frontend, then service name), and the refusals.
pub fn node_state(
    cluster: String,
    desired: Option<Vec<DesiredService>>,
    programmed: Vec<crate::program::Programmed>,
    refused: &[Refusal],
) -> NodeState {
    node_state_at(
        cluster,
        desired,
        programmed,
        refused,
        &HashMap::new(),
        crate::maps::monotonic_ns(),
    )
}

/// [`node_state`] with each frontend's tier shares and the clock the kernel's suspicions are
/// read against.
pub fn node_state_at(
    cluster: String,
    desired: Option<Vec<DesiredService>>,
    programmed: Vec<crate::program::Programmed>,
    refused: &[Refusal],
    shares: &HashMap<Frontend, Vec<u32>>,
    now_ns: u64,
) -> NodeState {
    let synced = desired.is_some();
    let mut desired = desired.unwrap_or_default();
    desired.sort_by(|a, b| (a.frontend, &a.service).cmp(&(b.frontend, &b.service)));
    let mut by_frontend: BTreeMap<Frontend, NodeService> = BTreeMap::new();
    for s in desired {
        by_frontend
            .entry(s.frontend)
            .or_insert_with(|| NodeService {
                frontend: s.frontend.to_string(),
                desired: s
                    .tiers
                    .iter()
                    .map(|t| t.iter().map(|b| b.addr.to_string()).collect())
                    .collect(),
                programmed: Vec::new(),
                in_sync: false,
                shares_pct: Vec::new(),
            });
    }
    for (f, tiers) in programmed {
        let entry = by_frontend.entry(f).or_insert_with(|| NodeService {
            frontend: f.to_string(),
            desired: Vec::new(),
            programmed: Vec::new(),
            in_sync: false,
            shares_pct: Vec::new(),
        });
        entry.shares_pct = shares.get(&f).cloned().unwrap_or_default();
        entry.programmed = tiers
            .iter()
            .map(|t| {
                t.iter()
                    .map(|b| ProgrammedBackend {
                        addr: b.addr.to_string(),
                        healthy: b.healthy,
                        cluster_id: b.cluster_id,
                        suspect: b.suspect_at(now_ns),
                    })
                    .collect()
            })
            .collect();
    }
    let mut services: Vec<NodeService> = by_frontend.into_values().collect();
    for s in &mut services {
        let programmed: Vec<Vec<&str>> = s
            .programmed
            .iter()
            .map(|t| t.iter().map(|b| b.addr.as_str()).collect())
            .collect();
        let desired: Vec<Vec<&str>> = s
            .desired
            .iter()
            .map(|t| t.iter().map(String::as_str).collect())
            .collect();
        s.in_sync = programmed == desired;
    }
    let in_sync = synced && services.iter().all(|s| s.in_sync);
    NodeState {
        cluster,
        synced,
        services,
        in_sync,
        refused: refused
            .iter()
            .map(|r| RefusedService {
                frontend: r.frontend.to_string(),
                service: r.service.as_ref().map(ToString::to_string),
                reason: r.reason.kind().to_owned(),
                message: r.reason.to_string(),
                kept_previous: r.kept_previous,
            })
            .collect(),
        apiserver: None,
    }
}

/// Whether the node serves what it should: not when nothing of a non-empty desired state could
/// be programmed (every frontend refused, none keeping an earlier programming).
pub fn readiness(desired: &[DesiredService], refused: &[Refusal]) -> Result<(), String> {
    let frontends: std::collections::BTreeSet<Frontend> =
        desired.iter().map(|s| s.frontend).collect();
    let unserved: Vec<&Refusal> = refused
        .iter()
        .filter(|r| !r.kept_previous && !matches!(r.reason, Reason::DuplicateFrontend { .. }))
        .collect();
    let frontends_unserved: std::collections::BTreeSet<Frontend> =
        unserved.iter().map(|r| r.frontend).collect();
    match unserved.first() {
        Some(first) if frontends_unserved.len() == frontends.len() => Err(format!(
            "none of the {} desired services could be programmed ({first}, ...)",
            frontends.len()
        )),
        _ => Ok(()),
    }
}

/// Follows the Mesh API forever, reconnecting with backoff.
async fn follow(
    settings: Settings,
    report: Arc<Report>,
    programmer: Arc<Mutex<Programmer>>,
    metrics: Registry,
    ready: watch::Sender<Result<(), String>>,
    targets: watch::Sender<Vec<SocketAddr>>,
    inputs: watch::Sender<Arc<crate::enforce::Inputs>>,
) {
    // The workspace's resetting backoff: a session that lasted the reset period counts as
    // healthy, so later outages are retried from the minimum again.
    let mut backoff = telemetry::backoff::Backoff::reconnect();
    let mut zones = Zones::default();
    loop {
        backoff.healthy();
        let r = session(
            &settings,
            &report,
            &programmer,
            &metrics,
            &Outputs {
                ready: &ready,
                targets: &targets,
                inputs: &inputs,
            },
            &mut zones,
        )
        .await;
        metrics.inc(m::RECONNECTS, &[]);
        let e = r.err().unwrap_or(LinkError::Ended("watch")).to_chain();
        report.set_link(None, Some(e.clone()));
        tracing::warn!(error = %e, "Mesh API connection lost; the datapath keeps its state");
        if ready.borrow().is_err() {
            let _ = ready.send_replace(Err(format!("no Mesh API connection yet: {e}")));
        }
        backoff.wait().await;
    }
}

/// Applies one change to the view. `own`: this agent's cluster; only its endpoints can be
/// local pods (a peer chooses what its endpoints say, including a node name and a pod UID
/// of this cluster, which this cluster's exports show it).
fn decode(view: &mut MeshView, own: &ClusterName, c: &pb::Change) {
    let Ok(kind) = c.kind.parse::<Kind>() else {
        return;
    };
    let Ok(cluster) = ClusterName::new(c.cluster.clone()) else {
        return;
    };
    let delete = c.op == pb::change::Op::Delete as i32;
    match kind {
        Kind::Services => {
            if delete {
                view.services
                    .retain(|(cl, n), _| !(cl == &cluster && n.to_string() == c.name));
            } else if let Ok(gs) = model::GlobalService::decode(&c.value) {
                view.services
                    .insert((gs.cluster.clone(), gs.name.clone()), gs);
            }
        }
        Kind::Endpoints => {
            if let Ok(ip) = c.name.parse() {
                if delete {
                    view.identities.remove(&ip);
                    view.pods.remove(&ip);
                    view.pod_names.remove(&ip);
                } else if let Ok(ep) = model::Endpoint::decode(&c.value) {
                    view.identities.insert(ep.ip, ep.identity);
                    match &ep.pod {
                        Some(p) => {
                            view.pod_names.insert(
                                ep.ip,
                                crate::flows::PodName {
                                    cluster: ep.cluster.to_string(),
                                    namespace: p.namespace.clone(),
                                    name: p.name.clone(),
                                    node: ep.node.to_string(),
                                    uid: p.uid.clone(),
                                },
                            );
                        }
                        None => {
                            view.pod_names.remove(&ep.ip);
                        }
                    }
                    match ep.pod.filter(|p| !p.uid.is_empty() && ep.cluster == *own) {
                        Some(p) => {
                            view.pods
                                .insert(ep.ip, (ep.node.to_string(), p.uid, ep.identity.get()));
                        }
                        None => {
                            view.pods.remove(&ep.ip);
                        }
                    }
                }
            }
        }
        Kind::Identities => {
            if let Ok(id) = c.name.parse::<u32>() {
                if delete {
                    view.labels.remove(&id);
                } else if let Ok(identity) = model::Identity::decode(&c.value) {
                    view.labels
                        .insert(identity.id.get(), (identity.cluster, identity.labels));
                }
            }
        }
        Kind::Nodes => {
            let key = (cluster.to_string(), c.name.clone());
            if delete {
                view.nodes.remove(&key);
            } else if let Ok(n) = model::Node::decode(&c.value) {
                view.nodes.insert(key, n.addresses);
            }
        }
    }
}

/// This node's pods: UID → identity (the view's pods are this cluster's only, see
/// [`decode`]).
fn local_pods(view: &MeshView, node: &str) -> BTreeMap<String, u32> {
    view.pods
        .values()
        .filter(|(n, _, _)| *n == node)
        .map(|(_, uid, id)| (uid.clone(), *id))
        .collect()
}

/// Logs each refusal that is new or changed since `before`, and each one that went away.
fn log_refusals(before: &[Refusal], now: &[Refusal]) {
    for r in now.iter().filter(|r| !before.contains(r)) {
        let service = r
            .service
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        if r.kept_previous {
            tracing::warn!(
                service,
                frontend = %r.frontend,
                reason = r.reason.kind(),
                error = %r.reason,
                "service refused; its previous programming stays, the rest of the node is programmed"
            );
        } else {
            tracing::warn!(
                service,
                frontend = %r.frontend,
                reason = r.reason.kind(),
                error = %r.reason,
                "service refused; not programmed, the rest of the node is"
            );
        }
    }
    for r in before {
        if !now
            .iter()
            .any(|n| n.frontend == r.frontend && n.service == r.service)
        {
            let service = r
                .service
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::info!(service, frontend = %r.frontend, "service no longer refused");
        }
    }
}

/// Programs `desired`; returns the services refused, or why nothing was programmed.
fn apply(
    programmer: &Mutex<Programmer>,
    metrics: &Registry,
    desired: &[DesiredService],
    refused_out: &Mutex<Vec<Refusal>>,
) -> Result<Vec<Refusal>, String> {
    let started = Instant::now();
    let mut p = lock(programmer);
    match p.apply(desired) {
        Ok(ops) => {
            {
                let mut before = lock(refused_out);
                log_refusals(&before, &ops.refused);
                before.clone_from(&ops.refused);
            }
            for kind in Reason::KINDS {
                let n = ops
                    .refused
                    .iter()
                    .filter(|r| r.reason.kind() == kind)
                    .count();
                metrics.set(m::SERVICES_REFUSED, &[kind], n as f64);
            }
            metrics.add(m::MAP_OPS, &["write"], ops.writes as f64);
            metrics.add(m::MAP_OPS, &["delete"], ops.deletes as f64);
            metrics.set(m::SERVICES, &[], p.services() as f64);
            metrics.set(m::BACKENDS, &[], p.backends() as f64);
            metrics.observe(m::APPLY_SECONDS, &[], started.elapsed().as_secs_f64());
            if ops.writes + ops.deletes > 0 {
                tracing::debug!(
                    writes = ops.writes,
                    deletes = ops.deletes,
                    "datapath updated"
                );
            }
            Ok(ops.refused)
        }
        Err(e) => {
            metrics.inc(m::REFUSED, &[]);
            tracing::error!(error = %e, "desired state not programmed; the datapath keeps what it had");
            Err(e.to_string())
        }
    }
}

/// Sets readiness, logging when it changes.
fn set_ready(ready: &watch::Sender<Result<(), String>>, now: Result<(), String>, services: usize) {
    if *ready.borrow() == now {
        return;
    }
    match &now {
        Ok(()) => tracing::info!(services, "datapath programmed; ready"),
        Err(e) => tracing::warn!(error = %e, "not ready"),
    }
    let _ = ready.send_replace(now);
}

/// Why a Mesh API stream of the agent (the Watch, the Policies) ended. Printed with its
/// causes once ([`LinkError::to_chain`]).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The agent's certificate files cannot be used.
    #[error("TLS files")]
    Tls(#[source] certs::Error),
    /// No endpoint of the apiserver could be reached as the expected server.
    #[error(transparent)]
    Connect(#[from] meshapi::client::ConnectError),
    /// The apiserver refused the call or the stream broke.
    #[error("{rpc}: {code}: {message}")]
    Rpc {
        /// Which call.
        rpc: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The apiserver ended the stream.
    #[error("the apiserver ended the {0}")]
    Ended(&'static str),
}

impl LinkError {
    /// A failed call of `rpc`.
    pub fn rpc(rpc: &'static str, status: &tonic::Status) -> Self {
        Self::Rpc {
            rpc,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// The error with its causes, once each.
    pub fn to_chain(&self) -> String {
        telemetry::chain(self).to_string()
    }
}

/// What a session publishes besides the maps: readiness, the health checks' targets and the
/// policy task's inputs.
#[derive(Clone, Copy)]
struct Outputs<'a> {
    ready: &'a watch::Sender<Result<(), String>>,
    targets: &'a watch::Sender<Vec<SocketAddr>>,
    inputs: &'a watch::Sender<Arc<crate::enforce::Inputs>>,
}

async fn session(
    settings: &Settings,
    report: &Report,
    programmer: &Mutex<Programmer>,
    metrics: &Registry,
    out: &Outputs<'_>,
    zones: &mut Zones,
) -> Result<(), LinkError> {
    let Outputs {
        ready,
        targets,
        inputs,
    } = *out;
    let tls = Reloader::load(settings.tls.clone()).map_err(LinkError::Tls)?;
    let connected = meshapi::client::connect(&settings.cluster, &settings.apiserver, &tls).await?;
    let mut api = connected.client;
    let mut stream = api
        .watch(pb::WatchRequest {
            kinds: vec![
                "services".into(),
                "endpoints".into(),
                "identities".into(),
                "nodes".into(),
            ],
            clusters: Vec::new(),
            resume_revision: 0,
        })
        .await
        .map_err(|e| LinkError::rpc("Watch", &e))?
        .into_inner();
    tracing::info!(endpoint = %connected.endpoint, "following the Mesh API");
    report.set_link(Some(connected.endpoint.clone()), None);
    let mut view = MeshView::default();
    let mut snapshot_done = false;
    let mut revision = 0;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(LinkError::Ended("watch")),
            Err(e) => return Err(LinkError::rpc("watch stream", &e)),
        };
        if msg.reset {
            view = MeshView::default();
            snapshot_done = false;
        }
        for c in &msg.changes {
            decode(&mut view, &settings.cluster, c);
        }
        snapshot_done |= msg.snapshot_complete;
        revision = revision.max(msg.revision);
        // Coalesce what is already waiting before touching the maps.
        let mut more = true;
        while more {
            match futures::FutureExt::now_or_never(stream.message()) {
                Some(Ok(Some(m))) => {
                    if m.reset {
                        view = MeshView::default();
                        snapshot_done = false;
                    }
                    for c in &m.changes {
                        decode(&mut view, &settings.cluster, c);
                    }
                    snapshot_done |= m.snapshot_complete;
                    revision = revision.max(m.revision);
                }
                Some(Ok(None)) => return Err(LinkError::Ended("watch")),
                Some(Err(e)) => return Err(LinkError::rpc("watch stream", &e)),
                None => more = false,
            }
        }
        if !snapshot_done {
            continue;
        }
        let desired = desired::services(&settings.cluster, &view, zones);
        if let Some(n) = &report.namer {
            n.set_names(crate::flows::Names::build(
                &view,
                &desired,
                settings.cluster.as_str(),
                settings.node.as_str(),
            ));
        }
        *lock(&report.desired) = Some(desired.clone());
        // Policy: every identity's labels and this node's pods.
        let node = settings.node.to_string();
        let next = crate::enforce::Inputs {
            synced: true,
            identities: view.labels.clone(),
            local_pods: local_pods(&view, &node),
        };
        inputs.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            *cur = Arc::new(next);
            true
        });
        let ipcache: HashMap<std::net::IpAddr, (u32, u16)> = view
            .identities
            .iter()
            .map(|(ip, id)| (*ip, (id.get(), id.cluster().map_or(0, |c| c.get()))))
            .collect();
        match lock(programmer).apply_ipcache(&ipcache) {
            Ok(ops) => {
                metrics.add(m::MAP_OPS, &["write"], ops.writes as f64);
                metrics.add(m::MAP_OPS, &["delete"], ops.deletes as f64);
            }
            Err(e) => {
                metrics.inc(m::REFUSED, &[]);
                tracing::error!(error = %e, "ipcache refused");
            }
        }
        match apply(programmer, metrics, &desired, &report.refused) {
            Ok(refused) => {
                // Health checks follow what is programmed, not what was refused.
                let tcp = lock(programmer).backends_of(Proto::Tcp);
                targets.send_if_modified(|old| {
                    let changed = *old != tcp;
                    *old = tcp;
                    changed
                });
                set_ready(ready, readiness(&desired, &refused), desired.len());
                report.set_revision(revision);
            }
            Err(e) => set_ready(
                ready,
                Err(format!("the datapath could not be programmed: {e}")),
                desired.len(),
            ),
        }
    }
}

#[cfg(test)]
mod state_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::maps::BackendEntry;
    use crate::program::BackendSpec;

    fn fe(s: &str) -> Frontend {
        Frontend {
            addr: s.parse().unwrap(),
            proto: Proto::Tcp,
        }
    }

    fn spec(s: &str, cluster_id: u16) -> BackendSpec {
        BackendSpec {
            addr: s.parse().unwrap(),
            cluster_id,
            zone: 0,
        }
    }

    fn entry(s: &str, cluster_id: u16, healthy: bool) -> BackendEntry {
        BackendEntry {
            addr: s.parse().unwrap(),
            healthy,
            cluster_id,
            zone: 0,
            one_frontend: false,
            suspect_until_ns: 0,
        }
    }

    #[test]
    fn state_shows_what_differs_per_frontend() {
        let desired = vec![
            DesiredService {
                frontend: fe("10.96.0.1:80"),
                service: None,
                tiers: [vec![spec("10.1.0.1:80", 1)], vec![spec("10.2.0.1:80", 2)]],
                balancing: Default::default(),
            },
            DesiredService {
                frontend: fe("10.96.0.2:80"),
                service: None,
                tiers: [vec![spec("10.1.0.2:80", 1)], vec![]],
                balancing: Default::default(),
            },
        ];
        let programmed = vec![
            (
                fe("10.96.0.1:80"),
                [
                    vec![entry("10.1.0.1:80", 1, false)],
                    vec![entry("10.2.0.1:80", 2, true)],
                ],
            ),
            (
                fe("10.96.0.3:80"),
                [vec![entry("10.1.0.3:80", 1, true)], vec![]],
            ),
        ];
        let s = node_state("east".into(), Some(desired), programmed, &[]);
        assert!(s.synced);
        assert!(!s.in_sync);
        let by: BTreeMap<&str, &NodeService> = s
            .services
            .iter()
            .map(|x| (x.frontend.as_str(), x))
            .collect();
        assert!(
            by["10.96.0.1:80/tcp"].in_sync,
            "health does not count as a difference"
        );
        assert!(!by["10.96.0.1:80/tcp"].programmed[0][0].healthy);
        assert!(!by["10.96.0.2:80/tcp"].in_sync, "desired, not programmed");
        assert!(by["10.96.0.2:80/tcp"].programmed.is_empty());
        assert!(!by["10.96.0.3:80/tcp"].in_sync, "programmed, not desired");
        assert!(s.refused.is_empty());
        let none = node_state("east".into(), None, Vec::new(), &[]);
        assert!(!none.synced && !none.in_sync);
    }

    fn svc(frontend: &str, name: &str, backend: &str) -> DesiredService {
        DesiredService {
            frontend: fe(frontend),
            service: Some(model::service::ServiceName::new("shop", name).unwrap()),
            tiers: [vec![spec(backend, 1)], vec![]],
            balancing: Default::default(),
        }
    }

    fn tier_full(frontend: &str, name: &str, kept_previous: bool) -> Refusal {
        Refusal {
            frontend: fe(frontend),
            service: Some(model::service::ServiceName::new("shop", name).unwrap()),
            reason: Reason::TierFull {
                tier: 1,
                wanted: 300,
                capacity: 256,
            },
            kept_previous,
        }
    }

    #[test]
    fn state_names_refused_services_and_shows_the_claimant_of_a_duplicate_frontend() {
        // Two services want 10.96.0.1:80: "api", first by name, claims it whatever the order.
        let desired = vec![
            svc("10.96.0.1:80", "web", "10.1.0.1:80"),
            svc("10.96.0.1:80", "api", "10.1.0.9:80"),
            svc("10.96.0.2:80", "big", "10.1.0.2:80"),
        ];
        let programmed = vec![(
            fe("10.96.0.1:80"),
            [vec![entry("10.1.0.9:80", 1, true)], vec![]],
        )];
        let refused = vec![
            Refusal {
                frontend: fe("10.96.0.1:80"),
                service: Some(model::service::ServiceName::new("shop", "web").unwrap()),
                reason: Reason::DuplicateFrontend {
                    claimed_by: Some(model::service::ServiceName::new("shop", "api").unwrap()),
                },
                kept_previous: false,
            },
            tier_full("10.96.0.2:80", "big", false),
        ];
        let s = node_state("east".into(), Some(desired), programmed, &refused);
        assert!(s.services[0].in_sync, "the claimant is the one compared");
        assert_eq!(s.refused.len(), 2);
        let big = &s.refused[1];
        assert_eq!(big.frontend, "10.96.0.2:80/tcp");
        assert_eq!(big.service.as_deref(), Some("shop/big"));
        assert_eq!(big.reason, "tier_full");
        assert!(big.message.contains("MAX_TIER_SLOTS"), "{}", big.message);
        assert!(big.message.contains("300"), "{}", big.message);
        assert_eq!(s.refused[0].reason, "duplicate_frontend");
        assert!(s.refused[0].message.contains("shop/api"));
    }

    #[test]
    fn ready_unless_nothing_desired_could_be_programmed() {
        let desired = vec![
            svc("10.96.0.1:80", "web", "10.1.0.1:80"),
            svc("10.96.0.2:80", "big", "10.1.0.2:80"),
        ];
        assert_eq!(readiness(&desired, &[]), Ok(()));
        assert_eq!(readiness(&[], &[]), Ok(()), "nothing to serve");
        let one = [tier_full("10.96.0.2:80", "big", false)];
        assert_eq!(readiness(&desired, &one), Ok(()), "the rest is programmed");
        let both = [
            tier_full("10.96.0.1:80", "web", false),
            tier_full("10.96.0.2:80", "big", false),
        ];
        let e = readiness(&desired, &both).unwrap_err();
        assert!(e.contains("none of the 2") && e.contains("shop/web"), "{e}");
        let kept = [
            tier_full("10.96.0.1:80", "web", true),
            tier_full("10.96.0.2:80", "big", false),
        ];
        assert_eq!(
            readiness(&desired, &kept),
            Ok(()),
            "a refused service keeping its earlier programming is still served"
        );
    }
}

#[cfg(test)]
mod view_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use model::{ClusterId, NodeName, NumericIdentity};

    fn endpoint(cluster: &str, id: u64, ip: &str, node: &str, uid: &str) -> pb::Change {
        let cluster_id = ClusterId::new(id).unwrap();
        pb::Change {
            op: pb::change::Op::Put as i32,
            cluster: cluster.into(),
            kind: Kind::Endpoints.as_str().into(),
            name: ip.into(),
            value: model::Endpoint {
                cluster: ClusterName::new(cluster).unwrap(),
                ip: ip.parse().unwrap(),
                identity: NumericIdentity::scoped(cluster_id, 300).unwrap(),
                node: NodeName::new(node).unwrap(),
                pod: Some(model::endpoint::PodRef {
                    namespace: "rebel".into(),
                    name: format!("{cluster}-pod"),
                    uid: uid.into(),
                }),
            }
            .encode(),
            revision: 1,
            origin_unix_micros: 0,
        }
    }

    /// A peer exports an endpoint that claims this node and the UID of one of its pods (both
    /// visible in this cluster's exports): the pod keeps its own identity for policy, and its
    /// flows keep its own name, whatever order the view lists them in.
    #[test]
    fn a_peers_endpoint_cannot_take_over_a_local_pod_by_its_uid() {
        let east = ClusterName::new("east").unwrap();
        let uid = "8d0b8a9e-2f7c-4a53-9b1e-3c5d6e7f8a90";
        let own = NumericIdentity::scoped(ClusterId::new(1).unwrap(), 300)
            .unwrap()
            .get();
        // Hash maps list in a random order per instance: many of them, both orders of arrival.
        for i in 0..32 {
            let mut view = MeshView::default();
            let mut changes = vec![
                endpoint("east", 1, "10.1.0.7", "n1", uid),
                endpoint("west", 2, "10.2.0.9", "n1", uid),
            ];
            if i % 2 == 1 {
                changes.reverse();
            }
            for c in &changes {
                decode(&mut view, &east, c);
            }
            assert_eq!(
                local_pods(&view, "n1"),
                BTreeMap::from([(uid.to_owned(), own)]),
                "policy: the pod's own identity"
            );
            let names = crate::flows::Names::build(&view, &[], "east", "n1");
            assert_eq!(
                names.local_by_uid.get(uid),
                Some(&"10.1.0.7".parse().unwrap()),
                "flows: the pod's own address"
            );
        }
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    /// Every metric the agent and its health module update is declared with the labels they
    /// give (the registry panics on anything else in tests); the declarations are valid.
    #[test]
    fn every_metric_is_declared_with_its_labels() {
        let r = registry();
        assert_eq!(r.check(), Ok(()));
        r.set(m::SERVICES, &[], 1.0);
        r.set(m::BACKENDS, &[], 2.0);
        r.add(m::MAP_OPS, &["write"], 3.0);
        r.set(m::BACKEND_HEALTH, &["healthy"], 2.0);
        r.inc(m::FAILOVERS, &[]);
        r.inc(m::RECOVERIES, &[]);
        r.set(m::SERVICES_REFUSED, &["tier_full"], 0.0);
        r.inc(m::REFUSED, &[]);
        r.inc(m::RECONNECTS, &[]);
        r.observe(m::APPLY_SECONDS, &[], 0.001);
        r.inc(crate::health::m::PROBES, &["sweep", "ok"]);
        r.inc(crate::health::m::EVENTS, &["rst"]);
        r.set(crate::health::m::STATE, &["up"], 2.0);
        r.set(crate::health::m::KERNEL, &["suspects"], 0.0);
        let text = r.render();
        assert!(
            text.contains("clustermesh_health_probes_total{why=\"sweep\",result=\"ok\"} 1"),
            "{text}"
        );
    }
}
