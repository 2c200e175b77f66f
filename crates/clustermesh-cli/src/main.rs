//! `clustermesh`: the command users run.
//!
//! It works on kubeconfig contexts the way kubectl does: `connect` and `disconnect` clusters,
//! `status` of every cluster and peer, the mesh's global `services` (and what a node
//! programmed), failover `drill`s, and `certs`. Errors print as `error: ...` with their whole
//! cause chain and exit non-zero.

mod certs_cmd;
mod check;
mod connect;
mod drill;
mod kctx;
mod output;
mod services;
mod status;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Connect Kubernetes clusters into one mesh, and see what it is doing.
#[derive(Debug, Parser)]
#[command(
    name = "clustermesh",
    version,
    propagate_version = true,
    after_help = "Typical use:\n  \
        clustermesh connect --context east --destination-context west --wait\n  \
        clustermesh status --context east --context west\n  \
        clustermesh services --context east\n  \
        clustermesh drill --context east --service demo/echo\n\n\
        Contexts come from --kubeconfig, $KUBECONFIG (several files, `:`-separated) or ~/.kube/config."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: telemetry::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect two clusters (both directions by default): exchange endpoints, CA certificates
    /// and client certificates through their Kubernetes APIs. Safe to run again.
    Connect(connect::ConnectArgs),
    /// Disconnect two clusters: remove both directions (--force: only the first cluster's).
    Disconnect(connect::DisconnectArgs),
    /// Show every cluster's apiserver and peers; exit 1 when anything is not healthy.
    Status(status::StatusArgs),
    /// Check every cluster (apiserver, etcd, leader, peers, node agents, certificates,
    /// clocks, IDs, rejected objects): a ✔/✗ list with a hint per failure; exit 0 healthy,
    /// 1 unhealthy, 2 cannot check.
    Check(check::CheckArgs),
    /// Show the mesh's global services and their backends per cluster, or with --node what
    /// a node programmed against what it should have.
    Services(services::ServicesArgs),
    /// Run a failover drill on a global service and report detect / failover / recover times
    /// measured from a client; exit 1 when an SLO is missed.
    #[command(after_help = "Interrupting a drill:\n  \
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
    /// (Used by `drill`.) Connect to an address repeatedly and print where each connection
    /// really went, one JSON line per attempt.
    #[command(hide = true)]
    Probe(drill::ProbeArgs),
}

/// `90d`, `12h`, `30m`, `45s`, `250ms`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90d, 12h, 30m, 45s or 250ms"))?;
    let d = match unit {
        "d" => Duration::from_secs(n * 86400),
        "h" => Duration::from_secs(n * 3600),
        "m" => Duration::from_secs(n * 60),
        "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        _ => return Err(format!("{s:?}: unit must be one of d, h, m, s, ms")),
    };
    if d.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(d)
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

fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    // A command-line tool reports its own errors; libraries' logs are noise unless asked for.
    if std::env::var_os(telemetry::env::LOG).is_none()
        && !std::env::args().any(|a| a.starts_with("--log"))
    {
        cli.log.filter = "warn,kube_client=off".into();
    }
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Certs(c) => certs_cmd::run(c),
        Command::Probe(p) => drill::probe(p),
        other => match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async move {
                match other {
                    Command::Connect(a) => connect::connect(a).await,
                    Command::Disconnect(a) => connect::disconnect(a).await,
                    Command::Status(a) => status::run(a).await,
                    Command::Check(a) => check::run(a).await,
                    Command::Services(a) => services::run(a).await,
                    Command::Drill(a) => drill::run(a).await,
                    Command::Certs(_) | Command::Probe(_) => unreachable!("handled above"),
                }
            }),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_including_milliseconds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 minutes").is_err());
    }
}
