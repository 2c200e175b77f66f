//! Global services: a Service that several clusters offer under one name, and its backends.
//!
//! Must not parse Kubernetes objects (the exporter does) nor decide which backends a node uses
//! (the node agent does); this module only describes one cluster's share of a global service.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{ClusterName, NodeName};

/// Why a service value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A namespace or name is not a DNS-1123 label.
    #[error("{what} {value:?} is not a DNS-1123 label of at most 63 characters")]
    Name {
        /// Which part: "namespace" or "service name".
        what: &'static str,
        /// The refused text.
        value: String,
    },
    /// A port number of 0.
    #[error("service {service}: port {name:?} has number 0")]
    PortZero {
        /// The service.
        service: ServiceName,
        /// The port's name.
        name: String,
    },
    /// Two ports share a name.
    #[error("service {service}: port name {name:?} is used twice")]
    DuplicatePort {
        /// The service.
        service: ServiceName,
        /// The repeated name.
        name: String,
    },
    /// Two backends share an address.
    #[error("service {service}: backend {ip} is listed twice")]
    DuplicateBackend {
        /// The service.
        service: ServiceName,
        /// The repeated address.
        ip: IpAddr,
    },
    /// A service that is not shared carries backends.
    #[error(
        "service {service} is not shared (service.cilium.io/shared: \"false\") but carries {count} backends"
    )]
    UnsharedWithBackends {
        /// The service.
        service: ServiceName,
        /// How many backends it carries.
        count: usize,
    },
    /// An unknown protocol name.
    #[error("protocol {value:?} is not one of TCP, UDP, SCTP")]
    Protocol {
        /// The refused text.
        value: String,
    },
    /// An unknown affinity name.
    #[error("affinity {value:?} is not one of local, remote, none")]
    Affinity {
        /// The refused text.
        value: String,
    },
    /// Balancing settings out of range.
    #[error("service {service}: {reason}")]
    Balancing {
        /// The service.
        service: ServiceName,
        /// What is out of range.
        reason: String,
    },
}

/// The overprovisioning factor when none is set, in percent (Envoy's 1.4).
pub const DEFAULT_OVERPROVISIONING_PCT: u32 = 140;
/// Overprovisioning factors accepted, in percent (1.0 ..= 10.0).
pub const OVERPROVISIONING_PCT: std::ops::RangeInclusive<u32> = 100..=1000;
/// Clusters a weighted service may name.
pub const MAX_WEIGHTED_CLUSTERS: usize = 8;
/// The largest weight of one cluster.
pub const MAX_WEIGHT: u32 = 10_000;
/// The largest minimum of healthy local backends.
pub const MAX_MIN_HEALTHY: u32 = 256;

/// How a node splits new connections between tiers and clusters (annotations of this
/// project's prefix, ADR 0019).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Balancing {
    /// Overprovisioning factor in percent (140 = 1.4): the first tier keeps
    /// `min(1, healthy fraction × factor)` of new connections, the rest spills to the next.
    pub overprovisioning_pct: u32,
    /// Below this many healthy backends the first tier is skipped altogether (0: never).
    pub min_healthy_local: u32,
    /// Per-cluster weights of new connections; empty: no weights (affinity decides). When set,
    /// the service's backends form one tier split by these weights, a cluster without a
    /// healthy backend giving its share to the others, clusters not named being the last
    /// resort.
    pub cluster_weights: BTreeMap<ClusterName, u32>,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            overprovisioning_pct: DEFAULT_OVERPROVISIONING_PCT,
            min_healthy_local: 0,
            cluster_weights: BTreeMap::new(),
        }
    }
}

impl Balancing {
    /// Checks the ranges; the error says which.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !OVERPROVISIONING_PCT.contains(&self.overprovisioning_pct) {
            return Err(format!(
                "overprovisioning factor {}.{:02} is outside 1.0..=10.0",
                self.overprovisioning_pct / 100,
                self.overprovisioning_pct % 100
            ));
        }
        if self.min_healthy_local > MAX_MIN_HEALTHY {
            return Err(format!(
                "minimum of healthy local backends {} is above {MAX_MIN_HEALTHY}",
                self.min_healthy_local
            ));
        }
        if self.cluster_weights.len() > MAX_WEIGHTED_CLUSTERS {
            return Err(format!(
                "{} clusters weighted, at most {MAX_WEIGHTED_CLUSTERS}",
                self.cluster_weights.len()
            ));
        }
        if let Some((c, w)) = self.cluster_weights.iter().find(|(_, w)| **w > MAX_WEIGHT) {
            return Err(format!("weight {w} of cluster {c} is above {MAX_WEIGHT}"));
        }
        if !self.cluster_weights.is_empty() && self.cluster_weights.values().all(|w| *w == 0) {
            return Err("every cluster weight is 0".into());
        }
        Ok(())
    }
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether `s` is a DNS-1123 label of at most 63 characters.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceName {
    namespace: String,
    name: String,
}

impl ServiceName {
    /// Validates both parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let (namespace, name) = (namespace.into(), name.into());
        if !is_dns1123_label(&namespace) {
            return Err(Error::Name {
                what: "namespace",
                value: namespace,
            });
        }
        if !is_dns1123_label(&name) {
            return Err(Error::Name {
                what: "service name",
                value: name,
            });
        }
        Ok(Self { namespace, name })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name inside the namespace.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the Kubernetes default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            _ => Err(Error::Protocol {
                value: s.to_owned(),
            }),
        }
    }
}

/// Which clusters' backends a client should prefer.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// All backends in one tier.
    #[default]
    None,
    /// Local backends first, remote ones when no local backend is healthy.
    Local,
    /// Remote backends first, local ones when no remote backend is healthy.
    Remote,
}

impl Affinity {
    /// The annotation spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Remote => "remote",
        }
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Affinity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "local" => Ok(Self::Local),
            "remote" => Ok(Self::Remote),
            _ => Err(Error::Affinity {
                value: s.to_owned(),
            }),
        }
    }
}

/// A port of the service (the frontend side).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    /// Port name; empty only for single-port services.
    pub name: String,
    /// The service port number.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// A port a backend listens on, matched to a [`ServicePort`] by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendPort {
    /// Name of the service port this serves.
    pub name: String,
    /// The backend's port number.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// The EndpointSlice conditions of a backend.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct BackendConditions {
    /// Ready to receive new connections.
    pub ready: bool,
    /// Serving (may be true while terminating).
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
}

/// One backend of a service in one cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// Its address.
    pub ip: IpAddr,
    /// The ports it serves.
    pub ports: Vec<BackendPort>,
    /// Its conditions.
    pub conditions: BackendConditions,
    /// The node it runs on, when known.
    pub node: Option<NodeName>,
    /// The node's zone, when known.
    pub zone: Option<String>,
}

/// One cluster's share of a global service: its ports, its backends, and how it is shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GlobalService {
    /// The cluster that exports it.
    pub cluster: ClusterName,
    /// Namespace and name, the same in every cluster that offers the service.
    pub name: ServiceName,
    /// The service's virtual addresses inside its own cluster.
    pub cluster_ips: Vec<IpAddr>,
    /// The service ports.
    pub ports: Vec<ServicePort>,
    /// The backends, sorted by address (see [`GlobalService::normalize`]).
    pub backends: Vec<Backend>,
    /// Whether this cluster offers its backends to the mesh (`service.cilium.io/shared`).
    pub shared: bool,
    /// Which backends clients in this cluster prefer (`service.cilium.io/affinity`).
    pub affinity: Affinity,
    /// How this cluster's nodes split new connections (spill-over, weights).
    #[serde(default)]
    pub balancing: Balancing,
}

impl GlobalService {
    /// Sorts ports and backends so that equal services compare and encode equal.
    pub fn normalize(&mut self) {
        self.cluster_ips.sort();
        self.ports.sort();
        for b in &mut self.backends {
            b.ports.sort();
        }
        self.backends.sort();
    }

    /// Checks the rules that span fields: port numbers, unique port names and backend
    /// addresses, and no backends on a service that is not shared.
    pub fn validate(&self) -> Result<()> {
        self.balancing.check().map_err(|reason| Error::Balancing {
            service: self.name.clone(),
            reason,
        })?;
        let mut names = BTreeSet::new();
        for p in &self.ports {
            if p.port == 0 {
                return Err(Error::PortZero {
                    service: self.name.clone(),
                    name: p.name.clone(),
                });
            }
            if !names.insert(&p.name) {
                return Err(Error::DuplicatePort {
                    service: self.name.clone(),
                    name: p.name.clone(),
                });
            }
        }
        let mut ips = BTreeSet::new();
        for b in &self.backends {
            if !ips.insert(b.ip) {
                return Err(Error::DuplicateBackend {
                    service: self.name.clone(),
                    ip: b.ip,
                });
            }
            if let Some(p) = b.ports.iter().find(|p| p.port == 0) {
                return Err(Error::PortZero {
                    service: self.name.clone(),
                    name: p.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// [`GlobalService::validate`], plus what a peer must never send: backends of a service
    /// it does not share (its apiserver keeps those for its own node agents).
    pub fn validate_from_peer(&self) -> Result<()> {
        self.validate()?;
        if !self.shared && !self.backends.is_empty() {
            return Err(Error::UnsharedWithBackends {
                service: self.name.clone(),
                count: self.backends.len(),
            });
        }
        Ok(())
    }
}

impl crate::Object for GlobalService {
    const KIND: crate::Kind = crate::Kind::Services;
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
    fn object_name(&self) -> String {
        self.name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> GlobalService {
        GlobalService {
            cluster: ClusterName::new("east").unwrap(),
            name: ServiceName::new("shop", "cart").unwrap(),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            backends: vec![Backend {
                ip: "10.1.0.5".parse().unwrap(),
                ports: vec![BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                conditions: BackendConditions {
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                node: Some(NodeName::new("node-1").unwrap()),
                zone: None,
            }],
            shared: true,
            affinity: Affinity::Local,
            balancing: Balancing::default(),
        }
    }

    #[test]
    fn a_well_formed_service_validates() {
        svc().validate().unwrap();
    }

    #[test]
    fn cross_field_rules_are_enforced() {
        let mut s = svc();
        s.ports.push(s.ports[0].clone());
        assert!(matches!(s.validate(), Err(Error::DuplicatePort { .. })));

        let mut s = svc();
        s.backends.push(s.backends[0].clone());
        assert!(matches!(s.validate(), Err(Error::DuplicateBackend { .. })));

        let mut s = svc();
        s.shared = false;
        s.validate().unwrap();
        let e = s.validate_from_peer().unwrap_err().to_string();
        assert!(e.contains("shop/cart") && e.contains("not shared"), "{e}");

        let mut s = svc();
        s.ports[0].port = 0;
        assert!(matches!(s.validate(), Err(Error::PortZero { .. })));

        let mut s = svc();
        s.balancing.overprovisioning_pct = 99;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("0.99") && e.contains("shop/cart"), "{e}");
        let mut s = svc();
        for (i, c) in ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .enumerate()
        {
            s.balancing
                .cluster_weights
                .insert(ClusterName::new(*c).unwrap(), i as u32);
        }
        assert!(s.validate().unwrap_err().to_string().contains("at most 8"));
        let mut s = svc();
        s.balancing
            .cluster_weights
            .insert(ClusterName::new("east").unwrap(), 0);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("every cluster weight is 0")
        );
        s.balancing
            .cluster_weights
            .insert(ClusterName::new("west").unwrap(), MAX_WEIGHT + 1);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("above 10000")
        );
    }

    #[test]
    fn normalize_makes_equal_services_equal() {
        let mut a = svc();
        let mut extra = a.backends[0].clone();
        extra.ip = "10.1.0.1".parse().unwrap();
        a.backends.push(extra);
        let mut b = a.clone();
        b.backends.reverse();
        a.normalize();
        b.normalize();
        assert_eq!(a, b);
    }

    #[test]
    fn names_protocols_and_affinities_parse_strictly() {
        assert!(ServiceName::new("Shop", "cart").is_err());
        assert!(ServiceName::new("shop", "").is_err());
        assert!(ServiceName::new("shop", "a".repeat(64)).is_err());
        assert_eq!("UDP".parse::<Protocol>().unwrap(), Protocol::Udp);
        assert!("udp".parse::<Protocol>().is_err());
        assert_eq!("remote".parse::<Affinity>().unwrap(), Affinity::Remote);
        assert!("sideways".parse::<Affinity>().is_err());
    }
}
