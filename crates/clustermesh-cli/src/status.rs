//! `clustermesh status`: per cluster and peer, what the leading apiserver reports (phase,
//! since when, counts, last error, certificate expiry), read from its status ConfigMap and the
//! peer Secrets, and a line on the versions they run ([`versions`] has the skew rule: minor
//! skew is a warning, wider skew unhealthy). Exits 1 when anything is not healthy, so scripts
//! can rely on it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use certs::identity::CertInfo;
use clap::Args;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use model::objects::PEER_LABEL;
use model::status::{ClusterStatus, Phase};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;

use crate::cluster::{Cluster, KubeArgs};
use crate::output::{self, Format};
use crate::versions;

/// A certificate expiring within this is reported as a problem.
const CERT_WARN_SECS: i64 = 14 * 86_400;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Kubeconfig contexts of the clusters to show; repeat for several (default: the current
    /// context).
    #[arg(long)]
    context: Vec<String>,
    /// Wait until everything is healthy (or --timeout passes).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2m", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

/// One peer, as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PeerRow {
    pub name: String,
    pub cluster_id: Option<u16>,
    pub phase: String,
    pub since_unix: Option<i64>,
    pub objects: BTreeMap<String, usize>,
    pub last_error: Option<String>,
    pub last_error_unix: Option<i64>,
    /// The earlier of the peer's server certificate and this cluster's client certificate.
    pub cert_not_after_unix: Option<i64>,
    pub endpoint: Option<String>,
    /// The version the peer reported when it connected.
    pub version: Option<String>,
}

/// One cluster, as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClusterReport {
    pub context: String,
    pub cluster: Option<String>,
    pub cluster_id: Option<u16>,
    pub replica: Option<String>,
    /// The apiserver's version (`0.1.0+0123456789ab`; absent from older apiservers).
    pub version: Option<String>,
    pub ready: bool,
    /// The apiserver's phase (`ready`, `etcd-unreachable`, `lease-lost`, ...); absent when its
    /// status could not be read or comes from an older apiserver.
    pub phase: Option<String>,
    /// Since when it is in that phase (Unix seconds).
    pub phase_since_unix: Option<i64>,
    pub exported: BTreeMap<String, usize>,
    pub status_age_seconds: Option<i64>,
    pub peers: Vec<PeerRow>,
    /// The node agents, as the leader last read them.
    pub node_agents: Option<model::status::NodeAgents>,
    pub healthy: bool,
    pub problems: Vec<String>,
    /// The problems without the times in them ("since 3s ago"), which change at every look:
    /// `--wait` prints a progress line only when these change.
    #[serde(skip)]
    pub problem_keys: Vec<String>,
}

impl ClusterReport {
    /// Records a problem: `text` for people, `key` the same without times.
    fn problem(&mut self, key: String, text: String) {
        self.problem_keys.push(key);
        self.problems.push(text);
    }
}

fn client_cert_expiry(secret: &Secret) -> Option<i64> {
    let pem = secret.data.as_ref()?.get("tls.crt")?;
    let der = CertificateDer::pem_slice_iter(&pem.0).next()?.ok()?;
    CertInfo::from_der(der.as_ref())
        .ok()
        .map(|i| i.not_after_unix)
}

pub(crate) async fn report(cluster: &Cluster) -> ClusterReport {
    let mut r = ClusterReport {
        context: cluster.context.clone(),
        cluster: None,
        cluster_id: None,
        replica: None,
        version: None,
        ready: false,
        phase: None,
        phase_since_unix: None,
        exported: BTreeMap::new(),
        status_age_seconds: None,
        peers: Vec::new(),
        node_agents: None,
        healthy: false,
        problems: Vec::new(),
        problem_keys: Vec::new(),
    };
    let status: ClusterStatus = match cluster.status().await {
        Ok(s) => s,
        Err(e) => {
            let text = crate::errors::render(&e);
            r.problem(text.clone(), text);
            return r;
        }
    };
    let now = output::now_unix();
    r.cluster = Some(status.cluster.clone());
    r.cluster_id = Some(status.cluster_id);
    r.replica = Some(status.replica.clone());
    r.version = status.version.clone();
    r.ready = status.ready;
    r.phase = status.phase.map(|p| p.to_string());
    r.phase_since_unix = status.phase_since_unix;
    r.exported = status.exported.clone();
    r.node_agents = status.node_agents.clone();
    if let Some(a) = &status.node_agents {
        if let Some(e) = &a.error {
            r.problems
                .push(format!("node agents could not be read: {e}"));
        } else if a.ready < a.nodes {
            r.problems.push(a.headline());
        }
    }
    let age = now - status.updated_unix;
    r.status_age_seconds = Some(age);
    if !status.ready {
        let reason = status.reason.clone().unwrap_or_default();
        match (status.phase, status.phase_since_unix) {
            (Some(phase), Some(since)) => r.problem(
                format!("apiserver {} is {phase}", status.replica),
                format!(
                    "apiserver {} is {phase} since {}: {reason}",
                    status.replica,
                    output::relative(since, now)
                ),
            ),
            // An older apiserver: readiness and its reason only.
            _ => {
                let text = format!("apiserver {} not ready: {reason}", status.replica);
                r.problem(text.clone(), text);
            }
        }
    }
    if !model::status::status_is_current(status.updated_unix, now) {
        r.problem(
            format!("apiserver {} stopped reporting", status.replica),
            format!(
                "status last written {} by {}: the apiserver stopped reporting",
                output::relative(status.updated_unix, now),
                status.replica
            ),
        );
    }
    let secrets = match cluster
        .api::<Secret>()
        .list(&ListParams::default().labels(PEER_LABEL))
        .await
    {
        Ok(l) => l.items,
        Err(e) => {
            let text = format!(
                "list peer Secrets: {}",
                crate::errors::render(&anyhow::Error::from(e))
            );
            r.problem(text.clone(), text);
            Vec::new()
        }
    };
    let mut configured: BTreeMap<String, Option<i64>> = secrets
        .iter()
        .filter_map(|s| {
            let peer = s.metadata.labels.as_ref()?.get(PEER_LABEL)?.clone();
            Some((peer, client_cert_expiry(s)))
        })
        .collect();
    for p in &status.peers {
        let client = configured.remove(&p.name).flatten();
        let cert = match (p.peer_cert_not_after_unix, client) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if p.phase != Phase::Ready {
            let error = p
                .last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            r.problem(
                format!("peer {} is {}{error}", p.name, p.phase),
                format!(
                    "peer {} is {} since {}{error}",
                    p.name,
                    p.phase,
                    output::relative(p.since_unix, now),
                ),
            );
        }
        if let Some(c) = cert
            && c - now < CERT_WARN_SECS
        {
            r.problem(
                format!("peer {}: a certificate expires soon", p.name),
                format!(
                    "peer {}: a certificate expires {}",
                    p.name,
                    output::relative(c, now)
                ),
            );
        }
        r.peers.push(PeerRow {
            name: p.name.clone(),
            cluster_id: p.cluster_id,
            phase: p.phase.to_string(),
            since_unix: Some(p.since_unix),
            objects: p.objects.clone(),
            last_error: p.last_error.clone(),
            last_error_unix: p.last_error_unix,
            cert_not_after_unix: cert,
            endpoint: p.endpoint.clone(),
            version: p.version.clone(),
        });
    }
    for (peer, cert) in configured {
        let text =
            format!("peer {peer}: configured (Secret) but not reported by the apiserver yet");
        r.problem(text.clone(), text);
        r.peers.push(PeerRow {
            name: peer,
            cluster_id: None,
            phase: "configured".into(),
            since_unix: None,
            objects: BTreeMap::new(),
            last_error: None,
            last_error_unix: None,
            cert_not_after_unix: cert,
            endpoint: None,
            version: None,
        });
    }
    r.healthy = r.problems.is_empty();
    r
}

fn print_table(reports: &[ClusterReport]) {
    print!("{}", table_text(reports, output::now_unix()));
}

/// The table and the problems below it.
fn table_text(reports: &[ClusterReport], now: i64) -> String {
    let mut rows = Vec::new();
    for r in reports {
        let cluster = match (&r.cluster, r.cluster_id) {
            (Some(c), Some(id)) => format!("{c} ({id})"),
            _ => format!("? (context {})", r.context),
        };
        // A cluster whose status could not be read exports nothing we know of: `-`, not 0.
        let exported = if r.cluster.is_none() {
            "-".to_owned()
        } else {
            format!(
                "{} svc / {} ep / {} id",
                r.exported.get("services").unwrap_or(&0),
                r.exported.get("endpoints").unwrap_or(&0),
                r.exported.get("identities").unwrap_or(&0)
            )
        };
        // An apiserver that stopped reporting is shown as such here, not only below the table.
        let apiserver = match r.status_age_seconds {
            Some(age) if !model::status::status_is_current(now - age, now) => {
                format!("not reporting ({})", output::relative(now - age, now))
            }
            _ if r.ready => "ready".to_owned(),
            _ if r.cluster.is_none() => "unknown".to_owned(),
            // Its phase and since when: `lease-lost (45s ago)`.
            _ => match (&r.phase, r.phase_since_unix) {
                (Some(p), Some(since)) => format!("{p} ({})", output::relative(since, now)),
                _ => "not ready".to_owned(),
            },
        };
        if r.peers.is_empty() {
            rows.push(vec![
                cluster.clone(),
                apiserver.clone(),
                exported.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for p in &r.peers {
            rows.push(vec![
                cluster.clone(),
                apiserver.clone(),
                exported.clone(),
                p.name.clone(),
                p.phase.clone(),
                p.since_unix
                    .map_or("-".into(), |s| output::relative(s, now)),
                format!(
                    "{} svc / {} ep / {} id",
                    p.objects.get("services").unwrap_or(&0),
                    p.objects.get("endpoints").unwrap_or(&0),
                    p.objects.get("identities").unwrap_or(&0)
                ),
                p.cert_not_after_unix
                    .map_or("-".into(), |c| output::relative(c, now)),
                match (&p.last_error, p.last_error_unix) {
                    (Some(e), Some(t)) => format!("({}) {e}", output::relative(t, now)),
                    (Some(e), None) => e.clone(),
                    _ => "-".into(),
                },
            ]);
        }
    }
    let mut out = output::table(
        &[
            "CLUSTER",
            "APISERVER",
            "EXPORTS",
            "PEER",
            "PHASE",
            "SINCE",
            "IMPORTED",
            "CERT EXPIRES",
            "LAST ERROR",
        ],
        &rows,
    );
    for r in reports {
        if let Some(a) = &r.node_agents {
            out.push_str(&format!(
                "{}: {}\n",
                r.cluster.as_deref().unwrap_or(&r.context),
                a.headline()
            ));
        }
    }
    if let Some(skew) = version_skew(reports) {
        let line = skew.message();
        out.push_str(&match skew.level {
            versions::Level::Same => format!("{line}\n"),
            versions::Level::Minor => format!("⚠ {line}\n"),
            versions::Level::Unsupported => format!("✗ {line}\n"),
        });
        if let Some(hint) = skew.hint() {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    for r in reports {
        for p in &r.problems {
            out.push_str(&format!(
                "! {}: {p}\n",
                r.cluster.as_deref().unwrap_or(&r.context)
            ));
        }
    }
    out
}

/// The versions of the clusters whose status could be read, and of their peers.
fn version_skew(reports: &[ClusterReport]) -> Option<versions::Skew> {
    let reporters: Vec<versions::Reporter<'_>> = reports
        .iter()
        .filter_map(|r| {
            Some(versions::Reporter {
                cluster: r.cluster.as_deref()?,
                version: r.version.as_deref(),
                peers: r
                    .peers
                    .iter()
                    .map(|p| (p.name.as_str(), p.version.as_deref()))
                    .collect(),
            })
        })
        .collect();
    versions::assess(&reporters)
}

/// `--wait`'s progress: one line per change of what is wrong, not one per look.
#[derive(Debug, Default)]
struct Progress {
    last: Option<String>,
}

impl Progress {
    /// The line to print for `reports`, or `None` when the problems are those of the last
    /// line but for their times ("since 3s ago" is "since 4s ago" a second later).
    fn line(&mut self, reports: &[ClusterReport]) -> Option<String> {
        let keys: Vec<&str> = reports
            .iter()
            .flat_map(|r| r.problem_keys.iter().map(String::as_str))
            .collect();
        let keys = keys.join("; ");
        if self.last.as_deref() == Some(keys.as_str()) {
            return None;
        }
        self.last = Some(keys);
        let problems: Vec<&str> = reports
            .iter()
            .flat_map(|r| r.problems.iter().map(String::as_str))
            .collect();
        Some(format!("waiting: {}", problems.join("; ")))
    }
}

#[derive(Debug, Serialize)]
struct Report {
    healthy: bool,
    clusters: Vec<ClusterReport>,
    /// The versions found across the clusters and their peers, and the verdict.
    versions: Option<versions::Skew>,
}

pub(crate) async fn run(args: StatusArgs) -> Result<std::process::ExitCode> {
    let contexts: Vec<Option<String>> = if args.context.is_empty() {
        vec![None]
    } else {
        args.context.iter().cloned().map(Some).collect()
    };
    let mut clusters = Vec::new();
    for c in &contexts {
        clusters.push(Cluster::open(&args.kube, c.as_deref()).await?);
    }
    let deadline = Instant::now() + args.timeout;
    let mut progress = Progress::default();
    loop {
        let mut reports = Vec::new();
        for c in &clusters {
            reports.push(report(c).await);
        }
        let skew = version_skew(&reports);
        let healthy = reports.iter().all(|r| r.healthy)
            && skew
                .as_ref()
                .is_none_or(|s| s.level != versions::Level::Unsupported);
        if healthy || !args.wait || Instant::now() >= deadline {
            let report = Report {
                healthy,
                clusters: reports,
                versions: skew,
            };
            if !output::structured(args.output, &report)? {
                print_table(&report.clusters);
            }
            return Ok(if healthy {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            });
        }
        if let Some(line) = progress.line(&reports) {
            eprintln!("{line}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable(context: &str) -> ClusterReport {
        let mut r = ClusterReport {
            context: context.into(),
            cluster: None,
            cluster_id: None,
            replica: None,
            version: None,
            ready: false,
            phase: None,
            phase_since_unix: None,
            exported: BTreeMap::new(),
            status_age_seconds: None,
            peers: Vec::new(),
            node_agents: None,
            healthy: false,
            problems: Vec::new(),
            problem_keys: Vec::new(),
        };
        r.problem("down".into(), format!("context {context}: down"));
        r
    }

    #[test]
    fn an_unreachable_cluster_shows_dashes_not_zero_counts() {
        let text = table_text(&[unreachable("east")], 1_000);
        assert_eq!(
            text,
            "CLUSTER            APISERVER   EXPORTS   PEER   PHASE   SINCE   IMPORTED   CERT EXPIRES   LAST ERROR\n\
             ? (context east)   unknown     -         -      -       -       -          -              -\n\
             ! east: context east: down\n"
        );
    }

    #[test]
    fn an_apiserver_cut_from_etcd_shows_its_phase_and_since_when_in_the_table() {
        let mut r = unreachable("east");
        r.problems.clear();
        r.problem_keys.clear();
        r.cluster = Some("east".into());
        r.cluster_id = Some(1);
        r.phase = Some(model::status::ApiserverPhase::LeaseLost.to_string());
        r.phase_since_unix = Some(955);
        r.status_age_seconds = Some(2);
        r.exported = BTreeMap::from([("services".to_owned(), 3)]);
        let text = table_text(&[r], 1_000);
        let row = text.lines().nth(1).unwrap_or_default();
        assert!(
            row.starts_with("east (1)   lease-lost (45s ago)   3 svc / 0 ep / 0 id"),
            "{text}"
        );
    }

    #[test]
    fn wait_prints_a_progress_line_only_when_the_problems_change() {
        let at = |since: &str, phase: &str| {
            let mut r = unreachable("east");
            r.problem(
                format!("peer west is {phase}"),
                format!("peer west is {phase} since {since}"),
            );
            vec![r]
        };
        let mut p = Progress::default();
        assert_eq!(
            p.line(&at("3s ago", "Connecting")).as_deref(),
            Some("waiting: context east: down; peer west is Connecting since 3s ago")
        );
        assert_eq!(p.line(&at("4s ago", "Connecting")), None);
        assert_eq!(p.line(&at("5s ago", "Connecting")), None);
        assert_eq!(
            p.line(&at("0s ago", "Syncing")).as_deref(),
            Some("waiting: context east: down; peer west is Syncing since 0s ago")
        );
    }

    /// A reporting cluster `name` whose apiserver runs `version`, with a peer that reported
    /// `peer_version`.
    fn reporting(name: &str, version: Option<&str>, peer_version: Option<&str>) -> ClusterReport {
        let mut r = unreachable(name);
        r.problems.clear();
        r.problem_keys.clear();
        r.cluster = Some(name.into());
        r.cluster_id = Some(1);
        r.ready = true;
        r.healthy = true;
        r.status_age_seconds = Some(2);
        r.version = version.map(str::to_owned);
        r.peers.push(PeerRow {
            name: "west".into(),
            cluster_id: Some(2),
            phase: "ready".into(),
            since_unix: Some(900),
            objects: BTreeMap::new(),
            last_error: None,
            last_error_unix: None,
            cert_not_after_unix: None,
            endpoint: None,
            version: peer_version.map(str::to_owned),
        });
        r
    }

    #[test]
    fn one_version_everywhere_is_one_line_under_the_table() {
        let r = reporting("east", Some("0.1.0+abc"), Some("0.1.0+abc"));
        let text = table_text(&[r], 1_000);
        assert_eq!(
            text.lines().skip(2).collect::<Vec<_>>(),
            ["one version across the clusters and their peers: 0.1.0 (commit abc)"],
            "{text}"
        );
    }

    #[test]
    fn version_skew_is_a_warning_or_unhealthy_by_how_wide() {
        let r = reporting("east", Some("0.1.0+abc"), Some("0.2.0+def"));
        let text = table_text(std::slice::from_ref(&r), 1_000);
        assert_eq!(
            text.lines().skip(2).collect::<Vec<_>>(),
            [
                "⚠ version skew: 0.1.0 (commit abc) on east; 0.2.0 (commit def) on west",
                "    hint: minor skew, supported while an upgrade rolls from one cluster to the next: finish it so that every cluster runs one build (`clustermesh version`; `kubectl -n kube-system get deploy clustermesh-apiserver -o wide` shows the image)",
            ],
            "{text}"
        );
        assert_eq!(
            version_skew(&[r]).map(|s| s.level),
            Some(versions::Level::Minor)
        );
        let r = reporting("east", Some("0.1.0+abc"), Some("1.0.0+def"));
        let text = table_text(std::slice::from_ref(&r), 1_000);
        assert_eq!(
            text.lines().nth(2),
            Some("✗ version skew: 0.1.0 (commit abc) on east; 1.0.0 (commit def) on west"),
            "{text}"
        );
        assert_eq!(
            version_skew(&[r]).map(|s| s.level),
            Some(versions::Level::Unsupported)
        );
    }
}
