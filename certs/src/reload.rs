//! TLS material from PEM files, reloaded when the files change.
//!
//! A [`Reloader`] holds the current certificate, key and trust bundle. The rustls configs it
//! builds look the material up at every handshake, so a rotated certificate (or a trust bundle
//! that now holds an old and a new CA, for rotation with overlap) is used from the next
//! connection on, with no restart and no dropped connection. New files that do not parse, or
//! whose key does not match the certificate, are refused with a log line: the last good
//! material stays in use.
//!
//! Must not decide authorization; servers read the peer's [`MeshIdentity`] themselves.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{Error, MeshIdentity, Result};

/// Where a component's TLS material lives: its certificate (chain), its key, and the trust
/// bundle (one or more CA certificates) it verifies the other side against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM trust bundle.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `tls.crt`, `tls.key` and `ca.crt` in `dir`: the layout of a Kubernetes TLS Secret.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }

    fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One consistent set of loaded material.
struct Material {
    key: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    identity: Option<MeshIdentity>,
    not_after_unix: i64,
    raw: (Vec<u8>, Vec<u8>, Vec<u8>),
}

impl Material {
    fn load(files: &TlsFiles) -> Result<Self> {
        let raw = (
            TlsFiles::read(&files.cert)?,
            TlsFiles::read(&files.key)?,
            TlsFiles::read(&files.ca)?,
        );
        Self::from_raw(files, raw)
    }

    fn from_raw(files: &TlsFiles, raw: (Vec<u8>, Vec<u8>, Vec<u8>)) -> Result<Self> {
        let pem_err = |path: &Path, reason: String| Error::Pem {
            path: path.to_owned(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(&raw.0)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&files.cert, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err(&files.cert, "no certificate in file".into()))?;
        let info = crate::identity::CertInfo::from_der(leaf)?;
        let identity = MeshIdentity::from_cert_der(leaf).ok();
        let key = PrivateKeyDer::from_pem_slice(&raw.1)
            .map_err(|e| pem_err(&files.key, e.to_string()))?;
        let provider = provider();
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(|source| Error::Tls {
            cert: files.cert.clone(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&raw.2) {
            let ca = ca.map_err(|e| pem_err(&files.ca, e.to_string()))?;
            roots.add(ca).map_err(|e| Error::Trust {
                ca: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(pem_err(&files.ca, "no CA certificate in file".into()));
        }
        let roots = Arc::new(roots);
        let trust = |e: rustls::server::VerifierBuilderError| Error::Trust {
            ca: files.ca.clone(),
            reason: e.to_string(),
        };
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(trust)?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(trust)?;
        Ok(Self {
            key: Arc::new(key),
            client_verifier,
            server_verifier,
            identity,
            not_after_unix: info.not_after_unix,
            raw,
        })
    }
}

/// TLS material that follows its files. Cheap to share: clone the `Arc`.
pub struct Reloader {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("files", &self.files)
            .finish()
    }
}

impl Reloader {
    /// Loads the files; fails if they are not a usable set.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>> {
        let material = Material::load(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(material)),
        }))
    }

    fn current(&self) -> Arc<Material> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files. Returns `Ok(true)` if they changed and the new material is in use,
    /// `Ok(false)` if nothing changed, and an error (keeping the old material) if the new
    /// files are not usable.
    pub fn reload(&self) -> Result<bool> {
        let raw = (
            TlsFiles::read(&self.files.cert)?,
            TlsFiles::read(&self.files.key)?,
            TlsFiles::read(&self.files.ca)?,
        );
        if raw == self.current().raw {
            return Ok(false);
        }
        let material = Material::from_raw(&self.files, raw)?;
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(material),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(material),
        }
        Ok(true)
    }

    /// Polls the files every `interval` until the returned task is aborted or dropped with the
    /// runtime. Errors are logged and the last good material stays in use.
    pub fn spawn_watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match this.reload() {
                    Ok(true) => tracing::info!(
                        cert = %this.files.cert.display(),
                        identity = ?this.identity().map(|i| i.to_uri()),
                        not_after_unix = this.not_after_unix(),
                        "tls material reloaded"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        cert = %this.files.cert.display(),
                        error = %telemetry::chain(&e),
                        "new tls material refused; keeping the previous one"
                    ),
                }
            }
        })
    }

    /// The mesh identity of the current certificate, if it carries one.
    pub fn identity(&self) -> Option<MeshIdentity> {
        self.current().identity.clone()
    }

    /// End of validity of the current certificate, seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.current().not_after_unix
    }

    /// The files this reloader follows.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// A server config that presents the current certificate and requires a client
    /// certificate signed by the current trust bundle. ALPN is left to the caller.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .with_client_cert_verifier(Arc::new(Dynamic(Arc::clone(self))))
            .with_cert_resolver(Arc::new(Dynamic(Arc::clone(self))))
    }

    /// A server config that presents the current certificate and asks for no client
    /// certificate: for node-agent enrollment, whose callers have none yet and authenticate
    /// with a ServiceAccount token instead.
    pub fn server_config_without_client_auth(self: &Arc<Self>) -> rustls::ServerConfig {
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Dynamic(Arc::clone(self))))
    }

    /// A client config that verifies the server against the current trust bundle and presents
    /// the current certificate.
    pub fn client_config(self: &Arc<Self>) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Dynamic(Arc::clone(self))))
            .with_client_cert_resolver(Arc::new(Dynamic(Arc::clone(self))))
    }
}

/// Looks the current material up at every use.
struct Dynamic(Arc<Reloader>);

impl fmt::Debug for Dynamic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Dynamic").field(&self.0.files.cert).finish()
    }
}

impl ResolvesServerCert for Dynamic {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl ResolvesClientCert for Dynamic {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What our issuance makes, and so the only shape we accept: a leaf signed directly by the CA,
/// or a node agent's leaf signed by its cluster's node-agent issuer (the one intermediate we
/// issue, [`crate::IssuerIdentity`]; our CAs carry `pathLenConstraint: 0`, which webpki does
/// not enforce), with an extended key usage for its purpose (webpki accepts a leaf without any
/// EKU).
fn check_shape(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    client: bool,
) -> Result<(), rustls::Error> {
    let refuse = |why: &str| {
        tracing::warn!(reason = why, "certificate refused");
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    };
    match intermediates {
        [] => {}
        [issuer] => {
            if let Err(why) = check_node_agent_chain(end_entity, issuer) {
                return Err(refuse(&why));
            }
        }
        _ => {
            return Err(refuse(
                "chain longer than leaf → node-agent issuer → CA (no other intermediates are issued)",
            ));
        }
    }
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity.as_ref()) else {
        return Err(refuse("certificate does not parse"));
    };
    let eku = match cert.extended_key_usage() {
        Ok(Some(e)) => e.value,
        _ => return Err(refuse("no extended key usage")),
    };
    let ok = if client {
        eku.client_auth
    } else {
        eku.server_auth
    };
    if !ok {
        return Err(refuse(if client {
            "extended key usage lacks clientAuth"
        } else {
            "extended key usage lacks serverAuth"
        }));
    }
    Ok(())
}

/// A chain through an intermediate is accepted only as leaf → node-agent issuer: the leaf is a
/// node agent of the issuer's cluster, and the issuer is the one that signed it (webpki has
/// verified the signatures up to the trusted CA).
fn check_node_agent_chain(
    end_entity: &CertificateDer<'_>,
    issuer: &CertificateDer<'_>,
) -> Result<(), String> {
    let of = crate::IssuerIdentity::from_cert_der(issuer.as_ref())
        .map_err(|e| format!("intermediate is not a node-agent issuer: {e}"))?;
    let leaf = MeshIdentity::from_cert_der(end_entity.as_ref())
        .map_err(|e| format!("leaf under a node-agent issuer: {e}"))?;
    if leaf.role != crate::Role::NodeAgent
        || leaf.cluster != of.cluster
        || leaf.cluster_id != of.cluster_id
    {
        return Err(format!(
            "the node-agent issuer of cluster {} (ID {}) signed {leaf}",
            of.cluster, of.cluster_id
        ));
    }
    let (Ok((_, l)), Ok((_, i))) = (
        x509_parser::parse_x509_certificate(end_entity.as_ref()),
        x509_parser::parse_x509_certificate(issuer.as_ref()),
    ) else {
        return Err("certificate does not parse".into());
    };
    if l.issuer().as_raw() != i.subject().as_raw()
        || !crate::identity::issued_by(end_entity.as_ref(), issuer.as_ref())
    {
        return Err("the leaf is not signed by the intermediate it came with".into());
    }
    Ok(())
}

impl ClientCertVerifier for Dynamic {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would borrow from material that may be swapped; clients send their one
        // certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified =
            self.0
                .current()
                .client_verifier
                .verify_client_cert(end_entity, intermediates, now)?;
        check_shape(end_entity, intermediates, true)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

impl ServerCertVerifier for Dynamic {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_shape(end_entity, intermediates, false)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().server_verifier.supported_verify_schemes()
    }
}

/// Verifies a server by its mesh identity instead of its name: for servers reached at an
/// address that no certificate names (a node agent behind its node IP, a certificate shared by
/// a DaemonSet). The certificate must be a leaf directly under the trusted CA, with serverAuth,
/// carrying an identity `accept` admits.
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    accept: Arc<dyn Fn(&MeshIdentity) -> bool + Send + Sync>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityVerifier").finish()
    }
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_shape(end_entity, intermediates, false)?;
        let id = MeshIdentity::from_cert_der(end_entity.as_ref()).map_err(|_| {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        })?;
        if !(self.accept)(&id) {
            tracing::warn!(server = %id.to_uri(), "server identity is not the one expected");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config presenting `cert_pem`/`key_pem` to a server verified by identity (see
/// [`IdentityVerifier`]): its certificate chains to `ca_pem` and `accept` admits its identity.
pub fn identity_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    accept: impl Fn(&MeshIdentity) -> bool + Send + Sync + 'static,
) -> Result<rustls::ClientConfig> {
    let bad = |reason: &str| Error::Material {
        what: "identity client config",
        reason: reason.to_owned(),
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let ca = ca.map_err(|_| bad("CA does not parse"))?;
        roots.add(ca).map_err(|_| bad("CA not usable"))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("client certificate does not parse"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| bad("client key does not parse"))?;
    let provider = provider();
    let verifier = IdentityVerifier {
        roots: Arc::new(roots),
        accept: Arc::new(accept),
        provider: provider.clone(),
    };
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e.to_string()))
}

/// A client config without a client certificate, to a server verified by identity (see
/// [`IdentityVerifier`]): for a node agent enrolling, which has only the cluster CA yet.
pub fn identity_anonymous_client_config(
    ca_pem: &str,
    accept: impl Fn(&MeshIdentity) -> bool + Send + Sync + 'static,
) -> Result<rustls::ClientConfig> {
    let bad = |reason: &str| Error::Material {
        what: "anonymous client config",
        reason: reason.to_owned(),
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let ca = ca.map_err(|_| bad("CA does not parse"))?;
        roots.add(ca).map_err(|_| bad("CA not usable"))?;
    }
    if roots.is_empty() {
        return Err(bad("no CA certificate"));
    }
    let provider = provider();
    let verifier = IdentityVerifier {
        roots: Arc::new(roots),
        accept: Arc::new(accept),
        provider: provider.clone(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}
