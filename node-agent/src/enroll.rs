//! Enrollment, the node agent's side ([ADR 0022](../../docs/architecture/adr/0022-node-agent-enrollment.md)):
//! a node agent without a certificate of its own node, or with one past two thirds of its
//! lifetime, generates a new key, sends a certificate signing request for its node with its
//! projected ServiceAccount token to its apiserver (HTTPS, the apiserver verified by its
//! identity against the cluster CA), and writes the certificate, key and trust bundle into its
//! TLS directory, where the reloaders of its Mesh API client and `/state` server pick them up.
//!
//! The key never leaves the node. The token file is read at every attempt (the kubelet
//! rotates it). Must not decide who the agent is: the apiserver signs for the token's node,
//! and a certificate that names another node is refused here too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certs::{MeshIdentity, Role, TlsFiles};
use model::{ClusterId, ClusterName, NodeName};

/// What enrollment needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The apiserver's enrollment endpoints, `host:port`, tried in order.
    pub endpoints: Vec<String>,
    /// This node's cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// This node.
    pub node: NodeName,
    /// The projected ServiceAccount token.
    pub token_file: PathBuf,
    /// The cluster CA to verify the apiserver with before a certificate is held.
    pub ca_file: PathBuf,
    /// Where the certificate, key and trust bundle go (`tls.crt`, `tls.key`, `ca.crt`).
    pub tls_dir: PathBuf,
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key or request could not be made, or the trust bundle is unusable.
    #[error("certificate material")]
    Certs {
        /// The certs error.
        source: certs::Error,
    },
    /// No endpoint is configured.
    #[error("no enrollment endpoint configured")]
    NoEndpoint,
    /// The apiserver could not be reached or answered no HTTP.
    #[error("enroll at {endpoint}: {reason}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The apiserver refused.
    #[error("enroll at {endpoint}: refused ({status}, {reason}): {error}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The stable reason (`wrong-node`, `unauthenticated`, ...).
        reason: String,
        /// The apiserver's explanation.
        error: String,
    },
    /// The apiserver answered with a certificate that is not this node's.
    #[error("enroll at {endpoint}: the certificate issued is not usable: {reason}")]
    BadCertificate {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Whether retrying could help (a refusal for the wrong node or account will not).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if *status == 400 || *status == 403)
    }
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`Enroller::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The certificate held is this node's and not due for renewal.
    Kept {
        /// When it is due (two thirds of its lifetime).
        renew_at: SystemTime,
    },
    /// A new certificate was obtained and written.
    Issued {
        /// When it is due.
        renew_at: SystemTime,
        /// Its fingerprint.
        fingerprint: String,
    },
}

impl Outcome {
    /// When the certificate held now is due for renewal.
    pub fn renew_at(&self) -> SystemTime {
        match self {
            Self::Kept { renew_at } | Self::Issued { renew_at, .. } => *renew_at,
        }
    }
}

/// Obtains and renews this node's certificate.
#[derive(Debug, Clone)]
pub struct Enroller {
    config: Config,
}

fn unix(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0).unsigned_abs())
}

impl Enroller {
    /// An enroller for `config`.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// The TLS files it maintains.
    pub fn files(&self) -> TlsFiles {
        TlsFiles::in_dir(&self.config.tls_dir)
    }

    fn identity(&self) -> MeshIdentity {
        MeshIdentity::node_agent(
            self.config.cluster.clone(),
            self.config.cluster_id,
            self.config.node.clone(),
        )
    }

    /// When the certificate in `pem` is due for renewal, if it is this node's: two thirds
    /// into its lifetime.
    fn renew_at(&self, pem: &[u8]) -> Option<SystemTime> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .next()?
            .ok()?;
        let id = MeshIdentity::from_cert_der(der.as_ref()).ok()?;
        if id != self.identity() {
            return None;
        }
        let info = certs::identity::CertInfo::from_der(der.as_ref()).ok()?;
        let life = info.not_after_unix - info.not_before_unix;
        Some(unix(info.not_before_unix + life * 2 / 3))
    }

    /// The renewal time of the certificate held, `None` when there is none of this node (or
    /// its key is missing).
    pub fn held(&self) -> Option<SystemTime> {
        let files = self.files();
        if !files.key.is_file() {
            return None;
        }
        self.renew_at(&std::fs::read(&files.cert).ok()?)
    }

    /// Enrolls unless a certificate of this node is held and not yet due.
    pub async fn ensure(&self) -> Result<Outcome> {
        match self.held() {
            Some(renew_at) if renew_at > SystemTime::now() => Ok(Outcome::Kept { renew_at }),
            _ => self.enroll().await,
        }
    }

    /// Enrolls now: a new key, a request, the certificate written.
    pub async fn enroll(&self) -> Result<Outcome> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })
        };
        let token = read(&self.config.token_file)?.trim().to_owned();
        let ca = read(&self.config.ca_file)?;
        let request = certs::Request::generate().map_err(|source| Error::Certs { source })?;
        let body = serde_json::to_vec(&model::enroll::Request {
            node: self.config.node.to_string(),
            csr: request.csr_pem.clone(),
        })
        .unwrap_or_default();
        let (cluster, cluster_id) = (self.config.cluster.clone(), self.config.cluster_id);
        let tls = certs::identity_anonymous_client_config(&ca, move |id| {
            id.role == Role::Apiserver && id.cluster == cluster && id.cluster_id == cluster_id
        })
        .map_err(|source| Error::Certs { source })?;
        let tls = Arc::new(tls);
        let mut last = Error::NoEndpoint;
        for endpoint in &self.config.endpoints {
            match post(endpoint, Arc::clone(&tls), &token, body.clone()).await {
                Ok(response) => return self.install(endpoint, &request, response),
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint, error = %telemetry::chain(&e), "enrollment failed; trying the next endpoint");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Checks the certificate issued and writes the files (key first, each atomically).
    fn install(
        &self,
        endpoint: &str,
        request: &certs::Request,
        response: model::enroll::Response,
    ) -> Result<Outcome> {
        let bad = |reason: String| Error::BadCertificate {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let renew_at = self
            .renew_at(response.certificate.as_bytes())
            .ok_or_else(|| bad(format!("it does not carry {}", self.identity().to_uri())))?;
        let fingerprint = certs::fingerprint_pem(response.certificate.as_bytes())
            .ok_or_else(|| bad("no certificate".into()))?;
        let files = self.files();
        std::fs::create_dir_all(&self.config.tls_dir).map_err(|source| Error::Write {
            path: self.config.tls_dir.clone(),
            source,
        })?;
        write_atomic(&files.key, request.key_pem.as_bytes())?;
        write_atomic(&files.cert, response.certificate.as_bytes())?;
        write_atomic(&files.ca, response.ca.as_bytes())?;
        tracing::info!(fingerprint = %fingerprint, endpoint = %endpoint, "node-agent certificate obtained");
        Ok(Outcome::Issued {
            renew_at,
            fingerprint,
        })
    }

    /// Renews for as long as the process runs: at each renewal time, and on failure again
    /// with backoff (the certificate held stays in use meanwhile).
    pub async fn run(self, mut renew_at: SystemTime) {
        let mut backoff = telemetry::backoff::Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(600),
        );
        loop {
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            match self.ensure().await {
                Ok(outcome) => {
                    backoff.reset();
                    renew_at = outcome.renew_at();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %telemetry::chain(&e), retry_in = ?delay, "certificate renewal failed; the current certificate stays in use");
                    renew_at = SystemTime::now() + delay;
                }
            }
        }
    }
}

fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// One POST to `endpoint`.
async fn post(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
    body: Vec<u8>,
) -> Result<model::enroll::Response> {
    use http_body_util::BodyExt;
    let transport = |reason: String| Error::Transport {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let timeout = Duration::from_secs(15);
    let work = async {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(|e| transport(format!("connect: {e}")))?;
        let host = endpoint
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(endpoint);
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| transport(format!("server name {host:?}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| transport(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| transport(format!("HTTP: {e}")))?;
        let driver = tokio::spawn(conn);
        let req = http::Request::post(model::enroll::PATH)
            .header(http::header::HOST, host)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| transport(format!("request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(format!("HTTP: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(format!("response: {e}")))?
            .to_bytes();
        driver.abort();
        if status == 200 {
            serde_json::from_slice(&bytes).map_err(|e| transport(format!("response: {e}")))
        } else {
            let refusal: model::enroll::Refusal =
                serde_json::from_slice(&bytes).unwrap_or_else(|_| model::enroll::Refusal {
                    reason: "unknown".into(),
                    error: String::from_utf8_lossy(&bytes).chars().take(512).collect(),
                });
            Err(Error::Refused {
                endpoint: endpoint.to_owned(),
                status,
                reason: refusal.reason,
                error: refusal.error,
            })
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        transport(format!(
            "no answer within {}",
            telemetry::duration::format(timeout)
        ))
    })?
}
