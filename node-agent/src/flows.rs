//! Flow visibility on the node ([ADR 0024](../../docs/architecture/adr/0024-flow-visibility.md)):
//! reads the kernel's flow events (`CM_FLOWS`, one per new connection or first datagram),
//! names both ends (pod, namespace, node, cluster, the identity's labels), the service and the
//! policy that decided, counts them (`clustermesh_flows_total`), keeps the last N in memory and
//! hands new ones to the `Observer` streams (`observe_server`).
//!
//! Must not change what the datapath does: it only reads events (the kernel drops and counts
//! what the ring has no room for; a slow reader never delays a `connect()`).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use telemetry::metrics::Registry;
use tokio::sync::broadcast;
use wire::pb;

use crate::maps::{self, FlowDirection, FlowEvent, FlowVerdict, Proto};
use crate::program::DesiredService;

/// Metric names.
pub mod m {
    /// Flows by source and destination cluster and verdict.
    pub const FLOWS: &str = "clustermesh_flows_total";
    /// Flows kept in memory for `Observe`.
    pub const KEPT: &str = "clustermesh_flows_kept";
    /// Events the agent could not decode (a layout mismatch).
    pub const UNDECODABLE: &str = "clustermesh_flow_events_undecodable_total";
}

/// Declares the flow metrics.
pub fn register(r: &Registry) {
    r.counter(
        m::FLOWS,
        "Flows (new connections and first datagrams) seen by this node, by source and destination cluster (\"world\" outside the mesh) and verdict.",
        &["source_cluster", "destination_cluster", "verdict"],
    );
    r.gauge(m::KEPT, "Flows kept in memory for Observe.", &[]);
    r.counter(
        m::UNDECODABLE,
        "Flow events of an unexpected size or content (skipped).",
        &[],
    );
}

/// A pod as the Mesh API names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    /// Its cluster.
    pub cluster: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its UID (empty: unknown).
    pub uid: String,
}

/// What the agent knows to name the ends of a flow; rebuilt from each Mesh API state.
#[derive(Debug, Default)]
pub struct Names {
    /// Pods by address.
    pub pods: HashMap<IpAddr, PodName>,
    /// Local pods' addresses by UID.
    pub local_by_uid: HashMap<String, IpAddr>,
    /// Identities: cluster name and labels.
    pub identities: HashMap<u32, (String, Vec<String>)>,
    /// Cluster names by ID.
    pub clusters: HashMap<u16, String>,
    /// Service frontends → "namespace/name".
    pub frontends: HashMap<(SocketAddr, Proto), String>,
    /// Backend addresses → the services whose backend they are.
    pub backends: HashMap<(SocketAddr, Proto), Vec<String>>,
    /// Nodes' addresses → (cluster, node name).
    pub nodes: HashMap<IpAddr, (String, String)>,
    /// Every known endpoint address's identity (the IP cache, as the agent programs it).
    pub addresses: HashMap<IpAddr, u32>,
}

impl Names {
    /// Builds the names from the Mesh API view and the desired services, for `node` of
    /// `cluster`.
    pub fn build(
        view: &crate::desired::MeshView,
        desired: &[DesiredService],
        cluster: &str,
        node: &str,
    ) -> Self {
        let mut n = Self::default();
        for (ip, p) in &view.pod_names {
            // A peer's endpoint may claim this node and a local pod's UID: never local.
            if p.cluster == cluster && p.node == node && !p.uid.is_empty() {
                n.local_by_uid.insert(p.uid.clone(), *ip);
            }
            n.pods.insert(*ip, p.clone());
        }
        // A peer chooses its nodes' addresses and nothing checks them: this cluster's nodes
        // are named first, so a peer cannot pass this cluster's own nodes off as its own; an
        // address two peers claim goes to the first by name (never to whichever a hash map
        // happens to list last).
        let mut nodes: Vec<_> = view.nodes.iter().collect();
        nodes.sort_by(|((ca, na), _), ((cb, nb), _)| {
            (ca != cluster, ca, na).cmp(&(cb != cluster, cb, nb))
        });
        for ((c, name), addrs) in nodes {
            for a in addrs {
                n.nodes
                    .entry(*a)
                    .or_insert_with(|| (c.clone(), name.clone()));
            }
        }
        n.addresses = view
            .identities
            .iter()
            .map(|(ip, id)| (*ip, id.get()))
            .collect();
        for (id, (cluster, labels)) in &view.labels {
            n.identities.insert(
                *id,
                (
                    cluster.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                ),
            );
            n.clusters.insert((*id >> 16) as u16, cluster.to_string());
        }
        for d in desired {
            let Some(name) = d.service.as_ref().map(ToString::to_string) else {
                continue;
            };
            n.frontends
                .insert((d.frontend.addr, d.frontend.proto), name.clone());
            for b in d.tiers.iter().flatten() {
                let list = n.backends.entry((b.addr, d.frontend.proto)).or_default();
                if !list.contains(&name) {
                    list.push(name.clone());
                }
            }
        }
        n
    }
}

/// The live feed: each new flow with its sequence number.
pub type Live = broadcast::Receiver<(u64, Arc<pb::Flow>)>;

/// Names a policy rule index (the kernel's entries carry it).
pub type RuleNamer = Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// The flows kept in memory, and the live feed.
#[derive(Debug)]
pub struct Store {
    capacity: usize,
    kept: Mutex<VecDeque<(u64, Arc<pb::Flow>)>>,
    next: Mutex<u64>,
    live: broadcast::Sender<(u64, Arc<pb::Flow>)>,
}

impl Store {
    /// A store keeping the last `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(4096);
        Self {
            capacity: capacity.max(1),
            kept: Mutex::new(VecDeque::new()),
            next: Mutex::new(1),
            live,
        }
    }

    /// Keeps `f` (forgetting the oldest beyond capacity) and hands it to the live streams.
    pub fn push(&self, f: pb::Flow) {
        let f = Arc::new(f);
        let seq = {
            let mut n = lock(&self.next);
            let s = *n;
            *n += 1;
            s
        };
        {
            let mut kept = lock(&self.kept);
            if kept.len() >= self.capacity {
                kept.pop_front();
            }
            kept.push_back((seq, Arc::clone(&f)));
        }
        // No receiver: nobody follows.
        let _ = self.live.send((seq, f));
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        lock(&self.kept).len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last `last` kept flows matching `req`, oldest first, with the sequence number the
    /// live feed continues after; subscribes first, so nothing falls between.
    pub fn backlog(&self, req: &pb::ObserveRequest) -> (Vec<Arc<pb::Flow>>, u64, Live) {
        let rx = self.live.subscribe();
        let kept = lock(&self.kept);
        let upto = kept.back().map_or(0, |(s, _)| *s);
        let mut out: Vec<Arc<pb::Flow>> = Vec::new();
        if req.last > 0 || req.since_unix_nanos > 0 {
            let want = if req.last == 0 {
                usize::MAX
            } else {
                req.last as usize
            };
            for (_, f) in kept.iter().rev() {
                if out.len() >= want {
                    break;
                }
                if meshapi::observe::matches(req, f) {
                    out.push(Arc::clone(f));
                }
            }
            out.reverse();
        }
        (out, upto, rx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// Everything the reader needs to turn events into named flows.
pub struct Namer {
    /// This cluster.
    pub cluster: String,
    /// This node.
    pub node: String,
    /// The names, replaced by the agent on each new state.
    pub names: RwLock<Arc<Names>>,
    /// Names rule indexes.
    pub rules: RuleNamer,
    /// The node's cgroup (pods' cgroups below it).
    pub cgroup_root: PathBuf,
    cgroups: Mutex<CgroupIndex>,
}

impl std::fmt::Debug for Namer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namer")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// cgroup ID → pod UID, rescanned (at most once a second) when an unknown cgroup shows up.
#[derive(Debug, Default)]
struct CgroupIndex {
    by_id: HashMap<u64, String>,
    /// Endpoint cgroups a scan did not find (gone, or not below the node's cgroup).
    absent: std::collections::HashSet<u64>,
    scanned: Option<Instant>,
}

/// Cgroups remembered as absent at most (then forgotten at once).
const MAX_ABSENT: usize = 10_000;

/// At most one cgroup scan per this long.
const RESCAN_EVERY: Duration = Duration::from_millis(50);

impl Namer {
    /// A namer for `node` of `cluster`.
    pub fn new(cluster: String, node: String, cgroup_root: PathBuf, rules: RuleNamer) -> Self {
        Self {
            cluster,
            node,
            names: RwLock::new(Arc::default()),
            rules,
            cgroup_root,
            cgroups: Mutex::default(),
        }
    }

    /// Replaces the names.
    pub fn set_names(&self, names: Names) {
        match self.names.write() {
            Ok(mut g) => *g = Arc::new(names),
            Err(e) => *e.into_inner() = Arc::new(names),
        }
    }

    fn current(&self) -> Arc<Names> {
        match self.names.read() {
            Ok(g) => Arc::clone(&g),
            Err(e) => Arc::clone(&e.into_inner()),
        }
    }

    /// The pod UID of a cgroup, if it is a pod's. `endpoint`: the kernel knows the cgroup as
    /// a pod's (it has an identity), so an unknown one is a pod that appeared since the last
    /// scan: scan again (at most every [`RESCAN_EVERY`], waiting out the rest). A cgroup that
    /// is no endpoint (a host process), or that a scan made after its first event did not
    /// find, never causes another scan.
    fn pod_of_cgroup(&self, cg: u64, endpoint: bool) -> Option<String> {
        let mut idx = lock(&self.cgroups);
        if let Some(uid) = idx.by_id.get(&cg) {
            return Some(uid.clone());
        }
        if !endpoint || idx.absent.contains(&cg) {
            return None;
        }
        if let Some(t) = idx.scanned {
            let since = t.elapsed();
            if since < RESCAN_EVERY {
                std::thread::sleep(RESCAN_EVERY - since);
            }
        }
        idx.scanned = Some(Instant::now());
        idx.by_id = crate::pods::scan(&self.cgroup_root)
            .into_iter()
            .flat_map(|(uid, ids)| ids.into_iter().map(move |id| (id, uid.clone())))
            .collect();
        let found = idx.by_id.get(&cg).cloned();
        if found.is_none() {
            if idx.absent.len() >= MAX_ABSENT {
                idx.absent.clear();
            }
            idx.absent.insert(cg);
        }
        found
    }

    fn peer(
        &self,
        names: &Names,
        addr: SocketAddr,
        identity: u32,
        cluster_id: u16,
    ) -> pb::FlowPeer {
        // No policy decided: the kernel left the identity to us.
        let (identity, cluster_id) = if identity == 0 {
            match names.addresses.get(&addr.ip()) {
                Some(id) => (*id, (*id >> 16) as u16),
                None => (2, 0),
            }
        } else {
            (identity, cluster_id)
        };
        let pod = names.pods.get(&addr.ip());
        if pod.is_none()
            && let Some((cluster, node)) = names.nodes.get(&addr.ip())
        {
            // A node's own address (its agent's probes, host-network pods).
            let label = if *cluster == self.cluster && *node == self.node {
                "reserved:host"
            } else {
                "reserved:remote-node"
            };
            return pb::FlowPeer {
                cluster: cluster.clone(),
                cluster_id: u32::from(cluster_id),
                identity,
                labels: vec![label.to_owned()],
                address: addr.ip().to_string(),
                port: u32::from(addr.port()),
                node: node.clone(),
                ..Default::default()
            };
        }
        let (id_cluster, labels) = match identity {
            1 => (Some(self.cluster.clone()), vec!["reserved:host".to_owned()]),
            2 => (None, vec!["reserved:world".to_owned()]),
            id => names
                .identities
                .get(&id)
                .map_or((None, Vec::new()), |(c, l)| (Some(c.clone()), l.clone())),
        };
        let cluster = pod
            .map(|p| p.cluster.clone())
            .or(id_cluster)
            .or_else(|| names.clusters.get(&cluster_id).cloned())
            .unwrap_or_default();
        pb::FlowPeer {
            cluster,
            cluster_id: u32::from(cluster_id),
            identity,
            labels,
            namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            pod: pod.map(|p| p.name.clone()).unwrap_or_default(),
            address: addr.ip().to_string(),
            port: u32::from(addr.port()),
            node: pod.map(|p| p.node.clone()).unwrap_or_default(),
        }
    }

    /// The local side: the pod of the cgroup (or this node's host when no pod's).
    fn local(&self, names: &Names, ev: &FlowEvent, addr: Option<SocketAddr>) -> pb::FlowPeer {
        let uid = self.pod_of_cgroup(ev.cgroup, ev.local_identity != 0);
        let ip = uid
            .as_ref()
            .and_then(|u| names.local_by_uid.get(u).copied())
            .or(addr.map(|a| a.ip()));
        let pod = ip.and_then(|ip| names.pods.get(&ip));
        let identity = match ev.local_identity {
            0 => 1,
            id => id,
        };
        let labels = match identity {
            1 => vec!["reserved:host".to_owned()],
            id => names
                .identities
                .get(&id)
                .map(|(_, l)| l.clone())
                .unwrap_or_default(),
        };
        pb::FlowPeer {
            cluster: self.cluster.clone(),
            // A cluster's identities carry its ID in their upper 16 bits.
            cluster_id: identity >> 16,
            identity,
            labels,
            namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            pod: pod.map(|p| p.name.clone()).unwrap_or_default(),
            address: ip.map(|i| i.to_string()).unwrap_or_default(),
            port: addr.map_or(0, |a| u32::from(a.port())),
            node: self.node.clone(),
        }
    }

    /// Names one event; `realtime_minus_mono` converts the kernel's clock to Unix time.
    pub fn flow(&self, ev: &FlowEvent, realtime_minus_mono: i128) -> pb::Flow {
        let names = self.current();
        let time = i128::from(ev.ts_ns) + realtime_minus_mono;
        let (source, destination, service, frontend) = match ev.direction {
            FlowDirection::Egress => {
                let service = if ev.flags & maps::FLOWF_SERVICE != 0 {
                    names
                        .frontends
                        .get(&(ev.orig, ev.proto))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                let frontend = if ev.flags & maps::FLOWF_SERVICE != 0 {
                    ev.orig.to_string()
                } else {
                    String::new()
                };
                let dst = if ev.verdict == FlowVerdict::NoBackend {
                    // No backend was chosen: the destination is the service address.
                    pb::FlowPeer {
                        address: ev.orig.ip().to_string(),
                        port: u32::from(ev.orig.port()),
                        ..Default::default()
                    }
                } else {
                    self.peer(&names, ev.peer, ev.remote_identity, ev.remote_cluster)
                };
                (self.local(&names, ev, None), dst, service, frontend)
            }
            FlowDirection::Ingress => {
                let service = match names.backends.get(&(ev.orig, ev.proto)) {
                    Some(list) if list.len() == 1 => list[0].clone(),
                    _ => String::new(),
                };
                (
                    self.peer(&names, ev.peer, ev.remote_identity, ev.remote_cluster),
                    self.local(&names, ev, Some(ev.orig)),
                    service,
                    String::new(),
                )
            }
        };
        let rule = ev.rule.and_then(|r| (self.rules)(r));
        let reason = match ev.verdict {
            FlowVerdict::Forwarded => rule.map(|r| format!("allowed by {r}")).unwrap_or_default(),
            FlowVerdict::NoBackend => "no healthy backend".to_owned(),
            FlowVerdict::DeniedByPolicy => rule.map_or_else(
                || "denied by a policy".to_owned(),
                |r| format!("denied by {r}"),
            ),
            FlowVerdict::DeniedByDefault => {
                "default deny: a policy selects the pod and no rule allows this".to_owned()
            }
        };
        pb::Flow {
            time_unix_nanos: i64::try_from(time).unwrap_or(0),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
            direction: match ev.direction {
                FlowDirection::Egress => "egress",
                FlowDirection::Ingress => "ingress",
            }
            .to_owned(),
            source: Some(source),
            destination: Some(destination),
            protocol: match ev.proto {
                Proto::Tcp => "TCP",
                Proto::Udp => "UDP",
            }
            .to_owned(),
            service,
            frontend,
            tier: u32::from(ev.tier),
            // Any later tier than the first: the preferred backends were down, gone or full.
            failed_over: ev.tier > 0,
            suspect_backend: ev.flags & maps::FLOWF_SUSPECT != 0,
            verdict: ev.verdict.as_str().to_owned(),
            reason,
            policy_enforced: ev.flags & maps::FLOWF_ENFORCED != 0,
            socket_cookie: ev.cookie,
        }
    }
}

/// Unix time minus the monotonic clock, in nanoseconds (the kernel stamps events with the
/// latter).
pub fn clock_offset() -> i128 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    real - i128::from(maps::monotonic_ns())
}

/// The metric label of a flow end's cluster.
fn cluster_label(p: Option<&pb::FlowPeer>) -> &str {
    match p.map(|p| p.cluster.as_str()) {
        None | Some("") => "world",
        Some(c) => c,
    }
}

/// Reads the ring until `stop` is set, on a thread of its own (poll(2) on the ring's fd).
pub fn read_ring(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    namer: Arc<Namer>,
    store: Arc<Store>,
    metrics: Registry,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut offset = clock_offset();
    let mut offset_at = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if offset_at.elapsed() > Duration::from_secs(10) {
            offset = clock_offset();
            offset_at = Instant::now();
        }
        let mut n = 0usize;
        while let Some(item) = ring.next() {
            n += 1;
            let Some(ev) = maps::parse_flow_event(&item) else {
                metrics.inc(m::UNDECODABLE, &[]);
                continue;
            };
            drop(item);
            let f = namer.flow(&ev, offset);
            metrics.inc(
                m::FLOWS,
                &[
                    cluster_label(f.source.as_ref()),
                    cluster_label(f.destination.as_ref()),
                    f.verdict.as_str(),
                ],
            );
            store.push(f);
            if n >= 4096 {
                break;
            }
        }
        if n > 0 {
            metrics.set(m::KEPT, &[], store.len() as f64);
            if n >= 4096 {
                continue;
            }
        }
        // The kernel wakes the reader only when the ring fills up: drained every 50 ms.
        if let Err(e) = crate::datapath::wait_ring(&ring, Duration::from_millis(50)) {
            tracing::error!(error = %e, "cannot poll the flow event ring; flows are not recorded");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ev(direction: FlowDirection, verdict: FlowVerdict, flags: u8) -> FlowEvent {
        FlowEvent {
            ts_ns: 1_000,
            cgroup: 42,
            cookie: 7,
            orig: "10.96.0.10:80".parse().unwrap(),
            peer: "10.2.0.5:8080".parse().unwrap(),
            local_identity: 0,
            remote_identity: (2 << 16) | 300,
            backend_id: 3,
            rule: Some(0),
            remote_cluster: 2,
            proto: Proto::Tcp,
            direction,
            verdict,
            tier: 1,
            flags,
        }
    }

    fn namer() -> Namer {
        let n = Namer::new(
            "east".into(),
            "east-node-1".into(),
            PathBuf::from("/nonexistent-cgroup-root"),
            Arc::new(|i| (i == 0).then(|| "CiliumNetworkPolicy rebel/x-wing".to_owned())),
        );
        let mut names = Names::default();
        names.pods.insert(
            "10.2.0.5".parse().unwrap(),
            PodName {
                cluster: "west".into(),
                namespace: "rebel".into(),
                name: "rebel-base-1".into(),
                node: "west-node-1".into(),
                uid: String::new(),
            },
        );
        names.identities.insert(
            (2 << 16) | 300,
            ("west".into(), vec!["k8s:app=rebel-base".into()]),
        );
        names.frontends.insert(
            ("10.96.0.10:80".parse().unwrap(), Proto::Tcp),
            "rebel/rebel-base".into(),
        );
        n.set_names(names);
        n
    }

    #[test]
    fn an_egress_flow_through_a_service_names_both_ends_and_the_backend_tier() {
        let f = namer().flow(
            &ev(
                FlowDirection::Egress,
                FlowVerdict::Forwarded,
                maps::FLOWF_SERVICE | maps::FLOWF_NEXT_TIER,
            ),
            5,
        );
        assert_eq!(f.time_unix_nanos, 1_005);
        assert_eq!(f.direction, "egress");
        assert_eq!(f.service, "rebel/rebel-base");
        assert_eq!(f.frontend, "10.96.0.10:80");
        let d = f.destination.unwrap();
        assert_eq!(
            (d.cluster.as_str(), d.namespace.as_str(), d.pod.as_str()),
            ("west", "rebel", "rebel-base-1")
        );
        assert_eq!(d.labels, vec!["k8s:app=rebel-base".to_owned()]);
        assert_eq!(d.port, 8080);
        assert!(f.failed_over);
        assert_eq!(f.tier, 1);
        assert_eq!(f.verdict, "forwarded");
        // The rule that allowed it is named; the caller is no pod: the host.
        assert_eq!(f.reason, "allowed by CiliumNetworkPolicy rebel/x-wing");
        let s = f.source.unwrap();
        assert_eq!((s.cluster.as_str(), s.identity), ("east", 1));
    }

    #[test]
    fn a_peer_the_kernel_did_not_look_up_is_named_from_the_agents_ip_cache() {
        let n = namer();
        {
            let mut names = Names::default();
            names
                .addresses
                .insert("10.2.0.5".parse().unwrap(), (2 << 16) | 300);
            names.identities.insert(
                (2 << 16) | 300,
                ("west".into(), vec!["k8s:app=rebel-base".into()]),
            );
            n.set_names(names);
        }
        let mut e = ev(FlowDirection::Egress, FlowVerdict::Forwarded, 0);
        e.remote_identity = 0;
        e.remote_cluster = 0;
        let d = n.flow(&e, 0).destination.unwrap();
        assert_eq!((d.identity, d.cluster_id), ((2 << 16) | 300, 2));
        assert_eq!(d.cluster, "west");
        assert_eq!(d.labels, vec!["k8s:app=rebel-base".to_owned()]);
        // An address nobody knows: the world.
        e.peer = "192.0.2.1:443".parse().unwrap();
        let d = n.flow(&e, 0).destination.unwrap();
        assert_eq!((d.identity, d.cluster.as_str()), (2, ""));
    }

    #[test]
    fn denied_flows_name_the_policy_or_the_default() {
        let n = namer();
        let f = n.flow(
            &ev(
                FlowDirection::Egress,
                FlowVerdict::DeniedByPolicy,
                maps::FLOWF_RULE,
            ),
            0,
        );
        assert_eq!(f.reason, "denied by CiliumNetworkPolicy rebel/x-wing");
        let mut e = ev(FlowDirection::Egress, FlowVerdict::DeniedByDefault, 0);
        e.rule = None;
        let f = n.flow(&e, 0);
        assert!(f.reason.starts_with("default deny"), "{}", f.reason);
        let f = n.flow(
            &ev(
                FlowDirection::Egress,
                FlowVerdict::NoBackend,
                maps::FLOWF_SERVICE,
            ),
            0,
        );
        assert_eq!(f.destination.unwrap().address, "10.96.0.10");
    }

    /// A peer that claims this cluster's node address for one of its nodes: flows to that
    /// address still name this cluster's node, whatever order the view lists them in.
    #[test]
    fn a_peer_cannot_pass_this_clusters_node_off_as_its_own() {
        let ip: IpAddr = "192.168.1.5".parse().unwrap();
        let n = namer();
        let mut e = ev(FlowDirection::Egress, FlowVerdict::Forwarded, 0);
        e.peer = SocketAddr::new(ip, 10250);
        e.remote_identity = 2;
        e.remote_cluster = 0;
        // Hash maps list in a random order per instance (not per clone): many of them.
        for _ in 0..32 {
            let mut view = crate::desired::MeshView::default();
            for i in 0..8 {
                view.nodes
                    .insert(("west".into(), format!("west-evil-{i}")), vec![ip]);
            }
            view.nodes
                .insert(("east".into(), "east-node-2".into()), vec![ip]);
            n.set_names(Names::build(&view, &[], "east", "east-node-1"));
            let d = n.flow(&e, 0).destination.unwrap();
            assert_eq!(
                (d.cluster.as_str(), d.node.as_str()),
                ("east", "east-node-2"),
                "{d:?}"
            );
            assert_eq!(d.labels, vec!["reserved:remote-node".to_owned()]);
        }
    }

    #[test]
    fn the_store_keeps_the_last_n_and_feeds_followers_without_a_gap() {
        let s = Store::new(3);
        for i in 0..5 {
            s.push(pb::Flow {
                time_unix_nanos: i,
                ..Default::default()
            });
        }
        assert_eq!(s.len(), 3);
        let req = pb::ObserveRequest {
            last: 2,
            ..Default::default()
        };
        let (back, upto, mut rx) = s.backlog(&req);
        assert_eq!(
            back.iter().map(|f| f.time_unix_nanos).collect::<Vec<_>>(),
            vec![3, 4]
        );
        s.push(pb::Flow {
            time_unix_nanos: 5,
            ..Default::default()
        });
        let (seq, f) = rx.try_recv().unwrap();
        assert!(seq > upto);
        assert_eq!(f.time_unix_nanos, 5);
        // No backlog asked: none sent.
        let (back, _, _) = s.backlog(&pb::ObserveRequest::default());
        assert!(back.is_empty());
    }
}

#[cfg(test)]
mod cgroup_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_caller_is_named_from_its_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let uid = "8d0b8a9e-2f7c-4a53-9b1e-3c5d6e7f8a90";
        let pod = root.path().join(format!("pod{uid}"));
        std::fs::create_dir(&pod).unwrap();
        let cg = std::fs::metadata(&pod).unwrap().ino();
        let n = Namer::new(
            "east".into(),
            "n1".into(),
            root.path().to_owned(),
            Arc::new(|_| None),
        );
        let mut names = Names::default();
        let ip: IpAddr = "10.1.0.7".parse().unwrap();
        names.local_by_uid.insert(uid.into(), ip);
        names.pods.insert(
            ip,
            PodName {
                cluster: "east".into(),
                namespace: "rebel".into(),
                name: "x-wing".into(),
                node: "n1".into(),
                uid: uid.into(),
            },
        );
        n.set_names(names);
        let ev = FlowEvent {
            ts_ns: 0,
            cgroup: cg,
            cookie: 1,
            orig: "10.96.0.1:80".parse().unwrap(),
            peer: "10.2.0.1:80".parse().unwrap(),
            local_identity: 77,
            remote_identity: 2,
            backend_id: 0,
            rule: None,
            remote_cluster: 0,
            proto: Proto::Tcp,
            direction: FlowDirection::Egress,
            verdict: FlowVerdict::Forwarded,
            tier: 0,
            flags: 0,
        };
        let f = n.flow(&ev, 0);
        let s = f.source.unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.pod.as_str(), s.address.as_str()),
            ("rebel", "x-wing", "10.1.0.7")
        );
    }
}
