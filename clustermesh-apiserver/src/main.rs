//! The `clustermesh-apiserver` binary: flags, logging, signals; the work is in the library.
//!
//! A fatal error is reported once, in the log format asked for (`telemetry::fatal`).

use clap::Parser;
use clustermesh_apiserver::config::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let format = args.log.log_format;
    if let Err(e) = telemetry::init(&args.log) {
        telemetry::fatal(format, "invalid logging flags", &e);
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let open_files = telemetry::raise_fd_limit();
    tracing::debug!(open_files = ?open_files, "open-files limit");
    tracing::info!(
        version = telemetry::version::LONG,
        "clustermesh-apiserver starting"
    );
    let (config, enroll) = match (args.validate(), args.enroll.validate()) {
        (Ok(c), Ok(e)) => (c, e),
        (a, b) => {
            let problems: Vec<String> = [a.err(), b.err()]
                .into_iter()
                .flatten()
                .flat_map(|e| e.problems)
                .collect();
            let e = clustermesh_apiserver::config::Error { problems };
            telemetry::fatal(format, "invalid configuration", &e);
            return std::process::ExitCode::from(2);
        }
    };
    match clustermesh_apiserver::run(config, enroll, telemetry::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            telemetry::fatal(format, "apiserver failed", &telemetry::chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
