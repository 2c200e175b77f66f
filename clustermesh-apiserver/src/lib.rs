//! clustermesh-apiserver: one per cluster; the only writer of the cluster's etcd.
//!
//! It registers the cluster (name and ID) in etcd, refusing to start if that etcd already
//! belongs to a cluster of the same name with another ID; elects one leader among its replicas
//! through a Kubernetes Lease ([`leader`]); and, while leading, runs the [`exporter`]: this cluster's
//! Services, EndpointSlices, Pods, Namespaces and Nodes become global services, endpoints,
//! identities and nodes in etcd. `/metrics`, `/healthz` and `/readyz` are served by every
//! replica.
//!
//! Must not talk to a peer's etcd (peers talk through the Mesh API only).

pub mod config;
pub mod enroll;
pub mod etcd_health;
pub mod exporter;
pub mod labelled_secrets;
pub mod leader;
pub mod mesh;
pub mod metrics;
pub mod node_agents;
pub mod peer_secrets;
pub mod policies;
pub mod readiness;
pub mod status_configmap;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use leader::{Elector, Leadership};
use rustls_pki_types::pem::PemObject;
use telemetry::metrics::Registry;
use tokio::sync::watch;

/// Name of the leader election Lease.
pub const LEADER_LEASE_NAME: &str = "clustermesh-apiserver";

/// A running apiserver.
#[derive(Debug)]
pub struct Running {
    health: SocketAddr,
    mesh: Option<SocketAddr>,
    mesh_cache: Option<Arc<mesh::cache::WatchCache>>,
    peers: Arc<mesh::importer::Board>,
    mesh_stop: watch::Sender<bool>,
    _mesh_tasks: Vec<AbortOnDrop>,
    ready: readiness::Receiver,
    leadership: watch::Receiver<Leadership>,
    metrics: Registry,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// The `/metrics`, `/healthz`, `/readyz` address.
    pub fn health_addr(&self) -> SocketAddr {
        self.health
    }

    /// Its phase: ready once this replica leads and its initial state is exported and etcd
    /// answers; otherwise the phase (standby, etcd unreachable, lease lost, ...), since when and
    /// why.
    pub fn ready(&self) -> readiness::Receiver {
        self.ready.clone()
    }

    /// This replica's view of the election.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// The Mesh API address, when served.
    pub fn mesh_addr(&self) -> Option<SocketAddr> {
        self.mesh
    }

    /// The etcd revision the Mesh API's watch cache has caught up with.
    pub fn mesh_revision(&self) -> Option<i64> {
        self.mesh_cache.as_ref().map(|c| c.revision())
    }

    /// The status of every peer.
    pub fn peers(&self) -> &Arc<mesh::importer::Board> {
        &self.peers
    }

    /// The metrics.
    pub fn metrics(&self) -> &Registry {
        &self.metrics
    }

    /// Stops gracefully: the exporter stops, the leader Lease is released, Mesh API streams
    /// end and the port closes.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.mesh_stop.send_replace(true);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.context("apiserver task")?
    }

    /// Stops like a crash: nothing is released or cleaned up (for tests of failover); Mesh API
    /// connections drop and the port closes.
    pub fn kill(self) {
        drop(self);
    }

    /// Waits until the apiserver stops by itself (a fatal error).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("apiserver task")?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.mesh_stop.send_replace(true);
        self.task.abort();
    }
}

async fn kube_client(config: &config::Config) -> anyhow::Result<kube::Client> {
    let kc = match &config.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read {}", path.display()))?;
            let opts = kube::config::KubeConfigOptions {
                context: config.kube_context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .context("load the kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("find a Kubernetes API (in-cluster or ~/.kube/config)")?,
    };
    kube::Client::try_from(kc).context("Kubernetes client")
}

/// Starts the apiserver: health server, etcd registration, Mesh API, leader election, and
/// (while leading) exporter and importer.
pub async fn start(config: config::Config) -> anyhow::Result<Running> {
    let metrics = metrics::registry();
    metrics.check().context("declare the metrics")?;
    let (ready_tx, ready) = readiness::channel();
    // `/readyz` says whether this replica can serve the Mesh API, leader or standby: a standby
    // that serves is Ready, so a rolling update of the Deployment completes while another
    // replica holds the Lease. Leadership and the exporter's state are in `/status`.
    let (can_serve_tx, can_serve) = watch::channel(Err("starting: etcd not listed yet".to_owned()));
    let (lead_tx, leadership) = watch::channel(Leadership::Follower(None));
    let shared = Shared::new(&metrics);
    let status_of = shared.status_fn(&config, ready.clone(), leadership.clone());
    let health = serve_health(&config, &metrics, can_serve, Arc::clone(&status_of)).await?;
    let kv = register(&config).await?;
    let client = kube_client(&config).await?;
    let probe_tasks = spawn_probes(&config, &kv, &client, &shared);
    let mesh = serve_mesh(&config, &kv, &client, &metrics, &can_serve_tx, &shared).await?;
    tracing::info!(
        cluster = %config.cluster_name,
        cluster_id = %config.cluster_id,
        replica = %config.replica,
        health = %health,
        mesh = ?mesh.addr,
        "registered in etcd; electing a leader"
    );
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let leading = Leading::new(&config, &kv, &client, &metrics, &shared, status_of);
    let task = tokio::spawn(supervise(
        leading,
        lead_tx,
        client,
        kv,
        metrics.clone(),
        ready_tx,
        stop_rx,
    ));
    Ok(Running {
        health,
        mesh: mesh.addr,
        mesh_cache: mesh.cache,
        peers: shared.board,
        mesh_stop: mesh.stop,
        _mesh_tasks: mesh.tasks.into_iter().chain(probe_tasks).collect(),
        ready,
        leadership,
        metrics,
        stop: Some(stop),
        task,
    })
}

/// What the status document reads, filled by the parts that know it.
struct Shared {
    board: Arc<mesh::importer::Board>,
    exported: Arc<std::sync::Mutex<Option<Arc<mesh::cache::WatchCache>>>>,
    serving: Arc<std::sync::Mutex<Option<Arc<certs::Reloader>>>>,
    etcd_health: etcd_health::Health,
    agents: node_agents::Summary,
    rejected: exporter::Rejected,
}

impl Shared {
    fn new(metrics: &Registry) -> Self {
        Self {
            board: Arc::new(mesh::importer::Board::new(metrics.clone())),
            exported: Arc::default(),
            serving: Arc::default(),
            etcd_health: etcd_health::Health::default(),
            agents: node_agents::Summary::default(),
            rejected: exporter::Rejected::default(),
        }
    }

    /// The status document of this replica, as `/status` serves it and the leader publishes it.
    fn status_fn(
        &self,
        config: &config::Config,
        ready: readiness::Receiver,
        leadership: watch::Receiver<Leadership>,
    ) -> StatusFn {
        let board = Arc::clone(&self.board);
        let (exported, serving) = (Arc::clone(&self.exported), Arc::clone(&self.serving));
        let (etcd_health, agents, rejected) = (
            Arc::clone(&self.etcd_health),
            Arc::clone(&self.agents),
            Arc::clone(&self.rejected),
        );
        let (cluster, cluster_id, replica) = (
            config.cluster_name.to_string(),
            config.cluster_id.get(),
            config.replica.clone(),
        );
        Arc::new(move || {
            let r = ready.borrow().clone();
            let cache = exported.lock().ok().and_then(|c| c.clone());
            model::status::ClusterStatus {
                cluster: cluster.clone(),
                cluster_id,
                replica: replica.clone(),
                leader: *leadership.borrow() == Leadership::Leader,
                ready: r.is_ready(),
                reason: r.reason,
                phase: Some(r.phase),
                phase_since_unix: Some(r.since_unix),
                exported: cache.map(|c| c.exported()).unwrap_or_default(),
                peers: board.snapshot(),
                updated_unix: 0,
                etcd: etcd_health.lock().ok().and_then(|h| h.clone()),
                serving_cert_not_after_unix: serving
                    .lock()
                    .ok()
                    .and_then(|t| t.as_ref().map(|t| t.not_after_unix())),
                rejected_services: rejected.lock().map(|r| r.clone()).unwrap_or_default(),
                node_agents: agents.lock().ok().and_then(|a| a.clone()),
                version: Some(telemetry::version::REPORTED.to_owned()),
            }
        })
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/status`.
async fn serve_health(
    config: &config::Config,
    metrics: &Registry,
    can_serve: watch::Receiver<Result<(), String>>,
    status_of: StatusFn,
) -> anyhow::Result<SocketAddr> {
    let status: telemetry::metrics::Routes = Arc::new(move |path: &str| {
        (path == "/status").then(|| {
            (
                200,
                "application/json",
                serde_json::to_string_pretty(&status_of()).unwrap_or_default(),
            )
        })
    });
    telemetry::metrics::spawn(config.health_bind, metrics.clone(), can_serve, Some(status))
        .await
        .with_context(|| format!("listen on {}", config.health_bind))
}

/// Connects to etcd and registers this cluster there (refused if the etcd belongs to a cluster
/// of the same name with another ID).
async fn register(config: &config::Config) -> anyhow::Result<kvstore::Client> {
    let kv = kvstore::Client::connect(config.etcd.clone())
        .await
        .context("connect to etcd")?;
    kv.register_cluster(&wire::ClusterConfig {
        name: config.cluster_name.clone(),
        id: config.cluster_id,
        capabilities: Vec::new(),
    })
    .await
    .context("register cluster")?;
    Ok(kv)
}

/// Probes for the status document run on every replica (each serves `/status`); the leader
/// publishes them. Outside the leader loop, so an etcd outage that restarts the exporter does
/// not restart them.
fn spawn_probes(
    config: &config::Config,
    kv: &kvstore::Client,
    client: &kube::Client,
    shared: &Shared,
) -> Vec<AbortOnDrop> {
    let mut tasks = vec![AbortOnDrop(tokio::spawn(etcd_health::run(
        kv.clone(),
        Duration::from_secs(2),
        Arc::clone(&shared.etcd_health),
    )))];
    if let Some(files) = &config.mesh_tls {
        tasks.push(AbortOnDrop(tokio::spawn(node_agents::run(
            node_agents::Config {
                cluster: config.cluster_name.clone(),
                cluster_id: config.cluster_id,
                tls: files.clone(),
                port: config.node_agent_state_port,
                interval: Duration::from_secs(3),
            },
            client.clone(),
            Arc::clone(&shared.agents),
        ))));
    }
    tasks
}

/// The Mesh API as served.
struct MeshServing {
    addr: Option<SocketAddr>,
    cache: Option<Arc<mesh::cache::WatchCache>>,
    stop: watch::Sender<bool>,
    tasks: Vec<AbortOnDrop>,
}

/// Serves the Mesh API on every replica (it only reads etcd), with the grants and Nodes it
/// admits callers by; without Mesh API TLS, nothing is served and this replica can serve at
/// once.
async fn serve_mesh(
    config: &config::Config,
    kv: &kvstore::Client,
    client: &kube::Client,
    metrics: &Registry,
    can_serve_tx: &watch::Sender<Result<(), String>>,
    shared: &Shared,
) -> anyhow::Result<MeshServing> {
    let (stop, stop_rx) = watch::channel(false);
    let Some(files) = &config.mesh_tls else {
        // No Mesh API to serve: ready once registered in etcd.
        let _ = can_serve_tx.send_replace(Ok(()));
        return Ok(MeshServing {
            addr: None,
            cache: None,
            stop,
            tasks: Vec::new(),
        });
    };
    let mut tasks = Vec::new();
    let tls = certs::Reloader::load(files.clone()).context("load the Mesh API certificate")?;
    tasks.push(AbortOnDrop(tls.spawn_watch(Duration::from_secs(5))));
    if let Ok(mut s) = shared.serving.lock() {
        *s = Some(Arc::clone(&tls));
    }
    let ca_pem =
        std::fs::read(&files.ca).with_context(|| format!("read {}", files.ca.display()))?;
    let ca_der = rustls_pki_types::CertificateDer::pem_slice_iter(&ca_pem)
        .next()
        .context("no certificate in the Mesh API trust bundle")?
        .context("parse the Mesh API trust bundle")?;
    let (cache, cache_task) = mesh::cache::WatchCache::start(kv);
    tasks.push(AbortOnDrop(cache_task));
    {
        let (cache, can_serve_tx) = (Arc::clone(&cache), can_serve_tx.clone());
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            cache.wait_ready().await;
            let _ = can_serve_tx.send_replace(Ok(()));
        })));
    }
    if let Ok(mut e) = shared.exported.lock() {
        *e = Some(Arc::clone(&cache));
    }
    let grants_rx = follow_grants(config, client, metrics, &mut tasks);
    // Nodes: a node agent is admitted while its Node exists, followed on every replica.
    let (nodes_tx, nodes_rx) = watch::channel(None);
    tasks.push(AbortOnDrop(tokio::spawn(mesh::nodes::follow(
        kube::Api::all(client.clone()),
        nodes_tx,
        metrics.clone(),
    ))));
    // Network policies, for this cluster's node agents only; followed on every replica.
    let (policies_tx, policies_rx) = watch::channel(Default::default());
    tasks.push(AbortOnDrop(tokio::spawn(policies::follow(
        client.clone(),
        config.replica.clone(),
        policies_tx,
        metrics.clone(),
        Arc::new(|v: &serde_json::Value| policy::parse(v).map(|_| ()).map_err(|e| e.to_string())),
    ))));
    let service = mesh::server::MeshService::new(
        config.cluster_name.clone(),
        config.cluster_id,
        certs::fingerprint(ca_der.as_ref()),
        Arc::clone(&cache),
        grants_rx,
        nodes_rx,
        metrics.clone(),
        stop_rx,
    )
    .with_policies(policies_rx);
    // Flows of this cluster's nodes, for its admins.
    let relay = mesh::relay::Relay::new(
        config.cluster_name.clone(),
        config.cluster_id,
        files.clone(),
        config.node_agent_observe_port,
        client.clone(),
    );
    let (addr, task) = mesh::server::spawn(config.mesh_bind, tls, service, Some(relay))
        .await
        .with_context(|| format!("listen on {}", config.mesh_bind))?;
    tasks.push(AbortOnDrop(task));
    Ok(MeshServing {
        addr: Some(addr),
        cache: Some(cache),
        stop,
        tasks,
    })
}

/// Grants: which peers may import, followed on every replica (each serves the API), from
/// grant Secrets, a directory, or nowhere (no peer may import).
fn follow_grants(
    config: &config::Config,
    client: &kube::Client,
    metrics: &Registry,
    tasks: &mut Vec<AbortOnDrop>,
) -> watch::Receiver<Option<Arc<mesh::grants::Grants>>> {
    let (grants_tx, grants_rx) = watch::channel(None);
    if config.peers_from_secrets {
        tasks.push(AbortOnDrop(tokio::spawn(mesh::grants::follow_secrets(
            kube::Api::namespaced(client.clone(), &config.namespace),
            config.cluster_name.clone(),
            grants_tx,
            metrics.clone(),
        ))));
    } else if let Some(dir) = &config.grants_dir {
        tasks.push(AbortOnDrop(tokio::spawn(mesh::grants::follow_dir(
            dir.clone(),
            grants_tx,
            Duration::from_millis(500),
            metrics.clone(),
        ))));
    } else {
        tracing::info!(
            "no grants source (--grants-dir or --peers-from-secrets): no peer may import"
        );
        grants_tx.send_replace(Some(Arc::default()));
    }
    grants_rx
}

/// What the leader runs: the election, the exporter, the importer and what it keeps in its
/// own Kubernetes API besides the exports.
struct Leading {
    elector: Elector,
    settings: exporter::Settings,
    importer: Option<(mesh::importer::Context, std::path::PathBuf)>,
    k8s: K8sTasks,
}

impl Leading {
    fn new(
        config: &config::Config,
        kv: &kvstore::Client,
        client: &kube::Client,
        metrics: &Registry,
        shared: &Shared,
        status_of: StatusFn,
    ) -> Self {
        let elector = Elector::new(
            kube::Api::<Lease>::namespaced(client.clone(), &config.namespace),
            LEADER_LEASE_NAME,
            config.replica.clone(),
            config.leader_lease,
            metrics.clone(),
        );
        let settings = exporter::Settings {
            cluster: config.cluster_name.clone(),
            cluster_id: config.cluster_id,
            lease_ttl: config.lease_ttl,
            identity_gc_grace: config.identity_gc_grace,
            rejected: Arc::clone(&shared.rejected),
            replica: config.replica.clone(),
        };
        let rescan_now = Arc::new(tokio::sync::Notify::new());
        let importer = config.peers_dir.clone().map(|dir| {
            (
                mesh::importer::Context {
                    kv: kv.clone(),
                    own: config.cluster_name.clone(),
                    own_id: config.cluster_id,
                    board: Arc::clone(&shared.board),
                    metrics: metrics.clone(),
                    rescan_now: Arc::clone(&rescan_now),
                    quota: config.peer_quota,
                },
                dir,
            )
        });
        let k8s = K8sTasks {
            rescan_now,
            status_of,
            configmaps: kube::Api::namespaced(client.clone(), &config.namespace),
            peer_secrets: match (&config.peers_dir, config.peers_from_secrets) {
                (Some(dir), true) => Some((
                    kube::Api::namespaced(client.clone(), &config.namespace),
                    dir.clone(),
                    config.cluster_name.clone(),
                )),
                _ => None,
            },
        };
        Self {
            elector,
            settings,
            importer,
            k8s,
        }
    }
}

type StatusFn = Arc<dyn Fn() -> model::status::ClusterStatus + Send + Sync>;

/// What the leader keeps in its own Kubernetes API besides the exports.
struct K8sTasks {
    rescan_now: Arc<tokio::sync::Notify>,
    status_of: StatusFn,
    configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap>,
    peer_secrets: Option<(
        kube::Api<k8s_openapi::api::core::v1::Secret>,
        std::path::PathBuf,
        model::ClusterName,
    )>,
}

async fn supervise(
    leading: Leading,
    lead_tx: watch::Sender<Leadership>,
    client: kube::Client,
    kv: kvstore::Client,
    metrics: Registry,
    ready: readiness::Sender,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let Leading {
        elector,
        settings,
        importer,
        k8s,
    } = leading;
    let mut leadership = lead_tx.subscribe();
    let election = tokio::spawn(elector.clone().run(lead_tx));
    let _abort = AbortOnDrop(election);
    loop {
        // Follow until this replica leads.
        let follower_reason = |l: &Leadership| match l {
            Leadership::Follower(Some(h)) => format!("standby: {h} leads"),
            _ => "standby: no leader yet".to_owned(),
        };
        let standby = |l: &Leadership| {
            readiness::set(
                &ready,
                model::status::ApiserverPhase::Standby,
                Some(follower_reason(l)),
                None,
            );
        };
        standby(&leadership.borrow());
        loop {
            if *leadership.borrow_and_update() == Leadership::Leader {
                break;
            }
            tokio::select! {
                changed = leadership.changed() => {
                    changed.context("leader election stopped")?;
                    standby(&leadership.borrow());
                }
                _ = &mut stop => return Ok(()),
            }
        }
        // Lead until leadership is lost: dropping the exporter stops every write at once.
        let export = exporter::run(
            settings.clone(),
            client.clone(),
            kv.clone(),
            metrics.clone(),
            ready.clone(),
        );
        let import = async {
            match importer.clone() {
                Some((ctx, dir)) => mesh::importer::run(ctx, dir, Duration::from_secs(1)).await,
                None => std::future::pending().await,
            }
        };
        let status_of = Arc::clone(&k8s.status_of);
        let publish = status_configmap::publish_status(
            k8s.configmaps.clone(),
            move || status_of(),
            Duration::from_millis(200),
            metrics.clone(),
        );
        let secrets = async {
            match k8s.peer_secrets.clone() {
                Some((api, dir, own)) => {
                    peer_secrets::follow_peer_secrets(
                        api,
                        dir,
                        own,
                        metrics.clone(),
                        Arc::clone(&k8s.rescan_now),
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let run = async move {
            tokio::select! {
                r = export => r,
                () = import => Ok(()),
                () = publish => Ok(()),
                () = secrets => Ok(()),
            }
        };
        tokio::pin!(run);
        let lost = async {
            loop {
                if leadership.changed().await.is_err() || *leadership.borrow() != Leadership::Leader
                {
                    return;
                }
            }
        };
        tokio::select! {
            result = &mut run => {
                if let Err(e) = result {
                    metrics.inc(metrics::ERRORS, &["exporter"]);
                    tracing::error!(error = telemetry::chain(e.as_ref()).to_string(), "exporter failed; restarting it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            () = lost => tracing::warn!("lost leadership; stopped exporting"),
            _ = &mut stop => {
                elector.release().await;
                return Ok(());
            }
        }
    }
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the apiserver until `shutdown` resolves.
pub async fn run(
    config: config::Config,
    enroll: Option<enroll::Config>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = match &enroll {
        Some(_) => Some(kube_client(&config).await?),
        None => None,
    };
    let apiserver = config.clone();
    let mut running = start(config).await?;
    let _enroll = match (enroll, client) {
        (Some(e), Some(client)) => {
            Some(enroll::start(e, &apiserver, client, running.metrics().clone()).await?)
        }
        _ => None,
    };
    tokio::select! {
        () = shutdown => {}
        result = &mut running.task => return result.context("apiserver task")?,
    }
    tracing::info!("shutting down");
    running.stop().await
}
