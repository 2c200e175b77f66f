//! The node agent's `Observer` gRPC service over mutual TLS: this node's flows (the last ones
//! kept, then each new one with `follow`), for the admins and apiservers of this cluster only
//! (the apiserver relays them to `clustermesh observe`). Served with the agent's own node-agent
//! certificate, which callers verify by identity.
//!
//! Must not serve anything else, and must never slow the reader: a follower that cannot keep
//! up is told how many flows it missed (`lost` notice) instead of holding flows back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use certs::{MeshIdentity, Reloader};
use futures::Stream;
use model::{ClusterId, ClusterName};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wire::pb;
use wire::pb::observer_server::{Observer, ObserverServer};

use crate::flows::Store;

/// Streams at once (a bound on what callers can make the agent hold).
const MAX_STREAMS: usize = 64;
/// TLS handshakes in flight at once, and from one source address.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;

/// One handshake of a source address, given back when dropped.
struct SourceSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourceSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut c = counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = c.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: Arc::clone(counts),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct ObserveService {
    cluster: ClusterName,
    cluster_id: ClusterId,
    node: String,
    store: Arc<Store>,
    streams: Arc<tokio::sync::Semaphore>,
}

impl ObserveService {
    /// Serves `store`'s flows for node `node` of `cluster`.
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        node: String,
        store: Arc<Store>,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            node,
            store,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
        }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<MeshIdentity, Status> {
        let leaf = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = MeshIdentity::from_cert_der(leaf.as_ref()).map_err(|e| {
            Status::permission_denied(format!(
                "the client certificate carries no mesh identity: {e}"
            ))
        })?;
        if !crate::state_server::may_read(&id, &self.cluster, self.cluster_id) {
            tracing::warn!(caller = %id.to_uri(), "Observe refused: not an admin or apiserver of this cluster");
            return Err(Status::permission_denied(
                "flows are for the admins and apiservers of this cluster only",
            ));
        }
        Ok(id)
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<pb::ObserveResponse, Status>> + Send>>;

fn flow(f: &pb::Flow) -> pb::ObserveResponse {
    pb::ObserveResponse {
        what: Some(pb::observe_response::What::Flow(f.clone())),
    }
}

fn notice(node: &str, state: &str, message: String, lost: u64) -> pb::ObserveResponse {
    pb::ObserveResponse {
        what: Some(pb::observe_response::What::Notice(pb::ObserveNotice {
            node: node.to_owned(),
            state: state.to_owned(),
            message,
            lost,
        })),
    }
}

#[tonic::async_trait]
impl Observer for ObserveService {
    type ObserveStream = FlowStream;

    async fn observe(
        &self,
        request: Request<pb::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let caller = self.authorize(&request)?;
        let req = request.into_inner();
        meshapi::observe::validate(&req).map_err(Status::invalid_argument)?;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!("more than {MAX_STREAMS} Observe streams"))
        })?;
        tracing::debug!(caller = %caller.to_uri(), follow = req.follow, last = req.last, "Observe");
        let (backlog, upto, mut live) = self.store.backlog(&req);
        let (tx, rx) = mpsc::channel(256);
        let node = self.node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            for f in &backlog {
                if tx.send(Ok(flow(f))).await.is_err() {
                    return;
                }
            }
            let done = notice(
                &node,
                "backlog_complete",
                format!("{} kept flows", backlog.len()),
                0,
            );
            if tx.send(Ok(done)).await.is_err() || !req.follow {
                return;
            }
            loop {
                tokio::select! {
                    r = live.recv() => match r {
                        Ok((seq, f)) => {
                            if seq <= upto || !meshapi::observe::matches(&req, &f) {
                                continue;
                            }
                            if tx.send(Ok(flow(&f))).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let m = notice(&node, "lost", format!("this stream fell behind; {n} flows skipped"), n);
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Binds `addr` and serves `service` with the agent's certificate from `tls`; returns the
/// bound address.
pub async fn spawn(
    addr: SocketAddr,
    tls: Arc<Reloader>,
    service: ObserveService,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (conn_tx, conn_rx) = mpsc::channel(16);
    // Unauthenticated callers are bounded before the handshake: so many handshakes at once,
    // and fewer per source address (any pod can reach the node's address).
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                tracing::debug!(client = %peer, "Observe connection refused: too many handshakes");
                continue;
            };
            let Some(source) = SourceSlot::take(&per_source, peer.ip()) else {
                tracing::debug!(client = %peer, "Observe connection refused: too many handshakes from this source");
                continue;
            };
            let mut config = tls.server_config();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                let (_permit, _source) = (permit, source);
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(s)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(client = %peer, error = %e, "Observe TLS handshake refused");
                    }
                    Err(_) => {}
                }
            });
        }
    });
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(ObserverServer::new(service))
            .serve_with_incoming(ReceiverStream::new(conn_rx))
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the Observe server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_holds_a_bounded_number_of_handshakes() {
        let counts = Arc::default();
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        let mut held: Vec<SourceSlot> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .filter_map(|_| SourceSlot::take(&counts, a))
            .collect();
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_SOURCE);
        assert!(SourceSlot::take(&counts, a).is_none(), "one too many");
        assert!(
            SourceSlot::take(&counts, b).is_some(),
            "another source is not affected"
        );
        held.pop();
        assert!(
            SourceSlot::take(&counts, a).is_some(),
            "a slot given back is free again"
        );
        drop(held);
        assert!(
            counts.lock().map(|c| c.is_empty()).unwrap_or(false),
            "nothing kept for sources without a handshake"
        );
    }
}
