//! Nodes: the machines of a cluster, their addresses and pod CIDRs, and the address space
//! they advertise together ([`AddressSpace`]).
//!
//! Must not hold anything about the node agent's runtime state.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::ClusterName;

/// Why a node name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a DNS-1123 subdomain.
    #[error("node name {name:?} is not a DNS-1123 subdomain of at most 253 characters")]
    Name {
        /// The refused name.
        name: String,
    },
}

/// The name of a Kubernetes node: a DNS-1123 subdomain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    /// Validates and wraps `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(crate::service::is_dns1123_label);
        if ok {
            Ok(Self(name))
        } else {
            Err(Error::Name { name })
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

/// A node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// Its cluster.
    pub cluster: ClusterName,
    /// Its name.
    pub name: NodeName,
    /// Its internal addresses.
    pub addresses: Vec<IpAddr>,
    /// The pod CIDRs allocated to it.
    pub pod_cidrs: Vec<IpNet>,
}

impl crate::Object for Node {
    const KIND: crate::Kind = crate::Kind::Nodes;
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
    fn object_name(&self) -> String {
        self.name.to_string()
    }
}

/// The addresses a cluster advertises as its own: its nodes' addresses and their pod CIDRs.
///
/// The importer admits a peer's endpoint or backend only inside the peer's space and outside
/// this cluster's. Held aggregated and sorted, so that lookups are a binary search and two
/// spaces that cover the same addresses compare equal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressSpace {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl AddressSpace {
    /// The space of `nodes`: every address (as a host network) and every pod CIDR.
    pub fn of<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        let nets = nodes.into_iter().flat_map(|n| {
            n.addresses
                .iter()
                .map(|a| IpNet::from(*a))
                .chain(n.pod_cidrs.iter().copied())
        });
        for net in nets {
            match net.trunc() {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        let mut v4 = Ipv4Net::aggregate(&v4);
        let mut v6 = Ipv6Net::aggregate(&v6);
        v4.sort();
        v6.sort();
        Self { v4, v6 }
    }

    /// Whether `ip` lies inside the space.
    pub fn contains(&self, ip: IpAddr) -> bool {
        // Aggregated networks are disjoint: only the last one starting at or below `ip` can
        // hold it.
        match ip {
            IpAddr::V4(ip) => {
                let i = self.v4.partition_point(|n| n.network() <= ip);
                i > 0 && self.v4[i - 1].contains(&ip)
            }
            IpAddr::V6(ip) => {
                let i = self.v6.partition_point(|n| n.network() <= ip);
                i > 0 && self.v6[i - 1].contains(&ip)
            }
        }
    }

    /// Whether the space holds no address at all.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addresses: &[&str], pod_cidrs: &[&str]) -> Node {
        Node {
            cluster: ClusterName::new("east").unwrap(),
            name: NodeName::new("n1").unwrap(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            pod_cidrs: pod_cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn an_address_space_is_the_nodes_addresses_and_pod_cidrs() {
        let nodes = [
            node(&["192.168.0.2"], &["10.1.1.0/24", "fd00:1::/64"]),
            node(&["192.168.0.3", "fd00::3"], &["10.1.2.0/24"]),
            node(&[], &["10.1.3.0/24"]),
        ];
        let space = AddressSpace::of(&nodes);
        let inside = [
            "192.168.0.2",
            "192.168.0.3",
            "10.1.1.0",
            "10.1.1.255",
            "10.1.2.7",
            "10.1.3.1",
            "fd00::3",
            "fd00:1::abcd",
        ];
        for ip in inside {
            assert!(space.contains(ip.parse().unwrap()), "{ip} is inside");
        }
        let outside = [
            "192.168.0.1",
            "192.168.0.4",
            "10.1.0.255",
            "10.1.4.0",
            "0.0.0.0",
            "255.255.255.255",
            "fd00::2",
            "fd00:2::1",
            "::",
        ];
        for ip in outside {
            assert!(!space.contains(ip.parse().unwrap()), "{ip} is outside");
        }
        assert!(!space.is_empty());
        assert!(AddressSpace::of(&[]).is_empty());
        assert!(!AddressSpace::default().contains("10.1.1.1".parse().unwrap()));
    }

    #[test]
    fn address_spaces_that_cover_the_same_addresses_are_equal() {
        let split = AddressSpace::of(&[node(&["10.1.1.1"], &["10.1.0.0/24", "10.1.1.0/24"])]);
        let whole = AddressSpace::of(&[node(&[], &["10.1.0.0/23"])]);
        assert_eq!(split, whole);
        assert_ne!(whole, AddressSpace::of(&[node(&[], &["10.1.0.0/24"])]));
        // A CIDR given with host bits covers its whole network.
        let host_bits = AddressSpace::of(&[node(&[], &["10.1.0.7/23"])]);
        assert_eq!(host_bits, whole);
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        assert!(NodeName::new("node-1").is_ok());
        assert!(NodeName::new("ip-10-0-0-1.ec2.internal").is_ok());
        assert!(NodeName::new("").is_err());
        assert!(NodeName::new("Node1").is_err());
        assert!(NodeName::new("a..b").is_err());
        assert!(NodeName::new("a".repeat(254)).is_err());
    }
}
