//! A cross-cluster service map drawn from flow records: which workloads of which clusters talk
//! to which, through which services, how often, and with what verdict.
//!
//! The caller aggregates its flow records into [`Edge`]s ([`aggregate()`] adds up repeats) and
//! [`render()`] draws them as one self-contained HTML document with inline SVG:
//!
//! * each cluster is a labelled group of workload nodes; peers outside the mesh (empty cluster:
//!   `world`, `host`) form one more group, "outside the mesh";
//! * services are pill-shaped nodes (`svc namespace/name`) in a neutral column between the
//!   clusters, above the outside group; the clusters are stacked left and right of it, so a
//!   flow between two clusters through a service crosses no third cluster;
//! * an edge through a service is drawn source → service → destination (two segments of one
//!   colour and width), an edge without one source → destination; the width grows with the
//!   flow count (log scale, clamped), the colour says the verdict, the count is printed on the
//!   edge and a `<title>` tooltip spells the edge out.
//!
//! The layout is computed here, deterministically: the same edges, in any order, give the same
//! bytes. Every string taken from the input is escaped for HTML; the page loads nothing (no
//! scripts, fonts, styles or images from anywhere: a Content Security Policy of
//! `default-src 'none'` lets only its own inline style and script run, by hash) and works
//! without its script, which only highlights the edges of a hovered node and records
//! `data-ready`/`data-edges` on `<body>` for headless checks.
//!
//! What is drawn is machine-checkable: each node element carries
//! `data-node="<workload|service>:<cluster>/<namespace>/<name>"` (a service, which belongs to no
//! cluster, is `service:/<its name as given>`), each edge element `data-edge` (its index),
//! `data-source`, `data-destination` (`<cluster>/<namespace>/<name>`, empty when the flow
//! ended at the service), `data-service`, `data-verdict` and `data-count`.
//!
//! This crate must stay pure: no I/O, no clocks, no processes, no Kubernetes or Hubble client.
//! The caller reads flows and writes the page; the browser test (`tests/browser.rs`) is the
//! only thing here that runs a process.

mod graph;
mod html;
mod layout;
mod sha256;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

/// One aggregated edge of observed traffic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Edge {
    pub source: Workload,
    /// Where the flow went. Through a service, a destination with an empty `name` means that
    /// the flow ended at the service (e.g. `no_backend`): the edge then stops at the service.
    pub destination: Workload,
    /// The service called, `namespace/name`, when the flow went through a service frontend.
    pub service: Option<String>,
    /// "forwarded", "denied_by_policy", "denied_by_default", "no_backend" (other strings are
    /// drawn as unknown/grey).
    pub verdict: String,
    /// How many flows.
    pub count: u64,
}

/// One end of an edge, as the map shows it.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Workload {
    /// Cluster name; empty when unknown (outside the mesh, "world").
    pub cluster: String,
    /// Namespace; empty for non-pod peers.
    pub namespace: String,
    /// Workload name: the pod name with its ReplicaSet/StatefulSet hash suffix removed is NOT
    /// done here; the caller passes what to show (e.g. the `app` label or the pod name).
    /// "world" / "host" for non-pods.
    pub name: String,
}

/// Options of the drawing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The page's title and heading.
    pub title: String,
    /// shown under the title, e.g. "flows of the last 5m from east, west"
    pub subtitle: String,
}

/// Adds up edges that are the same (source, destination, service, verdict).
///
/// The result is sorted by that key, so equal inputs in any order give equal outputs; counts
/// saturate at `u64::MAX` instead of wrapping.
pub fn aggregate(edges: impl IntoIterator<Item = Edge>) -> Vec<Edge> {
    let mut sums: BTreeMap<(Workload, Workload, Option<String>, String), u64> = BTreeMap::new();
    for edge in edges {
        let sum = sums
            .entry((edge.source, edge.destination, edge.service, edge.verdict))
            .or_default();
        *sum = sum.saturating_add(edge.count);
    }
    sums.into_iter()
        .map(|((source, destination, service, verdict), count)| Edge {
            source,
            destination,
            service,
            verdict,
            count,
        })
        .collect()
}

/// The whole HTML document.
///
/// The edges are aggregated first ([`aggregate()`]), so repeated edges are drawn once with
/// their summed count and the input order does not matter. Without edges the page says
/// "no flows observed".
pub fn render(edges: &[Edge], options: &Options) -> String {
    let edges = aggregate(edges.iter().cloned());
    let graph = graph::Graph::new(&edges);
    let layout = layout::Layout::new(&graph);
    html::page(&graph, &layout, options)
}
