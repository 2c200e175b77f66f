//! The lab kubelet runs what `deploy/` ships: `clustermesh install` writes the manifests and
//! Secrets into the Kubernetes API test server, and etcd's StatefulSet pod is resolved from the
//! stored objects and run as a process in its own network namespace, mount namespace (its
//! volumes at their mount paths, a read-only root), cgroup, user (65532) and capabilities
//! (none) — so a wrong flag, mount, user or probe in `deploy/base/etcd.yaml` fails here. Needs
//! root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use multicluster::kubelet::{self, Objects, PodFacts};
use multicluster::lab::binary;
use multicluster::pod_runner::{HttpProbe, Sandbox, Supervisor};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// A network namespace with a veth to the host (host .1, pod .2 of a /30), and a cgroup;
/// removed on drop, also on failure.
struct PodNet {
    netns: String,
    host_if: String,
    cgroup: PathBuf,
    ip: IpAddr,
}

impl PodNet {
    fn new() -> Self {
        let name = test_support::unique_name("cmk");
        let n = std::process::id() % 250 + 1;
        let netns = name.clone();
        let host_if = format!("cmk{}", std::process::id() % 100_000);
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &netns]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        run(&["addr", "add", &format!("10.251.{n}.1/30"), "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        for args in [
            vec!["addr", "add", &format!("10.251.{n}.2/30"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let full: Vec<&str> = ["netns", "exec", netns.as_str(), "ip"]
                .into_iter()
                .chain(args.iter().map(|s| &**s))
                .collect();
            run(&full);
        }
        let cgroup = Path::new(CGROUP_ROOT).join(&name);
        std::fs::create_dir_all(&cgroup).unwrap();
        Self {
            netns,
            host_if,
            cgroup,
            ip: format!("10.251.{n}.2").parse().unwrap(),
        }
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs etcdctl against the pod with the apiserver's etcd client certificate (or none).
fn etcdctl(ip: IpAddr, tls: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3").args([
        &format!("--endpoints=https://{ip}:2379"),
        "--dial-timeout=3s",
        "--command-timeout=5s",
        // The server's certificate names its Service, not this test's address: the client
        // certificate is what is checked here.
        "--insecure-skip-tls-verify",
    ]);
    if let Some(d) = tls {
        cmd.args([
            &format!("--cert={}", d.join("tls.crt").display()),
            &format!("--key={}", d.join("tls.key").display()),
        ]);
    }
    cmd.args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_s_etcd_runs_from_its_manifest_ready_by_its_probe_and_restarted() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cluster = test_support::unique_name("kl");
    let kube = kube_testserver::start(kube_testserver::Config::new(
        model::ClusterName::new(cluster.clone()).unwrap(),
    ))
    .await
    .unwrap();
    let client = kube.client().await.unwrap();
    let out = tokio::process::Command::new(binary("clustermesh").unwrap())
        .args([
            "install",
            "--context",
            &cluster,
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--mesh-endpoint",
            "127.0.0.1:4240",
            "--wait",
            "false",
        ])
        .env("KUBECONFIG", kube.kubeconfig())
        .env("HOME", dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The pod as the StatefulSet controller makes it, the objects it refers to as stored.
    let ns = "kube-system";
    let set: StatefulSet = Api::namespaced(client.clone(), ns)
        .get("clustermesh-etcd")
        .await
        .unwrap();
    let (pod_name, spec) = kubelet::stateful_set_pod(&set, 0).unwrap();
    let mut objects = Objects::default();
    for s in Api::<Secret>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        let data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        objects
            .secrets
            .insert((ns.to_owned(), s.metadata.name.unwrap()), data);
    }
    let net = PodNet::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pod_name, "namespace": ns, "labels": {"app": "clustermesh-etcd"}},
        "spec": spec,
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let facts = PodFacts {
        name: pod_name.clone(),
        namespace: ns.into(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: "lab-node".into(),
        pod_ip: net.ip.to_string(),
        host_ip: String::new(),
        labels: BTreeMap::new(),
    };
    let lab_binary = |image: &str, program: &str| -> Option<PathBuf> {
        (image.contains("etcd") && program == "etcd").then(|| PathBuf::from("/usr/bin/etcd"))
    };
    let process = kubelet::resolve(&spec, &facts, "etcd", &objects, &lab_binary).unwrap();
    let container = spec.containers.iter().find(|c| c.name == "etcd").unwrap();
    let security = spec.security_context.clone().unwrap_or_default();
    let csc = container.security_context.clone().unwrap_or_default();
    let sandbox = Sandbox {
        pod: pod_name.clone(),
        netns: Some(net.netns.clone()),
        ip: net.ip,
        cgroup: net.cgroup.clone(),
        dir: dir.path().join("pod"),
        claims: dir.path().join("claims"),
        hosts: vec![(
            net.ip,
            vec![format!("{pod_name}.clustermesh-etcd.{ns}.svc")],
        )],
        user: Some((
            csc.run_as_user.or(security.run_as_user).unwrap() as u32,
            csc.run_as_group.or(security.run_as_group).unwrap() as u32,
        )),
        fs_group: security.fs_group.map(|g| g as u32),
        read_only_root: csc.read_only_root_filesystem == Some(true),
    };
    assert_eq!(
        sandbox.user,
        Some((65532, 65532)),
        "deploy/ runs etcd as 65532"
    );
    assert!(sandbox.read_only_root);
    let probe = HttpProbe::readiness(container).unwrap();
    assert!(probe.is_some(), "deploy/ gives etcd a readiness probe");
    let no_token = |_: &str, _: i64| -> anyhow::Result<String> { anyhow::bail!("no token") };
    let etcd = Supervisor::start(&sandbox, "etcd", &process, probe, &no_token).unwrap();
    let log = sandbox.dir.join("etcd.log");
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Ready by deploy/'s own probe; the kubelet's status goes to the API.
    let t0 = Instant::now();
    while !etcd.state().ready {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "etcd never ready: {:?}\n{}",
            etcd.state(),
            show_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pods.patch_status(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": etcd.pod_status()})),
    )
    .await
    .unwrap();
    let stored = pods.get_status(&pod_name).await.unwrap();
    let ready = stored
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready, "the Pod is Ready in the API");

    // It runs as deploy/ says: user 65532, no capability, in its own cgroup.
    let pid = etcd.state().pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("Uid:"), "65532", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapBnd:"), "0000000000000000");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(net.cgroup.file_name().unwrap().to_str().unwrap()),
        "{cgroup}"
    );

    // Its mTLS is deploy/'s: the apiserver's client certificate (from install's Secret) is
    // served, a client without one is refused.
    let client_tls = dir.path().join("etcd-client");
    std::fs::create_dir_all(&client_tls).unwrap();
    for (k, v) in &objects.secrets[&(ns.to_owned(), "clustermesh-etcd-client".to_owned())] {
        std::fs::write(client_tls.join(k), v).unwrap();
    }
    let put = etcdctl(net.ip, Some(&client_tls), &["put", "/lab/kubelet", "ran"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let anonymous = etcdctl(net.ip, None, &["get", "/lab/kubelet"]);
    assert!(
        !anonymous.status.success(),
        "a client without a certificate"
    );

    // Killed: started again after its back-off, ready again, its data on the claim kept.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("etcd restarted and ready", Duration::from_secs(60), || {
        let s = etcd.state();
        s.restarts == 1 && s.ready
    });
    let get = etcdctl(
        net.ip,
        Some(&client_tls),
        &["get", "--print-value-only", "/lab/kubelet"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "ran",
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let status = etcd.pod_status();
    assert_eq!(status["containerStatuses"][0]["restartCount"], 1);
    drop(etcd);
    drop(net);
}
