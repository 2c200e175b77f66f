//! Golden output: what `clustermesh` prints on bad inputs, line for line, and its exit codes.
//! The Kubernetes API is the test server (`tests/kube-testserver`), with its faults.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

/// Runs the binary with a clean environment: `HOME` is `home` (no `~/.kube/config` unless the
/// test writes one) and `KUBECONFIG` is `kubeconfig` if given.
async fn clustermesh(home: &Path, kubeconfig: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).env_clear().env("HOME", home);
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let run = cmd.kill_on_drop(true).output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("clustermesh did not finish within 60 s")
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn server(cluster: &str) -> kube_testserver::Handle {
    kube_testserver::start(kube_testserver::Config::new(
        model::ClusterName::new(cluster).unwrap(),
    ))
    .await
    .unwrap()
}

#[tokio::test]
async fn a_missing_kubeconfig_is_named_with_where_it_came_from() {
    let home = tempfile::tempdir().unwrap();
    let out = clustermesh(
        home.path(),
        None,
        &["status", "--kubeconfig", "/nonexistent/kubeconfig"],
    )
    .await;
    assert_eq!(
        stderr(&out),
        "error: kubeconfig /nonexistent/kubeconfig does not exist (--kubeconfig)\n"
    );
    assert_eq!(out.status.code(), Some(1));

    let out = clustermesh(home.path(), None, &["services"]).await;
    assert_eq!(
        stderr(&out),
        format!(
            "error: kubeconfig {}/.kube/config does not exist (the default; set --kubeconfig or KUBECONFIG)\n",
            home.path().display()
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_context_lists_the_known_ones() {
    let home = tempfile::tempdir().unwrap();
    let kube = server("east").await;
    let out = clustermesh(
        home.path(),
        Some(kube.kubeconfig()),
        &["status", "--context", "nope"],
    )
    .await;
    assert_eq!(
        stderr(&out),
        "error: context \"nope\" not found in the kubeconfig (known: east, east-cert)\n"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_fails_the_command_after_the_request_timeout() {
    let home = tempfile::tempdir().unwrap();
    let kube = server("east").await;
    kube.stall(Some(Duration::from_secs(300)));
    let out = clustermesh(
        home.path(),
        Some(kube.kubeconfig()),
        &["services", "--context", "east", "--request-timeout", "1s"],
    )
    .await;
    assert_eq!(
        stderr(&out),
        format!(
            "error: context east: read ConfigMap kube-system/clustermesh-status: no answer from {} within 1s (--request-timeout)\n",
            kube.url()
        )
    );
    assert_eq!(out.status.code(), Some(1));

    // `status` reports the cluster as unknown, with `-` for what it cannot know, and fails.
    let out = clustermesh(
        home.path(),
        Some(kube.kubeconfig()),
        &["status", "--context", "east", "--request-timeout", "500ms"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "CLUSTER            APISERVER   EXPORTS   PEER   PHASE   SINCE   IMPORTED   CERT EXPIRES   LAST ERROR\n\
             ? (context east)   unknown     -         -      -       -       -          -              -\n\
             ! east: context east: read ConfigMap kube-system/clustermesh-status: no answer from {} within 500ms (--request-timeout)\n",
            kube.url()
        )
    );
    assert_eq!(stderr(&out), "");
    assert_eq!(out.status.code(), Some(1));
    kube.stall(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_404_reads_like_kubectl() {
    let home = tempfile::tempdir().unwrap();
    let kube = server("east").await;
    let out = clustermesh(
        home.path(),
        Some(kube.kubeconfig()),
        &["services", "--context", "east", "--node", "nope"],
    )
    .await;
    assert_eq!(
        stderr(&out),
        "error: context east: node nope: Error from server (NotFound): nodes \"nope\" not found\n"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_reads_like_kubectl() {
    let home = tempfile::tempdir().unwrap();
    let kube = server("east").await;
    let text = std::fs::read_to_string(kube.kubeconfig()).unwrap();
    assert!(text.contains(kube.token()));
    let wrong = home.path().join("kubeconfig");
    std::fs::write(&wrong, text.replace(kube.token(), "not-the-token")).unwrap();
    let out = clustermesh(
        home.path(),
        Some(&wrong),
        &["services", "--context", "east"],
    )
    .await;
    assert_eq!(
        stderr(&out),
        "error: context east: read ConfigMap kube-system/clustermesh-status: You must be logged in to the server (Unauthorized)\n"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn a_duration_without_a_unit_is_refused_with_a_hint() {
    let home = tempfile::tempdir().unwrap();
    let out = clustermesh(home.path(), None, &["status", "--request-timeout", "30"]).await;
    assert_eq!(
        stderr(&out),
        "error: invalid value '30' for '--request-timeout <REQUEST_TIMEOUT>': invalid duration \"30\": add a unit (30s, 30ms, 1m30s)\n\n\
         For more information, try '--help'.\n"
    );
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn version_and_completion_work_without_a_cluster() {
    let home = tempfile::tempdir().unwrap();
    let out = clustermesh(home.path(), None, &["version"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.starts_with("clustermesh 0.1.0 (commit "), "{line}");
    assert!(line.contains(", built "), "{line}");
    let flag = clustermesh(home.path(), None, &["--version"]).await;
    assert_eq!(String::from_utf8_lossy(&flag.stdout), line);
    let json = clustermesh(home.path(), None, &["version", "-o", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["version"], "0.1.0");
    assert!(line.contains(v["commit"].as_str().unwrap()), "{line} {v}");

    for (shell, marker) in [
        ("bash", "_clustermesh()"),
        ("zsh", "#compdef clustermesh"),
        ("fish", "complete -c clustermesh"),
    ] {
        let out = clustermesh(home.path(), None, &["completion", shell]).await;
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("request-timeout"), "{shell}");
    }
    let out = clustermesh(home.path(), None, &["completion", "tcsh"]).await;
    assert_eq!(out.status.code(), Some(2));
}

/// A Mesh API that accepts connections and never answers: `services` gives up after
/// `--request-timeout` and names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_api_that_never_answers_fails_the_command_after_the_request_timeout() {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
    use kube::api::{Api, PostParams};
    let home = tempfile::tempdir().unwrap();
    let kube = server("east").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mesh = silent.local_addr().unwrap();
    // Accepted connections are held open, unanswered, until the test ends.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let client = kube.client().await.unwrap();
    let pp = PostParams::default();
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "kube-system"}})).unwrap();
    let _ = Api::<Namespace>::all(client.clone()).create(&pp, &ns).await;
    let status = model::status::ClusterStatus {
        cluster: "east".into(),
        cluster_id: 1,
        replica: "east-0".into(),
        leader: true,
        ready: true,
        reason: None,
        phase: None,
        phase_since_unix: None,
        exported: Default::default(),
        peers: Vec::new(),
        updated_unix: 0,
        etcd: None,
        serving_cert_not_after_unix: None,
        rejected_services: Vec::new(),
        node_agents: None,
        version: None,
    };
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": model::objects::STATUS_CONFIGMAP},
        "data": {model::objects::STATUS_KEY: serde_json::to_string(&status).unwrap()},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .create(&pp, &cm)
        .await
        .unwrap();
    let name = model::ClusterName::new("east").unwrap();
    let ca = certs::Ca::generate(&name, Duration::from_secs(86_400)).unwrap();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": model::objects::CA_SECRET},
        "stringData": {"ca.crt": ca.cert_pem(), "ca.key": ca.key_pem()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "kube-system")
        .create(&pp, &secret)
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": model::objects::APISERVER_SERVICE,
            "annotations": {model::objects::MESH_ENDPOINTS_ANNOTATION: mesh.to_string()},
        },
        "spec": {"ports": [{"name": model::objects::MESH_PORT_NAME, "port": 4240}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client, "kube-system")
        .create(&pp, &svc)
        .await
        .unwrap();
    let out = clustermesh(
        home.path(),
        Some(kube.kubeconfig()),
        &["services", "--context", "east", "--request-timeout", "1s"],
    )
    .await;
    assert_eq!(
        stderr(&out),
        format!(
            "error: no answer from the Mesh API of east at {mesh} within 1s (--request-timeout)\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
    holder.abort();
}
