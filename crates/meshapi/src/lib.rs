//! The Mesh API's client side, shared by the apiserver's importer (a peer's client) and the
//! node agent (its own apiserver's client).

pub mod client;
pub mod node_state;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
