//! The lab kubelet runs what `deploy/` ships: `clustermesh install` writes the manifests and
//! Secrets into the Kubernetes API test server (bound on a bridge, where pods reach it as
//! in-cluster clients), and the pods of etcd's StatefulSet, the apiserver's Deployment and the
//! node agent's DaemonSet are resolved from the stored objects and run as processes, each in
//! its own network namespace on the bridge (the node's, for the host-network agent), mount
//! namespace (its volumes at their mount paths, a read-only root), cgroup, user and
//! capabilities — so a wrong flag, mount, user, permission, capability or probe in `deploy/`
//! fails here. (It found one: the apiserver, user 65532 without `fsGroup`, could not read its
//! root-owned 0400 Secrets.) The agents reach the apiserver by its Service name → its
//! ClusterIP → the lab's kube-proxy stand-in (nftables) → the pod; etcd's name is the pod's
//! address in `/etc/hosts` (no cluster DNS in the lab). A rolling update of the apiserver
//! Deployment is carried out as its controller would, with no failed connection and no map
//! delete. Needs root and bpffs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, PodSpec, Secret, Service, ServiceAccount};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use multicluster::kubelet::{self, Objects, PodFacts};
use multicluster::lab::binary;
use multicluster::pod_runner::{HttpProbe, Sandbox, Supervisor, route_service};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// A bridge for the test's pods (host `.1` of a /24); removed on drop, also on failure.
struct Bridge {
    name: String,
    subnet: u8,
}

impl Bridge {
    fn new() -> Self {
        // Unique per test of this process (tests run in parallel) and per process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let subnet = ((std::process::id() * 8 + k) % 250 + 1) as u8;
        let name = format!("cmkb{}x{k}", std::process::id() % 100_000);
        ip(&["link", "add", &name, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.252.{subnet}.1/24"),
            "dev",
            &name,
        ]);
        ip(&["link", "set", &name, "up"]);
        Self { name, subnet }
    }

    fn host(&self) -> IpAddr {
        format!("10.252.{}.1", self.subnet).parse().unwrap()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?}");
}

/// A pod's network namespace on the bridge (address `.10 + index`), and its cgroup; removed
/// on drop, also on failure (its processes killed first).
struct PodNet {
    netns: String,
    host_if: String,
    cgroup: PathBuf,
    ip: IpAddr,
}

impl PodNet {
    fn new(bridge: &Bridge, index: u8) -> Self {
        let name = test_support::unique_name("cmk");
        let netns = name.clone();
        let host_if = format!(
            "cmk{}x{}",
            std::process::id() % 100_000,
            bridge.subnet as u32 * 8 + index as u32
        );
        let addr = format!("10.252.{}.{}", bridge.subnet, 10 + index);
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &host_if, "master", &bridge.name]);
        ip(&["link", "set", &host_if, "up"]);
        for args in [
            vec!["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let full: Vec<&str> = ["-n", netns.as_str()]
                .into_iter()
                .chain(args.iter().map(|s| &**s))
                .collect();
            ip(&full);
        }
        let cgroup = Path::new(CGROUP_ROOT).join(&name);
        std::fs::create_dir_all(&cgroup).unwrap();
        Self {
            netns,
            host_if,
            cgroup,
            ip: addr.parse().unwrap(),
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

/// A lab node: its network namespace on the bridge (what a host-network pod of it shares),
/// its cgroup with a `kubepods` child (as the kubelet's cgroupfs driver makes it), its own
/// bpffs directory, and its Node object. Removed on drop (after its pods).
struct LabNode {
    name: String,
    pins: PathBuf,
    host_paths: Vec<(PathBuf, PathBuf)>,
    net: PodNet,
}

impl LabNode {
    async fn new(inst: &Installed, index: u8, name: &str) -> Self {
        let net = PodNet::new(&inst.bridge, index);
        std::fs::create_dir_all(net.cgroup.join("kubepods")).unwrap();
        let pins = Path::new("/sys/fs/bpf").join(&net.netns);
        std::fs::create_dir_all(&pins).unwrap();
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": net.ip.to_string()}]},
        }))
        .unwrap();
        Api::<Node>::all(inst.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        Self {
            name: name.to_owned(),
            host_paths: vec![
                (PathBuf::from("/sys/fs/bpf"), pins.clone()),
                (PathBuf::from("/sys/fs/cgroup"), net.cgroup.clone()),
            ],
            pins,
            net,
        }
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.net.cgroup.join("kubepods"));
        let _ = std::fs::remove_dir_all(&self.pins);
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

/// A test server on the bridge with `clustermesh install` applied (not waiting: nothing runs
/// its pods but these tests), and the Secrets and ConfigMaps its pods refer to.
struct Installed {
    objects: Objects,
    client: kube::Client,
    kube: kube_testserver::Handle,
    dir: tempfile::TempDir,
    bridge: Bridge,
}

const NS: &str = "kube-system";

async fn installed() -> Installed {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bridge = Bridge::new();
    let dir = tempfile::tempdir().unwrap();
    let cluster = test_support::unique_name("kl");
    let mut config =
        kube_testserver::Config::new(model::ClusterName::new(cluster.clone()).unwrap());
    // Where pods reach it, as in-cluster clients.
    config.bind = std::net::SocketAddr::new(bridge.host(), 0);
    let kube = kube_testserver::start(config).await.unwrap();
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
    let mut objects = Objects::default();
    for s in Api::<Secret>::namespaced(client.clone(), NS)
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
            .insert((NS.to_owned(), s.metadata.name.unwrap()), data);
    }
    for c in Api::<ConfigMap>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
    {
        objects.config_maps.insert(
            (NS.to_owned(), c.metadata.name.unwrap()),
            c.data.unwrap_or_default().into_iter().collect(),
        );
    }
    Installed {
        objects,
        client,
        kube,
        dir,
        bridge,
    }
}

/// The lab's binaries for `deploy/`'s images.
fn lab_binary(image: &str, program: &str) -> Option<PathBuf> {
    match program {
        "etcd" if image.contains("etcd") => Some(PathBuf::from("/usr/bin/etcd")),
        "clustermesh-apiserver" | "node-agent" => binary(program).ok(),
        _ => None,
    }
}

/// Creates the Pod `pod_name` of `spec` in the API, runs its container `container` in `net`
/// the way the kubelet would (`extra` stands for what admission adds: the ServiceAccount token
/// volume, the Service environment) and waits until its readiness probe passes.
#[allow(clippy::too_many_arguments)]
async fn run_pod(
    inst: &Installed,
    net: &PodNet,
    pod_name: &str,
    labels: serde_json::Value,
    spec: &PodSpec,
    container: &str,
    hosts: Vec<(IpAddr, Vec<String>)>,
    node: Option<&LabNode>,
    ready_within: Duration,
    extra: impl FnOnce(&mut kubelet::ProcessSpec),
) -> Supervisor {
    let pods: Api<Pod> = Api::namespaced(inst.client.clone(), NS);
    let mut spec = spec.clone();
    spec.node_name = node.map(|n| n.name.clone());
    let spec = &spec;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pod_name, "namespace": NS, "labels": labels},
        "spec": spec,
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    let facts = PodFacts {
        name: pod_name.to_owned(),
        namespace: NS.into(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: node.map_or_else(|| "lab-node".into(), |n| n.name.clone()),
        pod_ip: net.ip.to_string(),
        host_ip: inst.bridge.host().to_string(),
        labels: BTreeMap::new(),
    };
    let mut process =
        kubelet::resolve(spec, &facts, container, &inst.objects, &lab_binary).unwrap();
    extra(&mut process);
    let c = spec
        .containers
        .iter()
        .find(|c| c.name == container)
        .unwrap();
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let user = sc.run_as_user.or(pod_sc.run_as_user).map(|u| {
        (
            u as u32,
            sc.run_as_group.or(pod_sc.run_as_group).unwrap_or(0) as u32,
        )
    });
    let sandbox = Sandbox {
        pod: pod_name.to_owned(),
        netns: Some(net.netns.clone()),
        ip: net.ip,
        cgroup: net.cgroup.clone(),
        dir: inst.dir.path().join(pod_name),
        claims: inst.dir.path().join("claims"),
        hosts,
        user,
        fs_group: pod_sc.fs_group.map(|g| g as u32),
        read_only_root: sc.read_only_root_filesystem == Some(true),
        host_paths: node.map_or_else(Vec::new, |n| n.host_paths.clone()),
    };
    let probe = HttpProbe::readiness(c).unwrap();
    assert!(
        probe.is_some(),
        "deploy/ gives {container} a readiness probe"
    );
    // Projected tokens as the kubelet asks for them: the pod's ServiceAccount, the volume's
    // audience (none: the Kubernetes API's) and lifetime, bound to this pod.
    let sa = spec.service_account_name.clone().unwrap_or_default();
    let mut tokens = BTreeMap::new();
    for m in &process.mounts {
        if let kubelet::Source::Files { tokens: t, .. } = &m.source {
            for (audience, seconds, _) in t.values() {
                let mut spec = serde_json::json!({"expirationSeconds": seconds,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name}});
                if !audience.is_empty() {
                    spec["audiences"] = serde_json::json!([audience]);
                }
                let tr: TokenRequest =
                    serde_json::from_value(serde_json::json!({ "spec": spec })).unwrap();
                let token = Api::<ServiceAccount>::namespaced(inst.client.clone(), NS)
                    .create_token_request(&sa, &PostParams::default(), &tr)
                    .await
                    .unwrap()
                    .status
                    .unwrap()
                    .token;
                tokens.insert(audience.clone(), token);
            }
        }
    }
    let token = |audience: &str, _: i64| {
        tokens
            .get(audience)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no token for audience {audience:?}"))
    };
    let running = Supervisor::start(&sandbox, container, &process, probe, &token).unwrap();
    wait_ready(
        &running,
        &sandbox.dir.join(format!("{container}.log")),
        ready_within,
    )
    .await;
    running
}

/// Waits until `s` is ready, showing its log when it is not in time.
async fn wait_ready(s: &Supervisor, log: &Path, timeout: Duration) {
    let state =
        test_support::within("ready", timeout, || async { s.state().ready.then_some(()) }).await;
    assert!(
        state.is_ok(),
        "never ready: {:?}\n{}",
        s.state(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `deploy/`'s etcd pod, from its StatefulSet; returns it running and ready.
async fn run_etcd(inst: &Installed, net: &PodNet) -> (Supervisor, String) {
    let set: StatefulSet = Api::namespaced(inst.client.clone(), NS)
        .get("clustermesh-etcd")
        .await
        .unwrap();
    let (pod_name, spec) = kubelet::stateful_set_pod(&set, 0).unwrap();
    let etcd = run_pod(
        inst,
        net,
        &pod_name,
        serde_json::json!({"app": "clustermesh-etcd"}),
        &spec,
        "etcd",
        vec![(
            net.ip,
            vec![format!("{pod_name}.clustermesh-etcd.{NS}.svc")],
        )],
        None,
        Duration::from_secs(60),
        |_| {},
    )
    .await;
    (etcd, pod_name)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_s_etcd_runs_from_its_manifest_ready_by_its_probe_and_restarted() {
    let inst = installed().await;
    let net = PodNet::new(&inst.bridge, 0);
    let (etcd, pod_name) = run_etcd(&inst, &net).await;
    let pods: Api<Pod> = Api::namespaced(inst.client.clone(), NS);
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
    assert_eq!(proc_status(pid, "Uid:"), "65532");
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapBnd:"), "0000000000000000");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(net.cgroup.file_name().unwrap().to_str().unwrap()),
        "{cgroup}"
    );

    // Its mTLS is deploy/'s: the apiserver's client certificate (from install's Secret) is
    // served, a client without one is refused.
    let client_tls = inst.dir.path().join("etcd-client");
    std::fs::create_dir_all(&client_tls).unwrap();
    for (k, v) in &inst.objects.secrets[&(NS.to_owned(), "clustermesh-etcd-client".to_owned())] {
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
    test_support::eventually(
        "etcd restarted and ready",
        Duration::from_secs(60),
        || async {
            let s = etcd.state();
            (s.restarts == 1 && s.ready).then_some(())
        },
    )
    .await;
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
    assert_eq!(etcd.pod_status()["containerStatuses"][0]["restartCount"], 1);
}

/// `deploy/`'s apiserver pod, from its Deployment, next to the etcd pod; returns it ready.
async fn run_apiserver(
    inst: &Installed,
    net: &PodNet,
    etcd_net: &PodNet,
    etcd_pod: &str,
    pod_name: &str,
) -> Supervisor {
    let deployment: Deployment = Api::namespaced(inst.client.clone(), NS)
        .get("clustermesh-apiserver")
        .await
        .unwrap();
    let spec = deployment.spec.unwrap().template.spec.unwrap();
    let ca = inst.kube.ca_pem().to_owned();
    let api = inst.kube.addr();
    run_pod(
        inst,
        net,
        pod_name,
        serde_json::json!({"app": "clustermesh-apiserver"}),
        &spec,
        "apiserver",
        vec![(
            etcd_net.ip,
            vec![format!("{etcd_pod}.clustermesh-etcd.{NS}.svc")],
        )],
        None,
        Duration::from_secs(90),
        |p| {
            // What the ServiceAccount admission plugin and the kubelet add to every pod that
            // mounts its token: the token volume and the API's Service environment.
            p.env
                .insert("KUBERNETES_SERVICE_HOST".into(), api.ip().to_string());
            p.env
                .insert("KUBERNETES_SERVICE_PORT".into(), api.port().to_string());
            p.mounts.push(kubelet::Mount {
                path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                read_only: true,
                volume: "kube-api-access".into(),
                source: kubelet::Source::Files {
                    files: BTreeMap::from([
                        ("ca.crt".to_owned(), (ca.into_bytes(), 0o644)),
                        ("namespace".to_owned(), (NS.as_bytes().to_vec(), 0o644)),
                    ]),
                    tokens: BTreeMap::from([("token".to_owned(), (String::new(), 3607, 0o644))]),
                },
            });
        },
    )
    .await
}

/// `deploy/`'s apiserver pod, from its Deployment, next to the etcd pod: it reads its
/// Secrets as user 65532 with a read-only root, reaches etcd by its Service name and the
/// Kubernetes API in-cluster with its ServiceAccount's token (RBAC as `deploy/` grants it),
/// becomes Ready by its own probe and takes the leader Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_s_apiserver_runs_from_its_manifest_next_to_etcd_and_leads() {
    let inst = installed().await;
    let etcd_net = PodNet::new(&inst.bridge, 0);
    let api_net = PodNet::new(&inst.bridge, 1);
    let (_etcd, etcd_pod) = run_etcd(&inst, &etcd_net).await;
    let pod_name = "clustermesh-apiserver-lab-0";
    let apiserver = run_apiserver(&inst, &api_net, &etcd_net, &etcd_pod, pod_name).await;
    let pid = apiserver.state().pid.unwrap();
    assert_eq!(proc_status(pid, "Uid:"), "65532");
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000000");
    let leases: Api<Lease> = Api::namespaced(inst.client.clone(), NS);
    test_support::eventually(
        "the apiserver to hold the leader Lease",
        Duration::from_secs(60),
        || async {
            leases
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|l| {
                    l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(pod_name)
                })
                .then_some(())
        },
    )
    .await;
}

/// The DaemonSet's pod for `node`, running and ready: it reaches the apiserver by its Service
/// name, which resolves to the Service's ClusterIP, which the lab's kube-proxy sends to the
/// apiserver pod.
async fn run_agent(
    inst: &Installed,
    node: &LabNode,
    apiservers: &[IpAddr],
) -> (Supervisor, String) {
    let vip = apiserver_vip(inst).await;
    route_service(
        &node.net.netns,
        inst.bridge.host(),
        vip,
        &[4240, 4241],
        apiservers,
    )
    .unwrap();
    let ds: DaemonSet = Api::namespaced(inst.client.clone(), NS)
        .get("clustermesh-node-agent")
        .await
        .unwrap();
    let spec = ds.spec.unwrap().template.spec.unwrap();
    let pod_name = format!("clustermesh-node-agent-{}", node.name);
    let agent = run_pod(
        inst,
        &node.net,
        &pod_name,
        serde_json::json!({"app": "clustermesh-node-agent"}),
        &spec,
        "agent",
        vec![(vip, vec![format!("clustermesh-apiserver.{NS}.svc")])],
        Some(node),
        Duration::from_secs(90),
        |_| {},
    )
    .await;
    (agent, pod_name)
}

/// The apiserver Service's ClusterIP.
async fn apiserver_vip(inst: &Installed) -> IpAddr {
    let svc: Service = Api::namespaced(inst.client.clone(), NS)
        .get("clustermesh-apiserver")
        .await
        .unwrap();
    svc.spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP")
        .parse()
        .unwrap()
}

/// The certificate an agent pod enrolled for (kept in its emptyDir): its DER.
fn enrolled_der(inst: &Installed, pod_name: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(inst.dir.path().join(pod_name).join("volumes/tls/tls.crt"))
        .unwrap();
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// `deploy/`'s node agent pods, from its DaemonSet, on two lab nodes (host network: the
/// node's namespace; the node's bpffs and cgroup as its host paths): each finds the kubelet's
/// pods cgroup itself, enrolls with its pod-bound projected token for a certificate of its own
/// node — the two agents hold different certificates —, follows the Mesh API by the
/// apiserver's Service name and becomes Ready by its own probe, bounded to the capabilities
/// `deploy/` lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_s_node_agents_run_from_the_manifest_each_enrolled_for_its_own_node() {
    let inst = installed().await;
    let etcd_net = PodNet::new(&inst.bridge, 0);
    let api_net = PodNet::new(&inst.bridge, 1);
    let n1 = LabNode::new(&inst, 2, "lab-node-1").await;
    let n2 = LabNode::new(&inst, 3, "lab-node-2").await;
    let (_etcd, etcd_pod) = run_etcd(&inst, &etcd_net).await;
    let _apiserver = run_apiserver(
        &inst,
        &api_net,
        &etcd_net,
        &etcd_pod,
        "clustermesh-apiserver-lab-0",
    )
    .await;
    let (a1, p1) = run_agent(&inst, &n1, &[api_net.ip]).await;
    let (_a2, p2) = run_agent(&inst, &n2, &[api_net.ip]).await;
    let (d1, d2) = (enrolled_der(&inst, &p1), enrolled_der(&inst, &p2));
    assert_ne!(d1, d2, "two agents, two certificates");
    for (der, node) in [(&d1, "lab-node-1"), (&d2, "lab-node-2")] {
        let id = certs::MeshIdentity::from_cert_der(der).unwrap();
        assert_eq!(id.role, certs::Role::NodeAgent);
        assert_eq!(
            id.node.as_ref().map(|n| n.to_string()).as_deref(),
            Some(node)
        );
    }
    // Bounded to deploy/'s capabilities (BPF, NET_ADMIN, SYS_ADMIN), uid 0.
    let pid = a1.state().pid.unwrap();
    let bound = u64::from_str_radix(&proc_status(pid, "CapBnd:"), 16).unwrap();
    let allowed = (1u64 << 39) | (1 << 12) | (1 << 21);
    assert_eq!(bound, allowed, "CapBnd {bound:#x}");
    assert_eq!(proc_status(pid, "Uid:"), "0");
    // The programs are pinned in each node's own bpffs.
    for n in [&n1, &n2] {
        assert!(
            std::fs::read_dir(&n.pins).unwrap().next().is_some(),
            "pins under {}'s bpffs",
            n.name
        );
    }
}

/// The Deployment's status as its controller reports it (what `kubectl rollout status`
/// reads).
async fn report_deployment(inst: &Installed, updated: u32, old: u32, ready: u32) {
    let deployments: Api<Deployment> = Api::namespaced(inst.client.clone(), NS);
    let d = deployments.get("clustermesh-apiserver").await.unwrap();
    let generation = d.metadata.generation.unwrap_or(1);
    deployments
        .patch_status(
            "clustermesh-apiserver",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "observedGeneration": generation,
                "replicas": updated + old,
                "updatedReplicas": updated,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": (updated + old).saturating_sub(ready),
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True",
                     "reason": if old == 0 { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }},
                ],
            }})),
        )
        .await
        .unwrap();
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
/// carried out as its controller and the kubelet would: a new pod is started and Ready before
/// an old one leaves the Service's endpoints and is sent `SIGTERM`. A node agent follows the
/// Mesh API through the Service, and a client connects to the Service every 10 ms all along:
/// the rollout completes, no connection fails and the agent deletes nothing from its maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_the_apiserver_completes_with_no_failed_connection_or_map_delete() {
    let inst = installed().await;
    let etcd_net = PodNet::new(&inst.bridge, 0);
    let node = LabNode::new(&inst, 1, "lab-node-1").await;
    let (_etcd, etcd_pod) = run_etcd(&inst, &etcd_net).await;
    let nets: Vec<PodNet> = (0..4).map(|i| PodNet::new(&inst.bridge, 10 + i)).collect();
    let mut pods: Vec<(Supervisor, IpAddr, u32)> = Vec::new();
    for (i, net) in nets.iter().enumerate().take(2) {
        let name = format!("clustermesh-apiserver-rev1-{i}");
        pods.push((
            run_apiserver(&inst, net, &etcd_net, &etcd_pod, &name).await,
            net.ip,
            1,
        ));
    }
    report_deployment(&inst, 2, 0, 2).await;
    let vip = apiserver_vip(&inst).await;
    let (agent, _) = run_agent(&inst, &node, &[nets[0].ip, nets[1].ip]).await;
    // A global service with a backend: state the agent has programmed and must keep.
    let shop = serde_json::json!({"metadata": {"name": "shop"}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(inst.client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(shop).unwrap(),
        )
        .await
        .unwrap();
    let web: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop",
                     "annotations": {"service.cilium.io/global": "true"}},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(inst.client.clone(), "shop")
        .create(&PostParams::default(), &web)
        .await
        .unwrap();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.252.{}.150", inst.bridge.subnet)],
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "nodeName": "lab-node-1"}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(inst.client.clone(), "shop")
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
    test_support::eventually(
        "the agent to program shop/web",
        Duration::from_secs(60),
        || async {
            (metric(node.net.ip, "clustermesh_datapath_services ").await >= 1.0).then_some(())
        },
    )
    .await;
    let reconnects_before = metric(node.net.ip, "clustermesh_node_mesh_reconnects_total ").await;
    let deletes_before = metric(
        node.net.ip,
        "clustermesh_datapath_map_ops_total{op=\"delete\"}",
    )
    .await;

    // A client of the Service, in the node's namespace: one connection every 10 ms.
    let stop = inst.dir.path().join("stop-client");
    let client = Command::new("ip")
        .args(["netns", "exec", &node.net.netns, "python3", "-c"])
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

    // The user's change, and the user watching it.
    let kubectl = |args: &[&str]| {
        tokio::process::Command::new("kubectl")
            .args(["--kubeconfig"])
            .arg(inst.kube.kubeconfig())
            .args(["--context", inst.kube.context(), "-n", NS])
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
    let status = tokio::spawn(kubectl(&[
        "rollout",
        "status",
        "deployment/clustermesh-apiserver",
        "--timeout=180s",
    ]));

    // The controller: surge one new pod, Ready, then retire one old pod; twice.
    for step in 0..2usize {
        let net = &nets[2 + step];
        let name = format!("clustermesh-apiserver-rev2-{step}");
        let new = run_apiserver(&inst, net, &etcd_net, &etcd_pod, &name).await;
        pods.push((new, net.ip, 2));
        report_deployment(&inst, step as u32 + 1, 2 - step as u32, 3).await;
        // The oldest pod leaves the endpoints first, then gets SIGTERM.
        let (old, _, _) = pods.remove(0);
        let endpoints: Vec<IpAddr> = pods.iter().map(|(_, ip, _)| *ip).collect();
        route_service(
            &node.net.netns,
            inst.bridge.host(),
            vip,
            &[4240, 4241],
            &endpoints,
        )
        .unwrap();
        assert!(
            old.terminate(Duration::from_secs(30)),
            "the old pod stopped on SIGTERM"
        );
        report_deployment(&inst, step as u32 + 1, 1 - step as u32, 2).await;
    }
    let rolled = status.await.unwrap().unwrap();
    assert!(
        rolled.status.success(),
        "kubectl rollout status: {}{}",
        String::from_utf8_lossy(&rolled.stdout),
        String::from_utf8_lossy(&rolled.stderr)
    );
    assert!(String::from_utf8_lossy(&rolled.stdout).contains("successfully rolled out"));
    // The agent follows a new replica, and deleted nothing.
    test_support::eventually("the agent ready again", Duration::from_secs(60), || async {
        agent.state().ready.then_some(())
    })
    .await;
    std::fs::write(&stop, "").unwrap();
    let out = client.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ok"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["failed"], 0, "no client connection failed: {v}");
    let deletes_after = metric(
        node.net.ip,
        "clustermesh_datapath_map_ops_total{op=\"delete\"}",
    )
    .await;
    assert_eq!(deletes_after, deletes_before, "no map delete on the node");
    assert!(
        metric(node.net.ip, "clustermesh_datapath_services ").await >= 1.0,
        "shop/web still programmed"
    );
    // Both replicas it could follow were replaced: it reconnected, and kept everything.
    assert!(
        metric(node.net.ip, "clustermesh_node_mesh_reconnects_total ").await > reconnects_before,
        "the agent had to reconnect"
    );
}
