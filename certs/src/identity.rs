//! The mesh identity inside a certificate.
//!
//! Every leaf certificate carries exactly one URI SAN of the form
//!
//! ```text
//! spiffe://clustermesh/cluster/<name>/id/<id>/<role>[/<node>]
//! ```
//!
//! where `<role>` is one of `apiserver`, `peer`, `node-agent`, `admin`, `etcd`, and `<node>` is
//! present for (and only for) node agents. A server learns who a client is from this SAN, never
//! from what the client claims in a request.

use std::fmt;
use std::str::FromStr;

use model::{ClusterId, ClusterName, NodeName};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::{Error, Result};

const PREFIX: &str = "spiffe://clustermesh/cluster/";

/// What a certificate's holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A clustermesh-apiserver serving its cluster's Mesh API (server and client).
    Apiserver,
    /// A peer cluster's apiserver, importing this cluster's exports (client).
    Peer,
    /// A node agent of this cluster (client; carries its node name).
    NodeAgent,
    /// An operator or the `clustermesh` CLI (client).
    Admin,
    /// An etcd member (server and client).
    Etcd,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Apiserver,
        Role::Peer,
        Role::NodeAgent,
        Role::Admin,
        Role::Etcd,
    ];

    /// The URI segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apiserver => "apiserver",
            Self::Peer => "peer",
            Self::NodeAgent => "node-agent",
            Self::Admin => "admin",
            Self::Etcd => "etcd",
        }
    }

    /// Whether certificates of this role may serve TLS.
    pub fn is_server(self) -> bool {
        // Node agents serve their `/state` over mutual TLS to admins of their cluster.
        matches!(self, Self::Apiserver | Self::Etcd | Self::NodeAgent)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::Identity {
                reason: format!(
                    "unknown role {s:?} (expected one of apiserver, peer, node-agent, admin, etcd)"
                ),
            })
    }
}

/// Who holds a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MeshIdentity {
    /// The cluster the holder acts for.
    pub cluster: ClusterName,
    /// That cluster's ID.
    pub cluster_id: ClusterId,
    /// The holder's role.
    pub role: Role,
    /// The node, for node agents only.
    pub node: Option<NodeName>,
}

impl MeshIdentity {
    /// An identity without a node.
    pub fn new(cluster: ClusterName, cluster_id: ClusterId, role: Role) -> Self {
        Self {
            cluster,
            cluster_id,
            role,
            node: None,
        }
    }

    /// A node agent's identity.
    pub fn node_agent(cluster: ClusterName, cluster_id: ClusterId, node: NodeName) -> Self {
        Self {
            cluster,
            cluster_id,
            role: Role::NodeAgent,
            node: Some(node),
        }
    }

    /// The URI SAN text.
    pub fn to_uri(&self) -> String {
        let mut uri = format!(
            "{PREFIX}{}/id/{}/{}",
            self.cluster, self.cluster_id, self.role
        );
        if let Some(node) = &self.node {
            uri.push('/');
            uri.push_str(node.as_str());
        }
        uri
    }

    /// Parses the URI SAN text.
    pub fn from_uri(uri: &str) -> Result<Self> {
        let bad = |why: String| Error::Identity {
            reason: format!("{uri:?}: {why}"),
        };
        let rest = uri
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad(format!("does not start with {PREFIX}")))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (name, id, role, node) = match parts.as_slice() {
            [name, "id", id, role] => (*name, *id, *role, None),
            [name, "id", id, role, node] => (*name, *id, *role, Some(*node)),
            _ => return Err(bad("expected cluster/<name>/id/<id>/<role>[/<node>]".into())),
        };
        let cluster = ClusterName::new(name).map_err(|e| bad(e.to_string()))?;
        let cluster_id: ClusterId = id
            .parse()
            .map_err(|e: model::cluster::Error| bad(e.to_string()))?;
        let role: Role = role.parse()?;
        let node = node
            .map(NodeName::new)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        if (role == Role::NodeAgent) != node.is_some() {
            return Err(bad(
                "a node name is required for node agents and only for them".into(),
            ));
        }
        Ok(Self {
            cluster,
            cluster_id,
            role,
            node,
        })
    }

    /// Reads the identity from a DER certificate: exactly one URI SAN of our form.
    pub fn from_cert_der(der: &[u8]) -> Result<Self> {
        let info = CertInfo::from_der(der)?;
        let mut ours = info.uris.iter().filter(|u| u.starts_with(PREFIX));
        match (ours.next(), ours.next()) {
            (Some(uri), None) => Self::from_uri(uri),
            (None, _) => Err(Error::Identity {
                reason: format!(
                    "certificate {:?} carries no mesh identity URI",
                    info.subject
                ),
            }),
            (Some(_), Some(_)) => Err(Error::Identity {
                reason: format!(
                    "certificate {:?} carries more than one mesh identity",
                    info.subject
                ),
            }),
        }
    }
}

/// The URI segment that marks a node-agent issuer (instead of a role).
pub const NODE_AGENT_ISSUER: &str = "node-agent-issuer";

/// Who a node-agent issuer signs for: an intermediate CA under a cluster CA that verifiers
/// accept between a leaf and the cluster CA only when the leaf is a node agent of the same
/// cluster ([ADR 0022](../../docs/architecture/adr/0022-node-agent-enrollment.md)). It carries
/// one URI SAN `spiffe://clustermesh/cluster/<name>/id/<id>/node-agent-issuer`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IssuerIdentity {
    /// The cluster whose node agents it signs for.
    pub cluster: ClusterName,
    /// That cluster's ID.
    pub cluster_id: ClusterId,
}

impl IssuerIdentity {
    /// The URI SAN text.
    pub fn to_uri(&self) -> String {
        format!(
            "{PREFIX}{}/id/{}/{NODE_AGENT_ISSUER}",
            self.cluster, self.cluster_id
        )
    }

    /// Reads the issuer identity of a DER certificate: a CA with exactly one URI SAN of ours,
    /// the node-agent issuer's.
    pub fn from_cert_der(der: &[u8]) -> Result<Self> {
        let info = CertInfo::from_der(der)?;
        let bad = |why: String| Error::Identity {
            reason: format!("certificate {:?}: {why}", info.subject),
        };
        if !info.is_ca {
            return Err(bad("is not a CA".into()));
        }
        let ours: Vec<&String> = info.uris.iter().filter(|u| u.starts_with(PREFIX)).collect();
        let [uri] = ours.as_slice() else {
            return Err(bad("does not carry exactly one mesh URI".into()));
        };
        let rest = uri.strip_prefix(PREFIX).unwrap_or_default();
        let parts: Vec<&str> = rest.split('/').collect();
        let [name, "id", id, NODE_AGENT_ISSUER] = parts.as_slice() else {
            return Err(bad(format!("{uri:?} is not a node-agent issuer")));
        };
        Ok(Self {
            cluster: ClusterName::new(*name).map_err(|e| bad(e.to_string()))?,
            cluster_id: id
                .parse()
                .map_err(|e: model::cluster::Error| bad(e.to_string()))?,
        })
    }
}

impl fmt::Display for MeshIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of cluster {} (ID {})",
            self.role, self.cluster, self.cluster_id
        )?;
        if let Some(node) = &self.node {
            write!(f, " on node {node}")?;
        }
        Ok(())
    }
}

/// What `clustermesh certs status` shows of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject DN.
    pub subject: String,
    /// The issuer DN.
    pub issuer: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// URI SANs.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ips: Vec<std::net::IpAddr>,
    /// SHA-256 fingerprint of the DER.
    pub fingerprint: String,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| Error::Parse {
                reason: e.to_string(),
            })?;
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            ips.push(std::net::IpAddr::from(a));
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            ips.push(std::net::IpAddr::from(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            is_ca: cert.is_ca(),
            uris,
            dns_names,
            ips,
            fingerprint: crate::fingerprint(der),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn east() -> (ClusterName, ClusterId) {
        (
            ClusterName::new("east").unwrap(),
            ClusterId::new(1).unwrap(),
        )
    }

    #[test]
    fn identities_round_trip_through_their_uri() {
        let (c, id) = east();
        for role in [Role::Apiserver, Role::Peer, Role::Admin, Role::Etcd] {
            let m = MeshIdentity::new(c.clone(), id, role);
            assert_eq!(MeshIdentity::from_uri(&m.to_uri()).unwrap(), m);
        }
        let n = MeshIdentity::node_agent(c, id, NodeName::new("node-1").unwrap());
        assert_eq!(
            n.to_uri(),
            "spiffe://clustermesh/cluster/east/id/1/node-agent/node-1"
        );
        assert_eq!(MeshIdentity::from_uri(&n.to_uri()).unwrap(), n);
    }

    #[test]
    fn malformed_identity_uris_are_refused() {
        for uri in [
            "spiffe://other/cluster/east/id/1/apiserver",
            "spiffe://clustermesh/cluster/East/id/1/apiserver",
            "spiffe://clustermesh/cluster/east/id/0/apiserver",
            "spiffe://clustermesh/cluster/east/id/x/apiserver",
            "spiffe://clustermesh/cluster/east/id/1/king",
            "spiffe://clustermesh/cluster/east/id/1/node-agent",
            "spiffe://clustermesh/cluster/east/id/1/apiserver/node-1",
            "spiffe://clustermesh/cluster/east/1/apiserver",
        ] {
            assert!(MeshIdentity::from_uri(uri).is_err(), "{uri}");
        }
    }
}

/// Whether the certificate `leaf_der` carries a valid signature of the CA `ca_der` (validity
/// periods are not checked here).
pub fn issued_by(leaf_der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, ca))) = (
        x509_parser::certificate::X509Certificate::from_der(leaf_der),
        x509_parser::certificate::X509Certificate::from_der(ca_der),
    ) else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

#[cfg(test)]
mod issued_by_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::issue::{Ca, LeafSpec};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_leaf_is_issued_by_its_ca_only() {
        let name = ClusterName::new("east").unwrap();
        let ca = Ca::generate(&name, std::time::Duration::from_secs(86_400)).unwrap();
        let other = Ca::generate(&name, std::time::Duration::from_secs(86_400)).unwrap();
        let leaf = ca
            .issue(&LeafSpec::new(MeshIdentity::new(
                name.clone(),
                ClusterId::new(1).unwrap(),
                Role::Peer,
            )))
            .unwrap();
        assert!(issued_by(&der(&leaf.cert_pem), &der(ca.cert_pem())));
        assert!(!issued_by(&der(&leaf.cert_pem), &der(other.cert_pem())));
        assert!(!issued_by(b"garbage", &der(ca.cert_pem())));
    }
}
