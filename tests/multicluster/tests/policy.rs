//! Issue 16 on the lab: identity policy across three clusters, enforced in the kernel of the
//! client's and the server's nodes, from `CiliumNetworkPolicy` objects applied with the
//! Kubernetes API. east runs `x-wing` (client) and a `rebel-base`; west a `rebel-base` and a
//! `tie`; north a `rebel-base`. Real connects from x-wing to each server pod's address.
//! About 2 minutes; run as root after `cargo build --workspace --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use multicluster::lab::{BACKEND_PORT, Component, Lab};
use multicluster::{LabCluster, scenarios};
use tokio::sync::Mutex;

const NS: &str = "rebel";

fn cnp() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", "v2", "CiliumNetworkPolicy"),
        "ciliumnetworkpolicies",
    )
}

/// Creates or replaces `name` in east with `spec` (server-side apply, as `kubectl apply`).
async fn apply(client: &kube::Client, cluster: &str, name: &str, spec: serde_json::Value) {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &cnp());
    let obj = serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("policy-test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {name} in {cluster}: {e}"));
}

/// East's policy `x-wing-to-west`: x-wing's egress is `egress` (a list of rules).
async fn xwing_egress(client: &kube::Client, egress: serde_json::Value) {
    apply(
        client,
        "east",
        "x-wing-to-west",
        serde_json::json!({
            "endpointSelector": {"matchLabels": {"app": "x-wing"}},
            "egress": egress,
        }),
    )
    .await;
}

async fn delete(client: &kube::Client, name: &str) {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &cnp());
    api.delete(name, &Default::default()).await.unwrap();
}

/// Which of `targets` x-wing reaches now (2 connects each; a refused or dropped one fails).
async fn reached(
    lab: &Arc<Mutex<Lab>>,
    targets: &BTreeMap<&'static str, SocketAddr>,
) -> BTreeMap<&'static str, bool> {
    let mut out = BTreeMap::new();
    for (name, t) in targets {
        let tally = lab
            .lock()
            .await
            .connect_from("east", "x-wing", *t, 2)
            .unwrap();
        out.insert(*name, !tally.contains_key("failed"));
    }
    out
}

/// Waits until x-wing reaches exactly `want` of the targets; returns how long it took.
async fn until(
    lab: &Arc<Mutex<Lab>>,
    targets: &BTreeMap<&'static str, SocketAddr>,
    want: &[&str],
    what: &str,
) -> Duration {
    let started = Instant::now();
    let deadline = started + scenarios::CONVERGE;
    loop {
        let now = reached(lab, targets).await;
        let got: Vec<&str> = now.iter().filter(|(_, ok)| **ok).map(|(n, _)| *n).collect();
        if got == want {
            eprintln!(
                "{what}: x-wing reaches {got:?} after {:?}",
                started.elapsed()
            );
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: x-wing should reach {want:?}, reaches {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts `n` sequential attempts from x-wing to `target` (a process in its pod): TCP
/// connects, or UDP datagrams each awaiting its answer.
async fn spawn_from(
    lab: &Arc<Mutex<Lab>>,
    target: SocketAddr,
    n: u32,
    udp: bool,
) -> std::process::Child {
    let me = multicluster::lab::binary("clustermesh-lab").unwrap();
    let mut argv = vec![
        me.display().to_string(),
        "client".into(),
        "--target".into(),
        target.to_string(),
        "--count".into(),
        n.to_string(),
    ];
    if udp {
        argv.push("--udp".into());
    }
    lab.lock()
        .await
        .pod_command("east", "x-wing", &argv)
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// `n` sequential TCP connects from x-wing to `target`, running.
async fn loop_from(lab: &Arc<Mutex<Lab>>, target: SocketAddr, n: u32) -> std::process::Child {
    spawn_from(lab, target, n, false).await
}

/// `n` UDP datagrams from x-wing to `target`, each awaiting its answer: who answered.
async fn udp_from(lab: &Arc<Mutex<Lab>>, target: SocketAddr, n: u32) -> BTreeMap<String, u32> {
    tally(spawn_from(lab, target, n, true).await)
}

/// The tally a loop printed.
fn tally(child: std::process::Child) -> BTreeMap<String, u32> {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_policy_across_three_clusters() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    lab.install_cluster("east", 1, 1).await.unwrap();
    lab.install_cluster("west", 2, 1).await.unwrap();
    lab.install_cluster("north", 3, 1).await.unwrap();
    let kc = lab.kubeconfig();
    let none = BTreeMap::new();
    lab.deploy("east", "rebel/rebel-base", 1, &none)
        .await
        .unwrap();
    lab.deploy("west", "rebel/rebel-base", 1, &none)
        .await
        .unwrap();
    lab.deploy("west", "rebel/tie", 1, &none).await.unwrap();
    lab.deploy("north", "rebel/rebel-base", 1, &none)
        .await
        .unwrap();
    let node = lab.cluster("east").unwrap().nodes[0].name.clone();
    let xwing = BTreeMap::from([("app".to_owned(), "x-wing".to_owned())]);
    lab.add_pod("east", NS, "x-wing", &node, &xwing)
        .await
        .unwrap();
    let pod = |lab: &Lab, cluster: &str, prefix: &str| {
        let p = lab
            .cluster(cluster)
            .unwrap()
            .pods
            .iter()
            .find(|p| p.name.starts_with(prefix))
            .unwrap()
            .ip;
        SocketAddr::from((p, BACKEND_PORT))
    };
    let targets = BTreeMap::from([
        ("east/rebel-base", pod(&lab, "east", "rebel-base")),
        ("north/rebel-base", pod(&lab, "north", "rebel-base")),
        ("west/rebel-base", pod(&lab, "west", "rebel-base")),
        ("west/tie", pod(&lab, "west", "tie")),
    ]);
    let east_kube = lab.client("east").await.unwrap();
    let west_kube = lab.client("west").await.unwrap();
    let lab = Arc::new(Mutex::new(lab));
    let (east, west, north) = (
        LabCluster::new(&lab, "east").await,
        LabCluster::new(&lab, "west").await,
        LabCluster::new(&lab, "north").await,
    );
    scenarios::connect(&kc, &east, &west).await.unwrap();
    scenarios::connect(&kc, &east, &north).await.unwrap();
    let all = [
        "east/rebel-base",
        "north/rebel-base",
        "west/rebel-base",
        "west/tie",
    ];
    until(&lab, &targets, &all, "no policy").await;

    // The documented example: x-wing may reach west's rebel-base only.
    xwing_egress(
        &east_kube,
        serde_json::json!([{"toEndpoints": [{"matchLabels": {
                "app": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}]}]),
    )
    .await;
    until(
        &lab,
        &targets,
        &["west/rebel-base"],
        "rebel-base in west only",
    )
    .await;
    // What x-wing's node programmed, read back from its maps by the CLI.
    let out = multicluster::clustermesh(
        &kc,
        &[
            "policy",
            "--context",
            "east",
            "--pod",
            "rebel/x-wing",
            "-o",
            "json",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["egress_enforced"], true, "{doc}");
    assert_eq!(doc["ingress_enforced"], false, "{doc}");
    assert!(doc["cgroups"].as_u64().unwrap() >= 1, "{doc}");
    let entries = doc["entries"].as_array().unwrap();
    assert!(!entries.is_empty(), "{doc}");
    for e in entries {
        assert_eq!(e["direction"], "egress", "{e}");
        assert_eq!(e["verdict"], "allow", "{e}");
        assert_eq!(e["peer_cluster"], "west", "only west's rebel-base: {e}");
        assert!(
            e["peer_labels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l == "k8s:app=rebel-base"),
            "{e}"
        );
        assert_eq!(
            e["policy"], "CiliumNetworkPolicy rebel/x-wing-to-west",
            "{e}"
        );
    }
    let table = multicluster::clustermesh(
        &kc,
        &["policy", "--context", "east", "--pod", "rebel/x-wing"],
    )
    .await
    .unwrap();
    eprintln!("clustermesh policy --pod rebel/x-wing:\n{}", table.stdout);
    assert!(
        table.stdout.contains("egress default deny"),
        "{}",
        table.stdout
    );
    // UDP: the same verdicts (the policy names no port: TCP and UDP).
    let udp = udp_from(&lab, targets["west/rebel-base"], 3).await;
    assert_eq!(udp.get("failed"), None, "UDP to west's rebel-base: {udp:?}");
    let udp = udp_from(&lab, targets["east/rebel-base"], 3).await;
    assert_eq!(
        udp.get("failed"),
        Some(&3),
        "UDP to east's rebel-base refused: {udp:?}"
    );

    // An invalid policy (a named port) is refused alone: its Valid condition names the field,
    // nothing of it is enforced, the valid policy still is.
    apply(
        &east_kube,
        "east",
        "broken",
        serde_json::json!({
            "endpointSelector": {"matchLabels": {"app": "x-wing"}},
            "egress": [{"toPorts": [{"ports": [{"port": "http"}]}]}],
        }),
    )
    .await;
    let api: Api<DynamicObject> = Api::namespaced_with(east_kube.clone(), NS, &cnp());
    let deadline = Instant::now() + scenarios::CONVERGE;
    let message = loop {
        let o = api.get("broken").await.unwrap();
        let valid = o.data["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Valid").cloned());
        if let Some(c) = valid.filter(|c| c["status"] == "False") {
            break c["message"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no Valid=False condition on the broken policy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("invalid policy: {message}");
    // ... and a Warning Event on it.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(east_kube.clone(), NS);
    let deadline = Instant::now() + scenarios::CONVERGE;
    loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("InvalidPolicy")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("ports[0].port"))
            });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no InvalidPolicy Warning Event for the broken policy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        message.contains("spec.egress[0].toPorts[0].ports[0].port"),
        "{message}"
    );
    until(
        &lab,
        &targets,
        &["west/rebel-base"],
        "the invalid policy changes nothing",
    )
    .await;
    delete(&east_kube, "broken").await;

    // Naming north too (matchExpressions on the cluster label).
    xwing_egress(
        &east_kube,
        serde_json::json!([{"toEndpoints": [{
                "matchLabels": {"app": "rebel-base"},
                "matchExpressions": [{"key": "io.cilium.k8s.policy.cluster",
                                      "operator": "In", "values": ["west", "north"]}]}]}]),
    )
    .await;
    until(
        &lab,
        &targets,
        &["north/rebel-base", "west/rebel-base"],
        "rebel-base in west and north",
    )
    .await;

    // No cluster label: the policy's own cluster only (Cilium 1.19's default).
    xwing_egress(
        &east_kube,
        serde_json::json!([{"toEndpoints": [{"matchLabels": {"app": "rebel-base"}}]}]),
    )
    .await;
    until(
        &lab,
        &targets,
        &["east/rebel-base"],
        "no cluster label: east only",
    )
    .await;
    // The compatibility flag on east's node agent: the same policy selects every cluster's.
    let east_node = lab.lock().await.cluster("east").unwrap().nodes[0]
        .name
        .clone();
    let flag = "--policy-selectors-any-cluster";
    lab.lock()
        .await
        .restart_agent_with("east", &east_node, flag, true)
        .await
        .unwrap();
    until(
        &lab,
        &targets,
        &["east/rebel-base", "north/rebel-base", "west/rebel-base"],
        "no cluster label, --policy-selectors-any-cluster",
    )
    .await;
    lab.lock()
        .await
        .restart_agent_with("east", &east_node, flag, false)
        .await
        .unwrap();
    until(&lab, &targets, &["east/rebel-base"], "the flag off again").await;

    // The mesh entity: every connected cluster.
    xwing_egress(&east_kube, serde_json::json!([{"toEntities": ["mesh"]}])).await;
    until(&lab, &targets, &all, "toEntities mesh").await;

    // Ingress on west's side: its rebel-base admits no one from east, whatever east lets out.
    apply(
        &west_kube,
        "west",
        "rebel-base-closed",
        serde_json::json!({
            "endpointSelector": {"matchLabels": {"app": "rebel-base"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "nobody"}}]}],
        }),
    )
    .await;
    until(
        &lab,
        &targets,
        &["east/rebel-base", "north/rebel-base", "west/tie"],
        "west's ingress policy",
    )
    .await;
    let udp = udp_from(&lab, targets["west/rebel-base"], 1).await;
    assert_eq!(
        udp.get("failed"),
        Some(&1),
        "UDP dropped at west's ingress: {udp:?}"
    );
    // ... and admits x-wing from east once it names it.
    apply(
        &west_kube,
        "west",
        "rebel-base-closed",
        serde_json::json!({
            "endpointSelector": {"matchLabels": {"app": "rebel-base"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {
                "app": "x-wing", "io.cilium.k8s.policy.cluster": "east"}}]}],
        }),
    )
    .await;
    until(&lab, &targets, &all, "west admits east's x-wing").await;
    let udp = udp_from(&lab, targets["west/rebel-base"], 3).await;
    assert_eq!(udp.get("failed"), None, "UDP admitted by west: {udp:?}");

    // Back to the documented example for the next steps.
    xwing_egress(
        &east_kube,
        serde_json::json!([{"toEndpoints": [{"matchLabels": {
                "app": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}]}]),
    )
    .await;
    until(&lab, &targets, &["west/rebel-base"], "the example again").await;

    // East's node agent restarts while x-wing connects in a loop to an allowed and a refused
    // target: no wrong verdict (the pinned maps keep enforcing; the new agent learns them).
    let east_node = lab.lock().await.cluster("east").unwrap().nodes[0]
        .name
        .clone();
    let allowed = loop_from(&lab, targets["west/rebel-base"], 3000).await;
    let refused = loop_from(&lab, targets["east/rebel-base"], 30000).await;
    {
        let agent = Component::NodeAgent(east_node);
        let mut lab = lab.lock().await;
        lab.crash("east", &agent).unwrap();
        lab.restart("east", &agent).await.unwrap();
    }
    let (ok, bad) = (tally(allowed), tally(refused));
    assert!(
        !ok.contains_key("failed"),
        "allowed across the restart: {ok:?}"
    );
    assert_eq!(ok.values().sum::<u32>(), 3000, "{ok:?}");
    assert_eq!(
        bad.get("failed"),
        Some(&30000),
        "refused across the restart: {bad:?}"
    );
    eprintln!(
        "node agent restart: 3000 allowed connections served, 30000 refused, no wrong verdict"
    );

    // A west pod's labels change (tie becomes a rebel-base): east's verdict for it follows,
    // while the connections to the other rebel-base go on unrefused.
    let allowed = loop_from(&lab, targets["west/rebel-base"], 1500).await;
    let tie = lab
        .lock()
        .await
        .cluster("west")
        .unwrap()
        .pods
        .iter()
        .find(|p| p.name.starts_with("tie"))
        .unwrap()
        .name
        .clone();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(west_kube.clone(), NS);
    let started = Instant::now();
    pods.patch(
        &tie,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"app": "rebel-base"}}})),
    )
    .await
    .unwrap();
    let took = until(
        &lab,
        &targets,
        &["west/rebel-base", "west/tie"],
        "tie relabelled rebel-base",
    )
    .await;
    let ok = tally(allowed);
    assert!(!ok.contains_key("failed"), "during the relabel: {ok:?}");
    eprintln!(
        "label change in west → east's verdict changed within {:?} (patch to first allowed probe round; {took:?} of probing)",
        started.elapsed()
    );

    // Policies gone: everything flows again.
    delete(&east_kube, "x-wing-to-west").await;
    delete(&west_kube, "rebel-base-closed").await;
    until(&lab, &targets, &all, "policies deleted").await;
    lab.lock().await.teardown();
    let _ = north;
}
