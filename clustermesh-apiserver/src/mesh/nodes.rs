//! Which Kubernetes Nodes exist: a node agent's certificate names its node, and the Mesh API
//! admits it only while a Node of that name exists
//! ([ADR 0020](../../../docs/architecture/adr/0020-node-agents-bound-to-nodes.md)).
//!
//! Every replica follows the Nodes (each one serves the Mesh API). Only a confirmed deletion
//! (a watch event, or a complete re-list without the Node) removes a name: a list that fails
//! or breaks off midway, or a broken watch, keeps the last good set and says so. Until the
//! first complete list, no node agent is admitted.
//!
//! Must not decide anything else about a node agent (what it may see is the server's
//! `View::Local`), and must not write to Kubernetes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::watcher;
use model::NodeName;
use telemetry::metrics::Registry;
use tokio::sync::watch;

use crate::metrics as m;

/// The names of the Nodes that exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nodes(pub BTreeSet<String>);

/// The current Nodes; `None` until they were listed completely once.
pub type Receiver = watch::Receiver<Option<Arc<Nodes>>>;

impl Nodes {
    /// Whether the agent of `node` may use the Mesh API.
    pub fn admits(&self, node: &NodeName) -> Result<(), String> {
        if self.0.contains(node.as_str()) {
            Ok(())
        } else {
            Err(format!(
                "node {node} is not a Node of this cluster (a node agent is admitted only while its Node exists)"
            ))
        }
    }
}

/// The Nodes as the watch events tell them; a re-list replaces the set only when complete.
#[derive(Debug, Default)]
pub struct Tracker {
    current: BTreeSet<String>,
    relisting: BTreeSet<String>,
    listed: bool,
}

impl Tracker {
    /// Applies one event; the complete set when it may have changed, `None` before the first
    /// complete list and while a re-list is under way.
    pub fn apply(&mut self, event: watcher::Event<Node>) -> Option<Nodes> {
        let name = |n: &Node| n.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Apply(n) => {
                self.current.insert(name(&n));
            }
            watcher::Event::Delete(n) => {
                self.current.remove(&name(&n));
            }
            watcher::Event::Init => {
                self.relisting.clear();
                return None;
            }
            watcher::Event::InitApply(n) => {
                self.relisting.insert(name(&n));
                return None;
            }
            watcher::Event::InitDone => {
                self.current = std::mem::take(&mut self.relisting);
                self.listed = true;
            }
        }
        self.listed.then(|| Nodes(self.current.clone()))
    }
}

/// Publishes `next` unless equal to the current set; logs the Nodes that came and went.
fn publish(tx: &watch::Sender<Option<Arc<Nodes>>>, next: Nodes) {
    tx.send_if_modified(|cur| {
        if cur.as_deref() == Some(&next) {
            return false;
        }
        if let Some(before) = cur.as_deref() {
            for gone in before.0.difference(&next.0) {
                tracing::info!(node = %gone, "Node deleted; its node agent's certificate is refused from now on");
            }
        } else {
            tracing::info!(nodes = next.0.len(), "Nodes listed; node agents of these Nodes are admitted");
        }
        *cur = Some(Arc::new(next.clone()));
        true
    });
}

/// Keeps `tx` equal to the Nodes of `api`. A failed list or a broken watch keeps the last good
/// set (counted as `clustermesh_errors_total{kind="nodes"}` and logged); only a deleted Node
/// leaves it.
pub async fn follow(api: Api<Node>, tx: watch::Sender<Option<Arc<Nodes>>>, metrics: Registry) {
    let mut tracker = Tracker::default();
    let mut failing = telemetry::backoff::Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(5),
        Duration::from_secs(30),
    );
    let stream = watcher(api, watcher::Config::default());
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(ev) => {
                failing.healthy();
                if let Some(nodes) = tracker.apply(ev) {
                    publish(&tx, nodes);
                }
            }
            Err(e) => {
                metrics.inc(m::ERRORS, &["nodes"]);
                tracing::warn!(
                    error = %e,
                    "listing or watching the Nodes failed; node agents are admitted by the last good list"
                );
                failing.wait().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn node(name: &str) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    }

    fn names(n: &Nodes) -> Vec<&str> {
        n.0.iter().map(String::as_str).collect()
    }

    #[test]
    fn only_a_complete_list_or_a_deletion_removes_a_node() {
        use watcher::Event::*;
        let mut t = Tracker::default();
        assert!(t.apply(Init).is_none());
        assert!(t.apply(InitApply(node("n1"))).is_none());
        assert!(t.apply(Apply(node("n2"))).is_none(), "not listed yet");
        assert_eq!(names(&t.apply(InitDone).unwrap()), ["n1"]);
        assert_eq!(names(&t.apply(Apply(node("n2"))).unwrap()), ["n1", "n2"]);
        // A re-list that breaks off midway (no InitDone) changes nothing.
        assert!(t.apply(Init).is_none());
        assert!(t.apply(InitApply(node("n2"))).is_none());
        assert_eq!(
            names(&t.apply(Apply(node("n3"))).unwrap()),
            ["n1", "n2", "n3"]
        );
        // A complete re-list replaces the set; a deletion removes one.
        assert!(t.apply(Init).is_none());
        assert!(t.apply(InitApply(node("n2"))).is_none());
        assert!(t.apply(InitApply(node("n3"))).is_none());
        assert_eq!(names(&t.apply(InitDone).unwrap()), ["n2", "n3"]);
        assert_eq!(names(&t.apply(Delete(node("n2"))).unwrap()), ["n3"]);
    }

    #[test]
    fn an_agent_is_admitted_only_for_a_listed_node() {
        let nodes = Nodes(["n1".to_owned()].into());
        assert!(nodes.admits(&NodeName::new("n1").unwrap()).is_ok());
        let e = nodes.admits(&NodeName::new("n9").unwrap()).unwrap_err();
        assert!(e.contains("n9"), "{e}");
    }
}
