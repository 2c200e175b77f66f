//! The `clustermesh-apiserver` binary: flags, logging, signals; the work is in the library.

use clap::Parser;
use clustermesh_apiserver::config::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(&args.log) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let open_files = telemetry::raise_fd_limit();
    tracing::debug!(open_files = ?open_files, "open-files limit");
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match clustermesh_apiserver::run(config, telemetry::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "apiserver failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
