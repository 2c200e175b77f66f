//! The lab's scenarios on kind clusters (`tests/multicluster/kind/up.sh` first). Needs Docker,
//! kind and kubectl, so it cannot run in this repository's CI: it is ignored there and runs
//! with `CLUSTERMESH_KIND=1 cargo test -p multicluster --test kind -- --ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use multicluster::kind::KindCluster;
use multicluster::scenarios;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and kind: run tests/multicluster/kind/up.sh, then CLUSTERMESH_KIND=1 cargo test -p multicluster --test kind -- --ignored"]
async fn mesh_scenarios_on_kind() {
    assert_eq!(
        std::env::var("CLUSTERMESH_KIND").as_deref(),
        Ok("1"),
        "set CLUSTERMESH_KIND=1 after tests/multicluster/kind/up.sh"
    );
    let kubeconfig = std::env::var_os("KUBECONFIG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".kube/config")
        });
    let (east, west) = (KindCluster::new("east"), KindCluster::new("west"));
    scenarios::connect(&kubeconfig, &east, &west).await.unwrap();
    let (echo_east, _) = scenarios::global_services(&kubeconfig, &east, &west)
        .await
        .unwrap();
    scenarios::failover(&kubeconfig, &east, &west, echo_east)
        .await
        .unwrap();
}
