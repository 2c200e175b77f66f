//! Helpers shared by the test server's integration tests.

#![allow(dead_code)]

use std::time::Duration;

use kube_testserver::{Config, Handle};

/// Starts a server for a uniquely named cluster.
pub(crate) async fn start() -> Handle {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = model::ClusterName::new(test_support::unique_name("kts")).unwrap();
    let mut cfg = Config::new(cluster);
    cfg.bookmark_interval = Duration::from_millis(200);
    kube_testserver::start(cfg).await.unwrap()
}

/// A kube-rs client from the server's kubeconfig, exactly as production code builds one.
pub(crate) async fn client(h: &Handle, context: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(h.kubeconfig()).unwrap();
    let opts = kube::config::KubeConfigOptions {
        context: Some(context.to_owned()),
        ..Default::default()
    };
    let cfg = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}
