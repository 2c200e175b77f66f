//! The multi-cluster lab and its scenarios. Test infrastructure.
//!
//! Scenarios ([`scenarios`]) are written against the [`Cluster`] trait. [`LabCluster`] is one
//! cluster of the emulated [`lab::Lab`] (network namespaces on a bridge, cgroups, real
//! processes; runs here and in CI); [`kind::KindCluster`] is a kind cluster with the mesh
//! installed (for users with Docker; it cannot run in this repository's CI). The `clustermesh`
//! CLI drives both through a kubeconfig, the way a user would. [`chaos`] is the seeded chaos
//! soak on the lab (random faults while a client connects, the end state against the truth).

pub mod chaos;
pub mod kind;
pub mod kubelet;
pub mod lab;
pub mod lab_kubelet;
pub mod pod_runner;
pub mod scenarios;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::Mutex;

/// Who answered `n` connections: backend name (`pod@cluster`) → count; `"failed"` for
/// connections that failed.
pub type Tally = BTreeMap<String, u32>;

/// One cluster, as scenarios see it.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// The cluster's name (also its kubeconfig context in the lab).
    fn name(&self) -> &str;
    /// The kubeconfig context the CLI uses for it.
    fn context(&self) -> String;
    /// Deploys `service` (`namespace/name`) with `replicas` backends answering
    /// `<pod>@<cluster>` on port 80 of its ClusterIP, with `annotations`; returns the
    /// ClusterIP.
    async fn deploy(
        &self,
        service: &str,
        replicas: u8,
        annotations: &BTreeMap<String, String>,
    ) -> Result<IpAddr>;
    /// Kills (`false`) or restarts (`true`) the service's backends.
    async fn set_backends(&self, service: &str, running: bool) -> Result<()>;
    /// Shell commands that do what [`Cluster::set_backends`] does (for `clustermesh drill`).
    fn backend_commands(&self, service: &str) -> (String, String);
    /// Adds a client pod named `name` on the cluster's first node.
    async fn add_client(&self, name: &str) -> Result<()>;
    /// Connects `n` times from the client pod to `target` and counts who answered.
    async fn connect_from(&self, client: &str, target: SocketAddr, n: u32) -> Result<Tally>;
    /// Where the drill's probe should run to be the client pod: network namespace and cgroup
    /// (`None`: the CLI's own; kind users run the drill from a node).
    async fn drill_client(&self, client: &str) -> Option<(PathBuf, PathBuf)>;
    /// Kills the cluster's clustermesh-apiserver.
    async fn kill_apiserver(&self) -> Result<()>;
    /// Starts it again and waits until it is ready.
    async fn start_apiserver(&self) -> Result<()>;
    /// The name of the cluster's first node.
    async fn first_node(&self) -> String;
    /// A counter or gauge of the first node's agent (`/metrics`), summed over series whose
    /// labels contain `labels` (e.g. `op="delete"`).
    async fn agent_metric(&self, name: &str, labels: &str) -> Result<f64>;
}

/// A test's lab directory under `parent` (`<prefix>…`): removed when the test passes, kept
/// (logs, reports) when it panics, and named on stderr then.
#[derive(Debug)]
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    /// A new directory in `parent` (a test's `CARGO_TARGET_TMPDIR`).
    pub fn new(parent: &Path, prefix: &str) -> Result<Self> {
        Ok(Self(Some(
            tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?,
        )))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take()
            && std::thread::panicking()
        {
            eprintln!("the lab's logs are kept in {}", d.keep().display());
        }
    }
}

/// Sums the series of `name` whose label set contains `labels` in Prometheus text.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A cluster of the emulated lab.
#[derive(Debug, Clone)]
pub struct LabCluster {
    lab: Arc<Mutex<lab::Lab>>,
    /// The lab's directory (for the `clustermesh-lab` commands the drill runs).
    dir: PathBuf,
    name: String,
}

impl LabCluster {
    /// Cluster `name` of `lab`.
    pub async fn new(lab: &Arc<Mutex<lab::Lab>>, name: &str) -> Self {
        let dir = lab.lock().await.state.dir.clone();
        Self {
            lab: Arc::clone(lab),
            dir,
            name: name.to_owned(),
        }
    }
}

impl Cluster for LabCluster {
    fn name(&self) -> &str {
        &self.name
    }

    fn context(&self) -> String {
        self.name.clone()
    }

    async fn deploy(
        &self,
        service: &str,
        replicas: u8,
        annotations: &BTreeMap<String, String>,
    ) -> Result<IpAddr> {
        let mut lab = self.lab.lock().await;
        Ok(IpAddr::V4(
            lab.deploy(&self.name, service, replicas, annotations)
                .await?,
        ))
    }

    async fn set_backends(&self, service: &str, running: bool) -> Result<()> {
        self.lab
            .lock()
            .await
            .set_backends(&self.name, service, running)
            .await
    }

    fn backend_commands(&self, service: &str) -> (String, String) {
        let lab = &self.dir;
        let me = lab::bin_dir().join("clustermesh-lab");
        let cmd = |action: &str| {
            format!(
                "'{}' backends --dir '{}' --cluster {} --service {service} {action}",
                me.display(),
                lab.display(),
                self.name
            )
        };
        (cmd("stop"), cmd("start"))
    }

    async fn add_client(&self, name: &str) -> Result<()> {
        let mut lab = self.lab.lock().await;
        let node = lab.cluster(&self.name)?.nodes[0].name.clone();
        lab.add_pod(&self.name, "default", name, &node, &BTreeMap::new())
            .await?;
        Ok(())
    }

    async fn connect_from(&self, client: &str, target: SocketAddr, n: u32) -> Result<Tally> {
        self.lab
            .lock()
            .await
            .connect_from(&self.name, client, target, n)
    }

    async fn drill_client(&self, client: &str) -> Option<(PathBuf, PathBuf)> {
        let lab = self.lab.lock().await;
        let p = lab
            .cluster(&self.name)
            .ok()?
            .pods
            .iter()
            .find(|p| p.name == client)?
            .clone();
        Some((Path::new("/run/netns").join(p.netns), p.cgroup))
    }

    async fn kill_apiserver(&self) -> Result<()> {
        // A user stops it by scaling its Deployment to 0.
        self.lab.lock().await.stop_apiserver(&self.name).await
    }

    async fn start_apiserver(&self) -> Result<()> {
        self.lab.lock().await.start_apiserver(&self.name).await
    }

    async fn agent_metric(&self, name: &str, labels: &str) -> Result<f64> {
        let ip = {
            let lab = self.lab.lock().await;
            lab.cluster(&self.name)?.nodes[0].ip
        };
        let addr = SocketAddr::from((ip, model::node_state::NODE_AGENT_PORT));
        let text = test_support::http_get(addr, "/metrics")
            .await
            .with_context(|| format!("node agent metrics at {addr}"))?;
        Ok(metric_sum(&text, name, labels))
    }

    async fn first_node(&self) -> String {
        let lab = self.lab.lock().await;
        lab.cluster(&self.name)
            .ok()
            .and_then(|c| c.nodes.first().map(|n| n.name.clone()))
            .unwrap_or_default()
    }
}

/// The output of one `clustermesh` run.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs the `clustermesh` CLI with `kubeconfig` (off the async runtime's threads).
pub async fn clustermesh(kubeconfig: &Path, args: &[&str]) -> Result<CliOutput> {
    let bin = lab::binary("clustermesh")?;
    let mut cmd = Command::new(bin);
    cmd.args(args).env("KUBECONFIG", kubeconfig);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("run clustermesh")?;
    Ok(CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
