//! One cluster as the CLI reaches it: kubeconfig contexts, the way kubectl reads them, and
//! what the CLI needs to know about the mesh installation of that cluster: its name and ID
//! (from the apiserver's status ConfigMap), its CA (Secret `clustermesh-ca`) and its Mesh API
//! endpoints (Service `clustermesh-apiserver`). Every request to a Kubernetes API is bounded
//! by `--request-timeout`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use certs::Ca;
use clap::Args;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use model::objects::{
    APISERVER_SERVICE, CA_SECRET, MESH_ENDPOINTS_ANNOTATION, MESH_PORT_NAME, STATUS_CONFIGMAP,
    STATUS_KEY,
};
use model::status::ClusterStatus;
use model::{ClusterId, ClusterName};

/// Flags every command that talks to Kubernetes takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct KubeArgs {
    /// Kubeconfig file(s), `:`-separated (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<String>,
    /// Namespace the mesh is installed in.
    #[arg(long, global = true, default_value = "kube-system")]
    pub mesh_namespace: String,
    /// How long one request to a Kubernetes API or a Mesh API may take before the command
    /// fails, e.g. `5s`, `1m30s`; `0` waits forever.
    #[arg(long, global = true, default_value = "15s", value_parser = telemetry::duration::parse_timeout)]
    pub request_timeout: Timeout,
}

/// A timeout or none (`--request-timeout 0`). An alias, so that clap takes the parser's
/// `Option` as the value rather than as "the flag is optional".
pub(crate) type Timeout = Option<Duration>;

/// A request that got no answer within `--request-timeout`.
#[derive(Debug, thiserror::Error)]
#[error(
    "no answer from {server} within {} (--request-timeout)",
    telemetry::duration::format(*after)
)]
pub(crate) struct RequestTimeout {
    /// The server asked.
    pub server: String,
    /// The timeout.
    pub after: Duration,
}

impl KubeArgs {
    fn load(&self) -> Result<Kubeconfig> {
        // Where the list came from, for the message when a file is missing.
        let (paths, from): (Vec<PathBuf>, &str) = match &self.kubeconfig {
            Some(list) => (std::env::split_paths(list).collect(), "--kubeconfig"),
            None => match std::env::var_os("KUBECONFIG") {
                Some(list) if !list.is_empty() => {
                    (std::env::split_paths(&list).collect(), "$KUBECONFIG")
                }
                _ => (
                    vec![
                        std::env::var_os("HOME")
                            .map(PathBuf::from)
                            .unwrap_or_default()
                            .join(".kube/config"),
                    ],
                    "the default; set --kubeconfig or KUBECONFIG",
                ),
            },
        };
        let mut merged: Option<Kubeconfig> = None;
        for p in paths.iter().filter(|p| !p.as_os_str().is_empty()) {
            if !p.exists() {
                bail!("kubeconfig {} does not exist ({from})", p.display());
            }
            let kc = Kubeconfig::read_from(p)
                .with_context(|| format!("read kubeconfig {}", p.display()))?;
            merged = Some(match merged {
                None => kc,
                Some(m) => m.merge(kc).context("merge kubeconfigs")?,
            });
        }
        merged.ok_or_else(|| anyhow!("no kubeconfig: set --kubeconfig or KUBECONFIG"))
    }

    /// A client for `context` (`None`: the current context), and the context's name.
    pub(crate) async fn client(&self, context: Option<&str>) -> Result<(kube::Client, String)> {
        let kc = self.load()?;
        let name = match context {
            Some(c) => c.to_owned(),
            None => kc
                .current_context
                .clone()
                .ok_or_else(|| anyhow!("no current context in the kubeconfig; pass --context"))?,
        };
        if !kc.contexts.iter().any(|c| c.name == name) {
            let known: Vec<&str> = kc.contexts.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "context {name:?} not found in the kubeconfig (known: {})",
                known.join(", ")
            );
        }
        let opts = KubeConfigOptions {
            context: Some(name.clone()),
            ..Default::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .with_context(|| format!("context {name}"))?;
        let Some(after) = self.request_timeout else {
            let client =
                kube::Client::try_from(config).with_context(|| format!("context {name}"))?;
            return Ok((client, name));
        };
        // The connect and each read of a body are bounded by kube's own timeouts; the whole
        // request up to the response headers by a tower timeout, whose error names the server.
        // kube's read and write timeouts get a margin so that a server that stalls before its
        // headers always meets the tower timeout first (with equal limits either could fire).
        let margin = Duration::from_millis(500);
        config.connect_timeout = Some(after);
        config.read_timeout = Some(after + margin);
        config.write_timeout = Some(after + margin);
        let server = config.cluster_url.to_string();
        let server = server.trim_end_matches('/').to_owned();
        let builder = kube::client::ClientBuilder::try_from(config)
            .with_context(|| format!("context {name}"))?;
        let timeout = tower::ServiceBuilder::new()
            .map_err(move |e: tower::BoxError| -> tower::BoxError {
                if e.is::<tower::timeout::error::Elapsed>() {
                    Box::new(RequestTimeout {
                        server: server.clone(),
                        after,
                    })
                } else {
                    e
                }
            })
            .timeout(after)
            .into_inner();
        Ok((builder.with_layer(&timeout).build(), name))
    }
}

/// One cluster of the mesh, as seen through its Kubernetes API.
pub(crate) struct Cluster {
    /// The kubeconfig context.
    pub context: String,
    /// A client.
    pub client: kube::Client,
    /// The mesh namespace.
    pub namespace: String,
    /// `--request-timeout` (`None`: no timeout), for the Mesh API and node agent requests.
    pub request_timeout: Option<Duration>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("context", &self.context)
            .finish()
    }
}

fn api_error(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl Cluster {
    /// Runs `f` within `--request-timeout`, failing with [`RequestTimeout`] naming `server`.
    pub(crate) async fn bounded<T>(
        &self,
        server: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.request_timeout {
            None => f.await,
            Some(after) => match tokio::time::timeout(after, f).await {
                Ok(r) => r,
                Err(_) => Err(RequestTimeout {
                    server: server.to_owned(),
                    after,
                }
                .into()),
            },
        }
    }

    /// Connects to `context`.
    pub(crate) async fn open(args: &KubeArgs, context: Option<&str>) -> Result<Self> {
        let (client, context) = args.client(context).await?;
        Ok(Self {
            context,
            client,
            namespace: args.mesh_namespace.clone(),
            request_timeout: args.request_timeout,
        })
    }

    /// Namespaced API of the mesh namespace.
    pub(crate) fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The status the leading apiserver last wrote.
    pub(crate) async fn status(&self) -> Result<ClusterStatus> {
        let cm = match self.api::<ConfigMap>().get(STATUS_CONFIGMAP).await {
            Ok(cm) => cm,
            Err(e) if api_error(&e) == Some(404) => bail!(
                "context {}: no ConfigMap {}/{STATUS_CONFIGMAP}: is clustermesh-apiserver running and leading there?",
                self.context,
                self.namespace
            ),
            Err(e) => {
                return Err(anyhow!(e)).with_context(|| {
                    format!(
                        "context {}: read ConfigMap {}/{STATUS_CONFIGMAP}",
                        self.context, self.namespace
                    )
                });
            }
        };
        let json = cm
            .data
            .as_ref()
            .and_then(|d| d.get(STATUS_KEY))
            .ok_or_else(|| {
                anyhow!(
                    "context {}: ConfigMap {STATUS_CONFIGMAP} has no {STATUS_KEY}",
                    self.context
                )
            })?;
        serde_json::from_str(json).with_context(|| {
            format!(
                "context {}: ConfigMap {STATUS_CONFIGMAP}: {STATUS_KEY} is not a status",
                self.context
            )
        })
    }

    /// Name and ID of the cluster.
    pub(crate) async fn identity(&self) -> Result<(ClusterName, ClusterId)> {
        self.identity_of(&self.status().await?)
    }

    /// Name and ID of the cluster, from a status already read.
    pub(crate) fn identity_of(&self, s: &ClusterStatus) -> Result<(ClusterName, ClusterId)> {
        let name = ClusterName::new(s.cluster.clone())
            .with_context(|| format!("context {}: cluster name", self.context))?;
        let id = ClusterId::new(u64::from(s.cluster_id))
            .with_context(|| format!("context {}: cluster ID", self.context))?;
        Ok((name, id))
    }

    /// The cluster's CA, certificate and key.
    pub(crate) async fn ca(&self) -> Result<Ca> {
        let secret = self.api::<Secret>().get(CA_SECRET).await.with_context(|| {
            format!(
                "context {}: read Secret {}/{CA_SECRET} (the cluster's mesh CA)",
                self.context, self.namespace
            )
        })?;
        let data = secret.data.unwrap_or_default();
        let get = |k: &str| {
            data.get(k)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .ok_or_else(|| anyhow!("context {}: Secret {CA_SECRET} has no {k:?}", self.context))
        };
        Ca::from_pem(&get("ca.crt")?, &get("ca.key")?)
            .with_context(|| format!("context {}: Secret {CA_SECRET}", self.context))
    }

    /// The Mesh API endpoints peers (and this CLI) use.
    pub(crate) async fn mesh_endpoints(&self) -> Result<Vec<String>> {
        let svc = self
            .api::<Service>()
            .get(APISERVER_SERVICE)
            .await
            .with_context(|| {
                format!(
                    "context {}: read Service {}/{APISERVER_SERVICE}",
                    self.context, self.namespace
                )
            })?;
        if let Some(list) = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MESH_ENDPOINTS_ANNOTATION))
        {
            let eps: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if eps.is_empty() {
                bail!(
                    "context {}: annotation {MESH_ENDPOINTS_ANNOTATION} on Service {APISERVER_SERVICE} is empty",
                    self.context
                );
            }
            return Ok(eps);
        }
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(MESH_PORT_NAME))
            .or(ports.first())
            .map(|p| p.port)
            .ok_or_else(|| {
                anyhow!(
                    "context {}: Service {APISERVER_SERVICE} has no ports",
                    self.context
                )
            })?;
        let ingress = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default();
        let eps: Vec<String> = ingress
            .iter()
            .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
            .map(|h| {
                if h.contains(':') {
                    format!("[{h}]:{port}")
                } else {
                    format!("{h}:{port}")
                }
            })
            .collect();
        if eps.is_empty() {
            bail!(
                "context {}: Service {APISERVER_SERVICE} has no load-balancer address yet and no {MESH_ENDPOINTS_ANNOTATION} annotation: peers cannot reach its Mesh API",
                self.context
            );
        }
        Ok(eps)
    }
}
