//! A real etcd for tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use certs::{Ca, LeafSpec, MeshIdentity, Role, TlsFiles};
use model::{ClusterId, ClusterName};

/// A running etcd member with client-certificate authentication.
#[derive(Debug)]
pub struct Etcd {
    dir: tempfile::TempDir,
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    ca: Ca,
    client_files: TlsFiles,
}

/// The compaction and quota settings we run etcd with everywhere (tests, lab, `deploy/`):
/// history older than five minutes is compacted, and the database is capped at 2 GiB.
pub const ETCD_HOUSEKEEPING: [&str; 6] = [
    "--auto-compaction-mode",
    "periodic",
    "--auto-compaction-retention",
    "5m",
    "--quota-backend-bytes",
    "2147483648",
];

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write_leaf(dir: &Path, leaf: &certs::Leaf, ca_pem: &str) -> Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    let files = TlsFiles::in_dir(dir);
    std::fs::write(&files.cert, &leaf.cert_pem)?;
    crate::write_secret(&files.key, &leaf.key_pem)?;
    std::fs::write(&files.ca, ca_pem)?;
    Ok(files)
}

impl Etcd {
    /// Starts etcd and waits until it answers over mTLS.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("cm-etcd-").tempdir()?;
        let cluster = ClusterName::new("etcd-test")?;
        // etcd's own trust domain, as in the lab and in deploy/: no mesh certificate opens it.
        let ca = Ca::generate_etcd(&cluster, certs::issue::DEFAULT_CA_VALIDITY)?;
        let cid = ClusterId::new(1)?;
        let server = ca.issue(
            &LeafSpec::new(MeshIdentity::new(cluster.clone(), cid, Role::Etcd))
                .dns(["localhost"])
                .ips(["127.0.0.1".parse()?]),
        )?;
        write_leaf(&dir.path().join("server"), &server, ca.cert_pem())?;
        let client = ca.issue(&LeafSpec::new(MeshIdentity::new(
            cluster,
            cid,
            Role::Apiserver,
        )))?;
        let client_files = write_leaf(&dir.path().join("client"), &client, ca.cert_pem())?;
        let mut etcd = Self {
            name: crate::unique_name("etcd"),
            client_port: free_port()?,
            peer_port: free_port()?,
            child: None,
            ca,
            client_files,
            dir,
        };
        let mut last_err = None;
        for _ in 0..3 {
            match etcd.spawn_and_wait().await {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    // Most likely a port taken between choosing and binding it: try others.
                    etcd.kill();
                    let _ = std::fs::remove_dir_all(etcd.data_dir());
                    etcd.client_port = free_port()?;
                    etcd.peer_port = free_port()?;
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let server = TlsFiles::in_dir(&self.dir.path().join("server"));
        let client_url = format!("https://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let etcd = which("etcd").context("etcd is not installed: run scripts/setup.sh")?;
        let mut cmd = match which("setpriv") {
            // The kernel kills etcd if the test process dies without running destructors.
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(etcd);
                c
            }
            None => Command::new(etcd),
        };
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .arg("--cert-file")
            .arg(&server.cert)
            .arg("--key-file")
            .arg(&server.key)
            .arg("--trusted-ca-file")
            .arg(&server.ca)
            .arg("--client-cert-auth")
            .args(ETCD_HOUSEKEEPING)
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn().context("spawn etcd")?);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("etcd exited with {status}; log:\n{}", self.log_tail());
            }
            let mut config = self.config();
            config.connect_timeout = Duration::from_millis(500);
            if kvstore::Client::connect(config).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("etcd did not answer within 30 s; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `https://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// A store config with a valid client certificate.
    pub fn config(&self) -> kvstore::Config {
        kvstore::Config::new(vec![self.endpoint()], Some(self.client_files.clone()))
    }

    /// A store config for another address (a proxy in front of this etcd).
    pub fn config_via(&self, addr: std::net::SocketAddr) -> kvstore::Config {
        kvstore::Config::new(
            vec![format!("https://{addr}")],
            Some(self.client_files.clone()),
        )
    }

    /// The client TLS files (signed by this etcd's CA).
    pub fn client_files(&self) -> &TlsFiles {
        &self.client_files
    }

    /// The CA that signed etcd's certificates.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// A directory inside this etcd's temporary directory, removed with it.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Connects a store client.
    pub async fn client(&self) -> Result<kvstore::Client> {
        Ok(kvstore::Client::connect(self.config()).await?)
    }

    /// Hangs etcd (`SIGSTOP`: it accepts connections and answers nothing, as a hung process or
    /// a stalled disk) until [`Etcd::thaw`] or drop.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Ends [`Etcd::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let _ = std::process::Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status();
        }
    }

    /// Stops etcd (SIGKILL: as abrupt as a crash); the data dir stays.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts etcd again on the same ports with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(bin))
            .find(|p| p.is_file())
    })
}
