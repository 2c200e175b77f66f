//! `clustermesh observe`: the flows of one or more clusters — who talked to whom across the
//! mesh, through which service and backend, and what was refused and why — from each
//! cluster's apiserver, which relays its node agents' flows (`Observer` over mutual TLS with
//! a short-lived admin certificate). With `--follow` it keeps streaming, and across an
//! apiserver restart it reconnects, says so, and asks for the flows since the last one shown.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tokio::sync::mpsc;
use wire::pb;
use wire::pb::observe_response::What;
use wire::pb::observer_client::ObserverClient;

use crate::cluster::{Cluster, KubeArgs};
use crate::services::{AdminTls, admin_tls};

/// How flows are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FlowFormat {
    /// One line per flow, for people.
    Table,
    /// One JSON object per line (NDJSON), for scripts.
    Json,
}

/// Filters shared by `observe` and `map`.
#[derive(Debug, Clone, Args)]
pub(crate) struct FlowFilter {
    /// Only flows whose source is in this cluster.
    #[arg(long)]
    from_cluster: Option<String>,
    /// Only flows whose destination is in this cluster.
    #[arg(long)]
    to_cluster: Option<String>,
    /// Only flows with a pod of this namespace on either side.
    #[arg(long)]
    namespace: Option<String>,
    /// Only flows of this pod (`namespace/name` or `name`) on either side.
    #[arg(long)]
    pod: Option<String>,
    /// Only flows with an identity label (`key=value` or `key`) on either side.
    #[arg(long)]
    label: Option<String>,
    /// Only flows through this global service (`namespace/name`).
    #[arg(long)]
    service: Option<String>,
    /// Only flows with this verdict (`denied` = denied_by_policy or denied_by_default).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(meshapi::observe::VERDICTS))]
    verdict: Option<String>,
    /// Only the flows these nodes saw (repeatable; default every node).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Only flows of the last DURATION (e.g. 30s, 5m).
    #[arg(long, value_parser = telemetry::duration::parse)]
    since: Option<Duration>,
}

impl FlowFilter {
    fn request(&self, last: u32, follow: bool) -> pb::ObserveRequest {
        let since = self.since.map_or(0, |d| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            i64::try_from(now.saturating_sub(d).as_nanos())
                .unwrap_or(0)
                .max(1)
        });
        pb::ObserveRequest {
            from_cluster: self.from_cluster.clone().unwrap_or_default(),
            to_cluster: self.to_cluster.clone().unwrap_or_default(),
            namespace: self.namespace.clone().unwrap_or_default(),
            pod: self.pod.clone().unwrap_or_default(),
            label: self.label.clone().unwrap_or_default(),
            service: self.service.clone().unwrap_or_default(),
            verdict: self.verdict.clone().unwrap_or_default(),
            last,
            follow,
            since_unix_nanos: since,
            nodes: self.nodes.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct ObserveArgs {
    /// The clusters to observe (repeatable; default: the current context).
    #[arg(long = "context")]
    contexts: Vec<String>,
    #[command(flatten)]
    filter: FlowFilter,
    /// Keep streaming new flows (Ctrl-C ends).
    #[arg(short, long)]
    follow: bool,
    /// How many of the flows the nodes kept to show first (default 20; with --since, all
    /// of that period; with --follow and no --last, none).
    #[arg(long)]
    last: Option<u32>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: FlowFormat,
    #[command(flatten)]
    kube: KubeArgs,
}

/// What the streams of the clusters report.
enum Event {
    Flow(Box<pb::Flow>),
    Notice(String, pb::ObserveNotice),
    BacklogDone,
    /// A stream that is over for good (not following, or refused).
    Failed(String, anyhow::Error),
}

/// Opens `Observe` on the apiserver of `cluster`.
async fn open_stream(
    admin: &AdminTls,
    req: pb::ObserveRequest,
) -> Result<tonic::Streaming<pb::ObserveResponse>> {
    let connected = meshapi::client::connect(&admin.name, &admin.endpoints, &admin.tls)
        .await
        .with_context(|| {
            format!(
                "Mesh API of {} at {}",
                admin.name,
                admin.endpoints.join(",")
            )
        })?;
    let mut client = ObserverClient::new(connected.channel);
    let stream = client
        .observe(req)
        .await
        .map_err(|s| anyhow!("Observe at {}: {}: {}", admin.name, s.code(), s.message()))?;
    Ok(stream.into_inner())
}

/// Streams one cluster's flows into `tx`; with follow, reconnects after a break.
async fn stream_cluster(cluster: Cluster, mut req: pb::ObserveRequest, tx: mpsc::Sender<Event>) {
    let ctx = cluster.context.clone();
    let follow = req.follow;
    let admin = match admin_tls(&cluster, Duration::from_secs(24 * 3600)).await {
        Ok(a) => a,
        Err(e) => {
            let _ = tx.send(Event::BacklogDone).await;
            let _ = tx.send(Event::Failed(ctx, e)).await;
            return;
        }
    };
    let mut backlog_done = false;
    let mut last_seen = 0i64;
    let mut backoff = telemetry::backoff::Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(5),
        Duration::from_secs(30),
    );
    loop {
        let broke = match open_stream(&admin, req.clone()).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(pb::ObserveResponse {
                        what: Some(What::Flow(f)),
                    })) => {
                        last_seen = last_seen.max(f.time_unix_nanos);
                        if tx.send(Event::Flow(Box::new(f))).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(pb::ObserveResponse {
                        what: Some(What::Notice(n)),
                    })) => {
                        let ev = if n.state == "backlog_complete" && n.node.is_empty() {
                            if backlog_done {
                                continue;
                            }
                            backlog_done = true;
                            Event::BacklogDone
                        } else {
                            Event::Notice(ctx.clone(), n)
                        };
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break anyhow!("the apiserver ended the stream"),
                    Err(s) => break anyhow!("{}: {}", s.code(), s.message()),
                }
            },
            Err(e) => e,
        };
        if !backlog_done {
            backlog_done = true;
            let _ = tx.send(Event::BacklogDone).await;
        }
        if !follow {
            let _ = tx.send(Event::Failed(ctx, broke)).await;
            return;
        }
        let delay = Duration::from_millis(backoff.next_delay().as_millis() as u64);
        let msg = pb::ObserveNotice {
            node: String::new(),
            state: "reconnecting".into(),
            message: format!(
                "lost the apiserver's stream ({}); reconnecting in {}",
                crate::errors::render(&broke),
                telemetry::duration::format(delay)
            ),
            lost: 0,
        };
        if tx.send(Event::Notice(ctx.clone(), msg)).await.is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return,
        }
        // Again, from the last flow shown: the nodes' kept flows fill the gap.
        req.last = 0;
        req.since_unix_nanos = if last_seen > 0 {
            last_seen.saturating_add(1)
        } else {
            req.since_unix_nanos.max(1)
        };
    }
}

/// Starts streaming every context; the receiver and how many contexts there are.
async fn start(
    kube: &KubeArgs,
    contexts: &[String],
    req: &pb::ObserveRequest,
) -> Result<(mpsc::Receiver<Event>, usize)> {
    let mut clusters = Vec::new();
    if contexts.is_empty() {
        clusters.push(Cluster::open(kube, None).await?);
    }
    for c in contexts {
        clusters.push(Cluster::open(kube, Some(c)).await?);
    }
    let n = clusters.len();
    let (tx, rx) = mpsc::channel(4096);
    for c in clusters {
        tokio::spawn(stream_cluster(c, req.clone(), tx.clone()));
    }
    Ok((rx, n))
}

/// The flows the nodes of `contexts` kept that pass `filter` (no follow), oldest first.
pub(crate) async fn collect(
    kube: &KubeArgs,
    contexts: &[String],
    filter: &FlowFilter,
    last: u32,
) -> Result<Vec<pb::Flow>> {
    let req = filter.request(last, false);
    let (mut rx, _) = start(kube, contexts, &req).await?;
    let mut flows = Vec::new();
    let mut failures = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Flow(f) => flows.push(*f),
            Event::Notice(ctx, n) if n.state != "connected" => {
                eprintln!("{}", notice_line(&ctx, &n));
            }
            Event::Notice(..) | Event::BacklogDone => {}
            Event::Failed(ctx, e) => {
                if !e.to_string().contains("ended the stream") {
                    failures.push(format!("{ctx}: {}", crate::errors::render(&e)));
                }
            }
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    flows.sort_by_key(|f| f.time_unix_nanos);
    Ok(flows)
}

fn notice_line(ctx: &str, n: &pb::ObserveNotice) -> String {
    let who = if n.node.is_empty() {
        ctx.to_owned()
    } else {
        format!("{ctx}/{}", n.node)
    };
    let mut s = format!("observe: {who}: {}", n.state);
    if !n.message.is_empty() {
        s.push_str(": ");
        s.push_str(&n.message);
    }
    model::escape::bounded(&s, MAX_LINE)
}

/// Longest line shown (a peer's names are its choice: no screenful, no terminal escapes).
const MAX_LINE: usize = 4096;

/// Formats a time (Unix nanoseconds) as RFC 3339 UTC with milliseconds.
fn time_text(nanos: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// One end of a flow for people: `namespace/pod@cluster`, `host@cluster`, `world` or the
/// address.
pub(crate) fn peer_text(p: Option<&pb::FlowPeer>, with_port: bool) -> String {
    let Some(p) = p else {
        return "?".to_owned();
    };
    let port = if with_port && p.port != 0 {
        format!(":{}", p.port)
    } else {
        String::new()
    };
    let at = if p.cluster.is_empty() {
        String::new()
    } else {
        format!("@{}", p.cluster)
    };
    if !p.pod.is_empty() {
        format!("{}/{}{port}{at}", p.namespace, p.pod)
    } else if !p.node.is_empty() && p.labels.iter().any(|l| l.starts_with("reserved:")) {
        format!("node {}{at}", p.node)
    } else if p.identity == 1 {
        format!("host{at}")
    } else if p.identity == 2 {
        format!("world {}{port}", p.address)
    } else {
        format!("{}{port}{at}", p.address)
    }
}

/// One line per flow.
fn flow_line(f: &pb::Flow) -> String {
    let arrow = if f.direction == "ingress" {
        "⇢"
    } else {
        "→"
    };
    let mut via = String::new();
    if !f.service.is_empty() || !f.frontend.is_empty() {
        let name = if f.service.is_empty() {
            f.frontend.clone()
        } else {
            f.service.clone()
        };
        via = format!(" via svc {name}");
        if f.verdict != "no_backend" && !f.frontend.is_empty() {
            via.push_str(&format!(" tier {}", f.tier));
            if f.failed_over {
                via.push_str(" (failover)");
            }
            if f.suspect_backend {
                via.push_str(" (suspect backend)");
            }
        }
    }
    let mut s = format!(
        "{} {:<7} {} {arrow} {}{via} {} {}",
        time_text(f.time_unix_nanos),
        f.direction,
        peer_text(f.source.as_ref(), false),
        peer_text(f.destination.as_ref(), true),
        f.protocol,
        f.verdict.to_uppercase(),
    );
    if !f.reason.is_empty() {
        s.push_str(&format!(" ({})", f.reason));
    }
    s.push_str(&format!(" [{}]", f.node));
    // Pod names and namespaces of peers' endpoints reach here unchecked.
    model::escape::bounded(&s, MAX_LINE)
}

fn peer_json(p: Option<&pb::FlowPeer>) -> serde_json::Value {
    let Some(p) = p else {
        return serde_json::Value::Null;
    };
    serde_json::json!({
        "cluster": p.cluster,
        "clusterId": p.cluster_id,
        "identity": p.identity,
        "labels": p.labels,
        "namespace": p.namespace,
        "pod": p.pod,
        "address": p.address,
        "port": p.port,
        "node": p.node,
    })
}

/// A flow as JSON (the field names of the Observer API, camelCase).
pub(crate) fn flow_json(f: &pb::Flow) -> serde_json::Value {
    serde_json::json!({
        "time": time_text(f.time_unix_nanos),
        "timeUnixNanos": f.time_unix_nanos,
        "node": f.node,
        "cluster": f.cluster,
        "direction": f.direction,
        "source": peer_json(f.source.as_ref()),
        "destination": peer_json(f.destination.as_ref()),
        "protocol": f.protocol,
        "service": f.service,
        "frontend": f.frontend,
        "tier": f.tier,
        "failedOver": f.failed_over,
        "suspectBackend": f.suspect_backend,
        "verdict": f.verdict,
        "reason": f.reason,
        "policyEnforced": f.policy_enforced,
        "socketCookie": f.socket_cookie,
    })
}

fn print_flow(f: &pb::Flow, format: FlowFormat) {
    match format {
        FlowFormat::Table => println!("{}", flow_line(f)),
        FlowFormat::Json => println!("{}", flow_json(f)),
    }
}

pub(crate) async fn run(args: ObserveArgs) -> Result<std::process::ExitCode> {
    let last = match (args.last, args.filter.since, args.follow) {
        (Some(n), _, _) => n,
        (None, Some(_), _) => 0,
        (None, None, true) => 0,
        (None, None, false) => 20,
    };
    let mut req = args.filter.request(last, args.follow);
    if args.follow && last == 0 && req.since_unix_nanos == 0 {
        // From the moment the command started (2 s of margin for clocks): the flows that
        // happen while the streams are being set up come with the nodes' backlog.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_secs(2));
        req.since_unix_nanos = i64::try_from(now.as_nanos()).unwrap_or(1).max(1);
    }
    let (mut rx, clusters) = start(&args.kube, &args.contexts, &req).await?;
    // The backlog of every cluster, merged by time, then the live flows as they come.
    let mut backlog: Vec<pb::Flow> = Vec::new();
    let mut pending = clusters;
    let mut failed = 0usize;
    let mut broken = std::collections::BTreeSet::new();
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = &mut interrupted => break,
        };
        let Some(ev) = ev else { break };
        match ev {
            Event::Flow(f) if pending > 0 => backlog.push(*f),
            Event::Flow(f) => print_flow(&f, args.output),
            Event::Notice(ctx, n) => {
                // "connected" is news only after a break.
                let key = format!("{ctx}/{}", n.node);
                if n.state == "reconnecting" || n.state == "unreachable" {
                    broken.insert(key);
                } else if n.state == "connected" && !broken.remove(&key) {
                    continue;
                }
                eprintln!("{}", notice_line(&ctx, &n));
            }
            Event::BacklogDone => {
                pending = pending.saturating_sub(1);
                if pending == 0 {
                    backlog.sort_by_key(|f| f.time_unix_nanos);
                    let skip = if last > 0 {
                        backlog.len().saturating_sub(last as usize)
                    } else {
                        0
                    };
                    for f in backlog.drain(..).skip(skip) {
                        print_flow(&f, args.output);
                    }
                }
            }
            Event::Failed(ctx, e) => {
                if !e.to_string().contains("ended the stream") {
                    eprintln!("error: {ctx}: {}", crate::errors::render(&e));
                    failed += 1;
                }
            }
        }
    }
    Ok(if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(cluster: &str, ns: &str, pod: &str, identity: u32, port: u32) -> pb::FlowPeer {
        pb::FlowPeer {
            cluster: cluster.into(),
            namespace: ns.into(),
            pod: pod.into(),
            identity,
            address: "10.1.2.3".into(),
            port,
            ..Default::default()
        }
    }

    #[test]
    fn a_flow_line_names_both_pods_the_service_the_tier_and_the_verdict() {
        let f = pb::Flow {
            time_unix_nanos: 1_765_100_000_123_000_000,
            node: "east-node-1".into(),
            direction: "egress".into(),
            source: Some(peer("east", "rebel", "x-wing", 65_793, 0)),
            destination: Some(peer("west", "rebel", "rebel-base-1", 131_331, 8080)),
            protocol: "TCP".into(),
            service: "rebel/rebel-base".into(),
            frontend: "10.96.0.10:80".into(),
            tier: 1,
            failed_over: true,
            verdict: "forwarded".into(),
            ..Default::default()
        };
        let line = flow_line(&f);
        assert!(
            line.starts_with("2025-12-07T09:33:20.123Z egress "),
            "{line}"
        );
        assert!(line.contains("rebel/x-wing@east → rebel/rebel-base-1:8080@west via svc rebel/rebel-base tier 1 (failover) TCP FORWARDED [east-node-1]"), "{line}");
        let j = flow_json(&f);
        assert_eq!(j["destination"]["pod"], "rebel-base-1");
        assert_eq!(j["failedOver"], true);
    }

    /// A peer names its pods as it likes (nothing checks a peer endpoint's pod name): a
    /// name carrying terminal escapes or a newline is shown escaped, on one bounded line.
    #[test]
    fn a_peers_pod_name_cannot_drive_the_terminal() {
        let evil = "x\u{1b}]0;owned\u{7}\u{1b}[2J\r\nFORGED LINE\u{9b}31m";
        let f = pb::Flow {
            direction: "egress".into(),
            source: Some(peer("east", "rebel", "x-wing", 65_793, 0)),
            destination: Some(peer("west", evil, &evil.repeat(1_000), 131_331, 80)),
            verdict: "forwarded".into(),
            node: "east-node-1".into(),
            ..Default::default()
        };
        let line = flow_line(&f);
        let head: String = line.chars().take(200).collect();
        assert!(!line.chars().any(char::is_control), "{head:?}");
        assert!(line.contains("\\u{1b}[2J"), "{head}");
        // Escaped characters take up to 10 each; the cut is marked.
        assert!(
            line.len() < 10 * MAX_LINE && line.ends_with("more)"),
            "{} bytes",
            line.len()
        );
        let n = pb::ObserveNotice {
            node: "n1".into(),
            state: "reconnecting".into(),
            message: evil.into(),
            lost: 0,
        };
        let line = notice_line("east", &n);
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }

    #[test]
    fn world_and_host_ends_are_named_as_such() {
        assert_eq!(
            peer_text(Some(&peer("", "", "", 2, 443)), true),
            "world 10.1.2.3:443"
        );
        assert_eq!(
            peer_text(Some(&peer("east", "", "", 1, 0)), true),
            "host@east"
        );
    }
}

#[derive(Debug, Args)]
pub(crate) struct MapArgs {
    /// The clusters whose flows to draw (repeatable; default: the current context).
    #[arg(long = "context")]
    contexts: Vec<String>,
    #[command(flatten)]
    filter: FlowFilter,
    /// Where to write the page (`-`: standard output).
    #[arg(long, short = 'o')]
    output: std::path::PathBuf,
    /// Also draw flows from nodes themselves (the node agents' health probes, host-network
    /// pods), left out by default.
    #[arg(long)]
    include_nodes: bool,
    #[command(flatten)]
    kube: KubeArgs,
}

/// How the map names one end of a flow: its `app` label (the workload) or its pod name;
/// `world` outside the mesh, `host` for a node's own processes.
fn workload(p: Option<&pb::FlowPeer>) -> flowmap::Workload {
    let Some(p) = p else {
        return flowmap::Workload::default();
    };
    let app = p.labels.iter().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        let bare = k.split_once(':').map_or(k, |(_, rest)| rest);
        (bare == "app" || bare == "app.kubernetes.io/name").then(|| v.to_owned())
    });
    let name = if let Some(a) = app {
        a
    } else if !p.pod.is_empty() {
        p.pod.clone()
    } else if !p.node.is_empty() && p.labels.iter().any(|l| l.starts_with("reserved:")) {
        format!("node {}", p.node)
    } else if p.identity == 1 {
        "host".to_owned()
    } else if p.identity == 2 || p.cluster.is_empty() {
        "world".to_owned()
    } else {
        p.address.clone()
    };
    flowmap::Workload {
        cluster: if name == "world" {
            String::new()
        } else {
            p.cluster.clone()
        },
        namespace: p.namespace.clone(),
        name,
    }
}

/// The map's edges from `flows`: each connection once — at the caller's node (egress), or at
/// the receiver's (ingress) when the caller is no pod of an observed cluster (a pod elsewhere,
/// the world, a node's own process: no egress event of it is at hand).
pub(crate) fn edges(flows: &[pb::Flow], include_nodes: bool) -> Vec<flowmap::Edge> {
    let observed: std::collections::BTreeSet<&str> =
        flows.iter().map(|f| f.cluster.as_str()).collect();
    let from_node = |f: &pb::Flow| {
        f.source.as_ref().is_some_and(|s| {
            s.pod.is_empty()
                && s.labels
                    .iter()
                    .any(|l| l == "reserved:host" || l == "reserved:remote-node")
        })
    };
    let edges = flows.iter().filter_map(|f| {
        if !include_nodes && from_node(f) {
            return None;
        }
        // A pod of an observed cluster: its node recorded the connection at egress.
        let src_pod_observed = f
            .source
            .as_ref()
            .is_some_and(|s| !s.pod.is_empty() && observed.contains(s.cluster.as_str()));
        if f.direction == "ingress" && src_pod_observed {
            return None;
        }
        let destination = if f.verdict == "no_backend" {
            flowmap::Workload::default()
        } else {
            workload(f.destination.as_ref())
        };
        Some(flowmap::Edge {
            source: workload(f.source.as_ref()),
            destination,
            service: (!f.service.is_empty()).then(|| f.service.clone()),
            verdict: f.verdict.clone(),
            count: 1,
        })
    });
    flowmap::aggregate(edges)
}

pub(crate) async fn map(args: MapArgs) -> Result<std::process::ExitCode> {
    let mut filter = args.filter.clone();
    if filter.since.is_none() {
        filter.since = Some(Duration::from_secs(300));
    }
    let flows = collect(&args.kube, &args.contexts, &filter, 0).await?;
    let edges = edges(&flows, args.include_nodes);
    let clusters: std::collections::BTreeSet<&str> =
        flows.iter().map(|f| f.cluster.as_str()).collect();
    let since = telemetry::duration::format(filter.since.unwrap_or_default());
    let page = flowmap::render(
        &edges,
        &flowmap::Options {
            title: "cross-cluster flows".into(),
            subtitle: format!(
                "flows of the last {since} from {}",
                if clusters.is_empty() {
                    "no cluster".to_owned()
                } else {
                    clusters.into_iter().collect::<Vec<_>>().join(", ")
                }
            ),
        },
    );
    if args.output.as_os_str() == "-" {
        print!("{page}");
    } else {
        std::fs::write(&args.output, page)
            .with_context(|| format!("write {}", args.output.display()))?;
        eprintln!(
            "wrote {}: {} flows in {} edges",
            args.output.display(),
            flows.len(),
            edges.len()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod map_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(cluster: &str, pod: &str, app: &str, identity: u32) -> pb::FlowPeer {
        pb::FlowPeer {
            cluster: cluster.into(),
            namespace: if pod.is_empty() {
                String::new()
            } else {
                "rebel".into()
            },
            pod: pod.into(),
            identity,
            labels: if app.is_empty() {
                vec![]
            } else {
                vec![format!("k8s:app={app}")]
            },
            ..Default::default()
        }
    }

    fn flow(
        seen_by: &str,
        dir: &str,
        src: pb::FlowPeer,
        dst: pb::FlowPeer,
        verdict: &str,
    ) -> pb::Flow {
        pb::Flow {
            cluster: seen_by.into(),
            direction: dir.into(),
            source: Some(src),
            destination: Some(dst),
            service: "rebel/rebel-base".into(),
            verdict: verdict.into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_connection_counts_once_whoever_saw_it() {
        let x = peer("east", "x-wing-1", "x-wing", 70_000);
        let b = peer("west", "rebel-base-west-0", "rebel-base", 140_000);
        let flows = vec![
            // Seen at both ends: once.
            flow("east", "egress", x.clone(), b.clone(), "forwarded"),
            flow("west", "ingress", x.clone(), b.clone(), "forwarded"),
            flow("east", "egress", x.clone(), b.clone(), "forwarded"),
            // From the world into west: only west saw it.
            flow(
                "west",
                "ingress",
                peer("", "", "", 2),
                b.clone(),
                "forwarded",
            ),
            // Refused at the service.
            flow("east", "egress", x.clone(), b.clone(), "no_backend"),
            // A node agent's probe: left out unless asked for.
            flow(
                "west",
                "ingress",
                pb::FlowPeer {
                    cluster: "east".into(),
                    node: "east-node-1".into(),
                    labels: vec!["reserved:remote-node".into()],
                    ..Default::default()
                },
                b.clone(),
                "forwarded",
            ),
        ];
        assert_eq!(edges(&flows, true).len(), 4);
        let e = edges(&flows, false);
        let fwd = e
            .iter()
            .find(|e| e.verdict == "forwarded" && e.source.name == "x-wing")
            .unwrap();
        assert_eq!(fwd.count, 2);
        assert_eq!(fwd.destination.name, "rebel-base");
        assert_eq!(fwd.destination.cluster, "west");
        let world = e.iter().find(|e| e.source.name == "world").unwrap();
        assert_eq!((world.source.cluster.as_str(), world.count), ("", 1));
        let nb = e.iter().find(|e| e.verdict == "no_backend").unwrap();
        assert!(nb.destination.name.is_empty(), "stops at the service");
        assert_eq!(e.len(), 3);
    }
}
