//! `kube-testserver`: the Kubernetes API test server as a process, for the local demo and for
//! poking at it with kubectl. Test infrastructure, never deployed.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// A Kubernetes API server stand-in for tests and the local demo (not for production).
#[derive(Debug, Parser)]
#[command(name = "kube-testserver", version)]
struct Args {
    /// The emulated cluster's name; the kubeconfig context is named after it.
    #[arg(long, default_value = "kind-test")]
    cluster: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Directory for the CA, server certificate and kubeconfig.
    #[arg(long)]
    dir: PathBuf,
    /// How many changes to keep for watch replay and list continuation.
    #[arg(long, default_value_t = 10_000)]
    retain: usize,
    #[command(flatten)]
    log: telemetry::LogArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(&args.log) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = match model::ClusterName::new(args.cluster.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: --cluster: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut config = kube_testserver::Config::new(cluster);
    config.bind = args.bind;
    config.dir = Some(args.dir);
    config.retain = args.retain;
    let handle = match kube_testserver::start(config).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "serving {} (kubeconfig {}, context {})",
        handle.url(),
        handle.kubeconfig().display(),
        handle.context()
    );
    let _ = tokio::signal::ctrl_c().await;
    std::process::ExitCode::SUCCESS
}
