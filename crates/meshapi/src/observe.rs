//! Flow observation (`Observer` gRPC service): the filter every server applies, the checks on a
//! request, and the client side of a node agent's `Observer` (which the apiserver's relay
//! dials, presenting its Mesh API certificate and accepting only that node's agent).
//!
//! Must not decide who may observe (the servers do, from the caller's certificate).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::agent_tls::{AgentTls, Failure};
use hyper_util::rt::TokioIo;
use model::{ClusterId, ClusterName, NodeName};
use tonic::transport::{Channel, Endpoint};
use wire::pb;
use wire::pb::observer_client::ObserverClient;

/// The port every node agent serves `Observer` on (mutual TLS).
pub const NODE_AGENT_OBSERVE_PORT: u16 = 9883;
/// Longest filter string accepted.
const MAX_FILTER_LEN: usize = 512;
/// Most nodes one relay request may name.
const MAX_NODES: usize = 10_000;

/// Why a request is refused (`InvalidArgument`).
pub fn validate(req: &pb::ObserveRequest) -> Result<(), String> {
    let fields = [
        ("from_cluster", &req.from_cluster),
        ("to_cluster", &req.to_cluster),
        ("namespace", &req.namespace),
        ("pod", &req.pod),
        ("label", &req.label),
        ("service", &req.service),
        ("verdict", &req.verdict),
    ];
    for (name, v) in fields {
        if v.len() > MAX_FILTER_LEN {
            return Err(format!("{name}: longer than {MAX_FILTER_LEN} bytes"));
        }
    }
    if !req.verdict.is_empty() && !VERDICTS.contains(&req.verdict.as_str()) {
        return Err(format!(
            "verdict {:?}: expected one of {}",
            req.verdict,
            VERDICTS.join(", ")
        ));
    }
    if req.nodes.len() > MAX_NODES {
        return Err(format!("nodes: more than {MAX_NODES}"));
    }
    Ok(())
}

/// The verdicts a filter may name ("denied": both denied ones).
pub const VERDICTS: [&str; 5] = [
    "forwarded",
    "no_backend",
    "denied_by_policy",
    "denied_by_default",
    "denied",
];

fn peer_matches_pod(p: Option<&pb::FlowPeer>, pod: &str) -> bool {
    let Some(p) = p else { return false };
    if p.pod.is_empty() {
        return false;
    }
    match pod.split_once('/') {
        Some((ns, name)) => p.namespace == ns && p.pod == name,
        None => p.pod == pod,
    }
}

fn peer_has_label(p: Option<&pb::FlowPeer>, label: &str) -> bool {
    let Some(p) = p else { return false };
    p.labels.iter().any(|l| {
        // Labels are "key=value", keys possibly with a source prefix ("k8s:app=x").
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        let bare = k.split_once(':').map_or(k, |(_, rest)| rest);
        match label.split_once('=') {
            Some((lk, lv)) => (k == lk || bare == lk) && v == lv,
            None => k == label || bare == label,
        }
    })
}

/// Whether `f` passes every non-empty filter of `req` (and its `since`).
pub fn matches(req: &pb::ObserveRequest, f: &pb::Flow) -> bool {
    let src = f.source.as_ref();
    let dst = f.destination.as_ref();
    fn cluster(p: Option<&pb::FlowPeer>) -> &str {
        p.map_or("", |p| p.cluster.as_str())
    }
    fn namespace(p: Option<&pb::FlowPeer>) -> &str {
        p.map_or("", |p| p.namespace.as_str())
    }
    (req.since_unix_nanos == 0 || f.time_unix_nanos >= req.since_unix_nanos)
        && (req.from_cluster.is_empty() || cluster(src) == req.from_cluster)
        && (req.to_cluster.is_empty() || cluster(dst) == req.to_cluster)
        && (req.namespace.is_empty()
            || namespace(src) == req.namespace
            || namespace(dst) == req.namespace)
        && (req.pod.is_empty()
            || peer_matches_pod(src, &req.pod)
            || peer_matches_pod(dst, &req.pod))
        && (req.label.is_empty()
            || peer_has_label(src, &req.label)
            || peer_has_label(dst, &req.label))
        && (req.service.is_empty() || f.service == req.service)
        && (req.verdict.is_empty()
            || f.verdict == req.verdict
            || (req.verdict == "denied" && f.verdict.starts_with("denied")))
}

/// Why a node agent's `Observer` could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TLS material is unusable.
    #[error("TLS material for node {node}")]
    Tls {
        /// The node.
        node: String,
        /// Why.
        source: certs::Error,
    },
    /// Connecting or the handshake failed.
    #[error("node agent of {node} at {addr}")]
    Io {
        /// The node.
        node: String,
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("node agent of {node} at {addr}: no TLS session within {}", telemetry::duration::format(*after))]
    Timeout {
        /// The node.
        node: String,
        /// Where.
        addr: String,
        /// The limit.
        after: Duration,
    },
    /// The gRPC channel could not be set up.
    #[error("node agent of {node} at {addr}: gRPC channel")]
    Channel {
        /// The node.
        node: String,
        /// Where.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Dials the `Observer` of the agent of `node` (cluster `cluster`, ID `cluster_id`) at
/// `addr`, presenting `cert_pem`/`key_pem` and accepting only that node's agent certificate
/// from the CA `ca_pem`.
#[allow(clippy::too_many_arguments)]
pub async fn dial_agent(
    addr: &str,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    node: &NodeName,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    timeout: Duration,
) -> Result<ObserverClient<Channel>, DialError> {
    let tls = AgentTls {
        alpn: &[b"h2"],
        ..AgentTls::new(cluster, cluster_id, node, ca_pem, cert_pem, key_pem)
    };
    let handshake = async {
        tls.connect(addr).await.map_err(|f| match f {
            Failure::Tls(source) => DialError::Tls {
                node: node.to_string(),
                source,
            },
            Failure::Io(source) => DialError::Io {
                node: node.to_string(),
                addr: addr.to_owned(),
                source,
            },
        })
    };
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| DialError::Timeout {
            node: node.to_string(),
            addr: addr.to_owned(),
            after: timeout,
        })??;
    // One established stream for the channel; a reconnect dials again through here.
    let slot = Arc::new(Mutex::new(Some(stream)));
    let channel = Endpoint::from_static("http://node-agent")
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().ok().and_then(|mut g| g.take());
            async move {
                s.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("connection closed; dial again"))
            }
        }))
        .await
        .map_err(|source| DialError::Channel {
            node: node.to_string(),
            addr: addr.to_owned(),
            source,
        })?;
    Ok(ObserverClient::new(channel))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(cluster: &str, ns: &str, pod: &str, labels: &[&str]) -> pb::FlowPeer {
        pb::FlowPeer {
            cluster: cluster.into(),
            namespace: ns.into(),
            pod: pod.into(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn flow(verdict: &str) -> pb::Flow {
        pb::Flow {
            time_unix_nanos: 100,
            source: Some(peer("east", "rebel", "x-wing", &["k8s:app=x-wing"])),
            destination: Some(peer("west", "empire", "tie", &["app=tie"])),
            service: "rebel/rebel-base".into(),
            verdict: verdict.into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_filter_must_match() {
        let f = flow("denied_by_policy");
        let req = |edit: &dyn Fn(&mut pb::ObserveRequest)| {
            let mut r = pb::ObserveRequest::default();
            edit(&mut r);
            r
        };
        assert!(matches(&req(&|_| {}), &f));
        assert!(matches(&req(&|r| r.from_cluster = "east".into()), &f));
        assert!(!matches(&req(&|r| r.from_cluster = "west".into()), &f));
        assert!(matches(&req(&|r| r.to_cluster = "west".into()), &f));
        assert!(matches(&req(&|r| r.namespace = "empire".into()), &f));
        assert!(!matches(&req(&|r| r.namespace = "kube-system".into()), &f));
        assert!(matches(&req(&|r| r.pod = "rebel/x-wing".into()), &f));
        assert!(matches(&req(&|r| r.pod = "tie".into()), &f));
        assert!(!matches(&req(&|r| r.pod = "empire/x-wing".into()), &f));
        assert!(matches(&req(&|r| r.label = "app=x-wing".into()), &f));
        assert!(matches(&req(&|r| r.label = "k8s:app=x-wing".into()), &f));
        assert!(matches(&req(&|r| r.label = "app".into()), &f));
        assert!(!matches(&req(&|r| r.label = "app=y".into()), &f));
        assert!(matches(
            &req(&|r| r.service = "rebel/rebel-base".into()),
            &f
        ));
        assert!(!matches(&req(&|r| r.service = "rebel/other".into()), &f));
        assert!(matches(&req(&|r| r.verdict = "denied".into()), &f));
        assert!(!matches(
            &req(&|r| r.verdict = "denied".into()),
            &flow("forwarded")
        ));
        assert!(!matches(&req(&|r| r.verdict = "forwarded".into()), &f));
        assert!(matches(&req(&|r| r.since_unix_nanos = 100), &f));
        assert!(!matches(&req(&|r| r.since_unix_nanos = 101), &f));
        assert!(!matches(
            &req(&|r| {
                r.from_cluster = "east".into();
                r.verdict = "forwarded".into();
            }),
            &f
        ));
    }

    #[test]
    fn requests_are_bounded() {
        let mut r = pb::ObserveRequest::default();
        assert!(validate(&r).is_ok());
        r.verdict = "allowed".into();
        assert!(validate(&r).unwrap_err().contains("expected one of"));
        r.verdict = String::new();
        r.pod = "x".repeat(MAX_FILTER_LEN + 1);
        assert!(validate(&r).unwrap_err().starts_with("pod"));
    }
}
