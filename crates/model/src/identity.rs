//! Security identities: a numeric ID that encodes the owning cluster, and a canonical label set.
//!
//! # Encoding
//!
//! A [`NumericIdentity`] is a `u32`:
//!
//! ```text
//!  31      28 27                    16 15                              0
//! +----------+------------------------+---------------------------------+
//! | 0000     | cluster ID (12 bits)   | local identity (16 bits)        |
//! +----------+------------------------+---------------------------------+
//! ```
//!
//! * cluster ID `0` is the reserved space: identities that mean the same thing in every
//!   cluster (`host`, `world`, ...), with local part `1..=255`;
//! * cluster ID `1..=4095` is that cluster's space, with local part `1..=65535`: every cluster
//!   keeps 65,535 identities however many clusters (up to 4,095) are connected;
//! * the top four bits are zero; they are kept for future scopes (for example node-local CIDR
//!   identities) and an identity with any of them set is refused.
//!
//! Must not allocate IDs (that is the store's job) nor know about pods.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterId;

/// Why an identity or label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Identity 0 is never valid.
    #[error("identity 0 is not a valid identity")]
    Zero,
    /// One of the four reserved top bits is set.
    #[error("identity {id:#x} sets reserved high bits")]
    HighBits {
        /// The refused identity.
        id: u32,
    },
    /// A reserved-space identity outside the defined reserved range.
    #[error("identity {id} is in the reserved space but above {max}", max = NumericIdentity::MAX_RESERVED)]
    ReservedOutOfRange {
        /// The refused identity.
        id: u32,
    },
    /// A cluster-scoped identity with local part 0.
    #[error("identity {id:#x} of cluster {cluster} has local part 0")]
    LocalZero {
        /// The refused identity.
        id: u32,
        /// Its cluster ID bits.
        cluster: u16,
    },
    /// A label's source is empty or not `[a-z0-9-]+`.
    #[error("label source {source_name:?} must be non-empty lowercase letters, digits or '-'")]
    LabelSource {
        /// The refused source.
        source_name: String,
    },
    /// A label key is empty or holds a forbidden character.
    #[error(
        "label key {key:?} must be non-empty and hold no whitespace, control characters, '=' or ';'"
    )]
    LabelKey {
        /// The refused key.
        key: String,
    },
    /// A label value holds a forbidden character.
    #[error(
        "label value {value:?} of key {key:?} must hold no whitespace, control characters or ';'"
    )]
    LabelValue {
        /// The key it belongs to.
        key: String,
        /// The refused value.
        value: String,
    },
    /// Canonical text names one (source, key) twice.
    #[error("label {source_name}:{key} is given twice")]
    DuplicateLabel {
        /// Its source.
        source_name: String,
        /// Its key.
        key: String,
    },
    /// The canonical text form could not be parsed.
    #[error("label {text:?} is not of the form source:key=value")]
    LabelSyntax {
        /// The refused text.
        text: String,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A numeric security identity; see the module docs for the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct NumericIdentity(u32);

impl NumericIdentity {
    /// The host the workload runs on.
    pub const HOST: Self = Self(1);
    /// Anything outside the mesh.
    pub const WORLD: Self = Self(2);
    /// A workload not managed by the mesh.
    pub const UNMANAGED: Self = Self(3);
    /// Health-check endpoints.
    pub const HEALTH: Self = Self(4);
    /// An endpoint whose identity is not resolved yet.
    pub const INIT: Self = Self(5);
    /// Another node of the mesh.
    pub const REMOTE_NODE: Self = Self(6);
    /// The Kubernetes API server.
    pub const KUBE_APISERVER: Self = Self(7);

    /// The largest identity of the reserved space.
    pub const MAX_RESERVED: u32 = 255;
    /// The smallest local part of a cluster-scoped identity.
    pub const MIN_LOCAL: u16 = 1;
    /// The largest local part of a cluster-scoped identity.
    pub const MAX_LOCAL: u16 = u16::MAX;
    const LOCAL_BITS: u32 = 16;
    const HIGH_MASK: u32 = 0xF000_0000;

    /// Validates a raw identity.
    pub fn new(id: u32) -> Result<Self> {
        if id == 0 {
            return Err(Error::Zero);
        }
        if id & Self::HIGH_MASK != 0 {
            return Err(Error::HighBits { id });
        }
        let cluster = (id >> Self::LOCAL_BITS) as u16;
        let local = (id & 0xFFFF) as u16;
        if cluster == 0 && id > Self::MAX_RESERVED {
            return Err(Error::ReservedOutOfRange { id });
        }
        if cluster != 0 && local == 0 {
            return Err(Error::LocalZero { id, cluster });
        }
        Ok(Self(id))
    }

    /// The cluster-scoped identity `local` of `cluster`.
    ///
    /// Returns `None` when `local` is 0.
    pub fn scoped(cluster: ClusterId, local: u16) -> Option<Self> {
        (local != 0)
            .then(|| Self((u32::from(cluster.get()) << Self::LOCAL_BITS) | u32::from(local)))
    }

    /// The cluster that allocated this identity, `None` for reserved identities.
    pub fn cluster(self) -> Option<ClusterId> {
        let bits = (self.0 >> Self::LOCAL_BITS) as u16;
        ClusterId::new(u64::from(bits)).ok()
    }

    /// The local part: the identity's number inside its cluster's space.
    pub fn local(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// Whether this is a cluster-independent reserved identity.
    pub fn is_reserved(self) -> bool {
        self.0 <= Self::MAX_RESERVED
    }

    /// The raw number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The name of a reserved identity, if it is one of the defined ones.
    pub fn reserved_name(self) -> Option<&'static str> {
        Some(match self {
            Self::HOST => "host",
            Self::WORLD => "world",
            Self::UNMANAGED => "unmanaged",
            Self::HEALTH => "health",
            Self::INIT => "init",
            Self::REMOTE_NODE => "remote-node",
            Self::KUBE_APISERVER => "kube-apiserver",
            _ => return None,
        })
    }
}

impl fmt::Display for NumericIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<u32> for NumericIdentity {
    type Error = Error;
    fn try_from(id: u32) -> Result<Self> {
        Self::new(id)
    }
}

impl From<NumericIdentity> for u32 {
    fn from(id: NumericIdentity) -> u32 {
        id.0
    }
}

/// One label: where it came from (`k8s`, `k8s-ns`, `mesh`, ...), its key and its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    /// Where the label came from, e.g. `k8s` for pod labels.
    pub source: String,
    /// The key, e.g. `app.kubernetes.io/name`.
    pub key: String,
    /// The value; may be empty.
    pub value: String,
}

impl Label {
    /// Source of pod labels.
    pub const SOURCE_POD: &'static str = "k8s";
    /// Source of namespace labels copied onto the pods of that namespace.
    pub const SOURCE_NAMESPACE: &'static str = "k8s-ns";
    /// Source of labels the mesh adds itself.
    pub const SOURCE_MESH: &'static str = "mesh";
    /// Key of the label that names the cluster an identity belongs to.
    pub const KEY_CLUSTER: &'static str = "cluster";
    /// Key of the label that names the namespace of a pod.
    pub const KEY_NAMESPACE: &'static str = "namespace";

    /// Validates and builds a label.
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self> {
        let (source, key, value) = (source.into(), key.into(), value.into());
        if source.is_empty()
            || !source
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::LabelSource {
                source_name: source,
            });
        }
        if key.is_empty()
            || key
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '=' || c == ';')
        {
            return Err(Error::LabelKey { key });
        }
        if value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ';')
        {
            return Err(Error::LabelValue { key, value });
        }
        Ok(Self { source, key, value })
    }

    /// Parses the canonical text form `source:key=value`.
    pub fn parse(text: &str) -> Result<Self> {
        let syntax = || Error::LabelSyntax {
            text: text.to_owned(),
        };
        let (source, rest) = text.split_once(':').ok_or_else(syntax)?;
        let (key, value) = rest.split_once('=').ok_or_else(syntax)?;
        Self::new(source, key, value)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

/// A label set in canonical form: at most one value per (source, key), sorted.
///
/// Two label sets with the same labels always have the same [`Labels::canonical`] text, which is
/// what the identity allocator keys on.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Labels(BTreeMap<(String, String), String>);

impl Labels {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a label, replacing an earlier value of the same source and key.
    pub fn insert(&mut self, label: Label) {
        self.0.insert((label.source, label.key), label.value);
    }

    /// Builder form of [`Labels::insert`].
    pub fn with(mut self, label: Label) -> Self {
        self.insert(label);
        self
    }

    /// The value of `source:key`, if present.
    pub fn get(&self, source: &str, key: &str) -> Option<&str> {
        self.0
            .get(&(source.to_owned(), key.to_owned()))
            .map(String::as_str)
    }

    /// The labels in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = Label> + '_ {
        self.0.iter().map(|((s, k), v)| Label {
            source: s.clone(),
            key: k.clone(),
            value: v.clone(),
        })
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The canonical text: `source:key=value` joined by `;`, sorted by source then key.
    pub fn canonical(&self) -> String {
        self.iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Parses [`Labels::canonical`] text. Canonical text never names a (source, key) twice, so
    /// text that does is refused.
    pub fn parse_canonical(text: &str) -> Result<Self> {
        let mut labels = Self::new();
        if text.is_empty() {
            return Ok(labels);
        }
        for part in text.split(';') {
            let label = Label::parse(part)?;
            if labels.get(&label.source, &label.key).is_some() {
                return Err(Error::DuplicateLabel {
                    source_name: label.source,
                    key: label.key,
                });
            }
            labels.insert(label);
        }
        Ok(labels)
    }
}

impl FromIterator<Label> for Labels {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        let mut labels = Self::new();
        for l in iter {
            labels.insert(l);
        }
        labels
    }
}

/// A security identity of a cluster: its number and the label set it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster that allocated it.
    pub cluster: crate::ClusterName,
    /// Its number; [`NumericIdentity::cluster`] is this cluster's ID.
    pub id: NumericIdentity,
    /// The labels it stands for.
    pub labels: Labels,
}

impl crate::Object for Identity {
    const KIND: crate::Kind = crate::Kind::Identities;
    fn cluster(&self) -> &crate::ClusterName {
        &self.cluster
    }
    fn object_name(&self) -> String {
        self.id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u64) -> ClusterId {
        ClusterId::new(n).unwrap()
    }

    #[test]
    fn encoding_gives_every_cluster_65535_identities_and_4095_clusters() {
        let first = NumericIdentity::scoped(cid(1), 1).unwrap();
        let last = NumericIdentity::scoped(cid(4095), u16::MAX).unwrap();
        assert_eq!(first.get(), 0x0001_0001);
        assert_eq!(last.get(), 0x0FFF_FFFF);
        assert_eq!(last.cluster(), Some(cid(4095)));
        assert_eq!(last.local(), u16::MAX);
        // 1023 clusters, each with its full local space, never collide.
        let a = NumericIdentity::scoped(cid(1023), u16::MAX).unwrap();
        let b = NumericIdentity::scoped(cid(1022), u16::MAX).unwrap();
        assert_ne!(a, b);
        assert_eq!(NumericIdentity::new(a.get()).unwrap(), a);
        assert!(NumericIdentity::scoped(cid(3), 0).is_none());
    }

    #[test]
    fn raw_identities_are_validated() {
        let cases: &[(u32, bool)] = &[
            (0, false),
            (1, true),
            (255, true),
            (256, false),         // reserved space ends at 255
            (0x0001_0000, false), // local part 0
            (0x0001_0001, true),
            (0x0FFF_FFFF, true),
            (0x1000_0001, false), // high bits
            (u32::MAX, false),
        ];
        for (raw, ok) in cases {
            assert_eq!(NumericIdentity::new(*raw).is_ok(), *ok, "{raw:#x}");
        }
    }

    #[test]
    fn reserved_identities_belong_to_no_cluster() {
        assert!(NumericIdentity::WORLD.is_reserved());
        assert_eq!(NumericIdentity::WORLD.cluster(), None);
        assert_eq!(NumericIdentity::HOST.reserved_name(), Some("host"));
        let scoped = NumericIdentity::scoped(cid(5), 77).unwrap();
        assert!(!scoped.is_reserved());
        assert_eq!(scoped.reserved_name(), None);
    }

    #[test]
    fn label_sets_have_one_canonical_sorted_form() {
        let a: Labels = [
            Label::new("k8s", "app", "web").unwrap(),
            Label::new("k8s-ns", "team", "blue").unwrap(),
            Label::new("k8s", "app.kubernetes.io/part-of", "shop").unwrap(),
            Label::new("mesh", "cluster", "east").unwrap(),
        ]
        .into_iter()
        .collect();
        let b: Labels = a.iter().collect::<Vec<_>>().into_iter().rev().collect();
        assert_eq!(a, b);
        assert_eq!(
            a.canonical(),
            "k8s:app=web;k8s:app.kubernetes.io/part-of=shop;k8s-ns:team=blue;mesh:cluster=east"
        );
        assert_eq!(Labels::parse_canonical(&a.canonical()).unwrap(), a);
        assert_eq!(Labels::parse_canonical("").unwrap(), Labels::new());
        assert!(Labels::parse_canonical("k8s:a=1;k8s:a=2").is_err());
    }

    #[test]
    fn bad_labels_are_refused() {
        assert!(Label::new("", "k", "v").is_err());
        assert!(Label::new("K8S", "k", "v").is_err());
        assert!(Label::new("k8s", "", "v").is_err());
        assert!(Label::new("k8s", "a=b", "v").is_err());
        assert!(Label::new("k8s", "a", "v;w").is_err());
        assert!(Label::new("k8s", "a", "v w").is_err());
        assert!(Label::new("k8s", "a", "").is_ok());
        assert!(Label::parse("noseparator").is_err());
        assert!(Label::parse("k8s:novalue").is_err());
    }
}
