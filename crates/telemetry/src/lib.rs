//! Logging set-up shared by every binary, and the names declared once: environment variables
//! and log field names; the version string of every binary ([`version`]), the one duration
//! syntax of every flag ([`duration`]), error chains printed once ([`chain`]), metrics.
//!
//! Must not hold business logic; binaries call [`init`] first thing in `main`.

pub mod backoff;
mod chain;
pub mod duration;
pub mod version;

pub use chain::{Chain, chain};

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
///
/// The rule: flag `--some-flag` ↔ `CLUSTERMESH_SOME_FLAG` ([`env::for_flag`]); the only
/// exception is `--kubeconfig` ↔ `KUBECONFIG`, the name every Kubernetes tool reads.
pub mod env {
    /// The environment variable of the long flag `flag` (without the dashes):
    /// `CLUSTERMESH_` and the flag in upper case, `-` as `_`.
    pub fn for_flag(flag: &str) -> String {
        if flag == "kubeconfig" {
            return KUBECONFIG.to_owned();
        }
        format!(
            "CLUSTERMESH_{}",
            flag.to_ascii_uppercase().replace('-', "_")
        )
    }

    /// Every argument of `cmd` (and its subcommands) that has no environment variable, or not
    /// the one [`for_flag`] names, as `--flag: problem` lines; `--help` and `--version` aside.
    /// Daemons assert this is empty in a test, so that no future flag forgets its variable.
    pub fn missing(cmd: &clap::Command) -> Vec<String> {
        let mut problems = Vec::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let Some(long) = arg.get_long() else {
                problems.push(format!(
                    "{id}: not a --flag, so it has no environment variable"
                ));
                continue;
            };
            let want = for_flag(long);
            match arg.get_env().and_then(|e| e.to_str()) {
                Some(got) if got == want => {}
                Some(got) => problems.push(format!("--{long}: env {got}, expected {want}")),
                None => problems.push(format!("--{long}: no env (expected {want})")),
            }
        }
        for sub in cmd.get_subcommands() {
            problems.extend(missing(sub));
        }
        problems
    }

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
    /// TTL of the exporter's session lease (a duration: `30s`).
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
    /// Leader lease duration (`15s`).
    pub const LEADER_LEASE: &str = "CLUSTERMESH_LEADER_LEASE";
    /// How long an unused identity is kept before it is released (`5m`).
    pub const IDENTITY_GC_GRACE: &str = "CLUSTERMESH_IDENTITY_GC_GRACE";
    /// `--peer-max-objects`.
    pub const PEER_MAX_OBJECTS: &str = "CLUSTERMESH_PEER_MAX_OBJECTS";
    /// `--peer-max-bytes`.
    pub const PEER_MAX_BYTES: &str = "CLUSTERMESH_PEER_MAX_BYTES";
    /// `--peers-from-secrets`.
    pub const PEERS_FROM_SECRETS: &str = "CLUSTERMESH_PEERS_FROM_SECRETS";
    /// Node agent: time between health checks of a backend (`200ms`).
    pub const HEALTH_INTERVAL: &str = "CLUSTERMESH_HEALTH_INTERVAL";
    /// Node agent: how long a health-check connect may take (`150ms`).
    pub const HEALTH_TIMEOUT: &str = "CLUSTERMESH_HEALTH_TIMEOUT";
    /// Node agent: failed checks in a row that mark a backend unhealthy.
    pub const FALL: &str = "CLUSTERMESH_FALL";
    /// Node agent: successful checks in a row that mark it healthy again.
    pub const RISE: &str = "CLUSTERMESH_RISE";
    /// Node agent: background probes per second over backends without evidence (`50`).
    pub const PROBE_SWEEP_RATE: &str = "CLUSTERMESH_PROBE_SWEEP_RATE";
    /// Node agent: re-probes of suspect and down backends per second at most (`200`).
    pub const PROBE_RETRY_RATE: &str = "CLUSTERMESH_PROBE_RETRY_RATE";
    /// Node agent: probes in flight at most (`256`).
    pub const PROBE_MAX_IN_FLIGHT: &str = "CLUSTERMESH_PROBE_MAX_IN_FLIGHT";
    /// Node agent: how long the kernel skips a suspect backend without news (`10s`).
    pub const QUARANTINE: &str = "CLUSTERMESH_QUARANTINE";
    /// Node agent: initial SYN retransmission timeout of translated connects (`0s` = kernel's).
    pub const SYN_TIMEOUT: &str = "CLUSTERMESH_SYN_TIMEOUT";
    /// Node agent: services its maps hold (sizes the datapath's maps at load time).
    pub const MAX_SERVICES: &str = "CLUSTERMESH_MAX_SERVICES";
    /// Node agent: whether getpeername() on a translated TCP socket shows the service.
    pub const TCP_PEER_REWRITE: &str = "CLUSTERMESH_TCP_PEER_REWRITE";
    /// Node agent: policy peer selectors without a cluster label select every cluster.
    pub const POLICY_SELECTORS_ANY_CLUSTER: &str = "CLUSTERMESH_POLICY_SELECTORS_ANY_CLUSTER";
    /// Node agent: `--check` (validate and exit).
    pub const CHECK: &str = "CLUSTERMESH_CHECK";
    /// Address of the `/metrics`, `/healthz`, `/readyz` server.
    pub const HEALTH_BIND: &str = "CLUSTERMESH_HEALTH_BIND";
    /// `--state-bind` (node agent: `/state` over mutual TLS).
    pub const STATE_BIND: &str = "CLUSTERMESH_STATE_BIND";
    /// Node agent: the `Observer` (flows) server's address.
    pub const OBSERVE_BIND: &str = "CLUSTERMESH_OBSERVE_BIND";
    /// Node agent: record flows (`true`/`false`).
    pub const FLOWS: &str = "CLUSTERMESH_FLOWS";
    /// Node agent: how many flows to keep in memory.
    pub const FLOW_BUFFER: &str = "CLUSTERMESH_FLOW_BUFFER";
    /// `--node-agent-state-port` (apiserver: where it reads the node agents' `/state`).
    pub const NODE_AGENT_STATE_PORT: &str = "CLUSTERMESH_NODE_AGENT_STATE_PORT";
    /// `--node-agent-observe-port` (apiserver: where it relays the node agents' flows from).
    pub const NODE_AGENT_OBSERVE_PORT: &str = "CLUSTERMESH_NODE_AGENT_OBSERVE_PORT";
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
    /// Address of the apiserver's node-agent enrollment endpoint (HTTPS).
    pub const ENROLL_BIND: &str = "CLUSTERMESH_ENROLL_BIND";
    /// Directory of the node-agent issuer (`tls.crt`, `tls.key`: the intermediate CA).
    pub const ENROLL_ISSUER_DIR: &str = "CLUSTERMESH_ENROLL_ISSUER_DIR";
    /// The node agents' ServiceAccount, `namespace/name`.
    pub const ENROLL_SERVICE_ACCOUNT: &str = "CLUSTERMESH_ENROLL_SERVICE_ACCOUNT";
    /// The audience of the node agents' projected tokens.
    pub const ENROLL_AUDIENCE: &str = "CLUSTERMESH_ENROLL_AUDIENCE";
    /// How long an enrolled node agent's certificate is valid.
    pub const ENROLL_VALIDITY: &str = "CLUSTERMESH_ENROLL_VALIDITY";
    /// The node agent's enrollment endpoints (`host:port`, comma-separated).
    pub const ENROLL: &str = "CLUSTERMESH_ENROLL";
    /// The node agent's projected ServiceAccount token file.
    pub const ENROLL_TOKEN_FILE: &str = "CLUSTERMESH_ENROLL_TOKEN_FILE";
    /// The cluster CA a node agent verifies its apiserver with before it has a certificate.
    pub const ENROLL_CA_FILE: &str = "CLUSTERMESH_ENROLL_CA_FILE";
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

/// Reports an error that ends the process, once, in the log format asked for: with `plain`,
/// `error: <error>` on stderr; with `json`, one JSON log line (`level` `ERROR`, `message`,
/// `error`) and nothing else. Works before [`init`] (or after it failed) too.
pub fn fatal(format: Format, message: &str, error: &dyn fmt::Display) {
    match format {
        Format::Plain => eprintln!("error: {error}"),
        Format::Json if tracing::dispatcher::has_been_set() => {
            tracing::error!(error = %error, "{message}");
        }
        Format::Json => eprintln!("{}", json_line(message, &error.to_string())),
    }
}

/// One log line as the JSON subscriber writes it, for when there is no subscriber.
fn json_line(message: &str, error: &str) -> String {
    fn quote(s: &str) -> String {
        let mut q = String::with_capacity(s.len() + 2);
        q.push('"');
        for c in s.chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                '\n' => q.push_str("\\n"),
                '\r' => q.push_str("\\r"),
                '\t' => q.push_str("\\t"),
                c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
                c => q.push(c),
            }
        }
        q.push('"');
        q
    }
    format!(
        "{{\"level\":\"ERROR\",\"message\":{},\"error\":{}}}",
        quote(message),
        quote(error)
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fatal_error_without_a_subscriber_is_one_json_line() {
        let line = json_line("invalid configuration", "bad:\n  - \"x\"\tand \\");
        assert_eq!(
            line,
            r#"{"level":"ERROR","message":"invalid configuration","error":"bad:\n  - \"x\"\tand \\"}"#
        );
    }

    #[test]
    fn env_names_follow_the_flag_names() {
        assert_eq!(env::for_flag("health-interval"), env::HEALTH_INTERVAL);
        assert_eq!(env::for_flag("lease-ttl"), env::LEASE_TTL);
        assert_eq!(env::for_flag("log"), env::LOG);
        assert_eq!(env::for_flag("kubeconfig"), env::KUBECONFIG);
        let cmd = clap::Command::new("x")
            .arg(clap::Arg::new("good").long("good").env("CLUSTERMESH_GOOD"))
            .arg(clap::Arg::new("bad").long("bad"))
            .arg(clap::Arg::new("wrong").long("wrong").env("WRONG"));
        assert_eq!(
            env::missing(&cmd),
            vec![
                "--bad: no env (expected CLUSTERMESH_BAD)".to_owned(),
                "--wrong: env WRONG, expected CLUSTERMESH_WRONG".to_owned(),
            ]
        );
    }
}
