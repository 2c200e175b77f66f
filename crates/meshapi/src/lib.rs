//! The Mesh API's client side, shared by the apiserver's importer (a peer's client), the node
//! agent (its own apiserver's client) and the CLI. The protocol is `crates/wire`'s
//! `mesh.proto`; the server side is `clustermesh-apiserver/src/mesh/server.rs` (the rule is in
//! `docs/architecture/README.md`). Must not serve anything.

pub mod agent_tls;
pub mod client;
pub mod node_state;
pub mod observe;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
