//! `clustermesh`: the command users run.
//!
//! Today it manages certificates (`clustermesh certs ...`); `connect`, `status`, `services`
//! and `drill` build on the apiserver and node agent. Errors print as `error: ...` with their
//! whole cause chain and exit non-zero.

mod certs_cmd;

use clap::{Parser, Subcommand};

/// Connect Kubernetes clusters into one mesh, and see what it is doing.
#[derive(Debug, Parser)]
#[command(name = "clustermesh", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: telemetry::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create cluster CAs, issue, rotate and inspect certificates.
    #[command(subcommand)]
    Certs(certs_cmd::Certs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.log) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Certs(c) => certs_cmd::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
