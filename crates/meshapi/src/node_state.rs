//! Client of a node agent's `/state` over mutual TLS: what a node programmed against what it
//! should have. Only admins and apiservers of the node's cluster are served; the agent is
//! verified by its mesh identity (`node-agent` of that node), not by its address.

use std::time::Duration;

use model::node_state::NodeState;
use model::{ClusterId, ClusterName, NodeName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent_tls::{AgentTls, Failure};

/// Why `/state` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS material is unusable.
    #[error("TLS material for {node}")]
    Tls {
        /// The node.
        node: String,
        /// Why.
        source: certs::Error,
    },
    /// Connecting, the handshake or the exchange failed.
    #[error("node agent at {addr}")]
    Io {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error(
        "node agent at {addr}: no answer within {}",
        telemetry::duration::format(*after)
    )]
    Timeout {
        /// Where.
        addr: String,
        /// The limit.
        after: std::time::Duration,
    },
    /// The agent answered with an error.
    #[error("node agent at {addr}: {status}: {body}")]
    Status {
        /// Where.
        addr: String,
        /// The status line.
        status: String,
        /// The body (bounded, escaped).
        body: String,
    },
    /// The document does not parse.
    #[error("node agent at {addr}: its answer")]
    Decode {
        /// Where.
        addr: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// Reads `/state` of the agent of `node` (cluster `cluster`, ID `cluster_id`) at `addr`,
/// presenting `cert_pem`/`key_pem` (an admin or apiserver certificate of that cluster) and
/// trusting `ca_pem`.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    addr: &str,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    node: &NodeName,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    timeout: Duration,
) -> Result<NodeState, Error> {
    fetch_with_cert(
        addr, cluster, cluster_id, node, ca_pem, cert_pem, key_pem, timeout,
    )
    .await
    .map(|(state, _)| state)
}

/// [`fetch`], and the validity of the certificate the agent presented.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_with_cert(
    addr: &str,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    node: &NodeName,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    timeout: Duration,
) -> Result<(NodeState, model::status::Validity), Error> {
    let (body, validity) = get(
        "/state", addr, cluster, cluster_id, node, ca_pem, cert_pem, key_pem, timeout,
    )
    .await?;
    serde_json::from_str(&body)
        .map(|state| (state, validity))
        .map_err(|source| Error::Decode {
            addr: addr.to_owned(),
            source,
        })
}

/// GET `path` from the agent of `node`: the body of a 200 and the validity of the agent's
/// certificate.
#[allow(clippy::too_many_arguments)]
async fn get(
    path: &str,
    addr: &str,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    node: &NodeName,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    timeout: Duration,
) -> Result<(String, model::status::Validity), Error> {
    let tls = AgentTls::new(cluster, cluster_id, node, ca_pem, cert_pem, key_pem);
    let io = |source| Error::Io {
        addr: addr.to_owned(),
        source,
    };
    let exchange = async {
        let mut tls = tls.connect(addr).await.map_err(|f| match f {
            Failure::Tls(source) => Error::Tls {
                node: node.to_string(),
                source,
            },
            Failure::Io(source) => io(source),
        })?;
        // The handshake verified the leaf; a date that does not parse reads as expired.
        let not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| certs::identity::CertInfo::from_der(leaf.as_ref()).ok())
            .map_or(
                model::status::Validity {
                    not_before_unix: 0,
                    not_after_unix: 0,
                },
                |i| model::status::Validity {
                    not_before_unix: i.not_before_unix,
                    not_after_unix: i.not_after_unix,
                },
            );
        tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: node-agent\r\n\r\n").as_bytes())
            .await
            .map_err(io)?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(io)?;
        Ok::<_, Error>((buf, not_after))
    };
    let (body, not_after) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout {
            addr: addr.to_owned(),
            after: timeout,
        })??;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or_default();
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        return Err(Error::Status {
            addr: addr.to_owned(),
            status: model::escape::bounded(status, 80),
            body: model::escape::bounded(body.trim(), 200),
        });
    }
    Ok((body.to_owned(), not_after))
}

/// One pod's network policy as its node programmed it (`/policy?pod=<uid>`), read back from
/// the kernel's maps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodPolicy {
    /// The pod's UID.
    pub pod_uid: String,
    /// Its identity as the node knows it (`None`: the node has no such pod).
    pub identity: Option<u32>,
    /// The pod's cgroups the kernel maps to it (0: its cgroup is not found yet).
    pub cgroups: usize,
    /// Default deny for ingress (a policy selects it).
    pub ingress_enforced: bool,
    /// Default deny for egress.
    pub egress_enforced: bool,
    /// What the maps hold for its identity, contiguous ports merged.
    pub entries: Vec<PolicyLine>,
}

/// One allow or deny of a pod's policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyLine {
    /// `ingress` or `egress`.
    pub direction: String,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The peer's identity (`None`: any peer).
    pub peer: Option<u32>,
    /// The peer's cluster, when known.
    pub peer_cluster: Option<String>,
    /// The peer's labels (`source:key=value`), when known.
    pub peer_labels: Vec<String>,
    /// `TCP` or `UDP`.
    pub proto: String,
    /// Inclusive port range.
    pub ports: (u16, u16),
    /// The policy that decided (`Kind namespace/name`).
    pub policy: Option<String>,
}

/// Reads the policy of pod `pod_uid` from the agent of `node` (see [`fetch`]).
#[allow(clippy::too_many_arguments)]
pub async fn fetch_policy(
    addr: &str,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    node: &NodeName,
    pod_uid: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    timeout: Duration,
) -> Result<PodPolicy, Error> {
    // A UID is hex digits and dashes: nothing to escape in the query.
    let uid: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit() || *c == '-')
        .collect();
    let path = format!("/policy?pod={uid}");
    let (body, _) = get(
        &path, addr, cluster, cluster_id, node, ca_pem, cert_pem, key_pem, timeout,
    )
    .await?;
    serde_json::from_str(&body).map_err(|source| Error::Decode {
        addr: addr.to_owned(),
        source,
    })
}
