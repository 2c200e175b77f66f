//! The mesh data model: what a cluster exports and what its peers import.
//!
//! This crate owns cluster names and IDs, the numeric identity encoding, label sets, endpoints,
//! global services and their backends, nodes, the parsing of the `service.cilium.io/*`
//! annotations, and the etcd key layout rules.
//!
//! It must stay pure: no I/O, no clocks, no randomness, no async. Everything here is a value
//! type with validated constructors, so that a value of a model type is always well formed.

pub mod annotations;
pub mod cluster;
pub mod endpoint;
pub mod enroll;
pub mod escape;
pub mod identity;
pub mod keys;
pub mod node;
pub mod node_state;
pub mod objects;
pub mod service;
pub mod status;

pub use cluster::{ClusterId, ClusterName};
pub use endpoint::{Endpoint, PodRef};
pub use identity::{Identity, Label, Labels, NumericIdentity};
pub use keys::{Kind, Scope};
pub use node::{Node, NodeName};
pub use service::{
    Affinity, Backend, BackendConditions, BackendPort, GlobalService, Protocol, ServiceName,
    ServicePort,
};

/// A model value that lives under its own key in the store and on the Mesh API.
///
/// Implemented by every exported kind; the key layout in [`keys`] builds keys from these.
pub trait Object {
    /// Which kind of object this is.
    const KIND: Kind;
    /// The cluster that owns (exported) this object.
    fn cluster(&self) -> &ClusterName;
    /// The object's name inside its cluster and kind; the last part of its key.
    fn object_name(&self) -> String;
}
