//! What an apiserver reports about itself and its peers, and the Kubernetes objects through
//! which the mesh is installed and connected. Shared by the apiserver (which writes them) and
//! the `clustermesh` CLI (which reads and writes them), so both agree on every name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Secret holding the cluster's CA (`ca.crt`, `ca.key`), created when the mesh is installed.
pub const CA_SECRET: &str = "clustermesh-ca";
/// Service in front of the apiserver's Mesh API.
pub const APISERVER_SERVICE: &str = "clustermesh-apiserver";
/// Annotation on [`APISERVER_SERVICE`] listing the Mesh API endpoints peers should use
/// (`host:port`, comma-separated); overrides the Service's load-balancer address.
pub const MESH_ENDPOINTS_ANNOTATION: &str = "clustermesh.dev/mesh-endpoints";
/// Name of the Service port of the Mesh API.
pub const MESH_PORT_NAME: &str = "mesh";
/// ConfigMap the leading apiserver keeps its [`ClusterStatus`] in (key [`STATUS_KEY`]).
pub const STATUS_CONFIGMAP: &str = "clustermesh-status";
/// Key of the status document in [`STATUS_CONFIGMAP`].
pub const STATUS_KEY: &str = "status.json";
/// Label on peer configuration Secrets; its value is the peer cluster's name.
pub const PEER_LABEL: &str = "clustermesh.dev/peer";
/// Name prefix of peer configuration Secrets (`clustermesh-peer-<peer>`).
pub const PEER_SECRET_PREFIX: &str = "clustermesh-peer-";
/// Keys of a peer configuration Secret (`cluster-id` is optional).
pub const PEER_SECRET_KEYS: [&str; 5] = ["endpoints", "ca.crt", "tls.crt", "tls.key", "cluster-id"];
/// Label on grant Secrets (in the serving cluster); its value is the peer cluster allowed to
/// import this cluster's exports.
pub const GRANT_LABEL: &str = "clustermesh.dev/grant";
/// Name prefix of grant Secrets (`clustermesh-grant-<peer>`).
pub const GRANT_SECRET_PREFIX: &str = "clustermesh-grant-";
/// Keys of a grant Secret: the peer's cluster ID, and the SHA-256 fingerprints (one per line,
/// `aa:bb:...`) of the client certificates issued to it that the Mesh API accepts.
pub const GRANT_SECRET_KEYS: [&str; 2] = ["cluster-id", "sha256"];

/// The name of the Secret granting `peer` access to this cluster's Mesh API.
pub fn grant_secret_name(peer: &str) -> String {
    format!("{GRANT_SECRET_PREFIX}{peer}")
}

/// Seconds between rewrites of an unchanged status: a status older than three times this
/// means its apiserver stopped reporting.
pub const STATUS_HEARTBEAT_SECS: i64 = 10;

/// Whether a status written at `updated_unix` is still current at `now_unix`: older than its
/// refresh interval (plus 5 s of slack for clocks and writes) means its apiserver stopped
/// reporting, and nothing it says (ready, peers ready) may be trusted.
pub fn status_is_current(updated_unix: i64, now_unix: i64) -> bool {
    now_unix - updated_unix <= STATUS_HEARTBEAT_SECS + 5
}

/// Where a peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not connected yet (or never successfully).
    Connecting,
    /// Connected, receiving the initial state.
    Syncing,
    /// In sync, following changes.
    Ready,
    /// Disconnected; the last state is kept.
    Stale,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connecting => "connecting",
            Phase::Syncing => "syncing",
            Phase::Ready => "ready",
            Phase::Stale => "stale",
        })
    }
}

/// Where an apiserver stands: why it is not ready, or that it is. A phase that is not
/// [`ApiserverPhase::Ready`] never means its exported state was withdrawn: etcd keeps it
/// (ADR 0013).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiserverPhase {
    /// Starting: not listed etcd or joined the election yet.
    Starting,
    /// Another replica leads (or none yet); this one serves the Mesh API only.
    Standby,
    /// Leading: listing Kubernetes and writing the initial state.
    Syncing,
    /// Leading, the initial state exported, following changes.
    Ready,
    /// etcd does not answer the session's keep-alives (within the lease TTL).
    EtcdUnreachable,
    /// etcd answers keep-alives but refuses or fails the exporter's writes.
    EtcdWritesFailing,
    /// The session lease expired (etcd unreachable for longer than its TTL, or it could not be
    /// re-created): peers see no heartbeat; the exported state is kept.
    LeaseLost,
}

impl std::fmt::Display for ApiserverPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApiserverPhase::Starting => "starting",
            ApiserverPhase::Standby => "standby",
            ApiserverPhase::Syncing => "syncing",
            ApiserverPhase::Ready => "ready",
            ApiserverPhase::EtcdUnreachable => "etcd-unreachable",
            ApiserverPhase::EtcdWritesFailing => "etcd-writes-failing",
            ApiserverPhase::LeaseLost => "lease-lost",
        })
    }
}

/// One peer's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer.
    pub name: String,
    /// Its ID, once known.
    pub cluster_id: Option<u16>,
    /// The phase.
    pub phase: Phase,
    /// Since when (Unix seconds).
    pub since_unix: i64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When the last error happened (Unix seconds).
    pub last_error_unix: Option<i64>,
    /// Objects held per kind.
    pub objects: BTreeMap<String, usize>,
    /// The peer's revision this cluster has caught up with.
    pub revision: i64,
    /// End of validity of the peer's server certificate (Unix seconds).
    pub peer_cert_not_after_unix: Option<i64>,
    /// The endpoint in use.
    pub endpoint: Option<String>,
    /// Objects of the peer the importer refuses at the moment (each named once in
    /// `last_error` and the log when refused; absent from older documents).
    #[serde(default)]
    pub refused_objects: usize,
    /// The peer's version as its Mesh API reports it (`ClusterInfo`: `0.1.0+0123456789ab`);
    /// absent from older documents and before the first connection.
    #[serde(default)]
    pub version: Option<String>,
}

/// One apiserver's view of itself and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster.
    pub cluster: String,
    /// Its ID.
    pub cluster_id: u16,
    /// The replica reporting.
    pub replica: String,
    /// Whether it leads.
    pub leader: bool,
    /// Whether it is ready (leading, initial state exported).
    pub ready: bool,
    /// Why not, when not.
    pub reason: Option<String>,
    /// Where the apiserver stands (absent from older documents: then only `ready` and
    /// `reason` tell).
    #[serde(default)]
    pub phase: Option<ApiserverPhase>,
    /// Since when it is in `phase` (Unix seconds).
    #[serde(default)]
    pub phase_since_unix: Option<i64>,
    /// Objects this cluster exports, per kind.
    #[serde(default)]
    pub exported: BTreeMap<String, usize>,
    /// Its peers.
    pub peers: Vec<PeerStatus>,
    /// When this report was written (Unix seconds); 0 when served live.
    #[serde(default)]
    pub updated_unix: i64,
    /// Whether this cluster's etcd answers the leader (absent from older documents).
    #[serde(default)]
    pub etcd: Option<EtcdHealth>,
    /// End of validity of the apiserver's Mesh API certificate (Unix seconds).
    #[serde(default)]
    pub serving_cert_not_after_unix: Option<i64>,
    /// Services the exporter refuses to export (a malformed annotation, ...), each also
    /// reported as a Warning Event on the Service.
    #[serde(default)]
    pub rejected_services: Vec<RejectedService>,
    /// The node agents of this cluster, as the leader last read their `/state`.
    #[serde(default)]
    pub node_agents: Option<NodeAgents>,
    /// The reporting apiserver's version, `0.1.0+0123456789ab` (crate version and git commit;
    /// absent from older documents).
    #[serde(default)]
    pub version: Option<String>,
}

/// Whether etcd answers, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdHealth {
    /// Whether the last probe was answered.
    pub healthy: bool,
    /// Since when it is in this state (Unix seconds).
    pub since_unix: i64,
    /// Why not, when not.
    pub error: Option<String>,
}

/// A Service the exporter does not export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedService {
    /// `namespace/name`.
    pub service: String,
    /// The kind of reason (the reason of its Warning Event).
    pub reason: String,
    /// The reason in words.
    pub message: String,
    /// Whether its last good export stays in place (it was exported before it became
    /// invalid: bad input never erases good state).
    #[serde(default)]
    pub kept_previous: bool,
}

/// Rejected services listed in the status document at most.
pub const MAX_LISTED_SERVICES: usize = 50;

/// Node agents listed by name in [`NodeAgents::not_ready`] at most (the counts cover all).
pub const MAX_LISTED_NODES: usize = 20;

/// What the leader knows of its cluster's node agents: one `/state` read per Kubernetes Node
/// ([ADR 0017](../../../docs/architecture/adr/0017-node-agents-in-status.md)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAgents {
    /// Kubernetes Nodes of the cluster.
    pub nodes: usize,
    /// Agents that answered and follow their apiserver.
    pub connected: usize,
    /// Agents connected and programmed as desired (phase [`AgentPhase::Ready`]).
    pub ready: usize,
    /// The agents that are not ready, by node name (at most [`MAX_LISTED_NODES`]).
    pub not_ready: Vec<NodeAgentProblem>,
    /// The node-agent certificate that expires first (as served on its `/state` port).
    pub earliest_cert: Option<NodeCert>,
    /// Why the nodes could not be listed; the counts are then those of the last good round.
    pub error: Option<String>,
    /// When the agents were last read (Unix seconds).
    pub checked_unix: i64,
}

/// Where a node agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentPhase {
    /// Its `/state` could not be read (the agent is down, or its certificate is refused).
    Unreachable,
    /// It answers, but its Watch stream to the apiserver is down (its maps keep their state).
    Disconnected,
    /// Connected, without a complete snapshot yet.
    Syncing,
    /// Some frontend's maps differ from what it should have.
    OutOfSync,
    /// It refused some desired services; the rest of the node is programmed.
    Refusing,
    /// Connected and programmed as desired.
    Ready,
}

impl std::fmt::Display for AgentPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentPhase::Unreachable => "unreachable",
            AgentPhase::Disconnected => "disconnected",
            AgentPhase::Syncing => "syncing",
            AgentPhase::OutOfSync => "out-of-sync",
            AgentPhase::Refusing => "refusing",
            AgentPhase::Ready => "ready",
        })
    }
}

/// A node agent that is not ready, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAgentProblem {
    /// The node.
    pub node: String,
    /// Its phase.
    pub phase: AgentPhase,
    /// What is wrong, in words.
    pub detail: String,
}

/// A node agent's certificate expiry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCert {
    /// The node.
    pub node: String,
    /// End of validity (Unix seconds).
    pub not_after_unix: i64,
}

/// One node agent's `/state` as the leader read it: the document and the end of validity of
/// the certificate the agent served it with, or why it could not be read.
pub type NodeProbe = (String, Result<(NodeState, i64), String>);

/// The phase of an agent whose `/state` is `s`.
pub fn agent_phase(s: &NodeState) -> AgentPhase {
    if s.apiserver.as_ref().is_some_and(|l| !l.connected) {
        AgentPhase::Disconnected
    } else if !s.synced {
        AgentPhase::Syncing
    } else if !s.in_sync {
        AgentPhase::OutOfSync
    } else if !s.refused.is_empty() {
        AgentPhase::Refusing
    } else {
        AgentPhase::Ready
    }
}

fn agent_detail(phase: AgentPhase, s: &NodeState) -> String {
    match phase {
        AgentPhase::Disconnected => {
            let error = s.apiserver.as_ref().and_then(|l| l.last_error.as_ref());
            format!(
                "its Watch stream to the apiserver is down{}",
                error.map(|e| format!(": {e}")).unwrap_or_default()
            )
        }
        AgentPhase::Syncing => "connected, waiting for a complete snapshot".into(),
        AgentPhase::OutOfSync => {
            let off: Vec<&str> = s
                .services
                .iter()
                .filter(|f| !f.in_sync)
                .map(|f| f.frontend.as_str())
                .collect();
            format!(
                "{} of {} frontends differ from what it should have (first: {})",
                off.len(),
                s.services.len(),
                off.first().copied().unwrap_or("-")
            )
        }
        AgentPhase::Refusing => {
            let first = &s.refused[0];
            format!(
                "refused {} service(s) (first: {} {}: {})",
                s.refused.len(),
                first.service.as_deref().unwrap_or("?"),
                first.frontend,
                first.message
            )
        }
        AgentPhase::Unreachable | AgentPhase::Ready => String::new(),
    }
}

impl NodeAgents {
    /// The summary of one round of `/state` reads at `now_unix`, in node name order.
    pub fn summarize(mut probes: Vec<NodeProbe>, now_unix: i64) -> Self {
        probes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = NodeAgents {
            nodes: probes.len(),
            connected: 0,
            ready: 0,
            not_ready: Vec::new(),
            earliest_cert: None,
            error: None,
            checked_unix: now_unix,
        };
        for (node, result) in probes {
            let (phase, detail) = match result {
                Ok((state, not_after)) => {
                    if out
                        .earliest_cert
                        .as_ref()
                        .is_none_or(|c| not_after < c.not_after_unix)
                    {
                        out.earliest_cert = Some(NodeCert {
                            node: node.clone(),
                            not_after_unix: not_after,
                        });
                    }
                    let phase = agent_phase(&state);
                    (phase, agent_detail(phase, &state))
                }
                Err(e) => (AgentPhase::Unreachable, e),
            };
            if !matches!(phase, AgentPhase::Unreachable | AgentPhase::Disconnected) {
                out.connected += 1;
            }
            if phase == AgentPhase::Ready {
                out.ready += 1;
            } else if out.not_ready.len() < MAX_LISTED_NODES {
                out.not_ready.push(NodeAgentProblem {
                    node,
                    phase,
                    detail: crate::escape::bounded(&detail, crate::escape::MAX_TEXT),
                });
            }
        }
        out
    }

    /// `4/4 nodes connected and in sync`, naming the ones that are not.
    pub fn headline(&self) -> String {
        let mut line = format!("{}/{} nodes connected and in sync", self.ready, self.nodes);
        if !self.not_ready.is_empty() {
            let names: Vec<String> = self
                .not_ready
                .iter()
                .map(|p| format!("{} {}", p.node, p.phase))
                .collect();
            let more = (self.nodes - self.ready).saturating_sub(self.not_ready.len());
            line.push_str(&format!(
                " ({}{})",
                names.join(", "),
                if more > 0 {
                    format!(", {more} more")
                } else {
                    String::new()
                }
            ));
        }
        line
    }
}

/// The name of the Secret configuring `peer` (see [`PEER_SECRET_PREFIX`]).
pub fn peer_secret_name(peer: &str) -> String {
    format!("{PEER_SECRET_PREFIX}{peer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_tolerates_missing_optional_fields() {
        let json = r#"{"cluster":"east","cluster_id":1,"replica":"r","leader":true,"ready":true,
            "reason":null,"peers":[{"name":"west","cluster_id":2,"phase":"ready","since_unix":5,
            "last_error":null,"last_error_unix":null,"objects":{"services":3},"revision":9,
            "peer_cert_not_after_unix":null,"endpoint":"10.0.0.1:4240"}]}"#;
        let s: ClusterStatus = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.peers[0].phase, Phase::Ready);
        assert_eq!(s.updated_unix, 0);
        assert_eq!(
            (s.phase, s.phase_since_unix),
            (None, None),
            "an older document"
        );
        let back: ClusterStatus =
            serde_json::from_str(&serde_json::to_string(&s).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, s);
        assert_eq!(peer_secret_name("west"), "clustermesh-peer-west");
    }

    #[test]
    fn apiserver_phases_are_kebab_case_on_the_wire_as_displayed() {
        for p in [
            ApiserverPhase::Starting,
            ApiserverPhase::Standby,
            ApiserverPhase::Syncing,
            ApiserverPhase::Ready,
            ApiserverPhase::EtcdUnreachable,
            ApiserverPhase::EtcdWritesFailing,
            ApiserverPhase::LeaseLost,
        ] {
            let wire = serde_json::to_string(&p).unwrap_or_default();
            assert_eq!(wire, format!("\"{p}\""));
            let back: ApiserverPhase =
                serde_json::from_str(&wire).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, p);
        }
    }
}

/// Port of the node agent's `/metrics`, `/healthz`, `/readyz` server (and `/state` for
/// loopback callers).
pub const NODE_AGENT_PORT: u16 = 9881;
/// Port of the node agent's `/state` over mutual TLS (admins and apiservers of its cluster).
pub const NODE_AGENT_STATE_PORT: u16 = 9882;

/// A backend as a node agent programmed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgrammedBackend {
    /// `ip:port`.
    pub addr: String,
    /// Not confirmed down by the agent's probes (the state byte new connections check).
    pub healthy: bool,
    /// Its cluster's ID.
    pub cluster_id: u16,
    /// Skipped now because the kernel saw a connection to it fail (passive health,
    /// quarantined until the agent's probe or a successful connection clears it).
    #[serde(default)]
    pub suspect: bool,
}

impl ProgrammedBackend {
    /// Where its bad health comes from: `probe` (confirmed down), `passive` (the kernel's
    /// suspicion), `probe+passive`, or `None` when it serves.
    pub fn health_source(&self) -> Option<&'static str> {
        match (self.healthy, self.suspect) {
            (true, false) => None,
            (true, true) => Some("passive"),
            (false, false) => Some("probe"),
            (false, true) => Some("probe+passive"),
        }
    }
}

/// One service frontend on a node: what it should have and what the maps hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeService {
    /// `ip:port/proto`.
    pub frontend: String,
    /// Backends per tier that the node should have (empty when the frontend should not exist).
    pub desired: Vec<Vec<String>>,
    /// Backends per tier found in the maps (empty when the frontend is not programmed).
    pub programmed: Vec<Vec<ProgrammedBackend>>,
    /// Whether the two agree.
    pub in_sync: bool,
    /// Each tier's current share of new connections in whole percent (spill-over included),
    /// when programmed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares_pct: Vec<u32>,
}

/// A node agent's `/state`: desired against programmed, read back from the kernel's maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's cluster.
    pub cluster: String,
    /// Whether the agent has a complete snapshot from its apiserver.
    pub synced: bool,
    /// Every frontend that is desired or programmed.
    pub services: Vec<NodeService>,
    /// Whether every frontend is in sync.
    pub in_sync: bool,
    /// Desired services the agent refused to program (absent from older agents' documents).
    #[serde(default)]
    pub refused: Vec<RefusedService>,
    /// The agent's Watch stream to its apiserver (absent from older agents' documents).
    #[serde(default)]
    pub apiserver: Option<ApiserverLink>,
}

/// A node agent's Watch stream to its apiserver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiserverLink {
    /// Whether the stream is up.
    pub connected: bool,
    /// Since when (Unix seconds).
    pub since_unix: i64,
    /// The endpoint in use, when connected.
    pub endpoint: Option<String>,
    /// The Mesh API revision of the last state the agent programmed (0: none yet).
    pub revision: i64,
    /// Why the last stream ended, when it did.
    pub last_error: Option<String>,
}

/// A desired service a node agent refused to program; the rest of the node is programmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedService {
    /// `ip:port/proto`.
    pub frontend: String,
    /// `namespace/name`, when known.
    pub service: Option<String>,
    /// The kind of reason: `tier_full`, `duplicate_frontend`, `services_full`,
    /// `backends_full`, `slots_full` or `bad_groups`.
    pub reason: String,
    /// The reason in words, naming the field and the limit.
    pub message: String,
    /// Whether the maps keep the frontend's previous programming.
    pub kept_previous: bool,
}

#[cfg(test)]
mod node_state_tests {
    use super::*;

    fn state(synced: bool, in_sync: bool, connected: Option<bool>) -> NodeState {
        NodeState {
            cluster: "east".into(),
            synced,
            services: vec![NodeService {
                frontend: "10.0.0.1:80/tcp".into(),
                desired: vec![vec!["10.1.0.1:80".into()]],
                programmed: Vec::new(),
                in_sync,
                shares_pct: Vec::new(),
            }],
            in_sync,
            refused: Vec::new(),
            apiserver: connected.map(|connected| ApiserverLink {
                connected,
                since_unix: 1,
                endpoint: None,
                revision: 7,
                last_error: (!connected).then(|| "watch stream: unavailable".into()),
            }),
        }
    }

    #[test]
    fn agent_phases_follow_link_snapshot_maps_and_refusals() {
        assert_eq!(
            agent_phase(&state(true, true, Some(true))),
            AgentPhase::Ready
        );
        assert_eq!(
            agent_phase(&state(true, true, None)),
            AgentPhase::Ready,
            "older agent"
        );
        assert_eq!(
            agent_phase(&state(true, true, Some(false))),
            AgentPhase::Disconnected
        );
        assert_eq!(
            agent_phase(&state(false, false, Some(true))),
            AgentPhase::Syncing
        );
        assert_eq!(
            agent_phase(&state(true, false, Some(true))),
            AgentPhase::OutOfSync
        );
        let mut refusing = state(true, true, Some(true));
        refusing.refused.push(RefusedService {
            frontend: "10.0.0.2:80/tcp".into(),
            service: Some("demo/big".into()),
            reason: "tier_full".into(),
            message: "tier 0 holds at most 64 backends".into(),
            kept_previous: false,
        });
        assert_eq!(agent_phase(&refusing), AgentPhase::Refusing);
    }

    #[test]
    fn summary_counts_every_node_and_names_the_ones_not_ready() {
        let probes: Vec<NodeProbe> = vec![
            ("n2".into(), Ok((state(true, true, Some(true)), 900))),
            ("n1".into(), Ok((state(true, true, Some(true)), 500))),
            (
                "n4".into(),
                Err("node agent at 10.0.0.4:9882: connection refused".into()),
            ),
            ("n3".into(), Ok((state(true, true, Some(false)), 700))),
        ];
        let s = NodeAgents::summarize(probes, 42);
        assert_eq!((s.nodes, s.connected, s.ready), (4, 2, 2));
        assert_eq!(
            s.earliest_cert,
            Some(NodeCert {
                node: "n1".into(),
                not_after_unix: 500
            })
        );
        let names: Vec<(&str, AgentPhase)> = s
            .not_ready
            .iter()
            .map(|p| (p.node.as_str(), p.phase))
            .collect();
        assert_eq!(
            names,
            [
                ("n3", AgentPhase::Disconnected),
                ("n4", AgentPhase::Unreachable)
            ]
        );
        assert_eq!(
            s.not_ready[0].detail,
            "its Watch stream to the apiserver is down: watch stream: unavailable"
        );
        assert_eq!(
            s.headline(),
            "2/4 nodes connected and in sync (n3 disconnected, n4 unreachable)"
        );
        let all = NodeAgents::summarize(
            vec![("n1".into(), Ok((state(true, true, Some(true)), 1)))],
            0,
        );
        assert_eq!(all.headline(), "1/1 nodes connected and in sync");
    }

    #[test]
    fn a_long_list_of_bad_nodes_is_capped_and_counted() {
        let probes: Vec<NodeProbe> = (0..MAX_LISTED_NODES + 3)
            .map(|i| (format!("n{i:02}"), Err("down".into())))
            .collect();
        let s = NodeAgents::summarize(probes, 0);
        assert_eq!(s.not_ready.len(), MAX_LISTED_NODES);
        assert!(s.headline().ends_with(", 3 more)"), "{}", s.headline());
    }

    #[test]
    fn node_state_without_refusals_still_parses() {
        let json = r#"{"cluster":"east","synced":true,"services":[],"in_sync":true}"#;
        let s: NodeState = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.refused.is_empty());
    }
}
