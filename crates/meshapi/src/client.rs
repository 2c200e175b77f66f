//! Connecting to a Mesh API server: TCP to each endpoint in turn (names resolved at every
//! attempt), TLS with this side's client certificate, then a check that the server's
//! certificate names the cluster we meant to reach.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use certs::{MeshIdentity, Reloader, Role};
use hickory_resolver::net::NetError;
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
    /// Its channel (for the other services the apiserver serves on it, e.g. `Observer`).
    pub channel: Channel,
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
    /// No endpoint could be reached or completed the TLS handshake: what each attempt met.
    #[error("{}", attempts(.failed))]
    Unreachable {
        /// One entry per endpoint or address tried, in order.
        failed: Vec<Attempt>,
    },
    /// The server's certificate could not be read.
    #[error("{addr}: server certificate: {reason}")]
    ServerCertificate {
        /// The address that answered.
        addr: SocketAddr,
        /// Why (the parser's words; printed once, in this message).
        reason: String,
    },
    /// The server's certificate carries no mesh identity.
    #[error("{addr}: the server certificate carries no mesh identity: {reason}")]
    NoIdentity {
        /// The address that answered.
        addr: SocketAddr,
        /// Why (printed once, in this message).
        reason: String,
    },
    /// The server's certificate names another cluster or role.
    #[error(
        "{addr} presents the certificate of the {} of cluster {} (ID {}), not of cluster {expected}'s apiserver",
        .server.role, .server.cluster, .server.cluster_id
    )]
    WrongServer {
        /// The address that answered.
        addr: SocketAddr,
        /// Who its certificate says it is.
        server: MeshIdentity,
        /// The cluster meant.
        expected: ClusterName,
    },
}

/// One failed attempt to reach an endpoint or one of its addresses.
#[derive(Debug, thiserror::Error)]
pub enum Attempt {
    /// No endpoint is configured.
    #[error("no endpoints configured")]
    NoEndpoints,
    /// The endpoint is not `host:port`.
    #[error("{endpoint}: not host:port")]
    NotHostPort {
        /// The endpoint.
        endpoint: String,
    },
    /// Its host is not a valid server name.
    #[error("{endpoint}: invalid host name")]
    InvalidHost {
        /// The endpoint.
        endpoint: String,
    },
    /// Its name could not be resolved.
    #[error("{endpoint}")]
    Resolve {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: ResolveError,
    },
    /// TCP connect failed.
    #[error("{addr}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TCP connect took too long.
    #[error("{addr}: connect timed out")]
    ConnectTimeout {
        /// The address.
        addr: SocketAddr,
    },
    /// The TLS handshake failed.
    #[error("{addr}: TLS")]
    Tls {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake took too long.
    #[error("{addr}: TLS handshake timed out")]
    TlsTimeout {
        /// The address.
        addr: SocketAddr,
    },
    /// The gRPC channel could not be set up on the connection.
    #[error("{addr}")]
    Channel {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The port is not a number.
    #[error("invalid port {port:?}")]
    Port {
        /// What was given.
        port: String,
    },
    /// The system's resolver configuration is unusable.
    #[error("resolver configuration")]
    Config {
        /// Why.
        source: NetError,
    },
    /// The resolver could not be built.
    #[error("resolver")]
    Build {
        /// Why.
        source: NetError,
    },
    /// The lookup failed.
    #[error("cannot resolve {host}")]
    Lookup {
        /// The name.
        host: String,
        /// Why.
        source: NetError,
    },
    /// The name has no address.
    #[error("{host} has no addresses")]
    NoAddresses {
        /// The name.
        host: String,
    },
}

/// The attempts joined by `; `, each with its causes once.
fn attempts(failed: &[Attempt]) -> String {
    failed
        .iter()
        .map(|a| telemetry::chain(a).to_string())
        .collect::<Vec<_>>()
        .join("; ")
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
async fn resolve(host: &str, port: &str) -> Result<Vec<SocketAddr>, ResolveError> {
    let port: u16 = port.parse().map_err(|_| ResolveError::Port {
        port: port.to_owned(),
    })?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let resolver = hickory_resolver::Resolver::builder_tokio()
        .map_err(|source| ResolveError::Config { source })?
        .build()
        .map_err(|source| ResolveError::Build { source })?;
    let ips = resolver
        .lookup_ip(host)
        .await
        .map_err(|source| ResolveError::Lookup {
            host: host.to_owned(),
            source,
        })?;
    let addrs: Vec<_> = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
    if addrs.is_empty() {
        return Err(ResolveError::NoAddresses {
            host: host.to_owned(),
        });
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
            problems.push(Attempt::NotHostPort {
                endpoint: endpoint.clone(),
            });
            continue;
        };
        let Ok(server_name) = ServerName::try_from(host.to_owned()) else {
            problems.push(Attempt::InvalidHost {
                endpoint: endpoint.clone(),
            });
            continue;
        };
        let addrs = match resolve(host, port).await {
            Ok(a) => a,
            Err(source) => {
                problems.push(Attempt::Resolve {
                    endpoint: endpoint.clone(),
                    source,
                });
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
                Ok(Err(source)) => {
                    problems.push(Attempt::Connect { addr, source });
                    continue;
                }
                Err(_) => {
                    problems.push(Attempt::ConnectTimeout { addr });
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
                Ok(Err(source)) => {
                    problems.push(Attempt::Tls { addr, source });
                    continue;
                }
                Err(_) => {
                    problems.push(Attempt::TlsTimeout { addr });
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
            let info = certs::identity::CertInfo::from_der(&leaf).map_err(|e| {
                ConnectError::ServerCertificate {
                    addr,
                    reason: e.to_string(),
                }
            })?;
            let server =
                MeshIdentity::from_cert_der(&leaf).map_err(|e| ConnectError::NoIdentity {
                    addr,
                    reason: e.to_string(),
                })?;
            if server.role != Role::Apiserver || server.cluster != *expected {
                return Err(ConnectError::WrongServer {
                    addr,
                    server,
                    expected: expected.clone(),
                });
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
                .map_err(|source| ConnectError::Unreachable {
                    failed: vec![Attempt::Channel { addr, source }],
                })?;
            let client = MeshClient::new(channel.clone())
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            return Ok(Connected {
                client,
                channel,
                server,
                server_not_after_unix: info.not_after_unix,
                endpoint: endpoint.clone(),
            });
        }
    }
    if problems.is_empty() {
        problems.push(Attempt::NoEndpoints);
    }
    Err(ConnectError::Unreachable { failed: problems })
}
