//! Real TLS handshakes over loopback with material from this crate: mutual authentication,
//! refusal of foreign and expired certificates, and hot reload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use certs::{Ca, LeafSpec, MeshIdentity, Reloader, Role, TlsFiles};
use model::{ClusterId, ClusterName};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

fn write(dir: &Path, leaf: &certs::Leaf, ca_bundle: &str) -> TlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let files = TlsFiles::in_dir(dir);
    std::fs::write(&files.cert, &leaf.cert_pem).unwrap();
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
    std::fs::write(&files.ca, ca_bundle).unwrap();
    files
}

fn server_leaf(ca: &Ca) -> certs::Leaf {
    ca.issue(
        &LeafSpec::new(MeshIdentity::new(
            cluster("east"),
            ClusterId::new(1).unwrap(),
            Role::Apiserver,
        ))
        .dns(["localhost"])
        .ips(["127.0.0.1".parse().unwrap()]),
    )
    .unwrap()
}

fn peer_leaf(ca: &Ca, name: &str, id: u64) -> certs::Leaf {
    ca.issue(&LeafSpec::new(MeshIdentity::new(
        cluster(name),
        ClusterId::new(id).unwrap(),
        Role::Peer,
    )))
    .unwrap()
}

/// A TLS echo server that answers every connection with the client's mesh identity URI.
async fn serve(reloader: Arc<Reloader>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(reloader.server_config()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let (_, conn) = tls.get_ref();
                    let who = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| {
                            MeshIdentity::from_cert_der(c)
                                .map(|i| i.to_uri())
                                .unwrap_or_else(|e| e.to_string())
                        })
                        .unwrap_or_default();
                    let _ = tls.write_all(who.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// Connects, returns (what the server said, fingerprint of the server certificate).
async fn call(
    client: &Arc<Reloader>,
    addr: std::net::SocketAddr,
) -> Result<(String, String), String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client.client_config()));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_fp = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| certs::fingerprint(c))
        .unwrap_or_default();
    let mut out = String::new();
    // With TLS 1.3 a refused client certificate surfaces on the first read.
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("server closed without answering".into());
    }
    Ok((out, server_fp))
}

#[tokio::test]
async fn mutual_tls_carries_the_client_identity_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(&cluster("east"), certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let server = Reloader::load(write(
        &dir.path().join("server"),
        &server_leaf(&ca),
        ca.cert_pem(),
    ))
    .unwrap();
    let (addr, _task) = serve(server).await;

    let good = Reloader::load(write(
        &dir.path().join("good"),
        &peer_leaf(&ca, "west", 2),
        ca.cert_pem(),
    ))
    .unwrap();
    let (who, _) = call(&good, addr).await.unwrap();
    assert_eq!(who, "spiffe://clustermesh/cluster/west/id/2/peer");

    // A certificate from another CA never gets past the handshake.
    let other = Ca::generate(&cluster("mallory"), certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let stranger = Reloader::load(write(
        &dir.path().join("stranger"),
        &peer_leaf(&other, "west", 2),
        ca.cert_pem(), // it trusts the server, but the server does not trust it
    ))
    .unwrap();
    let e = call(&stranger, addr).await.unwrap_err();
    assert!(!e.is_empty());

    // An expired certificate from the right CA is refused too.
    let expired = ca
        .issue(
            &LeafSpec::new(MeshIdentity::new(
                cluster("west"),
                ClusterId::new(2).unwrap(),
                Role::Peer,
            ))
            .validity(
                time::OffsetDateTime::now_utc() - Duration::from_secs(3 * 86400),
                Duration::from_secs(86400),
            ),
        )
        .unwrap();
    let expired =
        Reloader::load(write(&dir.path().join("expired"), &expired, ca.cert_pem())).unwrap();
    assert!(call(&expired, addr).await.is_err());

    // A client that does not trust the server's CA refuses it.
    let wary = Reloader::load(write(
        &dir.path().join("wary"),
        &peer_leaf(&ca, "west", 2),
        other.cert_pem(),
    ))
    .unwrap();
    let e = call(&wary, addr).await.unwrap_err();
    assert!(
        e.contains("UnknownIssuer") || e.contains("invalid peer certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn rotated_files_are_used_from_the_next_handshake_and_bad_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(&cluster("east"), certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let server_files = write(&dir.path().join("server"), &server_leaf(&ca), ca.cert_pem());
    let server = Reloader::load(server_files.clone()).unwrap();
    let watch = server.spawn_watch(Duration::from_millis(50));
    let (addr, _task) = serve(server.clone()).await;
    let client = Reloader::load(write(
        &dir.path().join("client"),
        &peer_leaf(&ca, "west", 2),
        ca.cert_pem(),
    ))
    .unwrap();
    let (_, fp1) = call(&client, addr).await.unwrap();

    // Rotate the server certificate: the next handshake presents the new one.
    let next = server_leaf(&ca);
    std::fs::write(&server_files.cert, &next.cert_pem).unwrap();
    std::fs::write(&server_files.key, &next.key_pem).unwrap();
    let fp2 = wait_for_new_fingerprint(&client, addr, &fp1).await;
    assert_ne!(fp1, fp2);

    // A garbled certificate is refused; the server keeps serving the last good one.
    std::fs::write(
        &server_files.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(server.reload().is_err());
    let (_, fp3) = call(&client, addr).await.unwrap();
    assert_eq!(fp3, fp2);

    // A certificate whose key does not match is refused as well.
    let mismatched = server_leaf(&ca);
    std::fs::write(&server_files.cert, &mismatched.cert_pem).unwrap();
    let e = server.reload().unwrap_err().to_string();
    assert!(e.contains("tls material"), "{e}");
    assert_eq!(call(&client, addr).await.unwrap().1, fp2);
    watch.abort();
}

#[tokio::test]
async fn a_trust_bundle_with_two_cas_accepts_both_during_ca_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let old = Ca::generate(&cluster("east"), certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let new = Ca::generate(&cluster("east"), certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let bundle = format!("{}{}", old.cert_pem(), new.cert_pem());
    let server = Reloader::load(write(
        &dir.path().join("server"),
        &server_leaf(&old),
        &bundle,
    ))
    .unwrap();
    let (addr, _task) = serve(server).await;
    for (i, ca) in [&old, &new].into_iter().enumerate() {
        let client = Reloader::load(write(
            &dir.path().join(format!("c{i}")),
            &peer_leaf(ca, "west", 2),
            &bundle,
        ))
        .unwrap();
        assert!(call(&client, addr).await.is_ok(), "client of CA {i}");
    }
}

async fn wait_for_new_fingerprint(
    client: &Arc<Reloader>,
    addr: std::net::SocketAddr,
    old: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, fp) = call(client, addr).await.unwrap();
        if fp != old {
            return fp;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never presented the rotated certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A leaf with the mesh identity URI, signed by `issuer`, with the given EKUs.
fn custom_leaf(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ekus: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://clustermesh/cluster/west/id/2/admin").unwrap(),
    )];
    p.extended_key_usages = ekus;
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key)
}

/// Issue 12, case 9: only the shape our issuance makes is accepted — a leaf signed directly
/// by the CA, with the EKU of its purpose. A chain leaf ← intermediate ← CA (the CA says
/// `pathLenConstraint: 0`) and a leaf without any EKU are refused, although both are signed
/// by the trusted CA.
#[tokio::test]
async fn intermediates_and_leaves_without_eku_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(&cluster("east"), certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let server = Reloader::load(write(
        &dir.path().join("server"),
        &server_leaf(&ca),
        ca.cert_pem(),
    ))
    .unwrap();
    let (addr, _task) = serve(server).await;
    let ca_issuer = rcgen::Issuer::from_ca_cert_pem(
        ca.cert_pem(),
        rcgen::KeyPair::from_pem(ca.key_pem()).unwrap(),
    )
    .unwrap();

    // Control: the same hand-made leaf with clientAuth, signed by the CA, is accepted.
    let (pem, key) = custom_leaf(&ca_issuer, vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]);
    let ok = certs::Leaf {
        cert_pem: pem,
        key_pem: key.serialize_pem(),
    };
    let ok = Reloader::load(write(&dir.path().join("ok"), &ok, ca.cert_pem())).unwrap();
    assert!(call(&ok, addr).await.is_ok(), "a well-formed leaf works");

    // No EKU at all.
    let (pem, key) = custom_leaf(&ca_issuer, vec![]);
    let no_eku = certs::Leaf {
        cert_pem: pem,
        key_pem: key.serialize_pem(),
    };
    let no_eku = Reloader::load(write(&dir.path().join("no-eku"), &no_eku, ca.cert_pem())).unwrap();
    assert!(
        call(&no_eku, addr).await.is_err(),
        "a leaf without EKU is refused"
    );

    // Server-only EKU on a client.
    let (pem, key) = custom_leaf(&ca_issuer, vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]);
    let wrong = certs::Leaf {
        cert_pem: pem,
        key_pem: key.serialize_pem(),
    };
    let wrong =
        Reloader::load(write(&dir.path().join("wrong-eku"), &wrong, ca.cert_pem())).unwrap();
    assert!(
        call(&wrong, addr).await.is_err(),
        "a serverAuth-only leaf is refused as a client"
    );

    // leaf ← intermediate ← CA, the intermediate sent in the chain.
    let ikey = rcgen::KeyPair::generate().unwrap();
    let mut ip = rcgen::CertificateParams::default();
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ip.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    let icert = ip.signed_by(&ikey, &ca_issuer).unwrap();
    let iissuer = rcgen::Issuer::new(ip, ikey);
    let (pem, key) = custom_leaf(&iissuer, vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]);
    let chained = certs::Leaf {
        cert_pem: format!("{pem}{}", icert.pem()),
        key_pem: key.serialize_pem(),
    };
    let chained =
        Reloader::load(write(&dir.path().join("chained"), &chained, ca.cert_pem())).unwrap();
    assert!(
        call(&chained, addr).await.is_err(),
        "an intermediate is refused"
    );
}

/// ADR 0022: the one intermediate we issue, the node-agent issuer, is accepted between a node
/// agent's leaf of its cluster (signed from a CSR) and the cluster CA; anything else it signs
/// (another role, another cluster) is refused, and so is a leaf sent with an issuer that did
/// not sign it.
#[tokio::test]
async fn the_node_agent_issuer_signs_node_agents_of_its_cluster_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let east = cluster("east");
    let id = ClusterId::new(1).unwrap();
    let ca = Ca::generate(&east, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
    let server = Reloader::load(write(
        &dir.path().join("server"),
        &server_leaf(&ca),
        ca.cert_pem(),
    ))
    .unwrap();
    let (addr, _task) = serve(server).await;
    let issuer = ca
        .issue_node_agent_issuer(&east, id, Duration::from_secs(86_400))
        .unwrap();
    let sign = |identity: MeshIdentity, chain_with: &str| {
        let req = certs::Request::generate().unwrap();
        let leaf = issuer
            .sign_request(&req.csr_pem, &LeafSpec::new(identity))
            .unwrap();
        certs::Leaf {
            cert_pem: format!("{leaf}{chain_with}"),
            key_pem: req.key_pem,
        }
    };
    let node = |c: &ClusterName, n: &str| {
        MeshIdentity::node_agent(c.clone(), id, model::NodeName::new(n).unwrap())
    };

    let ok = sign(node(&east, "n1"), issuer.cert_pem());
    let ok = Reloader::load(write(&dir.path().join("ok"), &ok, ca.cert_pem())).unwrap();
    let (who, _) = call(&ok, addr).await.unwrap();
    assert_eq!(who, "spiffe://clustermesh/cluster/east/id/1/node-agent/n1");

    let admin = sign(
        MeshIdentity::new(east.clone(), id, Role::Admin),
        issuer.cert_pem(),
    );
    let admin = Reloader::load(write(&dir.path().join("admin"), &admin, ca.cert_pem())).unwrap();
    assert!(
        call(&admin, addr).await.is_err(),
        "an admin certificate from the node-agent issuer is refused"
    );

    let west = sign(node(&cluster("west"), "n1"), issuer.cert_pem());
    let west = Reloader::load(write(&dir.path().join("west"), &west, ca.cert_pem())).unwrap();
    assert!(
        call(&west, addr).await.is_err(),
        "a node agent of another cluster from this issuer is refused"
    );

    let other = ca
        .issue_node_agent_issuer(&east, id, Duration::from_secs(86_400))
        .unwrap();
    let mismatched = sign(node(&east, "n1"), other.cert_pem());
    let mismatched = Reloader::load(write(
        &dir.path().join("mismatched"),
        &mismatched,
        ca.cert_pem(),
    ))
    .unwrap();
    assert!(
        call(&mismatched, addr).await.is_err(),
        "a leaf sent with an issuer that did not sign it is refused"
    );
}
