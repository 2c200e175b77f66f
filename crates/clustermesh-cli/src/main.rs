//! `clustermesh`: the command users run.
//!
//! It works on kubeconfig contexts the way kubectl does: `install` and `uninstall` the mesh,
//! `connect` and `disconnect` clusters,
//! `status` of every cluster and peer, the mesh's global `services` (and what a node
//! programmed), failover `drill`s, and `certs`; `version` and shell `completion`. Errors print
//! as `error: ...` with their whole cause chain, each cause once ([`errors`]), and exit
//! non-zero.

mod certs_cmd;
mod check;
mod cluster;
mod connect;
mod drill;
mod errors;
mod install;
mod observe;
mod output;
mod policy;
mod services;
mod status;
mod versions;

// `drill.rs` (another change in flight) still names `crate::kctx`; it goes once drill.rs says
// `crate::cluster`.
use cluster as kctx;

use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;

/// Connect Kubernetes clusters into one mesh, and see what it is doing.
#[derive(Debug, Parser)]
#[command(
    name = "clustermesh",
    version = telemetry::version::LONG,
    propagate_version = true,
    after_help = "Typical use:\n  \
        clustermesh install --context east --cluster-name east --cluster-id 1\n  \
        clustermesh connect --context east --destination-context west --wait\n  \
        clustermesh status --context east --context west --request-timeout 5s\n  \
        clustermesh services --context east\n  \
        clustermesh drill --context east --service demo/echo\n  \
        source <(clustermesh completion bash)\n\n\
        Contexts come from --kubeconfig, $KUBECONFIG (several files, `:`-separated) or ~/.kube/config.\n\
        Every request to a Kubernetes API or a Mesh API gives up after --request-timeout \
        (default 15s, 0: never). Durations take a unit: 500ms, 30s, 1m30s, 90d."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: telemetry::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install the mesh into a cluster: its CAs and certificates into Secrets, the manifests
    /// of deploy/ with the cluster's name and ID, then wait until it is ready. Safe to run
    /// again: a second install changes nothing.
    #[command(after_help = "Examples:\n  \
        clustermesh install --context east --cluster-name east --cluster-id 1 \\\n    \
          --mesh-endpoint mesh.east.example.com:4240 --image registry.example.com/clustermesh:v0.1.0\n  \
        clustermesh install --context kind-east --cluster-name east --cluster-id 1 \\\n    \
          --service-type node-port --mesh-endpoint 172.18.0.2:32379 --image clustermesh:dev\n  \
        clustermesh install --cluster-name east --cluster-id 1 --dry-run     # print the manifests\n\n\
        Needs kubectl on PATH (the manifests are rendered with `kubectl kustomize`). No CA key is\n\
        written to disk unless --keep-ca DIR asks for it; the cluster CA's key is kept in Secret\n\
        kube-system/clustermesh-ca, which `clustermesh connect` reads.")]
    Install(install::InstallArgs),
    /// Remove what `clustermesh install` created (found by its label), and nothing else.
    #[command(after_help = "Example:\n  \
        clustermesh uninstall --context east\n\n\
        Left in place and named: Secrets written by `clustermesh connect` (run disconnect), the\n\
        apiserver's status ConfigMap and Lease, and etcd's PersistentVolumeClaim.")]
    Uninstall(install::UninstallArgs),
    /// Connect two clusters (both directions by default): exchange endpoints, CA certificates
    /// and client certificates through their Kubernetes APIs. Safe to run again.
    Connect(connect::ConnectArgs),
    /// Disconnect two clusters: remove both directions (--force: only the first cluster's).
    Disconnect(connect::DisconnectArgs),
    /// Show every cluster's apiserver and peers, and the versions they run (minor skew: a
    /// warning); exit 1 when anything is not healthy.
    Status(status::StatusArgs),
    /// Check every cluster (apiserver, etcd, leader, peers, node agents, certificates,
    /// clocks, IDs, rejected objects, version skew): a ✔/⚠/✗ list with a hint per failure or
    /// warning; exit 0 healthy (warnings included), 1 unhealthy, 2 cannot check.
    Check(check::CheckArgs),
    /// Show the mesh's global services and their backends per cluster, or with --node what
    /// a node programmed against what it should have.
    Services(services::ServicesArgs),
    /// Show a pod's network policy as its node's kernel holds it: ingress/egress enforced,
    /// and which peers (identity, cluster, labels) are allowed or denied on which ports by
    /// which policy, read back from the eBPF maps.
    #[command(after_help = "Example:\n  \
        clustermesh policy --context east --pod rebel/x-wing\n\n\
        The node agent reads the entries back from its maps; an entry it wrote that the kernel\n\
        does not hold is not shown. PEER `any` is a rule for every peer (an L4-only rule or the\n\
        `all` entity); identities 1 and 2 are the host and the world (addresses of no cluster).")]
    Policy(policy::PolicyArgs),
    /// Show the flows of one or more clusters: each new connection and first datagram with
    /// its source and destination pods and clusters, the service and backend (tier, failover)
    /// and the verdict (forwarded, no_backend, denied_by_policy with the policy,
    /// denied_by_default), relayed by each cluster's apiserver from its node agents.
    #[command(after_help = "Examples:\n  \
        clustermesh observe --context east                       # the last 20 flows\n  \
        clustermesh observe --context east --context west --follow\n  \
        clustermesh observe --context east --verdict denied --since 10m\n  \
        clustermesh observe --context east --service rebel/rebel-base --to-cluster west -o json\n\n\
        Lines: TIME DIRECTION SOURCE → DESTINATION [via svc NAME tier N (failover)] PROTO VERDICT\n\
        (reason) [node]. `egress` flows are seen at the caller's node, `ingress` (⇢) at the\n\
        receiving pod's node; a flow between clusters shows in both when both are observed.\n\
        With --follow, a lost apiserver or node stream is reconnected (said on stderr) and the\n\
        flows since the last one shown are asked for again.")]
    Observe(observe::ObserveArgs),
    /// Draw the cross-cluster service map of the flows of the last --since (default 5m) as
    /// one self-contained HTML page (SVG; no network needed to view it): clusters as groups,
    /// workloads and services as nodes, edges weighted by flow count and coloured by verdict.
    #[command(after_help = "Examples:\n  \
        clustermesh map --context east --context west --output map.html\n  \
        clustermesh map --context east --since 1h --namespace rebel -o rebel.html\n\n\
        A connection seen at both ends (egress at the caller's node, ingress at the receiver's)\n\
        counts once. Workloads are named by their `app` label, else by pod name; flows from\n\
        nodes themselves (the agents' health probes) are left out unless --include-nodes.")]
    Map(observe::MapArgs),
    /// Run a failover drill on a global service and report detect / failover / recover times
    /// measured from a client; exit 1 when an SLO is missed.
    #[command(after_help = "Output:\n  \
        Each event of the timeline goes to stderr the moment the drill sees it, as\n  \
        `  +41.2 ms  first failed connection: ...` (time since the take-down started), next to\n  \
        `drill: ...` progress lines. stdout holds only the final report, which lists the same\n  \
        events: with -o json|yaml it is one document.\n\n\
        Interrupting a drill:\n  \
        Ctrl-C (SIGINT) or SIGTERM at any point stops the probe and restores what the drill took\n  \
        down before exiting: with --method not-ready every EndpointSlice it changed gets its\n  \
        endpoints' conditions back as they were; with --method command, --up-cmd runs. One\n  \
        `restored: ...` line per object goes to stderr, and the exit code is 130 (SIGINT) or\n  \
        143 (SIGTERM). What cannot be restored is named with the kubectl command (or your\n  \
        --up-cmd) that restores it by hand, and the exit code is 1. A second Ctrl-C does not\n  \
        stop a restore under way: it prints what remains and how to restore it by hand.")]
    Drill(drill::DrillArgs),
    /// Create cluster CAs, issue, rotate and inspect certificates.
    #[command(subcommand)]
    Certs(certs_cmd::Certs),
    /// Print the version, git commit and build date.
    Version {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: output::Format,
    },
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        source <(clustermesh completion bash)                      # this bash session\n  \
        clustermesh completion bash > /etc/bash_completion.d/clustermesh\n  \
        clustermesh completion zsh > \"${fpath[1]}/_clustermesh\"\n  \
        clustermesh completion fish > ~/.config/fish/completions/clustermesh.fish")]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// (Used by `drill`.) Connect to an address repeatedly and print where each connection
    /// really went, one JSON line per attempt.
    #[command(hide = true)]
    Probe(drill::ProbeArgs),
}

/// A Unix time as an RFC 3339 date.
pub(crate) fn format_unix(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// What `clustermesh version -o json|yaml` prints.
#[derive(Debug, Serialize)]
struct Version {
    version: &'static str,
    commit: &'static str,
    build_date: &'static str,
}

fn version(format: output::Format) -> anyhow::Result<std::process::ExitCode> {
    let v = Version {
        version: telemetry::version::VERSION,
        commit: telemetry::version::COMMIT,
        build_date: telemetry::version::BUILD_DATE,
    };
    if !output::structured(format, &v)? {
        println!("clustermesh {}", telemetry::version::LONG);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    // A command-line tool reports its own errors; libraries' logs are noise unless asked for.
    if std::env::var_os(telemetry::env::LOG).is_none()
        && !std::env::args().any(|a| a.starts_with("--log"))
    {
        cli.log.filter = "warn,kube_client=off".into();
    }
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("error: {}", errors::render_dyn(&e));
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Certs(c) => certs_cmd::run(c),
        Command::Probe(p) => drill::probe(p),
        Command::Version { output } => version(output),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "clustermesh",
                &mut std::io::stdout(),
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        other => match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async move {
                match other {
                    Command::Install(a) => install::install(a).await,
                    Command::Uninstall(a) => install::uninstall(a).await,
                    Command::Connect(a) => connect::connect(a).await,
                    Command::Disconnect(a) => connect::disconnect(a).await,
                    Command::Status(a) => status::run(a).await,
                    Command::Check(a) => check::run(a).await,
                    Command::Services(a) => services::run(a).await,
                    Command::Policy(a) => policy::run(a).await,
                    Command::Observe(a) => observe::run(a).await,
                    Command::Map(a) => observe::map(a).await,
                    Command::Drill(a) => drill::run(a).await,
                    Command::Certs(_)
                    | Command::Probe(_)
                    | Command::Version { .. }
                    | Command::Completion { .. } => unreachable!("handled above"),
                }
            }),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", errors::render(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
