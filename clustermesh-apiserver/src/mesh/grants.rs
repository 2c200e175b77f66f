//! Who may import this cluster's exports: one grant per peer cluster.
//!
//! A peer certificate signed by this cluster's CA is not enough to use the Mesh API: the peer
//! must also hold a grant, written by `clustermesh connect` into *this* cluster (Secret
//! `clustermesh-grant-<peer>`, or a directory `<grants-dir>/<peer>/` with the same keys) that
//! names its cluster ID and the SHA-256 fingerprint of the very certificate issued to it.
//! `clustermesh disconnect` deletes the grant: from then on the certificate is refused, and
//! streams already open with it are ended (the server re-checks every open peer stream when
//! the grants change). A certificate minted for a cluster that was never connected has no
//! grant and is refused.
//!
//! Failed reads never revoke: a grant directory that cannot be listed or a Secret watch that
//! breaks keeps the last good grants (and says so); only a deleted grant revokes. Until the
//! first complete read, every peer is refused.
//!
//! Must not decide what a granted peer may see: that is the server's `View::Peer`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certs::MeshIdentity;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::watcher;
use model::objects::{GRANT_LABEL, GRANT_SECRET_KEYS, grant_secret_name};
use model::{ClusterId, ClusterName};
use telemetry::metrics::Registry;
use tokio::sync::watch;

use crate::metrics as m;

/// One peer's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The cluster ID the peer must present.
    pub cluster_id: ClusterId,
    /// Fingerprints (`certs::fingerprint`) of the client certificates it may use.
    pub sha256: BTreeSet<String>,
}

/// Every grant, by peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(pub BTreeMap<ClusterName, Grant>);

/// The current grants; `None` until they were read completely once.
pub type Receiver = watch::Receiver<Option<Arc<Grants>>>;

/// Why a peer certificate is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No grant names the certificate's cluster.
    #[error(
        "cluster {cluster} is not a connected peer (no grant; `clustermesh connect` creates one, `disconnect` removes it)"
    )]
    NoGrant {
        /// The cluster the certificate names.
        cluster: ClusterName,
    },
    /// The certificate's cluster ID is not the granted one.
    #[error("peer {cluster} presents cluster ID {presented}, its grant says {granted}")]
    ClusterId {
        /// The cluster.
        cluster: ClusterName,
        /// The ID its certificate names.
        presented: ClusterId,
        /// The ID its grant names.
        granted: ClusterId,
    },
    /// The certificate is not one the grant lists.
    #[error(
        "peer {cluster}'s certificate (sha256 {fingerprint}) is not the one issued to it by `clustermesh connect` (superseded or revoked)"
    )]
    Certificate {
        /// The cluster.
        cluster: ClusterName,
        /// The certificate's fingerprint.
        fingerprint: String,
    },
}

/// Why a grant (a Secret or a directory) is invalid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `cluster-id` is not a cluster ID.
    #[error("grant for {peer}: cluster-id {value:?}")]
    ClusterId {
        /// The peer.
        peer: ClusterName,
        /// What it says.
        value: String,
        /// Why.
        source: model::cluster::Error,
    },
    /// A line of `sha256` is not a fingerprint.
    #[error(
        "grant for {peer}: sha256 {value:?} is not a SHA-256 fingerprint (32 hex pairs separated by ':')"
    )]
    Fingerprint {
        /// The peer.
        peer: ClusterName,
        /// The line.
        value: String,
    },
    /// `sha256` lists no fingerprint.
    #[error("grant for {peer}: no certificate fingerprint")]
    NoFingerprint {
        /// The peer.
        peer: ClusterName,
    },
    /// The Secret's label or name is wrong.
    #[error(transparent)]
    Labelled(#[from] crate::labelled_secrets::Error),
    /// The Secret holds a key no grant has.
    #[error("Secret {secret}: unknown key {key:?}")]
    UnknownKey {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// The Secret lacks a key.
    #[error("Secret {secret}: no {key:?} key")]
    MissingKey {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// The grant in a Secret is invalid.
    #[error("Secret {secret}")]
    InSecret {
        /// The Secret.
        secret: String,
        /// Why.
        source: Box<Error>,
    },
    /// A directory's name is not a cluster name.
    #[error("{}", .path.display())]
    Name {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: model::cluster::Error,
    },
    /// A file could not be read.
    #[error("{}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Grants {
    /// Whether the holder of a peer certificate with `id` and `fingerprint` may import.
    pub fn admits(&self, id: &MeshIdentity, fingerprint: &str) -> Result<(), Refused> {
        let Some(g) = self.0.get(&id.cluster) else {
            return Err(Refused::NoGrant {
                cluster: id.cluster.clone(),
            });
        };
        if g.cluster_id != id.cluster_id {
            return Err(Refused::ClusterId {
                cluster: id.cluster.clone(),
                presented: id.cluster_id,
                granted: g.cluster_id,
            });
        }
        if !g.sha256.contains(fingerprint) {
            return Err(Refused::Certificate {
                cluster: id.cluster.clone(),
                fingerprint: fingerprint.to_owned(),
            });
        }
        Ok(())
    }
}

/// Parses a grant from its two values.
pub fn parse(peer: &ClusterName, cluster_id: &[u8], sha256: &[u8]) -> Result<Grant, Error> {
    let id_text = String::from_utf8_lossy(cluster_id);
    let cluster_id = id_text
        .trim()
        .parse::<ClusterId>()
        .map_err(|source| Error::ClusterId {
            peer: peer.clone(),
            value: id_text.trim().to_owned(),
            source,
        })?;
    let mut set = BTreeSet::new();
    for line in String::from_utf8_lossy(sha256).lines() {
        let fp = line.trim().to_ascii_lowercase();
        if fp.is_empty() {
            continue;
        }
        let hex_pairs = fp.split(':').collect::<Vec<_>>();
        if hex_pairs.len() != 32
            || !hex_pairs
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(Error::Fingerprint {
                peer: peer.clone(),
                value: fp,
            });
        }
        set.insert(fp);
    }
    if set.is_empty() {
        return Err(Error::NoFingerprint { peer: peer.clone() });
    }
    Ok(Grant {
        cluster_id,
        sha256: set,
    })
}

/// Checks one grant Secret; returns the peer and its grant.
pub fn from_secret(secret: &Secret, own: &ClusterName) -> Result<(ClusterName, Grant), Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let peer = crate::labelled_secrets::labelled_peer(
        secret,
        GRANT_LABEL,
        grant_secret_name,
        own,
        "grant",
    )?;
    let data = secret.data.clone().unwrap_or_default();
    if let Some(unknown) = data
        .keys()
        .find(|k| !GRANT_SECRET_KEYS.contains(&k.as_str()))
    {
        return Err(Error::UnknownKey {
            secret: name,
            key: unknown.clone(),
        });
    }
    let get = |k: &str| {
        data.get(k)
            .map(|v| v.0.clone())
            .ok_or_else(|| Error::MissingKey {
                secret: name.clone(),
                key: k.to_owned(),
            })
    };
    let grant =
        parse(&peer, &get("cluster-id")?, &get("sha256")?).map_err(|e| Error::InSecret {
            secret: name.clone(),
            source: Box::new(e),
        })?;
    Ok((peer, grant))
}

/// Reads `dir` (one sub-directory per peer with files `cluster-id` and `sha256`). `None` when
/// the directory itself cannot be listed; per-peer problems are returned beside the grants,
/// with the peer, so that the caller can keep that peer's previous grant.
pub fn load_dir(dir: &Path) -> Option<(Grants, Vec<(String, String)>)> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut grants = Grants::default();
    let mut problems = Vec::new();
    for e in entries {
        let Ok(e) = e else {
            return None;
        };
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        let read = |f: &str| {
            std::fs::read(path.join(f)).map_err(|source| Error::Read {
                path: path.join(f),
                source,
            })
        };
        let parsed = ClusterName::new(name.clone())
            .map_err(|source| Error::Name {
                path: path.clone(),
                source,
            })
            .and_then(|peer| {
                let g = parse(&peer, &read("cluster-id")?, &read("sha256")?)?;
                Ok((peer, g))
            });
        match parsed {
            Ok((peer, g)) => {
                grants.0.insert(peer, g);
            }
            Err(err) => problems.push((name, telemetry::chain(&err).to_string())),
        }
    }
    Some((grants, problems))
}

/// Publishes `next` unless equal to the current grants; logs what changed.
fn publish(tx: &watch::Sender<Option<Arc<Grants>>>, next: Grants) {
    tx.send_if_modified(|cur| {
        if cur.as_deref() == Some(&next) {
            return false;
        }
        let before: BTreeSet<&ClusterName> = cur.as_ref().map(|g| g.0.keys().collect()).unwrap_or_default();
        for peer in next.0.keys().filter(|p| !before.contains(p)) {
            tracing::info!(peer = %peer, "peer granted access to the Mesh API");
        }
        for peer in before.iter().filter(|p| !next.0.contains_key(**p)) {
            tracing::info!(peer = %peer, "peer's grant removed; its certificate is refused from now on");
        }
        *cur = Some(Arc::new(next.clone()));
        true
    });
}

/// Keeps `tx` equal to the grants in `dir`, rescanning every `rescan`.
pub async fn follow_dir(
    dir: PathBuf,
    tx: watch::Sender<Option<Arc<Grants>>>,
    rescan: Duration,
    metrics: Registry,
) {
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    let mut listing_failed = false;
    loop {
        match load_dir(&dir) {
            Some((mut grants, problems)) => {
                listing_failed = false;
                let current = tx.borrow().clone();
                for (peer, e) in &problems {
                    // Keep what the previous, valid version granted.
                    if let (Ok(name), Some(cur)) = (ClusterName::new(peer.clone()), &current)
                        && let Some(old) = cur.0.get(&name)
                    {
                        grants.0.insert(name, old.clone());
                    }
                    if reported.get(peer) != Some(e) {
                        metrics.inc(m::ERRORS, &["grant"]);
                        tracing::warn!(peer = %peer, error = %e, "invalid grant; the peer's last valid grant stays");
                        reported.insert(peer.clone(), e.clone());
                    }
                }
                reported.retain(|p, _| problems.iter().any(|(q, _)| q == p));
                publish(&tx, grants);
            }
            None => {
                if !listing_failed {
                    metrics.inc(m::ERRORS, &["grant"]);
                    tracing::warn!(dir = %dir.display(), "cannot list the grants directory; keeping the last good grants");
                    listing_failed = true;
                }
            }
        }
        tokio::time::sleep(rescan).await;
    }
}

/// Keeps `tx` equal to the grant Secrets of `api`'s namespace. Runs on every replica (each one
/// serves the Mesh API). A broken watch keeps the last grants; a deleted Secret revokes.
pub async fn follow_secrets(
    api: Api<Secret>,
    own: ClusterName,
    tx: watch::Sender<Option<Arc<Grants>>>,
    metrics: Registry,
) {
    let mut set = crate::labelled_secrets::SecretSet::default();
    let mut good: BTreeMap<String, (ClusterName, Grant)> = BTreeMap::new();
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    let stream = watcher(api, watcher::Config::default().labels(GRANT_LABEL));
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let changed = match event {
            Ok(ev) => set.apply(ev),
            Err(e) => {
                metrics.inc(m::ERRORS, &["grant-secrets"]);
                tracing::warn!(error = %e, "watching grant Secrets; retrying (the last grants stay)");
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        };
        if !changed {
            continue;
        }
        let secrets = set.current();
        good.retain(|name, _| secrets.contains_key(name));
        for (name, s) in secrets {
            match from_secret(s, &own) {
                Ok(g) => {
                    reported.remove(name);
                    good.insert(name.clone(), g);
                }
                Err(e) => {
                    let e = telemetry::chain(&e).to_string();
                    if reported.get(name) != Some(&e) {
                        metrics.inc(m::ERRORS, &["grant"]);
                        tracing::warn!(secret = %name, error = %e, "invalid grant Secret; the peer's last valid grant stays");
                        reported.insert(name.clone(), e);
                    }
                }
            }
        }
        publish(&tx, Grants(good.values().cloned().collect()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use certs::Role;

    fn fp(b: u8) -> String {
        vec![format!("{b:02x}"); 32].join(":")
    }

    #[test]
    fn only_the_granted_certificate_of_the_granted_id_is_admitted() {
        let west = ClusterName::new("west").unwrap();
        let g = parse(&west, b"2\n", format!("{}\n{}\n", fp(1), fp(2)).as_bytes()).unwrap();
        let grants = Grants([(west.clone(), g)].into());
        let id = |c: &str, n| {
            MeshIdentity::new(
                ClusterName::new(c).unwrap(),
                ClusterId::new(n).unwrap(),
                Role::Peer,
            )
        };
        assert!(grants.admits(&id("west", 2), &fp(1)).is_ok());
        assert!(grants.admits(&id("west", 2), &fp(2)).is_ok());
        assert!(
            grants
                .admits(&id("west", 2), &fp(3))
                .unwrap_err()
                .to_string()
                .contains("not the one issued")
        );
        assert!(
            grants
                .admits(&id("west", 9), &fp(1))
                .unwrap_err()
                .to_string()
                .contains("cluster ID")
        );
        assert!(
            grants
                .admits(&id("south", 9), &fp(1))
                .unwrap_err()
                .to_string()
                .contains("not a connected peer")
        );
    }

    #[test]
    fn malformed_grants_are_refused_with_the_reason() {
        let west = ClusterName::new("west").unwrap();
        assert!(
            parse(&west, b"01x", fp(1).as_bytes())
                .unwrap_err()
                .to_string()
                .contains("cluster-id")
        );
        assert!(
            parse(&west, b"2", b"")
                .unwrap_err()
                .to_string()
                .contains("no certificate")
        );
        assert!(
            parse(&west, b"2", b"zz:00")
                .unwrap_err()
                .to_string()
                .contains("SHA-256")
        );
    }

    #[test]
    fn a_directory_that_cannot_be_listed_is_not_an_empty_grant_set() {
        let root = tempfile::tempdir().unwrap();
        assert!(load_dir(&root.path().join("missing")).is_none());
        let d = root.path().join("west");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("cluster-id"), "2").unwrap();
        std::fs::write(d.join("sha256"), fp(7)).unwrap();
        let bad = root.path().join("north");
        std::fs::create_dir(&bad).unwrap();
        std::fs::write(bad.join("cluster-id"), "3").unwrap();
        let (grants, problems) = load_dir(root.path()).unwrap();
        assert_eq!(grants.0.len(), 1);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "north");
    }
}
