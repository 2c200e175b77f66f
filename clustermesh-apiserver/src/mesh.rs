//! The Mesh API (served to peers and to this cluster's node agents) and the importer (this
//! cluster's client of its peers' Mesh APIs).

pub mod cache;
pub mod grants;
pub use meshapi::client;
pub mod importer;
pub mod nodes;
pub mod policy_stream;
pub mod server;
