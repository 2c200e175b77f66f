//! The status document: what an apiserver reports about itself, its peers, etcd, its refused
//! services and the node agents of its cluster (`/status`, and the status ConfigMap the leader
//! keeps). Written by the apiserver, read by the `clustermesh` CLI. Must not do I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

// `node-agent/src/agent.rs` still names these through `model::status`; they belong to
// `model::node_state`, where every other caller names them.
pub use crate::node_state::{
    ApiserverLink, NodeService, NodeState, ProgrammedBackend, RefusedService,
};

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
    /// Start of validity (Unix seconds; absent from older apiservers). With it, a short-lived
    /// certificate that its agent renews by itself (enrollment: renewed at two thirds of its
    /// life) is a problem only once that renewal is overdue ([`NodeCert::warn_within`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_unix: Option<i64>,
}

impl NodeCert {
    /// How long before its end this certificate is worth a warning, for a warning window of
    /// `window` seconds: a quarter of its life when that is shorter (an agent renews at two
    /// thirds, so with a quarter left its renewal is overdue by a twelfth of the life).
    pub fn warn_within(&self, window: i64) -> i64 {
        match self.not_before_unix {
            Some(nb) if self.not_after_unix > nb => window.min((self.not_after_unix - nb) / 4),
            _ => window,
        }
    }
}

/// The warning window (seconds) the node-agent summary picks its certificate by: `clustermesh
/// check`'s default.
pub const CERT_WARN_WINDOW: i64 = 30 * 86_400;

/// A certificate's validity (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before_unix: i64,
    /// End.
    pub not_after_unix: i64,
}

/// One node agent's `/state` as the leader read it: the document and the validity of the
/// certificate the agent served it with, or why it could not be read.
pub type NodeProbe = (String, Result<(NodeState, Validity), String>);

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
                Ok((state, validity)) => {
                    let cert = NodeCert {
                        node: node.clone(),
                        not_after_unix: validity.not_after_unix,
                        not_before_unix: Some(validity.not_before_unix),
                    };
                    // The one that needs attention first (certificates of different lifetimes
                    // are warned about at different times).
                    let due = |c: &NodeCert| c.not_after_unix - c.warn_within(CERT_WARN_WINDOW);
                    if out
                        .earliest_cert
                        .as_ref()
                        .is_none_or(|c| due(&cert) < due(c))
                    {
                        out.earliest_cert = Some(cert);
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
        assert_eq!(
            crate::objects::peer_secret_name("west"),
            "clustermesh-peer-west"
        );
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
