//! Command line and environment → a validated [`Config`] of domain types.
//!
//! Every invalid setting is reported at once, not one per restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use model::{ClusterId, ClusterName};
use telemetry::env;

/// The flags, as typed by a user.
#[derive(Debug, Parser)]
#[command(
    name = "clustermesh-apiserver",
    version = telemetry::version::LONG,
    about = "Exports this cluster's services, endpoints and identities to its mesh peers.",
    long_about = "Exports this cluster's services, endpoints and identities to its mesh peers.\n\n\
        Runs once per cluster, next to the cluster's etcd, which it is the only writer of. \
        Every flag can also be set through the environment variable shown with it. Durations \
        take a unit: 500ms, 30s, 1m30s, 1h.",
    after_help = "Example:\n  \
        clustermesh-apiserver --cluster-name east --cluster-id 1 \\\n    \
        --etcd-endpoints https://etcd:2379 --etcd-tls-dir /etcd-tls --mesh-tls-dir /mesh-tls \\\n    \
        --peers-dir /peers --peers-from-secrets --lease-ttl 30s --leader-lease 15s \\\n    \
        --identity-gc-grace 5m --log-format json"
)]
pub struct Args {
    /// This cluster's name: a DNS-1123 label of at most 32 characters, unique in the mesh.
    #[arg(long, env = env::CLUSTER_NAME)]
    pub cluster_name: String,
    /// This cluster's ID, 1..=4095, unique in the mesh.
    #[arg(long, env = env::CLUSTER_ID)]
    pub cluster_id: String,
    /// etcd endpoints, comma-separated `https://host:port`.
    #[arg(long, env = env::ETCD_ENDPOINTS, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Directory with the etcd client certificate (`tls.crt`, `tls.key`) and etcd's CA
    /// (`ca.crt`), e.g. a mounted Kubernetes TLS Secret.
    #[arg(long, env = env::ETCD_TLS_DIR)]
    pub etcd_tls_dir: PathBuf,
    /// TTL of the exporter's session lease, 5s..=1h (e.g. `30s`, `1m30s`). Only the session
    /// record hangs on it (exported state hangs on no lease and survives any etcd outage):
    /// when it expires, peers and status show this cluster's exporter as not heartbeating.
    #[arg(long, env = env::LEASE_TTL, default_value = "30s", value_parser = telemetry::duration::parse)]
    pub lease_ttl: Duration,
    /// Kubeconfig of this cluster's Kubernetes API (unset: the in-cluster service account, then
    /// `~/.kube/config`).
    #[arg(long, env = env::KUBECONFIG)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (unset: its current context).
    #[arg(long, env = env::KUBE_CONTEXT)]
    pub kube_context: Option<String>,
    /// The namespace this apiserver runs in: it holds the leader Lease.
    #[arg(long, env = env::NAMESPACE, default_value = "kube-system")]
    pub namespace: String,
    /// This replica's name in leader election (default: the host name).
    #[arg(long, env = env::REPLICA)]
    pub replica: Option<String>,
    /// Leader lease duration, 2s..=5m: how long a dead leader blocks a takeover.
    #[arg(long, env = env::LEADER_LEASE, default_value = "15s", value_parser = telemetry::duration::parse)]
    pub leader_lease: Duration,
    /// How long an identity no pod uses is kept before it is released, 1s..=24h (pods that
    /// come back within it keep their ID), e.g. `5m`, `1h`.
    #[arg(long, env = env::IDENTITY_GC_GRACE, default_value = "5m", value_parser = telemetry::duration::parse)]
    pub identity_gc_grace: Duration,
    /// Address of the `/metrics`, `/healthz` and `/readyz` server.
    #[arg(long, env = env::HEALTH_BIND, default_value = "0.0.0.0:9880")]
    pub health_bind: String,
    /// Address of the Mesh API (gRPC over mutual TLS) served to peers and node agents.
    #[arg(long, env = env::MESH_BIND, default_value = "0.0.0.0:4240")]
    pub mesh_bind: String,
    /// Directory with this apiserver's Mesh API certificate (`tls.crt`, `tls.key`) and the
    /// cluster CA it trusts for clients (`ca.crt`). Unset: no Mesh API is served.
    #[arg(long, env = env::MESH_TLS_DIR)]
    pub mesh_tls_dir: Option<PathBuf>,
    /// Directory of peer configurations, one sub-directory per peer cluster (named after it)
    /// with `endpoints`, `ca.crt`, `tls.crt`, `tls.key` and optionally `cluster-id`; watched
    /// for changes. Unset: no peers are imported.
    #[arg(long, env = env::PEERS_DIR)]
    pub peers_dir: Option<PathBuf>,
    /// Directory of grants: one sub-directory per peer cluster allowed to import this
    /// cluster's exports, with `cluster-id` and `sha256` (the fingerprints of the client
    /// certificates issued to it, one per line); watched for changes. Ignored with
    /// `--peers-from-secrets` (grants then come from Secrets). Unset and without Secrets: no
    /// peer is admitted.
    #[arg(long, env = env::GRANTS_DIR)]
    pub grants_dir: Option<PathBuf>,
    /// Objects one peer may make this cluster hold (all kinds together); past it, its new
    /// objects are refused and named in its status.
    #[arg(long, env = env::PEER_MAX_OBJECTS, default_value_t = 500_000)]
    pub peer_max_objects: usize,
    /// Bytes of values one peer may make this cluster hold.
    #[arg(long, env = env::PEER_MAX_BYTES, default_value_t = 256 * 1024 * 1024)]
    pub peer_max_bytes: usize,
    /// Take peer configurations from this namespace's Secrets labelled `clustermesh.dev/peer`
    /// (what `clustermesh connect` writes) and keep `--peers-dir` equal to them; take grants
    /// from the Secrets labelled `clustermesh.dev/grant`.
    #[arg(long, env = env::PEERS_FROM_SECRETS)]
    pub peers_from_secrets: bool,
    /// Port of the node agents' `/state` over mutual TLS, read at each Node's InternalIP for
    /// the node-agent summary of the status document.
    #[arg(long, env = env::NODE_AGENT_STATE_PORT, default_value_t = model::node_state::NODE_AGENT_STATE_PORT)]
    pub node_agent_state_port: u16,
    /// Port of the node agents' `Observer` (flows) over mutual TLS, dialled at each Node's
    /// InternalIP to relay flows to `clustermesh observe`.
    #[arg(long, env = env::NODE_AGENT_OBSERVE_PORT, default_value_t = meshapi::observe::NODE_AGENT_OBSERVE_PORT)]
    pub node_agent_observe_port: u16,
    /// Node-agent enrollment (`crate::enroll`).
    #[command(flatten)]
    pub enroll: crate::enroll::Args,
    #[command(flatten)]
    pub log: telemetry::LogArgs,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This cluster's name.
    pub cluster_name: ClusterName,
    /// This cluster's ID.
    pub cluster_id: ClusterId,
    /// How to reach etcd.
    pub etcd: kvstore::Config,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Kubeconfig path, `None` for in-cluster or the default file.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    pub kube_context: Option<String>,
    /// Namespace of the leader Lease.
    pub namespace: String,
    /// This replica's name.
    pub replica: String,
    /// Leader lease duration.
    pub leader_lease: Duration,
    /// Grace period of unused identities.
    pub identity_gc_grace: Duration,
    /// Health and metrics address.
    pub health_bind: SocketAddr,
    /// Mesh API address.
    pub mesh_bind: SocketAddr,
    /// Mesh API TLS files, `None` for no Mesh API.
    pub mesh_tls: Option<certs::TlsFiles>,
    /// Peer configurations, `None` for no importer.
    pub peers_dir: Option<PathBuf>,
    /// Whether `peers_dir` is kept equal to the namespace's peer Secrets (and grants come
    /// from grant Secrets).
    pub peers_from_secrets: bool,
    /// Grants from a directory (without `peers_from_secrets`).
    pub grants_dir: Option<PathBuf>,
    /// Per-peer limits.
    pub peer_quota: crate::mesh::importer::Quota,
    /// Port of the node agents' `/state`.
    pub node_agent_state_port: u16,
    /// Port of the node agents' `Observer`.
    pub node_agent_observe_port: u16,
}

/// Every problem found in the flags.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct Error {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl Args {
    /// Validates everything, collecting every problem.
    pub fn validate(&self) -> Result<Config, Error> {
        let mut problems = Vec::new();
        let cluster_name = ClusterName::new(self.cluster_name.clone())
            .map_err(|e| problems.push(format!("--cluster-name: {e}")))
            .ok();
        let cluster_id = self
            .cluster_id
            .parse::<ClusterId>()
            .map_err(|e| problems.push(format!("--cluster-id: {e}")))
            .ok();
        if self.etcd_endpoints.is_empty() {
            problems.push("--etcd-endpoints: at least one endpoint is required".into());
        }
        for ep in &self.etcd_endpoints {
            if !ep.starts_with("https://") {
                problems.push(format!(
                    "--etcd-endpoints: {ep:?} is not an https:// URL (etcd is only reached over mTLS)"
                ));
            }
        }
        let tls = certs::TlsFiles::in_dir(&self.etcd_tls_dir);
        for f in [&tls.cert, &tls.key, &tls.ca] {
            if !f.is_file() {
                problems.push(format!("--etcd-tls-dir: {} does not exist", f.display()));
            }
        }
        in_range(
            &mut problems,
            "--lease-ttl",
            self.lease_ttl,
            Duration::from_secs(5),
            Duration::from_secs(3600),
        );
        if let Some(k) = &self.kubeconfig
            && !k.is_file()
        {
            problems.push(format!("--kubeconfig: {} does not exist", k.display()));
        }
        if !is_dns_label(&self.namespace) {
            problems.push(format!(
                "--namespace: {:?} is not a valid namespace name",
                self.namespace
            ));
        }
        let replica = self.replica.clone().unwrap_or_else(hostname);
        if replica.is_empty() || replica.len() > 253 {
            problems.push(format!(
                "--replica: {replica:?} must be 1 to 253 characters"
            ));
        }
        in_range(
            &mut problems,
            "--leader-lease",
            self.leader_lease,
            Duration::from_secs(2),
            Duration::from_secs(300),
        );
        in_range(
            &mut problems,
            "--identity-gc-grace",
            self.identity_gc_grace,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        );
        let health_bind = self
            .health_bind
            .parse::<SocketAddr>()
            .map_err(|_| {
                problems.push(format!(
                    "--health-bind: {:?} is not an address:port",
                    self.health_bind
                ))
            })
            .ok();
        let mesh_bind = self
            .mesh_bind
            .parse::<SocketAddr>()
            .map_err(|_| {
                problems.push(format!(
                    "--mesh-bind: {:?} is not an address:port",
                    self.mesh_bind
                ))
            })
            .ok();
        let mesh_tls = self
            .mesh_tls_dir
            .as_ref()
            .map(|d| certs::TlsFiles::in_dir(d));
        for f in mesh_tls.iter().flat_map(|t| [&t.cert, &t.key, &t.ca]) {
            if !f.is_file() {
                problems.push(format!("--mesh-tls-dir: {} does not exist", f.display()));
            }
        }
        if let Some(d) = &self.peers_dir
            && !d.is_dir()
        {
            problems.push(format!("--peers-dir: {} is not a directory", d.display()));
        }
        if self.peer_max_objects == 0 || self.peer_max_bytes < 1024 {
            problems.push(
                "--peer-max-objects must be at least 1 and --peer-max-bytes at least 1024".into(),
            );
        }
        if let Some(d) = &self.grants_dir
            && !d.is_dir()
        {
            problems.push(format!("--grants-dir: {} is not a directory", d.display()));
        }
        if self.peers_from_secrets && self.peers_dir.is_none() {
            problems.push(
                "--peers-from-secrets: needs --peers-dir (the directory the Secrets are written to)"
                    .into(),
            );
        }
        match (cluster_name, cluster_id, health_bind, mesh_bind) {
            (Some(cluster_name), Some(cluster_id), Some(health_bind), Some(mesh_bind))
                if problems.is_empty() =>
            {
                Ok(Config {
                    cluster_name,
                    cluster_id,
                    etcd: kvstore::Config::new(self.etcd_endpoints.clone(), Some(tls)),
                    lease_ttl: self.lease_ttl,
                    kubeconfig: self.kubeconfig.clone(),
                    kube_context: self.kube_context.clone(),
                    namespace: self.namespace.clone(),
                    replica,
                    leader_lease: self.leader_lease,
                    identity_gc_grace: self.identity_gc_grace,
                    health_bind,
                    mesh_bind,
                    mesh_tls,
                    peers_dir: self.peers_dir.clone(),
                    peers_from_secrets: self.peers_from_secrets,
                    grants_dir: self.grants_dir.clone(),
                    peer_quota: crate::mesh::importer::Quota {
                        max_objects: self.peer_max_objects,
                        max_bytes: self.peer_max_bytes,
                    },
                    node_agent_state_port: self.node_agent_state_port,
                    node_agent_observe_port: self.node_agent_observe_port,
                })
            }
            _ => Err(Error { problems }),
        }
    }
}

/// Adds a problem when `value` of `flag` is outside `min..=max`.
fn in_range(problems: &mut Vec<String>, flag: &str, value: Duration, min: Duration, max: Duration) {
    if !(min..=max).contains(&value) {
        problems.push(format!(
            "{flag}: {} is out of range {}..={}",
            telemetry::duration::format(value),
            telemetry::duration::format(min),
            telemetry::duration::format(max)
        ));
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let args = Args::try_parse_from([
            "clustermesh-apiserver",
            "--cluster-name",
            "East",
            "--cluster-id",
            "0",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
            "--etcd-tls-dir",
            "/nonexistent",
            "--lease-ttl",
            "1s",
            "--namespace",
            "Kube_System",
            "--leader-lease",
            "1s",
            "--identity-gc-grace",
            "0s",
            "--health-bind",
            "nowhere",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .unwrap();
        let e = args.validate().unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 12, "{text}");
        for needle in [
            "--cluster-name",
            "--cluster-id",
            "https://",
            "tls.crt",
            "--lease-ttl",
            "--namespace",
            "--leader-lease",
            "--identity-gc-grace",
            "--health-bind",
            "--kubeconfig",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn durations_take_units_and_a_bare_number_is_refused() {
        let base = [
            "clustermesh-apiserver",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--etcd-endpoints",
            "https://127.0.0.1:2379",
            "--etcd-tls-dir",
            "/nonexistent",
        ];
        let args = Args::try_parse_from(base.iter().copied().chain([
            "--lease-ttl",
            "1m30s",
            "--leader-lease",
            "15s",
            "--identity-gc-grace",
            "10m",
        ]))
        .unwrap();
        assert_eq!(args.lease_ttl, Duration::from_secs(90));
        assert_eq!(args.leader_lease, Duration::from_secs(15));
        assert_eq!(args.identity_gc_grace, Duration::from_secs(600));
        let defaults = Args::try_parse_from(base).unwrap();
        assert_eq!(defaults.lease_ttl, Duration::from_secs(30));
        assert_eq!(defaults.identity_gc_grace, Duration::from_secs(300));
        let e = Args::try_parse_from(base.iter().copied().chain(["--lease-ttl", "30"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid duration \"30\": add a unit (30s, 30ms, 1m30s)"),
            "{e}"
        );
    }

    #[test]
    fn every_flag_has_its_environment_variable() {
        use clap::CommandFactory;
        assert_eq!(
            telemetry::env::missing(&Args::command()),
            Vec::<String>::new()
        );
    }
}
