//! Issuing certificates: one CA per cluster, and leaves that carry a [`MeshIdentity`].
//!
//! Keys are ECDSA P-256. Leaves get the identity as a URI SAN, the DNS names and IPs they serve
//! as DNS/IP SANs (rustls and Go both refuse a server certificate without SANs), and key usages
//! that match the role. Must not write files; callers decide where PEM goes.

use std::net::IpAddr;
use std::time::Duration;

use model::{ClusterId, ClusterName};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::{Error, MeshIdentity, Result};

/// How long a CA is valid unless told otherwise: ten years.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a leaf is valid unless told otherwise: one year.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back a certificate's validity starts, to absorb clock skew between machines.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

fn issue_err(subject: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |source| Error::Issue {
        subject: subject.to_owned(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's system RNG; failure here means the OS has no randomness at all.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, not_before: OffsetDateTime, valid_for: Duration) {
    params.not_before = not_before - BACKDATE;
    params.not_after = not_before + valid_for;
}

/// A cluster's certificate authority.
#[derive(Debug)]
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Generates a new CA for `cluster`, valid from now for `valid_for`.
    pub fn generate(cluster: &ClusterName, valid_for: Duration) -> Result<Self> {
        Self::generate_at(cluster, OffsetDateTime::now_utc(), valid_for)
    }

    /// Generates the CA of `cluster`'s etcd: a trust domain of its own, separate from the
    /// cluster CA, so that no certificate the cluster CA signs (peer, node agent, admin, the
    /// Mesh API's own) is an etcd client. It signs only etcd's server certificate and the
    /// apiserver's etcd client certificate.
    pub fn generate_etcd(cluster: &ClusterName, valid_for: Duration) -> Result<Self> {
        Self::generate_subject(
            format!("clustermesh etcd CA {cluster}"),
            OffsetDateTime::now_utc(),
            valid_for,
        )
    }

    /// Like [`Ca::generate`] with an explicit start of validity (tests of expiry use it).
    pub fn generate_at(
        cluster: &ClusterName,
        not_before: OffsetDateTime,
        valid_for: Duration,
    ) -> Result<Self> {
        Self::generate_subject(format!("clustermesh CA {cluster}"), not_before, valid_for)
    }

    fn generate_subject(
        subject: String,
        not_before: OffsetDateTime,
        valid_for: Duration,
    ) -> Result<Self> {
        let err = issue_err(&subject);
        let key = KeyPair::generate().map_err(&err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, subject.clone());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "clustermesh");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, not_before, valid_for);
        let cert = params.self_signed(&key).map_err(&err)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let err = issue_err("existing CA");
        let key = KeyPair::from_pem(key_pem).map_err(&err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(&err)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate (the trust bundle peers need).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key. Keep it in the cluster that owns it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a leaf certificate.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Leaf> {
        let subject = spec.common_name();
        let err = issue_err(&subject);
        let key = KeyPair::generate().map_err(&err)?;
        let cert = leaf_params(spec)?
            .signed_by(&key, &self.issuer)
            .map_err(&err)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues the node-agent issuer of `cluster` under this (cluster) CA: an intermediate CA
    /// that verifiers accept only between a node agent's leaf of the same cluster and the
    /// cluster CA ([`crate::IssuerIdentity`]), so whoever holds its key can mint node-agent
    /// certificates of this cluster and nothing else.
    pub fn issue_node_agent_issuer(
        &self,
        cluster: &ClusterName,
        cluster_id: ClusterId,
        valid_for: Duration,
    ) -> Result<Ca> {
        let id = crate::IssuerIdentity {
            cluster: cluster.clone(),
            cluster_id,
        };
        let subject = format!("clustermesh node-agent issuer {cluster}");
        let err = issue_err(&subject);
        let key = KeyPair::generate().map_err(&err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, subject.clone());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "clustermesh");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(id.to_uri().try_into().map_err(&err)?)];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, OffsetDateTime::now_utc(), valid_for);
        let cert = params.signed_by(&key, &self.issuer).map_err(&err)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Signs a certificate for the public key of the PKCS#10 request `csr_pem`, carrying
    /// `spec` and nothing the request asks for (its subject, SANs and extensions are ignored;
    /// only its signature, proving possession of the key, is checked). Returns the leaf PEM.
    pub fn sign_request(&self, csr_pem: &str, spec: &LeafSpec) -> Result<String> {
        let subject = spec.common_name();
        let err = issue_err(&subject);
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(&err)?;
        let cert = leaf_params(spec)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(&err)?;
        Ok(cert.pem())
    }
}

/// A new private key and a certificate signing request for it, PEM: what a node agent sends
/// its apiserver to enroll. The request names nothing; the issuer decides the identity.
#[derive(Debug, Clone)]
pub struct Request {
    /// The PKCS#10 request.
    pub csr_pem: String,
    /// Its private key (PKCS#8); it never leaves the holder.
    pub key_pem: String,
}

impl Request {
    /// Generates a key (ECDSA P-256) and a request signed with it.
    pub fn generate() -> Result<Self> {
        let err = issue_err("certificate signing request");
        let key = KeyPair::generate().map_err(&err)?;
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .map_err(&err)?;
        Ok(Self {
            csr_pem: csr.pem().map_err(&err)?,
            key_pem: key.serialize_pem(),
        })
    }
}

/// The parameters of a leaf certificate for `spec`.
fn leaf_params(spec: &LeafSpec) -> Result<CertificateParams> {
    let subject = spec.common_name();
    let err = issue_err(&subject);
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, subject.clone());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "clustermesh");
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let mut sans = vec![SanType::URI(
        spec.identity.to_uri().try_into().map_err(&err)?,
    )];
    for dns in &spec.dns_names {
        sans.push(SanType::DnsName(dns.clone().try_into().map_err(&err)?));
    }
    sans.extend(spec.ips.iter().copied().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if spec.identity.role.is_server() {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(
        &mut params,
        spec.not_before.unwrap_or_else(OffsetDateTime::now_utc),
        spec.valid_for,
    );
    Ok(params)
}

/// What to put into a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Who holds it.
    pub identity: MeshIdentity,
    /// DNS names it serves (servers only need them, but they do no harm on clients).
    pub dns_names: Vec<String>,
    /// IP addresses it serves.
    pub ips: Vec<IpAddr>,
    /// Start of validity; `None` means now.
    pub not_before: Option<OffsetDateTime>,
    /// How long it is valid.
    pub valid_for: Duration,
}

impl LeafSpec {
    /// A spec for `identity`, valid for [`DEFAULT_LEAF_VALIDITY`] from now, with no DNS or IP SANs.
    pub fn new(identity: MeshIdentity) -> Self {
        Self {
            identity,
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before: None,
            valid_for: DEFAULT_LEAF_VALIDITY,
        }
    }

    /// Adds DNS SANs.
    pub fn dns(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.dns_names.extend(names.into_iter().map(Into::into));
        self
    }

    /// Adds IP SANs.
    pub fn ips(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        self.ips.extend(ips);
        self
    }

    /// Sets the validity window.
    pub fn validity(mut self, not_before: OffsetDateTime, valid_for: Duration) -> Self {
        self.not_before = Some(not_before);
        self.valid_for = valid_for;
        self
    }

    fn common_name(&self) -> String {
        match &self.identity.node {
            Some(node) => format!("{}.{}.{}", node, self.identity.role, self.identity.cluster),
            None => format!("{}.{}", self.identity.role, self.identity.cluster),
        }
    }
}

/// An issued leaf: certificate and private key, PEM.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CertInfo, Role};
    use model::{ClusterId, NodeName};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn leaves_carry_their_identity_and_sans() {
        let east = ClusterName::new("east").unwrap();
        let ca = Ca::generate(&east, DEFAULT_CA_VALIDITY).unwrap();
        let id = MeshIdentity::node_agent(
            east.clone(),
            ClusterId::new(3).unwrap(),
            NodeName::new("node-1").unwrap(),
        );
        let leaf = ca
            .issue(
                &LeafSpec::new(id.clone())
                    .dns(["localhost"])
                    .ips(["127.0.0.1".parse().unwrap()]),
            )
            .unwrap();
        let d = der(&leaf.cert_pem);
        assert_eq!(MeshIdentity::from_cert_der(&d).unwrap(), id);
        let info = CertInfo::from_der(&d).unwrap();
        assert_eq!(info.dns_names, vec!["localhost".to_owned()]);
        assert_eq!(info.ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(!info.is_ca);
        assert!(info.issuer.contains("clustermesh CA east"));
        let ca_info = CertInfo::from_der(&der(ca.cert_pem())).unwrap();
        assert!(ca_info.is_ca);
        assert!(
            MeshIdentity::from_cert_der(&der(ca.cert_pem())).is_err(),
            "a CA is nobody"
        );
    }

    #[test]
    fn a_ca_reloaded_from_pem_keeps_issuing_under_the_same_name() {
        let east = ClusterName::new("east").unwrap();
        let ca = Ca::generate(&east, DEFAULT_CA_VALIDITY).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let leaf = again
            .issue(&LeafSpec::new(MeshIdentity::new(
                east,
                ClusterId::new(1).unwrap(),
                Role::Admin,
            )))
            .unwrap();
        let info = CertInfo::from_der(&der(&leaf.cert_pem)).unwrap();
        assert!(
            info.issuer.contains("clustermesh CA east"),
            "{}",
            info.issuer
        );
    }
}
