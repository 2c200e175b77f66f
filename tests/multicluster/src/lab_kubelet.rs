//! The lab kubelet's controller (issue #15): what runs the pods that the objects applied by
//! `clustermesh install` ask for, so that the lab is brought up from `deploy/` and nothing
//! else. One per lab cluster (`clustermesh-lab kubelet`, started by the lab); it polls the
//! cluster's Kubernetes API test server and does what the StatefulSet, Deployment and
//! DaemonSet controllers, the kubelet and kube-proxy do for the `kube-system` namespace:
//!
//! - **StatefulSets**: pod `<set>-<ordinal>` for every ordinal below `replicas`, its claims
//!   kept in a directory per claim across restarts.
//! - **Deployments**: pods of the current template revision (a hash of the template), rolled
//!   as `RollingUpdate` with `maxSurge`/`maxUnavailable` say: a new pod is started and Ready
//!   before an old one leaves the Services' endpoints and is sent `SIGTERM`.
//! - **DaemonSets**: one pod per lab node, in the node's network namespace (`hostNetwork`)
//!   and cgroup, the node's bpffs and cgroup as its host paths; a template change replaces
//!   them one node at a time.
//! - Every pod: its own network namespace on the lab bridge (unless `hostNetwork`), cgroup,
//!   mount namespace, user and capabilities ([`crate::pod_runner`]), what admission adds (the
//!   ServiceAccount token volume unless `automountServiceAccountToken: false`, the API's
//!   Service environment), projected tokens minted with TokenRequest for the pod's
//!   ServiceAccount; restarted when it exits; its Pod object and status kept in the API, and
//!   the workloads' status (what `kubectl rollout status` and `clustermesh install` read).
//! - **Services** with a selector: the ready pods are the endpoints; a ClusterIP is routed
//!   (nftables DNAT, [`route_service`]) in every lab node's namespace, a `LoadBalancer`
//!   Service gets the lab's load balancer — a TCP proxy on the bridge address and the port
//!   the lab gave it, its address written to the Service's status.
//!
//! Lab nodes are the Node objects that carry [`NODE_NETNS`], [`NODE_CGROUP`] and
//! [`NODE_BPFFS`] annotations (written by the lab when it creates a node).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, PodSpec, Secret, Service, ServiceAccount};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};

use crate::kubelet::{self, Objects, PodFacts};
use crate::pod_runner::{HttpProbe, Sandbox, Supervisor, route_service};

/// The namespace the lab kubelet runs pods of.
pub const NAMESPACE: &str = "kube-system";
/// Node annotation: the node's network namespace (under `/run/netns`).
pub const NODE_NETNS: &str = "lab.clustermesh.dev/netns";
/// Node annotation: the node's cgroup (its `/sys/fs/cgroup`; pods go below `kubepods`).
pub const NODE_CGROUP: &str = "lab.clustermesh.dev/cgroup";
/// Node annotation: the node's bpffs directory (its `/sys/fs/bpf`).
pub const NODE_BPFFS: &str = "lab.clustermesh.dev/bpffs";

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
/// Grace period of a terminated pod (`terminationGracePeriodSeconds` default).
const GRACE: Duration = Duration::from_secs(30);

/// Where the kubelet's pods live.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster's kubeconfig (the lab's admin client).
    pub kubeconfig: PathBuf,
    /// Pods' directories (volumes, logs) and claims go here.
    pub dir: PathBuf,
    /// The lab bridge the pods' veths join.
    pub bridge: String,
    /// The bridge's address: the pods' default route, and the load balancer's address.
    pub gateway: Ipv4Addr,
    /// Pods get `a.b.c.10` … `a.b.c.250` of this /24 (with the bridge's prefix length).
    pub pod_subnet: [u8; 3],
    /// The bridge's prefix length.
    pub prefix_len: u8,
    /// Names of everything the kubelet creates start with this (network namespaces and
    /// cgroups `<prefix>-<pod>`); the lab's teardown removes them by it.
    pub prefix: String,
    /// Host ends of pod veths: `<veth_prefix><n>` (at most 15 characters).
    pub veth_prefix: String,
    /// The load balancer's port for each `LoadBalancer` Service (`name` → port of the bridge
    /// address), and the Service port it forwards to.
    pub load_balancers: BTreeMap<String, (u16, u16)>,
}

/// The lab's binaries for `deploy/`'s images.
pub fn lab_binary(image: &str, program: &str) -> Option<PathBuf> {
    match program {
        "etcd" if image.contains("etcd") => ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file()),
        "clustermesh-apiserver" | "node-agent" => crate::lab::binary(program).ok(),
        _ => None,
    }
}

/// A lab node, from its Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LabNode {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    cgroup: PathBuf,
    bpffs: PathBuf,
}

/// A pod to start, as its workload controller asks for it.
struct PodOrder<'a> {
    name: &'a str,
    owner: Owner,
    revision: &'a str,
    labels: BTreeMap<String, String>,
    spec: PodSpec,
    node: Option<&'a LabNode>,
}

impl<'a> PodOrder<'a> {
    /// A Deployment's or DaemonSet's pod: its template's labels and spec.
    fn from_template(
        name: &'a str,
        owner: Owner,
        revision: &'a str,
        template: &k8s_openapi::api::core::v1::PodTemplateSpec,
        node: Option<&'a LabNode>,
    ) -> Self {
        Self {
            name,
            owner,
            revision,
            labels: template_labels(&Some(template)),
            spec: template.spec.clone().unwrap_or_default(),
            node,
        }
    }
}

/// What one round read from the API that starting a pod needs.
struct Round<'a> {
    objects: &'a Objects,
    services: &'a [Service],
    sets: &'a [StatefulSet],
}

/// A started pod's container and what it runs in (see [`RunPod`]).
struct Sandboxed {
    sup: Supervisor,
    sandbox: Sandbox,
    facts: PodFacts,
    process: kubelet::ProcessSpec,
    own_net: Option<(String, String)>,
    cgroup: PathBuf,
}

/// Projected tokens by audience, as `pod_runner` asks for them.
fn token_source(tokens: &BTreeMap<String, String>) -> impl Fn(&str, i64) -> Result<String> + '_ {
    |audience, _| {
        tokens
            .get(audience)
            .cloned()
            .ok_or_else(|| anyhow!("no token for audience {audience:?}"))
    }
}

/// Who owns a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    StatefulSet(String),
    Deployment(String),
    DaemonSet(String),
}

/// A pod the kubelet runs.
struct RunPod {
    owner: Owner,
    revision: String,
    node: Option<String>,
    ip: Ipv4Addr,
    /// Its own network namespace and veth (not for `hostNetwork` pods).
    own_net: Option<(String, String)>,
    cgroup: PathBuf,
    labels: BTreeMap<String, String>,
    seq: u64,
    sup: Supervisor,
    reported: Option<serde_json::Value>,
    /// What it was started from, to follow changes of the Secrets and ConfigMaps it mounts.
    sandbox: Sandbox,
    spec: PodSpec,
    facts: PodFacts,
    container: String,
    process: kubelet::ProcessSpec,
    /// When its projected tokens were minted: again at 80 % of their life, as the kubelet
    /// rotates them.
    tokens_at: std::time::Instant,
}

impl RunPod {
    fn ready(&self) -> bool {
        self.sup.state().ready
    }
}

/// The lab kubelet of one cluster.
pub struct LabKubelet {
    cfg: Config,
    client: kube::Client,
    api: SocketAddr,
    api_ca: String,
    pods: BTreeMap<String, RunPod>,
    seq: u64,
    /// Pod addresses (last octet) not in use: a stopped pod's is given back.
    free_hosts: Arc<Mutex<BTreeSet<u8>>>,
    next_veth: u32,
    routes: BTreeMap<(String, String), Vec<IpAddr>>,
    statuses: BTreeMap<String, serde_json::Value>,
    balancers: BTreeMap<String, Arc<Mutex<Vec<SocketAddr>>>>,
    failures: BTreeMap<String, String>,
    /// Pods sent `SIGTERM` and not yet gone: a StatefulSet's or DaemonSet's replacement of
    /// the same name waits for them (two node agents never share a node).
    terminating: Arc<Mutex<BTreeSet<String>>>,
}

impl std::fmt::Debug for LabKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabKubelet")
            .field("cfg", &self.cfg)
            .field("pods", &self.pods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Polls until the process is killed (the lab's teardown then removes what its pods had);
/// errors of one round are logged and the next round tries again.
pub async fn run(cfg: Config) -> Result<()> {
    let mut k = LabKubelet::new(cfg).await?;
    loop {
        if let Err(e) = k.reconcile().await {
            eprintln!("lab kubelet: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl LabKubelet {
    /// Connects to the cluster's API.
    pub async fn new(cfg: Config) -> Result<Self> {
        let kc = kube::config::Kubeconfig::read_from(&cfg.kubeconfig)
            .with_context(|| format!("read {}", cfg.kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let api: SocketAddr = {
            let host = config
                .cluster_url
                .host()
                .ok_or_else(|| anyhow!("the kubeconfig's server has no host"))?;
            let port = config.cluster_url.port_u16().unwrap_or(443);
            (host.parse::<IpAddr>()?, port).into()
        };
        let api_ca = config
            .root_cert
            .as_ref()
            .and_then(|certs| certs.first())
            .map(|der| pem("CERTIFICATE", der))
            .ok_or_else(|| anyhow!("the kubeconfig names no certificate authority"))?;
        let client = kube::Client::try_from(config)?;
        std::fs::create_dir_all(cfg.dir.join("claims"))?;
        Ok(Self {
            cfg,
            client,
            api,
            api_ca,
            pods: BTreeMap::new(),
            seq: 0,
            free_hosts: Arc::new(Mutex::new((10..=250).collect())),
            next_veth: 0,
            routes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            balancers: BTreeMap::new(),
            failures: BTreeMap::new(),
            terminating: Arc::default(),
        })
    }

    /// One round: every workload's pods to what it asks for, statuses, Services' routes.
    pub async fn reconcile(&mut self) -> Result<()> {
        let objects = self.objects().await?;
        let nodes = self.nodes().await?;
        let services: Vec<Service> = Api::<Service>::namespaced(self.client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items;
        let sets: Vec<StatefulSet> = Api::namespaced(self.client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items;
        let deployments: Vec<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items;
        let daemon_sets: Vec<DaemonSet> = Api::namespaced(self.client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await?
            .items;
        let round = Round {
            objects: &objects,
            services: &services,
            sets: &sets,
        };
        let mut retire: Vec<String> = Vec::new();
        self.refresh(&objects);
        self.rotate_tokens().await;

        // StatefulSets first: the others find their pods by name.
        let mut want: BTreeSet<String> = BTreeSet::new();
        for set in &sets {
            let name = set.metadata.name.clone().unwrap_or_default();
            let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let revision = revision(&set.spec.as_ref().map(|s| &s.template));
            for ordinal in 0..replicas.max(0) as u32 {
                let Some((pod_name, spec)) = kubelet::stateful_set_pod(set, ordinal) else {
                    continue;
                };
                want.insert(pod_name.clone());
                if !self.pods.contains_key(&pod_name) {
                    let labels = template_labels(&set.spec.as_ref().map(|s| &s.template));
                    self.start(
                        PodOrder {
                            name: &pod_name,
                            owner: Owner::StatefulSet(name.clone()),
                            revision: &revision,
                            labels,
                            spec,
                            node: None,
                        },
                        &round,
                    )
                    .await;
                }
            }
        }
        let stateful_ready = sets.iter().all(|set| {
            let name = set.metadata.name.clone().unwrap_or_default();
            let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            (0..replicas.max(0)).all(|i| self.pods.contains_key(&format!("{name}-{i}")))
        });

        // Deployments: rolled one pod at a time.
        for d in &deployments {
            let name = d.metadata.name.clone().unwrap_or_default();
            let spec = d.spec.clone().unwrap_or_default();
            let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
            let rev = revision(&Some(&spec.template));
            let owner = Owner::Deployment(name.clone());
            let (surge, unavailable) = rolling(&spec, replicas);
            // (name, ready, new revision, seq) of its pods still running.
            let mine: Vec<(String, bool, bool, u64)> = self
                .pods
                .iter()
                .filter(|(n, p)| p.owner == owner && !retire.contains(n))
                .map(|(n, p)| (n.clone(), p.ready(), p.revision == rev, p.seq))
                .collect();
            let new = mine.iter().filter(|p| p.2).count();
            let starting = mine.iter().any(|p| p.2 && !p.1);
            let ready = mine.iter().filter(|p| p.1).count();
            let mut old: Vec<&(String, bool, bool, u64)> = mine.iter().filter(|p| !p.2).collect();
            // Not ready first, then the oldest.
            old.sort_by_key(|p| (p.1, p.3));
            // Retire one: an old pod that is not ready, or (keeping enough ready) the oldest;
            // extra new pods once no old one is left.
            let mut retired = 0;
            if let Some(p) = old.first() {
                let after = ready - usize::from(p.1);
                if !p.1 || after + unavailable >= replicas {
                    retire.push(p.0.clone());
                    retired = 1;
                }
            } else if new > replicas
                && let Some(p) = mine.iter().max_by_key(|p| (!p.1, p.3))
            {
                retire.push(p.0.clone());
                retired = 1;
            }
            let total = mine.len() - retired;
            if stateful_ready && new < replicas && total < replicas + surge && !starting {
                self.seq += 1;
                let pod_name = format!("{name}-{rev}-{}", self.seq);
                self.start(
                    PodOrder::from_template(&pod_name, owner.clone(), &rev, &spec.template, None),
                    &round,
                )
                .await;
            }
        }

        // DaemonSets: one pod per lab node, replaced one node at a time on a template change.
        for ds in &daemon_sets {
            let name = ds.metadata.name.clone().unwrap_or_default();
            let spec = ds.spec.clone().unwrap_or_default();
            let rev = revision(&Some(&spec.template));
            let owner = Owner::DaemonSet(name.clone());
            // maxUnavailable 1: nothing is replaced while any of its pods is not ready or
            // missing; an old pod that is not ready is replaced first.
            let mut replacing = nodes.iter().any(|n| {
                self.pods
                    .get(&format!("{name}-{}", n.name))
                    .is_none_or(|p| !p.ready())
            });
            if let Some(n) = nodes.iter().find(|n| {
                self.pods
                    .get(&format!("{name}-{}", n.name))
                    .is_some_and(|p| p.revision != rev && !p.ready())
            }) {
                let pod_name = format!("{name}-{}", n.name);
                if !retire.contains(&pod_name) {
                    retire.push(pod_name);
                }
                replacing = true;
            }
            for node in &nodes {
                let pod_name = format!("{name}-{}", node.name);
                want.insert(pod_name.clone());
                let existing = self
                    .pods
                    .get(&pod_name)
                    .map(|p| (p.revision.clone(), p.ready()));
                match existing {
                    Some((r, _)) if r != rev && !replacing => {
                        replacing = true;
                        retire.push(pod_name);
                    }
                    Some(_) => {}
                    None if stateful_ready => {
                        self.start(
                            PodOrder::from_template(
                                &pod_name,
                                owner.clone(),
                                &rev,
                                &spec.template,
                                Some(node),
                            ),
                            &round,
                        )
                        .await;
                    }
                    None => {}
                }
            }
        }
        // Pods whose workload or node is gone.
        let live: BTreeSet<Owner> = sets
            .iter()
            .map(|s| Owner::StatefulSet(s.metadata.name.clone().unwrap_or_default()))
            .chain(
                deployments
                    .iter()
                    .map(|d| Owner::Deployment(d.metadata.name.clone().unwrap_or_default())),
            )
            .collect();
        for (n, p) in &self.pods {
            let gone = match &p.owner {
                Owner::StatefulSet(_) | Owner::DaemonSet(_) => !want.contains(n),
                Owner::Deployment(_) => !live.contains(&p.owner),
            };
            if gone && !retire.contains(n) {
                retire.push(n.clone());
            }
        }

        // Endpoints leave the Services before their pods are sent SIGTERM.
        let leaving: Vec<(String, RunPod)> = retire
            .iter()
            .filter_map(|n| self.pods.remove(n).map(|p| (n.clone(), p)))
            .collect();
        // A route that cannot be written is logged and tried again next round; the pods
        // leaving are terminated whatever happened.
        self.route(&services, &nodes).await;
        for (name, pod) in leaving {
            let client = self.client.clone();
            if let Ok(mut t) = self.terminating.lock() {
                t.insert(name.clone());
            }
            let terminating = self.terminating.clone();
            let hosts = self.free_hosts.clone();
            tokio::spawn(async move {
                // Blocking: SIGTERM and the grace period, then the sandbox's removal.
                let _ = tokio::task::spawn_blocking(move || {
                    pod.sup.terminate(GRACE);
                    remove_sandbox(&pod);
                    if pod.own_net.is_some()
                        && let Ok(mut free) = hosts.lock()
                    {
                        free.insert(pod.ip.octets()[3]);
                    }
                    drop(pod);
                })
                .await;
                // Its containers have stopped: the Pod object goes at once (a replacement of
                // the same name waits for it).
                let _ = Api::<Pod>::namespaced(client, NAMESPACE)
                    .delete(&name, &test_support::kube::now())
                    .await;
                if let Ok(mut t) = terminating.lock() {
                    t.remove(&name);
                }
            });
        }
        self.report(&sets, &deployments, &daemon_sets, nodes.len())
            .await;
        Ok(())
    }

    /// Updated Secrets and ConfigMaps reach the running pods that mount them.
    fn refresh(&mut self, objects: &Objects) {
        for (name, p) in &mut self.pods {
            let Ok(mut new) =
                kubelet::resolve(&p.spec, &p.facts, &p.container, objects, &lab_binary)
            else {
                continue;
            };
            // What admission added is not in the spec: keep it.
            for m in &p.process.mounts {
                if !new.mounts.iter().any(|n| n.volume == m.volume) {
                    new.mounts.push(m.clone());
                }
            }
            match crate::pod_runner::refresh_files(&p.sandbox, &p.process, &new) {
                Ok(volumes) if !volumes.is_empty() => {
                    eprintln!("lab kubelet: pod {NAMESPACE}/{name}: volumes {volumes:?} updated");
                    p.process = new;
                }
                Ok(_) => {}
                Err(e) => eprintln!("lab kubelet: pod {NAMESPACE}/{name}: updating volumes: {e:#}"),
            }
        }
    }

    /// Projected tokens are minted again at 80 % of their life and their files replaced, as
    /// the kubelet rotates them (the node agent reads its token at each renewal; the
    /// apiserver's client re-reads its API token).
    async fn rotate_tokens(&mut self) {
        let due: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| {
                let shortest = p
                    .process
                    .mounts
                    .iter()
                    .filter_map(|m| match &m.source {
                        kubelet::Source::Files { tokens, .. } => {
                            tokens.values().map(|(_, secs, _)| *secs).min()
                        }
                        _ => None,
                    })
                    .min();
                shortest.is_some_and(|secs| {
                    p.tokens_at.elapsed() >= Duration::from_secs(secs.max(60) as u64 * 4 / 5)
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(p) = self.pods.get(&name) else {
                continue;
            };
            let minted = self.tokens(&p.spec, &name, &p.process).await;
            let Some(p) = self.pods.get_mut(&name) else {
                continue;
            };
            let written = minted.and_then(|tokens| {
                crate::pod_runner::rewrite_tokens(&p.sandbox, &p.process, &token_source(&tokens))
            });
            match written {
                Ok(()) => p.tokens_at = std::time::Instant::now(),
                Err(e) => eprintln!("lab kubelet: pod {NAMESPACE}/{name}: rotating tokens: {e:#}"),
            }
        }
    }

    async fn objects(&self) -> Result<Objects> {
        let mut objects = Objects::default();
        for s in Api::<Secret>::namespaced(self.client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await?
        {
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            objects.secrets.insert(
                (NAMESPACE.to_owned(), s.metadata.name.unwrap_or_default()),
                data,
            );
        }
        for c in Api::<ConfigMap>::namespaced(self.client.clone(), NAMESPACE)
            .list(&ListParams::default())
            .await?
        {
            objects.config_maps.insert(
                (NAMESPACE.to_owned(), c.metadata.name.unwrap_or_default()),
                c.data.unwrap_or_default().into_iter().collect(),
            );
        }
        Ok(objects)
    }

    async fn nodes(&self) -> Result<Vec<LabNode>> {
        let mut out = Vec::new();
        for n in Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await?
        {
            let a = n.metadata.annotations.clone().unwrap_or_default();
            let (Some(netns), Some(cgroup), Some(bpffs)) =
                (a.get(NODE_NETNS), a.get(NODE_CGROUP), a.get(NODE_BPFFS))
            else {
                continue;
            };
            let ip = n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .and_then(|a| a.address.parse().ok());
            let Some(ip) = ip else { continue };
            out.push(LabNode {
                name: n.metadata.name.clone().unwrap_or_default(),
                ip,
                netns: netns.clone(),
                cgroup: cgroup.into(),
                bpffs: bpffs.into(),
            });
        }
        Ok(out)
    }

    /// `/etc/hosts` names of the namespace: Services → ClusterIP, StatefulSet pods → address.
    fn hosts(&self, services: &[Service], sets: &[StatefulSet]) -> Vec<(IpAddr, Vec<String>)> {
        let mut hosts = Vec::new();
        for s in services {
            let name = s.metadata.name.clone().unwrap_or_default();
            if let Some(ip) = s
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ip.as_ref())
                .and_then(|ip| ip.parse::<IpAddr>().ok())
            {
                hosts.push((
                    ip,
                    vec![
                        format!("{name}.{NAMESPACE}.svc"),
                        format!("{name}.{NAMESPACE}.svc.cluster.local"),
                    ],
                ));
            }
        }
        for set in sets {
            let governing = set
                .spec
                .as_ref()
                .map(|s| s.service_name.clone().unwrap_or_default())
                .unwrap_or_default();
            for (n, p) in &self.pods {
                if matches!(&p.owner, Owner::StatefulSet(s) if Some(s) == set.metadata.name.as_ref())
                {
                    hosts.push((
                        IpAddr::V4(p.ip),
                        vec![
                            format!("{n}.{governing}.{NAMESPACE}.svc"),
                            format!("{n}.{governing}.{NAMESPACE}.svc.cluster.local"),
                        ],
                    ));
                }
            }
        }
        hosts
    }

    /// Starts a pod; a pod that cannot start is reported (a log line naming it and why, once
    /// per distinct error) and tried again next round.
    async fn start(&mut self, order: PodOrder<'_>, round: &Round<'_>) {
        let name = order.name;
        if self.terminating.lock().is_ok_and(|t| t.contains(name)) {
            return;
        }
        match self.try_start(order, round).await {
            Ok(()) => {
                self.failures.remove(name);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if self.failures.get(name) != Some(&msg) {
                    eprintln!("lab kubelet: pod {NAMESPACE}/{name} not started: {msg}");
                    self.failures.insert(name.to_owned(), msg);
                }
            }
        }
    }

    async fn try_start(&mut self, order: PodOrder<'_>, round: &Round<'_>) -> Result<()> {
        let PodOrder {
            name,
            owner,
            revision,
            labels,
            spec,
            node,
        } = order;
        let [container] = spec.containers.as_slice() else {
            bail!("the lab kubelet runs pods of one container");
        };
        let host_network = spec.host_network == Some(true);
        if host_network && node.is_none() {
            bail!("a hostNetwork pod needs a node");
        }
        // The Pod object, as the workload controller creates it (one left by an earlier
        // failed start goes first).
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let _ = pods.delete(name, &test_support::kube::now()).await;
        let mut pod_spec = spec.clone();
        pod_spec.node_name = node.map(|n| n.name.clone());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": pod_spec,
        }))?;
        let pod = pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create Pod {name}"))?;
        let ip = match (host_network, node) {
            (true, Some(n)) => n.ip,
            _ => {
                let host = self.free_hosts.lock().ok().and_then(|mut f| f.pop_first());
                let Some(host) = host else {
                    let _ = pods.delete(name, &test_support::kube::now()).await;
                    bail!("the lab kubelet's pod addresses are used up");
                };
                let [a, b, c] = self.cfg.pod_subnet;
                Ipv4Addr::new(a, b, c, host)
            }
        };
        // Whatever fails from here gives back what was taken: the address, the network, the
        // cgroup and the Pod object.
        let started = self
            .start_sandbox(name, &spec, container, node, ip, &pod, round)
            .await;
        if started.is_err() {
            if !host_network && let Ok(mut f) = self.free_hosts.lock() {
                f.insert(ip.octets()[3]);
            }
            let _ = pods.delete(name, &test_support::kube::now()).await;
        }
        let Sandboxed {
            sup,
            sandbox,
            facts,
            process,
            own_net,
            cgroup,
        } = started?;
        self.seq += 1;
        self.pods.insert(
            name.to_owned(),
            RunPod {
                owner,
                revision: revision.to_owned(),
                node: node.map(|n| n.name.clone()),
                ip,
                own_net,
                cgroup,
                labels,
                seq: self.seq,
                sup,
                reported: None,
                sandbox,
                spec: spec.clone(),
                facts,
                container: container.name.clone(),
                process,
                tokens_at: std::time::Instant::now(),
            },
        );
        Ok(())
    }

    /// Resolves the container, mints its tokens, plugs its network, creates its cgroup and
    /// starts it; on failure removes the network and cgroup it made.
    #[allow(clippy::too_many_arguments)]
    async fn start_sandbox(
        &mut self,
        name: &str,
        spec: &PodSpec,
        container: &k8s_openapi::api::core::v1::Container,
        node: Option<&LabNode>,
        ip: Ipv4Addr,
        pod: &Pod,
        round: &Round<'_>,
    ) -> Result<Sandboxed> {
        let host_network = spec.host_network == Some(true);
        let (objects, services, sets) = (round.objects, round.services, round.sets);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let facts = PodFacts {
            name: name.to_owned(),
            namespace: NAMESPACE.into(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: node.map_or_else(|| "lab".into(), |n| n.name.clone()),
            pod_ip: ip.to_string(),
            host_ip: node.map_or(self.cfg.gateway, |n| n.ip).to_string(),
            labels,
        };
        let mut process = kubelet::resolve(spec, &facts, &container.name, objects, &lab_binary)?;
        let automount = spec.automount_service_account_token != Some(false);
        if automount {
            // What the ServiceAccount admission plugin adds, and the kubelet's Service
            // environment for the API.
            process
                .env
                .insert("KUBERNETES_SERVICE_HOST".into(), self.api.ip().to_string());
            process.env.insert(
                "KUBERNETES_SERVICE_PORT".into(),
                self.api.port().to_string(),
            );
            process.mounts.push(kubelet::Mount {
                path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                read_only: true,
                volume: "kube-api-access".into(),
                source: kubelet::Source::Files {
                    files: BTreeMap::from([
                        (
                            "ca.crt".to_owned(),
                            (self.api_ca.clone().into_bytes(), 0o644),
                        ),
                        (
                            "namespace".to_owned(),
                            (NAMESPACE.as_bytes().to_vec(), 0o644),
                        ),
                    ]),
                    tokens: BTreeMap::from([("token".to_owned(), (String::new(), 3607, 0o644))]),
                },
            });
        }
        let tokens = self.tokens(spec, name, &process).await?;
        let probe = HttpProbe::readiness(container)?;
        // Network and cgroup.
        let (netns, own_net, cgroup) = match node {
            Some(n) if host_network => (n.netns.clone(), None, n.cgroup.clone()),
            _ => {
                self.next_veth += 1;
                let netns = format!("{}-{name}", self.cfg.prefix);
                let veth = format!("{}{}", self.cfg.veth_prefix, self.next_veth);
                let cgroup = match node {
                    Some(n) => n.cgroup.join("kubepods").join(format!("pod{}", facts.uid)),
                    None => Path::new(CGROUP_ROOT).join(&netns),
                };
                if let Err(e) = plug(&netns, &veth, ip, &self.cfg) {
                    unplug(&netns, &veth);
                    return Err(e);
                }
                (netns.clone(), Some((netns, veth)), cgroup)
            }
        };
        let undo = |own_net: &Option<(String, String)>, cgroup: &Path| {
            if let Some((netns, veth)) = own_net {
                remove_cgroup(cgroup);
                unplug(netns, veth);
            }
        };
        if let Err(e) = std::fs::create_dir_all(&cgroup) {
            undo(&own_net, &cgroup);
            return Err(e.into());
        }
        let pod_sc = spec.security_context.clone().unwrap_or_default();
        let sc = container.security_context.clone().unwrap_or_default();
        let sandbox = Sandbox {
            pod: name.to_owned(),
            netns: Some(netns),
            ip: IpAddr::V4(ip),
            cgroup: cgroup.clone(),
            dir: self.cfg.dir.join("pods").join(name),
            claims: self.cfg.dir.join("claims"),
            hosts: self.hosts(services, sets),
            user: sc.run_as_user.or(pod_sc.run_as_user).map(|u| {
                (
                    u as u32,
                    sc.run_as_group.or(pod_sc.run_as_group).unwrap_or(0) as u32,
                )
            }),
            fs_group: pod_sc.fs_group.map(|g| g as u32),
            read_only_root: sc.read_only_root_filesystem == Some(true),
            host_paths: node.map_or_else(Vec::new, |n| {
                vec![
                    (PathBuf::from("/sys/fs/bpf"), n.bpffs.clone()),
                    (PathBuf::from("/sys/fs/cgroup"), n.cgroup.clone()),
                ]
            }),
        };
        let started = Supervisor::start(
            &sandbox,
            &container.name,
            &process,
            probe,
            &token_source(&tokens),
        );
        let sup = match started {
            Ok(s) => s,
            Err(e) => {
                undo(&own_net, &cgroup);
                return Err(e);
            }
        };
        Ok(Sandboxed {
            sup,
            sandbox,
            facts,
            process,
            own_net,
            cgroup,
        })
    }

    /// Projected ServiceAccount tokens for the pod, bound to it, per audience.
    async fn tokens(
        &self,
        spec: &PodSpec,
        pod: &str,
        process: &kubelet::ProcessSpec,
    ) -> Result<BTreeMap<String, String>> {
        let sa = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut tokens = BTreeMap::new();
        for m in &process.mounts {
            if let kubelet::Source::Files { tokens: t, .. } = &m.source {
                for (audience, seconds, _) in t.values() {
                    let mut spec = serde_json::json!({"expirationSeconds": seconds,
                        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod}});
                    if !audience.is_empty() {
                        spec["audiences"] = serde_json::json!([audience]);
                    }
                    let tr: TokenRequest =
                        serde_json::from_value(serde_json::json!({ "spec": spec }))?;
                    let token = Api::<ServiceAccount>::namespaced(self.client.clone(), NAMESPACE)
                        .create_token_request(&sa, &PostParams::default(), &tr)
                        .await
                        .with_context(|| format!("a token of ServiceAccount {sa}"))?
                        .status
                        .ok_or_else(|| anyhow!("TokenRequest without status"))?
                        .token;
                    tokens.insert(audience.clone(), token);
                }
            }
        }
        Ok(tokens)
    }

    /// Routes every Service with a selector to its ready pods; what fails is logged (once per
    /// distinct error) and tried again next round.
    async fn route(&mut self, services: &[Service], nodes: &[LabNode]) {
        for s in services {
            let name = s.metadata.name.clone().unwrap_or_default();
            if let Err(e) = self.route_one(s, nodes).await {
                let msg = format!("{e:#}");
                let key = format!("service/{name}");
                if self.failures.get(&key) != Some(&msg) {
                    eprintln!("lab kubelet: Service {NAMESPACE}/{name}: {msg}");
                    self.failures.insert(key, msg);
                }
            } else {
                self.failures.remove(&format!("service/{name}"));
            }
        }
    }

    async fn route_one(&mut self, s: &Service, nodes: &[LabNode]) -> Result<()> {
        {
            let name = s.metadata.name.clone().unwrap_or_default();
            let Some(spec) = &s.spec else { return Ok(()) };
            let Some(selector) = spec.selector.clone().filter(|s| !s.is_empty()) else {
                return Ok(());
            };
            let endpoints: Vec<IpAddr> = self
                .pods
                .values()
                .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                .filter(|p| p.ready())
                .map(|p| IpAddr::V4(p.ip))
                .collect();
            let ports: Vec<u16> = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect();
            if let Some(vip) = spec
                .cluster_ip
                .as_ref()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
            {
                for n in nodes {
                    let key = (n.netns.clone(), name.clone());
                    if self.routes.get(&key) != Some(&endpoints) {
                        route_service(
                            &n.netns,
                            IpAddr::V4(self.cfg.gateway),
                            vip,
                            &ports,
                            &endpoints,
                        )?;
                        self.routes.insert(key, endpoints.clone());
                    }
                }
            }
            if let Some(&(lb_port, target)) = self.cfg.load_balancers.get(&name) {
                let backends: Vec<SocketAddr> = endpoints
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, target))
                    .collect();
                if let Some(shared) = self.balancers.get(&name) {
                    if let Ok(mut b) = shared.lock() {
                        *b = backends;
                    }
                } else {
                    let shared = Arc::new(Mutex::new(backends));
                    let bind = SocketAddr::new(IpAddr::V4(self.cfg.gateway), lb_port);
                    let listener = tokio::net::TcpListener::bind(bind)
                        .await
                        .with_context(|| format!("the load balancer of {name} on {bind}"))?;
                    tokio::spawn(balance(listener, shared.clone()));
                    self.balancers.insert(name.clone(), shared);
                }
                let ingress = serde_json::json!([{"ip": self.cfg.gateway.to_string(),
                    "ports": [{"port": lb_port, "protocol": "TCP"}]}]);
                let written = s
                    .status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref())
                    .and_then(|lb| serde_json::to_value(&lb.ingress).ok());
                if written.as_ref() != Some(&ingress) {
                    let status =
                        serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}});
                    Api::<Service>::namespaced(self.client.clone(), NAMESPACE)
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                        .await
                        .with_context(|| format!("Service {name}'s load balancer status"))?;
                }
            }
        }
        Ok(())
    }

    /// Pod and workload statuses, written when they change.
    async fn report(
        &mut self,
        sets: &[StatefulSet],
        deployments: &[Deployment],
        daemon_sets: &[DaemonSet],
        nodes: usize,
    ) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        for (name, p) in &mut self.pods {
            let mut status = p.sup.pod_status();
            status["hostIP"] = serde_json::json!(
                p.node
                    .as_ref()
                    .map_or(self.cfg.gateway, |_| p.ip)
                    .to_string()
            );
            if p.reported.as_ref() != Some(&status)
                && pods
                    .patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({ "status": status })),
                    )
                    .await
                    .is_ok()
            {
                p.reported = Some(status);
            }
        }
        let count = |owner: &Owner, rev: Option<&str>, ready: bool| {
            self.pods
                .values()
                .filter(|p| &p.owner == owner)
                .filter(|p| rev.is_none_or(|r| p.revision == r))
                .filter(|p| !ready || p.ready())
                .count() as i64
        };
        let mut updates: Vec<(&str, String, serde_json::Value)> = Vec::new();
        for s in sets {
            let name = s.metadata.name.clone().unwrap_or_default();
            let o = Owner::StatefulSet(name.clone());
            let rev = revision(&s.spec.as_ref().map(|s| &s.template));
            let ready = count(&o, None, true);
            updates.push((
                "StatefulSet",
                name,
                serde_json::json!({
                    "observedGeneration": s.metadata.generation.unwrap_or(1),
                    "replicas": count(&o, None, false),
                    "readyReplicas": ready,
                    "availableReplicas": ready,
                    "currentReplicas": count(&o, Some(&rev), false),
                    "updatedReplicas": count(&o, Some(&rev), false),
                    "currentRevision": rev,
                    "updateRevision": rev,
                }),
            ));
        }
        for d in deployments {
            let name = d.metadata.name.clone().unwrap_or_default();
            let o = Owner::Deployment(name.clone());
            let spec = d.spec.clone().unwrap_or_default();
            let rev = revision(&Some(&spec.template));
            let total = count(&o, None, false);
            let updated = count(&o, Some(&rev), false);
            let ready = count(&o, None, true);
            let want = i64::from(spec.replicas.unwrap_or(1));
            updates.push((
                "Deployment",
                name,
                serde_json::json!({
                    "observedGeneration": d.metadata.generation.unwrap_or(1),
                    "replicas": total,
                    "updatedReplicas": updated,
                    "readyReplicas": ready,
                    "availableReplicas": ready,
                    "unavailableReplicas": (want - ready).max(0),
                    "conditions": [
                        {"type": "Available", "status": if ready >= want { "True" } else { "False" },
                         "reason": "MinimumReplicasAvailable"},
                        {"type": "Progressing", "status": "True",
                         "reason": if updated == total && total == want { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }},
                    ],
                }),
            ));
        }
        for ds in daemon_sets {
            let name = ds.metadata.name.clone().unwrap_or_default();
            let o = Owner::DaemonSet(name.clone());
            let rev = revision(&ds.spec.as_ref().map(|s| &s.template));
            let ready = count(&o, None, true);
            updates.push((
                "DaemonSet",
                name,
                serde_json::json!({
                    "observedGeneration": ds.metadata.generation.unwrap_or(1),
                    "desiredNumberScheduled": nodes,
                    "currentNumberScheduled": count(&o, None, false),
                    "updatedNumberScheduled": count(&o, Some(&rev), false),
                    "numberReady": ready,
                    "numberAvailable": ready,
                    "numberUnavailable": (nodes as i64 - ready).max(0),
                    "numberMisscheduled": 0,
                }),
            ));
        }
        for (kind, name, status) in updates {
            let key = format!("{kind}/{name}");
            if self.statuses.get(&key) == Some(&status) {
                continue;
            }
            let patch = Patch::Merge(serde_json::json!({ "status": status.clone() }));
            let pp = PatchParams::default();
            let c = self.client.clone();
            let done = match kind {
                "StatefulSet" => Api::<StatefulSet>::namespaced(c, NAMESPACE)
                    .patch_status(&name, &pp, &patch)
                    .await
                    .is_ok(),
                "Deployment" => Api::<Deployment>::namespaced(c, NAMESPACE)
                    .patch_status(&name, &pp, &patch)
                    .await
                    .is_ok(),
                _ => Api::<DaemonSet>::namespaced(c, NAMESPACE)
                    .patch_status(&name, &pp, &patch)
                    .await
                    .is_ok(),
            };
            if done {
                self.statuses.insert(key, status);
            }
        }
    }
}

/// The lab's load balancer: each accepted connection is proxied to one of the backends
/// (round robin; none: closed at once, as a load balancer without healthy targets refuses).
async fn balance(listener: tokio::net::TcpListener, backends: Arc<Mutex<Vec<SocketAddr>>>) {
    let mut next = 0usize;
    loop {
        let mut inbound = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors, say: the connection waits in the backlog meanwhile.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next = next.wrapping_add(1);
        let targets: Vec<SocketAddr> = backends
            .lock()
            .map(|b| (0..b.len()).map(|i| b[(next + i) % b.len()]).collect())
            .unwrap_or_default();
        tokio::spawn(async move {
            // The next backend when one does not answer (it may have just gone).
            for target in targets {
                let connect = tokio::net::TcpStream::connect(target);
                if let Ok(Ok(mut outbound)) =
                    tokio::time::timeout(Duration::from_secs(2), connect).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

/// A pod's veth on the bridge, `eth0` in its namespace with `ip`, the bridge its default
/// route.
fn plug(netns: &str, veth: &str, ip: Ipv4Addr, cfg: &Config) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("ip").args(args).output()?;
        if !out.status.success() {
            bail!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let peer = format!("{veth}p");
    // A namespace of this name left by a kubelet that was killed goes first.
    let _ = Command::new("ip").args(["netns", "del", netns]).output();
    run(&["netns", "add", netns])?;
    run(&["link", "add", veth, "type", "veth", "peer", "name", &peer])?;
    run(&["link", "set", &peer, "netns", netns])?;
    run(&["-n", netns, "link", "set", &peer, "name", "eth0"])?;
    run(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip}/{}", cfg.prefix_len),
        "dev",
        "eth0",
    ])?;
    run(&["-n", netns, "link", "set", "eth0", "up"])?;
    run(&["-n", netns, "link", "set", "lo", "up"])?;
    run(&[
        "-n",
        netns,
        "route",
        "replace",
        "default",
        "via",
        &cfg.gateway.to_string(),
    ])?;
    run(&["link", "set", veth, "master", &cfg.bridge])?;
    run(&["link", "set", veth, "up"])?;
    Ok(())
}

fn unplug(netns: &str, veth: &str) {
    let _ = Command::new("ip").args(["link", "del", veth]).status();
    let _ = Command::new("ip").args(["netns", "del", netns]).status();
}

/// Removes what a stopped pod had: its processes, cgroup, veth and network namespace.
fn remove_sandbox(p: &RunPod) {
    // A hostNetwork pod ran in its node's cgroup: only its process goes (terminated).
    if let Some((netns, veth)) = &p.own_net {
        remove_cgroup(&p.cgroup);
        unplug(netns, veth);
    }
}

/// Removes a cgroup and what is below it, killing what still runs there.
pub fn remove_cgroup(cg: &Path) {
    if let Ok(entries) = std::fs::read_dir(cg) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(cg).is_err() && cg.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes what a lab kubelet with `prefix` left (after it was killed): network namespaces
/// and cgroups named `<prefix>-*`.
pub fn remove_leftovers(prefix: &str) {
    let start = format!("{prefix}-");
    if let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&start) {
                remove_cgroup(&e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&start) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

/// The revision of a pod template: a hash of it (as `pod-template-hash`).
fn revision<T: serde::Serialize>(template: &Option<&T>) -> String {
    let text = serde_json::to_string(template).unwrap_or_default();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

fn template_labels(
    template: &Option<&k8s_openapi::api::core::v1::PodTemplateSpec>,
) -> BTreeMap<String, String> {
    template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// `maxSurge` and `maxUnavailable` of a Deployment as pod counts (percentages of `replicas`,
/// surge rounded up and unavailability down, as the controller does; both 0 means a surge of 1).
fn rolling(spec: &k8s_openapi::api::apps::v1::DeploymentSpec, replicas: usize) -> (usize, usize) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let value = |v: Option<&IntOrString>, default_percent: usize, up: bool| match v {
        Some(IntOrString::Int(n)) => (*n).max(0) as usize,
        Some(IntOrString::String(p)) => {
            let pct: usize = p.trim_end_matches('%').parse().unwrap_or(default_percent);
            if up {
                (replicas * pct).div_ceil(100)
            } else {
                replicas * pct / 100
            }
        }
        None => {
            if up {
                (replicas * default_percent).div_ceil(100)
            } else {
                replicas * default_percent / 100
            }
        }
    };
    let surge = value(ru.and_then(|r| r.max_surge.as_ref()), 25, true);
    let unavailable = value(ru.and_then(|r| r.max_unavailable.as_ref()), 25, false);
    if surge == 0 && unavailable == 0 {
        (1, 0)
    } else {
        (surge, unavailable)
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_update_counts_as_the_deployment_controller_does() {
        let spec = |surge: Option<&str>, unavailable: Option<&str>| {
            let mut ru = serde_json::json!({});
            if let Some(s) = surge {
                ru["maxSurge"] = serde_json::from_str(s).unwrap();
            }
            if let Some(u) = unavailable {
                ru["maxUnavailable"] = serde_json::from_str(u).unwrap();
            }
            serde_json::from_value::<k8s_openapi::api::apps::v1::DeploymentSpec>(
                serde_json::json!({
                    "selector": {}, "template": {},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": ru},
                }),
            )
            .unwrap()
        };
        assert_eq!(rolling(&spec(Some("1"), Some("0")), 2), (1, 0));
        assert_eq!(rolling(&spec(None, None), 2), (1, 0));
        assert_eq!(rolling(&spec(None, None), 4), (1, 1));
        assert_eq!(rolling(&spec(Some("\"50%\""), Some("\"50%\"")), 3), (2, 1));
        assert_eq!(rolling(&spec(Some("0"), Some("0")), 3), (1, 0));
    }

    #[test]
    fn a_template_change_is_a_new_revision() {
        let a = serde_json::json!({"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}]}});
        let b = serde_json::json!({"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "2"}]}]}});
        assert_eq!(revision(&Some(&a)), revision(&Some(&a.clone())));
        assert_ne!(revision(&Some(&a)), revision(&Some(&b)));
    }
}
