//! The typed policy: what the parsers produce and the resolution consumes.
//!
//! Every defaulting rule of the source kinds is already applied here (namespace restrictions,
//! `policyTypes`, `enableDefaultDeny`, empty peer lists), except the cluster default of Cilium
//! peer selectors, which depends on [`crate::Options`] and is carried as
//! [`ClusterScope::LocalByDefault`](crate::selector::ClusterScope::LocalByDefault).
//!
//! Must not parse or resolve.

use std::collections::BTreeSet;
use std::fmt;

use crate::selector::Selector;

/// The kind of object a policy was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// `cilium.io/v2` `CiliumNetworkPolicy` (namespaced).
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` `NetworkPolicy` (namespaced).
    NetworkPolicy,
}

impl PolicyKind {
    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Self::NetworkPolicy => "NetworkPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which object a policy or entry comes from: kind, namespace (none for cluster-wide
/// policies) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    /// The object's kind.
    pub kind: PolicyKind,
    /// Its namespace; `None` for `CiliumClusterwideNetworkPolicy`.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl PolicyRef {
    /// A reference to `kind` `namespace/name`.
    pub fn new(kind: PolicyKind, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Traffic direction, seen from the selected endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic into the endpoint.
    Ingress,
    /// Traffic out of the endpoint.
    Egress,
}

/// What a matching entry decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Allowed (unless a `Deny` entry also matches).
    Allow,
    /// Denied; wins over every `Allow`.
    Deny,
}

/// Layer-4 protocol of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum L4 {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// TCP and UDP.
    Any,
}

/// A port restriction of a rule: protocol and an inclusive port range (`None` = every port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    /// The protocol.
    pub proto: L4,
    /// Inclusive `(first, last)`; `None` means every port of `proto`.
    pub ports: Option<(u16, u16)>,
}

impl PortSpec {
    /// Every port of every protocol.
    pub const ALL: Self = Self {
        proto: L4::Any,
        ports: None,
    };
}

/// A named set of identities (`fromEntities` / `toEntities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// Outside the mesh: the reserved identity WORLD.
    World,
    /// The node the endpoint runs on: the reserved identity HOST.
    Host,
    /// Every identity of the policy's cluster, and HOST.
    Cluster,
    /// Every identity of every connected cluster, and HOST (our extension to Cilium).
    Mesh,
    /// Everything, inside and outside the mesh.
    All,
}

/// The peers of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peers {
    /// Any peer, inside or outside the mesh (an L4-only rule, the `all` entity, a
    /// NetworkPolicy rule without `from`/`to`).
    Any,
    /// The identities any of these selectors or entities select (none if both are empty).
    Listed {
        /// Endpoint selectors.
        selectors: Vec<Selector>,
        /// Entities.
        entities: BTreeSet<Entity>,
    },
}

impl Peers {
    /// Whether this stands for any peer at all.
    pub fn is_any(&self) -> bool {
        match self {
            Self::Any => true,
            Self::Listed { entities, .. } => entities.contains(&Entity::All),
        }
    }
}

/// One ingress or egress rule of a policy: peers, ports and verdict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerRule {
    /// Which direction it applies to.
    pub direction: Direction,
    /// Allow or deny.
    pub verdict: Verdict,
    /// Which peers.
    pub peers: Peers,
    /// Which ports; empty means every port of every protocol.
    pub ports: Vec<PortSpec>,
}

/// One rule of a policy (a Cilium `spec`/`specs[i]`, or a NetworkPolicy's `spec`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// The local endpoints the rule applies to (namespace restriction included).
    pub subject: Selector,
    /// Whether selected endpoints become default-deny for ingress.
    pub enforce_ingress: bool,
    /// Whether selected endpoints become default-deny for egress.
    pub enforce_egress: bool,
    /// Allow and deny rules, both directions.
    pub peer_rules: Vec<PeerRule>,
}

/// A parsed policy object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Policy {
    /// Where it comes from; also its identity in [`crate::Resolver`].
    pub origin: PolicyRef,
    /// Its rules.
    pub rules: Vec<Rule>,
}
