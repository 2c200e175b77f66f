//! The node-agent enrollment exchange ([ADR 0022](../../../docs/architecture/adr/0022-node-agent-enrollment.md)):
//! a node agent sends a certificate signing request for its node with its projected
//! ServiceAccount token (`Authorization: Bearer`), over HTTPS to its apiserver, and gets a
//! short-lived node-agent certificate (chain) and the cluster's trust bundle. Shared by the
//! apiserver (serves it) and the node agent (asks). No I/O here.

use serde::{Deserialize, Serialize};

/// The path of the enrollment endpoint (`POST`, JSON).
pub const PATH: &str = "/v1/node-agent/certificate";
/// The port the apiserver serves enrollment on by default.
pub const PORT: u16 = 4241;
/// The audience node agents' projected tokens are made for, and the only one the apiserver
/// accepts: a token for it opens no Kubernetes API.
pub const AUDIENCE: &str = "clustermesh";
/// The largest request body the apiserver reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What a node agent asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The node it asks a certificate for (its Kubernetes Node name).
    pub node: String,
    /// A PKCS#10 request, PEM, signed with the key the certificate will be for.
    pub csr: String,
}

/// What it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The certificate and the issuer that signed it, PEM, leaf first.
    pub certificate: String,
    /// The cluster's trust bundle (the cluster CA), PEM.
    pub ca: String,
}

/// A refusal: the status code says which kind, `reason` is stable, `error` says why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Stable, for programs and metrics (`wrong-node`, `unauthenticated`, ...).
    pub reason: String,
    /// For people.
    pub error: String,
}
