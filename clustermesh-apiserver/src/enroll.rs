//! Node-agent enrollment ([ADR 0022](../../docs/architecture/adr/0022-node-agent-enrollment.md)):
//! every node agent gets a certificate of its own node, short-lived and renewed by the same
//! flow, instead of one certificate shared by the DaemonSet.
//!
//! A node agent sends a certificate signing request for node `N` with its projected
//! ServiceAccount token (audience `clustermesh`, bound to its Pod) over HTTPS (this apiserver's
//! Mesh API certificate; no client certificate). The apiserver asks the Kubernetes API to
//! review the token (TokenReview, for that audience only), then requires the token's
//! ServiceAccount to be the node agents', the token's Pod to run on `N` (the
//! `authentication.kubernetes.io/node-name` the apiserver puts in the review, else the Pod's
//! `spec.nodeName`, checked against the Pod's UID) and the Node `N` to exist. Only then does it
//! sign, with the node-agent issuer (an intermediate CA that verifiers accept for node agents
//! of this cluster only), a certificate whose identity is exactly that node.
//!
//! Must not sign anything but a node-agent certificate for the token's own node; must not hold
//! the cluster CA key; must not trust anything in the request but the CSR's public key.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certs::{Ca, LeafSpec, MeshIdentity, Reloader};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use model::{ClusterId, ClusterName, NodeName};
use telemetry::env;
use telemetry::metrics::Registry;

/// Enrollments answered, by result (`issued` or the refusal's reason).
pub const ENROLLMENTS: &str = "clustermesh_node_agent_enrollments_total";

/// Declares the metrics of this module.
pub fn declare(r: &Registry) {
    r.counter(
        ENROLLMENTS,
        "Node-agent certificate requests answered, by result: issued, or why they were refused \
         (unauthenticated, wrong-service-account, not-bound, wrong-node, no-node, bad-request, \
         error).",
        &["result"],
    );
}

/// The flags.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "enroll")]
#[command(next_help_heading = "Node-agent enrollment")]
pub struct Args {
    /// Directory of the node-agent issuer (`tls.crt`, `tls.key`: an intermediate CA under the
    /// cluster CA that can sign node-agent certificates of this cluster only; `clustermesh
    /// install` creates it). Set: node agents enroll here for their certificates (needs
    /// `--mesh-tls-dir`, whose certificate the endpoint serves with).
    #[arg(long, env = env::ENROLL_ISSUER_DIR)]
    pub enroll_issuer_dir: Option<PathBuf>,
    /// Address of the enrollment endpoint (HTTPS).
    #[arg(long, env = env::ENROLL_BIND, default_value = "0.0.0.0:4241")]
    pub enroll_bind: String,
    /// The node agents' ServiceAccount, `namespace/name`: only its tokens enroll.
    #[arg(
        long,
        env = env::ENROLL_SERVICE_ACCOUNT,
        default_value = "kube-system/clustermesh-node-agent"
    )]
    pub enroll_service_account: String,
    /// The audience of the node agents' projected tokens (the only one reviewed).
    #[arg(long, env = env::ENROLL_AUDIENCE, default_value = model::enroll::AUDIENCE)]
    pub enroll_audience: String,
    /// How long an enrolled certificate is valid, 10m..=30d; agents renew after two thirds.
    #[arg(long, env = env::ENROLL_VALIDITY, default_value = "24h", value_parser = telemetry::duration::parse)]
    pub enroll_validity: Duration,
}

/// The validated enrollment settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub bind: SocketAddr,
    /// The issuer's files (read at every request, so a rotated issuer is used at once).
    pub issuer: certs::TlsFiles,
    /// The node agents' ServiceAccount namespace.
    pub namespace: String,
    /// And name.
    pub service_account: String,
    /// The token audience.
    pub audience: String,
    /// Certificate lifetime.
    pub validity: Duration,
}

impl Args {
    /// Validates the flags; `Ok(None)` when enrollment is off.
    pub fn validate(&self) -> Result<Option<Config>, crate::config::Error> {
        let Some(dir) = &self.enroll_issuer_dir else {
            return Ok(None);
        };
        let mut problems = Vec::new();
        let issuer = certs::TlsFiles::in_dir(dir);
        for f in [&issuer.cert, &issuer.key] {
            if !f.is_file() {
                problems.push(format!(
                    "--enroll-issuer-dir: {} does not exist",
                    f.display()
                ));
            }
        }
        let bind = self
            .enroll_bind
            .parse::<SocketAddr>()
            .map_err(|_| {
                problems.push(format!(
                    "--enroll-bind: {:?} is not an address:port",
                    self.enroll_bind
                ))
            })
            .ok();
        let sa = self
            .enroll_service_account
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'));
        if sa.is_none() {
            problems.push(format!(
                "--enroll-service-account: {:?} is not namespace/name",
                self.enroll_service_account
            ));
        }
        if self.enroll_audience.is_empty() {
            problems.push("--enroll-audience: must not be empty".into());
        }
        let (min, max) = (Duration::from_secs(600), Duration::from_secs(30 * 86_400));
        if !(min..=max).contains(&self.enroll_validity) {
            problems.push(format!(
                "--enroll-validity: {} is out of range 10m..=30d",
                telemetry::duration::format(self.enroll_validity)
            ));
        }
        match (bind, sa) {
            (Some(bind), Some((ns, name))) if problems.is_empty() => Ok(Some(Config {
                bind,
                issuer,
                namespace: ns.to_owned(),
                service_account: name.to_owned(),
                audience: self.enroll_audience.clone(),
                validity: self.enroll_validity,
            })),
            _ => Err(crate::config::Error { problems }),
        }
    }
}

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong.
        reason: String,
    },
    /// The Kubernetes API did not authenticate the token for the audience.
    #[error("the token is not valid for audience {audience}: {reason}")]
    Unauthenticated {
        /// The audience asked for.
        audience: String,
        /// The authenticator's error.
        reason: String,
    },
    /// The token is another ServiceAccount's.
    #[error("the token belongs to {user}, not to the node agents' ServiceAccount ({expected})")]
    WrongServiceAccount {
        /// Whose it is.
        user: String,
        /// Whose it must be.
        expected: String,
    },
    /// The token is bound to no Pod (not a projected token).
    #[error(
        "the token of {user} is bound to no pod: a node agent enrolls with its projected ServiceAccount token"
    )]
    NotBound {
        /// Whose it is.
        user: String,
    },
    /// The token's Pod runs on another node than the one asked for.
    #[error(
        "the token of pod {pod} (on node {actual}) cannot obtain a certificate for node {requested}"
    )]
    WrongNode {
        /// The token's pod.
        pod: String,
        /// Where it runs ("none" when unscheduled).
        actual: String,
        /// What was asked.
        requested: String,
    },
    /// The Node does not exist.
    #[error("node {node} is not a Node of this cluster")]
    NoNode {
        /// The node asked for.
        node: String,
    },
    /// A Kubernetes request failed.
    #[error("{what}")]
    Kube {
        /// What was asked.
        what: String,
        /// kube's error.
        source: kube::Error,
    },
    /// The issuer could not be read or could not sign.
    #[error("node-agent issuer")]
    Issue {
        /// The certs error.
        source: certs::Error,
    },
}

impl Error {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::Unauthenticated { .. } => 401,
            Self::WrongServiceAccount { .. }
            | Self::NotBound { .. }
            | Self::WrongNode { .. }
            | Self::NoNode { .. } => 403,
            Self::Kube { .. } => 503,
            Self::Issue { .. } => 500,
        }
    }

    /// The stable reason (metric label and [`model::enroll::Refusal::reason`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad-request",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::WrongServiceAccount { .. } => "wrong-service-account",
            Self::NotBound { .. } => "not-bound",
            Self::WrongNode { .. } => "wrong-node",
            Self::NoNode { .. } => "no-node",
            Self::Kube { .. } | Self::Issue { .. } => "error",
        }
    }
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Signs node-agent certificates for tokens the Kubernetes API vouches for.
#[derive(Clone)]
pub struct Issuer {
    cluster: ClusterName,
    cluster_id: ClusterId,
    config: Config,
    /// The cluster's trust bundle, handed to enrolled agents.
    ca_file: PathBuf,
    client: kube::Client,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("cluster", &self.cluster)
            .field("issuer", &self.config.issuer.cert)
            .finish()
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Issue {
        source: certs::Error::Io {
            path: path.to_owned(),
            source,
        },
    })
}

impl Issuer {
    /// An issuer for `cluster`, handing out `ca_file` as the trust bundle.
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        config: Config,
        ca_file: PathBuf,
        client: kube::Client,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            config,
            ca_file,
            client,
        }
    }

    /// Answers one enrollment: the checks of the module header, then the signature.
    pub async fn enroll(
        &self,
        token: &str,
        request: &model::enroll::Request,
    ) -> Result<model::enroll::Response> {
        let node = NodeName::new(request.node.clone()).map_err(|e| Error::BadRequest {
            reason: format!("node {:?}: {e}", request.node),
        })?;
        if token.is_empty() {
            return Err(Error::BadRequest {
                reason: "no bearer token".into(),
            });
        }
        let reviews: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = reviews
            .create(
                &kube::api::PostParams::default(),
                &TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.to_owned()),
                        audiences: Some(vec![self.config.audience.clone()]),
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|source| Error::Kube {
                what: "review the token (TokenReview)".into(),
                source,
            })?;
        let status = review.status.unwrap_or_default();
        let unauthenticated = |reason: String| Error::Unauthenticated {
            audience: self.config.audience.clone(),
            reason,
        };
        if status.authenticated != Some(true) {
            return Err(unauthenticated(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.config.audience)
        {
            return Err(unauthenticated("the review names another audience".into()));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.config.namespace, self.config.service_account
        );
        if username != expected {
            return Err(Error::WrongServiceAccount {
                user: username,
                expected,
            });
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let Some(pod) = one("authentication.kubernetes.io/pod-name") else {
            return Err(Error::NotBound { user: username });
        };
        let actual = match one("authentication.kubernetes.io/node-name") {
            Some(n) => n,
            None => {
                // Tokens issued before the apiserver recorded node info: the Pod says where it
                // runs, if it is still the Pod the token was bound to.
                let pods: kube::Api<Pod> =
                    kube::Api::namespaced(self.client.clone(), &self.config.namespace);
                let p = pods.get_opt(&pod).await.map_err(|source| Error::Kube {
                    what: format!("get pod {}/{pod}", self.config.namespace),
                    source,
                })?;
                let uid = one("authentication.kubernetes.io/pod-uid");
                match p {
                    Some(p) if uid.is_none() || p.metadata.uid == uid => p
                        .spec
                        .and_then(|s| s.node_name)
                        .unwrap_or_else(|| "none".to_owned()),
                    _ => {
                        return Err(unauthenticated(format!(
                            "pod {}/{pod} the token is bound to is gone",
                            self.config.namespace
                        )));
                    }
                }
            }
        };
        if actual != node.as_str() {
            return Err(Error::WrongNode {
                pod: format!("{}/{pod}", self.config.namespace),
                actual,
                requested: node.to_string(),
            });
        }
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let exists = nodes
            .get_opt(node.as_str())
            .await
            .map_err(|source| Error::Kube {
                what: format!("get node {node}"),
                source,
            })?;
        if exists.is_none() {
            return Err(Error::NoNode {
                node: node.to_string(),
            });
        }
        let issuer_pem = read(&self.config.issuer.cert)?;
        let issuer = Ca::from_pem(&issuer_pem, &read(&self.config.issuer.key)?)
            .map_err(|source| Error::Issue { source })?;
        let identity = MeshIdentity::node_agent(self.cluster.clone(), self.cluster_id, node);
        let leaf = issuer
            .sign_request(
                &request.csr,
                &LeafSpec::new(identity.clone())
                    .validity(time::OffsetDateTime::now_utc(), self.config.validity),
            )
            .map_err(|source| match source {
                certs::Error::Issue { .. } => Error::BadRequest {
                    reason: format!("certificate signing request: {}", telemetry::chain(&source)),
                },
                source => Error::Issue { source },
            })?;
        tracing::info!(node = %identity.node.as_ref().map(NodeName::as_str).unwrap_or_default(), pod = %pod, "node-agent certificate issued");
        Ok(model::enroll::Response {
            certificate: format!("{}{}", ensure_newline(&leaf), ensure_newline(&issuer_pem)),
            ca: read(&self.ca_file)?,
        })
    }
}

fn ensure_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    }
}

fn respond(code: u16, body: String) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *r.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn refusal(
    code: u16,
    reason: &str,
    error: String,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let body = serde_json::to_string(&model::enroll::Refusal {
        reason: reason.to_owned(),
        error,
    })
    .unwrap_or_default();
    respond(code, body)
}

async fn answer(
    issuer: &Issuer,
    metrics: &Registry,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    if req.uri().path() != model::enroll::PATH {
        return refusal(
            404,
            "not-found",
            format!("only {} is served", model::enroll::PATH),
        );
    }
    if req.method() != http::Method::POST {
        return refusal(405, "method", "POST only".into());
    }
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let limited = http_body_util::Limited::new(req.into_body(), model::enroll::MAX_REQUEST_BYTES);
    let result = match limited.collect().await {
        Err(e) => Err(Error::BadRequest {
            reason: format!("body: {e}"),
        }),
        Ok(body) => match serde_json::from_slice::<model::enroll::Request>(&body.to_bytes()) {
            Err(e) => Err(Error::BadRequest {
                reason: format!("body: {e}"),
            }),
            Ok(request) => issuer.enroll(&token, &request).await,
        },
    };
    match result {
        Ok(response) => {
            metrics.inc(ENROLLMENTS, &["issued"]);
            respond(200, serde_json::to_string(&response).unwrap_or_default())
        }
        Err(e) => {
            metrics.inc(ENROLLMENTS, &[e.reason()]);
            let message = telemetry::chain(&e).to_string();
            tracing::warn!(reason = e.reason(), error = %message, "node-agent enrollment refused");
            refusal(e.status(), e.reason(), message)
        }
    }
}

/// Serves enrollment on `issuer.config.bind` with the certificate in `serving` until the
/// returned task is aborted; returns the bound address.
pub async fn spawn(
    issuer: Issuer,
    serving: Arc<Reloader>,
    metrics: Registry,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(issuer.config.bind).await?;
    let bound = listener.local_addr()?;
    let mut tls = serving.server_config_without_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let issuer = Arc::new(issuer);
    // Enrollment is rare (a node's start, then once per renewal): a few at a time is plenty,
    // and bounds the TokenReviews a flood of requests can cause.
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "enrollment accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, issuer, metrics, permits) = (
                acceptor.clone(),
                Arc::clone(&issuer),
                metrics.clone(),
                Arc::clone(&permits),
            );
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    tracing::debug!(client = %peer, "enrollment TLS handshake failed");
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let (issuer, metrics, permits) =
                        (Arc::clone(&issuer), metrics.clone(), Arc::clone(&permits));
                    async move {
                        let Ok(_permit) = permits.acquire().await else {
                            return Ok::<_, Infallible>(refusal(
                                503,
                                "error",
                                "shutting down".into(),
                            ));
                        };
                        Ok::<_, Infallible>(answer(&issuer, &metrics, req).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Ok((bound, task))
}

/// The enrollment endpoint while it runs; dropping it stops it.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts enrollment for the apiserver configured by `apiserver` (its cluster, and its Mesh
/// API certificate, which the endpoint serves with, and trust bundle, which agents get).
pub async fn start(
    config: Config,
    apiserver: &crate::config::Config,
    client: kube::Client,
    metrics: Registry,
) -> anyhow::Result<Running> {
    use anyhow::Context;
    let files = apiserver.mesh_tls.clone().context(
        "--enroll-issuer-dir needs --mesh-tls-dir (the certificate enrollment is served with)",
    )?;
    let serving = Reloader::load(files.clone()).context("load the Mesh API certificate")?;
    let watch = serving.spawn_watch(Duration::from_secs(5));
    let bind = config.bind;
    let issuer = Issuer::new(
        apiserver.cluster_name.clone(),
        apiserver.cluster_id,
        config,
        files.ca,
        client,
    );
    let (addr, task) = spawn(issuer, serving, metrics)
        .await
        .with_context(|| format!("listen on {bind}"))?;
    tracing::info!(enroll = %addr, "node-agent enrollment served");
    Ok(Running {
        addr,
        tasks: vec![watch, task],
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        enroll: Args,
    }

    #[test]
    fn enrollment_is_off_without_an_issuer_and_bad_flags_are_all_reported() {
        let off = Flags::try_parse_from(["x"]).unwrap();
        assert!(off.enroll.validate().unwrap().is_none());
        let bad = Flags::try_parse_from([
            "x",
            "--enroll-issuer-dir",
            "/nonexistent",
            "--enroll-bind",
            "nowhere",
            "--enroll-service-account",
            "agent",
            "--enroll-validity",
            "1m",
        ])
        .unwrap();
        let problems = bad.enroll.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }
}
