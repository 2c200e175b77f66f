//! Nodes: the machines of a cluster, their addresses and pod CIDRs.
//!
//! Must not hold anything about the node agent's runtime state.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
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

#[cfg(test)]
mod tests {
    use super::*;

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
