//! Secrets of one label, as the apiserver follows them: the peer Secrets `clustermesh connect`
//! writes and the grant Secrets. [`SecretSet`] keeps what a kube watcher reports (a relist is
//! never a deletion); [`labelled_peer`] checks which peer a Secret is about. Must not write
//! any Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use model::ClusterName;

/// Why a labelled Secret is not about a valid peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its label does not name a valid cluster.
    #[error("Secret {secret}: label {label}={value:?}")]
    Label {
        /// The Secret.
        secret: String,
        /// The label.
        label: String,
        /// Its value.
        value: String,
        /// Why it is not a cluster name.
        source: model::cluster::Error,
    },
    /// It is not named after its peer.
    #[error("Secret {secret}: a {what} for {peer} must be named {want}")]
    Name {
        /// The Secret.
        secret: String,
        /// What kind of Secret it is.
        what: String,
        /// The peer its label names.
        peer: ClusterName,
        /// The name it must have.
        want: String,
    },
    /// It is about this cluster itself.
    #[error("Secret {secret}: a {what} for this cluster ({own}) itself")]
    Own {
        /// The Secret.
        secret: String,
        /// What kind of Secret it is.
        what: String,
        /// This cluster.
        own: ClusterName,
    },
}

/// The peer a labelled mesh Secret (a peer configuration or a grant) is about, checked: its
/// `label` names a valid cluster, the Secret is named `name_of(peer)`, and the peer is not
/// this cluster. `what` says what kind of Secret it is, for the errors.
pub fn labelled_peer(
    secret: &Secret,
    label: &str,
    name_of: fn(&str) -> String,
    own: &ClusterName,
    what: &str,
) -> Result<ClusterName, Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let value = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(label))
        .cloned()
        .unwrap_or_default();
    let peer = ClusterName::new(value.clone()).map_err(|source| Error::Label {
        secret: name.clone(),
        label: label.to_owned(),
        value,
        source,
    })?;
    if name != name_of(peer.as_str()) {
        return Err(Error::Name {
            secret: name,
            what: what.to_owned(),
            want: name_of(peer.as_str()),
            peer,
        });
    }
    if &peer == own {
        return Err(Error::Own {
            secret: name,
            what: what.to_owned(),
            own: own.clone(),
        });
    }
    Ok(peer)
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
