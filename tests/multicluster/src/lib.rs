//! The multi-cluster lab, in process: each emulated cluster has its own etcd (a real process,
//! mTLS), Kubernetes API test server, cluster CA and `clustermesh-apiserver` with its Mesh API;
//! nodes run the real node agent on a cgroup of their own. Test infrastructure.
//!
//! This is the first cut of the lab: clusters are connected by writing the peer
//! configuration directories `clustermesh connect` will write, nodes share the host's network
//! namespace, and backends are processes on loopback addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use certs::{Ca, LeafSpec, MeshIdentity, Role, TlsFiles};
use clustermesh_apiserver::Running;
use clustermesh_apiserver::config::Config;
use model::{ClusterId, ClusterName, NodeName};
use node_agent::agent::{self, Agent, HealthConfig, Settings};
use telemetry::metrics::Registry;

/// One emulated cluster.
pub struct Cluster {
    /// Its name.
    pub name: ClusterName,
    /// Its ID.
    pub id: ClusterId,
    /// Its etcd.
    pub etcd: test_support::Etcd,
    /// Its Kubernetes API.
    pub kube: kube_testserver::Handle,
    /// A client of it.
    pub client: kube::Client,
    /// Its CA.
    pub ca: Ca,
    /// Its files (certificates, peer configurations).
    pub dir: tempfile::TempDir,
    mesh_port: u16,
    /// Its apiserver, while running.
    pub apiserver: Option<Running>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish()
    }
}

impl Cluster {
    /// Brings a cluster up and waits until its apiserver is ready.
    pub async fn start(name: &str, id: u64) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let name = ClusterName::new(name)?;
        let id = ClusterId::new(id)?;
        let etcd = test_support::Etcd::start().await?;
        let kube = kube_testserver::start(kube_testserver::Config::new(name.clone())).await?;
        let kc = kube::config::Kubeconfig::read_from(kube.kubeconfig())?;
        let client = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
        )?;
        let ca = Ca::generate(&name, certs::issue::DEFAULT_CA_VALIDITY)?;
        let dir = tempfile::tempdir()?;
        let server = ca.issue(
            &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Apiserver))
                .ips(["127.0.0.1".parse()?]),
        )?;
        test_support::write_tls(&dir.path().join("mesh"), &ca, &server)?;
        std::fs::create_dir_all(dir.path().join("peers"))?;
        let mut c = Self {
            name,
            id,
            etcd,
            kube,
            client,
            ca,
            dir,
            mesh_port: test_support::free_port()?,
            apiserver: None,
        };
        c.up().await?;
        Ok(c)
    }

    /// Starts (or restarts) the apiserver and waits until it is ready.
    pub async fn up(&mut self) -> anyhow::Result<()> {
        let running = clustermesh_apiserver::start(Config {
            cluster_name: self.name.clone(),
            cluster_id: self.id,
            etcd: self.etcd.config(),
            lease_ttl: Duration::from_secs(30),
            kubeconfig: Some(self.kube.kubeconfig().to_owned()),
            kube_context: None,
            namespace: "kube-system".into(),
            replica: format!("{}-0", self.name),
            leader_lease: Duration::from_secs(10),
            identity_gc_grace: Duration::from_secs(60),
            health_bind: "127.0.0.1:0".parse()?,
            mesh_bind: SocketAddr::from(([127, 0, 0, 1], self.mesh_port)),
            mesh_tls: Some(TlsFiles::in_dir(&self.dir.path().join("mesh"))),
            peers_dir: Some(self.peers_dir()),
            peers_from_secrets: false,
        })
        .await?;
        let mut ready = running.ready();
        tokio::time::timeout(Duration::from_secs(30), ready.wait_for(Result::is_ok))
            .await
            .context("apiserver not ready in time")??;
        self.apiserver = Some(running);
        Ok(())
    }

    /// The Mesh API endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.mesh_port)
    }

    fn peers_dir(&self) -> PathBuf {
        self.dir.path().join("peers")
    }

    /// Makes this cluster import `peer` (what `clustermesh connect` writes, one direction).
    pub fn import_from(&self, peer: &Cluster) -> anyhow::Result<()> {
        let staging = self.dir.path().join(format!(".staging-{}", peer.name));
        let leaf = peer.ca.issue(&LeafSpec::new(MeshIdentity::new(
            self.name.clone(),
            self.id,
            Role::Peer,
        )))?;
        test_support::write_tls(&staging, &peer.ca, &leaf)?;
        std::fs::write(staging.join("endpoints"), format!("{}\n", peer.endpoint()))?;
        std::fs::rename(&staging, self.peers_dir().join(peer.name.as_str()))?;
        Ok(())
    }

    /// Starts a node: a cgroup and pin directory of its own and the real node agent.
    pub async fn node(&self, node: &str) -> anyhow::Result<Node> {
        let name = test_support::unique_name(&format!("lab-{}-{node}", self.name));
        let cgroup = Path::new("/sys/fs/cgroup/unified").join(&name);
        std::fs::create_dir(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
        let pins = Path::new("/sys/fs/bpf").join(&name);
        let leaf = self.ca.issue(&LeafSpec::new(MeshIdentity::node_agent(
            self.name.clone(),
            self.id,
            NodeName::new(node)?,
        )))?;
        let tls = test_support::write_tls(
            &self.dir.path().join(format!("node-{node}")),
            &self.ca,
            &leaf,
        )?;
        let metrics = agent::registry();
        let (tx, mut ready) = tokio::sync::watch::channel(Err("starting".to_owned()));
        let settings = Settings {
            cluster: self.name.clone(),
            apiserver: vec![self.endpoint()],
            tls,
            pin_dir: pins.clone(),
            cgroup: cgroup.clone(),
            health: HealthConfig {
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(100),
                fall: 2,
                rise: 2,
            },
        };
        let node = Node {
            cgroup,
            pins,
            metrics: metrics.clone(),
            agent: Some(Agent::start(settings, metrics, tx)?),
        };
        tokio::time::timeout(Duration::from_secs(30), ready.wait_for(Result::is_ok))
            .await
            .context("node agent not ready in time")??;
        Ok(node)
    }
}

/// A node of an emulated cluster; its agent, pins and cgroup go away on drop.
pub struct Node {
    /// The node's cgroup: processes in it get the mesh's socket load balancing.
    pub cgroup: PathBuf,
    pins: PathBuf,
    /// The agent's metrics.
    pub metrics: Registry,
    agent: Option<Agent>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent.take();
        let _ = node_agent::datapath::remove(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}
