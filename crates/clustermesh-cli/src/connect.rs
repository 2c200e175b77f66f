//! `clustermesh connect` and `disconnect`: peer configuration Secrets written into (or removed
//! from) each cluster's Kubernetes API. The apiservers pick them up by themselves.
//!
//! For "east imports west", east gets Secret `clustermesh-peer-west` holding west's Mesh API
//! endpoints, west's CA certificate (to verify west's server) and a client certificate for
//! east's identity issued by west's CA (so west can tell east's requests apart). No CA key
//! ever leaves its cluster's Kubernetes API except through this CLI's memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use certs::identity::CertInfo;
use certs::{Ca, LeafSpec, MeshIdentity, Role};
use clap::Args;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, PostParams};
use model::objects::{GRANT_LABEL, PEER_LABEL, grant_secret_name, peer_secret_name};
use model::status::Phase;
use model::{ClusterId, ClusterName};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;

use crate::cluster::{Cluster, KubeArgs};
use crate::output::{self, Format};

/// A client certificate closer to expiry than this is re-issued by `connect`.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// The first cluster's kubeconfig context (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// The cluster to connect it with.
    #[arg(long)]
    destination_context: String,
    /// Only make --context import from --destination-context, not the other way round.
    #[arg(long)]
    one_way: bool,
    /// Wait until the apiservers report the peers ready, showing progress.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "2m", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

#[derive(Debug, Args)]
pub(crate) struct DisconnectArgs {
    /// The cluster to disconnect (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// The cluster to disconnect it from.
    #[arg(long)]
    destination_context: String,
    /// Only remove --context's side (for a destination that is gone or unreachable).
    #[arg(long)]
    force: bool,
    /// Wait until --context's apiserver has drained the peer.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "1m", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

/// What `disconnect` did to one cluster's side.
#[derive(Debug, Clone, Serialize)]
struct Removed {
    /// The cluster whose Secrets were removed.
    cluster: String,
    /// The peer it no longer imports from nor admits.
    peer: String,
    /// Its import configuration of the peer.
    secret: String,
    /// `deleted` or `absent`.
    secret_action: &'static str,
    /// The grant that admitted the peer.
    grant: String,
    /// `deleted` or `absent`.
    grant_action: &'static str,
}

impl Removed {
    fn line(&self) -> String {
        format!(
            "{} → {}: Secret {} {}; grant {} {}",
            self.cluster, self.peer, self.secret, self.secret_action, self.grant, self.grant_action
        )
    }
}

/// What happened to one direction.
#[derive(Debug, Clone, Serialize)]
struct Direction {
    /// The importing cluster.
    cluster: String,
    /// What it imports.
    peer: String,
    /// Secret written.
    secret: String,
    /// created / updated / unchanged.
    action: &'static str,
    /// Whether the client certificate was issued now or reused.
    certificate: &'static str,
    /// Its end of validity (Unix seconds).
    certificate_not_after_unix: i64,
    /// The peer's endpoints.
    endpoints: Vec<String>,
}

struct Side {
    cluster: Cluster,
    name: ClusterName,
    id: ClusterId,
    ca: Ca,
    endpoints: Vec<String>,
    peers: BTreeMap<String, Option<u16>>,
}

async fn side(cluster: Cluster) -> Result<Side> {
    let status = cluster.status().await?;
    let (name, id) = cluster.identity_of(&status)?;
    let ca = cluster.ca().await?;
    let endpoints = cluster.mesh_endpoints().await?;
    let peers = status
        .peers
        .iter()
        .map(|p| (p.name.clone(), p.cluster_id))
        .collect();
    Ok(Side {
        cluster,
        name,
        id,
        ca,
        endpoints,
        peers,
    })
}

fn pem_der(pem: &[u8]) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem).next()?.ok()
}

/// Whether an existing Secret's client certificate can stay: issued by the peer's current CA,
/// for this cluster's identity, not close to expiry.
fn reusable(existing: &BTreeMap<String, ByteString>, me: &Side, peer: &Side) -> Option<i64> {
    let ca_pem = existing.get("ca.crt")?;
    if ca_pem.0 != peer.ca.cert_pem().as_bytes() {
        return None;
    }
    existing.get("tls.key")?;
    let der = pem_der(&existing.get("tls.crt")?.0)?;
    let info = CertInfo::from_der(der.as_ref()).ok()?;
    let want = MeshIdentity::new(me.name.clone(), me.id, Role::Peer);
    if MeshIdentity::from_cert_der(der.as_ref()).ok()? != want {
        return None;
    }
    let ca_der = pem_der(peer.ca.cert_pem().as_bytes())?;
    if !certs::identity::issued_by(der.as_ref(), ca_der.as_ref()) {
        return None;
    }
    let now = output::now_unix();
    (info.not_after_unix > now + RENEW_BEFORE.as_secs() as i64 && info.not_before_unix <= now)
        .then_some(info.not_after_unix)
}

/// Writes (or leaves unchanged) the grant in `peer`'s cluster that admits `me` with the
/// client certificates whose fingerprints are `fingerprints`.
async fn write_grant(peer: &Side, me: &Side, fingerprints: &[String]) -> Result<&'static str> {
    let api = peer.cluster.api::<Secret>();
    let name = grant_secret_name(me.name.as_str());
    let existing = api
        .get_opt(&name)
        .await
        .with_context(|| format!("context {}: read Secret {name}", peer.cluster.context))?;
    let mut data = BTreeMap::new();
    data.insert(
        "cluster-id".to_owned(),
        ByteString(format!("{}\n", me.id).into_bytes()),
    );
    data.insert(
        "sha256".to_owned(),
        ByteString(format!("{}\n", fingerprints.join("\n")).into_bytes()),
    );
    let mut secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": peer.cluster.namespace,
            "labels": {
                GRANT_LABEL: me.name.as_str(),
                "app.kubernetes.io/managed-by": "clustermesh",
            },
        },
        "type": "Opaque",
    }))?;
    secret.data = Some(data.clone());
    Ok(match existing {
        Some(old) if old.data.as_ref() == Some(&data) => "unchanged",
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version.clone();
            api.replace(&name, &PostParams::default(), &secret)
                .await
                .with_context(|| {
                    format!("context {}: update Secret {name}", peer.cluster.context)
                })?;
            "updated"
        }
        None => {
            api.create(&PostParams::default(), &secret)
                .await
                .with_context(|| {
                    format!("context {}: create Secret {name}", peer.cluster.context)
                })?;
            "created"
        }
    })
}

fn fingerprint_of(pem: &ByteString) -> Result<String> {
    certs::fingerprint_pem(&pem.0).context("the client certificate does not parse")
}

async fn write_direction(me: &Side, peer: &Side) -> Result<Direction> {
    let api = me.cluster.api::<Secret>();
    let name = peer_secret_name(peer.name.as_str());
    let existing = match api.get_opt(&name).await {
        Ok(s) => s,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("context {}: read Secret {name}", me.cluster.context));
        }
    };
    let old_data = existing
        .as_ref()
        .and_then(|s| s.data.clone())
        .unwrap_or_default();
    let (tls_crt, tls_key, certificate, not_after) = match reusable(&old_data, me, peer) {
        Some(not_after) => (
            old_data["tls.crt"].clone(),
            old_data["tls.key"].clone(),
            "reused",
            not_after,
        ),
        None => {
            let leaf = peer
                .ca
                .issue(&LeafSpec::new(MeshIdentity::new(
                    me.name.clone(),
                    me.id,
                    Role::Peer,
                )))
                .with_context(|| {
                    format!("issue {}'s client certificate for {}", me.name, peer.name)
                })?;
            let not_after = pem_der(leaf.cert_pem.as_bytes())
                .and_then(|d| CertInfo::from_der(d.as_ref()).ok())
                .map_or(0, |i| i.not_after_unix);
            (
                ByteString(leaf.cert_pem.clone().into_bytes()),
                ByteString(leaf.key_pem.clone().into_bytes()),
                "issued",
                not_after,
            )
        }
    };
    // The serving side admits exactly this certificate. While a new one replaces an old one,
    // both are admitted until the peer Secret holds the new one; then only the new one.
    let new_fp = fingerprint_of(&tls_crt)?;
    let old_fp = old_data.get("tls.crt").and_then(|c| fingerprint_of(c).ok());
    match old_fp.filter(|o| *o != new_fp) {
        Some(old_fp) => {
            write_grant(peer, me, &[new_fp.clone(), old_fp]).await?;
        }
        None => {
            write_grant(peer, me, std::slice::from_ref(&new_fp)).await?;
        }
    }
    let mut data = BTreeMap::new();
    data.insert(
        "endpoints".to_owned(),
        ByteString(format!("{}\n", peer.endpoints.join("\n")).into_bytes()),
    );
    data.insert(
        "ca.crt".to_owned(),
        ByteString(peer.ca.cert_pem().as_bytes().to_vec()),
    );
    data.insert("tls.crt".to_owned(), tls_crt);
    data.insert("tls.key".to_owned(), tls_key);
    data.insert(
        "cluster-id".to_owned(),
        ByteString(format!("{}\n", peer.id).into_bytes()),
    );
    let mut secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": me.cluster.namespace,
            "labels": {
                PEER_LABEL: peer.name.as_str(),
                "app.kubernetes.io/managed-by": "clustermesh",
            },
        },
        "type": "Opaque",
    }))?;
    secret.data = Some(data.clone());
    let action = match existing {
        Some(old) if old.data.as_ref() == Some(&data) => "unchanged",
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version.clone();
            api.replace(&name, &PostParams::default(), &secret)
                .await
                .with_context(|| format!("context {}: update Secret {name}", me.cluster.context))?;
            "updated"
        }
        None => {
            api.create(&PostParams::default(), &secret)
                .await
                .with_context(|| format!("context {}: create Secret {name}", me.cluster.context))?;
            "created"
        }
    };
    write_grant(peer, me, std::slice::from_ref(&new_fp)).await?;
    Ok(Direction {
        cluster: me.name.to_string(),
        peer: peer.name.to_string(),
        secret: name,
        action,
        certificate,
        certificate_not_after_unix: not_after,
        endpoints: peer.endpoints.clone(),
    })
}

fn check_pair(a: &Side, b: &Side) -> Result<()> {
    if a.name == b.name {
        bail!(
            "contexts {} and {} are both cluster {:?}: every cluster in a mesh needs its own name",
            a.cluster.context,
            b.cluster.context,
            a.name.as_str()
        );
    }
    if a.id == b.id {
        bail!(
            "clusters {} (context {}) and {} (context {}) both have cluster ID {}: every cluster in a mesh needs its own ID",
            a.name,
            a.cluster.context,
            b.name,
            b.cluster.context,
            a.id
        );
    }
    for (me, other) in [(a, b), (b, a)] {
        for (peer, id) in &me.peers {
            if *id == Some(other.id.get()) && peer != other.name.as_str() {
                bail!(
                    "cluster {} already has peer {peer} with cluster ID {}; {} cannot join with the same ID",
                    me.name,
                    other.id,
                    other.name
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn connect(args: ConnectArgs) -> Result<std::process::ExitCode> {
    let a = side(Cluster::open(&args.kube, args.context.as_deref()).await?).await?;
    let b = side(Cluster::open(&args.kube, Some(&args.destination_context)).await?).await?;
    check_pair(&a, &b)?;
    let mut done = vec![write_direction(&a, &b).await?];
    if !args.one_way {
        done.push(write_direction(&b, &a).await?);
    }
    if !output::structured(args.output, &done)? {
        for d in &done {
            println!(
                "{} → {}: Secret {} {} (client certificate {}, valid until {}), endpoints {}",
                d.cluster,
                d.peer,
                d.secret,
                d.action,
                d.certificate,
                crate::format_unix(d.certificate_not_after_unix),
                d.endpoints.join(",")
            );
        }
    }
    if !args.wait {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut pending: Vec<(&Side, &Side)> = vec![(&a, &b)];
    if !args.one_way {
        pending.push((&b, &a));
    }
    let deadline = Instant::now() + args.timeout;
    // Per direction: the line last printed, and the same without its times (a line is printed
    // again only when that changes, not because "3s ago" became "4s ago").
    let mut shown: BTreeMap<String, (String, String)> = BTreeMap::new();
    loop {
        let mut all = true;
        for (me, peer) in &pending {
            let mut stable = None;
            let line = match me.cluster.status().await {
                Ok(s) if !model::status::status_is_current(s.updated_unix, output::now_unix()) => {
                    all = false;
                    stable = Some(format!("{}'s apiserver stopped reporting", me.name));
                    format!(
                        "{}'s apiserver stopped reporting (status last written {})",
                        me.name,
                        output::relative(s.updated_unix, output::now_unix())
                    )
                }
                Ok(s) => match s.peers.iter().find(|p| p.name == peer.name.as_str()) {
                    Some(p) if p.phase == Phase::Ready => "ready".to_owned(),
                    Some(p) => {
                        all = false;
                        match &p.last_error {
                            Some(e) => format!("{} (last error: {e})", p.phase),
                            None => p.phase.to_string(),
                        }
                    }
                    None => {
                        all = false;
                        "configuration not picked up yet".to_owned()
                    }
                },
                Err(e) => {
                    all = false;
                    crate::errors::render(&e)
                }
            };
            let key = format!("{} → {}", me.name, peer.name);
            let stable = stable.unwrap_or_else(|| line.clone());
            if shown.get(&key).map(|(_, s)| s) != Some(&stable) {
                eprintln!("{key}: {line}");
                shown.insert(key, (line, stable));
            }
        }
        if all {
            eprintln!("connected");
            return Ok(std::process::ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            bail!(
                "not connected after {}: {}",
                telemetry::duration::format(args.timeout),
                shown
                    .iter()
                    .map(|(k, (v, _))| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn delete_secret(cluster: &Cluster, name: &str) -> Result<&'static str> {
    match cluster
        .api::<Secret>()
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok("deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok("absent"),
        Err(e) => {
            Err(e).with_context(|| format!("context {}: delete Secret {name}", cluster.context))
        }
    }
}

/// Removes `cluster`'s side of the connection with `peer`: its import configuration of
/// `peer`, and the grant that lets `peer` import from it (the peer's certificate is refused
/// from then on). Returns what happened to each.
async fn remove_side(cluster: &Cluster, name: &str, peer: &str) -> Result<Removed> {
    let grant = grant_secret_name(peer);
    let grant_action = delete_secret(cluster, &grant).await?;
    let secret = peer_secret_name(peer);
    let secret_action = delete_secret(cluster, &secret).await?;
    Ok(Removed {
        cluster: name.to_owned(),
        peer: peer.to_owned(),
        secret,
        secret_action,
        grant,
        grant_action,
    })
}

pub(crate) async fn disconnect(args: DisconnectArgs) -> Result<std::process::ExitCode> {
    let a = Cluster::open(&args.kube, args.context.as_deref()).await?;
    let (a_name, _) = a.identity().await?;
    // The peer's name: from its own status when reachable; with --force, from the context.
    let b = if args.force {
        None
    } else {
        let b = Cluster::open(&args.kube, Some(&args.destination_context)).await?;
        let id = b.identity().await.with_context(|| {
            format!(
                "cannot reach {}; to remove only {}'s side, run with --force",
                args.destination_context, a.context
            )
        })?;
        Some((b, id.0))
    };
    let b_name = match &b {
        Some((_, n)) => n.to_string(),
        None => args.destination_context.clone(),
    };
    let table = args.output == Format::Table;
    let mut done = Vec::new();
    if let Some((b, _)) = &b {
        let removed = remove_side(b, &b_name, a_name.as_str()).await?;
        if table {
            println!("{}", removed.line());
        }
        done.push(removed);
    }
    let removed = remove_side(&a, a_name.as_str(), &b_name).await?;
    if table {
        println!("{}", removed.line());
    }
    done.push(removed);
    if args.force {
        eprintln!(
            "note: only {a_name}'s side was removed ({b_name} can no longer import from {a_name}); remove Secrets {} and {} from {b_name} when it is reachable",
            peer_secret_name(a_name.as_str()),
            grant_secret_name(a_name.as_str())
        );
    }
    if args.wait {
        let deadline = Instant::now() + args.timeout;
        loop {
            let s = a.status().await?;
            if !s.peers.iter().any(|p| p.name == b_name) {
                eprintln!("{a_name} drained {b_name}");
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{a_name} still lists {b_name} after {}",
                    telemetry::duration::format(args.timeout)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    output::structured(args.output, &done)?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn side(name: &str, id: u64) -> Side {
        let name = ClusterName::new(name).unwrap();
        Side {
            cluster: Cluster {
                context: name.to_string(),
                client: kube::Client::try_from(kube::Config::new(
                    "http://127.0.0.1:1".parse().unwrap(),
                ))
                .unwrap(),
                namespace: "kube-system".into(),
                request_timeout: None,
            },
            ca: Ca::generate(&name, Duration::from_secs(86_400 * 3650)).unwrap(),
            name,
            id: ClusterId::new(id).unwrap(),
            endpoints: vec!["10.0.0.1:4240".into()],
            peers: BTreeMap::new(),
        }
    }

    fn leaf(ca: &Ca, name: &ClusterName, id: u64, role: Role) -> certs::Leaf {
        ca.issue(&LeafSpec::new(MeshIdentity::new(
            name.clone(),
            ClusterId::new(id).unwrap(),
            role,
        )))
        .unwrap()
    }

    fn data(cert: &str, key: &str, ca: &str) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
            ("ca.crt".to_owned(), ByteString(ca.as_bytes().to_vec())),
        ])
    }

    #[tokio::test]
    async fn a_client_certificate_is_reused_only_when_it_is_still_right() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (east, west) = (side("east", 1), side("west", 2));
        // What a Secret in east holds: a leaf, and the CA certificate it was written with.
        let reuse = |l: &certs::Leaf, ca_pem: &str, peer: &Side| {
            reusable(&data(&l.cert_pem, &l.key_pem, ca_pem), &east, peer).is_some()
        };
        let good = leaf(&west.ca, &east.name, 1, Role::Peer);
        assert!(reuse(&good, west.ca.cert_pem(), &west));
        // Issued by another CA that claims the same name (a rotated or foreign CA).
        let impostor = side("west", 2);
        let forged = leaf(&impostor.ca, &east.name, 1, Role::Peer);
        assert!(!reuse(&forged, west.ca.cert_pem(), &west));
        // The peer's CA changed since.
        assert!(!reuse(&good, impostor.ca.cert_pem(), &impostor));
        // Wrong identity: another ID, another role.
        assert!(!reuse(
            &leaf(&west.ca, &east.name, 7, Role::Peer),
            west.ca.cert_pem(),
            &west
        ));
        assert!(!reuse(
            &leaf(&west.ca, &east.name, 1, Role::Admin),
            west.ca.cert_pem(),
            &west
        ));
        assert!(reusable(&data("garbage", "x", west.ca.cert_pem()), &east, &west).is_none());
        // Close to expiry.
        let short = west
            .ca
            .issue(
                &LeafSpec::new(MeshIdentity::new(east.name.clone(), east.id, Role::Peer))
                    .validity(time::OffsetDateTime::now_utc(), Duration::from_secs(86_400)),
            )
            .unwrap();
        assert!(!reuse(&short, west.ca.cert_pem(), &west));
    }

    #[tokio::test]
    async fn same_name_same_id_and_taken_ids_are_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (east, west) = (side("east", 1), side("west", 2));
        check_pair(&east, &west).unwrap();
        let e = check_pair(&east, &side("east", 3)).unwrap_err().to_string();
        assert!(e.contains("both cluster \"east\""), "{e}");
        let e = check_pair(&east, &side("north", 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("both have cluster ID 1"), "{e}");
        let mut east2 = side("east", 1);
        east2.peers.insert("west".into(), Some(2));
        let e = check_pair(&east2, &side("twin", 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already has peer west with cluster ID 2"), "{e}");
        // Reconnecting the same peer is fine.
        check_pair(&east2, &west).unwrap();
    }
}
