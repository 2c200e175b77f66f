//! The protobuf encoding of the mesh model: the Mesh API wire format and the etcd value format.
//!
//! [`pb`] holds the generated messages; [`Codec`] turns model values into bytes and back.
//! Decoding validates everything the model validates, so bytes from a peer or from etcd become
//! a model value only if they are well formed. Must not do I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use model::{
    Affinity, Backend, BackendConditions, BackendPort, ClusterName, Endpoint, GlobalService,
    Identity, Label, Labels, Node, NodeName, NumericIdentity, PodRef, Protocol, ServiceName,
    ServicePort,
};
use prost::Message;

/// Generated protobuf messages, package `clustermesh.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod pb {
    tonic::include_proto!("clustermesh.v1");
}

/// Why bytes could not become a model value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a valid protobuf message.
    #[error("{message}: malformed protobuf")]
    Decode {
        /// The message type expected.
        message: &'static str,
        /// The decoder's error.
        source: prost::DecodeError,
    },
    /// A field holds a value the model refuses.
    #[error("{message}.{field}: {reason}")]
    Field {
        /// The message type.
        message: &'static str,
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn field(message: &'static str, field_name: &'static str) -> impl Fn(String) -> Error {
    move |reason| Error::Field {
        message,
        field: field_name,
        reason,
    }
}

/// A model value with a protobuf encoding.
pub trait Codec: model::Object + Sized {
    /// The protobuf message.
    type Message: prost::Message + Default;
    /// Model → message.
    fn to_message(&self) -> Self::Message;
    /// Message → model, validating.
    fn from_message(m: Self::Message) -> Result<Self>;

    /// Model → bytes.
    fn encode(&self) -> Vec<u8> {
        self.to_message().encode_to_vec()
    }

    /// Bytes → model, validating.
    fn decode(bytes: &[u8]) -> Result<Self> {
        let m = Self::Message::decode(bytes).map_err(|source| Error::Decode {
            message: std::any::type_name::<Self::Message>(),
            source,
        })?;
        Self::from_message(m)
    }
}

/// Encodes an address as 4 or 16 bytes.
pub fn ip_to_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Decodes 4 or 16 bytes into an address.
pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

fn ip(message: &'static str, f: &'static str, bytes: &[u8]) -> Result<IpAddr> {
    ip_from_bytes(bytes).ok_or_else(|| {
        field(message, f)(format!(
            "{} bytes is not an IPv4 or IPv6 address",
            bytes.len()
        ))
    })
}

fn cluster(message: &'static str, name: String) -> Result<ClusterName> {
    ClusterName::new(name).map_err(|e| field(message, "cluster")(e.to_string()))
}

fn port(message: &'static str, p: u32) -> Result<u16> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| field(message, "port")(format!("{p} is not a port number")))
}

fn protocol_to(p: Protocol) -> i32 {
    (match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    }) as i32
}

fn protocol_from(message: &'static str, p: i32) -> Result<Protocol> {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
        _ => Err(field(message, "protocol")(format!(
            "{p} is not a known protocol"
        ))),
    }
}

impl Codec for Identity {
    type Message = pb::Identity;

    fn to_message(&self) -> pb::Identity {
        pb::Identity {
            cluster: self.cluster.to_string(),
            id: self.id.get(),
            labels: self
                .labels
                .iter()
                .map(|l| pb::Label {
                    source: l.source,
                    key: l.key,
                    value: l.value,
                })
                .collect(),
        }
    }

    fn from_message(m: pb::Identity) -> Result<Self> {
        const M: &str = "Identity";
        let cluster = cluster(M, m.cluster)?;
        let id = NumericIdentity::new(m.id).map_err(|e| field(M, "id")(e.to_string()))?;
        let mut labels = Labels::new();
        for l in m.labels {
            let label = Label::new(l.source, l.key, l.value)
                .map_err(|e| field(M, "labels")(e.to_string()))?;
            if labels.get(&label.source, &label.key).is_some() {
                return Err(field(M, "labels")(format!(
                    "{}:{} is given twice",
                    label.source, label.key
                )));
            }
            labels.insert(label);
        }
        Ok(Identity {
            cluster,
            id,
            labels,
        })
    }
}

impl Codec for Endpoint {
    type Message = pb::Endpoint;

    fn to_message(&self) -> pb::Endpoint {
        let (pod_namespace, pod_name) = self
            .pod
            .as_ref()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .unwrap_or_default();
        let pod_uid = self.pod.as_ref().map(|p| p.uid.clone()).unwrap_or_default();
        pb::Endpoint {
            cluster: self.cluster.to_string(),
            ip: ip_to_bytes(&self.ip),
            identity: self.identity.get(),
            node: self.node.to_string(),
            pod_namespace,
            pod_name,
            pod_uid,
        }
    }

    fn from_message(m: pb::Endpoint) -> Result<Self> {
        const M: &str = "Endpoint";
        let pod = match (m.pod_namespace.is_empty(), m.pod_name.is_empty()) {
            (true, true) => None,
            (false, false) => Some(PodRef {
                namespace: m.pod_namespace,
                name: m.pod_name,
                uid: m.pod_uid,
            }),
            _ => {
                return Err(field(M, "pod_name")(
                    "pod namespace and name must be set together".into(),
                ));
            }
        };
        Ok(Endpoint {
            cluster: cluster(M, m.cluster)?,
            ip: ip(M, "ip", &m.ip)?,
            identity: NumericIdentity::new(m.identity)
                .map_err(|e| field(M, "identity")(e.to_string()))?,
            node: NodeName::new(m.node).map_err(|e| field(M, "node")(e.to_string()))?,
            pod,
        })
    }
}

impl Codec for GlobalService {
    type Message = pb::GlobalService;

    fn to_message(&self) -> pb::GlobalService {
        pb::GlobalService {
            cluster: self.cluster.to_string(),
            namespace: self.name.namespace().to_owned(),
            name: self.name.name().to_owned(),
            cluster_ips: self.cluster_ips.iter().map(ip_to_bytes).collect(),
            ports: self
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: protocol_to(p.protocol),
                })
                .collect(),
            backends: self
                .backends
                .iter()
                .map(|b| pb::Backend {
                    ip: ip_to_bytes(&b.ip),
                    ports: b
                        .ports
                        .iter()
                        .map(|p| pb::BackendPort {
                            name: p.name.clone(),
                            port: u32::from(p.port),
                            protocol: protocol_to(p.protocol),
                        })
                        .collect(),
                    ready: b.conditions.ready,
                    serving: b.conditions.serving,
                    terminating: b.conditions.terminating,
                    node: b.node.as_ref().map(ToString::to_string).unwrap_or_default(),
                    zone: b.zone.clone().unwrap_or_default(),
                })
                .collect(),
            shared: self.shared,
            affinity: (match self.affinity {
                Affinity::None => pb::Affinity::None,
                Affinity::Local => pb::Affinity::Local,
                Affinity::Remote => pb::Affinity::Remote,
            }) as i32,
            overprovisioning_pct: self.balancing.overprovisioning_pct,
            min_healthy_local: self.balancing.min_healthy_local,
            cluster_weights: self
                .balancing
                .cluster_weights
                .iter()
                .map(|(c, w)| (c.to_string(), *w))
                .collect(),
        }
    }

    fn from_message(m: pb::GlobalService) -> Result<Self> {
        const M: &str = "GlobalService";
        let name =
            ServiceName::new(m.namespace, m.name).map_err(|e| field(M, "name")(e.to_string()))?;
        let cluster_ips = m
            .cluster_ips
            .iter()
            .map(|b| ip(M, "cluster_ips", b))
            .collect::<Result<_>>()?;
        let ports = m
            .ports
            .into_iter()
            .map(|p| {
                Ok(ServicePort {
                    port: port("ServicePort", p.port)?,
                    protocol: protocol_from("ServicePort", p.protocol)?,
                    name: p.name,
                })
            })
            .collect::<Result<_>>()?;
        let backends = m
            .backends
            .into_iter()
            .map(|b| {
                const B: &str = "Backend";
                Ok(Backend {
                    ip: ip(B, "ip", &b.ip)?,
                    ports: b
                        .ports
                        .into_iter()
                        .map(|p| {
                            Ok(BackendPort {
                                port: port("BackendPort", p.port)?,
                                protocol: protocol_from("BackendPort", p.protocol)?,
                                name: p.name,
                            })
                        })
                        .collect::<Result<_>>()?,
                    conditions: BackendConditions {
                        ready: b.ready,
                        serving: b.serving,
                        terminating: b.terminating,
                    },
                    node: (!b.node.is_empty())
                        .then(|| NodeName::new(b.node))
                        .transpose()
                        .map_err(|e| field(B, "node")(e.to_string()))?,
                    zone: (!b.zone.is_empty()).then_some(b.zone),
                })
            })
            .collect::<Result<_>>()?;
        let affinity = match pb::Affinity::try_from(m.affinity) {
            Ok(pb::Affinity::None) => Affinity::None,
            Ok(pb::Affinity::Local) => Affinity::Local,
            Ok(pb::Affinity::Remote) => Affinity::Remote,
            _ => {
                return Err(field(M, "affinity")(format!(
                    "{} is not a known affinity",
                    m.affinity
                )));
            }
        };
        let cluster_weights = m
            .cluster_weights
            .into_iter()
            .map(|(c, w)| Ok((cluster(M, c)?, w)))
            .collect::<Result<_>>()?;
        let balancing = model::service::Balancing {
            overprovisioning_pct: if m.overprovisioning_pct == 0 {
                model::service::DEFAULT_OVERPROVISIONING_PCT
            } else {
                m.overprovisioning_pct
            },
            min_healthy_local: m.min_healthy_local,
            cluster_weights,
        };
        let mut svc = GlobalService {
            cluster: cluster(M, m.cluster)?,
            name,
            cluster_ips,
            ports,
            backends,
            shared: m.shared,
            affinity,
            balancing,
        };
        svc.normalize();
        svc.validate().map_err(|e| {
            let f = if matches!(e, model::service::Error::Balancing { .. }) {
                "balancing"
            } else {
                "backends"
            };
            field(M, f)(e.to_string())
        })?;
        Ok(svc)
    }
}

impl Codec for Node {
    type Message = pb::Node;

    fn to_message(&self) -> pb::Node {
        pb::Node {
            cluster: self.cluster.to_string(),
            name: self.name.to_string(),
            addresses: self.addresses.iter().map(ip_to_bytes).collect(),
            pod_cidrs: self
                .pod_cidrs
                .iter()
                .map(|c| pb::Cidr {
                    addr: ip_to_bytes(&c.network()),
                    prefix_len: u32::from(c.prefix_len()),
                })
                .collect(),
        }
    }

    fn from_message(m: pb::Node) -> Result<Self> {
        const M: &str = "Node";
        let pod_cidrs = m
            .pod_cidrs
            .iter()
            .map(|c| {
                let addr = ip(M, "pod_cidrs", &c.addr)?;
                let len = u8::try_from(c.prefix_len).unwrap_or(u8::MAX);
                let net = ipnet::IpNet::new(addr, len)
                    .map_err(|e| field(M, "pod_cidrs")(format!("{addr}/{}: {e}", c.prefix_len)))?;
                if net.network() != addr {
                    return Err(field(M, "pod_cidrs")(format!(
                        "{addr}/{} has host bits set",
                        c.prefix_len
                    )));
                }
                Ok(net)
            })
            .collect::<Result<_>>()?;
        Ok(Node {
            cluster: cluster(M, m.cluster)?,
            name: NodeName::new(m.name).map_err(|e| field(M, "name")(e.to_string()))?,
            addresses: m
                .addresses
                .iter()
                .map(|b| ip(M, "addresses", b))
                .collect::<Result<_>>()?,
            pod_cidrs,
        })
    }
}

/// A cluster's configuration record (`keys::cluster_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster's name.
    pub name: ClusterName,
    /// The cluster's ID.
    pub id: model::ClusterId,
    /// Features its apiserver offers.
    pub capabilities: Vec<String>,
}

impl ClusterConfig {
    /// Model → bytes.
    pub fn encode(&self) -> Vec<u8> {
        pb::ClusterConfig {
            name: self.name.to_string(),
            id: u32::from(self.id.get()),
            capabilities: self.capabilities.clone(),
        }
        .encode_to_vec()
    }

    /// Bytes → model, validating.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const M: &str = "ClusterConfig";
        let m = pb::ClusterConfig::decode(bytes)
            .map_err(|source| Error::Decode { message: M, source })?;
        Ok(Self {
            name: ClusterName::new(m.name).map_err(|e| field(M, "name")(e.to_string()))?,
            id: model::ClusterId::new(u64::from(m.id))
                .map_err(|e| field(M, "id")(e.to_string()))?,
            capabilities: m.capabilities,
        })
    }
}

#[cfg(test)]
mod tests;
