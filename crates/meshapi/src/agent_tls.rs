//! A mutual-TLS session to one node agent, for the clients of its state and flow endpoints:
//! the agent is verified by its mesh identity (`node-agent` of exactly that node of that
//! cluster), never by its address.

use std::sync::Arc;

use certs::MeshIdentity;
use model::{ClusterId, ClusterName, NodeName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The agent's expected identity, our credentials and the protocols to offer.
pub struct AgentTls<'a> {
    /// The agent's cluster.
    pub cluster: &'a ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// The agent's node: only its certificate is accepted.
    pub node: &'a NodeName,
    /// The cluster's CA (PEM).
    pub ca_pem: &'a str,
    /// Our certificate (an admin's or an apiserver's of that cluster).
    pub cert_pem: &'a str,
    /// Its key.
    pub key_pem: &'a str,
    /// ALPN protocols to offer (`h2` for gRPC; none for HTTP/1).
    pub alpn: &'a [&'a [u8]],
}

impl std::fmt::Debug for AgentTls<'_> {
    // The key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("cluster", &self.cluster)
            .field("cluster_id", &self.cluster_id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Why no session was established.
#[derive(Debug)]
pub enum Failure {
    /// The TLS material is unusable.
    Tls(certs::Error),
    /// Connecting or the handshake failed.
    Io(std::io::Error),
}

impl<'a> AgentTls<'a> {
    /// The session to the agent of `node`, offering no ALPN protocol (HTTP/1).
    pub fn new(
        cluster: &'a ClusterName,
        cluster_id: ClusterId,
        node: &'a NodeName,
        ca_pem: &'a str,
        cert_pem: &'a str,
        key_pem: &'a str,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            node,
            ca_pem,
            cert_pem,
            key_pem,
            alpn: &[],
        }
    }

    /// Connects to `addr` and completes the handshake (no timeout: callers bound it together
    /// with what they do next).
    pub async fn connect(&self, addr: &str) -> Result<TlsStream<TcpStream>, Failure> {
        let expected =
            MeshIdentity::node_agent(self.cluster.clone(), self.cluster_id, self.node.clone());
        let mut config =
            certs::identity_client_config(self.ca_pem, self.cert_pem, self.key_pem, move |id| {
                *id == expected
            })
            .map_err(Failure::Tls)?;
        config.alpn_protocols = self.alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.map_err(Failure::Io)?;
        // The name is not checked (the identity is); it only has to be a valid one.
        let name = rustls_pki_types::ServerName::try_from("node-agent")
            .map_err(|e| Failure::Io(std::io::Error::other(e.to_string())))?;
        connector.connect(name, tcp).await.map_err(Failure::Io)
    }
}
