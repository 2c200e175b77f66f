//! Label selectors over identity labels, and how they match.
//!
//! A [`Selector`] is a conjunction of [`Requirement`]s on `(source, key)` pairs of an identity's
//! [`Labels`], as the exporter builds them (`k8s:<pod label>`, `k8s-ns:<namespace label>`,
//! `mesh:cluster`, `mesh:namespace`), plus a [`ClusterScope`] that says which clusters the
//! selector may reach before its requirements are looked at.
//!
//! Must not know about policy kinds or JSON: the parsers translate what users write into these.

use std::collections::{BTreeMap, BTreeSet};

use model::{ClusterName, Label, Labels};

/// Which label source a requirement looks at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Exactly this source (`k8s`, `k8s-ns`, `mesh`).
    Exact(String),
    /// Any source (Cilium's `any:` prefix).
    Any,
}

/// The test a requirement applies to the values of its key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// Some value of the key is in the set (`matchLabels` is `In` with one value).
    In(BTreeSet<String>),
    /// No value of the key is in the set; true when the key is absent, as in Kubernetes.
    NotIn(BTreeSet<String>),
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// The label source looked at.
    pub source: Source,
    /// The label key.
    pub key: String,
    /// The test.
    pub op: Op,
}

impl Requirement {
    /// `source:key=value`, i.e. `In` with one value.
    pub fn equals(source: &str, key: &str, value: &str) -> Self {
        Self {
            source: Source::Exact(source.to_owned()),
            key: key.to_owned(),
            op: Op::In(BTreeSet::from([value.to_owned()])),
        }
    }

    /// Whether this requirement constrains `source:key` (exactly that source).
    pub fn names(&self, source: &str, key: &str) -> bool {
        matches!(&self.source, Source::Exact(s) if s == source) && self.key == key
    }

    fn matches(&self, labels: &LabelIndex) -> bool {
        let mut values = labels.values(&self.source, &self.key);
        match &self.op {
            Op::In(set) => values.any(|v| set.contains(v)),
            Op::NotIn(set) => !values.any(|v| set.contains(v)),
            Op::Exists => values.next().is_some(),
            Op::DoesNotExist => values.next().is_none(),
        }
    }
}

/// Which clusters a selector may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClusterScope {
    /// Only the policy's own cluster, whatever the requirements say (endpoint selectors,
    /// Kubernetes NetworkPolicy peers).
    Local,
    /// The policy's own cluster unless [`crate::Options::peer_selectors_any_cluster`] is set:
    /// a Cilium peer selector that names no cluster (the Cilium 1.19 default).
    LocalByDefault,
    /// Any cluster: the selector constrains `io.cilium.k8s.policy.cluster` itself.
    Any,
}

/// A label selector: all requirements must hold (an empty selector selects everything in
/// scope).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// The requirements, all of which must hold.
    pub requirements: Vec<Requirement>,
    /// The clusters the selector may reach.
    pub cluster: ClusterScope,
}

impl Selector {
    /// Whether any requirement constrains `source:key`.
    pub fn names(&self, source: &str, key: &str) -> bool {
        self.requirements.iter().any(|r| r.names(source, key))
    }

    /// Whether the selector, resolved in `local` with `any_cluster` as the compatibility flag,
    /// selects an identity of `cluster` with `labels`.
    pub(crate) fn matches(
        &self,
        local: &ClusterName,
        any_cluster: bool,
        cluster: &ClusterName,
        labels: &LabelIndex,
    ) -> bool {
        let in_scope = match self.cluster {
            ClusterScope::Local => cluster == local,
            ClusterScope::LocalByDefault => any_cluster || cluster == local,
            ClusterScope::Any => true,
        };
        in_scope && self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// An identity's labels indexed by key, for matching without allocating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelIndex(BTreeMap<String, Vec<(String, String)>>);

impl LabelIndex {
    pub(crate) fn new(labels: &Labels) -> Self {
        let mut map: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for Label { source, key, value } in labels.iter() {
            map.entry(key).or_default().push((source, value));
        }
        Self(map)
    }

    fn values<'a>(&'a self, source: &'a Source, key: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .get(key)
            .into_iter()
            .flatten()
            .filter(move |(s, _)| match source {
                Source::Any => true,
                Source::Exact(want) => s == want,
            })
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(text: &str) -> LabelIndex {
        LabelIndex::new(&Labels::parse_canonical(text).unwrap())
    }

    fn req(source: Source, key: &str, op: Op) -> Requirement {
        Requirement {
            source,
            key: key.into(),
            op,
        }
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let l = labels("k8s:app=web;k8s-ns:team=a;mesh:cluster=east");
        let k8s = || Source::Exact("k8s".into());
        let cases = [
            (req(k8s(), "app", Op::In(set(&["web", "db"]))), true),
            (req(k8s(), "app", Op::In(set(&["db"]))), false),
            (req(k8s(), "app", Op::NotIn(set(&["db"]))), true),
            (req(k8s(), "app", Op::NotIn(set(&["web"]))), false),
            (req(k8s(), "tier", Op::NotIn(set(&["x"]))), true),
            (req(k8s(), "app", Op::Exists), true),
            (req(k8s(), "team", Op::Exists), false),
            (req(Source::Any, "team", Op::Exists), true),
            (req(k8s(), "team", Op::DoesNotExist), true),
            (req(Source::Any, "team", Op::DoesNotExist), false),
        ];
        for (r, want) in cases {
            assert_eq!(r.matches(&l), want, "{r:?}");
        }
    }

    #[test]
    fn scope_is_checked_before_requirements() {
        let east = ClusterName::new("east").unwrap();
        let west = ClusterName::new("west").unwrap();
        let l = labels("k8s:app=web;mesh:cluster=west");
        let sel = |cluster| Selector {
            requirements: vec![],
            cluster,
        };
        assert!(!sel(ClusterScope::Local).matches(&east, true, &west, &l));
        assert!(!sel(ClusterScope::LocalByDefault).matches(&east, false, &west, &l));
        assert!(sel(ClusterScope::LocalByDefault).matches(&east, true, &west, &l));
        assert!(sel(ClusterScope::Any).matches(&east, false, &west, &l));
    }
}
