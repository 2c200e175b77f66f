//! Identity policy on this node (ADR 0023): the cluster's network policies, from the Mesh API's
//! `Policies` stream, resolved against every identity the agent knows (local and imported) and
//! programmed per local identity; this node's pods' cgroups mapped to their identities.
//!
//! Nothing is programmed until both the policies and the identities are complete (a partial
//! view would deny what is allowed); a lost connection keeps what is programmed (a fault is
//! not a deletion) and a reconnect's snapshot is reconciled against it. Only the local
//! identities a change touches are rewritten, and for each the order is: its entries, then the
//! endpoints' flags that enforce them; flags cleared before entries go.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{Reloader, TlsFiles};
use model::{ClusterName, Labels};
use policy::{IdentityInfo, L4, PolicyKind, PolicyRef, Remote, Resolver, Verdict};
use telemetry::metrics::Registry;
use tokio::sync::{mpsc, watch};
use wire::pb;

use crate::agent::LinkError;
use crate::maps::Proto;
use crate::policy::{Direction, Endpoint, Rule};
use crate::program::Programmer;

/// Metric names.
pub mod m {
    /// Policy verdicts of new connections, from the kernel's counters.
    pub const VERDICTS: &str = "clustermesh_policy_verdicts_total";
    /// Network policies this agent has, valid (resolved) and refused by the apiserver.
    pub const POLICIES: &str = "clustermesh_policy_objects";
    /// Local endpoints (pod cgroups) and how many have each direction enforced.
    pub const ENDPOINTS: &str = "clustermesh_policy_endpoints";
    /// Time to resolve and program one change.
    pub const PROGRAM_SECONDS: &str = "clustermesh_policy_program_seconds";
}

/// Declares this module's metrics.
pub fn register(r: &Registry) {
    r.counter(
        m::VERDICTS,
        "Policy verdicts of new connections and first datagrams, by direction, verdict (allowed, denied_by_policy, denied_by_default) and peer cluster (world: an address of no cluster).",
        &["direction", "verdict", "peer_cluster"],
    );
    r.gauge(
        m::POLICIES,
        "Network policies of this cluster as this agent has them: valid and refused.",
        &["state"],
    );
    r.gauge(
        m::ENDPOINTS,
        "Local endpoints (pod cgroups with a known identity), and those with ingress or egress enforced.",
        &["state"],
    );
    r.histogram(
        m::PROGRAM_SECONDS,
        "Time to resolve and program the policy maps after one change.",
        &[],
        telemetry::metrics::LATENCY_BUCKETS,
    );
}

/// What the agent's Mesh API watch knows that policy needs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Inputs {
    /// The watch's snapshot is complete.
    pub synced: bool,
    /// Every identity: its cluster and labels.
    pub identities: BTreeMap<u32, (ClusterName, Labels)>,
    /// This node's pods: UID → identity.
    pub local_pods: BTreeMap<String, u32>,
}

/// Settings of the policy task.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's cluster.
    pub cluster: ClusterName,
    /// The local apiserver's Mesh API endpoints.
    pub apiserver: Vec<String>,
    /// The agent's client certificate.
    pub tls: TlsFiles,
    /// The node's cgroup (pods' cgroups are below it).
    pub cgroup: PathBuf,
    /// Peer selectors without a cluster label select every cluster (before Cilium 1.19).
    pub any_cluster: bool,
    /// How often pods' cgroups are looked for.
    pub rescan: Duration,
}

/// One message of the Policies stream, decoded.
#[derive(Debug)]
struct Update {
    reset: bool,
    upserts: Vec<policy::Policy>,
    deletes: Vec<PolicyRef>,
    refused: usize,
}

fn kind_of(s: &str) -> Option<PolicyKind> {
    match s {
        "CiliumNetworkPolicy" => Some(PolicyKind::CiliumNetworkPolicy),
        "CiliumClusterwideNetworkPolicy" => Some(PolicyKind::CiliumClusterwideNetworkPolicy),
        "NetworkPolicy" => Some(PolicyKind::NetworkPolicy),
        _ => None,
    }
}

fn decode(msg: pb::PoliciesResponse) -> Update {
    let mut upserts = Vec::new();
    for o in msg.upserts {
        let parsed = serde_json::from_slice::<serde_json::Value>(&o.json)
            .map_err(|e| e.to_string())
            .and_then(|v| policy::parse(&v).map_err(|e| e.to_string()));
        match parsed {
            Ok(p) => upserts.push(p),
            // The apiserver validated it with the same code: a version skew. Refused alone.
            Err(e) => {
                tracing::warn!(kind = %o.kind, policy = %format!("{}/{}", o.namespace, o.name), error = %e, "policy from the apiserver refused")
            }
        }
    }
    let deletes = msg
        .deletes
        .iter()
        .filter_map(|o| {
            let ns = (!o.namespace.is_empty()).then_some(o.namespace.as_str());
            Some(PolicyRef::new(kind_of(&o.kind)?, ns, &o.name))
        })
        .collect();
    Update {
        reset: msg.reset,
        upserts,
        deletes,
        refused: msg.refused.len(),
    }
}

/// Follows the Policies stream forever, reconnecting with backoff.
async fn follow_policies(settings: Settings, tx: mpsc::Sender<Update>) {
    let mut backoff = telemetry::backoff::Backoff::reconnect();
    loop {
        backoff.healthy();
        let r: Result<(), LinkError> = async {
            let tls = Reloader::load(settings.tls.clone()).map_err(LinkError::Tls)?;
            let connected =
                meshapi::client::connect(&settings.cluster, &settings.apiserver, &tls).await?;
            let mut api = connected.client;
            let mut stream = api
                .policies(pb::PoliciesRequest {})
                .await
                .map_err(|e| LinkError::rpc("Policies", &e))?
                .into_inner();
            tracing::info!(endpoint = %connected.endpoint, "following the cluster's network policies");
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if tx.send(decode(m)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Err(LinkError::Ended("Policies stream")),
                    Err(e) => return Err(LinkError::rpc("Policies stream", &e)),
                }
            }
        }
        .await;
        if tx.is_closed() {
            return;
        }
        if let Err(e) = r {
            tracing::warn!(error = %e.to_chain(), "Policies stream lost; the programmed policy stays in force");
        }
        backoff.wait().await;
    }
}

/// The kernel rules of one resolved endpoint, with each origin interned as a rule index.
fn rules_of(ep: &policy::EndpointPolicy, origins: &mut Origins) -> Vec<Rule> {
    ep.entries
        .iter()
        .map(|e| Rule {
            direction: match e.direction {
                policy::Direction::Ingress => Direction::Ingress,
                policy::Direction::Egress => Direction::Egress,
            },
            remote: match e.remote {
                Remote::Identity(id) => Some(id),
                Remote::Any => None,
            },
            proto: match e.proto {
                L4::Tcp => Some(Proto::Tcp),
                L4::Udp => Some(Proto::Udp),
                L4::Any => None,
            },
            ports: e.ports,
            deny: e.verdict == Verdict::Deny,
            rule: origins.index(&e.origin),
        })
        .collect()
}

/// Policy origins by index (the kernel's entries carry the index).
#[derive(Debug, Default)]
pub struct Origins {
    by_ref: HashMap<PolicyRef, u32>,
    list: Vec<PolicyRef>,
}

impl Origins {
    fn index(&mut self, r: &PolicyRef) -> u32 {
        if let Some(i) = self.by_ref.get(r) {
            return *i;
        }
        let i = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        self.list.push(r.clone());
        self.by_ref.insert(r.clone(), i);
        i
    }

    /// The origin of rule index `i`.
    pub fn get(&self, i: u32) -> Option<&PolicyRef> {
        self.list.get(i as usize)
    }
}

/// The policy state the task keeps (shared with `/policy` and `clustermesh policy`).
#[derive(Debug, Default)]
pub struct Shared {
    /// Rule indexes → origins.
    pub origins: Mutex<Origins>,
    /// Per local identity: the resolved entries (as the resolver gave them).
    pub resolved: Mutex<BTreeMap<u32, policy::EndpointPolicy>>,
    /// The latest inputs (identities and local pods).
    pub inputs: Mutex<Arc<Inputs>>,
    /// The node's cgroup.
    pub cgroup: PathBuf,
}

/// Names a peer identity: reserved ones by name, others by their labels when known.
fn peer_labels(inputs: &Inputs, id: u32) -> (Option<String>, Vec<String>) {
    match id {
        1 => (None, vec!["reserved:host".to_owned()]),
        2 => (None, vec!["reserved:world".to_owned()]),
        _ => inputs
            .identities
            .get(&id)
            .map_or((None, Vec::new()), |(c, l)| {
                (
                    Some(c.to_string()),
                    l.iter().map(|x| x.to_string()).collect(),
                )
            }),
    }
}

/// Pod `uid`'s policy as this node's kernel holds it: its cgroups' flags read from
/// `CM_ENDPOINTS`, its identity's entries read back from `CM_POLICY` and `CM_POLICY_SETS` (an
/// entry the agent wrote but the kernel does not hold is left out).
pub fn pod_policy(
    programmer: &Mutex<Programmer>,
    shared: &Shared,
    uid: &str,
) -> meshapi::node_state::PodPolicy {
    let inputs = lock(&shared.inputs).clone();
    let identity = inputs.local_pods.get(uid).copied();
    let mut out = meshapi::node_state::PodPolicy {
        pod_uid: uid.to_owned(),
        identity,
        cgroups: 0,
        ingress_enforced: false,
        egress_enforced: false,
        entries: Vec::new(),
    };
    let Some(id) = identity else {
        return out;
    };
    let p = lock(programmer);
    let dp = p.datapath();
    for cg in crate::pods::scan(&shared.cgroup)
        .remove(uid)
        .unwrap_or_default()
    {
        if let Ok(v) = dp.endpoints.get(&cg, 0) {
            let (_, ingress, egress) = crate::policy::parse_endpoint_val(&v);
            out.cgroups += 1;
            out.ingress_enforced |= ingress;
            out.egress_enforced |= egress;
        }
    }
    let origins = lock(&shared.origins);
    let mut lines: Vec<meshapi::node_state::PolicyLine> = Vec::new();
    let groups: Vec<crate::policy::Group> = p
        .policy_tables()
        .entries(id)
        .map(|e| e.keys().copied().collect())
        .unwrap_or_default();
    for g in groups {
        // Read back from the kernel: the entry, then the set it points at.
        let Ok(set_id) = dp.policy.get(&crate::policy::policy_key(id, &g), 0) else {
            continue;
        };
        let Ok(set) = dp.policy_sets.get(&set_id, 0) else {
            continue;
        };
        let (dir, proto, remote) = g;
        let (peer_cluster, peer_labels) = peer_labels(&inputs, remote);
        for (lo, hi, verdict) in crate::policy::parse_port_set(&set) {
            lines.push(meshapi::node_state::PolicyLine {
                direction: dir.label().into(),
                verdict: if verdict.deny { "deny" } else { "allow" }.into(),
                peer: (remote != 0).then_some(remote),
                peer_cluster: peer_cluster.clone(),
                peer_labels: peer_labels.clone(),
                proto: if proto == Proto::Udp.number() {
                    "UDP"
                } else {
                    "TCP"
                }
                .into(),
                ports: (lo, hi),
                policy: origins.get(verdict.rule).map(ToString::to_string),
            });
        }
    }
    out.entries = lines;
    out
}

struct Task {
    settings: Settings,
    programmer: Arc<Mutex<Programmer>>,
    metrics: Registry,
    shared: Arc<Shared>,
    resolver: Resolver,
    policies: BTreeSet<PolicyRef>,
    policies_synced: bool,
    inputs: Arc<Inputs>,
    identities_known: BTreeMap<u32, (ClusterName, Labels)>,
    cluster_names: HashMap<u16, String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

impl Task {
    /// Applies a Policies message; returns the local identities it changed.
    fn on_policies(&mut self, u: Update) -> BTreeSet<u32> {
        let mut changed = BTreeSet::new();
        if u.reset {
            let keep: BTreeSet<PolicyRef> = u.upserts.iter().map(|p| p.origin.clone()).collect();
            for gone in self.policies.difference(&keep).cloned().collect::<Vec<_>>() {
                changed.extend(self.resolver.remove_policy(&gone));
                self.policies.remove(&gone);
            }
        }
        for d in &u.deletes {
            changed.extend(self.resolver.remove_policy(d));
            self.policies.remove(d);
        }
        for p in u.upserts {
            self.policies.insert(p.origin.clone());
            changed.extend(self.resolver.upsert_policy(p));
        }
        self.policies_synced = true;
        self.metrics
            .set(m::POLICIES, &["valid"], self.policies.len() as f64);
        self.metrics
            .set(m::POLICIES, &["refused"], u.refused as f64);
        changed
    }

    /// Applies new inputs (identities); returns the local identities they changed.
    fn on_inputs(&mut self, inputs: Arc<Inputs>) -> BTreeSet<u32> {
        *lock(&self.shared.inputs) = Arc::clone(&inputs);
        let mut changed = BTreeSet::new();
        if inputs.synced {
            let old = std::mem::take(&mut self.identities_known);
            for id in old.keys().filter(|id| !inputs.identities.contains_key(id)) {
                changed.extend(self.resolver.remove_identity(*id));
            }
            for (id, (cluster, labels)) in &inputs.identities {
                if old.get(id) != Some(&(cluster.clone(), labels.clone())) {
                    changed.extend(self.resolver.upsert_identity(IdentityInfo {
                        id: *id,
                        cluster: cluster.clone(),
                        labels: labels.clone(),
                    }));
                }
                self.cluster_names
                    .insert((*id >> 16) as u16, cluster.to_string());
            }
            self.identities_known = inputs.identities.clone();
        }
        self.inputs = inputs;
        changed
    }

    fn ready(&self) -> bool {
        self.policies_synced && self.inputs.synced
    }

    /// Programs the entries of `changed` local identities and the endpoints.
    fn program(&mut self, changed: &BTreeSet<u32>) {
        if !self.ready() {
            return;
        }
        let started = std::time::Instant::now();
        // The pods' cgroups, found before the maps are locked (a walk of the cgroup tree).
        let cgroups = crate::pods::scan(&self.settings.cgroup);
        let mut p = lock(&self.programmer);
        let mut resolved = lock(&self.shared.resolved);
        let mut origins = lock(&self.shared.origins);
        // 1. Entries of identities that (still) have a policy.
        let mut cleared = Vec::new();
        for id in changed {
            match self.resolver.endpoint(*id) {
                Some(ep) => {
                    let rules = rules_of(ep, &mut origins);
                    if let Err(e) = p.set_identity_policy(*id, &rules) {
                        tracing::error!(identity = id, error = %e, "policy entries not programmed");
                    }
                    resolved.insert(*id, ep.clone());
                }
                None => cleared.push(*id),
            }
        }
        // 2. The endpoints with their flags.
        let mut endpoints = Vec::new();
        for (uid, identity) in &self.inputs.local_pods {
            let ep = self.resolver.endpoint(*identity);
            for cg in cgroups.get(uid).into_iter().flatten() {
                endpoints.push(Endpoint {
                    cgroup_id: *cg,
                    identity: *identity,
                    ingress: ep.is_some_and(|e| e.ingress_enforced),
                    egress: ep.is_some_and(|e| e.egress_enforced),
                });
            }
        }
        if let Err(e) = p.set_endpoints(&endpoints) {
            tracing::error!(error = %e, "policy endpoints not programmed");
        }
        // 3. Entries of identities no longer selected.
        for id in cleared {
            if let Err(e) = p.set_identity_policy(id, &[]) {
                tracing::error!(identity = id, error = %e, "policy entries not removed");
            }
            resolved.remove(&id);
        }
        self.metrics
            .set(m::ENDPOINTS, &["known"], endpoints.len() as f64);
        self.metrics.set(
            m::ENDPOINTS,
            &["ingress_enforced"],
            endpoints.iter().filter(|e| e.ingress).count() as f64,
        );
        self.metrics.set(
            m::ENDPOINTS,
            &["egress_enforced"],
            endpoints.iter().filter(|e| e.egress).count() as f64,
        );
        self.metrics
            .observe(m::PROGRAM_SECONDS, &[], started.elapsed().as_secs_f64());
    }

    /// Copies the kernel's verdict counters into the metrics.
    fn export_verdicts(&self) {
        let mut clusters: Vec<u16> = self.cluster_names.keys().copied().collect();
        clusters.push(0);
        let p = lock(&self.programmer);
        let Ok(counts) = crate::policy::verdict_counts(p.datapath(), &clusters) else {
            return;
        };
        for (c, dir, outcome, n) in counts {
            let cluster = self
                .cluster_names
                .get(&c)
                .cloned()
                .unwrap_or_else(|| "world".to_owned());
            self.metrics.set(
                m::VERDICTS,
                &[dir.label(), outcome.label(), &cluster],
                n as f64,
            );
        }
    }
}

/// Runs the policy task: follows the cluster's policies and `inputs`, programs the maps.
pub async fn run(
    settings: Settings,
    mut inputs: watch::Receiver<Arc<Inputs>>,
    programmer: Arc<Mutex<Programmer>>,
    metrics: Registry,
    shared: Arc<Shared>,
) {
    let (tx, mut updates) = mpsc::channel(16);
    let follower = tokio::spawn(follow_policies(settings.clone(), tx));
    let mut task = Task {
        resolver: Resolver::new(
            settings.cluster.clone(),
            policy::Options {
                peer_selectors_any_cluster: settings.any_cluster,
            },
        ),
        settings: settings.clone(),
        programmer,
        metrics,
        shared,
        policies: BTreeSet::new(),
        policies_synced: false,
        inputs: Arc::default(),
        identities_known: BTreeMap::new(),
        cluster_names: HashMap::new(),
    };
    let mut rescan = tokio::time::interval(settings.rescan);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            u = updates.recv() => match u {
                Some(u) => {
                    let mut changed = task.on_policies(u);
                    // Coalesce what is already waiting.
                    while let Ok(more) = updates.try_recv() {
                        changed.extend(task.on_policies(more));
                    }
                    changed
                }
                None => break,
            },
            r = inputs.changed() => {
                if r.is_err() {
                    break;
                }
                let now = inputs.borrow_and_update().clone();
                task.on_inputs(now)
            }
            _ = rescan.tick() => {
                task.export_verdicts();
                BTreeSet::new()
            }
        };
        // Every pass programs the endpoints (new pods' cgroups appear without any change).
        task.program(&changed);
    }
    follower.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_interned() {
        let mut o = Origins::default();
        let a = PolicyRef::new(PolicyKind::CiliumNetworkPolicy, Some("ns"), "a");
        let b = PolicyRef::new(PolicyKind::NetworkPolicy, Some("ns"), "b");
        assert_eq!((o.index(&a), o.index(&b), o.index(&a)), (0, 1, 0));
        assert_eq!(o.get(1), Some(&b));
        assert_eq!(kind_of("NetworkPolicy"), Some(PolicyKind::NetworkPolicy));
        assert_eq!(kind_of("Pod"), None);
    }
}
