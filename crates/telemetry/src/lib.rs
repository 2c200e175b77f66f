//! Logging set-up shared by every binary, and the names declared once: environment variables
//! and log field names.
//!
//! Must not hold business logic; binaries call [`init`] first thing in `main`.

pub mod backoff;

/// Raises this process's soft limit of open files to its hard limit (a daemon must not be
/// turned into a fault by the common soft default of 1,024). Returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    if cur.current != cur.maximum {
        let raised = Rlimit {
            current: cur.maximum,
            maximum: cur.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            return cur.current;
        }
    }
    getrlimit(Resource::Nofile).current
}
pub mod metrics;

use std::fmt;

use clap::ValueEnum;

/// Environment variables, each read through clap's `env` fallback of the flag of the same name.
pub mod env {
    /// Log filter (`info`, `clustermesh=debug,kvstore=trace`, ...).
    pub const LOG: &str = "CLUSTERMESH_LOG";
    /// Log format: `plain` or `json`.
    pub const LOG_FORMAT: &str = "CLUSTERMESH_LOG_FORMAT";
    /// This cluster's name.
    pub const CLUSTER_NAME: &str = "CLUSTERMESH_CLUSTER_NAME";
    /// This cluster's ID.
    pub const CLUSTER_ID: &str = "CLUSTERMESH_CLUSTER_ID";
    /// Comma-separated etcd endpoints.
    pub const ETCD_ENDPOINTS: &str = "CLUSTERMESH_ETCD_ENDPOINTS";
    /// Directory holding `tls.crt`, `tls.key`, `ca.crt` for etcd.
    pub const ETCD_TLS_DIR: &str = "CLUSTERMESH_ETCD_TLS_DIR";
    /// TTL of the lease exported state is attached to, in seconds.
    pub const LEASE_TTL: &str = "CLUSTERMESH_LEASE_TTL";
    /// This node's name.
    pub const NODE_NAME: &str = "CLUSTERMESH_NODE_NAME";
    /// The cgroup (v2) the node agent attaches its programs to.
    pub const CGROUP: &str = "CLUSTERMESH_CGROUP";
    /// Path of the kubeconfig (unset: in-cluster config or `~/.kube/config`).
    pub const KUBECONFIG: &str = "KUBECONFIG";
    /// The kubeconfig context to use.
    pub const KUBE_CONTEXT: &str = "CLUSTERMESH_KUBE_CONTEXT";
    /// The namespace the apiserver runs in (its leader Lease and Events about itself).
    pub const NAMESPACE: &str = "CLUSTERMESH_NAMESPACE";
    /// This replica's name in leader election.
    pub const REPLICA: &str = "CLUSTERMESH_REPLICA";
    /// Leader lease duration, seconds.
    pub const LEADER_LEASE: &str = "CLUSTERMESH_LEADER_LEASE";
    /// How long an unused identity is kept before it is released, seconds.
    pub const IDENTITY_GC_GRACE: &str = "CLUSTERMESH_IDENTITY_GC_GRACE";
    /// Address of the `/metrics`, `/healthz`, `/readyz` server.
    pub const HEALTH_BIND: &str = "CLUSTERMESH_HEALTH_BIND";
    /// `--state-bind` (node agent: `/state` over mutual TLS).
    pub const STATE_BIND: &str = "CLUSTERMESH_STATE_BIND";
    /// `--node-agent-state-port` (apiserver: where it reads the node agents' `/state`).
    pub const NODE_AGENT_STATE_PORT: &str = "CLUSTERMESH_NODE_AGENT_STATE_PORT";
    /// Address of the Mesh API.
    pub const MESH_BIND: &str = "CLUSTERMESH_MESH_BIND";
    /// Directory with the Mesh API's `tls.crt`, `tls.key`, `ca.crt`.
    pub const MESH_TLS_DIR: &str = "CLUSTERMESH_MESH_TLS_DIR";
    /// Directory of peer configurations.
    pub const PEERS_DIR: &str = "CLUSTERMESH_PEERS_DIR";
    /// `--grants-dir`.
    pub const GRANTS_DIR: &str = "CLUSTERMESH_GRANTS_DIR";
    /// Where bpffs is mounted.
    pub const BPFFS: &str = "CLUSTERMESH_BPFFS";
    /// The local apiserver's Mesh API address, for node agents.
    pub const APISERVER: &str = "CLUSTERMESH_APISERVER";
    /// Directory holding the component's own `tls.crt`, `tls.key`, `ca.crt`.
    pub const TLS_DIR: &str = "CLUSTERMESH_TLS_DIR";
}

/// Log field names, so that every component spells them the same way.
pub mod fields {
    /// A cluster name.
    pub const CLUSTER: &str = "cluster";
    /// A peer cluster name.
    pub const PEER: &str = "peer";
    /// A node name.
    pub const NODE: &str = "node";
    /// An etcd key.
    pub const KEY: &str = "key";
    /// A Kubernetes object (`namespace/name`).
    pub const OBJECT: &str = "object";
    /// An error.
    pub const ERROR: &str = "error";
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Json => "json",
        })
    }
}

/// The logging flags every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter, in tracing's env-filter syntax (e.g. `info` or `kvstore=debug,info`).
    #[arg(long = "log", env = env::LOG, default_value = "info", global = true)]
    pub filter: String,
    /// Log output format.
    #[arg(long, env = env::LOG_FORMAT, default_value_t = Format::Plain, global = true)]
    pub log_format: Format,
}

/// Why logging could not be set up.
#[derive(Debug)]
pub enum Error {
    /// The filter does not parse.
    Filter {
        /// The refused filter.
        filter: String,
        /// The parser's reason.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Filter { filter, reason } => write!(f, "invalid log filter {filter:?}: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// Installs the global subscriber, writing to stderr.
pub fn init(args: &LogArgs) -> Result<(), Error> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&args.filter).map_err(|e| Error::Filter {
            filter: args.filter.clone(),
            reason: e.to_string(),
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests) keeps the first subscriber.
    let _ = match args.log_format {
        Format::Plain => builder.try_init(),
        Format::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C: what every binary waits for before shutting down.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
