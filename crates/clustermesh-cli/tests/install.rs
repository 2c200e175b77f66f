//! `clustermesh install` and `uninstall` against the Kubernetes API test server, run as the
//! binary a user runs. No kubelet or workload controllers run there, so readiness is written
//! by the test through the status subresource, as the controllers would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");
const T: Duration = Duration::from_secs(60);
const SELECTOR: &str = "app.kubernetes.io/managed-by=clustermesh-install";

fn command(home: &Path, kubeconfig: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", kubeconfig)
        .kill_on_drop(true);
    cmd
}

async fn run(home: &Path, kubeconfig: &Path, args: &[&str]) -> Output {
    tokio::time::timeout(T, command(home, kubeconfig, args).output())
        .await
        .expect("clustermesh did not finish in time")
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every object carrying install's label: `kind/name`.
async fn ours(client: &kube::Client) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (group, kind, plural, namespaced) in [
        ("apps", "DaemonSet", "daemonsets", true),
        ("apps", "Deployment", "deployments", true),
        ("apps", "StatefulSet", "statefulsets", true),
        (
            "policy",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        ),
        (
            "networking.k8s.io",
            "NetworkPolicy",
            "networkpolicies",
            true,
        ),
        ("", "Service", "services", true),
        ("", "ConfigMap", "configmaps", true),
        ("", "Secret", "secrets", true),
        (
            "rbac.authorization.k8s.io",
            "RoleBinding",
            "rolebindings",
            true,
        ),
        ("rbac.authorization.k8s.io", "Role", "roles", true),
        (
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        ("", "ServiceAccount", "serviceaccounts", true),
        (
            "apiextensions.k8s.io",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
    ] {
        let ar = kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(group, "v1", kind),
            plural,
        );
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(client.clone(), "kube-system", &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        for o in api
            .list(&ListParams::default().labels(SELECTOR))
            .await
            .unwrap()
            .items
        {
            out.insert(format!(
                "{}/{}",
                kind.to_lowercase(),
                o.metadata.name.unwrap()
            ));
        }
    }
    out
}

/// What a controller and kubelets would report once every workload runs its current spec.
async fn report_ready(client: &kube::Client) {
    let pp = PatchParams::default();
    let d: Api<Deployment> = Api::namespaced(client.clone(), "kube-system");
    let g = d
        .get("clustermesh-apiserver")
        .await
        .unwrap()
        .metadata
        .generation;
    d.patch_status(
        "clustermesh-apiserver",
        &pp,
        &Patch::Merge(json!({"status": {"observedGeneration": g, "replicas": 2,
            "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}})),
    )
    .await
    .unwrap();
    let s: Api<StatefulSet> = Api::namespaced(client.clone(), "kube-system");
    let g = s.get("clustermesh-etcd").await.unwrap().metadata.generation;
    s.patch_status(
        "clustermesh-etcd",
        &pp,
        &Patch::Merge(json!({"status": {"observedGeneration": g, "replicas": 1,
            "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}})),
    )
    .await
    .unwrap();
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    let g = ds
        .get("clustermesh-node-agent")
        .await
        .unwrap()
        .metadata
        .generation;
    ds.patch_status(
        "clustermesh-node-agent",
        &pp,
        &Patch::Merge(
            json!({"status": {"observedGeneration": g, "currentNumberScheduled": 2,
            "numberMisscheduled": 0, "desiredNumberScheduled": 2, "numberReady": 2,
            "updatedNumberScheduled": 2, "numberAvailable": 2}}),
        ),
    )
    .await
    .unwrap();
}

/// Files under `dir` holding a private key.
fn private_keys(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(private_keys(&p));
        } else if std::fs::read_to_string(&p).is_ok_and(|t| t.contains("PRIVATE KEY")) {
            found.push(p.display().to_string());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_refuses_another_id_and_uninstall_removes_only_its_objects() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let home = tempfile::tempdir().unwrap();
    let cluster = test_support::unique_name("inst");
    let kube = kube_testserver::start(kube_testserver::Config::new(
        model::ClusterName::new(cluster.clone()).unwrap(),
    ))
    .await
    .unwrap();
    let kc = kube.kubeconfig().to_owned();
    let client = kube.client().await.unwrap();
    let install = [
        "install",
        "--context",
        cluster.as_str(),
        "--cluster-name",
        "east",
        "--cluster-id",
        "7",
        "--mesh-endpoint",
        "mesh.east.example.com:4240",
        "--image",
        "registry.example.com/clustermesh:v1",
    ];

    // What install will apply, from its own dry run.
    let out = run(home.path(), &kc, &[&install[..], &["--dry-run"]].concat()).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rendered: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text(&out.stdout)).unwrap();
    let mut expected: BTreeSet<String> = rendered
        .iter()
        .filter(|o| o.is_object())
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap().to_lowercase(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for s in [
        "secret/clustermesh-ca",
        "secret/clustermesh-apiserver-tls",
        "secret/clustermesh-node-agent-issuer",
        "secret/clustermesh-etcd-server",
        "secret/clustermesh-etcd-client",
        "configmap/clustermesh-ca-bundle",
    ] {
        expected.insert(s.to_owned());
    }
    // First install: everything stored; nothing becomes ready (no kubelet), so the wait
    // ends at --timeout with what is missing.
    let out = run(
        home.path(),
        &kc,
        &[&install[..], &["--timeout", "2s"]].concat(),
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("waiting for deployment/clustermesh-apiserver: its controller has not seen the current spec yet"),
        "{stderr}"
    );
    assert!(
        stderr.starts_with("waiting for ") || stderr.contains("\nwaiting for "),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: context {cluster}: waiting for the mesh to be ready: not ready after 2s (--timeout): "
        )) && stderr.contains("daemonset/clustermesh-node-agent: its controller has not seen the current spec yet"),
        "{stderr}"
    );
    assert_eq!(ours(&client).await, expected);
    assert!(text(&out.stdout).contains("secret/clustermesh-ca created"));
    // The CA key is in the cluster, not on disk.
    let ca: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    let ca = ca.get("clustermesh-ca").await.unwrap();
    assert!(ca.data.unwrap().contains_key("ca.key"));
    assert_eq!(
        private_keys(home.path()),
        Vec::<String>::new(),
        "no key on disk"
    );

    // Second install: nothing written, no wait, says so.
    let rv = kube.resource_version();
    let out = run(
        home.path(),
        &kc,
        &[&install[..], &["--timeout", "5s"]].concat(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).ends_with(&format!(
            "cluster east (ID 7) is already installed in context {cluster}: nothing changed\n"
        )),
        "{}",
        text(&out.stdout)
    );
    assert!(!text(&out.stdout).contains(" created") && !text(&out.stdout).contains(" configured"));
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        kube.resource_version(),
        rv,
        "a second install writes nothing"
    );

    // Another cluster ID over it: refused with a hint, nothing written.
    let mut other = install;
    other[6] = "8";
    let out = run(home.path(), &kc, &other).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: context {cluster} already holds cluster east (ID 7) (from Secret kube-system/clustermesh-apiserver-tls); installing cluster east (ID 8) over it is refused: its peers know it by that name and ID. To reinstall: clustermesh uninstall --context {cluster}, then install again\n"
        )
    );
    assert_eq!(kube.resource_version(), rv);

    // A new image: the workloads change; install waits, printing progress, until the
    // controllers (here: the test) report the new generation ready.
    report_ready(&client).await;
    let mut upgrade = install;
    upgrade[10] = "registry.example.com/clustermesh:v2";
    let child = command(
        home.path(),
        &kc,
        &[&upgrade[..], &["--timeout", "50s"]].concat(),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // The DaemonSet is applied last of the workloads: once it has the new image, every
    // workload has its new spec, which the "controllers" then report on.
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    test_support::eventually("the new image applied", T, || async {
        let d = daemonsets.get("clustermesh-node-agent").await.unwrap();
        let image = d.spec?.template.spec?.containers[0].image.clone()?;
        (image == "registry.example.com/clustermesh:v2").then_some(())
    })
    .await;
    report_ready(&client).await;
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));

    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("deployment/clustermesh-apiserver configured"),
        "{stdout}"
    );
    assert!(
        stdout.contains("statefulset/clustermesh-etcd unchanged"),
        "{stdout}"
    );
    assert!(
        stderr.contains("deployment/clustermesh-apiserver: ready"),
        "{stderr}"
    );
    assert!(
        stderr.contains("daemonset/clustermesh-node-agent: ready"),
        "{stderr}"
    );
    assert!(
        stdout.ends_with(&format!(
            "cluster east (ID 7) installed in context {cluster} and ready\n"
        )),
        "{stdout}"
    );

    // Uninstall: nothing of ours left, the user's objects kept.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "users-own"}, "data": {"a": "b"}}))
            .unwrap(),
    )
    .await
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "clustermesh-peer-west",
                "labels": {"clustermesh.dev/peer": "west"}}, "stringData": {"endpoints": "x:1"}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let out = run(
        home.path(),
        &kc,
        &["uninstall", "--context", cluster.as_str()],
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("daemonset/clustermesh-node-agent deleted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("left in place: secret/clustermesh-peer-west (written by clustermesh connect; clustermesh disconnect removes it)"),
        "{stdout}"
    );
    // The policy CRDs stay (deleting them would delete the users' policies), and say so.
    let crds = BTreeSet::from([
        "customresourcedefinition/ciliumclusterwidenetworkpolicies.cilium.io".to_owned(),
        "customresourcedefinition/ciliumnetworkpolicies.cilium.io".to_owned(),
    ]);
    assert_eq!(ours(&client).await, crds);
    assert!(
        stdout.contains("left in place: customresourcedefinition/ciliumnetworkpolicies.cilium.io (the network policies written with it stay; kubectl delete it to drop them)"),
        "{stdout}"
    );
    assert!(cms.get_opt("users-own").await.unwrap().is_some());
    assert!(
        secrets
            .get_opt("clustermesh-peer-west")
            .await
            .unwrap()
            .is_some()
    );
    // Uninstalling again finds nothing.
    let out = run(
        home.path(),
        &kc,
        &["uninstall", "--context", cluster.as_str()],
    )
    .await;
    assert!(
        text(&out.stdout).starts_with(&format!(
            "nothing installed by clustermesh install in context {cluster}"
        )),
        "{}",
        text(&out.stdout)
    );
}
