//! Connecting to a Mesh API server: TCP to each endpoint in turn (names resolved at every
//! attempt), TLS with this side's client certificate, then a check that the server's
//! certificate names the cluster we meant to reach.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{MeshIdentity, Reloader, Role};
use hyper_util::rt::TokioIo;
use model::ClusterName;
use rustls_pki_types::ServerName;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint};
use wire::pb::mesh_client::MeshClient;

use crate::MAX_MESSAGE;

/// A connection to a peer's Mesh API.
#[derive(Debug)]
pub struct Connected {
    /// The gRPC client.
    pub client: MeshClient<Channel>,
    /// Who the server's certificate says it is.
    pub server: MeshIdentity,
    /// End of validity of the server's certificate (Unix seconds).
    pub server_not_after_unix: i64,
    /// The endpoint that answered.
    pub endpoint: String,
}

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No endpoint could be reached or completed the TLS handshake.
    #[error("{0}")]
    Unreachable(String),
    /// The server's certificate names another cluster or role.
    #[error("{0}")]
    Identity(String),
}

fn split_host(endpoint: &str) -> Option<(&str, &str)> {
    let endpoint = endpoint.trim().trim_start_matches("https://");
    if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port));
    }
    endpoint.rsplit_once(':')
}

/// The addresses of `host:port`: an IP address as is, a name through hickory-resolver with
/// the system's resolver configuration. A new resolver per attempt, so that a name is
/// re-resolved (no stale cache) after every failure.
async fn resolve(host: &str, port: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    let port: u16 = port.parse().map_err(|_| format!("invalid port {port:?}"))?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![std::net::SocketAddr::new(ip, port)]);
    }
    let resolver = hickory_resolver::Resolver::builder_tokio()
        .map_err(|e| format!("resolver configuration: {e}"))?
        .build()
        .map_err(|e| format!("resolver: {e}"))?;
    let ips = resolver
        .lookup_ip(host)
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let addrs: Vec<_> = ips
        .iter()
        .map(|ip| std::net::SocketAddr::new(ip, port))
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} has no addresses"));
    }
    Ok(addrs)
}

/// Connects to the first endpoint that completes a handshake and presents the certificate of
/// `expected`'s apiserver.
pub async fn connect(
    expected: &ClusterName,
    endpoints: &[String],
    tls: &Arc<Reloader>,
) -> Result<Connected, ConnectError> {
    let mut config = tls.client_config();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut problems = Vec::new();
    for endpoint in endpoints {
        let Some((host, port)) = split_host(endpoint) else {
            problems.push(format!("{endpoint}: not host:port"));
            continue;
        };
        let Ok(server_name) = ServerName::try_from(host.to_owned()) else {
            problems.push(format!("{endpoint}: invalid host name"));
            continue;
        };
        let addrs = match resolve(host, port).await {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!("{endpoint}: {e}"));
                continue;
            }
        };
        for addr in addrs {
            let tcp = match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    problems.push(format!("{addr}: {e}"));
                    continue;
                }
                Err(_) => {
                    problems.push(format!("{addr}: connect timed out"));
                    continue;
                }
            };
            let stream = match tokio::time::timeout(
                Duration::from_secs(10),
                connector.connect(server_name.clone(), tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    problems.push(format!("{addr}: TLS: {e}"));
                    continue;
                }
                Err(_) => {
                    problems.push(format!("{addr}: TLS handshake timed out"));
                    continue;
                }
            };
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default();
            let info = certs::identity::CertInfo::from_der(&leaf)
                .map_err(|e| ConnectError::Identity(format!("{addr}: server certificate: {e}")))?;
            let server = MeshIdentity::from_cert_der(&leaf).map_err(|e| {
                ConnectError::Identity(format!(
                    "{addr}: the server certificate carries no mesh identity: {e}"
                ))
            })?;
            if server.role != Role::Apiserver || server.cluster != *expected {
                return Err(ConnectError::Identity(format!(
                    "{addr} presents the certificate of the {} of cluster {} (ID {}), not of cluster {expected}'s apiserver",
                    server.role, server.cluster, server.cluster_id
                )));
            }
            // Hand the established stream to tonic; a later reconnect must go through here.
            let slot = Arc::new(Mutex::new(Some(stream)));
            let channel = Endpoint::from_static("http://mesh-peer")
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .connect_with_connector(tower::service_fn(move |_| {
                    let s = slot.lock().ok().and_then(|mut g| g.take());
                    async move {
                        s.map(TokioIo::new)
                            .ok_or_else(|| std::io::Error::other("connection closed; reconnecting"))
                    }
                }))
                .await
                .map_err(|e| ConnectError::Unreachable(format!("{addr}: {e}")))?;
            let client = MeshClient::new(channel)
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            return Ok(Connected {
                client,
                server,
                server_not_after_unix: info.not_after_unix,
                endpoint: endpoint.clone(),
            });
        }
    }
    if problems.is_empty() {
        problems.push("no endpoints configured".into());
    }
    Err(ConnectError::Unreachable(problems.join("; ")))
}
