//! clustermesh-apiserver: one per cluster; the only writer of the cluster's etcd.
//!
//! Today it validates its configuration, connects to etcd over mTLS and registers the cluster
//! (name and ID) in etcd, refusing to start if that etcd already belongs to a cluster of the
//! same name with another ID. The exporter (Kubernetes → etcd), the Mesh API and the importer
//! build on this.
//!
//! Must not talk to a peer's etcd (peers talk through the Mesh API only).

pub mod config;

use anyhow::Context;

/// Runs the apiserver until `shutdown` resolves.
pub async fn run(
    config: config::Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = kvstore::Client::connect(config.etcd.clone())
        .await
        .context("connect to etcd")?;
    client
        .register_cluster(&wire::ClusterConfig {
            name: config.cluster_name.clone(),
            id: config.cluster_id,
            capabilities: Vec::new(),
        })
        .await
        .context("register cluster")?;
    tracing::info!(
        cluster = %config.cluster_name,
        cluster_id = %config.cluster_id,
        "registered in etcd; running"
    );
    shutdown.await;
    tracing::info!("shutting down");
    Ok(())
}
