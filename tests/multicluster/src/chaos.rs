//! The chaos soak: seeded random faults against a two-cluster lab while a client pod connects
//! throughout, then the end state of every node checked against the truth computed from the
//! Kubernetes objects. Test infrastructure (`tests/chaos.rs` runs it).
//!
//! The lab: east and west (2 nodes each), `demo/echo` global in both (affinity local in east),
//! a client pod on east's first node running the `clustermesh probe` (one `connect()` to the
//! ClusterIP every 100 ms, one timestamped JSON line each). Both clusters are installed with
//! `clustermesh install` from `deploy/` and their pods run by the lab kubelet
//! ([`Lab::install_cluster`]): a killed etcd, apiserver or node agent is restarted by the
//! kubelet after its back-off, as on a node; an apiserver↔etcd cut is a rule in the
//! apiserver pods' namespaces ([`Lab::cut_apiserver_etcd`]).
//!
//! The fault loop picks a [`Kind`] (every kind once in a seeded order, then at random), applies
//! it to a random target, holds it a bounded random time, heals it and waits — with a deadline
//! — until the mesh is healthy again ([`look`]: etcd up, apiservers ready with every peer
//! ready, node agents ready, and every node programmed exactly as [`truth`] says). While a
//! fault is held and until healthy, every node's maps are compared with the truth, health
//! aside: a fault must withdraw nothing. A connection that fails is attributed to the fault
//! whose window (applied → healthy again) holds its start, else to `none`. Only backend deaths
//! may fail connections (until health checks notice); [`Report::violations`] names everything
//! else.
//!
//! Every choice comes from the seed (`CLUSTERMESH_CHAOS_SEED`); timings are the machine's, so
//! a seed replays the same faults, not the same interleavings. Must not be linked into a
//! production binary.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use model::node_state::NodeState;
use model::status::Phase;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::lab::{self, Component, Lab};
use crate::{LabCluster, scenarios};

/// The seed of the fault sequence.
pub const SEED_ENV: &str = "CLUSTERMESH_CHAOS_SEED";
/// How long the soak runs, bring-up included, in seconds.
pub const SECONDS_ENV: &str = "CLUSTERMESH_CHAOS_SECONDS";
/// The seed when [`SEED_ENV`] is unset.
pub const DEFAULT_SEED: u64 = 13;
/// The soak's length when [`SECONDS_ENV`] is unset: the CI form (about 2 minutes in all).
pub const DEFAULT_SECONDS: u64 = 110;
/// The longest fault loop [`SECONDS_ENV`] may ask for.
pub const MAX_SECONDS: u64 = 600;
/// How long the mesh may take to be healthy again after a fault is healed.
pub const RECOVERY: Duration = Duration::from_secs(90);

/// The service under test and where its client runs.
pub const SERVICE: &str = "demo/echo";
const CLIENT_CLUSTER: &str = "east";
const CLIENT_POD: &str = "client";
const PROBE_INTERVAL_MS: u64 = 100;
const PROBE_TIMEOUT_MS: u64 = 1000;

/// What one soak does.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Config {
    /// Seed of every random choice.
    pub seed: u64,
    /// The soak's length in seconds, bring-up included: a fault is started only if it can be
    /// held to the end before then (the last recovery comes on top, bounded by [`RECOVERY`]).
    pub seconds: u64,
}

impl Config {
    /// From [`SEED_ENV`] and [`SECONDS_ENV`] (defaults [`DEFAULT_SEED`], [`DEFAULT_SECONDS`];
    /// at most [`MAX_SECONDS`]).
    pub fn from_env() -> Result<Self> {
        let num = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={v:?} is not a non-negative integer")),
                Err(_) => Ok(default),
            }
        };
        let seconds = num(SECONDS_ENV, DEFAULT_SECONDS)?;
        if seconds > MAX_SECONDS {
            bail!("{SECONDS_ENV}={seconds}: at most {MAX_SECONDS}");
        }
        Ok(Self {
            seed: num(SEED_ENV, DEFAULT_SEED)?,
            seconds,
        })
    }

    /// The longest time a control-plane fault is held: longer soaks hold faults longer (up
    /// to 40 s, beyond the exporter's 30 s lease TTL).
    fn max_hold(&self) -> Duration {
        Duration::from_secs((self.seconds / 15).clamp(5, 40))
    }
}

/// SplitMix64: small, seeded, good enough to pick faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A random element (`None` when empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.range(0, items.len() as u64 - 1) as usize)
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.range(0, i as u64) as usize);
        }
    }

    fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_millis(self.range(lo.as_millis() as u64, hi.as_millis() as u64))
    }
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A cluster's etcd killed (SIGKILL) and restarted on the same data dir.
    EtcdKill,
    /// A cluster's apiserver killed and restarted.
    ApiserverKill,
    /// A node agent killed and restarted (its pins keep the datapath working meanwhile).
    NodeAgentKill,
    /// A cluster's apiserver cut from its etcd (both up).
    ApiserverEtcdCut,
    /// The apiservers cut from each other's Mesh API (packets dropped); node agents still
    /// reach their own apiserver.
    ApiserverPartition,
    /// One backend process killed, Kubernetes unchanged (only health checks notice).
    BackendKill,
    /// Every backend of the client's cluster killed: the client must fail over to the other
    /// cluster's tier.
    LocalBackendsKill,
    /// A cluster's backends scaled to 1–3 replicas (down gracefully: out of the
    /// EndpointSlice first, killed once no node programs them).
    Scale,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 8] = [
        Kind::EtcdKill,
        Kind::ApiserverKill,
        Kind::NodeAgentKill,
        Kind::ApiserverEtcdCut,
        Kind::ApiserverPartition,
        Kind::BackendKill,
        Kind::LocalBackendsKill,
        Kind::Scale,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::EtcdKill => "etcd-kill",
            Kind::ApiserverKill => "apiserver-kill",
            Kind::NodeAgentKill => "node-agent-kill",
            Kind::ApiserverEtcdCut => "apiserver-etcd-cut",
            Kind::ApiserverPartition => "apiserver-partition",
            Kind::BackendKill => "backend-kill",
            Kind::LocalBackendsKill => "local-backends-kill",
            Kind::Scale => "scale",
        }
    }

    /// Whether connections may fail while it is active: only a backend's death, until the
    /// node agents' health checks notice it.
    pub fn may_fail_connections(self) -> bool {
        matches!(self, Kind::BackendKill | Kind::LocalBackendsKill)
    }
}

/// One fault with its target.
#[derive(Debug, Clone)]
enum Fault {
    Crash { cluster: String, comp: Component },
    EtcdCut { cluster: String },
    Partition,
    BackendKill { cluster: String, pod: String },
    LocalBackendsKill { cluster: String },
    Scale { cluster: String, replicas: u8 },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Crash { cluster, comp } => write!(f, "kill -9 {comp} of {cluster}"),
            Fault::EtcdCut { cluster } => write!(f, "cut {cluster}'s apiserver from its etcd"),
            Fault::Partition => f.write_str("partition the apiservers from each other"),
            Fault::BackendKill { cluster, pod } => write!(f, "kill backend {pod} of {cluster}"),
            Fault::LocalBackendsKill { cluster } => write!(f, "kill every backend of {cluster}"),
            Fault::Scale { cluster, replicas } => {
                write!(f, "scale {SERVICE} in {cluster} to {replicas}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The partition: iptables rules in the host's network namespace.

fn iptables(args: &[String]) -> Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .context("run iptables")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A partition between the apiservers: `DROP` rules (tagged with an iptables comment) on the
/// host's loopback path to each Mesh API port, so the apiservers' importers (which connect
/// from the host) lose each other while node agents (which connect from their node's
/// namespace, over the bridge) keep their apiserver. Removed on drop.
#[derive(Debug)]
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    /// Drops what reaches `host:port` for every port of `ports` (the Mesh APIs' load
    /// balancers), from the host and from pods.
    pub fn apply(tag: &str, host: Ipv4Addr, ports: &[u16]) -> Result<Self> {
        let mut p = Self { rules: Vec::new() };
        for port in ports {
            let spec: Vec<String> = [
                "INPUT",
                "-d",
                &format!("{host}/32"),
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-m",
                "comment",
                "--comment",
                tag,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let mut insert = vec!["-I".to_owned()];
            insert.extend(spec.iter().cloned());
            // On failure, dropping `p` removes the rules already in place.
            iptables(&insert)?;
            p.rules.push(spec);
        }
        // Established streams would stall until HTTP/2 keepalive gives up (about 20 s);
        // reset them now (the Mesh API load balancers' sockets on the host: node agents reach
        // their apiserver through its ClusterIP, not these ports), so that even a short
        // partition makes the importers reconnect.
        for port in ports {
            let h = host.to_string();
            let port = format!(":{port}");
            let out = Command::new("ss")
                .args([
                    "-K", "-t", "src", &h, "(", "dport", "=", &port, "or", "sport", "=", &port, ")",
                ])
                .output()
                .context("run ss -K")?;
            if !out.status.success() {
                bail!(
                    "ss -K (reset the streams to {h}{port}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(p)
    }

    /// Whether the partition holds: a connection from the host to each port gets no answer.
    pub async fn holds(host: Ipv4Addr, ports: &[u16]) -> bool {
        for port in ports {
            let connect = tokio::net::TcpStream::connect(SocketAddr::from((host, *port)));
            if tokio::time::timeout(Duration::from_millis(300), connect)
                .await
                .is_ok()
            {
                return false;
            }
        }
        true
    }

    /// Removes every rule tagged `tag` (left by an earlier run that was killed).
    pub fn sweep(tag: &str) -> Result<usize> {
        let out = Command::new("iptables")
            .args(["-w", "-S", "INPUT"])
            .output()
            .context("run iptables -S")?;
        let mut removed = 0;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            let tagged = words
                .windows(2)
                .any(|w| w[0] == "--comment" && w[1].trim_matches('"') == tag);
            if tagged && words.first().is_some_and(|w| w == "-A") {
                let mut del = vec!["-D".to_owned()];
                del.extend(words[1..].iter().map(|w| w.trim_matches('"').to_owned()));
                iptables(&del)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for spec in self.rules.drain(..) {
            let mut del = vec!["-D".to_owned()];
            del.extend(spec);
            if let Err(e) = iptables(&del) {
                eprintln!("chaos: could not remove a partition rule: {e:#}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client: `clustermesh probe` in a pod.

/// One connection attempt as the probe prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    /// Start, µs since the epoch.
    pub t: i64,
    /// Whether `connect()` succeeded.
    pub ok: bool,
    /// The backend the socket reached.
    pub backend: Option<String>,
    /// The error, when not ok.
    pub error: Option<String>,
}

/// The probe process and the attempts it reported.
#[derive(Debug)]
pub struct Client {
    child: Child,
    seen: Arc<StdMutex<Vec<Attempt>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    /// Starts `clustermesh probe` in `pod` of `cluster`, connecting to `target` every
    /// `interval`.
    pub fn start(
        lab: &Lab,
        cluster: &str,
        pod: &str,
        target: SocketAddr,
        interval: Duration,
    ) -> Result<Self> {
        let argv = [
            lab::binary("clustermesh")?.display().to_string(),
            "probe".into(),
            "--target".into(),
            target.to_string(),
            "--interval".into(),
            format!("{}ms", interval.as_millis()),
            "--timeout".into(),
            format!("{PROBE_TIMEOUT_MS}ms"),
        ];
        let log = std::fs::File::create(lab.state.dir.join("probe.log"))?;
        let mut child = lab
            .pod_command(cluster, pod, &argv)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("start the probe")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the probe's stdout"))?;
        let seen: Arc<StdMutex<Vec<Attempt>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(a) = serde_json::from_str::<Attempt>(&line)
                    && let Ok(mut v) = sink.lock()
                {
                    v.push(a);
                }
            }
        });
        Ok(Self {
            child,
            seen,
            reader: Some(reader),
        })
    }

    /// Whether the probe still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The attempts so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Stops the probe; every attempt it reported.
    pub fn stop(mut self) -> Vec<Attempt> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.attempts()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The truth: what every node should program, from the Kubernetes objects alone.

/// A backend as a node should program it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Want {
    /// `ip:port`.
    pub addr: String,
    /// Its cluster's ID.
    pub cluster_id: u16,
    /// Its health-check state (every backend runs when the truth is checked).
    pub healthy: bool,
}

/// Backends per tier (each sorted; trailing empty tiers dropped), by frontend `ip:port/proto`.
pub type Frontends = BTreeMap<String, Vec<Vec<Want>>>;

fn normalize(mut tiers: Vec<Vec<Want>>) -> Vec<Vec<Want>> {
    for t in &mut tiers {
        t.sort();
        t.dedup();
    }
    while tiers.last().is_some_and(Vec::is_empty) {
        tiers.pop();
    }
    tiers
}

/// A port as (name, number, protocol).
type Port = (String, u16, String);

#[derive(Debug)]
struct GlobalSvc {
    cluster_id: u16,
    cluster_ips: Vec<IpAddr>,
    ports: Vec<Port>,
    shared: bool,
    affinity: String,
    /// Ready backends and their ports.
    backends: Vec<(IpAddr, Vec<Port>)>,
}

impl GlobalSvc {
    fn backends_for(&self, name: &str, proto: &str) -> Vec<Want> {
        let mut out = Vec::new();
        for (ip, ports) in &self.backends {
            if let Some((_, p, _)) = ports.iter().find(|(n, _, pr)| n == name && pr == proto) {
                out.push(Want {
                    addr: SocketAddr::new(*ip, *p).to_string(),
                    cluster_id: self.cluster_id,
                    healthy: true,
                });
            }
        }
        out
    }
}

/// The global services of one cluster, read from its Kubernetes API: Services annotated
/// `service.cilium.io/global: "true"` (or in a Namespace annotated
/// `clustermesh.dev/global-services: "true"`, unless they opt out), their ClusterIPs, ports,
/// `shared` and `affinity` annotations, and the ready endpoints of their EndpointSlices.
async fn global_services(
    client: kube::Client,
    cluster_id: u16,
) -> Result<BTreeMap<String, GlobalSvc>> {
    use model::annotations::{AFFINITY, GLOBAL, NAMESPACE_GLOBAL, SHARED};
    let lp = ListParams::default();
    let namespaces = Api::<Namespace>::all(client.clone()).list(&lp).await?;
    let ns_global: Vec<String> = namespaces
        .items
        .iter()
        .filter(|n| {
            n.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(NAMESPACE_GLOBAL))
                .is_some_and(|v| v == "true")
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let services = Api::<Service>::all(client.clone()).list(&lp).await?;
    let slices = Api::<EndpointSlice>::all(client).list(&lp).await?;
    let mut out = BTreeMap::new();
    for s in services.items {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let name = s.metadata.name.clone().unwrap_or_default();
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let global = match ann.get(GLOBAL).map(String::as_str) {
            Some("true") => true,
            Some(_) => false,
            None => ns_global.contains(&ns),
        };
        if !global {
            continue;
        }
        let spec = s.spec.clone().unwrap_or_default();
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        let cluster_ips: Vec<IpAddr> = ips.iter().filter_map(|i| i.parse().ok()).collect();
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                (
                    p.name.unwrap_or_default(),
                    p.port as u16,
                    p.protocol.unwrap_or_else(|| "TCP".into()),
                )
            })
            .collect();
        let mut backends = Vec::new();
        for sl in &slices.items {
            let of_it = sl.metadata.namespace.as_deref() == Some(ns.as_str())
                && sl
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .is_some_and(|n| *n == name);
            if !of_it {
                continue;
            }
            let sports: Vec<Port> = sl
                .ports
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    Some((
                        p.name.unwrap_or_default(),
                        p.port? as u16,
                        p.protocol.unwrap_or_else(|| "TCP".into()),
                    ))
                })
                .collect();
            for e in &sl.endpoints {
                // Kubernetes: an unknown `ready` means ready.
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                for a in &e.addresses {
                    if let Ok(ip) = a.parse() {
                        backends.push((ip, sports.clone()));
                    }
                }
            }
        }
        out.insert(
            format!("{ns}/{name}"),
            GlobalSvc {
                cluster_id,
                cluster_ips,
                ports,
                shared: ann.get(SHARED).is_none_or(|v| v != "false"),
                affinity: ann.get(AFFINITY).cloned().unwrap_or_else(|| "none".into()),
                backends,
            },
        );
    }
    Ok(out)
}

/// What every node of each cluster should program (the same for all nodes of a cluster):
/// for each global service the cluster has, on each ClusterIP and port, its own ready
/// backends and those of every other cluster that shares the service, in tiers by its
/// affinity (local: own first; remote: others first; none: all in one).
pub async fn truth(lab: &Lab) -> Result<BTreeMap<String, Frontends>> {
    let mut all: BTreeMap<String, BTreeMap<String, GlobalSvc>> = BTreeMap::new();
    for c in &lab.state.clusters {
        let client = lab.client(&c.name).await?;
        all.insert(
            c.name.clone(),
            global_services(client, c.id)
                .await
                .with_context(|| format!("read {}'s services", c.name))?,
        );
    }
    let mut out = BTreeMap::new();
    for (cluster, services) in &all {
        let mut frontends = Frontends::new();
        for (key, svc) in services {
            for (pname, port, proto) in &svc.ports {
                let Some(suffix) = (match proto.as_str() {
                    "TCP" => Some("tcp"),
                    "UDP" => Some("udp"),
                    _ => None,
                }) else {
                    continue;
                };
                let local = svc.backends_for(pname, proto);
                let remote: Vec<Want> = all
                    .iter()
                    .filter(|(other, _)| *other != cluster)
                    .filter_map(|(_, s)| s.get(key))
                    .filter(|s| s.shared)
                    .flat_map(|s| s.backends_for(pname, proto))
                    .collect();
                let tiers = match svc.affinity.as_str() {
                    "local" => vec![local, remote],
                    "remote" => vec![remote, local],
                    _ => vec![local.into_iter().chain(remote).collect()],
                };
                let tiers = normalize(tiers);
                for ip in &svc.cluster_ips {
                    frontends.insert(
                        format!("{}/{suffix}", SocketAddr::new(*ip, *port)),
                        tiers.clone(),
                    );
                }
            }
        }
        out.insert(cluster.clone(), frontends);
    }
    Ok(out)
}

fn show(f: &Frontends) -> String {
    f.iter()
        .map(|(fe, tiers)| {
            let t: Vec<String> = tiers
                .iter()
                .map(|t| {
                    let b: Vec<String> = t
                        .iter()
                        .map(|w| {
                            format!(
                                "{}@{}{}",
                                w.addr,
                                w.cluster_id,
                                if w.healthy { "" } else { "(unhealthy)" }
                            )
                        })
                        .collect();
                    format!("[{}]", b.join(" "))
                })
                .collect();
            format!("{fe} → {}", t.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a node's maps hold, by frontend (frontends without backends left out); with the
/// health-check states when `health`, else every backend counted healthy.
fn programmed(s: &NodeState, health: bool) -> Frontends {
    let mut out = Frontends::new();
    for svc in &s.services {
        let p = normalize(
            svc.programmed
                .iter()
                .map(|t| {
                    t.iter()
                        .map(|b| Want {
                            addr: b.addr.clone(),
                            cluster_id: b.cluster_id,
                            healthy: b.healthy || !health,
                        })
                        .collect()
                })
                .collect(),
        );
        if !p.is_empty() {
            out.insert(svc.frontend.clone(), p);
        }
    }
    out
}

/// Compares a node's `/state` with the truth of its cluster: synced, nothing refused, and
/// both what it wants and what its maps hold equal the truth (backends, tiers, cluster IDs,
/// health).
pub fn check_node(want: &Frontends, s: &NodeState) -> Result<(), String> {
    if !s.synced {
        return Err("no complete snapshot from its apiserver".into());
    }
    if !s.refused.is_empty() {
        return Err(format!("refused services: {:?}", s.refused));
    }
    let programmed = programmed(s, true);
    let mut desired: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for svc in &s.services {
        let mut d: Vec<Vec<String>> = svc.desired.clone();
        for t in &mut d {
            t.sort();
        }
        while d.last().is_some_and(Vec::is_empty) {
            d.pop();
        }
        if !d.is_empty() {
            desired.insert(svc.frontend.clone(), d);
        }
    }
    let want_nonempty: Frontends = want
        .iter()
        .filter(|(_, t)| !t.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let want_addrs: BTreeMap<String, Vec<Vec<String>>> = want_nonempty
        .iter()
        .map(|(k, tiers)| {
            (
                k.clone(),
                tiers
                    .iter()
                    .map(|t| t.iter().map(|w| w.addr.clone()).collect())
                    .collect(),
            )
        })
        .collect();
    if desired != want_addrs {
        return Err(format!(
            "desires {desired:?}, the truth is {}",
            show(&want_nonempty)
        ));
    }
    if programmed != want_nonempty {
        return Err(format!(
            "programmed {}, the truth is {}",
            show(&programmed),
            show(&want_nonempty)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Health: is the mesh whole again?

async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    match tokio::time::timeout(Duration::from_secs(3), test_support::http_get(addr, path)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("GET {addr}{path}: {e}")),
        Err(_) => Err(format!("GET {addr}{path}: no answer within 3 s")),
    }
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim()
}

/// One look at the mesh.
#[derive(Debug, Default)]
pub struct Look {
    /// The first thing that keeps the mesh from being healthy, in words (`None`: healthy).
    /// Healthy: every etcd accepts connections; every apiserver is ready, leads and has every
    /// peer `ready`; every node agent is ready and programmed exactly as [`truth`] says.
    pub unhealthy: Option<String>,
    /// Nodes whose maps (health aside) differ from the truth. While the Kubernetes objects do
    /// not change, that is a withdrawal (or an addition) a fault caused: a fault is never a
    /// deletion. Nodes whose agent does not answer are not asked; their maps are the kernel's.
    pub withdrawn: Vec<String>,
}

/// Looks at every part of the mesh (all of them, also after the first problem, so that every
/// node's maps are compared each time).
pub async fn look(lab: &Lab) -> Look {
    let mut l = Look::default();
    let truth = match truth(lab).await {
        Ok(t) => t,
        Err(e) => {
            l.unhealthy = Some(format!("truth: {e:#}"));
            return l;
        }
    };
    let mut problem = |p: String| {
        if l.unhealthy.is_none() {
            l.unhealthy = Some(p);
        }
    };
    let peers = lab.state.clusters.len() - 1;
    let mut withdrawn = Vec::new();
    for c in &lab.state.clusters {
        let answers = match lab.etcd_addr(&c.name).await {
            Ok(etcd) => matches!(
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(etcd))
                    .await,
                Ok(Ok(_))
            ),
            Err(_) => false,
        };
        if !answers {
            problem(format!("{}'s etcd does not accept connections", c.name));
        }
        // The replica that leads, with its `/status` (read from inside its pod).
        let leader = lab
            .apiserver_leader(&c.name)
            .await
            .map_err(|e| format!("{}'s apiserver: {e:#}", c.name));
        match &leader {
            Ok(r) => match get(r.health, "/readyz").await {
                Ok(resp) if resp.starts_with("HTTP/1.1 200") => {}
                Ok(resp) => problem(format!("{}'s apiserver not ready: {}", c.name, body(&resp))),
                Err(e) => problem(format!("{}'s apiserver: {e}", c.name)),
            },
            Err(e) => problem(e.clone()),
        }
        match leader.and_then(|r| {
            r.status
                .ok_or_else(|| format!("{}'s apiserver: no /status answered", c.name))
        }) {
            Ok(st) => {
                let ready_peers = st.peers.iter().filter(|p| p.phase == Phase::Ready).count();
                if !st.ready || !st.leader || ready_peers != peers {
                    let ps: Vec<String> = st
                        .peers
                        .iter()
                        .map(|p| format!("{} {}", p.name, p.phase))
                        .collect();
                    problem(format!(
                        "{}'s apiserver: ready {}, leader {}, peers [{}]",
                        c.name,
                        st.ready,
                        st.leader,
                        ps.join(", ")
                    ));
                }
            }
            Err(e) => problem(e),
        }
        let want = truth.get(&c.name).cloned().unwrap_or_default();
        let want_set: Frontends = want
            .iter()
            .filter(|(_, t)| !t.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for n in &c.nodes {
            let addr: SocketAddr = (n.ip, model::node_state::NODE_AGENT_PORT).into();
            match get(addr, "/readyz").await {
                Ok(r) if r.starts_with("HTTP/1.1 200") => {}
                Ok(r) => problem(format!("node agent of {} not ready: {}", n.name, body(&r))),
                Err(e) => problem(format!("node agent of {}: {e}", n.name)),
            }
            match lab.node_state(&c.name, &n.name).await {
                Ok(s) => {
                    if let Err(e) = check_node(&want, &s) {
                        problem(format!("{}: {e}", n.name));
                    }
                    let got = programmed(&s, false);
                    if got != want_set {
                        withdrawn.push(format!(
                            "{} programmed {}, the truth is {}",
                            n.name,
                            show(&got),
                            show(&want_set)
                        ));
                    }
                }
                Err(e) => problem(format!("/state of {}: {e:#}", n.name)),
            }
        }
    }
    l.withdrawn = withdrawn;
    l
}

/// Looks at the nodes' maps during one fault.
#[derive(Debug, Default)]
pub struct Checks {
    /// How many looks.
    pub looks: u64,
    /// How many found a node whose maps differ from the truth.
    pub bad: u64,
    /// What the first of those found.
    pub found: Vec<String>,
    /// What kept the mesh from being healthy meanwhile (the fault's visible effect; the first
    /// three distinct reasons).
    pub effects: Vec<String>,
}

impl Checks {
    fn add(&mut self, l: &Look) {
        self.looks += 1;
        if let Some(u) = &l.unhealthy {
            let u: String = u.chars().take(200).collect();
            if self.effects.len() < 3 && !self.effects.contains(&u) {
                self.effects.push(u);
            }
        }
        if !l.withdrawn.is_empty() {
            self.bad += 1;
        }
        for w in &l.withdrawn {
            if self.found.len() < 5 {
                self.found.push(w.clone());
            }
        }
    }
}

/// Polls [`look`] until the mesh is healthy; how long that took, or the last reason after
/// `timeout`. Counts what each look found in `checks` when given.
pub async fn until_healthy(
    lab: &Mutex<Lab>,
    timeout: Duration,
    mut checks: Option<&mut Checks>,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let l = look(&*lab.lock().await).await;
        if let Some(c) = checks.as_deref_mut() {
            c.add(&l);
        }
        match l.unhealthy {
            None => return Ok(started.elapsed()),
            Some(e) if started.elapsed() >= timeout => {
                return Err(format!("not healthy after {timeout:?}: {e}"));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Its kind.
    pub kind: Kind,
    /// What was done.
    pub what: String,
    /// When it was applied, ms after the soak started.
    pub at_ms: u64,
    /// How long it was held.
    pub held_ms: u64,
    /// From the start of healing (a restart, unblocking; for a scale change, the change) to
    /// healthy again.
    pub recovery_ms: u64,
    /// Its window, µs since the epoch: applied → healthy again.
    #[serde(skip)]
    window: (i64, i64),
    /// Looks at every node's maps while it was held and until healthy again (none for a
    /// scale change, whose truth moves).
    pub state_checks: u64,
    /// How many of them found a node's maps differing from the truth.
    pub withdrawn_looks: u64,
    /// What the first of those found (at most 5).
    pub withdrawn: Vec<String>,
    /// What the looks saw keeping the mesh from being healthy (the fault's effect).
    pub effects: Vec<String>,
    /// Connections that failed in its window.
    pub failed: u64,
    /// Connections attempted in its window.
    pub attempts: u64,
}

/// Totals of one fault kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindTotals {
    /// The kind (`none`: no fault active).
    pub kind: String,
    /// Whether connections may fail during it.
    pub may_fail: bool,
    /// Times applied.
    pub applied: u64,
    /// Connections attempted during its windows.
    pub attempts: u64,
    /// Of those, failed.
    pub failed: u64,
    /// The longest time from the start of healing to healthy again.
    pub max_recovery_ms: u64,
    /// Looks at every node's maps during its faults.
    pub state_checks: u64,
    /// Of those, how many found backends withdrawn.
    pub withdrawn: u64,
}

/// A failed connection.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// ms after the soak started.
    pub at_ms: u64,
    /// The fault active then (`none`).
    pub during: String,
    /// The error.
    pub error: String,
}

/// What a soak did and saw.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Its configuration.
    pub config: Config,
    /// Wall time of the fault loop, ms.
    pub loop_ms: u64,
    /// Connections attempted.
    pub attempts: u64,
    /// Of those, failed.
    pub failed: u64,
    /// The longest gap between two attempts, ms (the client ran throughout when small).
    pub max_gap_ms: u64,
    /// Per kind, then `none`.
    pub kinds: Vec<KindTotals>,
    /// Every fault in order.
    pub faults: Vec<FaultRecord>,
    /// The failed connections (at most 100).
    pub failures: Vec<Failure>,
}

impl Report {
    fn build(
        config: Config,
        loop_ms: u64,
        start_us: i64,
        faults: Vec<FaultRecord>,
        attempts: &[Attempt],
    ) -> Self {
        let mut faults = faults;
        let mut none = (0u64, 0u64);
        let mut failures = Vec::new();
        for a in attempts {
            let during = faults
                .iter_mut()
                .find(|f| f.window.0 <= a.t && a.t <= f.window.1);
            let name = during.as_ref().map_or("none", |f| f.kind.name()).to_owned();
            match during {
                Some(f) => {
                    f.attempts += 1;
                    f.failed += u64::from(!a.ok);
                }
                None => {
                    none.0 += 1;
                    none.1 += u64::from(!a.ok);
                }
            }
            if !a.ok && failures.len() < 100 {
                failures.push(Failure {
                    at_ms: (a.t - start_us).max(0) as u64 / 1000,
                    during: name,
                    error: a.error.clone().unwrap_or_default(),
                });
            }
        }
        let mut kinds: Vec<KindTotals> = Kind::ALL
            .iter()
            .map(|k| {
                let of: Vec<&FaultRecord> = faults.iter().filter(|f| f.kind == *k).collect();
                KindTotals {
                    kind: k.name().into(),
                    may_fail: k.may_fail_connections(),
                    applied: of.len() as u64,
                    attempts: of.iter().map(|f| f.attempts).sum(),
                    failed: of.iter().map(|f| f.failed).sum(),
                    max_recovery_ms: of.iter().map(|f| f.recovery_ms).max().unwrap_or(0),
                    state_checks: of.iter().map(|f| f.state_checks).sum(),
                    withdrawn: of.iter().map(|f| f.withdrawn_looks).sum(),
                }
            })
            .collect();
        kinds.push(KindTotals {
            kind: "none".into(),
            may_fail: false,
            applied: 0,
            attempts: none.0,
            failed: none.1,
            max_recovery_ms: 0,
            state_checks: 0,
            withdrawn: 0,
        });
        let mut ts: Vec<i64> = attempts.iter().map(|a| a.t).collect();
        ts.sort_unstable();
        let max_gap_ms = ts
            .windows(2)
            .map(|w| (w[1] - w[0]).max(0) as u64 / 1000)
            .max()
            .unwrap_or(0);
        Self {
            config,
            loop_ms,
            attempts: attempts.len() as u64,
            failed: attempts.iter().filter(|a| !a.ok).count() as u64,
            max_gap_ms,
            kinds,
            faults,
            failures,
        }
    }

    /// What the soak promises and did not keep: failed connections outside backend deaths
    /// (including with no fault active), a client that did not run throughout.
    pub fn violations(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .kinds
            .iter()
            .filter(|k| !k.may_fail && k.failed > 0)
            .map(|k| format!("{} failed connections during {}", k.failed, k.kind))
            .collect();
        for f in self.faults.iter().filter(|f| !f.withdrawn.is_empty()) {
            v.push(format!(
                "during {} ({}), nodes lost programmed backends: {}",
                f.kind.name(),
                f.what,
                f.withdrawn.join("; ")
            ));
        }
        let expected = self.loop_ms / PROBE_INTERVAL_MS / 2;
        if self.attempts < expected {
            v.push(format!(
                "the client made {} connection attempts, fewer than {expected}",
                self.attempts
            ));
        }
        // An attempt takes at most the probe's connect timeout, then the next one starts.
        if self.max_gap_ms > 3 * PROBE_TIMEOUT_MS {
            v.push(format!(
                "the client paused {} ms between two connections",
                self.max_gap_ms
            ));
        }
        v
    }

    /// The report as text: totals per kind, then every fault.
    pub fn text(&self) -> String {
        let mut s = format!(
            "chaos soak: seed {}, {} s soak, fault loop {} ms, {} faults, {} connections, {} failed, longest client gap {} ms\n\n",
            self.config.seed,
            self.config.seconds,
            self.loop_ms,
            self.faults.len(),
            self.attempts,
            self.failed,
            self.max_gap_ms
        );
        s.push_str(&format!(
            "{:<22} {:>7} {:>9} {:>7} {:>14} {:>13}  {}\n",
            "fault kind",
            "applied",
            "attempts",
            "failed",
            "max recovery",
            "kept/checked",
            "failures allowed"
        ));
        for k in &self.kinds {
            let (applied, recovery) = if k.kind == "none" {
                ("-".to_owned(), "-".to_owned())
            } else {
                (k.applied.to_string(), format!("{} ms", k.max_recovery_ms))
            };
            let kept = if k.kind == "none" {
                "-".to_owned()
            } else {
                format!("{}/{}", k.state_checks - k.withdrawn, k.state_checks)
            };
            s.push_str(&format!(
                "{:<22} {:>7} {:>9} {:>7} {:>14} {:>13}  {}\n",
                k.kind,
                applied,
                k.attempts,
                k.failed,
                recovery,
                kept,
                if k.may_fail { "yes" } else { "no" }
            ));
        }
        s.push_str("\nfaults:\n");
        for f in &self.faults {
            s.push_str(&format!(
                "  {:>7} ms  {:<20} {:<50} held {:>5} ms, healthy {:>5} ms after healing began, {} of {} connections failed\n",
                f.at_ms,
                f.kind.name(),
                f.what,
                f.held_ms,
                f.recovery_ms,
                f.failed,
                f.attempts
            ));
            if let Some(e) = f.effects.first() {
                s.push_str(&format!("{:>13}  seen: {e}\n", ""));
            }
        }
        if !self.failures.is_empty() {
            s.push_str("\nfailed connections:\n");
            for f in &self.failures {
                s.push_str(&format!(
                    "  {:>7} ms  during {:<20} {}\n",
                    f.at_ms, f.during, f.error
                ));
            }
        }
        s
    }

    /// Writes `chaos-report.txt` and `chaos-report.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("chaos-report.txt"), self.text())?;
        std::fs::write(
            dir.join("chaos-report.json"),
            serde_json::to_vec_pretty(self)?,
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The soak.

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The lab under chaos, and what the faults need.
#[derive(Debug)]
struct Soak {
    // Dropped in this order: the client, the partition rules, then the lab.
    client: Option<Client>,
    partition: Option<Partition>,
    tag: String,
    lab: Arc<Mutex<Lab>>,
    rng: Rng,
    config: Config,
    /// When the fault loop started (µs since the epoch, and as an instant).
    start: (i64, Instant),
    /// When the soak began (the lab's bring-up).
    began: Instant,
}

impl Soak {
    /// Brings the lab up in `dir` and deploys the service and its client.
    async fn up(dir: &Path, config: Config) -> Result<Self> {
        let began = Instant::now();
        let mut lab = Lab::create(dir, true)?;
        let tag = format!("clustermesh-chaos-{}", lab.state.x);
        let swept = Partition::sweep(&tag)?;
        if swept > 0 {
            eprintln!("chaos: removed {swept} iptables rules left by an earlier run ({tag})");
        }
        lab.install_cluster("east", 1, 2).await?;
        lab.install_cluster("west", 2, 2).await?;
        let kc = lab.kubeconfig();
        let lab = Arc::new(Mutex::new(lab));
        let (east, west) = (
            LabCluster::new(&lab, "east").await,
            LabCluster::new(&lab, "west").await,
        );
        scenarios::connect(&kc, &east, &west).await?;
        let global = ("service.cilium.io/global".to_owned(), "true".to_owned());
        let vip = {
            let mut l = lab.lock().await;
            let vip = l
                .deploy(
                    "east",
                    SERVICE,
                    2,
                    &BTreeMap::from([
                        global.clone(),
                        ("service.cilium.io/affinity".into(), "local".into()),
                    ]),
                )
                .await?;
            l.deploy("west", SERVICE, 2, &BTreeMap::from([global]))
                .await?;
            vip
        };
        crate::Cluster::add_client(&east, CLIENT_POD).await?;
        let target = SocketAddr::new(IpAddr::V4(vip), 80);
        scenarios::until_answered_by(&east, CLIENT_POD, target, &[CLIENT_CLUSTER]).await?;
        let client = Client::start(
            &*lab.lock().await,
            CLIENT_CLUSTER,
            CLIENT_POD,
            target,
            Duration::from_millis(PROBE_INTERVAL_MS),
        )?;
        Ok(Self {
            client: Some(client),
            partition: None,
            tag,
            lab,
            rng: Rng::new(config.seed),
            config,
            start: (now_us(), Instant::now()),
            began,
        })
    }

    async fn backends(&self, cluster: &str) -> Result<Vec<lab::PodState>> {
        Ok(self
            .lab
            .lock()
            .await
            .cluster(cluster)?
            .pods
            .iter()
            .filter(|p| p.service.as_deref() == Some(SERVICE))
            .cloned()
            .collect())
    }

    /// A target for `kind`.
    async fn choose(&mut self, kind: Kind) -> Result<Fault> {
        let clusters = ["east".to_owned(), "west".to_owned()];
        let cluster = self
            .rng
            .pick(&clusters)
            .cloned()
            .unwrap_or_else(|| "east".into());
        Ok(match kind {
            Kind::EtcdKill => Fault::Crash {
                cluster,
                comp: Component::Etcd,
            },
            Kind::ApiserverKill => Fault::Crash {
                cluster,
                comp: Component::Apiserver,
            },
            Kind::NodeAgentKill => {
                let nodes: Vec<String> = self
                    .lab
                    .lock()
                    .await
                    .cluster(&cluster)?
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .collect();
                let node = self
                    .rng
                    .pick(&nodes)
                    .cloned()
                    .ok_or_else(|| anyhow!("{cluster} has no nodes"))?;
                Fault::Crash {
                    cluster,
                    comp: Component::NodeAgent(node),
                }
            }
            Kind::ApiserverEtcdCut => Fault::EtcdCut { cluster },
            Kind::ApiserverPartition => Fault::Partition,
            Kind::BackendKill => {
                let mut pods = Vec::new();
                for c in &clusters {
                    for p in self.backends(c).await? {
                        pods.push((c.clone(), p.name));
                    }
                }
                let (cluster, pod) = self
                    .rng
                    .pick(&pods)
                    .cloned()
                    .ok_or_else(|| anyhow!("no backends"))?;
                Fault::BackendKill { cluster, pod }
            }
            Kind::LocalBackendsKill => Fault::LocalBackendsKill {
                cluster: CLIENT_CLUSTER.into(),
            },
            Kind::Scale => {
                let now = self.backends(&cluster).await?.len() as u64;
                let mut replicas = self.rng.range(1, 3);
                if replicas == now {
                    replicas = if now >= 3 { 1 } else { now + 1 };
                }
                Fault::Scale {
                    cluster,
                    replicas: replicas as u8,
                }
            }
        })
    }

    /// Waits, with a deadline, until no node of any cluster programs any of `addrs`.
    async fn until_withdrawn(&self, addrs: &[String]) -> Result<()> {
        let started = Instant::now();
        loop {
            let mut still = Vec::new();
            {
                let lab = self.lab.lock().await;
                for c in &lab.state.clusters {
                    for n in &c.nodes {
                        match lab.node_state(&c.name, &n.name).await {
                            Ok(s) => {
                                for svc in &s.services {
                                    for b in svc.programmed.iter().flatten() {
                                        if addrs.contains(&b.addr) {
                                            still.push(format!("{} on {}", b.addr, n.name));
                                        }
                                    }
                                }
                            }
                            Err(e) => still.push(format!("/state of {}: {e:#}", n.name)),
                        }
                    }
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= RECOVERY {
                bail!(
                    "removed backends still programmed after {RECOVERY:?}: {}",
                    still.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Holds a fault for `d`, looking at every node's maps about every 700 ms ([`look`]).
    async fn hold(&self, d: Duration, checks: &mut Checks) {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(700))).await;
            if Instant::now() >= end {
                return;
            }
            checks.add(&look(&*self.lab.lock().await).await);
        }
    }

    /// Applies `fault`, holds it, heals it. Returns how long it was held and when healing
    /// began (a restart, unblocking, removing the rules, starting the backends; for a scale
    /// change, the change itself).
    async fn inflict(&mut self, fault: &Fault, checks: &mut Checks) -> Result<(Duration, Instant)> {
        let cp_hold = self
            .rng
            .duration(Duration::from_secs(1), self.config.max_hold());
        let backend_hold = self
            .rng
            .duration(Duration::from_millis(500), Duration::from_secs(3));
        let applied = Instant::now();
        let healing = match fault {
            Fault::Crash { cluster, comp } => {
                self.lab.lock().await.crash(cluster, comp)?;
                self.hold(cp_hold, checks).await;
                let healing = Instant::now();
                self.lab.lock().await.restart(cluster, comp).await?;
                healing
            }
            Fault::EtcdCut { cluster } => {
                self.lab
                    .lock()
                    .await
                    .cut_apiserver_etcd(cluster, true)
                    .await?;
                self.hold(cp_hold, checks).await;
                self.lab
                    .lock()
                    .await
                    .cut_apiserver_etcd(cluster, false)
                    .await?;
                Instant::now()
            }
            Fault::Partition => {
                let (host, ports) = {
                    let lab = self.lab.lock().await;
                    let ports: Vec<u16> = lab.state.clusters.iter().map(|c| c.mesh_port).collect();
                    (lab.host_ip(), ports)
                };
                self.partition = Some(Partition::apply(&self.tag, host, &ports)?);
                if !Partition::holds(host, &ports).await {
                    bail!("the partition does not hold: the host still reaches a Mesh API");
                }
                self.hold(cp_hold, checks).await;
                self.partition = None;
                Instant::now()
            }
            Fault::BackendKill { cluster, pod } => {
                self.lab.lock().await.kill_backend(cluster, pod)?;
                self.hold(backend_hold, checks).await;
                let healing = Instant::now();
                self.lab
                    .lock()
                    .await
                    .set_backends(cluster, SERVICE, true)
                    .await?;
                healing
            }
            Fault::LocalBackendsKill { cluster } => {
                self.lab
                    .lock()
                    .await
                    .set_backends(cluster, SERVICE, false)
                    .await?;
                self.hold(backend_hold, checks).await;
                let healing = Instant::now();
                self.lab
                    .lock()
                    .await
                    .set_backends(cluster, SERVICE, true)
                    .await?;
                healing
            }
            Fault::Scale { cluster, replicas } => {
                let leaving = self
                    .lab
                    .lock()
                    .await
                    .scale(cluster, SERVICE, *replicas)
                    .await?;
                if !leaving.is_empty() {
                    let addrs: Vec<String> = {
                        let lab = self.lab.lock().await;
                        lab.cluster(cluster)?
                            .pods
                            .iter()
                            .filter(|p| leaving.contains(&p.name))
                            .map(|p| {
                                SocketAddr::new(IpAddr::V4(p.ip), lab::BACKEND_PORT).to_string()
                            })
                            .collect()
                    };
                    // The grace period: the pods serve until no node sends them anything new.
                    self.until_withdrawn(&addrs).await?;
                    for pod in &leaving {
                        self.lab.lock().await.delete_pod(cluster, pod).await?;
                    }
                }
                applied
            }
        };
        Ok((healing.saturating_duration_since(applied), healing))
    }

    /// The fault loop, then the final check; the report.
    async fn run(&mut self) -> Result<Report> {
        let mut records: Vec<FaultRecord> = Vec::new();
        let result = self.fault_loop(&mut records).await;
        let attempts = self.client.take().map(Client::stop).unwrap_or_default();
        let loop_ms = match &result {
            Ok(ms) => *ms,
            Err(_) => self.start.1.elapsed().as_millis() as u64,
        };
        let report = Report::build(self.config, loop_ms, self.start.0, records, &attempts);
        let dir = self.lab.lock().await.state.dir.clone();
        report.write(&dir)?;
        match result {
            Ok(_) => Ok(report),
            Err(e) => Err(anyhow!(
                "{e:#}\n\nthe soak so far (report in {}):\n{}",
                dir.display(),
                report.text()
            )),
        }
    }

    /// Returns how long the fault loop ran, ms.
    async fn fault_loop(&mut self, records: &mut Vec<FaultRecord>) -> Result<u64> {
        self.start = (now_us(), Instant::now());
        let (start_us, started) = self.start;
        until_healthy(&self.lab, RECOVERY, None)
            .await
            .map_err(|e| anyhow!("the lab before any fault: {e}"))?;
        let mut first_round: Vec<Kind> = Kind::ALL.to_vec();
        self.rng.shuffle(&mut first_round);
        first_round.reverse();
        let budget = Duration::from_secs(self.config.seconds);
        while self.began.elapsed() + self.config.max_hold() < budget {
            if let Some(c) = self.client.as_mut()
                && !c.running()
            {
                bail!("the client's probe stopped (see probe.log in the lab's directory)");
            }
            let kind = match first_round.pop() {
                Some(k) => k,
                None => *self.rng.pick(&Kind::ALL).unwrap_or(&Kind::EtcdKill),
            };
            let fault = self.choose(kind).await?;
            let at = now_us();
            eprintln!(
                "chaos: {:>6.1} s  {:<20} {fault}",
                started.elapsed().as_secs_f64(),
                kind.name()
            );
            let mut checks = Checks::default();
            let (held, healing) = self
                .inflict(&fault, &mut checks)
                .await
                .with_context(|| format!("{fault}"))?;
            // While a scale change propagates, the maps lag the truth by design.
            let during = (kind != Kind::Scale).then_some(&mut checks);
            until_healthy(&self.lab, RECOVERY, during)
                .await
                .map_err(|e| {
                    anyhow!("after {fault} (held {held:?}), the mesh did not recover: {e}")
                })?;
            let recovery = healing.elapsed();
            records.push(FaultRecord {
                kind,
                what: fault.to_string(),
                at_ms: ((at - start_us).max(0) / 1000) as u64,
                held_ms: held.as_millis() as u64,
                recovery_ms: recovery.as_millis() as u64,
                window: (at, now_us()),
                state_checks: checks.looks,
                withdrawn_looks: checks.bad,
                withdrawn: checks.found,
                effects: checks.effects,
                failed: 0,
                attempts: 0,
            });
            let gap = self
                .rng
                .duration(Duration::from_millis(500), Duration::from_millis(1500));
            tokio::time::sleep(gap).await;
        }
        let loop_ms = started.elapsed().as_millis() as u64;
        // The end: every node programmed as the Kubernetes objects say.
        until_healthy(&self.lab, RECOVERY, None)
            .await
            .map_err(|e| anyhow!("the final state: {e}"))?;
        let lab = self.lab.lock().await;
        let truth = truth(&lab).await?;
        for c in &lab.state.clusters {
            let want = truth.get(&c.name).cloned().unwrap_or_default();
            for n in &c.nodes {
                let s = lab.node_state(&c.name, &n.name).await?;
                check_node(&want, &s).map_err(|e| anyhow!("final state of {}: {e}", n.name))?;
            }
        }
        Ok(loop_ms)
    }
}

/// Runs one soak with a lab in `dir`; the report (also written to `dir`). Everything the soak
/// started is stopped and removed when it returns, also on failure: the lab (processes,
/// namespaces, cgroups, pins), the proxies and the partition's iptables rules.
pub async fn run(dir: &Path, config: Config) -> Result<Report> {
    let mut soak = Soak::up(dir, config).await?;
    soak.run().await
}

// ---------------------------------------------------------------------------------------------
// One apiserver↔etcd cut, held past the session lease TTL (issue 13, case 1).

/// What a fault withdrew or broke on the lab, whatever the fault: map entries deleted by node
/// (`deletes`), looks that found nodes without a programmed backend (how many, what the first
/// found), failed connections (of attempts), and a client that did not run for the `ms` the
/// fault and the recovery lasted.
fn withdrawals(
    deletes: &BTreeMap<String, f64>,
    (withdrawn_looks, withdrawn): (u64, &[String]),
    (attempts, failed): (u64, u64),
    ms: u64,
) -> Vec<String> {
    let mut v = Vec::new();
    for (node, n) in deletes {
        if *n != 0.0 {
            v.push(format!("{node} deleted {n} map entries"));
        }
    }
    if withdrawn_looks > 0 {
        v.push(format!(
            "{withdrawn_looks} looks found nodes that lost programmed backends: {}",
            withdrawn.join("; ")
        ));
    }
    if failed > 0 {
        v.push(format!("{failed} of {attempts} connections failed"));
    }
    let expected = ms / PROBE_INTERVAL_MS / 2;
    if attempts < expected {
        v.push(format!(
            "the client made {attempts} connection attempts, fewer than {expected}"
        ));
    }
    v
}

/// Map entries each node deleted between two readings of [`map_deletes`].
fn deletes_since(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(n, a)| (n.clone(), a - before.get(n).copied().unwrap_or(0.0)))
        .collect()
}

/// The lab apiservers' session lease TTL (`--lease-ttl`, the default), ms.
const LEASE_TTL_MS: u64 = 30_000;

/// What [`etcd_cut`] saw.
#[derive(Debug, Clone, Serialize)]
pub struct CutReport {
    /// The cluster whose apiserver was cut from its etcd.
    pub cluster: String,
    /// How long the cut was held, ms.
    pub held_ms: u64,
    /// From the end of the cut to the mesh whole again ([`until_healthy`]: the apiserver ready,
    /// its peers ready, every node equal to the truth), ms.
    pub whole_after_ms: u64,
    /// Keys under the cluster's `state/` prefix in its etcd before the cut.
    pub exported_keys: usize,
    /// Keys of those missing afterwards, changed, or deleted and written again meanwhile (their
    /// create revision moved).
    pub keys_lost: Vec<String>,
    /// Map entries each node agent deleted from the start of the cut to whole again
    /// (`clustermesh_datapath_map_ops_total{op="delete"}`), by node.
    pub map_deletes: BTreeMap<String, f64>,
    /// Connections the client attempted during the whole run (bring-up aside), and of those
    /// failed.
    pub attempts: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Looks at every node's maps during the cut and until whole again.
    pub state_checks: u64,
    /// Of those, how many found a node's maps differing from the truth (health aside).
    pub withdrawn_looks: u64,
    /// What the first of those found.
    pub withdrawn: Vec<String>,
    /// The apiserver's phase in `clustermesh status -o json` at the end of the cut.
    pub phase_during: Option<String>,
    /// `clustermesh status` and `clustermesh check` exit codes at the end of the cut.
    pub exit_codes_during: (i32, i32),
    /// `clustermesh check`'s line about the leader at the end of the cut.
    pub leader_check_during: Option<String>,
    /// The phase `clustermesh status` shows once whole again (within 15 s).
    pub phase_after: Option<String>,
    /// The failed connections (at most 100).
    pub failures: Vec<Failure>,
}

impl CutReport {
    /// What the cut withdrew or broke: keys lost, map entries deleted, nodes that lost
    /// backends, failed connections, a client that did not run, a phase not reported.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.keys_lost.is_empty() {
            v.push(format!(
                "{} of {} exported keys lost or rewritten: {}",
                self.keys_lost.len(),
                self.exported_keys,
                self.keys_lost.join(", ")
            ));
        }
        v.extend(withdrawals(
            &self.map_deletes,
            (self.withdrawn_looks, &self.withdrawn),
            (self.attempts, self.failed),
            self.held_ms + self.whole_after_ms,
        ));
        let past_the_ttl = self.held_ms > LEASE_TTL_MS;
        if past_the_ttl
            && (self.phase_during.as_deref() != Some("lease-lost")
                || self.exit_codes_during != (1, 1))
        {
            v.push(format!(
                "past the lease TTL, status said phase {:?} (want lease-lost) and status/check exited {:?} (want 1, 1)",
                self.phase_during, self.exit_codes_during
            ));
        }
        if self.phase_after.as_deref() != Some("ready") {
            v.push(format!(
                "whole again, the phase is {:?}, not ready",
                self.phase_after
            ));
        }
        v
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut s = format!(
            "etcd cut: {}'s apiserver cut from its etcd for {} ms; whole again {} ms after; {} exported keys, {} lost; map deletes {:?}; {} connections, {} failed; {} state checks, {} with backends withdrawn\nduring the cut: phase {:?}, status/check exit {:?}, check: {}\nafter: phase {:?}\n",
            self.cluster,
            self.held_ms,
            self.whole_after_ms,
            self.exported_keys,
            self.keys_lost.len(),
            self.map_deletes,
            self.attempts,
            self.failed,
            self.state_checks,
            self.withdrawn_looks,
            self.phase_during,
            self.exit_codes_during,
            self.leader_check_during.as_deref().unwrap_or("-"),
            self.phase_after,
        );
        for f in &self.failures {
            s.push_str(&format!("  failed at {} ms: {}\n", f.at_ms, f.error));
        }
        s
    }
}

/// The keys under `cluster`'s `state/` prefix in its own etcd (reached directly, not through
/// the apiserver's proxy), with value and create revision.
async fn exported(lab: &Lab, cluster: &str) -> Result<BTreeMap<String, (Vec<u8>, i64)>> {
    let (endpoint, tls, netns) = lab.etcd_reader(cluster).await?;
    let name = model::ClusterName::new(cluster)?;
    let read = move || async move {
        let kv = kvstore::Client::connect(kvstore::Config::new(
            vec![endpoint],
            Some(certs::TlsFiles::in_dir(&tls)),
        ))
        .await
        .with_context(|| format!("connect to {name}'s etcd"))?;
        let prefix = model::keys::cluster_prefix(model::keys::Scope::State, &name);
        let (kvs, _) = kv
            .list_raw(&prefix)
            .await
            .with_context(|| format!("list {prefix} in {name}'s etcd"))?;
        anyhow::Ok(
            kvs.into_iter()
                .map(|k| (k.key, (k.value, k.create_revision)))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    lab::in_netns(&netns, read).await?
}

/// Map entries deleted by every node agent so far, by node.
async fn map_deletes(lab: &Lab) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for c in &lab.state.clusters {
        for n in &c.nodes {
            let addr = SocketAddr::from((n.ip, model::node_state::NODE_AGENT_PORT));
            let text = get(addr, "/metrics").await.map_err(|e| anyhow!(e))?;
            out.insert(
                n.name.clone(),
                crate::metric_sum(
                    body(&text),
                    "clustermesh_datapath_map_ops_total",
                    "op=\"delete\"",
                ),
            );
        }
    }
    Ok(out)
}

/// What [`fd_exhaustion`] saw.
#[derive(Debug, Clone, Serialize)]
pub struct FdReport {
    /// The cluster whose apiserver ran out of file descriptors.
    pub cluster: String,
    /// How long it was held, ms.
    pub held_ms: u64,
    /// The apiserver's open descriptors when its limit was lowered to them (plus a few).
    pub open_fds: usize,
    /// Connections the test opened to its Mesh API port to take the rest.
    pub connections: usize,
    /// Failed scans of the peer directory counted meanwhile
    /// (`clustermesh_errors_total{kind="peer-config"}`): the fault reached the importer.
    pub failed_scans: f64,
    /// "draining" lines the apiserver logged meanwhile (a peer taken for removed).
    pub drains_logged: usize,
    /// Map entries each node agent deleted from the start to whole again, by node.
    pub map_deletes: BTreeMap<String, f64>,
    /// Looks at every node's maps meanwhile, and how many found backends withdrawn.
    pub state_checks: u64,
    /// Of those, how many found a node's maps differing from the truth.
    pub withdrawn_looks: u64,
    /// What the first of those found.
    pub withdrawn: Vec<String>,
    /// Connections the client pod attempted meanwhile, and of those failed.
    pub attempts: u64,
    /// Of those, failed.
    pub failed: u64,
    /// From the end of the fault to the mesh whole again, ms.
    pub whole_after_ms: u64,
}

impl FdReport {
    /// What the fault withdrew or broke, and whether it reached the importer at all.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.failed_scans < 1.0 {
            v.push(
                "no scan of the peer directory failed: the fault never reached the importer".into(),
            );
        }
        if self.drains_logged > 0 {
            v.push(format!(
                "the apiserver drained a peer {} times",
                self.drains_logged
            ));
        }
        v.extend(withdrawals(
            &self.map_deletes,
            (self.withdrawn_looks, &self.withdrawn),
            (self.attempts, self.failed),
            self.held_ms + self.whole_after_ms,
        ));
        v
    }
}

/// Issue 12, case 3, on real processes: `cluster`'s apiserver runs out of file descriptors
/// for `hold` — its limit lowered (prlimit) to what it has open plus a few and unauthenticated
/// TCP connections to its Mesh API taking the rest — so its scans of the peer directory fail
/// meanwhile. Nothing may be drained or withdrawn: a failed read is not a removal.
pub async fn fd_exhaustion(dir: &Path, cluster: &str, hold: Duration) -> Result<FdReport> {
    let mut soak = Soak::up(
        dir,
        Config {
            seed: DEFAULT_SEED,
            seconds: DEFAULT_SECONDS,
        },
    )
    .await?;
    until_healthy(&soak.lab, RECOVERY, None)
        .await
        .map_err(|e| anyhow!("the lab before the fault: {e}"))?;
    let started_us = now_us();
    let (pid, log, mesh, health, deletes_before) = {
        let lab = soak.lab.lock().await;
        let leader = lab.apiserver_leader(cluster).await?;
        (
            leader.pid,
            leader.log,
            leader.mesh,
            leader.health,
            map_deletes(&lab).await?,
        )
    };
    let metrics = || async { get(health, "/metrics").await.map_err(|e| anyhow!(e)) };
    let scans = |text: &str| {
        crate::metric_sum(
            body(text),
            "clustermesh_errors_total",
            "kind=\"peer-config\"",
        )
    };
    let errors_before = scans(&metrics().await?);
    let drains_before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("draining its state")
        .count();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let (soft, hard) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .ok_or_else(|| anyhow!("no open-files limit for {pid}"))?;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let limit = open_fds + 4;
    // As the process's own user (an installed apiserver runs as 65532): changing another
    // user's limits needs CAP_SYS_RESOURCE, which this machine's root may lack.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let id = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("0")
            .to_owned()
    };
    let (uid, gid) = (id("Uid:"), id("Gid:"));
    let prlimit = |spec: &str| -> Result<()> {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "prlimit",
                "--pid",
                &pid.to_string(),
                &format!("--nofile={spec}"),
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "prlimit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    // The soft limit only: the process may raise it back, as a real one could; it does not.
    prlimit(&format!("{limit}:{hard}"))?;
    eprintln!(
        "fd exhaustion: {cluster}'s apiserver (pid {pid}) limited to {limit} descriptors, {open_fds} open"
    );
    let mut conns = Vec::new();
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(mesh))
            .await
        {
            Ok(Ok(s)) => conns.push(s),
            _ => break,
        }
    }
    let mut checks = Checks::default();
    soak.hold(hold, &mut checks).await;
    let connections = conns.len();
    drop(conns);
    let restored = prlimit(&format!("{soft}:{hard}"));
    let healed = Instant::now();
    restored?;
    until_healthy(&soak.lab, RECOVERY, Some(&mut checks))
        .await
        .map_err(|e| anyhow!("after the fault, the mesh did not recover: {e}"))?;
    let whole_after = healed.elapsed();
    let deletes_after = map_deletes(&*soak.lab.lock().await).await?;
    let errors_after = scans(&metrics().await?);
    let drains_after = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("draining its state")
        .count();
    let attempts: Vec<Attempt> = soak
        .client
        .take()
        .map(Client::stop)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.t >= started_us)
        .collect();
    Ok(FdReport {
        cluster: cluster.to_owned(),
        held_ms: hold.as_millis() as u64,
        open_fds,
        connections,
        failed_scans: errors_after - errors_before,
        drains_logged: drains_after.saturating_sub(drains_before),
        map_deletes: deletes_since(&deletes_before, &deletes_after),
        state_checks: checks.looks,
        withdrawn_looks: checks.bad,
        withdrawn: checks.found.clone(),
        attempts: attempts.len() as u64,
        failed: attempts.iter().filter(|a| !a.ok).count() as u64,
        whole_after_ms: whole_after.as_millis() as u64,
    })
}

/// `clustermesh status -o json` and `clustermesh check` for `cluster`: the apiserver's phase,
/// both exit codes and check's line about the leader.
async fn cli_view(
    lab: &Lab,
    cluster: &str,
) -> Result<(Option<String>, (i32, i32), Option<String>)> {
    let kc = lab.kubeconfig();
    let status = crate::clustermesh(&kc, &["status", "--context", cluster, "-o", "json"]).await?;
    let doc: serde_json::Value = serde_json::from_str(&status.stdout)
        .with_context(|| format!("clustermesh status -o json: {}", status.stdout))?;
    let phase = doc
        .pointer("/clusters/0/phase")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let check = crate::clustermesh(&kc, &["check", "--context", cluster]).await?;
    let leader = check
        .stdout
        .lines()
        .find(|l| l.contains(" leader "))
        .map(str::to_owned);
    Ok((phase, (status.code, check.code), leader))
}

/// Brings the chaos lab up in `dir`, cuts `cluster`'s apiserver from its etcd (both up; no
/// Kubernetes change) for `hold`, looking at every node's maps meanwhile, heals the cut and
/// waits until the mesh is whole again; what it saw. Everything is removed when it returns,
/// also on failure.
pub async fn etcd_cut(dir: &Path, cluster: &str, hold: Duration) -> Result<CutReport> {
    let mut reports = etcd_cuts(dir, cluster, &[hold]).await?;
    reports.pop().ok_or_else(|| anyhow!("no cut was made"))
}

/// [`etcd_cut`] once per hold in `holds`, one after the other on one lab (each waits for the
/// mesh to be whole again before the next).
pub async fn etcd_cuts(dir: &Path, cluster: &str, holds: &[Duration]) -> Result<Vec<CutReport>> {
    let mut soak = Soak::up(
        dir,
        Config {
            seed: DEFAULT_SEED,
            seconds: DEFAULT_SECONDS,
        },
    )
    .await?;
    until_healthy(&soak.lab, RECOVERY, None)
        .await
        .map_err(|e| anyhow!("the lab before the cut: {e}"))?;
    let mut partial = Vec::new();
    for hold in holds {
        partial.push(one_cut(&soak, cluster, *hold).await?);
    }
    let attempts: Vec<Attempt> = soak.client.take().map(Client::stop).unwrap_or_default();
    Ok(partial
        .into_iter()
        .map(|(mut report, started_us, ended_us)| {
            let window: Vec<&Attempt> = attempts
                .iter()
                .filter(|a| a.t >= started_us && a.t <= ended_us)
                .collect();
            report.attempts = window.len() as u64;
            report.failed = window.iter().filter(|a| !a.ok).count() as u64;
            report.failures = window
                .iter()
                .filter(|a| !a.ok)
                .take(100)
                .map(|a| Failure {
                    at_ms: (a.t - started_us).max(0) as u64 / 1000,
                    during: Kind::ApiserverEtcdCut.name().into(),
                    error: a.error.clone().unwrap_or_default(),
                })
                .collect();
            report
        })
        .collect())
}

/// One cut on `soak`'s lab: the report without its connections, and the cut's time window
/// (µs) for them.
async fn one_cut(soak: &Soak, cluster: &str, hold: Duration) -> Result<(CutReport, i64, i64)> {
    let started_us = now_us();
    let (keys_before, deletes_before) = {
        let lab = soak.lab.lock().await;
        (exported(&lab, cluster).await?, map_deletes(&lab).await?)
    };
    let mut checks = Checks::default();
    eprintln!("etcd cut: cutting {cluster}'s apiserver from its etcd for {hold:?}");
    let cut = Instant::now();
    soak.lab
        .lock()
        .await
        .cut_apiserver_etcd(cluster, true)
        .await?;
    // The fault lasts `hold` (its duration, not a wait for a condition).
    soak.hold(hold, &mut checks).await;
    let (phase_during, exit_codes_during, leader_check_during) =
        cli_view(&*soak.lab.lock().await, cluster).await?;
    soak.lab
        .lock()
        .await
        .cut_apiserver_etcd(cluster, false)
        .await?;
    let healed = Instant::now();
    let held = healed.duration_since(cut);
    until_healthy(&soak.lab, RECOVERY, Some(&mut checks))
        .await
        .map_err(|e| anyhow!("after the cut (held {held:?}), the mesh did not recover: {e}"))?;
    let whole_after = healed.elapsed();
    let (keys_after, deletes_after) = {
        let lab = soak.lab.lock().await;
        (exported(&lab, cluster).await?, map_deletes(&lab).await?)
    };
    // The status ConfigMap follows the live status a moment later: wait (with a deadline) for
    // `ready` there; the last phase seen otherwise.
    let mut phase_after = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while phase_after.as_deref() != Some("ready") && Instant::now() < deadline {
        phase_after = cli_view(&*soak.lab.lock().await, cluster).await?.0;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let keys_lost = keys_before
        .iter()
        .filter(|(k, v)| keys_after.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    let map_deletes = deletes_since(&deletes_before, &deletes_after);
    let report = CutReport {
        cluster: cluster.into(),
        held_ms: held.as_millis() as u64,
        whole_after_ms: whole_after.as_millis() as u64,
        exported_keys: keys_before.len(),
        keys_lost,
        map_deletes,
        attempts: 0,
        failed: 0,
        state_checks: checks.looks,
        withdrawn_looks: checks.bad,
        withdrawn: checks.found,
        phase_during,
        exit_codes_during,
        leader_check_during,
        phase_after,
        failures: Vec::new(),
    };
    Ok((report, started_us, now_us()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_seed_replays_the_same_choices() {
        let (mut a, mut b) = (Rng::new(13), Rng::new(13));
        let xs: Vec<u64> = (0..32).map(|_| a.range(1, 6)).collect();
        let ys: Vec<u64> = (0..32).map(|_| b.range(1, 6)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (1..=6).contains(x)));
        let mut k = Kind::ALL.to_vec();
        Rng::new(7).shuffle(&mut k);
        let mut sorted = k.clone();
        sorted.sort();
        assert_eq!(sorted, Kind::ALL.to_vec(), "a permutation");
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    fn attempt(t: i64, ok: bool) -> Attempt {
        Attempt {
            t,
            ok,
            backend: None,
            error: (!ok).then(|| "Connection refused".into()),
        }
    }

    fn record(kind: Kind, window: (i64, i64)) -> FaultRecord {
        FaultRecord {
            kind,
            what: kind.name().into(),
            at_ms: 0,
            held_ms: 0,
            recovery_ms: 5,
            window,
            state_checks: 1,
            withdrawn_looks: 0,
            withdrawn: Vec::new(),
            effects: Vec::new(),
            failed: 0,
            attempts: 0,
        }
    }

    #[test]
    fn failures_are_attributed_to_the_fault_whose_window_holds_them() {
        let config = Config {
            seed: 1,
            seconds: 1,
        };
        let faults = vec![
            record(Kind::BackendKill, (100, 200)),
            record(Kind::EtcdKill, (300, 400)),
        ];
        let attempts: Vec<Attempt> = (0..10)
            .map(|i| attempt(i * 50, i != 3 && i != 7 && i != 9))
            .collect();
        let r = Report::build(config, 500, 0, faults, &attempts);
        let by: BTreeMap<&str, (u64, u64)> = r
            .kinds
            .iter()
            .map(|k| (k.kind.as_str(), (k.attempts, k.failed)))
            .collect();
        // 150 (backend-kill), 350 (etcd-kill), 450 (none) failed.
        assert_eq!(by["backend-kill"], (3, 1));
        assert_eq!(by["etcd-kill"], (3, 1));
        assert_eq!(by["none"], (4, 1));
        let v = r.violations();
        assert!(v.iter().any(|s| s.contains("during etcd-kill")), "{v:?}");
        assert!(v.iter().any(|s| s.contains("during none")), "{v:?}");
        assert!(
            !v.iter().any(|s| s.contains("during backend-kill")),
            "{v:?}"
        );
    }

    fn want(addr: &str, id: u16) -> Want {
        Want {
            addr: addr.into(),
            cluster_id: id,
            healthy: true,
        }
    }

    #[test]
    fn a_node_matches_the_truth_only_with_the_same_tiers_ids_and_health() {
        use model::node_state::{NodeService, ProgrammedBackend};
        let truth: Frontends = BTreeMap::from([(
            "10.1.201.10:80/tcp".to_owned(),
            normalize(vec![
                vec![want("10.1.17.10:8080", 1)],
                vec![want("10.1.33.10:8080", 2)],
            ]),
        )]);
        let node = |tiers: Vec<Vec<(&str, u16, bool)>>| NodeState {
            cluster: "east".into(),
            synced: true,
            services: vec![NodeService {
                frontend: "10.1.201.10:80/tcp".into(),
                desired: tiers
                    .iter()
                    .map(|t| t.iter().map(|b| b.0.to_owned()).collect())
                    .collect(),
                programmed: tiers
                    .iter()
                    .map(|t| {
                        t.iter()
                            .map(|b| ProgrammedBackend {
                                addr: b.0.into(),
                                cluster_id: b.1,
                                healthy: b.2,
                                suspect: false,
                            })
                            .collect()
                    })
                    .collect(),
                in_sync: true,
                shares_pct: Vec::new(),
            }],
            in_sync: true,
            refused: Vec::new(),
            apiserver: None,
        };
        let good = node(vec![
            vec![("10.1.17.10:8080", 1, true)],
            vec![("10.1.33.10:8080", 2, true)],
        ]);
        check_node(&truth, &good).unwrap();
        for bad in [
            node(vec![
                vec![("10.1.33.10:8080", 2, true)],
                vec![("10.1.17.10:8080", 1, true)],
            ]),
            node(vec![vec![("10.1.17.10:8080", 1, true)]]),
            node(vec![
                vec![("10.1.17.10:8080", 1, false)],
                vec![("10.1.33.10:8080", 2, true)],
            ]),
            node(vec![
                vec![("10.1.17.10:8080", 1, true)],
                vec![("10.1.33.10:8080", 1, true)],
            ]),
        ] {
            assert!(check_node(&truth, &bad).is_err(), "{bad:?}");
        }
        // Health aside, an unhealthy backend is still programmed (not withdrawn).
        let unhealthy = node(vec![
            vec![("10.1.17.10:8080", 1, false)],
            vec![("10.1.33.10:8080", 2, true)],
        ]);
        assert_eq!(programmed(&unhealthy, false), truth);
    }

    /// Needs root and iptables, like the lab.
    #[tokio::test]
    async fn a_partition_drops_and_its_rules_go_away_on_drop_and_on_sweep() {
        let tag = format!("clustermesh-chaos-test-{}", std::process::id());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let host = Ipv4Addr::LOCALHOST;
        let count = || {
            let out = Command::new("iptables")
                .args(["-w", "-S", "INPUT"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).matches(&tag).count()
        };
        {
            let _p = Partition::apply(&tag, host, &[port]).unwrap();
            assert_eq!(count(), 1);
            assert!(Partition::holds(host, &[port]).await);
        }
        assert_eq!(count(), 0);
        assert!(!Partition::holds(host, &[port]).await);
        // A run that was killed leaves its rules; the next one sweeps them.
        std::mem::forget(Partition::apply(&tag, host, &[port]).unwrap());
        assert_eq!(count(), 1);
        assert_eq!(Partition::sweep(&tag).unwrap(), 1);
        assert_eq!(count(), 0);
    }
}
