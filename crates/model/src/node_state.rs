//! The node agent's `/state` document: what a node programmed against what it should have,
//! its link to the apiserver, the services it refused. Written by the node agent, read by the
//! apiserver and the `clustermesh` CLI. Must not do I/O.

use serde::{Deserialize, Serialize};

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
mod tests {
    use super::*;
    use crate::status::*;

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

    /// A validity from 0 to `not_after`.
    fn v(not_after: i64) -> crate::status::Validity {
        crate::status::Validity {
            not_before_unix: 0,
            not_after_unix: not_after,
        }
    }

    #[test]
    fn a_short_lived_renewed_certificate_warns_only_once_its_renewal_is_overdue() {
        let day = 86_400;
        let enrolled = NodeCert {
            node: "n1".into(),
            not_before_unix: Some(0),
            not_after_unix: day,
        };
        // 30 days' window: a day-long certificate warns with 6 h left, not from the start.
        assert_eq!(enrolled.warn_within(30 * day), day / 4);
        let year = NodeCert {
            node: "n1".into(),
            not_before_unix: Some(0),
            not_after_unix: 365 * day,
        };
        assert_eq!(year.warn_within(30 * day), 30 * day);
        let unknown = NodeCert {
            node: "n1".into(),
            not_before_unix: None,
            not_after_unix: day,
        };
        assert_eq!(unknown.warn_within(30 * day), 30 * day);
    }

    #[test]
    fn summary_counts_every_node_and_names_the_ones_not_ready() {
        let probes: Vec<NodeProbe> = vec![
            ("n2".into(), Ok((state(true, true, Some(true)), v(900)))),
            ("n1".into(), Ok((state(true, true, Some(true)), v(500)))),
            (
                "n4".into(),
                Err("node agent at 10.0.0.4:9882: connection refused".into()),
            ),
            ("n3".into(), Ok((state(true, true, Some(false)), v(700)))),
        ];
        let s = NodeAgents::summarize(probes, 42);
        assert_eq!((s.nodes, s.connected, s.ready), (4, 2, 2));
        assert_eq!(
            s.earliest_cert,
            Some(NodeCert {
                node: "n1".into(),
                not_after_unix: 500,
                not_before_unix: Some(0),
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
            vec![("n1".into(), Ok((state(true, true, Some(true)), v(1))))],
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
