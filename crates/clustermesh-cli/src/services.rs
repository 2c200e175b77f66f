//! `clustermesh services`: the global services of the mesh and their backends per cluster, as
//! the cluster's apiserver serves them to its node agents (a Mesh API snapshot, read with a
//! short-lived admin certificate issued from the cluster's CA); with `--node`, what that node
//! should have against what its eBPF maps hold (the node agent's `/state`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use certs::{LeafSpec, MeshIdentity, Reloader, Role, TlsFiles};
use clap::Args;
use k8s_openapi::api::core::v1::Node;
use model::node_state::{NODE_AGENT_STATE_PORT, NodeState};
use model::{ClusterId, ClusterName, GlobalService, keys::Kind};
use serde::Serialize;
use wire::{Codec, pb};

use crate::cluster::{Cluster, KubeArgs};
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub(crate) struct ServicesArgs {
    /// The cluster to ask (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// Only this service (`namespace/name`).
    #[arg(long)]
    service: Option<String>,
    /// Show what this node has programmed against what it should have: per tier its current
    /// share of new connections (spill-over included) and per backend its health and where
    /// that comes from (`down: probe` = confirmed by the agent's probes, `suspect: passive` =
    /// the kernel saw a connection to it fail and skips it).
    #[arg(long)]
    node: Option<String>,
    /// Port of the node agent's `/state` (mutual TLS; this command presents a short-lived
    /// admin certificate of the cluster).
    #[arg(long, default_value_t = NODE_AGENT_STATE_PORT)]
    agent_port: u16,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

/// What an admin needs to call a cluster's Mesh API: its name, endpoints and a short-lived
/// admin certificate (in a temporary directory removed with this).
pub(crate) struct AdminTls {
    pub(crate) name: ClusterName,
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls: std::sync::Arc<Reloader>,
    _dir: tempfile::TempDir,
}

/// [`AdminTls`] of `cluster`, the certificate valid for `valid_for`.
pub(crate) async fn admin_tls(cluster: &Cluster, valid_for: Duration) -> Result<AdminTls> {
    let (name, id) = cluster.identity().await?;
    let ca = cluster.ca().await?;
    let endpoints = cluster.mesh_endpoints().await?;
    let leaf = admin_leaf(&ca, &name, id, valid_for)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("tls.crt"), &leaf.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &leaf.key_pem)?;
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
    let tls = Reloader::load(TlsFiles::in_dir(dir.path()))?;
    Ok(AdminTls {
        name,
        endpoints,
        tls,
        _dir: dir,
    })
}

/// A short-lived admin certificate of the cluster, held in memory for one command.
fn admin_leaf(
    ca: &certs::Ca,
    name: &ClusterName,
    id: ClusterId,
    valid_for: Duration,
) -> Result<certs::Leaf> {
    ca.issue(
        &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Admin)).validity(
            time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
            valid_for,
        ),
    )
    .context("issue an admin certificate")
}

/// Every global service the cluster's apiserver knows (its own and imported), by name.
pub(crate) async fn mesh_services(
    cluster: &Cluster,
) -> Result<BTreeMap<String, Vec<GlobalService>>> {
    let AdminTls {
        name,
        endpoints,
        tls,
        ..
    } = admin_tls(cluster, Duration::from_secs(3600)).await?;
    let server = format!("the Mesh API of {name} at {}", endpoints.join(","));
    // Connect, watch and the whole snapshot within --request-timeout.
    cluster
        .bounded(&server, snapshot(&name, &endpoints, &tls))
        .await
}

/// The services of one Mesh API snapshot, by name.
async fn snapshot(
    name: &ClusterName,
    endpoints: &[String],
    tls: &std::sync::Arc<Reloader>,
) -> Result<BTreeMap<String, Vec<GlobalService>>> {
    let connected = meshapi::client::connect(name, endpoints, tls)
        .await
        .with_context(|| format!("Mesh API of {name} at {}", endpoints.join(",")))?;
    let mut api = connected.client;
    let mut stream = api
        .watch(pb::WatchRequest {
            kinds: vec![Kind::Services.as_str().to_owned()],
            clusters: Vec::new(),
            resume_revision: 0,
        })
        .await
        .map_err(|e| anyhow!("Watch: {}: {}", e.code(), e.message()))?
        .into_inner();
    let mut services: BTreeMap<(String, String), GlobalService> = BTreeMap::new();
    let read = async {
        loop {
            let Some(msg) = stream
                .message()
                .await
                .map_err(|e| anyhow!("Watch: {}: {}", e.code(), e.message()))?
            else {
                bail!("the apiserver ended the watch before its snapshot was complete");
            };
            if msg.reset {
                services.clear();
            }
            for c in &msg.changes {
                if c.op == pb::change::Op::Delete as i32 {
                    services.retain(|(cl, n), _| !(cl == &c.cluster && n == &c.name));
                } else if let Ok(gs) = GlobalService::decode(&c.value) {
                    services.insert((gs.cluster.to_string(), gs.name.to_string()), gs);
                }
            }
            if msg.snapshot_complete {
                return Ok(());
            }
        }
    };
    read.await?;
    let mut by_name: BTreeMap<String, Vec<GlobalService>> = BTreeMap::new();
    for ((_, n), gs) in services {
        by_name.entry(n).or_default().push(gs);
    }
    Ok(by_name)
}

/// How to reach a node's agent as an admin of its cluster: its `/state` address, the
/// cluster's name and ID, the node, the CA and a short-lived admin certificate, the timeout.
pub(crate) struct AgentAccess {
    pub addr: String,
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    pub node: model::NodeName,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub timeout: Duration,
}

/// [`AgentAccess`] to `node` of `cluster` (its InternalIP, port `port`).
pub(crate) async fn agent_access(cluster: &Cluster, node: &str, port: u16) -> Result<AgentAccess> {
    let api: kube::Api<Node> = kube::Api::all(cluster.client.clone());
    let n = api
        .get(node)
        .await
        .with_context(|| format!("context {}: node {node}", cluster.context))?;
    let ip = n
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .ok_or_else(|| anyhow!("node {node} has no InternalIP address"))?;
    let addr = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    let (name, id) = cluster.identity().await?;
    let ca = cluster.ca().await?;
    let leaf = admin_leaf(&ca, &name, id, Duration::from_secs(600))?;
    let node_name = model::NodeName::new(node).with_context(|| format!("node name {node:?}"))?;
    Ok(AgentAccess {
        addr,
        cluster: name,
        cluster_id: id,
        node: node_name,
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: leaf.cert_pem.clone(),
        key_pem: leaf.key_pem.clone(),
        // `--request-timeout 0`: no limit (a year is as good as none).
        timeout: cluster
            .request_timeout
            .unwrap_or(Duration::from_secs(365 * 86_400)),
    })
}

async fn node_state(cluster: &Cluster, node: &str, port: u16) -> Result<NodeState> {
    let a = agent_access(cluster, node, port).await?;
    Ok(meshapi::node_state::fetch(
        &a.addr,
        &a.cluster,
        a.cluster_id,
        &a.node,
        &a.ca_pem,
        &a.cert_pem,
        &a.key_pem,
        a.timeout,
    )
    .await?)
}

#[derive(Debug, Serialize)]
struct ServiceRow {
    service: String,
    cluster: String,
    shared: bool,
    affinity: String,
    ports: Vec<String>,
    backends: Vec<String>,
}

fn backend_text(gs: &GlobalService) -> Vec<String> {
    gs.backends
        .iter()
        .map(|b| {
            let state = if b.conditions.ready {
                "ready"
            } else if b.conditions.terminating {
                "terminating"
            } else {
                "not-ready"
            };
            let ports: Vec<String> = b.ports.iter().map(|p| p.port.to_string()).collect();
            format!("{}:{} ({state})", b.ip, ports.join(","))
        })
        .collect()
}

pub(crate) async fn run(args: ServicesArgs) -> Result<std::process::ExitCode> {
    let cluster = Cluster::open(&args.kube, args.context.as_deref()).await?;
    if let Some(node) = &args.node {
        let mut state = node_state(&cluster, node, args.agent_port).await?;
        if let Some(only) = &args.service {
            // Frontends are addresses; keep the ones of this service's ClusterIPs.
            let services = mesh_services(&cluster).await?;
            let ips: Vec<String> = services
                .get(only)
                .into_iter()
                .flatten()
                .flat_map(|gs| gs.cluster_ips.iter().map(ToString::to_string))
                .collect();
            state.services.retain(|s| {
                ips.iter()
                    .any(|ip| s.frontend.starts_with(&format!("{ip}:")))
            });
        }
        if !output::structured(args.output, &state)? {
            let mut rows = Vec::new();
            for s in &state.services {
                let tiers = s.desired.len().max(s.programmed.len());
                for t in 0..tiers {
                    let desired = s.desired.get(t).cloned().unwrap_or_default();
                    let programmed: Vec<String> = s
                        .programmed
                        .get(t)
                        .map(|l| {
                            l.iter()
                                .map(|b| match b.health_source() {
                                    None => b.addr.clone(),
                                    Some("passive") => format!("{} (suspect: passive)", b.addr),
                                    Some(source) => format!("{} (down: {source})", b.addr),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    rows.push(vec![
                        s.frontend.clone(),
                        t.to_string(),
                        s.shares_pct
                            .get(t)
                            .map_or_else(|| "-".into(), |p| format!("{p}%")),
                        if desired.is_empty() {
                            "-".into()
                        } else {
                            desired.join(", ")
                        },
                        if programmed.is_empty() {
                            "-".into()
                        } else {
                            programmed.join(", ")
                        },
                        if s.in_sync {
                            "in sync".into()
                        } else {
                            "DIFFERS".into()
                        },
                    ]);
                }
            }
            print!(
                "{}",
                output::table(
                    &[
                        "FRONTEND",
                        "TIER",
                        "SHARE",
                        "DESIRED",
                        "PROGRAMMED",
                        "STATE"
                    ],
                    &rows
                )
            );
            println!(
                "node {node} ({}): {}",
                state.cluster,
                match (state.synced, state.in_sync) {
                    (false, _) => "no complete snapshot from its apiserver yet",
                    (true, true) => "programmed as desired",
                    (true, false) => "programmed state differs from desired",
                }
            );
        }
        return Ok(if state.in_sync {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        });
    }
    let services = mesh_services(&cluster).await?;
    let mut rows = Vec::new();
    for (name, list) in &services {
        if args.service.as_ref().is_some_and(|s| s != name) {
            continue;
        }
        for gs in list {
            rows.push(ServiceRow {
                service: name.clone(),
                cluster: gs.cluster.to_string(),
                shared: gs.shared,
                affinity: gs.affinity.to_string(),
                ports: gs
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.protocol))
                    .collect(),
                backends: backend_text(gs),
            });
        }
    }
    if let Some(only) = &args.service
        && rows.is_empty()
    {
        bail!(
            "no global service {only} in the mesh as seen from {}",
            cluster.context
        );
    }
    if !output::structured(args.output, &rows)? {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.service.clone(),
                    r.cluster.clone(),
                    r.shared.to_string(),
                    r.affinity.clone(),
                    r.ports.join(","),
                    if r.backends.is_empty() {
                        "-".into()
                    } else {
                        r.backends.join(", ")
                    },
                ]
            })
            .collect();
        print!(
            "{}",
            output::table(
                &[
                    "SERVICE", "CLUSTER", "SHARED", "AFFINITY", "PORTS", "BACKENDS"
                ],
                &table
            )
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
