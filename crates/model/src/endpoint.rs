//! Endpoints: which identity an IP address carries, and where it runs.
//!
//! Must not resolve identities; it only records the mapping the exporter computed.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{ClusterName, NodeName, NumericIdentity};

/// `namespace/name` of the pod an endpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID (empty when the sender did not say): a node agent finds the pod's cgroup
    /// by it.
    #[serde(default)]
    pub uid: String,
}

/// An IP address of a workload and its security identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The cluster the workload runs in.
    pub cluster: ClusterName,
    /// The address.
    pub ip: IpAddr,
    /// The identity traffic from this address carries.
    pub identity: NumericIdentity,
    /// The node the workload runs on.
    pub node: NodeName,
    /// The pod, when the endpoint is a pod.
    pub pod: Option<PodRef>,
}

impl crate::Object for Endpoint {
    const KIND: crate::Kind = crate::Kind::Endpoints;
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
    fn object_name(&self) -> String {
        self.ip.to_string()
    }
}
