//! The emulated lab: N clusters on one machine, each installed the way a user installs one.
//!
//! Network: one Linux bridge `cmb<X>` with `10.X.0.1/16` for the lab subnet `10.X.0.0/16`
//! (creating the bridge is the lock on X, so labs run side by side). Cluster number `i`
//! (1-based) has nodes `10.X.i.(10+n)`, workload pods in `10.X.(16·i+n).0/24` (node `n`'s),
//! the mesh's own pods (etcd, apiservers) in `10.X.(16·i+15).0/24`; workload ClusterIPs are
//! `10.X.(200+i).*` and never on the wire (socket load balancing translates them at
//! connect()).
//!
//! Per cluster ([`Lab::install_cluster`]): the Kubernetes API test server on the bridge
//! address (where pods reach it in-cluster), then `clustermesh install` against it — the
//! cluster CA and every certificate into Secrets, `deploy/`'s manifests applied — and the lab
//! kubelet ([`crate::lab_kubelet`], `clustermesh-lab kubelet`, one process per cluster), which
//! runs what those objects ask for: etcd's StatefulSet, the apiserver's Deployment (two
//! replicas, rolled on a template change), the node agent's DaemonSet on every lab node; and
//! the Mesh API's load balancer on a port of the bridge address. No process of the mesh is
//! started from flags written here: a wrong flag, mount, user, capability or probe in
//! `deploy/` fails the lab. Nodes are network namespaces on the bridge with a cgroup (pods
//! below its `kubepods`) and a bpffs directory, announced to the kubelet by their Node
//! objects. Workload pods (backends, clients) are network namespaces on the bridge with
//! processes in their node's `kubepods` cgroup; for them the lab plays the controllers the
//! test server has not: it writes their Pods and EndpointSlices.
//!
//! Faults are a cluster's faults: a killed container is restarted by the kubelet
//! ([`Lab::crash`], [`Lab::restart`] waits for it), a hung one is stopped with `SIGSTOP`
//! ([`Lab::hold_down`]), etcd is cut from the apiservers by a rule in their namespaces
//! ([`Lab::cut_apiserver_etcd`]), an apiserver is stopped by scaling its Deployment to 0.
//!
//! Its state lives in `<dir>/lab.json`, so `clustermesh-lab` commands can act on a lab that an
//! earlier command brought up; [`Lab::teardown`] (or dropping a [`Lab`] that owns its
//! processes) removes everything: processes, namespaces, veths, the bridge, cgroups and BPF
//! pins.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab_kubelet::remove_cgroup;
use anyhow::{Context, Result, anyhow, bail};
use certs::{Ca, LeafSpec, MeshIdentity, Role};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use model::objects::APISERVER_SERVICE;
use model::{ClusterId, ClusterName, NodeName};
use serde::{Deserialize, Serialize};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
const BPFFS: &str = "/sys/fs/bpf";
/// Port of the demo backends.
pub const BACKEND_PORT: u16 = 8080;

/// Where the workspace's binaries are: `$CLUSTERMESH_BIN_DIR`, else next to (or one level
/// above) the running executable (`target/debug`, `target/debug/deps`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLUSTERMESH_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Path of a workspace binary, or a clear error.
pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build the workspace's binaries first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// A process the lab started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    /// Its PID.
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            // State is the field after the command name in parentheses; Z = zombie.
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn kill(p: &Proc) {
    let _ = Command::new("kill")
        .args(["-KILL", &p.pid.to_string()])
        .stderr(Stdio::null())
        .status();
    // Processes are started detached (init reaps them): wait until it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(p.pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `argv` detached (its parent becomes init), output to `log`.
fn spawn(argv: &[String], log: &Path) -> Result<Proc> {
    let pidfile = log.with_extension("pid");
    let _ = std::fs::remove_file(&pidfile);
    // `setsid -f` forks: the shell writes the real PID of the exec'd program.
    let script = format!(
        "echo $$ > '{}'; exec {} >>'{}' 2>&1",
        pidfile.display(),
        argv.iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" "),
        log.display()
    );
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("setsid")?;
    if !status.success() {
        bail!("could not start {}", argv.join(" "));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = std::fs::read_to_string(&pidfile)
            && let Ok(pid) = s.trim().parse()
        {
            return Ok(Proc {
                pid,
                log: log.to_path_buf(),
            });
        }
        if Instant::now() > deadline {
            bail!("{} did not start", argv.join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `sh` preamble that puts a process into `cgroup` and network namespace `netns`.
fn in_pod(cgroup: &Path, netns: &str, argv: &[String]) -> Vec<String> {
    let mut v = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter --net=/run/netns/{netns} -- \"$@\"",
            cgroup.display()
        ),
        "sh".to_owned(),
    ];
    v.extend_from_slice(argv);
    v
}

/// A node of an emulated cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    /// Node name (also the Kubernetes Node's).
    pub name: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// Its network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// Its cgroup (its `/sys/fs/cgroup`): the node agent's pod runs here, other pods below
    /// `kubepods`, where the agent attaches the socket-LB programs.
    pub cgroup: PathBuf,
    /// Its BPF pin directory.
    pub pins: PathBuf,
    /// Pods started on it so far (to number pod addresses).
    pub pods: u8,
}

/// A pod of an emulated cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its network namespace.
    pub netns: String,
    /// Its cgroup (a child of its node's).
    pub cgroup: PathBuf,
    /// The process serving in it, if any.
    pub server: Option<Proc>,
    /// The service it backs, `namespace/name`, if any.
    pub service: Option<String>,
}

/// One emulated cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// Its name (and kubeconfig context).
    pub name: String,
    /// Its ID.
    pub id: u16,
    /// Its number in the lab (1-based): picks its address ranges.
    pub index: u8,
    /// Its directory.
    pub dir: PathBuf,
    /// The Kubernetes API test server.
    pub kube: Option<Proc>,
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
    /// The port of the Mesh API's load balancer on the bridge address (its `mesh-endpoint`).
    pub mesh_port: u16,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Pods.
    pub pods: Vec<PodState>,
    /// Services deployed: `namespace/name` → ClusterIP.
    pub services: BTreeMap<String, Ipv4Addr>,
    /// The lab kubelet (`clustermesh-lab kubelet`) of an installed cluster.
    #[serde(default)]
    pub kubelet: Option<Proc>,
}

/// The whole lab, as saved in `lab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// The second octet of the lab subnet `10.X.0.0/16`.
    pub x: u8,
    /// The bridge.
    pub bridge: String,
    /// The lab's directory.
    pub dir: PathBuf,
    /// Veths created (host side); a counter names them.
    pub veths: u32,
    /// Clusters.
    pub clusters: Vec<ClusterState>,
}

/// A lab. Dropping it tears it down when `owned` (tests); the `clustermesh-lab` command
/// leaves it running between commands.
#[derive(Debug)]
pub struct Lab {
    /// The state.
    pub state: LabState,
    owned: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            self.teardown();
        }
    }
}

/// Picks a free lab subnet: creating the bridge `cmb<X>` is the lock (it fails when another
/// lab holds X).
fn allocate_subnet() -> Result<u8> {
    for x in 100u8..=199 {
        let bridge = format!("cmb{x}");
        if ip(&["link", "add", &bridge, "type", "bridge"]).is_ok() {
            return Ok(x);
        }
    }
    bail!("no free lab subnet in 10.100.0.0/16 … 10.199.0.0/16 (bridges cmb100..cmb199 all exist)")
}

impl Lab {
    /// Creates an empty lab (bridge, subnet) in `dir`, torn down on drop when `owned`.
    pub fn create(dir: &Path, owned: bool) -> Result<Self> {
        let x = allocate_subnet()?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let bridge = format!("cmb{x}");
        let lab = Self {
            state: LabState {
                x,
                bridge: bridge.clone(),
                dir,
                veths: 0,
                clusters: Vec::new(),
            },
            owned,
        };
        ip(&["addr", "add", &format!("10.{x}.0.1/16"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        std::fs::create_dir_all(lab.pins_root())?;
        lab.save()?;
        Ok(lab)
    }

    /// Leaves the lab running when this value is dropped.
    pub fn keep(&mut self) {
        self.owned = false;
    }

    /// Loads the lab saved in `dir` (not owned: dropping it leaves it running).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "read {} (is a lab up in {}?)",
                path.display(),
                dir.display()
            )
        })?;
        Ok(Self {
            state: serde_json::from_str(&text)
                .with_context(|| format!("parse {}", path.display()))?,
            owned: false,
        })
    }

    /// Saves the state to `lab.json`.
    pub fn save(&self) -> Result<()> {
        let path = self.state.dir.join("lab.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn pins_root(&self) -> PathBuf {
        Path::new(BPFFS).join(format!("clustermesh-lab-{}", self.state.x))
    }

    /// The bridge address: where the apiservers' Mesh APIs listen.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.state.x, 0, 1)
    }

    /// A kubeconfig with every cluster's context (named after the cluster).
    pub fn kubeconfig(&self) -> PathBuf {
        self.state.dir.join("kubeconfig")
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let mut merged: Option<kube::config::Kubeconfig> = None;
        for c in &self.state.clusters {
            let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig)?;
            merged = Some(match merged {
                None => kc,
                Some(m) => m.merge(kc)?,
            });
        }
        if let Some(mut kc) = merged {
            kc.current_context = self.state.clusters.first().map(|c| c.name.clone());
            std::fs::write(self.kubeconfig(), serde_json::to_vec_pretty(&kc)?)?;
        }
        Ok(())
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Result<&ClusterState> {
        self.state
            .clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow!("no cluster {name} in the lab"))
    }

    fn cluster_mut(&mut self, name: &str) -> Result<&mut ClusterState> {
        self.state
            .clusters
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow!("no cluster {name} in the lab"))
    }

    /// A Kubernetes client of `cluster`.
    pub async fn client(&self, cluster: &str) -> Result<kube::Client> {
        let c = self.cluster(cluster)?;
        let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A veth pair: host end on the bridge, the other end as `eth0` in `netns` with `addr`.
    fn plug(&mut self, netns: &str, addr: Ipv4Addr) -> Result<()> {
        self.state.veths += 1;
        let host = format!("cm{}h{}", self.state.x, self.state.veths);
        let peer = format!("cm{}p{}", self.state.x, self.state.veths);
        ip(&["netns", "add", netns])?;
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", netns])?;
        in_ns(netns, &["link", "set", &peer, "name", "eth0"])?;
        in_ns(
            netns,
            &["addr", "add", &format!("{addr}/16"), "dev", "eth0"],
        )?;
        in_ns(netns, &["link", "set", "eth0", "up"])?;
        in_ns(netns, &["link", "set", "lo", "up"])?;
        ip(&["link", "set", &host, "master", &self.state.bridge])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(())
    }

    /// Adds a cluster the way a user installs one (issue #15): the Kubernetes API test server
    /// (on the bridge address, where pods reach it in-cluster), `clustermesh install` against
    /// it — CA and certificates into Secrets, `deploy/`'s manifests applied — and the lab
    /// kubelet running what they ask for (etcd's StatefulSet, the apiserver's Deployment, the
    /// node agents' DaemonSet on `nodes` lab nodes); waits until the apiserver leads and
    /// exports and every node agent is ready. No process of the mesh is started from flags
    /// written here: they all come from the applied objects.
    pub async fn install_cluster(&mut self, name: &str, id: u16, nodes: u8) -> Result<()> {
        ClusterName::new(name)?;
        ClusterId::new(u64::from(id))?;
        let index = self.state.clusters.len() as u8 + 1;
        if index > 8 {
            bail!("the lab holds at most 8 clusters");
        }
        let dir = self.state.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let host = self.host_ip();
        let kube_dir = dir.join("kube");
        let _ = std::fs::remove_file(kube_dir.join("kubeconfig"));
        let kube = spawn(
            &[
                binary("kube-testserver")?.display().to_string(),
                "--cluster".into(),
                name.into(),
                "--dir".into(),
                kube_dir.display().to_string(),
                "--bind".into(),
                format!("{host}:0"),
                "--log".into(),
                "warn".into(),
            ],
            &dir.join("kube.log"),
        )?;
        let kubeconfig = kube_dir.join("kubeconfig");
        // The Mesh API's load balancer: a port of the bridge address.
        let mesh_port = test_support::free_port()?;
        self.state.clusters.push(ClusterState {
            name: name.into(),
            id,
            index,
            dir: dir.clone(),
            kube: Some(kube),
            kubeconfig: kubeconfig.clone(),
            mesh_port,
            nodes: Vec::new(),
            pods: Vec::new(),
            services: BTreeMap::new(),
            kubelet: None,
        });
        self.save()?;
        wait_for(
            "the Kubernetes API test server's kubeconfig",
            Duration::from_secs(30),
            || async { kubeconfig.is_file() },
        )
        .await?;
        self.write_kubeconfig()?;
        // What a user runs. The lab keeps the CAs (tests issue admin certificates from them).
        let out = tokio::process::Command::new(binary("clustermesh")?)
            .args([
                "install",
                "--context",
                name,
                "--cluster-name",
                name,
                "--cluster-id",
                &id.to_string(),
                "--mesh-endpoint",
                &format!("{host}:{mesh_port}"),
                "--keep-ca",
                &dir.display().to_string(),
                "--wait",
                "false",
            ])
            .env("KUBECONFIG", self.kubeconfig())
            .output()
            .await
            .context("run clustermesh install")?;
        if !out.status.success() {
            bail!(
                "clustermesh install --context {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let kubelet = spawn(
            &[
                binary("clustermesh-lab")?.display().to_string(),
                "kubelet".into(),
                "--dir".into(),
                self.state.dir.display().to_string(),
                "--cluster".into(),
                name.into(),
            ],
            &dir.join("kubelet.log"),
        )?;
        self.cluster_mut(name)?.kubelet = Some(kubelet);
        self.save()?;
        for n in 1..=nodes {
            self.add_node(name, &format!("{name}-node-{n}")).await?;
        }
        self.until_exporting(name, 0, &format!("{name}'s apiserver to lead and export"))
            .await
    }

    /// The lab kubelet's settings for `cluster` (what `clustermesh-lab kubelet` runs with).
    pub fn kubelet_config(&self, cluster: &str) -> Result<crate::lab_kubelet::Config> {
        let c = self.cluster(cluster)?;
        let x = self.state.x;
        Ok(crate::lab_kubelet::Config {
            kubeconfig: c.kubeconfig.clone(),
            dir: c.dir.join("kubelet"),
            bridge: self.state.bridge.clone(),
            gateway: self.host_ip(),
            pod_subnet: [10, x, 16 * c.index + 15],
            prefix_len: 16,
            prefix: kubelet_prefix(x, c.index),
            veth_prefix: format!("cm{x}h{}k", c.index),
            load_balancers: BTreeMap::from([(APISERVER_SERVICE.to_owned(), (c.mesh_port, 4240))]),
        })
    }

    /// Waits until `cluster`'s apiserver leads and exports, with a status document written at
    /// or after `since` (Unix seconds; 0: any).
    async fn until_exporting(&self, cluster: &str, since: i64, what: &str) -> Result<()> {
        let client = self.client(cluster).await?;
        let log = self.cluster(cluster)?.dir.join("kubelet.log");
        wait_for(
            &format!("{what} (kubelet log: {})", log.display()),
            Duration::from_secs(120),
            || async { installed_apiserver_exporting(&client, since).await },
        )
        .await
    }

    /// Starts `cluster`'s apiserver again after [`Lab::stop_apiserver`] (its Deployment
    /// scaled back to 2 replicas) and waits until it leads and exports.
    pub async fn start_apiserver(&mut self, cluster: &str) -> Result<()> {
        self.scale_apiserver(cluster, 2).await?;
        self.until_exporting(
            cluster,
            0,
            &format!("{cluster}'s apiserver to lead and export"),
        )
        .await
    }

    /// A component's TLS directory (`ca.crt`, `tls.crt`, `tls.key`) as it runs: in its pod's
    /// volume (an apiserver's: a ready replica's).
    pub async fn tls_dir(&self, cluster: &str, which: &TlsDir) -> Result<PathBuf> {
        let pods = self.cluster(cluster)?.dir.join("kubelet/pods");
        let volume = match which {
            TlsDir::NodeAgent(n) => {
                return Ok(pods.join(format!("clustermesh-node-agent-{n}/volumes/tls")));
            }
            TlsDir::EtcdClient => PathBuf::from("etcd-tls"),
            TlsDir::MeshServer => PathBuf::from("mesh-tls"),
            TlsDir::Peer(p) => Path::new("peers").join(p),
        };
        let pod = self.ready_apiserver_pod(cluster).await?;
        Ok(pods.join(pod).join("volumes").join(volume))
    }

    /// The apiserver's Pods, as the API has them.
    async fn apiserver_pods(&self, cluster: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client(cluster).await?, "kube-system");
        let lp = kube::api::ListParams::default().labels("app=clustermesh-apiserver");
        Ok(pods.list(&lp).await?.items)
    }

    /// A ready apiserver pod.
    async fn ready_apiserver_pod(&self, cluster: &str) -> Result<String> {
        self.apiserver_pods(cluster)
            .await?
            .into_iter()
            .find(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .and_then(|p| p.metadata.name)
            .ok_or_else(|| anyhow!("no ready apiserver pod in {cluster}"))
    }

    /// etcd's client address: its pod's (its server certificate names the pod's DNS name and
    /// `localhost`, which only its pods resolve: see [`Lab::etcd_reader`]).
    pub async fn etcd_addr(&self, cluster: &str) -> Result<SocketAddr> {
        let pods: Api<Pod> = Api::namespaced(self.client(cluster).await?, "kube-system");
        let ip = pods
            .get("clustermesh-etcd-0")
            .await?
            .status
            .and_then(|s| s.pod_ip)
            .ok_or_else(|| anyhow!("etcd of {cluster} has no address yet"))?;
        Ok(SocketAddr::new(ip.parse()?, 2379))
    }

    /// The network namespace the lab kubelet gave `pod` of `cluster`.
    fn pod_netns(&self, cluster: &str, pod: &str) -> Result<String> {
        let c = self.cluster(cluster)?;
        Ok(format!("{}-{pod}", kubelet_prefix(self.state.x, c.index)))
    }

    /// The apiserver replica that leads: of its Pods with an address, the one whose `/status`,
    /// read from inside its namespace, says so; else the first with a process. With that
    /// `/status`.
    pub async fn apiserver_leader(&self, cluster: &str) -> Result<Replica> {
        let c = self.cluster(cluster)?;
        let mut replicas = Vec::new();
        for p in self.apiserver_pods(cluster).await? {
            let (Some(name), Some(ip)) = (
                p.metadata.name,
                p.status
                    .and_then(|s| s.pod_ip)
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            ) else {
                continue;
            };
            let netns = self.pod_netns(cluster, &name)?;
            let pid = procs(&Path::new(CGROUP_ROOT).join(&netns)).first().copied();
            // `/status` is served to loopback callers only: asked from inside the pod.
            let status = in_netns(&netns, || async {
                test_support::http_get(([127, 0, 0, 1], 9880).into(), "/status").await
            })
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|r| {
                let body = r.split_once("\r\n\r\n")?.1.to_owned();
                serde_json::from_str::<model::status::ClusterStatus>(&body).ok()
            });
            replicas.push(Replica {
                log: c.dir.join("kubelet/pods").join(&name).join("apiserver.log"),
                name,
                netns,
                pid: pid.unwrap_or(0),
                mesh: SocketAddr::new(ip, 4240),
                health: SocketAddr::new(ip, 9880),
                status,
            });
        }
        replicas.sort_by_key(|r| (!r.status.as_ref().is_some_and(|s| s.leader), r.pid == 0));
        replicas
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no apiserver pod of {cluster}"))
    }

    /// Cuts (or restores) the path from `cluster`'s apiserver pods to its etcd: connections to
    /// etcd's port are reset, existing ones and new ones (nftables in each apiserver pod's
    /// namespace; the rule outlives a restart of the container). Installed clusters only.
    pub async fn cut_apiserver_etcd(&self, cluster: &str, cut: bool) -> Result<()> {
        let etcd = self.etcd_addr(cluster).await?;
        let script = if cut {
            format!(
                "table ip cm_etcd_cut {{}}\ndelete table ip cm_etcd_cut\n\
                 table ip cm_etcd_cut {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
                 ip daddr {} tcp dport {} reject with tcp reset\n  }}\n}}\n",
                etcd.ip(),
                etcd.port()
            )
        } else {
            "table ip cm_etcd_cut {}\ndelete table ip cm_etcd_cut\n".to_owned()
        };
        let pods = self.apiserver_pods(cluster).await?;
        if pods.is_empty() {
            bail!("no apiserver pod of {cluster} to cut");
        }
        for name in pods.into_iter().filter_map(|p| p.metadata.name) {
            let netns = self.pod_netns(cluster, &name)?;
            crate::pod_runner::nft_in(&netns, &script)?;
            if cut {
                // Established streams too, at once (as a dead link shows after its timeouts).
                let _ = Command::new("ip")
                    .args(["netns", "exec", &netns, "ss", "-K", "-t", "dst"])
                    .arg(etcd.ip().to_string())
                    .output();
            }
        }
        Ok(())
    }

    /// Where `cluster`'s etcd is read directly, as its apiserver reads it: the endpoint, the
    /// apiserver's etcd client certificate, and the etcd pod's namespace to read from (its
    /// server certificate names `localhost` and its Service, not its address).
    pub async fn etcd_reader(&self, cluster: &str) -> Result<(String, PathBuf, String)> {
        let tls = self.tls_dir(cluster, &TlsDir::EtcdClient).await?;
        Ok((
            "https://localhost:2379".into(),
            tls,
            self.pod_netns(cluster, "clustermesh-etcd-0")?,
        ))
    }

    /// Sets the replicas of an installed cluster's apiserver Deployment, as
    /// `kubectl scale` does.
    async fn scale_apiserver(&self, cluster: &str, replicas: i32) -> Result<()> {
        let client = self.client(cluster).await?;
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client, "kube-system")
            .patch(
                "clustermesh-apiserver",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
            )
            .await?;
        Ok(())
    }

    /// Stops `cluster`'s apiserver (its Deployment scaled to 0) and waits until no
    /// replica runs.
    pub async fn stop_apiserver(&self, cluster: &str) -> Result<()> {
        self.scale_apiserver(cluster, 0).await?;
        let client = self.client(cluster).await?;
        wait_for(
            &format!("{cluster}'s apiserver pods to be gone"),
            Duration::from_secs(60),
            || {
                let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
                async move {
                    let lp = kube::api::ListParams::default().labels("app=clustermesh-apiserver");
                    pods.list(&lp).await.is_ok_and(|l| l.items.is_empty())
                }
            },
        )
        .await
    }

    /// Adds a node: namespace on the bridge, cgroup, node agent (waits until it is ready).
    pub async fn add_node(&mut self, cluster: &str, node: &str) -> Result<()> {
        let x = self.state.x;
        let c = self.cluster(cluster)?.clone();
        let n = c.nodes.len() as u8 + 1;
        let ip4 = Ipv4Addr::new(10, x, c.index, 10 + n);
        let netns = format!("cm{x}-{node}");
        self.plug(&netns, ip4)?;
        let cgroup = Path::new(CGROUP_ROOT).join(format!("cm{x}-{node}"));
        std::fs::create_dir_all(&cgroup)?;
        self.add_installed_node(cluster, node, ip4, netns, cgroup)
            .await
    }

    /// A node of an installed cluster: its namespace and cgroup (with the kubelet's `kubepods`
    /// below it), its own bpffs directory, and the Node object telling the lab kubelet where
    /// they are; the DaemonSet's pod comes from the kubelet.
    async fn add_installed_node(
        &mut self,
        cluster: &str,
        node: &str,
        ip4: Ipv4Addr,
        netns: String,
        cgroup: PathBuf,
    ) -> Result<()> {
        let x = self.state.x;
        let c = self.cluster(cluster)?.clone();
        let n = c.nodes.len() as u8 + 1;
        std::fs::create_dir_all(cgroup.join("kubepods"))?;
        let bpffs = self.pins_root().join(node);
        std::fs::create_dir_all(&bpffs)?;
        let pod_cidr = format!("10.{x}.{}.0/24", 16 * c.index + n);
        let node_obj: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": node,
                "labels": {"topology.kubernetes.io/zone": format!("{cluster}-a")},
                "annotations": {
                    crate::lab_kubelet::NODE_NETNS: netns,
                    crate::lab_kubelet::NODE_CGROUP: cgroup.display().to_string(),
                    crate::lab_kubelet::NODE_BPFFS: bpffs.display().to_string(),
                },
            },
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip4.to_string()}]},
        }))?;
        Api::<Node>::all(self.client(cluster).await?)
            .create(&PostParams::default(), &node_obj)
            .await?;
        self.cluster_mut(cluster)?.nodes.push(NodeState {
            name: node.into(),
            ip: ip4,
            netns,
            cgroup,
            pins: bpffs.join(format!("clustermesh-{cluster}-{node}")),
            pods: 0,
        });
        self.save()?;
        let log = c.dir.join("kubelet.log");
        wait_for(
            &format!(
                "the node agent pod of {node} to be ready (kubelet log: {})",
                log.display()
            ),
            Duration::from_secs(120),
            || agent_ready(ip4),
        )
        .await
    }

    /// `node`'s `/state` over mutual TLS, as `clustermesh services --node` reads it (with an
    /// admin certificate from the cluster's CA).
    pub async fn node_state(
        &self,
        cluster: &str,
        node: &str,
    ) -> Result<model::node_state::NodeState> {
        let c = self.cluster(cluster)?;
        let n = c
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {node} in {cluster}"))?;
        let ca = Ca::from_pem(
            &std::fs::read_to_string(c.dir.join("ca/ca.crt"))?,
            &std::fs::read_to_string(c.dir.join("ca/ca.key"))?,
        )?;
        let (name, id) = (ClusterName::new(cluster)?, ClusterId::new(u64::from(c.id))?);
        let admin = ca.issue(&LeafSpec::new(MeshIdentity::new(
            name.clone(),
            id,
            Role::Admin,
        )))?;
        let addr = format!("{}:{}", n.ip, model::node_state::NODE_AGENT_STATE_PORT);
        Ok(meshapi::node_state::fetch(
            &addr,
            &name,
            id,
            &NodeName::new(node)?,
            ca.cert_pem(),
            &admin.cert_pem,
            &admin.key_pem,
            Duration::from_secs(10),
        )
        .await?)
    }

    /// Adds a pod on `node` (namespace on the bridge, child cgroup, Kubernetes Pod).
    pub async fn add_pod(
        &mut self,
        cluster: &str,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<PodState> {
        let x = self.state.x;
        let c = self.cluster(cluster)?.clone();
        let (ni, n) = c
            .nodes
            .iter()
            .enumerate()
            .find(|(_, n)| n.name == node)
            .ok_or_else(|| anyhow!("no node {node} in {cluster}"))?;
        let ip4 = Ipv4Addr::new(10, x, 16 * c.index + ni as u8 + 1, 10 + n.pods);
        let netns = format!("cm{x}-{cluster}-{name}");
        self.plug(&netns, ip4)?;
        let node_cgroup = n.cgroup.clone();
        let client = self.client(cluster).await?;
        ensure_namespace(&client, namespace).await?;
        let pod_obj: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "lab"}]},
            "status": {
                "phase": "Running",
                "podIP": ip4.to_string(),
                "podIPs": [{"ip": ip4.to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))?;
        let created = test_support::kube::create_with_status(
            &Api::<Pod>::namespaced(client, namespace),
            &pod_obj,
        )
        .await?;
        // Named as kubelet's cgroupfs driver names a pod's cgroup: the node agent finds the
        // pod's cgroup (for its identity) by the pod's UID.
        let uid = created
            .metadata
            .uid
            .ok_or_else(|| anyhow!("pod {namespace}/{name} has no UID"))?;
        // Below `kubepods` on an installed cluster's node, where the agent's `--cgroup=auto`
        // finds the kubelet's pods.
        let pods_root = node_cgroup.join("kubepods");
        let cgroup = if pods_root.is_dir() {
            pods_root
        } else {
            node_cgroup
        }
        .join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup)?;
        let pod = PodState {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            ip: ip4,
            netns,
            cgroup,
            server: None,
            service: None,
        };
        {
            let c = self.cluster_mut(cluster)?;
            c.nodes[ni].pods += 1;
            c.pods.push(pod.clone());
        }
        self.save()?;
        Ok(pod)
    }

    /// Deploys a service: the Service (with `annotations`), `replicas` backend pods spread
    /// over the nodes, serving `<pod>@<cluster>` on [`BACKEND_PORT`], and its EndpointSlice.
    pub async fn deploy(
        &mut self,
        cluster: &str,
        service: &str,
        replicas: u8,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Ipv4Addr> {
        let (ns, name) = service
            .split_once('/')
            .ok_or_else(|| anyhow!("{service:?} is not namespace/name"))?;
        let c = self.cluster(cluster)?.clone();
        if c.nodes.is_empty() {
            bail!("{cluster} has no nodes");
        }
        let vip = Ipv4Addr::new(10, self.state.x, 200 + c.index, 10 + c.services.len() as u8);
        let client = self.client(cluster).await?;
        ensure_namespace(&client, ns).await?;
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {
                "clusterIP": vip.to_string(),
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"}],
            },
        }))?;
        Api::<Service>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &svc)
            .await?;
        self.cluster_mut(cluster)?
            .services
            .insert(service.into(), vip);
        for r in 0..replicas {
            let node = c.nodes[r as usize % c.nodes.len()].name.clone();
            let pod_name = format!("{name}-{cluster}-{r}");
            let labels = BTreeMap::from([("app".to_owned(), name.to_owned())]);
            self.add_pod(cluster, ns, &pod_name, &node, &labels).await?;
            let c = self.cluster_mut(cluster)?;
            if let Some(p) = c.pods.iter_mut().find(|p| p.name == pod_name) {
                p.service = Some(service.into());
            }
        }
        self.set_backends(cluster, service, true).await?;
        Ok(vip)
    }

    /// Starts (`true`) or kills (`false`) the backend processes of `service` in `cluster`.
    /// Killing does not touch Kubernetes: only the node agents' health checks notice, as
    /// when a process crashes before its readiness probe fails.
    pub async fn set_backends(
        &mut self,
        cluster: &str,
        service: &str,
        running: bool,
    ) -> Result<()> {
        let me = binary("clustermesh-lab")?;
        let c = self.cluster(cluster)?.clone();
        let pods: Vec<PodState> = c
            .pods
            .iter()
            .filter(|p| p.service.as_deref() == Some(service))
            .cloned()
            .collect();
        if pods.is_empty() {
            bail!("no backends of {service} in {cluster}");
        }
        for p in &pods {
            let current = self
                .cluster(cluster)?
                .pods
                .iter()
                .find(|q| q.name == p.name)
                .and_then(|q| q.server.clone());
            match (running, current) {
                (true, Some(s)) if alive(s.pid) => {}
                (true, _) => {
                    let argv = in_pod(
                        &p.cgroup,
                        &p.netns,
                        &[
                            me.display().to_string(),
                            "serve".into(),
                            "--name".into(),
                            format!("{}@{cluster}", p.name),
                            "--port".into(),
                            BACKEND_PORT.to_string(),
                        ],
                    );
                    let proc = spawn(&argv, &c.dir.join(format!("{}.log", p.name)))?;
                    let addr: SocketAddr = (p.ip, BACKEND_PORT).into();
                    let mut state_pod = p.clone();
                    state_pod.server = Some(proc);
                    let cm = self.cluster_mut(cluster)?;
                    if let Some(q) = cm.pods.iter_mut().find(|q| q.name == p.name) {
                        *q = state_pod;
                    }
                    self.save()?;
                    wait_for(
                        &format!("backend {} to listen on {addr}", p.name),
                        Duration::from_secs(20),
                        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
                    )
                    .await?;
                }
                (false, Some(s)) => {
                    kill(&s);
                    let cm = self.cluster_mut(cluster)?;
                    if let Some(q) = cm.pods.iter_mut().find(|q| q.name == p.name) {
                        q.server = None;
                    }
                }
                (false, None) => {}
            }
        }
        self.save()?;
        self.write_slice(cluster, service).await
    }

    /// Writes the EndpointSlice of `service` (every backend pod, ready).
    async fn write_slice(&self, cluster: &str, service: &str) -> Result<()> {
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        let c = self.cluster(cluster)?;
        let endpoints: Vec<serde_json::Value> = c
            .pods
            .iter()
            .filter(|p| p.service.as_deref() == Some(service))
            .map(|p| {
                serde_json::json!({
                    "addresses": [p.ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": p.node,
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": ns},
                })
            })
            .collect();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("{name}-lab"),
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}],
        }))?;
        let api: Api<EndpointSlice> = Api::namespaced(self.client(cluster).await?, ns);
        match api.get_opt(&format!("{name}-lab")).await? {
            Some(_) => {
                api.patch(
                    &format!("{name}-lab"),
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::to_value(&slice)?),
                )
                .await?;
            }
            None => {
                api.create(&PostParams::default(), &slice).await?;
            }
        }
        Ok(())
    }

    /// Removes a service: Service, EndpointSlice, backend pods.
    pub async fn undeploy(&mut self, cluster: &str, service: &str) -> Result<()> {
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        let client = self.client(cluster).await?;
        let _ = Api::<Service>::namespaced(client.clone(), ns)
            .delete(name, &DeleteParams::default())
            .await;
        let _ = Api::<EndpointSlice>::namespaced(client.clone(), ns)
            .delete(&format!("{name}-lab"), &DeleteParams::default())
            .await;
        let c = self.cluster_mut(cluster)?;
        c.services.remove(service);
        let (gone, kept): (Vec<PodState>, Vec<PodState>) = c
            .pods
            .drain(..)
            .partition(|p| p.service.as_deref() == Some(service));
        c.pods = kept;
        for p in gone {
            // The lab stopped the pod's process: the kubelet deletes it at once.
            let _ = Api::<Pod>::namespaced(client.clone(), ns)
                .delete(&p.name, &test_support::kube::now())
                .await;
            remove_pod(&p);
        }
        self.save()
    }

    /// Connects `n` times to `target` from `pod` (in its namespace and cgroup, so through
    /// socket load balancing) and counts where the connections went: backend `name@cluster`
    /// (read from what it sends) → count; failures under `"failed"`.
    pub fn connect_from(
        &self,
        cluster: &str,
        pod: &str,
        target: SocketAddr,
        n: u32,
    ) -> Result<BTreeMap<String, u32>> {
        let me = binary("clustermesh-lab")?;
        let c = self.cluster(cluster)?;
        let p = c
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| anyhow!("no pod {pod} in {cluster}"))?;
        let argv = in_pod(
            &p.cgroup,
            &p.netns,
            &[
                me.display().to_string(),
                "client".into(),
                "--target".into(),
                target.to_string(),
                "--count".into(),
                n.to_string(),
            ],
        );
        let out = Command::new(&argv[0]).args(&argv[1..]).output()?;
        if !out.status.success() {
            bail!(
                "client in {pod}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Tears everything down; errors are reported but do not stop the teardown.
    pub fn teardown(&mut self) {
        // The lab kubelets first: nothing restarts what is removed below.
        for c in &self.state.clusters {
            if let Some(k) = &c.kubelet {
                kill(k);
            }
            crate::lab_kubelet::remove_leftovers(&kubelet_prefix(self.state.x, c.index));
        }
        for c in self.state.clusters.iter().rev() {
            for p in &c.pods {
                remove_pod(p);
            }
            for n in &c.nodes {
                let _ = ip(&["netns", "del", &n.netns]);
                let _ = node_agent::datapath::remove(&n.pins);
                remove_cgroup(&n.cgroup);
            }
            for p in [&c.kube].into_iter().flatten() {
                kill(p);
            }
        }
        let _ = std::fs::remove_dir_all(self.pins_root());
        // A namespace can outlive `ip netns del` while the kernel holds a reference (closing
        // sockets); deleting the host ends of the veths removes the pairs at once.
        let prefix = format!("cm{}h", self.state.x);
        if let Ok(links) = std::fs::read_dir("/sys/class/net") {
            for l in links.flatten() {
                let name = l.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = ip(&["link", "del", &name]);
                }
            }
        }
        let _ = ip(&["link", "del", &self.state.bridge]);
        self.state.clusters.clear();
        let _ = std::fs::remove_file(self.state.dir.join("lab.json"));
    }
}

fn remove_pod(p: &PodState) {
    if let Some(s) = &p.server {
        kill(s);
    }
    let _ = ip(&["netns", "del", &p.netns]);
    remove_cgroup(&p.cgroup);
}

async fn ensure_namespace(client: &kube::Client, ns: &str) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    if api.get_opt(ns).await?.is_none() {
        let obj = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
        api.create(&PostParams::default(), &obj).await?;
    }
    Ok(())
}

/// Polls `check` until it holds or `timeout` passes ([`test_support::within`]).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    test_support::within(what, timeout, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
    .map_err(|e| anyhow!(e))
}

/// A lab process that a fault kills with SIGKILL and starts again with the same command line
/// (the chaos soak, [`crate::chaos`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    /// The cluster's etcd (restarted on the same data dir and ports).
    Etcd,
    /// Its clustermesh-apiserver.
    Apiserver,
    /// The node agent of the named node (restarted in the node's namespace: it finds its pins,
    /// which kept the datapath working while it was down).
    NodeAgent(String),
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Component::Etcd => f.write_str("etcd"),
            Component::Apiserver => f.write_str("apiserver"),
            Component::NodeAgent(n) => write!(f, "node agent of {n}"),
        }
    }
}

// Fault injection and scaling, for the chaos soak. Added as methods of their own so that the
// lab's bring-up stays as it is.
impl Lab {
    /// Restarts the node agent of `node` with `flag` added to its command line (`on`) or
    /// removed from it (a crash, then [`Lab::restart`] with the changed command line).
    pub async fn restart_agent_with(
        &mut self,
        cluster: &str,
        node: &str,
        flag: &str,
        on: bool,
    ) -> Result<()> {
        self.set_agent_flag(cluster, node, flag, on).await
    }

    /// Kills `comp` of `cluster` with SIGKILL, as a crash would, after recording its command
    /// line so that [`Lab::restart`] starts it again exactly the same way.
    pub fn crash(&mut self, cluster: &str, comp: &Component) -> Result<()> {
        let pids = self.container_pids(cluster, comp)?;
        if pids.is_empty() {
            bail!("{comp} of {cluster} is not running");
        }
        for pid in pids {
            kill(&Proc {
                pid,
                log: PathBuf::new(),
            });
        }
        Ok(())
    }

    /// Starts a component that [`Lab::crash`] killed, with its recorded command line (same
    /// data dir, ports, certificates and flags; output appended to the same log), and waits
    /// until it serves: etcd accepts connections, the apiserver and node agents are ready.
    pub async fn restart(&mut self, cluster: &str, comp: &Component) -> Result<()> {
        self.until_serving_again(cluster, comp).await
    }

    /// Keeps `comp` of `cluster` from serving until [`Lab::bring_back`]: on an installed
    /// cluster its container's processes are stopped (`SIGSTOP`: a hung process, which the
    /// kubelet does not restart), else it is killed ([`Lab::crash`]).
    pub fn hold_down(&mut self, cluster: &str, comp: &Component) -> Result<()> {
        self.signal(cluster, comp, "-STOP")
    }

    /// Ends [`Lab::hold_down`] and waits until `comp` serves again.
    pub async fn bring_back(&mut self, cluster: &str, comp: &Component) -> Result<()> {
        self.signal(cluster, comp, "-CONT")?;
        self.until_serving_again(cluster, comp).await
    }

    fn signal(&self, cluster: &str, comp: &Component, signal: &str) -> Result<()> {
        let pids = self.container_pids(cluster, comp)?;
        if pids.is_empty() {
            bail!("{comp} of {cluster} is not running");
        }
        for pid in pids {
            let st = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()?;
            if !st.success() {
                bail!("kill {signal} {pid} ({comp} of {cluster})");
            }
        }
        Ok(())
    }

    /// The processes of `comp`'s container(s) in an installed cluster: what is in its pod's
    /// cgroup (a node agent: its node's cgroup itself, not the pods below it).
    pub fn container_pids(&self, cluster: &str, comp: &Component) -> Result<Vec<u32>> {
        let c = self.cluster(cluster)?;
        let cgroups: Vec<PathBuf> = match comp {
            Component::NodeAgent(node) => vec![
                c.nodes
                    .iter()
                    .find(|n| n.name == *node)
                    .ok_or_else(|| anyhow!("no node {node} in {cluster}"))?
                    .cgroup
                    .clone(),
            ],
            Component::Apiserver | Component::Etcd => {
                let stem = match comp {
                    Component::Etcd => "clustermesh-etcd-",
                    _ => "clustermesh-apiserver-",
                };
                let start = format!("{}-{stem}", kubelet_prefix(self.state.x, c.index));
                std::fs::read_dir(CGROUP_ROOT)?
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&start))
                    .map(|e| e.path())
                    .collect()
            }
        };
        Ok(cgroups.iter().flat_map(|cg| procs(cg)).collect())
    }

    /// Waits until the lab kubelet has started `comp` of an installed cluster again and it
    /// serves: etcd accepts connections, the apiserver leads and exports (a status written
    /// since this call), node agents are ready.
    async fn until_serving_again(&self, cluster: &str, comp: &Component) -> Result<()> {
        let c = self.cluster(cluster)?.clone();
        let what = format!(
            "{comp} of {cluster} to serve again (kubelet log: {})",
            c.dir.join("kubelet.log").display()
        );
        match comp {
            Component::Etcd => {
                let addr = self.etcd_addr(cluster).await?;
                wait_for(&what, Duration::from_secs(60), || async move {
                    tokio::net::TcpStream::connect(addr).await.is_ok()
                })
                .await
            }
            Component::Apiserver => {
                let since = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs() as i64;
                self.until_exporting(cluster, since, &what).await
            }
            Component::NodeAgent(node) => {
                let ip4 = c
                    .nodes
                    .iter()
                    .find(|n| n.name == *node)
                    .map(|n| n.ip)
                    .ok_or_else(|| anyhow!("no node {node} in {cluster}"))?;
                wait_for(&what, Duration::from_secs(90), || agent_ready(ip4)).await
            }
        }
    }

    /// Adds `flag` to (or removes it from) the node agent DaemonSet's arguments, as a user
    /// edits it, and waits until `node`'s agent runs the new template and is ready.
    async fn set_agent_flag(&self, cluster: &str, node: &str, flag: &str, on: bool) -> Result<()> {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let client = self.client(cluster).await?;
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
        let ds = api.get("clustermesh-node-agent").await?;
        let mut args = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.args.clone())
            .unwrap_or_default();
        args.retain(|a| a != flag);
        if on {
            args.push(flag.to_owned());
        }
        let patched = api
            .patch(
                "clustermesh-node-agent",
                &PatchParams::default(),
                &Patch::Json::<()>(serde_json::from_value(serde_json::json!([
                    {"op": "replace", "path": "/spec/template/spec/containers/0/args", "value": args}
                ]))?),
            )
            .await?;
        let generation = patched.metadata.generation.unwrap_or(0);
        let pod = format!("clustermesh-node-agent-{node}");
        let pods: Api<Pod> = Api::namespaced(client, "kube-system");
        let ip4 = self
            .cluster(cluster)?
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.ip)
            .ok_or_else(|| anyhow!("no node {node} in {cluster}"))?;
        wait_for(
            &format!(
                "{node}'s agent to run with {flag} {}",
                if on { "on" } else { "off" }
            ),
            Duration::from_secs(90),
            || {
                let (api, pods, pod) = (api.clone(), pods.clone(), pod.clone());
                async move {
                    let Ok(ds) = api.get_status("clustermesh-node-agent").await else {
                        return false;
                    };
                    let st = ds.status.unwrap_or_default();
                    let rolled = st.observed_generation.unwrap_or(0) >= generation
                        && st.updated_number_scheduled.unwrap_or(0) == st.desired_number_scheduled
                        && st.number_ready == st.desired_number_scheduled;
                    let args_now = pods
                        .get(&pod)
                        .await
                        .ok()
                        .and_then(|p| p.spec?.containers.first()?.args.clone())
                        .unwrap_or_default();
                    rolled && args_now.iter().any(|a| a == flag) == on && agent_ready(ip4).await
                }
            },
        )
        .await
    }

    /// Kills the serving process of one backend pod (SIGKILL), leaving Kubernetes as it is:
    /// only health checks notice. [`Lab::set_backends`] starts it again.
    pub fn kill_backend(&mut self, cluster: &str, pod: &str) -> Result<()> {
        let c = self.cluster_mut(cluster)?;
        let p = c
            .pods
            .iter_mut()
            .find(|p| p.name == pod)
            .ok_or_else(|| anyhow!("no pod {pod} in {cluster}"))?;
        if let Some(s) = p.server.take() {
            kill(&s);
        }
        self.save()
    }

    /// Scales `service` in `cluster` to `replicas` backend pods (at least one). Scaling up
    /// adds pods on the nodes with the fewest backends, starts them and writes the
    /// EndpointSlice once they listen. Scaling down takes the newest pods out of the
    /// EndpointSlice and returns their names: they keep serving, as during a termination grace
    /// period, until [`Lab::delete_pod`] removes them.
    pub async fn scale(
        &mut self,
        cluster: &str,
        service: &str,
        replicas: u8,
    ) -> Result<Vec<String>> {
        if replicas == 0 {
            bail!("scale {service} in {cluster}: at least one replica");
        }
        let (ns, name) = service
            .split_once('/')
            .ok_or_else(|| anyhow!("{service:?} is not namespace/name"))?;
        let c = self.cluster(cluster)?.clone();
        let index = |p: &PodState| -> u32 {
            p.name
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        let mut backends: Vec<PodState> = c
            .pods
            .iter()
            .filter(|p| p.service.as_deref() == Some(service))
            .cloned()
            .collect();
        if backends.is_empty() {
            bail!("no backends of {service} in {cluster} (deploy it first)");
        }
        backends.sort_by_key(index);
        let want = usize::from(replicas);
        if want >= backends.len() {
            let mut next = backends.iter().map(index).max().map_or(0, |m| m + 1);
            let mut on_node: BTreeMap<String, usize> =
                c.nodes.iter().map(|n| (n.name.clone(), 0)).collect();
            for p in &backends {
                *on_node.entry(p.node.clone()).or_default() += 1;
            }
            let labels = BTreeMap::from([("app".to_owned(), name.to_owned())]);
            for _ in backends.len()..want {
                let node = on_node
                    .iter()
                    .min_by_key(|(n, count)| (**count, (*n).clone()))
                    .map(|(n, _)| n.clone())
                    .ok_or_else(|| anyhow!("{cluster} has no nodes"))?;
                let pod_name = format!("{name}-{cluster}-{next}");
                next += 1;
                self.add_pod(cluster, ns, &pod_name, &node, &labels).await?;
                if let Some(p) = self
                    .cluster_mut(cluster)?
                    .pods
                    .iter_mut()
                    .find(|p| p.name == pod_name)
                {
                    p.service = Some(service.into());
                }
                *on_node.entry(node).or_default() += 1;
            }
            self.set_backends(cluster, service, true).await?;
            return Ok(Vec::new());
        }
        let leaving: Vec<String> = backends[want..].iter().map(|p| p.name.clone()).collect();
        for p in self.cluster_mut(cluster)?.pods.iter_mut() {
            if leaving.contains(&p.name) {
                p.service = None;
            }
        }
        self.save()?;
        self.write_slice(cluster, service).await?;
        Ok(leaving)
    }

    /// Removes a pod: its process, its Kubernetes Pod, its namespace and cgroup.
    pub async fn delete_pod(&mut self, cluster: &str, pod: &str) -> Result<()> {
        let c = self.cluster_mut(cluster)?;
        let i = c
            .pods
            .iter()
            .position(|p| p.name == pod)
            .ok_or_else(|| anyhow!("no pod {pod} in {cluster}"))?;
        let p = c.pods.remove(i);
        remove_pod(&p);
        self.save()?;
        let client = self.client(cluster).await?;
        // The lab stopped the pod's process: the kubelet deletes it at once.
        match Api::<Pod>::namespaced(client, &p.namespace)
            .delete(&p.name, &test_support::kube::now())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A command that runs `argv` in `pod` (its network namespace and cgroup, so its
    /// connections go through its node's socket load balancing), for the caller to spawn.
    pub fn pod_command(&self, cluster: &str, pod: &str, argv: &[String]) -> Result<Command> {
        let p = self
            .cluster(cluster)?
            .pods
            .iter()
            .find(|p| p.name == pod)
            .ok_or_else(|| anyhow!("no pod {pod} in {cluster}"))?;
        let full = in_pod(&p.cgroup, &p.netns, argv);
        let mut cmd = Command::new(&full[0]);
        cmd.args(&full[1..]);
        Ok(cmd)
    }
}

/// One apiserver replica, as faults need it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Its replica name (pod name).
    pub name: String,
    /// Its pod's network namespace.
    pub netns: String,
    /// Its process.
    pub pid: u32,
    /// Its log.
    pub log: PathBuf,
    /// Its Mesh API, reached directly.
    pub mesh: SocketAddr,
    /// Its health port (`/metrics`, `/readyz`; `/status` is for loopback callers only).
    pub health: SocketAddr,
    /// Its `/status`, when it answered.
    pub status: Option<model::status::ClusterStatus>,
}

/// How long [`in_netns`] waits for its future.
const IN_NETNS_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the future `f` makes on a thread of its own inside network namespace `netns`: the
/// sockets it opens are that namespace's (a pod's loopback, for one).
pub async fn in_netns<T, F, Fut>(netns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let path = format!("/run/netns/{netns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> Result<T> {
            use std::os::fd::AsFd;
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("enter {path}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Bounded: a hung process in the pod (SIGSTOP) must not keep this thread, and the
            // namespace with it, forever.
            rt.block_on(async { tokio::time::timeout(IN_NETNS_TIMEOUT, f()).await })
                .map_err(|_| anyhow!("no answer within {IN_NETNS_TIMEOUT:?} in {path}"))
        };
        let _ = tx.send(run());
    });
    rx.await
        .map_err(|_| anyhow!("the thread in {netns} ended"))?
}

/// A TLS directory of a cluster's components ([`Lab::tls_dir`]).
#[derive(Debug, Clone)]
pub enum TlsDir {
    /// The apiserver's etcd client certificate.
    EtcdClient,
    /// The Mesh API's server certificate.
    MeshServer,
    /// The peer certificate `clustermesh connect` gave this cluster for the named peer.
    Peer(String),
    /// The named node's agent certificate.
    NodeAgent(String),
}

/// The lab kubelet's name prefix for cluster `index` of lab `x`.
fn kubelet_prefix(x: u8, index: u8) -> String {
    format!("cm{x}k{index}")
}

/// Whether a cluster's apiserver leads and exports: the leader's status document (ConfigMap
/// `clustermesh-status`, written by the leader at or after `since`, Unix seconds) says so, and
/// that replica's pod is ready (`/readyz` on its address).
async fn installed_apiserver_exporting(client: &kube::Client, since: i64) -> bool {
    use k8s_openapi::api::core::v1::ConfigMap;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let Some(status) = cms
        .get_opt(model::objects::STATUS_CONFIGMAP)
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data?.remove(model::objects::STATUS_KEY))
        .and_then(|d| serde_json::from_str::<model::status::ClusterStatus>(&d).ok())
    else {
        return false;
    };
    if !(status.leader && status.ready && status.updated_unix >= since) {
        return false;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let Some(ip) = pods
        .get_opt(&status.replica)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.status?.pod_ip?.parse::<IpAddr>().ok())
    else {
        return false;
    };
    ready_at((ip, 9880).into()).await
}

/// The processes directly in cgroup `cg` (none when it is gone).
fn procs(cg: &Path) -> Vec<u32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|p| {
            p.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `addr` answers `GET /readyz` with 200.
async fn ready_at(addr: SocketAddr) -> bool {
    test_support::http_get(addr, "/readyz")
        .await
        .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// Whether the node agent at `ip` is ready (its health port).
async fn agent_ready(ip: Ipv4Addr) -> bool {
    ready_at((ip, model::node_state::NODE_AGENT_PORT).into()).await
}
