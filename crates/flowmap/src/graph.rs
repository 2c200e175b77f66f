//! The aggregated edges as a graph: the nodes they name (workloads and services), the groups
//! those belong to, each edge's segments between nodes, and what the page shows of each (keys,
//! labels, verdict classes, widths). Owns no geometry and writes no markup.

use std::collections::BTreeMap;

use crate::{Edge, Workload};

/// Longest label kept on a node or group, in characters; the tooltip has the whole name.
pub(crate) const MAX_LABEL_CHARS: usize = 40;

/// What a node stands for. Ordered as the map lists them: workloads by (cluster, namespace,
/// name), then services by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Node {
    Workload(Workload),
    /// The service as the edges name it, `namespace/name`.
    Service(String),
}

/// A labelled group of nodes. Ordered as the map lists them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Group {
    /// The workloads of one cluster.
    Cluster(String),
    /// Every service node.
    Services,
    /// The workloads with an empty cluster: `world`, `host`, unknown peers.
    Outside,
}

/// How an edge's verdict is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Verdict {
    Forwarded,
    DeniedByPolicy,
    DeniedByDefault,
    NoBackend,
    /// Any other string.
    Unknown,
}

/// The edges with their nodes, ready to lay out.
#[derive(Debug)]
pub(crate) struct Graph<'a> {
    /// Aggregated and sorted ([`crate::aggregate`]).
    pub(crate) edges: &'a [Edge],
    /// Sorted, each once.
    pub(crate) nodes: Vec<Node>,
    /// Per edge, its segments as (from, to) indices into `nodes`: one without a service, two
    /// through a service (source → service → destination), one when the flow ended at the
    /// service.
    pub(crate) segments: Vec<Vec<(usize, usize)>>,
    /// Per node, the flows of the edges that start at it.
    pub(crate) flows_out: Vec<u64>,
    /// Per node, the flows of the edges that end at it (a service counts what went through it).
    pub(crate) flows_in: Vec<u64>,
}

impl<'a> Graph<'a> {
    /// `edges` must be aggregated, as [`crate::render`] does.
    pub(crate) fn new(edges: &'a [Edge]) -> Self {
        let mut index: BTreeMap<Node, usize> = BTreeMap::new();
        for edge in edges {
            for node in ends(edge).into_iter().flatten() {
                index.insert(node, 0);
            }
        }
        for (i, slot) in index.values_mut().enumerate() {
            *slot = i;
        }
        let nodes: Vec<Node> = index.keys().cloned().collect();
        let at = |node: Option<Node>| node.and_then(|n| index.get(&n).copied());

        let mut flows_out = vec![0u64; nodes.len()];
        let mut flows_in = vec![0u64; nodes.len()];
        let mut segments = Vec::with_capacity(edges.len());
        for edge in edges {
            let [source, service, destination] = ends(edge).map(at);
            let hops: Vec<usize> = [source, service, destination]
                .into_iter()
                .flatten()
                .collect();
            let segs: Vec<(usize, usize)> = hops.windows(2).map(|w| (w[0], w[1])).collect();
            if let Some(s) = source {
                flows_out[s] = flows_out[s].saturating_add(edge.count);
            }
            for &(_, to) in &segs {
                flows_in[to] = flows_in[to].saturating_add(edge.count);
            }
            segments.push(segs);
        }
        Graph {
            edges,
            nodes,
            segments,
            flows_out,
            flows_in,
        }
    }
}

/// The source, service and destination nodes of an edge; no destination when the flow ended at
/// the service.
fn ends(edge: &Edge) -> [Option<Node>; 3] {
    let service = edge.service.clone().map(Node::Service);
    let destination = if service.is_some() && edge.destination.name.is_empty() {
        None
    } else {
        Some(Node::Workload(edge.destination.clone()))
    };
    [
        Some(Node::Workload(edge.source.clone())),
        service,
        destination,
    ]
}

impl Node {
    /// The value of its `data-node` attribute: `workload:<cluster>/<namespace>/<name>`,
    /// `service:/<service>`.
    pub(crate) fn key(&self) -> String {
        match self {
            Node::Workload(w) => format!("workload:{}", workload_key(w)),
            Node::Service(s) => format!("service:/{s}"),
        }
    }

    pub(crate) fn group(&self) -> Group {
        match self {
            Node::Workload(w) if w.cluster.is_empty() => Group::Outside,
            Node::Workload(w) => Group::Cluster(w.cluster.clone()),
            Node::Service(_) => Group::Services,
        }
    }

    /// The text drawn in the node: its name, and the namespace of a workload that has one.
    /// Clipped to [`MAX_LABEL_CHARS`].
    pub(crate) fn lines(&self) -> (String, Option<String>) {
        match self {
            Node::Workload(w) => {
                let name = if w.name.is_empty() {
                    "(unknown)"
                } else {
                    &w.name
                };
                let namespace = (!w.namespace.is_empty())
                    .then(|| clip(&format!("ns {}", w.namespace), MAX_LABEL_CHARS));
                (clip(name, MAX_LABEL_CHARS), namespace)
            }
            Node::Service(s) => (clip(&format!("svc {s}"), MAX_LABEL_CHARS), None),
        }
    }

    /// The node's whole name, for tooltips.
    pub(crate) fn title(&self) -> String {
        match self {
            Node::Workload(w) => shown(w),
            Node::Service(s) => format!("svc {s}"),
        }
    }

    /// A peer outside the pods: `world`, `host` (no namespace).
    pub(crate) fn is_peer(&self) -> bool {
        matches!(self, Node::Workload(w) if w.namespace.is_empty())
    }
}

impl Group {
    /// The label drawn at the top of the group, clipped to [`MAX_LABEL_CHARS`]: (kind, name).
    pub(crate) fn label(&self) -> (&'static str, String) {
        match self {
            Group::Cluster(c) => ("cluster", clip(c, MAX_LABEL_CHARS)),
            Group::Services => ("services", String::new()),
            Group::Outside => ("outside the mesh", String::new()),
        }
    }

    /// Its CSS class.
    pub(crate) fn class(&self) -> &'static str {
        match self {
            Group::Cluster(_) => "cluster",
            Group::Services => "services",
            Group::Outside => "outside",
        }
    }
}

impl Verdict {
    pub(crate) fn of(verdict: &str) -> Self {
        match verdict {
            "forwarded" => Verdict::Forwarded,
            "denied_by_policy" => Verdict::DeniedByPolicy,
            "denied_by_default" => Verdict::DeniedByDefault,
            "no_backend" => Verdict::NoBackend,
            _ => Verdict::Unknown,
        }
    }

    /// Every verdict, in legend order.
    pub(crate) const ALL: [Verdict; 5] = [
        Verdict::Forwarded,
        Verdict::DeniedByPolicy,
        Verdict::DeniedByDefault,
        Verdict::NoBackend,
        Verdict::Unknown,
    ];

    /// The CSS class that colours its edges.
    pub(crate) fn class(self) -> &'static str {
        match self {
            Verdict::Forwarded => "verdict-forwarded",
            Verdict::DeniedByPolicy => "verdict-denied-by-policy",
            Verdict::DeniedByDefault => "verdict-denied-by-default",
            Verdict::NoBackend => "verdict-no-backend",
            Verdict::Unknown => "verdict-unknown",
        }
    }

    /// What the legend calls it.
    pub(crate) fn legend(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::DeniedByPolicy => "denied by policy",
            Verdict::DeniedByDefault => "denied by default",
            Verdict::NoBackend => "no backend",
            Verdict::Unknown => "other verdict",
        }
    }
}

/// `<cluster>/<namespace>/<name>`: a workload in `data-node`, `data-source`, `data-destination`.
pub(crate) fn workload_key(w: &Workload) -> String {
    format!("{}/{}/{}", w.cluster, w.namespace, w.name)
}

/// A workload as a tooltip names it: its non-empty parts joined by `/` (`east/rebel/client`,
/// `world`).
pub(crate) fn shown(w: &Workload) -> String {
    let name = if w.name.is_empty() {
        "(unknown)"
    } else {
        &w.name
    };
    let parts: Vec<&str> = [w.cluster.as_str(), w.namespace.as_str(), name]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    parts.join("/")
}

/// The tooltip of an edge: `src → dst via svc: N flows, verdict`.
pub(crate) fn edge_title(edge: &Edge) -> String {
    let flows = if edge.count == 1 { "flow" } else { "flows" };
    let source = shown(&edge.source);
    let count = edge.count;
    let verdict = &edge.verdict;
    match &edge.service {
        Some(service) if edge.destination.name.is_empty() => {
            format!("{source} → svc {service}: {count} {flows}, {verdict}")
        }
        Some(service) => {
            let destination = shown(&edge.destination);
            format!("{source} → {destination} via {service}: {count} {flows}, {verdict}")
        }
        None => {
            let destination = shown(&edge.destination);
            format!("{source} → {destination}: {count} {flows}, {verdict}")
        }
    }
}

/// The `data-destination` of an edge: empty when the flow ended at the service.
pub(crate) fn destination_key(edge: &Edge) -> String {
    if edge.service.is_some() && edge.destination.name.is_empty() {
        String::new()
    } else {
        workload_key(&edge.destination)
    }
}

/// The stroke width of an edge of `count` flows: 1.5 for one flow, +1.6 per tenfold, at most 9.
pub(crate) fn stroke_width(count: u64) -> f64 {
    let count = count.max(1) as f64;
    (1.5 + 1.6 * count.log10()).min(9.0)
}

/// `s` cut to `max` characters, a cut marked with `…`.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}
