//! Names of the Kubernetes objects through which the mesh is installed and connected: the CA
//! Secret, the apiserver Service, the status ConfigMap, peer and grant Secrets. Shared by the
//! apiserver and the `clustermesh` CLI, so both agree on every name. Must not hold documents.

/// Secret holding the cluster's CA (`ca.crt`, `ca.key`), created when the mesh is installed.
pub const CA_SECRET: &str = "clustermesh-ca";
/// Service in front of the apiserver's Mesh API.
pub const APISERVER_SERVICE: &str = "clustermesh-apiserver";
/// Annotation on [`APISERVER_SERVICE`] listing the Mesh API endpoints peers should use
/// (`host:port`, comma-separated); overrides the Service's load-balancer address.
pub const MESH_ENDPOINTS_ANNOTATION: &str = "clustermesh.dev/mesh-endpoints";
/// Name of the Service port of the Mesh API.
pub const MESH_PORT_NAME: &str = "mesh";
/// ConfigMap the leading apiserver keeps its [`ClusterStatus`](crate::status::ClusterStatus) in (key [`STATUS_KEY`]).
pub const STATUS_CONFIGMAP: &str = "clustermesh-status";
/// Key of the status document in [`STATUS_CONFIGMAP`].
pub const STATUS_KEY: &str = "status.json";
/// Label on peer configuration Secrets; its value is the peer cluster's name.
pub const PEER_LABEL: &str = "clustermesh.dev/peer";
/// Name prefix of peer configuration Secrets (`clustermesh-peer-<peer>`).
pub const PEER_SECRET_PREFIX: &str = "clustermesh-peer-";
/// Keys of a peer configuration Secret (`cluster-id` is optional).
pub const PEER_SECRET_KEYS: [&str; 5] = ["endpoints", "ca.crt", "tls.crt", "tls.key", "cluster-id"];
/// Label on grant Secrets (in the serving cluster); its value is the peer cluster allowed to
/// import this cluster's exports.
pub const GRANT_LABEL: &str = "clustermesh.dev/grant";
/// Name prefix of grant Secrets (`clustermesh-grant-<peer>`).
pub const GRANT_SECRET_PREFIX: &str = "clustermesh-grant-";
/// Keys of a grant Secret: the peer's cluster ID, and the SHA-256 fingerprints (one per line,
/// `aa:bb:...`) of the client certificates issued to it that the Mesh API accepts.
pub const GRANT_SECRET_KEYS: [&str; 2] = ["cluster-id", "sha256"];

/// The name of the Secret granting `peer` access to this cluster's Mesh API.
pub fn grant_secret_name(peer: &str) -> String {
    format!("{GRANT_SECRET_PREFIX}{peer}")
}

/// The name of the Secret configuring `peer` (see [`PEER_SECRET_PREFIX`]).
pub fn peer_secret_name(peer: &str) -> String {
    format!("{PEER_SECRET_PREFIX}{peer}")
}
