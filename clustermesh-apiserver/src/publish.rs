//! The apiserver's conversation with its own Kubernetes API beyond exporting: it keeps its
//! status in a ConfigMap (so `clustermesh status` needs nothing but a kubeconfig) and turns
//! the peer Secrets `clustermesh connect` writes into the peer directory the importer reads.
//! Both run only while this replica leads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use model::ClusterName;
use model::status::{
    ClusterStatus, PEER_LABEL, PEER_SECRET_KEYS, STATUS_CONFIGMAP, STATUS_HEARTBEAT_SECS,
    STATUS_KEY, peer_secret_name,
};
use telemetry::metrics::Registry;

use crate::metrics as m;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds between writes of a status whose only changes are counts and revisions.
const COUNTS_EVERY_SECS: i64 = 2;

/// `s` without what changes with every exported or imported object.
fn significant(s: &ClusterStatus) -> ClusterStatus {
    let mut s = s.clone();
    s.exported.clear();
    for p in &mut s.peers {
        p.objects.clear();
        p.revision = 0;
    }
    if let Some(a) = &mut s.node_agents {
        a.checked_unix = 0;
    }
    s
}

/// Writes `status()` into the status ConfigMap when its phase, readiness or errors change
/// (checked every `interval`), when only counts changed at most every 2 s, and at least every
/// [`STATUS_HEARTBEAT_SECS`] seconds. Runs until dropped.
pub async fn publish_status(
    api: Api<ConfigMap>,
    status: impl Fn() -> ClusterStatus,
    interval: Duration,
    metrics: Registry,
) {
    let mut last: Option<(ClusterStatus, i64)> = None;
    loop {
        let mut current = status();
        let now = now_unix();
        // A change of phase, readiness or error is written at once; counts and revisions move
        // with every change under churn, so a change of those alone waits COUNTS_EVERY_SECS.
        let due = match &last {
            Some((s, at)) => {
                significant(s) != significant(&current)
                    || (*s != current && now - at >= COUNTS_EVERY_SECS)
                    || now - at >= STATUS_HEARTBEAT_SECS
            }
            None => true,
        };
        if due {
            current.updated_unix = now;
            match write_status(&api, &current).await {
                Ok(()) => {
                    current.updated_unix = 0;
                    last = Some((current, now));
                }
                Err(e) => {
                    metrics.inc(m::ERRORS, &["status-configmap"]);
                    tracing::warn!(error = %e, "could not write the status ConfigMap");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn write_status(api: &Api<ConfigMap>, s: &ClusterStatus) -> Result<(), String> {
    let json = serde_json::to_string_pretty(s).map_err(|e| e.to_string())?;
    let patch = serde_json::json!({ "data": { STATUS_KEY: json } });
    match api
        .patch(
            STATUS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": STATUS_CONFIGMAP,
                    "labels": { "app.kubernetes.io/name": "clustermesh-apiserver" },
                },
                "data": { STATUS_KEY: json },
            }))
            .map_err(|e| e.to_string())?;
            api.create(&PostParams::default(), &cm)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A peer configuration as found in a Secret: file name → contents.
type Files = BTreeMap<String, Vec<u8>>;

/// The peer a labelled mesh Secret (a peer configuration or a grant) is about, checked: its
/// `label` names a valid cluster, the Secret is named `name_of(peer)`, and the peer is not
/// this cluster. `what` says what kind of Secret it is, for the errors.
pub fn labelled_peer(
    secret: &Secret,
    label: &str,
    name_of: fn(&str) -> String,
    own: &ClusterName,
    what: &str,
) -> Result<ClusterName, String> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let value = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(label))
        .cloned()
        .unwrap_or_default();
    let peer = ClusterName::new(value.clone())
        .map_err(|e| format!("Secret {name}: label {label}={value:?}: {e}"))?;
    if name != name_of(peer.as_str()) {
        return Err(format!(
            "Secret {name}: a {what} for {peer} must be named {}",
            name_of(peer.as_str())
        ));
    }
    if &peer == own {
        return Err(format!(
            "Secret {name}: a {what} for this cluster ({own}) itself"
        ));
    }
    Ok(peer)
}

/// Checks one peer Secret; returns the peer's name and the files of its directory.
pub fn peer_files(secret: &Secret, own: &ClusterName) -> Result<(ClusterName, Files), String> {
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
            None => return Err(format!("Secret {name}: no {key:?} key")),
        }
    }
    if let Some(unknown) = data
        .keys()
        .find(|k| !PEER_SECRET_KEYS.contains(&k.as_str()))
    {
        return Err(format!("Secret {name}: unknown key {unknown:?}"));
    }
    let endpoints = String::from_utf8_lossy(&files["endpoints"]).to_string();
    if endpoints.split_whitespace().next().is_none() {
        return Err(format!("Secret {name}: \"endpoints\" is empty"));
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

/// The Secrets of one label as a kube watcher reports them: a (re)listing is buffered and
/// swapped in whole at its end, so a relist never looks like deletions; later events apply one
/// by one. Shared by the peer Secret and the grant Secret followers.
#[derive(Debug, Default)]
pub struct SecretSet {
    current: BTreeMap<String, Secret>,
    initial: BTreeMap<String, Secret>,
    listed: bool,
}

impl SecretSet {
    /// Applies one event; true when the set changed and has been listed completely once.
    pub fn apply(&mut self, event: watcher::Event<Secret>) -> bool {
        let name = |s: &Secret| s.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Apply(s) => {
                self.current.insert(name(&s), s);
            }
            watcher::Event::Delete(s) => {
                self.current.remove(&name(&s));
            }
            watcher::Event::Init => {
                self.initial.clear();
                return false;
            }
            watcher::Event::InitApply(s) => {
                self.initial.insert(name(&s), s);
                return false;
            }
            watcher::Event::InitDone => {
                self.current = std::mem::take(&mut self.initial);
                self.listed = true;
            }
        }
        self.listed
    }

    /// The Secrets, by name.
    pub fn current(&self) -> &BTreeMap<String, Secret> {
        &self.current
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

    #[test]
    fn counts_alone_are_not_a_significant_change() {
        let status: ClusterStatus = serde_json::from_value(serde_json::json!({
            "cluster": "east", "cluster_id": 1, "replica": "r", "leader": true, "ready": true,
            "reason": null, "exported": {"endpoints": 3},
            "peers": [{"name": "west", "cluster_id": 2, "phase": "ready", "since_unix": 1,
                "last_error": null, "last_error_unix": null, "objects": {"endpoints": 5},
                "revision": 7, "peer_cert_not_after_unix": null, "endpoint": null}],
        }))
        .unwrap();
        let mut counts = status.clone();
        counts.exported.insert("endpoints".into(), 4);
        counts.peers[0].objects.insert("endpoints".into(), 6);
        counts.peers[0].revision = 8;
        assert_ne!(counts, status);
        assert_eq!(significant(&counts), significant(&status));
        let mut phase = status.clone();
        phase.peers[0].phase = model::status::Phase::Stale;
        assert_ne!(significant(&phase), significant(&status));
        let mut error = status.clone();
        error.peers[0].last_error = Some("x".into());
        assert_ne!(significant(&error), significant(&status));
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
            let e = peer_files(b, &own).unwrap_err();
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
