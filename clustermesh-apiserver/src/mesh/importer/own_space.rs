//! This cluster's own address space (its exported nodes' addresses and pod CIDRs), followed
//! with one etcd watch for every peer: what a peer may never claim. Must not write etcd.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvstore::watch::{Event as KvEvent, Watcher};
use model::keys::{self, Kind, Scope};
use model::node::AddressSpace;
use telemetry::backoff::Backoff;
use tokio::sync::watch;
use wire::Codec;

use super::Context;
use crate::metrics as m;

/// This cluster's own address space, as [`follow_own_space`] publishes it: `None` until its
/// nodes have been listed.
pub(super) type OwnSpace = watch::Receiver<Option<Arc<AddressSpace>>>;

/// Follows this cluster's own exported nodes (`state/<own>/nodes/`, one watch for every peer)
/// and publishes their address space whenever it changes.
pub(super) async fn follow_own_space(ctx: Context, tx: watch::Sender<Option<Arc<AddressSpace>>>) {
    let prefix = keys::kind_prefix(Scope::State, &ctx.own, Kind::Nodes);
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        Duration::from_secs(10),
    );
    loop {
        let mut watcher = Watcher::new(&ctx.kv, prefix.clone());
        let mut nodes: BTreeMap<String, model::Node> = BTreeMap::new();
        let mut listed = false;
        loop {
            let event = match watcher.next().await {
                Ok(event) => event,
                Err(e) => {
                    // Only the first listing fails; later faults are retried inside the watcher.
                    tracing::warn!(error = %telemetry::chain(&e), "cannot list this cluster's own nodes; peers wait");
                    ctx.metrics.inc(m::ERRORS, &["etcd"]);
                    break;
                }
            };
            let name = |key: &str| key.strip_prefix(&prefix).unwrap_or(key).to_owned();
            match event {
                KvEvent::Init => nodes.clear(),
                KvEvent::InitApply(kv) | KvEvent::Apply(kv) => {
                    match model::Node::decode(&kv.value) {
                        Ok(node) => {
                            nodes.insert(name(&kv.key), node);
                        }
                        Err(e) => {
                            tracing::warn!(key = %kv.key, error = %telemetry::chain(&e), "an own node does not decode; its addresses are not known as this cluster's");
                            nodes.remove(&name(&kv.key));
                        }
                    }
                }
                KvEvent::InitDone { .. } => {
                    listed = true;
                    backoff.healthy();
                }
                KvEvent::Delete { key, .. } => {
                    nodes.remove(&name(&key));
                }
            }
            if listed {
                let space = AddressSpace::of(nodes.values());
                tx.send_if_modified(|held| {
                    let changed = held.as_deref() != Some(&space);
                    if changed {
                        *held = Some(Arc::new(space));
                    }
                    changed
                });
            }
        }
        backoff.wait().await;
    }
}

/// Resolves when `own` changes; never if its sender is gone.
pub(super) async fn own_changed(own: &mut OwnSpace) {
    if own.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
