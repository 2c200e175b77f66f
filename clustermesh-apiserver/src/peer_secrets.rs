//! Peer Secrets → the peer directory the importer watches: one sub-directory per valid
//! Secret, switched atomically; a Secret that turns invalid keeps its peer's last good files,
//! only a deleted Secret removes them. Runs only while this replica leads. Must not write a
//! Kubernetes object.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::watcher;
use model::ClusterName;
use model::objects::{PEER_LABEL, PEER_SECRET_KEYS, peer_secret_name};
use telemetry::metrics::Registry;

use crate::labelled_secrets::{self, SecretSet, labelled_peer};
use crate::metrics as m;

/// Why a peer Secret is not a usable peer configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its label or name is wrong.
    #[error(transparent)]
    Peer(#[from] labelled_secrets::Error),
    /// A required key is missing.
    #[error("Secret {secret}: no {key:?} key")]
    MissingKey {
        /// The Secret.
        secret: String,
        /// The key.
        key: &'static str,
    },
    /// It holds a key no peer configuration has.
    #[error("Secret {secret}: unknown key {key:?}")]
    UnknownKey {
        /// The Secret.
        secret: String,
        /// The key.
        key: String,
    },
    /// It names no endpoint.
    #[error("Secret {secret}: \"endpoints\" is empty")]
    NoEndpoints {
        /// The Secret.
        secret: String,
    },
}

/// A peer configuration as found in a Secret: file name → contents.
type Files = BTreeMap<String, Vec<u8>>;

/// Checks one peer Secret; returns the peer's name and the files of its directory.
pub fn peer_files(secret: &Secret, own: &ClusterName) -> Result<(ClusterName, Files), Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let peer = labelled_peer(secret, PEER_LABEL, peer_secret_name, own, "peer Secret")?;
    let data = secret.data.clone().unwrap_or_default();
    let mut files = Files::new();
    for key in PEER_SECRET_KEYS {
        match data.get(key) {
            Some(v) => {
                files.insert(key.to_owned(), v.0.clone());
            }
            None if key == "cluster-id" => {}
            None => {
                return Err(Error::MissingKey { secret: name, key });
            }
        }
    }
    if let Some(unknown) = data
        .keys()
        .find(|k| !PEER_SECRET_KEYS.contains(&k.as_str()))
    {
        return Err(Error::UnknownKey {
            secret: name,
            key: unknown.clone(),
        });
    }
    let endpoints = String::from_utf8_lossy(&files["endpoints"]).to_string();
    if endpoints.split_whitespace().next().is_none() {
        return Err(Error::NoEndpoints { secret: name });
    }
    Ok((peer, files))
}

fn same_files(dir: &Path, files: &Files) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let present: BTreeSet<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    present.len() == files.len()
        && files
            .iter()
            .all(|(f, v)| std::fs::read(dir.join(f)).ok().as_ref() == Some(v))
}

/// Removes the versioned directories of `peer` except `keep`.
fn remove_versions(dir: &Path, peer: &str, keep: Option<&str>) {
    let prefix = format!(".v-{peer}-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && Some(name.as_str()) != keep {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Writes `files` as the configuration of `peer`: into a fresh versioned directory, then
/// `<dir>/<peer>` is switched to it with one atomic rename of a symlink, so that a reader of
/// the directory never sees the peer missing or half written.
fn write_peer(dir: &Path, peer: &ClusterName, files: &Files) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let target = dir.join(peer.as_str());
    if same_files(&target, files) {
        return Ok(false);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let version = format!(".v-{peer}-{nanos}");
    let staging = dir.join(&version);
    std::fs::create_dir_all(&staging)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))?;
    for (f, v) in files {
        let path = staging.join(f);
        std::fs::write(&path, v)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let link = dir.join(format!(".link-{peer}"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&version, &link)?;
    let is_real_dir = std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
    if is_real_dir {
        // Written by an earlier version as a plain directory: replaced once, not atomically.
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&link, &target)?;
    remove_versions(dir, peer.as_str(), Some(&version));
    Ok(true)
}

/// Makes `dir` hold one sub-directory per valid Secret of `secrets`. A Secret that turns
/// invalid keeps its peer's last good files; only a deleted Secret removes them.
pub fn sync_dir(
    dir: &Path,
    secrets: &[Secret],
    own: &ClusterName,
    reported: &mut BTreeMap<String, String>,
    metrics: &Registry,
) {
    let mut keep = BTreeSet::new();
    for s in secrets {
        let secret_name = s.metadata.name.clone().unwrap_or_default();
        match peer_files(s, own) {
            Ok((peer, files)) => {
                reported.remove(&secret_name);
                keep.insert(peer.to_string());
                match write_peer(dir, &peer, &files) {
                    Ok(true) => {
                        tracing::info!(peer = %peer, secret = %secret_name, "peer configuration written")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        metrics.inc(m::ERRORS, &["peer-config"]);
                        tracing::warn!(peer = %peer, error = %e, "could not write the peer configuration");
                    }
                }
            }
            Err(e) => {
                let e = telemetry::chain(&e).to_string();
                // Keep what the previous, valid version of this Secret configured.
                if let Some(peer) = s.metadata.labels.as_ref().and_then(|l| l.get(PEER_LABEL)) {
                    keep.insert(peer.clone());
                }
                if reported.get(&secret_name) != Some(&e) {
                    metrics.inc(m::ERRORS, &["peer-config"]);
                    tracing::warn!(error = %e, "invalid peer Secret; ignored (the peer's last valid configuration stays)");
                    reported.insert(secret_name, e);
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || keep.contains(&name) || !e.path().is_dir() {
                continue;
            }
            tracing::info!(peer = %name, "peer Secret deleted; removing its configuration");
            let path = e.path();
            let removed = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(&path),
                _ => std::fs::remove_dir_all(&path),
            };
            match removed {
                Ok(()) => remove_versions(dir, &name, None),
                Err(err) => {
                    tracing::warn!(peer = %name, error = %err, "could not remove the peer configuration")
                }
            }
        }
    }
}

/// Follows the peer Secrets of `api`'s namespace and keeps `dir` equal to them. Runs until
/// dropped; the importer notices changes of `dir`.
pub async fn follow_peer_secrets(
    api: Api<Secret>,
    dir: PathBuf,
    own: ClusterName,
    metrics: Registry,
    rescan_now: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut secrets = SecretSet::default();
    let mut reported = BTreeMap::new();
    let stream = watcher(api, watcher::Config::default().labels(PEER_LABEL));
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let changed = match event {
            Ok(ev) => secrets.apply(ev),
            Err(e) => {
                metrics.inc(m::ERRORS, &["peer-secrets"]);
                tracing::warn!(error = %e, "watching peer Secrets; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        };
        if changed {
            let list: Vec<Secret> = secrets.current().values().cloned().collect();
            sync_dir(&dir, &list, &own, &mut reported, &metrics);
            rescan_now.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secret(name: &str, peer: &str, data: &[(&str, &str)]) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {PEER_LABEL: peer}},
            "data": data.iter().map(|(k, v)| {
                use base64::Engine;
                (k.to_string(), serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(v)))
            }).collect::<serde_json::Map<_, _>>(),
        }))
        .unwrap()
    }

    const GOOD: [(&str, &str); 4] = [
        ("endpoints", "10.0.0.1:4240\n"),
        ("ca.crt", "CA"),
        ("tls.crt", "CRT"),
        ("tls.key", "KEY"),
    ];

    #[test]
    fn secrets_become_directories_and_bad_ones_keep_the_last_good_files() {
        let own = ClusterName::new("east").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::registry();
        let mut reported = BTreeMap::new();
        let good = secret("clustermesh-peer-west", "west", &GOOD);
        sync_dir(
            dir.path(),
            std::slice::from_ref(&good),
            &own,
            &mut reported,
            &metrics,
        );
        let west = dir.path().join("west");
        assert_eq!(
            std::fs::read_to_string(west.join("tls.key")).unwrap(),
            "KEY"
        );
        assert!(!west.join("cluster-id").exists());

        // Broken: missing key, wrong name, own cluster, empty endpoints, unknown key.
        let broken = [
            secret("clustermesh-peer-west", "west", &GOOD[..3]),
            secret("west-config", "west", &GOOD),
            secret("clustermesh-peer-east", "east", &GOOD),
            secret(
                "clustermesh-peer-west",
                "west",
                &[("endpoints", " \n"), GOOD[1], GOOD[2], GOOD[3]],
            ),
            secret(
                "clustermesh-peer-west",
                "west",
                &[GOOD[0], GOOD[1], GOOD[2], GOOD[3], ("password", "x")],
            ),
            secret("clustermesh-peer-West", "West", &GOOD),
        ];
        for b in &broken {
            let e = peer_files(b, &own).unwrap_err().to_string();
            assert!(e.starts_with("Secret "), "{e}");
            // A broken version of west's Secret replaces it; other broken Secrets sit beside it.
            let list = if b.metadata.name == good.metadata.name {
                vec![b.clone()]
            } else {
                vec![good.clone(), b.clone()]
            };
            sync_dir(dir.path(), &list, &own, &mut reported, &metrics);
            assert_eq!(
                std::fs::read_to_string(west.join("tls.key")).unwrap(),
                "KEY",
                "{e}"
            );
        }
        assert!(!dir.path().join("east").exists());

        // A change is written; an unchanged Secret is not rewritten; deletion removes.
        let changed = secret(
            "clustermesh-peer-west",
            "west",
            &[
                GOOD[0],
                GOOD[1],
                GOOD[2],
                ("tls.key", "KEY2"),
                ("cluster-id", "2"),
            ],
        );
        sync_dir(
            dir.path(),
            std::slice::from_ref(&changed),
            &own,
            &mut reported,
            &metrics,
        );
        assert_eq!(
            std::fs::read_to_string(west.join("tls.key")).unwrap(),
            "KEY2"
        );
        assert_eq!(
            std::fs::read_to_string(west.join("cluster-id")).unwrap(),
            "2"
        );
        let before = std::fs::metadata(west.join("tls.key"))
            .unwrap()
            .modified()
            .unwrap();
        sync_dir(dir.path(), &[changed], &own, &mut reported, &metrics);
        assert_eq!(
            std::fs::metadata(west.join("tls.key"))
                .unwrap()
                .modified()
                .unwrap(),
            before
        );
        sync_dir(dir.path(), &[], &own, &mut reported, &metrics);
        assert!(!west.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
