//! `clustermesh check`: a ✔/✗ list, one line per check and a hint per failure, over what each
//! cluster's Kubernetes API holds (the leader's status document, the CA Secret, the peer
//! Secrets). Exit 0 when every check passes, 1 when one fails, 2 when a cluster cannot be
//! checked (kubeconfig or context missing, Kubernetes API unreachable).
//!
//! Gathering ([`observe`]) is the only I/O; [`evaluate`] is pure, so every line and exit code
//! is unit-tested. Must not change anything in a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use certs::identity::CertInfo;
use clap::Args;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::ListParams;
use model::objects::{CA_SECRET, PEER_LABEL, STATUS_CONFIGMAP, STATUS_KEY};
use model::status::{ApiserverPhase, ClusterStatus, Phase, STATUS_HEARTBEAT_SECS};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;

use crate::cluster::{Cluster, KubeArgs};
use crate::output::{self, Format};
use crate::versions;

/// How far ahead of this machine's clock a status timestamp may be.
pub(crate) const CLOCK_AHEAD_SECS: i64 = 5;
/// How far behind it may be: the status heartbeat and its slack
/// ([`model::status::status_is_current`]).
pub(crate) const CLOCK_BEHIND_SECS: i64 = STATUS_HEARTBEAT_SECS + 5;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    clustermesh check --context east --context west\n  \
    clustermesh check --context east --cert-warn-days 60\n  \
    clustermesh check --context east -o json | jq '.checks[] | select(.ok | not)'\n\n\
    Checks, per cluster: the apiserver is reporting (its status document is current), etcd\n\
    answers, a leader is elected and ready (else its phase: etcd-unreachable,\n\
    etcd-writes-failing, lease-lost, ..., and since when), every configured peer is connected\n\
    and in sync, every node agent is connected and programmed as desired, certificates (CA,\n\
    apiserver, peers, node agents) are valid for more than --cert-warn-days, the apiserver's\n\
    clock is within +5s/-15s of this machine's, no service is rejected by the exporter and no\n\
    peer object is refused by the importer; across clusters: no two clusters share a name or an ID,\n\
    and the apiservers run one version (their own and the one each peer reported).\n\n\
    Version skew: one build everywhere passes (✔); the same major version with minor releases at\n\
    most one apart (or other patch releases or commits, or an apiserver too old to report its\n\
    version) is a warning (⚠, exit code unchanged: upgrades roll through it); anything wider fails (✗).\n\n\
    Exit codes: 0 healthy (warnings included), 1 unhealthy, 2 cannot check (kubeconfig, context or\n\
    Kubernetes API).")]
pub(crate) struct CheckArgs {
    /// Kubeconfig contexts of the clusters to check; repeat for several (default: the current
    /// context).
    #[arg(long)]
    context: Vec<String>,
    /// A certificate valid for fewer days than this fails the check.
    #[arg(long, default_value_t = 30)]
    cert_warn_days: u32,
    /// How long each cluster's Kubernetes API may take to answer.
    #[arg(long, default_value = "20s", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// Output format (`table` is the ✔/✗ list).
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

/// What one cluster's Kubernetes API holds for the checks.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    /// The kubeconfig context.
    pub context: String,
    /// The status document, or why there is none (absent, unparsable).
    pub status: Result<ClusterStatus, String>,
    /// End of validity of the cluster CA, or why it is unknown.
    pub ca_not_after_unix: Result<i64, String>,
    /// Peer Secrets: peer name → end of validity of this cluster's client certificate in it.
    pub peer_secrets: BTreeMap<String, Option<i64>>,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Check {
    /// The cluster it is about (none for checks across clusters).
    pub cluster: Option<String>,
    /// What is checked: `apiserver`, `etcd`, `leader`, `peer`, `node-agents`, `certificates`,
    /// `clock`, `rejected-services`, `refused-peer-objects`, `cluster-identity`, `versions`.
    pub check: &'static str,
    /// Whether it passed (a warning passes).
    pub ok: bool,
    /// Whether it passed with a warning (⚠, with a hint): worth a look, not unhealthy.
    pub warning: bool,
    /// The line, without its mark.
    pub message: String,
    /// What to look at, when it failed.
    pub hint: Option<String>,
}

impl Check {
    fn pass(cluster: &str, check: &'static str, message: String) -> Self {
        Self {
            cluster: Some(cluster.to_owned()),
            check,
            ok: true,
            warning: false,
            message,
            hint: None,
        }
    }

    fn fail(cluster: &str, check: &'static str, message: String, hint: String) -> Self {
        Self {
            cluster: Some(cluster.to_owned()),
            check,
            ok: false,
            warning: false,
            message,
            hint: Some(hint),
        }
    }

    /// `✔ east: etcd answers`, `⚠ ...` for a warning (the hint, when any, on the next line).
    pub(crate) fn line(&self) -> String {
        let mark = match (self.ok, self.warning) {
            (false, _) => "✗",
            (true, true) => "⚠",
            (true, false) => "✔",
        };
        match &self.cluster {
            Some(c) => format!("{mark} {c}: {}", self.message),
            None => format!("{mark} {}", self.message),
        }
    }
}

/// How long ago `since` was: `9s`, `3m`, ...
/// What to do about an apiserver phase that is not ready, before its reason.
fn phase_hint(phase: ApiserverPhase) -> &'static str {
    match phase {
        ApiserverPhase::EtcdUnreachable => {
            "the apiserver cannot reach its etcd (exported state is kept, changes wait): check the network path to etcd and etcd's logs. "
        }
        ApiserverPhase::EtcdWritesFailing => {
            "etcd answers but refuses the exporter's writes (exported state is kept, changes wait): check etcd's space quota, alarms and logs. "
        }
        ApiserverPhase::LeaseLost => {
            "the apiserver's etcd session lease expired (peers see no heartbeat but keep its state): it is re-created as soon as etcd answers; check the path to etcd. "
        }
        ApiserverPhase::Standby => {
            "this replica does not lead: check the Lease kube-system/clustermesh-apiserver. "
        }
        ApiserverPhase::Starting | ApiserverPhase::Syncing | ApiserverPhase::Ready => "",
    }
}

fn span(since: i64, now: i64) -> String {
    let r = output::relative(since, now);
    r.strip_suffix(" ago").unwrap_or(&r).to_owned()
}

fn expiry(not_after: i64, now: i64) -> String {
    if not_after <= now {
        format!(
            "expired {} ({})",
            output::relative(not_after, now),
            crate::format_unix(not_after)
        )
    } else {
        format!(
            "expires {} ({})",
            output::relative(not_after, now),
            crate::format_unix(not_after)
        )
    }
}

/// The checks of one cluster whose status document is `s`.
fn cluster_checks(o: &Observed, s: &ClusterStatus, now: i64, warn_days: u32) -> Vec<Check> {
    let c = s.cluster.as_str();
    let mut out = Vec::new();
    let age = now - s.updated_unix;
    let current = model::status::status_is_current(s.updated_unix, now);
    // Reporting.
    if current {
        out.push(Check::pass(
            c,
            "apiserver",
            format!("apiserver {} reporting", s.replica),
        ));
    } else {
        out.push(Check::fail(
            c,
            "apiserver",
            format!("apiserver {} not reporting", s.replica),
            format!(
                "its status was last written {} (it is rewritten at least every {STATUS_HEARTBEAT_SECS}s): \
                 is clustermesh-apiserver running, and does a replica hold the leader Lease? \
                 kubectl --context {} -n kube-system logs deploy/clustermesh-apiserver",
                output::relative(s.updated_unix, now),
                o.context
            ),
        ));
    }
    // Clock.
    if age < -CLOCK_AHEAD_SECS {
        out.push(Check::fail(
            c,
            "clock",
            format!("clock more than {CLOCK_AHEAD_SECS}s ahead of this machine's"),
            format!(
                "the status was written {}s in this machine's future: synchronise the clocks (NTP) of the apiserver's node and of this machine",
                -age
            ),
        ));
    } else if age > CLOCK_BEHIND_SECS {
        out.push(Check::fail(
            c,
            "clock",
            format!("clock not confirmed within -{CLOCK_BEHIND_SECS}s of this machine's"),
            format!(
                "the status timestamp is {age}s old: either the apiserver stopped reporting (see above) or its clock is behind this machine's; compare `date -u` on both"
            ),
        ));
    } else {
        out.push(Check::pass(
            c,
            "clock",
            format!("clock within +{CLOCK_AHEAD_SECS}s/-{CLOCK_BEHIND_SECS}s of this machine's"),
        ));
    }
    if !current {
        // Nothing else a stale document says can be trusted.
        out.push(Check::fail(
            c,
            "status",
            "other checks skipped: the status is not current".into(),
            "fix the apiserver's reporting first, then check again".into(),
        ));
        return out;
    }
    // etcd.
    match &s.etcd {
        Some(e) if e.healthy => out.push(Check::pass(c, "etcd", "etcd answers".into())),
        Some(e) => out.push(Check::fail(
            c,
            "etcd",
            "etcd not answering".into(),
            format!(
                "the apiserver's probes have failed for {}: {}; exported state is kept meanwhile. Check etcd's process or pods and its logs",
                span(e.since_unix, now),
                e.error.as_deref().unwrap_or("no answer")
            ),
        )),
        None => out.push(Check::fail(
            c,
            "etcd",
            "etcd health not reported".into(),
            "the apiserver does not report etcd's health yet (just started, or an older version)".into(),
        )),
    }
    // Leader.
    if !s.leader {
        out.push(Check::fail(
            c,
            "leader",
            "no leader elected".into(),
            format!(
                "the status was written by {}, which does not lead: check the Lease kube-system/clustermesh-apiserver",
                s.replica
            ),
        ));
    } else if s.ready {
        out.push(Check::pass(
            c,
            "leader",
            format!("leader {} elected and ready", s.replica),
        ));
    } else {
        let reason = s.reason.as_deref().unwrap_or("no reason given");
        let (line, hint) = match (s.phase, s.phase_since_unix) {
            // The line without times, so that it is the same at every look; the hint says
            // since when.
            (Some(phase), Some(since)) => (
                format!("leader {} elected, {phase}", s.replica),
                format!(
                    "{phase} for {}: {}{reason}",
                    span(since, now),
                    phase_hint(phase)
                ),
            ),
            // An older apiserver: readiness and its reason only.
            _ => (
                format!("leader {} elected, not ready", s.replica),
                format!("not ready: {reason}"),
            ),
        };
        out.push(Check::fail(c, "leader", line, hint));
    }
    // Peers: those reported and those configured through Secrets.
    let mut names: BTreeSet<&str> = s.peers.iter().map(|p| p.name.as_str()).collect();
    names.extend(o.peer_secrets.keys().map(String::as_str));
    if names.is_empty() {
        out.push(Check::pass(c, "peer", "no peers configured".into()));
    }
    for name in &names {
        match s.peers.iter().find(|p| p.name == *name) {
            Some(p) if p.phase == Phase::Ready => out.push(Check::pass(
                c,
                "peer",
                format!("peer {name} connected and in sync"),
            )),
            Some(p) => out.push(Check::fail(
                c,
                "peer",
                format!("peer {name} {}", p.phase),
                format!(
                    "{} for {}{}; check the peer's apiserver (`clustermesh check --context <peer>`) and the network to {}",
                    p.phase,
                    span(p.since_unix, now),
                    p.last_error
                        .as_ref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default(),
                    p.endpoint.as_deref().unwrap_or("its endpoints")
                ),
            )),
            None => out.push(Check::fail(
                c,
                "peer",
                format!("peer {name} configured but not reported"),
                format!(
                    "Secret clustermesh-peer-{name} exists but the apiserver does not report the peer: is it run with --peers-from-secrets, and is the Secret valid (apiserver log)?"
                ),
            )),
        }
    }
    // Node agents.
    match &s.node_agents {
        None => out.push(Check::fail(
            c,
            "node-agents",
            "node agents not reported".into(),
            "the apiserver reads node agents only with a Mesh API certificate (--mesh-tls-dir), and needs a few seconds after it starts".into(),
        )),
        Some(a) if a.error.is_some() => out.push(Check::fail(
            c,
            "node-agents",
            "node agents could not be read".into(),
            a.error.clone().unwrap_or_default(),
        )),
        Some(a) if a.ready == a.nodes => {
            out.push(Check::pass(c, "node-agents", a.headline()));
        }
        Some(a) => {
            let hints: Vec<String> = a
                .not_ready
                .iter()
                .map(|p| format!("{} ({}): {}", p.node, p.phase, p.detail))
                .collect();
            out.push(Check::fail(
                c,
                "node-agents",
                a.headline(),
                format!(
                    "{}; `clustermesh services --context {} --node <node>` shows what a node programmed",
                    hints.join("; "),
                    o.context
                ),
            ));
        }
    }
    // Certificates.
    let limit = i64::from(warn_days) * 86_400;
    // (name, end of validity, how long before it to warn)
    let mut certs: Vec<(String, Result<i64, String>, i64)> = Vec::new();
    certs.push(("CA".into(), o.ca_not_after_unix.clone(), limit));
    if let Some(t) = s.serving_cert_not_after_unix {
        certs.push(("apiserver certificate".into(), Ok(t), limit));
    }
    for p in &s.peers {
        if let Some(t) = p.peer_cert_not_after_unix {
            certs.push((
                format!("peer {}'s server certificate", p.name),
                Ok(t),
                limit,
            ));
        }
    }
    for (peer, t) in &o.peer_secrets {
        certs.push((
            format!("client certificate for peer {peer}"),
            t.ok_or_else(|| format!("Secret clustermesh-peer-{peer} holds no tls.crt certificate")),
            limit,
        ));
    }
    if let Some(n) = s
        .node_agents
        .as_ref()
        .and_then(|a| a.earliest_cert.as_ref())
    {
        // Enrolled agents renew their own short-lived certificates: warned about once a
        // renewal is overdue, not for their whole life.
        certs.push((
            format!("node-agent certificate of {}", n.node),
            Ok(n.not_after_unix),
            n.warn_within(limit),
        ));
    }
    let bad: Vec<&(String, Result<i64, String>, i64)> = certs
        .iter()
        .filter(|(_, t, within)| t.as_ref().map_or(true, |t| t - now <= *within))
        .collect();
    if bad.is_empty() {
        out.push(Check::pass(
            c,
            "certificates",
            format!("certificates valid for more than {warn_days} days"),
        ));
    } else {
        let what: Vec<String> = bad
            .iter()
            .map(|(n, t, _)| match t {
                Ok(t) => format!("{n} {}", expiry(*t, now)),
                Err(e) => format!("{n}: {e}"),
            })
            .collect();
        let names: Vec<&str> = bad.iter().map(|(n, _, _)| n.as_str()).collect();
        out.push(Check::fail(
            c,
            "certificates",
            format!("certificates expiring within {warn_days} days: {}", names.join(", ")),
            format!(
                "{}; rotate with `clustermesh certs rotate` (peer certificates: `clustermesh connect` again)",
                what.join("; ")
            ),
        ));
    }
    // Rejected services.
    if s.rejected_services.is_empty() {
        out.push(Check::pass(
            c,
            "rejected-services",
            "no rejected services".into(),
        ));
    } else {
        let names: Vec<&str> = s
            .rejected_services
            .iter()
            .map(|r| r.service.as_str())
            .collect();
        let why: Vec<String> = s
            .rejected_services
            .iter()
            .map(|r| {
                format!(
                    "{} ({}): {}{}",
                    r.service,
                    r.reason,
                    r.message,
                    if r.kept_previous {
                        " [its last good export stays]"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        out.push(Check::fail(
            c,
            "rejected-services",
            format!("rejected services: {}", names.join(", ")),
            format!(
                "{}; each has a Warning Event (`kubectl --context {} describe service -n <namespace> <name>`)",
                why.join("; "),
                o.context
            ),
        ));
    }
    // Refused peer objects.
    let refusing: Vec<_> = s.peers.iter().filter(|p| p.refused_objects > 0).collect();
    if refusing.is_empty() {
        out.push(Check::pass(
            c,
            "refused-peer-objects",
            "no refused peer objects".into(),
        ));
    }
    for p in refusing {
        out.push(Check::fail(
            c,
            "refused-peer-objects",
            format!("peer {}: {} objects refused", p.name, p.refused_objects),
            format!(
                "{}; the rest of the peer is imported. Fix the objects in {}",
                p.last_error.as_deref().unwrap_or("see the apiserver's log"),
                p.name
            ),
        ));
    }
    out
}

/// Cluster names and IDs, as the checked clusters and their peers report them, that clash.
fn identity_checks(observed: &[Observed]) -> Vec<Check> {
    let mut ids_of: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    let mut names_of: BTreeMap<u16, BTreeSet<&str>> = BTreeMap::new();
    for s in observed.iter().filter_map(|o| o.status.as_ref().ok()) {
        ids_of.entry(&s.cluster).or_default().insert(s.cluster_id);
        names_of.entry(s.cluster_id).or_default().insert(&s.cluster);
        for p in &s.peers {
            if let Some(id) = p.cluster_id {
                ids_of.entry(&p.name).or_default().insert(id);
                names_of.entry(id).or_default().insert(&p.name);
            }
        }
    }
    let mut out = Vec::new();
    for (name, ids) in &ids_of {
        if ids.len() > 1 {
            let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
            out.push(Check {
                cluster: None,
                check: "cluster-identity",
                ok: false,
                warning: false,
                message: format!("cluster name {name} has several IDs: {}", ids.join(", ")),
                hint: Some(
                    "a cluster keeps one ID for life: find the cluster (or peer Secret) that reuses the name".into(),
                ),
            });
        }
    }
    for (id, names) in &names_of {
        if names.len() > 1 {
            let names: Vec<&str> = names.iter().copied().collect();
            out.push(Check {
                cluster: None,
                check: "cluster-identity",
                ok: false,
                warning: false,
                message: format!("cluster ID {id} claimed by {}", names.join(", ")),
                hint: Some(
                    "every cluster of a mesh needs its own ID (1..=4095): their identities would collide".into(),
                ),
            });
        }
    }
    if out.is_empty() {
        out.push(Check {
            cluster: None,
            check: "cluster-identity",
            ok: true,
            warning: false,
            message: "cluster names and IDs unique across the checked clusters and their peers"
                .into(),
            hint: None,
        });
    }
    out
}

/// Every check of `observed` at `now`.
pub(crate) fn evaluate(observed: &[Observed], now: i64, warn_days: u32) -> Vec<Check> {
    let mut out = Vec::new();
    for o in observed {
        match &o.status {
            Ok(s) => out.extend(cluster_checks(o, s, now, warn_days)),
            Err(e) => out.push(Check::fail(
                &o.context,
                "apiserver",
                "apiserver not reporting".into(),
                e.clone(),
            )),
        }
    }
    out.extend(identity_checks(observed));
    out.extend(version_check(observed));
    out
}

/// One line on the versions the clusters and their peers run ([`versions`] has the rule).
fn version_check(observed: &[Observed]) -> Option<Check> {
    let reporters: Vec<versions::Reporter<'_>> = observed
        .iter()
        .filter_map(|o| o.status.as_ref().ok())
        .map(|s| versions::Reporter {
            cluster: &s.cluster,
            version: s.version.as_deref(),
            peers: s
                .peers
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_deref()))
                .collect(),
        })
        .collect();
    let skew = versions::assess(&reporters)?;
    Some(Check {
        cluster: None,
        check: "versions",
        ok: skew.level != versions::Level::Unsupported,
        warning: skew.level == versions::Level::Minor,
        message: skew.message(),
        hint: skew.hint(),
    })
}

/// The ✔/✗ list, hints indented under their line.
pub(crate) fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        s.push_str(&c.line());
        s.push('\n');
        if let Some(h) = &c.hint {
            s.push_str(&format!("    hint: {h}\n"));
        }
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    let warned = checks.iter().filter(|c| c.ok && c.warning).count();
    if failed == 0 && warned > 0 {
        s.push_str(&format!(
            "all {} checks passed, {warned} with a warning\n",
            checks.len()
        ));
    } else if failed == 0 {
        s.push_str(&format!("all {} checks passed\n", checks.len()));
    } else {
        s.push_str(&format!("{failed} of {} checks failed\n", checks.len()));
    }
    s
}

/// 0 when every check passed, 1 otherwise.
pub(crate) fn exit_code(checks: &[Check]) -> u8 {
    u8::from(checks.iter().any(|c| !c.ok))
}

fn not_after(pem: &[u8]) -> Option<i64> {
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    CertInfo::from_der(der.as_ref())
        .ok()
        .map(|i| i.not_after_unix)
}

/// Reads what the checks need from one cluster; an error means it cannot be checked.
async fn observe(cluster: &Cluster) -> Result<Observed> {
    let unreachable = || {
        format!(
            "context {}: cannot reach the Kubernetes API",
            cluster.context
        )
    };
    let status = match cluster.api::<ConfigMap>().get_opt(STATUS_CONFIGMAP).await {
        Ok(None) => Err(format!(
            "no ConfigMap {}/{STATUS_CONFIGMAP}: is clustermesh-apiserver running and leading there?",
            cluster.namespace
        )),
        Ok(Some(cm)) => match cm.data.as_ref().and_then(|d| d.get(STATUS_KEY)) {
            None => Err(format!("ConfigMap {STATUS_CONFIGMAP} has no {STATUS_KEY}")),
            Some(json) => serde_json::from_str::<ClusterStatus>(json).map_err(|e| {
                format!("ConfigMap {STATUS_CONFIGMAP}: {STATUS_KEY} is not a status: {e}")
            }),
        },
        Err(e) => return Err(anyhow!(e)).with_context(unreachable),
    };
    let ca_not_after_unix = match cluster.api::<Secret>().get_opt(CA_SECRET).await {
        Ok(Some(s)) => s
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .and_then(|v| not_after(&v.0))
            .ok_or_else(|| format!("Secret {CA_SECRET} holds no ca.crt certificate")),
        Ok(None) => Err(format!("no Secret {}/{CA_SECRET}", cluster.namespace)),
        Err(e) => return Err(anyhow!(e)).with_context(unreachable),
    };
    let secrets = cluster
        .api::<Secret>()
        .list(&ListParams::default().labels(PEER_LABEL))
        .await
        .with_context(unreachable)?;
    let peer_secrets = secrets
        .items
        .iter()
        .filter_map(|s| {
            let peer = s.metadata.labels.as_ref()?.get(PEER_LABEL)?.clone();
            let cert = s
                .data
                .as_ref()
                .and_then(|d| d.get("tls.crt"))
                .and_then(|v| not_after(&v.0));
            Some((peer, cert))
        })
        .collect();
    Ok(Observed {
        context: cluster.context.clone(),
        status,
        ca_not_after_unix,
        peer_secrets,
    })
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    healthy: bool,
    checks: &'a [Check],
}

/// Runs the checks; `Err` only for what makes a cluster impossible to check (exit 2).
async fn gather(args: &CheckArgs) -> Result<Vec<Observed>> {
    let contexts: Vec<Option<String>> = if args.context.is_empty() {
        vec![None]
    } else {
        args.context.iter().cloned().map(Some).collect()
    };
    let mut observed = Vec::new();
    for c in &contexts {
        let cluster = Cluster::open(&args.kube, c.as_deref()).await?;
        let o = tokio::time::timeout(args.timeout, observe(&cluster))
            .await
            .map_err(|_| {
                anyhow!(
                    "context {}: the Kubernetes API did not answer within {:?}",
                    cluster.context,
                    args.timeout
                )
            })??;
        observed.push(o);
    }
    Ok(observed)
}

pub(crate) async fn run(args: CheckArgs) -> Result<std::process::ExitCode> {
    let observed = match gather(&args).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: cannot check: {e:#}");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    let checks = evaluate(&observed, output::now_unix(), args.cert_warn_days);
    let code = exit_code(&checks);
    let report = Report {
        healthy: code == 0,
        checks: &checks,
    };
    if !output::structured(args.output, &report)? {
        print!("{}", render(&checks));
    }
    Ok(std::process::ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::status::{
        AgentPhase, EtcdHealth, NodeAgentProblem, NodeAgents, NodeCert, PeerStatus, RejectedService,
    };

    const NOW: i64 = 1_800_000_000;
    const VERSION: &str = "0.4.1+0123456789ab";
    const YEAR: i64 = 365 * 86_400;

    fn peer(name: &str, id: u16, phase: Phase) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            cluster_id: Some(id),
            phase,
            since_unix: NOW - 60,
            last_error: None,
            last_error_unix: None,
            objects: BTreeMap::new(),
            revision: 1,
            peer_cert_not_after_unix: Some(NOW + YEAR),
            endpoint: Some("10.0.0.2:4240".into()),
            refused_objects: 0,
            version: Some(VERSION.into()),
        }
    }

    fn healthy(name: &str, id: u16, peer_name: &str, peer_id: u16) -> Observed {
        Observed {
            context: name.into(),
            status: Ok(ClusterStatus {
                cluster: name.into(),
                cluster_id: id,
                replica: format!("{name}-apiserver-0"),
                leader: true,
                ready: true,
                reason: None,
                phase: Some(ApiserverPhase::Ready),
                phase_since_unix: Some(NOW - 100),
                exported: BTreeMap::new(),
                peers: vec![peer(peer_name, peer_id, Phase::Ready)],
                updated_unix: NOW - 3,
                etcd: Some(EtcdHealth {
                    healthy: true,
                    since_unix: NOW - 100,
                    error: None,
                }),
                serving_cert_not_after_unix: Some(NOW + YEAR),
                rejected_services: Vec::new(),
                node_agents: Some(NodeAgents {
                    nodes: 2,
                    connected: 2,
                    ready: 2,
                    not_ready: Vec::new(),
                    earliest_cert: Some(NodeCert {
                        node: format!("{name}-node-1"),
                        not_after_unix: NOW + YEAR,
                        not_before_unix: None,
                    }),
                    error: None,
                    checked_unix: NOW - 1,
                }),
                version: Some(VERSION.into()),
            }),
            ca_not_after_unix: Ok(NOW + 10 * YEAR),
            peer_secrets: BTreeMap::from([(peer_name.to_owned(), Some(NOW + YEAR))]),
        }
    }

    fn mesh() -> Vec<Observed> {
        vec![healthy("east", 1, "west", 2), healthy("west", 2, "east", 1)]
    }

    fn status(o: &mut Observed) -> &mut ClusterStatus {
        o.status.as_mut().unwrap_or_else(|e| panic!("{e}"))
    }

    fn lines(checks: &[Check]) -> Vec<String> {
        checks.iter().map(Check::line).collect()
    }

    fn failed(checks: &[Check]) -> Vec<String> {
        checks.iter().filter(|c| !c.ok).map(Check::line).collect()
    }

    #[test]
    fn a_healthy_mesh_passes_every_check() {
        let checks = evaluate(&mesh(), NOW, 30);
        assert_eq!(
            lines(&checks)[..9],
            [
                "✔ east: apiserver east-apiserver-0 reporting",
                "✔ east: clock within +5s/-15s of this machine's",
                "✔ east: etcd answers",
                "✔ east: leader east-apiserver-0 elected and ready",
                "✔ east: peer west connected and in sync",
                "✔ east: 2/2 nodes connected and in sync",
                "✔ east: certificates valid for more than 30 days",
                "✔ east: no rejected services",
                "✔ east: no refused peer objects",
            ]
        );
        assert_eq!(
            lines(&checks)[18..],
            [
                "✔ cluster names and IDs unique across the checked clusters and their peers",
                "✔ one version across the clusters and their peers: 0.4.1 (commit 0123456789ab)",
            ]
        );
        assert_eq!(checks.len(), 20);
        assert_eq!(exit_code(&checks), 0);
        assert!(render(&checks).ends_with("all 20 checks passed\n"));
    }

    #[test]
    fn a_node_agent_down_is_named() {
        let mut m = mesh();
        let a = status(&mut m[0])
            .node_agents
            .as_mut()
            .unwrap_or_else(|| panic!());
        a.connected = 1;
        a.ready = 1;
        a.not_ready.push(NodeAgentProblem {
            node: "east-node-2".into(),
            phase: AgentPhase::Unreachable,
            detail: "node agent at 10.1.1.12:9882: connection refused".into(),
        });
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            ["✗ east: 1/2 nodes connected and in sync (east-node-2 unreachable)"]
        );
        let hint = checks.iter().find(|c| !c.ok).and_then(|c| c.hint.clone());
        assert!(hint.is_some_and(|h| h.starts_with(
            "east-node-2 (unreachable): node agent at 10.1.1.12:9882: connection refused"
        )),);
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn a_stopped_peer_apiserver_fails_its_own_checks_and_its_peers() {
        let mut m = mesh();
        status(&mut m[1]).updated_unix = NOW - 40;
        let s = status(&mut m[0]);
        s.peers[0].phase = Phase::Stale;
        s.peers[0].last_error = Some("watch stream: unavailable".into());
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ east: peer west stale",
                "✗ west: apiserver west-apiserver-0 not reporting",
                "✗ west: clock not confirmed within -15s of this machine's",
                "✗ west: other checks skipped: the status is not current",
            ]
        );
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn etcd_down_fails_etcd_and_readiness() {
        let mut m = mesh();
        let s = status(&mut m[0]);
        s.etcd = Some(EtcdHealth {
            healthy: false,
            since_unix: NOW - 12,
            error: Some("no answer within 3 s".into()),
        });
        s.ready = false;
        s.reason = Some("etcd unreachable for 12s".into());
        (s.phase, s.phase_since_unix) = (None, None);
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ east: etcd not answering",
                "✗ east: leader east-apiserver-0 elected, not ready",
            ],
            "an older apiserver, without a phase"
        );
        let s = status(&mut m[0]);
        s.phase = Some(ApiserverPhase::LeaseLost);
        s.phase_since_unix = Some(NOW - 45);
        s.reason = Some("session lease lost: keep-alive not answered".into());
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ east: etcd not answering",
                "✗ east: leader east-apiserver-0 elected, lease-lost",
            ]
        );
        let hint = checks
            .iter()
            .find(|c| c.check == "leader")
            .and_then(|c| c.hint.clone())
            .unwrap_or_default();
        assert!(
            hint.starts_with("lease-lost for 45s: the apiserver's etcd session lease expired")
                && hint.ends_with("session lease lost: keep-alive not answered"),
            "{hint}"
        );
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn certificates_expiring_within_the_limit_are_named() {
        let mut m = mesh();
        status(&mut m[0]).serving_cert_not_after_unix = Some(NOW + 10 * 86_400);
        m[0].peer_secrets.insert("west".into(), None);
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ east: certificates expiring within 30 days: apiserver certificate, client certificate for peer west"
            ]
        );
        let hint = checks.iter().find(|c| !c.ok).and_then(|c| c.hint.clone());
        assert!(
            hint.is_some_and(|h| h.starts_with("apiserver certificate expires in 10d (")),
            "the hint says when"
        );
        // The limit is the flag's.
        let checks = evaluate(&m[1..], NOW, 400);
        assert_eq!(
            failed(&checks),
            [
                "✗ west: certificates expiring within 400 days: apiserver certificate, peer east's server certificate, client certificate for peer east, node-agent certificate of west-node-1"
            ]
        );
    }

    /// An enrolled agent's day-long certificate, which it renews at two thirds of its life, is
    /// not "expiring within 30 days" for its whole life: only once its renewal is overdue
    /// (a quarter of its life left).
    #[test]
    fn a_self_renewing_node_certificate_is_named_only_once_its_renewal_is_overdue() {
        let day = 86_400;
        let mut m = mesh();
        let set = |m: &mut Vec<Observed>, left: i64| {
            let cert = status(&mut m[0])
                .node_agents
                .as_mut()
                .and_then(|a| a.earliest_cert.as_mut())
                .expect("a node certificate");
            cert.not_before_unix = Some(NOW + left - day);
            cert.not_after_unix = NOW + left;
        };
        set(&mut m, day - 3_600);
        assert!(
            failed(&evaluate(&m, NOW, 30)).is_empty(),
            "fresh, 23 h left"
        );
        set(&mut m, 8 * 3_600);
        assert!(failed(&evaluate(&m, NOW, 30)).is_empty(), "renewal due now");
        set(&mut m, 5 * 3_600);
        assert_eq!(
            failed(&evaluate(&m, NOW, 30)),
            ["✗ east: certificates expiring within 30 days: node-agent certificate of east-node-1"]
        );
    }

    #[test]
    fn clocks_ahead_fail_and_recent_timestamps_pass() {
        let mut m = mesh();
        status(&mut m[0]).updated_unix = NOW + 30;
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            ["✗ east: clock more than 5s ahead of this machine's"]
        );
        status(&mut m[0]).updated_unix = NOW + 4;
        assert_eq!(exit_code(&evaluate(&m, NOW, 30)), 0);
    }

    #[test]
    fn name_and_id_conflicts_across_contexts_are_found() {
        let mut m = mesh();
        m.push(healthy("north", 2, "east", 1));
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(failed(&checks), ["✗ cluster ID 2 claimed by north, west"]);
        let mut m = mesh();
        status(&mut m[1]).peers[0].cluster_id = Some(7);
        assert_eq!(
            failed(&evaluate(&m, NOW, 30)),
            ["✗ cluster name east has several IDs: 1, 7"]
        );
    }

    #[test]
    fn rejected_services_and_refused_peer_objects_are_listed() {
        let mut m = mesh();
        let s = status(&mut m[0]);
        s.rejected_services.push(RejectedService {
            service: "demo/bad".into(),
            reason: "InvalidAffinity".into(),
            message: "annotation service.cilium.io/affinity: \"sideways\"".into(),
            kept_previous: false,
        });
        s.peers[0].refused_objects = 2;
        s.peers[0].last_error = Some("peer west sent endpoint 10.9.0.1 ...: refused".into());
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ east: rejected services: demo/bad",
                "✗ east: peer west: 2 objects refused",
            ]
        );
    }

    #[test]
    fn a_missing_status_or_unreported_parts_fail() {
        let mut m = mesh();
        m[0].status = Err("no ConfigMap kube-system/clustermesh-status".into());
        status(&mut m[1]).node_agents = None;
        status(&mut m[1]).etcd = None;
        m[1].peer_secrets.insert("south".into(), Some(NOW + YEAR));
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ east: apiserver not reporting",
                "✗ west: etcd health not reported",
                "✗ west: peer south configured but not reported",
                "✗ west: node agents not reported",
            ]
        );
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn minor_version_skew_warns_and_stays_healthy() {
        let mut m = mesh();
        status(&mut m[1]).version = Some("0.5.0+fedcba987654".into());
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(failed(&checks), Vec::<String>::new());
        let text = render(&checks);
        assert!(
            text.ends_with(
                "⚠ version skew: 0.4.1 (commit 0123456789ab) on east; 0.5.0 (commit fedcba987654) on west\n    \
                 hint: minor skew, supported while an upgrade rolls from one cluster to the next: finish it so that every cluster runs one build (`clustermesh version`; `kubectl -n kube-system get deploy clustermesh-apiserver -o wide` shows the image)\n\
                 all 20 checks passed, 1 with a warning\n"
            ),
            "{text}"
        );
        assert_eq!(exit_code(&checks), 0);
    }

    #[test]
    fn a_peer_reporting_another_version_is_skew_even_when_only_one_cluster_is_checked() {
        let mut m = mesh();
        status(&mut m[0]).peers[0].version = Some("0.4.1+fedcba987654".into());
        let checks = evaluate(&m[..1], NOW, 30);
        assert_eq!(
            lines(&checks).last().map(String::as_str),
            Some(
                "⚠ version skew: 0.4.1 (commit 0123456789ab) on east; 0.4.1 (commit fedcba987654) on west"
            )
        );
        assert_eq!(exit_code(&checks), 0);
    }

    #[test]
    fn unsupported_version_skew_fails() {
        let mut m = mesh();
        status(&mut m[1]).version = Some("1.0.0+fedcba987654".into());
        status(&mut m[0]).peers[0].version = Some("1.0.0+fedcba987654".into());
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            failed(&checks),
            [
                "✗ version skew: 0.4.1 (commit 0123456789ab) on east; 1.0.0 (commit fedcba987654) on west"
            ]
        );
        assert_eq!(exit_code(&checks), 1);
        // An apiserver too old to say: a warning that names it.
        let mut m = mesh();
        status(&mut m[1]).version = None;
        let checks = evaluate(&m, NOW, 30);
        assert_eq!(
            lines(&checks).last().map(String::as_str),
            Some("⚠ version skew: 0.4.1 (commit 0123456789ab) on east; unknown on west")
        );
        assert_eq!(exit_code(&checks), 0);
    }
}
