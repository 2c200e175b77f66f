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
    /// Objects this cluster exports, per kind.
    #[serde(default)]
    pub exported: BTreeMap<String, usize>,
    /// Its peers.
    pub peers: Vec<PeerStatus>,
    /// When this report was written (Unix seconds); 0 when served live.
    #[serde(default)]
    pub updated_unix: i64,
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
        let back: ClusterStatus =
            serde_json::from_str(&serde_json::to_string(&s).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, s);
        assert_eq!(peer_secret_name("west"), "clustermesh-peer-west");
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
    /// The state byte new connections check.
    pub healthy: bool,
    /// Its cluster's ID.
    pub cluster_id: u16,
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
}

/// A desired service a node agent refused to program; the rest of the node is programmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedService {
    /// `ip:port/proto`.
    pub frontend: String,
    /// `namespace/name`, when known.
    pub service: Option<String>,
    /// The kind of reason: `tier_full`, `duplicate_frontend`, `services_full`,
    /// `backends_full` or `slots_full`.
    pub reason: String,
    /// The reason in words, naming the field and the limit.
    pub message: String,
    /// Whether the maps keep the frontend's previous programming.
    pub kept_previous: bool,
}

#[cfg(test)]
mod node_state_tests {
    use super::*;

    #[test]
    fn node_state_without_refusals_still_parses() {
        let json = r#"{"cluster":"east","synced":true,"services":[],"in_sync":true}"#;
        let s: NodeState = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.refused.is_empty());
    }
}
