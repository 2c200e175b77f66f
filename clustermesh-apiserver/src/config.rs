//! Command line and environment → a validated [`Config`] of domain types.
//!
//! Every invalid setting is reported at once, not one per restart.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use model::{ClusterId, ClusterName};
use telemetry::env;

/// The flags, as typed by a user.
#[derive(Debug, Parser)]
#[command(
    name = "clustermesh-apiserver",
    version,
    about = "Exports this cluster's services, endpoints and identities to its mesh peers.",
    long_about = "Exports this cluster's services, endpoints and identities to its mesh peers.\n\n\
        Runs once per cluster, next to the cluster's etcd, which it is the only writer of. \
        Every flag can also be set through the environment variable shown with it."
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
    /// TTL in seconds of the lease that exported state is attached to: how long peers keep
    /// seeing this cluster's exports after the apiserver dies.
    #[arg(long, env = env::LEASE_TTL, default_value_t = 30)]
    pub lease_ttl: u64,
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
        if !(5..=3600).contains(&self.lease_ttl) {
            problems.push(format!(
                "--lease-ttl: {} is out of range 5..=3600 seconds",
                self.lease_ttl
            ));
        }
        match (cluster_name, cluster_id) {
            (Some(cluster_name), Some(cluster_id)) if problems.is_empty() => Ok(Config {
                cluster_name,
                cluster_id,
                etcd: kvstore::Config::new(self.etcd_endpoints.clone(), Some(tls)),
                lease_ttl: Duration::from_secs(self.lease_ttl),
            }),
            _ => Err(Error { problems }),
        }
    }
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
            "1",
        ])
        .unwrap();
        let e = args.validate().unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 7, "{text}");
        for needle in [
            "--cluster-name",
            "--cluster-id",
            "https://",
            "tls.crt",
            "--lease-ttl",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }
}
