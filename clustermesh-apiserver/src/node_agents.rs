//! The leader's view of its cluster's node agents, for the status document: every
//! `interval` it lists the Kubernetes Nodes and reads each node agent's `/state` at the node's
//! InternalIP over mutual TLS, presenting this apiserver's Mesh API certificate (role
//! `apiserver`, which the agents' state servers admit) and accepting only the certificate of
//! that node's agent ([ADR 0017](../../docs/architecture/adr/0017-node-agents-in-status.md)).
//!
//! Reads only: must not write to a node agent, to etcd or to Kubernetes. A failed list of the
//! Nodes keeps the last summary and says why (never "there are no nodes").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::ListParams;
use model::status::{NodeAgents, NodeProbe};
use model::{ClusterId, ClusterName, NodeName};

/// `/state` reads in flight at once.
const CONCURRENCY: usize = 32;
/// How long one agent may take to answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the summary is kept for the status document.
pub type Summary = Arc<Mutex<Option<NodeAgents>>>;

/// What the prober needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// This cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// The apiserver's Mesh API certificate, key and the cluster CA (read at every round, so
    /// rotated files are used).
    pub tls: certs::TlsFiles,
    /// The agents' `/state` port.
    pub port: u16,
    /// Time between rounds.
    pub interval: Duration,
}

/// Why a round could not read the agents at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Nodes could not be listed.
    #[error("list the Kubernetes Nodes")]
    ListNodes {
        /// Why.
        source: kube::Error,
    },
    /// A TLS file could not be read.
    #[error("read {path}")]
    Tls {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn read(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Tls {
        path: path.display().to_string(),
        source,
    })
}

/// `e` and its causes, each once, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `/state` address of `node`: its InternalIP and `port`.
fn state_addr(node: &Node, port: u16) -> Option<String> {
    let ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse::<std::net::IpAddr>()
        .ok()?;
    Some(std::net::SocketAddr::new(ip, port).to_string())
}

/// One round: every Node's agent read.
async fn round(config: &Config, nodes: &Api<Node>) -> Result<NodeAgents, Error> {
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::ListNodes { source })?;
    let (ca, cert, key) = (
        read(&config.tls.ca)?,
        read(&config.tls.cert)?,
        read(&config.tls.key)?,
    );
    let probes: Vec<NodeProbe> = futures::stream::iter(list.items)
        .map(|node| {
            let (ca, cert, key) = (&ca, &cert, &key);
            async move {
                let name = node.metadata.name.clone().unwrap_or_default();
                let result = match (NodeName::new(name.clone()), state_addr(&node, config.port)) {
                    (Err(e), _) => Err(format!("node name {name:?}: {e}")),
                    (_, None) => Err("the Node has no InternalIP address".to_owned()),
                    (Ok(node_name), Some(addr)) => meshapi::node_state::fetch_with_cert(
                        &addr,
                        &config.cluster,
                        config.cluster_id,
                        &node_name,
                        ca,
                        cert,
                        key,
                        FETCH_TIMEOUT,
                    )
                    .await
                    .map_err(|e| chain(&e)),
                };
                (name, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    Ok(NodeAgents::summarize(probes, now_unix()))
}

/// Reads every node agent each `config.interval` into `out`, until dropped.
pub async fn run(config: Config, client: kube::Client, out: Summary) {
    let nodes: Api<Node> = Api::all(client);
    let mut last_error: Option<String> = None;
    loop {
        let summary = match round(&config, &nodes).await {
            Ok(s) => {
                if last_error.take().is_some() {
                    tracing::info!("node agents read again");
                }
                s
            }
            Err(e) => {
                let text = chain(&e);
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!(error = %text, "could not read the node agents");
                }
                last_error = Some(text.clone());
                let previous = out.lock().ok().and_then(|g| g.clone());
                let mut s = previous.unwrap_or_else(|| NodeAgents::summarize(Vec::new(), 0));
                s.error = Some(text);
                s
            }
        };
        match out.lock() {
            Ok(mut g) => *g = Some(summary),
            Err(p) => *p.into_inner() = Some(summary),
        }
        tokio::time::sleep(config.interval).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_state_address_is_the_internal_ip_and_the_state_port() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "fd00::7"},
            ]},
        }))
        .unwrap();
        assert_eq!(state_addr(&node, 9882).as_deref(), Some("[fd00::7]:9882"));
        let bare: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "n2"}})).unwrap();
        assert_eq!(state_addr(&bare, 9882), None);
    }
}
