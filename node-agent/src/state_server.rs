//! `/state` over mutual TLS: what the node should have against what its maps hold, for the
//! admins and apiservers of this cluster only.
//!
//! `/state` lists every backend the node programs, including those of services the cluster does
//! not share with its peers, so it is not served on the open health port (which keeps
//! `/metrics`, `/healthz`, `/readyz`, and `/state` for loopback callers only). Here the caller
//! must present a certificate of this cluster's CA with role `admin` or `apiserver` and this
//! cluster's name and ID; the agent serves with its own node-agent certificate, which callers
//! verify by identity (`certs::identity_client_config`). Must not serve anything else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::{MeshIdentity, Reloader, Role};
use model::node_state::NodeState;
use model::{ClusterId, ClusterName};

/// What the server needs.
pub struct Config {
    /// This cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// The agent's certificate and the cluster CA.
    pub tls: Arc<Reloader>,
    /// The current state.
    pub state: Arc<dyn Fn() -> Result<NodeState, String> + Send + Sync>,
    /// One local pod's policy by UID (`/policy?pod=<uid>`); `None`: not served.
    pub policy: Option<PolicyFn>,
}

/// Reads one local pod's policy back from the kernel.
pub type PolicyFn = Arc<dyn Fn(&str) -> meshapi::node_state::PodPolicy + Send + Sync>;

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// Whether `id` may read this node's state.
pub fn may_read(id: &MeshIdentity, cluster: &ClusterName, cluster_id: ClusterId) -> bool {
    id.cluster == *cluster
        && id.cluster_id == cluster_id
        && matches!(id.role, Role::Admin | Role::Apiserver)
}

fn respond(code: u16, body: String, json: bool) -> http::Response<String> {
    let mut r = http::Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
    let ct = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    if let Ok(v) = http::HeaderValue::from_str(ct) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

/// Binds `addr` and serves until dropped; returns the bound address.
pub async fn spawn(addr: SocketAddr, config: Config) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let mut tls = config.tls.server_config();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let config = Arc::new(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let acceptor = acceptor.clone();
            let config = Arc::clone(&config);
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %peer, error = %e, "/state TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let caller = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| MeshIdentity::from_cert_der(leaf.as_ref()).ok());
                let allowed = caller
                    .as_ref()
                    .is_some_and(|id| may_read(id, &config.cluster, config.cluster_id));
                if !allowed {
                    tracing::warn!(client = %peer, caller = ?caller.as_ref().map(MeshIdentity::to_uri), "/state refused: not an admin or apiserver of this cluster");
                }
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let r = if !allowed {
                            respond(
                                403,
                                "forbidden: admins and apiservers of this cluster only\n".into(),
                                false,
                            )
                        } else if req.uri().path() == "/policy" {
                            let uid = req
                                .uri()
                                .query()
                                .unwrap_or_default()
                                .split('&')
                                .find_map(|kv| kv.strip_prefix("pod="))
                                .unwrap_or_default()
                                .to_owned();
                            match (&config.policy, uid.is_empty()) {
                                (None, _) => respond(404, "not found\n".into(), false),
                                (_, true) => respond(400, "missing ?pod=<uid>\n".into(), false),
                                (Some(f), false) => respond(
                                    200,
                                    serde_json::to_string_pretty(&f(&uid)).unwrap_or_default(),
                                    true,
                                ),
                            }
                        } else if req.uri().path() != "/state" {
                            respond(404, "not found\n".into(), false)
                        } else {
                            match (config.state)() {
                                Ok(s) => respond(
                                    200,
                                    serde_json::to_string_pretty(&s).unwrap_or_default(),
                                    true,
                                ),
                                Err(e) => respond(500, e, false),
                            }
                        };
                        async move {
                            Ok::<_, Infallible>(r.map(|b| {
                                http_body_util::Full::new(std::io::Cursor::new(b.into_bytes()))
                            }))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_admins_and_apiservers_of_this_cluster_read_state() {
        let east = ClusterName::new("east").unwrap();
        let id1 = ClusterId::new(1).unwrap();
        let id = |c: &str, n: u64, role| {
            MeshIdentity::new(
                ClusterName::new(c).unwrap(),
                ClusterId::new(n).unwrap(),
                role,
            )
        };
        assert!(may_read(&id("east", 1, Role::Admin), &east, id1));
        assert!(may_read(&id("east", 1, Role::Apiserver), &east, id1));
        assert!(!may_read(&id("east", 1, Role::Peer), &east, id1));
        assert!(!may_read(&id("west", 2, Role::Admin), &east, id1));
        assert!(!may_read(&id("east", 2, Role::Admin), &east, id1));
        let na = MeshIdentity::node_agent(east.clone(), id1, model::NodeName::new("n1").unwrap());
        assert!(!may_read(&na, &east, id1), "another node's agent");
    }
}
