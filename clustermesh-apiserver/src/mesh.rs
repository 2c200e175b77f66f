//! The Mesh API's server side (served to peers and to this cluster's node agents, from this
//! apiserver's watch cache, grants and Nodes) and the importer (this cluster's client of its
//! peers' Mesh APIs). The protocol is `crates/wire`'s `mesh.proto`, the client side
//! `crates/meshapi`.

pub mod cache;
pub mod grants;
pub use meshapi::client;
pub mod importer;
pub mod nodes;
pub mod policy_stream;
pub mod relay;
pub mod server;
