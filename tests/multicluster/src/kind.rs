//! [`Cluster`](crate::Cluster) on kind: a kind cluster with the mesh installed by
//! `tests/multicluster/kind/up.sh`. Needs Docker, kind and the images the script builds, so it
//! cannot run in this repository's CI (no Docker engine there); `tests/kind.rs` runs the same
//! scenarios when `CLUSTERMESH_KIND=1`.
//!
//! Backends are busybox pods answering `<pod>@<cluster>`; the client is a busybox pod running
//! `nc`; killing backends scales their Deployment to zero.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{Cluster, Tally};

/// A kind cluster named `name` (context `kind-<name>`).
#[derive(Debug, Clone)]
pub struct KindCluster {
    name: String,
}

impl KindCluster {
    /// The kind cluster `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use std::io::Write;
        let mut cmd = Command::new("kubectl");
        cmd.arg("--context").arg(self.context()).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("run kubectl")?;
        if let (Some(text), Some(mut i)) = (stdin, child.stdin.take()) {
            i.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Cluster for KindCluster {
    fn name(&self) -> &str {
        &self.name
    }

    fn context(&self) -> String {
        format!("kind-{}", self.name)
    }

    async fn deploy(
        &self,
        service: &str,
        replicas: u8,
        annotations: &BTreeMap<String, String>,
    ) -> Result<IpAddr> {
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                {"apiVersion": "apps/v1", "kind": "Deployment",
                 "metadata": {"name": name, "namespace": ns},
                 "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                   "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{
                     "name": "echo", "image": "busybox:1.36",
                     "command": ["sh", "-c", format!("while true; do echo \"$HOSTNAME@{}\" | nc -l -p 8080; done", self.name)],
                     "ports": [{"containerPort": 8080}],
                     "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}}},
                {"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                 "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
            ]
        });
        self.kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()))?;
        self.kubectl(
            &[
                "-n",
                ns,
                "rollout",
                "status",
                &format!("deployment/{name}"),
                "--timeout=120s",
            ],
            None,
        )?;
        let ip = self.kubectl(
            &[
                "-n",
                ns,
                "get",
                "service",
                name,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ],
            None,
        )?;
        ip.trim().parse().context("ClusterIP")
    }

    async fn set_backends(&self, service: &str, running: bool) -> Result<()> {
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        let replicas = if running {
            "--replicas=2"
        } else {
            "--replicas=0"
        };
        self.kubectl(
            &["-n", ns, "scale", &format!("deployment/{name}"), replicas],
            None,
        )?;
        if running {
            self.kubectl(
                &[
                    "-n",
                    ns,
                    "rollout",
                    "status",
                    &format!("deployment/{name}"),
                    "--timeout=120s",
                ],
                None,
            )?;
        }
        Ok(())
    }

    fn backend_commands(&self, service: &str) -> (String, String) {
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        let ctx = self.context();
        (
            format!("kubectl --context {ctx} -n {ns} scale deployment/{name} --replicas=0"),
            format!("kubectl --context {ctx} -n {ns} scale deployment/{name} --replicas=2"),
        )
    }

    async fn add_client(&self, name: &str) -> Result<()> {
        self.kubectl(
            &[
                "run",
                name,
                "--image=busybox:1.36",
                "--restart=Never",
                "--",
                "sleep",
                "infinity",
            ],
            None,
        )?;
        self.kubectl(
            &[
                "wait",
                "--for=condition=Ready",
                &format!("pod/{name}"),
                "--timeout=120s",
            ],
            None,
        )?;
        Ok(())
    }

    async fn connect_from(&self, client: &str, target: SocketAddr, n: u32) -> Result<Tally> {
        let script = format!(
            "for i in $(seq {n}); do a=$(nc -w 2 {} {} </dev/null); echo \"${{a:-failed}}\"; done",
            target.ip(),
            target.port()
        );
        let out = self.kubectl(&["exec", client, "--", "sh", "-c", &script], None)?;
        let mut t = Tally::new();
        for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
            *t.entry(line.to_owned()).or_insert(0) += 1;
        }
        Ok(t)
    }

    async fn drill_client(&self, _client: &str) -> Option<(PathBuf, PathBuf)> {
        None
    }

    async fn kill_apiserver(&self) -> Result<()> {
        self.kubectl(
            &[
                "-n",
                "kube-system",
                "scale",
                "deployment/clustermesh-apiserver",
                "--replicas=0",
            ],
            None,
        )?;
        Ok(())
    }

    async fn start_apiserver(&self) -> Result<()> {
        self.kubectl(
            &[
                "-n",
                "kube-system",
                "scale",
                "deployment/clustermesh-apiserver",
                "--replicas=1",
            ],
            None,
        )?;
        self.kubectl(
            &[
                "-n",
                "kube-system",
                "rollout",
                "status",
                "deployment/clustermesh-apiserver",
                "--timeout=120s",
            ],
            None,
        )?;
        Ok(())
    }

    async fn first_node(&self) -> String {
        format!("{}-control-plane", self.name)
    }

    async fn agent_metric(&self, name: &str, labels: &str) -> Result<f64> {
        let text = self.kubectl(
            &[
                "get",
                "--raw",
                &format!(
                    "/api/v1/nodes/{}:9881/proxy/metrics",
                    self.first_node().await
                ),
            ],
            None,
        )?;
        Ok(crate::metric_sum(&text, name, labels))
    }
}
