//! Certificates for the mesh: who is who, and how TLS is set up everywhere.
//!
//! * [`identity`]: the mesh identity a certificate carries (cluster name and ID, role, node)
//!   as a URI SAN, and reading it back from a peer's certificate;
//! * [`issue`]: a cluster CA and the leaf certificates it signs (rcgen, ECDSA P-256);
//! * [`reload`]: PEM files into rustls server and client configs that pick up new files
//!   without a restart, keeping the last good material when new files are bad.
//!
//! Must not decide who may do what (authorization lives with the servers); only who is who.
//! ring is the only crypto provider used here.

pub mod identity;
pub mod issue;
pub mod reload;

pub use identity::{IssuerIdentity, MeshIdentity, Role};
pub use issue::{Ca, Leaf, LeafSpec, Request};
pub use reload::{Reloader, TlsFiles, identity_anonymous_client_config, identity_client_config};

use std::path::PathBuf;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused to build or sign a certificate.
    #[error("cannot issue certificate for {subject}")]
    Issue {
        /// The certificate being issued.
        subject: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate could not be parsed.
    #[error("cannot parse certificate: {reason}")]
    Parse {
        /// What is wrong.
        reason: String,
    },
    /// A certificate carries no mesh identity, or a malformed one.
    #[error("certificate identity: {reason}")]
    Identity {
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the material (for example a key that does not match its certificate).
    #[error("tls material from {cert}")]
    Tls {
        /// The certificate file.
        cert: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// A verifier could not be built from the trust bundle.
    #[error("trust bundle {ca}: {reason}")]
    Trust {
        /// The CA file.
        ca: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// PEM material held in memory (not read from files) is unusable.
    #[error("{what}: {reason}")]
    Material {
        /// Which material.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// SHA-256 fingerprint of DER bytes, as lowercase hex pairs joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// SHA-256 fingerprint of the first certificate in `pem` (what a grant records), `None` when
/// it holds no certificate.
pub fn fingerprint_pem(pem: &[u8]) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .next()?
        .ok()?;
    Some(fingerprint(der.as_ref()))
}
