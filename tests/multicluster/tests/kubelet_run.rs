//! The lab runs what `deploy/` ships (issue #15): `clustermesh install` writes the manifests and
//! Secrets into the cluster's Kubernetes API test server, and the lab kubelet
//! (`multicluster::lab_kubelet`, one process per cluster) runs the pods that etcd's
//! StatefulSet, the apiserver's Deployment and the node agent's DaemonSet ask for, each in its
//! own network namespace on the bridge (the node's, for the host-network agent), mount
//! namespace (its volumes at their mount paths, a read-only root), cgroup, user and
//! capabilities — so a wrong flag, mount, user, permission, capability or probe in `deploy/`
//! fails here. (It found one: the apiserver, user 65532 without `fsGroup`, could not read its
//! root-owned 0400 Secrets.) These tests check the pods against the manifests, etcd's restart
//! with its data, per-node agent certificates, and a rolling update of the apiserver
//! Deployment carried out by the lab kubelet with no failed connection and no map delete.
//! Needs root and bpffs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use multicluster::lab::{Component, Lab, TlsDir};

const NS: &str = "kube-system";

/// A lab with one installed cluster of `nodes` nodes.
async fn installed(nodes: u8) -> (Lab, tempfile::TempDir) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    lab.install_cluster("east", 1, nodes).await.unwrap();
    (lab, dir)
}

/// The process's `field` line of /proc/<pid>/status, first word.
fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The one process of `comp`'s pod(s).
fn pids(lab: &Lab, comp: &Component) -> Vec<u32> {
    let pids = lab.container_pids("east", comp).unwrap();
    assert!(!pids.is_empty(), "{comp} runs");
    pids
}

/// Runs etcdctl against the etcd pod with the apiserver's etcd client certificate.
fn etcdctl(endpoint: &str, tls: &Path, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={endpoint}"),
            "--dial-timeout=3s",
            "--command-timeout=5s",
            // The server's certificate names its pod's DNS name, not this test's address: the
            // client certificate is what is checked here.
            "--insecure-skip-tls-verify",
            &format!("--cert={}", tls.join("tls.crt").display()),
            &format!("--key={}", tls.join("tls.key").display()),
        ])
        .args(args)
        .output()
        .unwrap()
}

/// The certificate in `dir` (PEM): its DER.
fn cert_der(dir: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(dir.join("tls.crt"))
        .unwrap()
        .to_vec()
}

/// Every pod as the manifests say: etcd and the apiserver as user 65532 with no capability,
/// in cgroups of their own; the apiserver leading through the Lease; each node agent bounded
/// to `deploy/`'s capabilities (BPF, NET_ADMIN, SYS_ADMIN) as uid 0, enrolled with its
/// pod-bound token for a certificate of its own node (the two differ), its programs pinned in
/// its node's bpffs; etcd's mTLS serving the apiserver's client certificate and refusing a
/// client without one; etcd killed → restarted by the kubelet with its data on the claim, the
/// restart counted in the Pod's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_s_pods_run_as_the_manifests_say_and_etcd_restarts_with_its_data() {
    let (lab, _dir) = installed(2).await;
    let client = lab.client("east").await.unwrap();

    // etcd and the apiserver: user 65532, no capability.
    for comp in [Component::Etcd, Component::Apiserver] {
        for pid in pids(&lab, &comp) {
            assert_eq!(proc_status(pid, "Uid:"), "65532", "{comp}");
            assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000", "{comp}");
            assert_eq!(proc_status(pid, "CapBnd:"), "0000000000000000", "{comp}");
        }
    }
    assert_eq!(pids(&lab, &Component::Apiserver).len(), 2, "two replicas");
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let holder = leases
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .find_map(|l| l.spec.as_ref()?.holder_identity.clone())
        .expect("a leader Lease");
    assert!(
        holder.starts_with("clustermesh-apiserver-") && pods.get(&holder).await.is_ok(),
        "a running apiserver pod leads: {holder}"
    );

    // The node agents.
    let nodes: Vec<String> = lab
        .cluster("east")
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let mut ders = Vec::new();
    for node in &nodes {
        let comp = Component::NodeAgent(node.clone());
        let [pid] = pids(&lab, &comp)[..] else {
            panic!("one agent process on {node}");
        };
        let bound = u64::from_str_radix(&proc_status(pid, "CapBnd:"), 16).unwrap();
        assert_eq!(
            bound,
            (1u64 << 39) | (1 << 12) | (1 << 21),
            "CapBnd {bound:#x}"
        );
        assert_eq!(proc_status(pid, "Uid:"), "0");
        let der = cert_der(
            &lab.tls_dir("east", &TlsDir::NodeAgent(node.clone()))
                .await
                .unwrap(),
        );
        let id = certs::MeshIdentity::from_cert_der(&der).unwrap();
        assert_eq!(id.role, certs::Role::NodeAgent);
        assert_eq!(
            id.node.as_ref().map(|n| n.to_string()).as_deref(),
            Some(node.as_str())
        );
        ders.push(der);
        let pins = &lab
            .cluster("east")
            .unwrap()
            .nodes
            .iter()
            .find(|n| &n.name == node)
            .unwrap()
            .pins;
        assert!(
            std::fs::read_dir(pins).unwrap().next().is_some(),
            "pins under {}",
            pins.display()
        );
    }
    assert_ne!(ders[0], ders[1], "two agents, two certificates");

    // etcd's mTLS, and its restart with the data on its claim.
    let endpoint = format!("https://{}", lab.etcd_addr("east").await.unwrap());
    let tls = lab.tls_dir("east", &TlsDir::EtcdClient).await.unwrap();
    let put = etcdctl(&endpoint, &tls, &["put", "/lab/kubelet", "ran"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let anonymous = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={endpoint}"),
            "--dial-timeout=3s",
            "--insecure-skip-tls-verify",
            "get",
            "/lab/kubelet",
        ])
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "a client without a certificate"
    );
    let mut lab = lab;
    lab.crash("east", &Component::Etcd).unwrap();
    lab.restart("east", &Component::Etcd).await.unwrap();
    test_support::eventually(
        "etcd's restart in its Pod's status",
        Duration::from_secs(30),
        || async {
            let p = pods.get_status("clustermesh-etcd-0").await.ok()?;
            let s = p.status?;
            let restarts = s.container_statuses?.first()?.restart_count;
            let ready = s
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (restarts == 1 && ready).then_some(())
        },
    )
    .await;
    let get = test_support::eventually("etcd serving again", Duration::from_secs(30), || {
        let (endpoint, tls) = (endpoint.clone(), tls.clone());
        async move {
            let out = etcdctl(
                &endpoint,
                &tls,
                &["get", "--print-value-only", "/lab/kubelet"],
            );
            out.status.success().then_some(out)
        }
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "ran");
}

/// The agent's sample `name{labels}` from its `/metrics`: 0 for a counter that has counted
/// nothing yet (registered, no sample); a name the agent does not register fails the test.
async fn metric(ip: IpAddr, name_and_labels: &str) -> f64 {
    let text = test_support::http_get((ip, 9881).into(), "/metrics")
        .await
        .unwrap();
    if let Some(v) = text
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse().ok())
    {
        return v;
    }
    let name = name_and_labels
        .split(['{', ' '])
        .next()
        .unwrap_or(name_and_labels);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("# TYPE {name} "))),
        "the agent has no metric {name}"
    );
    0.0
}

/// A rolling update of `deploy/`'s apiserver Deployment (two replicas, maxSurge 1,
/// maxUnavailable 0), started with `kubectl set env` and watched with `kubectl rollout status`,
/// carried out by the lab kubelet as the Deployment controller and the kubelet would: a new pod
/// is started and Ready before an old one leaves the Service's endpoints and is sent
/// `SIGTERM`. The node agent follows the Mesh API through the Service, and a client in the
/// node connects to the Service every 10 ms all along: the rollout completes, no connection
/// fails, every replica is replaced and the agent deletes nothing from its maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_the_apiserver_completes_with_no_failed_connection_or_map_delete() {
    let (mut lab, dir) = installed(1).await;
    let client = lab.client("east").await.unwrap();
    let node = lab.cluster("east").unwrap().nodes[0].clone();
    let node_ip = IpAddr::V4(node.ip);
    // A global service with a backend: state the agent has programmed and must keep.
    let global = BTreeMap::from([("service.cilium.io/global".to_owned(), "true".to_owned())]);
    lab.deploy("east", "shop/web", 1, &global).await.unwrap();
    test_support::eventually(
        "the agent to program shop/web",
        Duration::from_secs(60),
        || async { (metric(node_ip, "clustermesh_datapath_services ").await >= 1.0).then_some(()) },
    )
    .await;
    let reconnects_before = metric(node_ip, "clustermesh_node_mesh_reconnects_total ").await;
    let deletes_before = metric(node_ip, "clustermesh_datapath_map_ops_total{op=\"delete\"}").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
        list.items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    };
    let lp = kube::api::ListParams::default().labels("app=clustermesh-apiserver");
    let before = names(pods.list(&lp).await.unwrap());
    assert_eq!(before.len(), 2, "{before:?}");
    let vip: IpAddr = Api::<Service>::namespaced(client.clone(), NS)
        .get("clustermesh-apiserver")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap()
        .parse()
        .unwrap();

    // A client of the Service, in the node's namespace: one connection every 10 ms.
    let stop = dir.path().join("stop-client");
    let client_proc = Command::new("ip")
        .args(["netns", "exec", &node.netns, "python3", "-c"])
        .arg(format!(
            r#"import json, os, socket, time
ok = failed = 0
errors = {{}}
while not os.path.exists("{}"):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("{vip}", 4240))
        ok += 1
    except OSError as e:
        failed += 1
        errors[str(e)] = errors.get(str(e), 0) + 1
    finally:
        s.close()
    time.sleep(0.01)
print(json.dumps({{"ok": ok, "failed": failed, "errors": errors}}))"#,
            stop.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a Path);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0, "");
        }
    }
    let stopper = Stop(&stop);

    // The user's change, and the user watching it.
    let kubectl = |args: &[&str]| {
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(lab.kubeconfig())
            .args(["--context", "east", "-n", NS])
            .args(args)
            .output()
    };
    let set = kubectl(&[
        "set",
        "env",
        "deployment/clustermesh-apiserver",
        "ROLLOUT=2",
    ])
    .await
    .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let rolled = kubectl(&[
        "rollout",
        "status",
        "deployment/clustermesh-apiserver",
        "--timeout=180s",
    ])
    .await
    .unwrap();
    assert!(
        rolled.status.success(),
        "kubectl rollout status: {}{}",
        String::from_utf8_lossy(&rolled.stdout),
        String::from_utf8_lossy(&rolled.stderr)
    );
    assert!(String::from_utf8_lossy(&rolled.stdout).contains("successfully rolled out"));
    // Every replica replaced; the new ones run the changed environment.
    let after = test_support::eventually("the old pods gone", Duration::from_secs(60), || async {
        let now = names(pods.list(&lp).await.ok()?);
        (now.len() == 2 && now.iter().all(|n| !before.contains(n))).then_some(now)
    })
    .await;
    for name in &after {
        let env = pods.get(name).await.unwrap().spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default();
        assert!(
            env.iter()
                .any(|e| e.name == "ROLLOUT" && e.value.as_deref() == Some("2")),
            "{name} runs the new template"
        );
    }
    // The agent follows a new replica, and deleted nothing.
    let addr = std::net::SocketAddr::new(node_ip, 9881);
    test_support::eventually("the agent ready again", Duration::from_secs(60), || async {
        test_support::http_get(addr, "/readyz")
            .await
            .ok()
            .filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    drop(stopper);
    let out = client_proc.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ok"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["failed"], 0, "no client connection failed: {v}");
    let deletes_after = metric(node_ip, "clustermesh_datapath_map_ops_total{op=\"delete\"}").await;
    assert_eq!(deletes_after, deletes_before, "no map delete on the node");
    assert!(
        metric(node_ip, "clustermesh_datapath_services ").await >= 1.0,
        "shop/web still programmed"
    );
    // Both replicas it could follow were replaced: it reconnected, and kept everything.
    assert!(
        metric(node_ip, "clustermesh_node_mesh_reconnects_total ").await > reconnects_before,
        "the agent had to reconnect"
    );
    lab.teardown();
}
