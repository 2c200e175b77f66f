//! Version skew across a mesh, for `check` and `status`: which version each checked cluster's
//! apiserver reports in its status document, and which version each of its peers reported
//! when it connected (`ClusterInfo`, recorded per peer in the same document), judged by one
//! rule. Pure: gathering is the callers' (they already hold the documents), rendering too.
//!
//! The rule:
//! - one build everywhere (same release, same commit): healthy (✔);
//! - **minor skew** — the same major version and minor releases at most one apart, including
//!   different patch releases or commits of one release, or an apiserver that does not report
//!   its version (older than version reporting): a warning (⚠). A rolling upgrade goes through
//!   it, one cluster after another; `check` still exits 0 and `status` stays healthy;
//! - anything wider — another major version, or minor releases two or more apart: unsupported
//!   (✗); `check` exits 1 and `status` is unhealthy.
//!
//! A peer that never connected has reported nothing and is left out; a cluster that is checked
//! is judged by its own document, its peers' view of it serves only for clusters not checked.

use std::collections::BTreeMap;

use serde::Serialize;
use telemetry::version::Version;

/// What one checked cluster says: its apiserver's version, and its peers' as they reported it.
#[derive(Debug, Clone)]
pub(crate) struct Reporter<'a> {
    /// The cluster.
    pub cluster: &'a str,
    /// Its apiserver's version (`None`: an apiserver older than version reporting).
    pub version: Option<&'a str>,
    /// Peer name → the version it reported (`None`: not connected yet, or older).
    pub peers: Vec<(&'a str, Option<&'a str>)>,
}

/// How far apart the versions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Level {
    /// One build everywhere.
    Same,
    /// Within one minor release (or unknown): a warning.
    Minor,
    /// Further apart: not supported.
    Unsupported,
}

/// The versions found and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Skew {
    /// The verdict.
    pub level: Level,
    /// Each version as printed (`0.1.0 (commit 0123456789ab)`, or the text an apiserver
    /// reported when it cannot be read) → the clusters that run it.
    pub versions: BTreeMap<String, Vec<String>>,
    /// Clusters whose apiserver does not report its version.
    pub unknown: Vec<String>,
}

/// The level of two versions read back.
fn pair(a: &Version, b: &Version) -> Level {
    if a == b {
        Level::Same
    } else if a.major != b.major || a.minor.abs_diff(b.minor) > 1 {
        Level::Unsupported
    } else {
        Level::Minor
    }
}

/// Judges what `reporters` say; `None` when no version at all is known (no document read).
pub(crate) fn assess(reporters: &[Reporter<'_>]) -> Option<Skew> {
    // Cluster → what it runs: its own document first, then what its peers saw.
    let mut runs: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for r in reporters {
        runs.insert(r.cluster, r.version);
    }
    for r in reporters {
        for (peer, v) in &r.peers {
            if let Some(v) = v {
                runs.entry(peer).or_insert(Some(v));
            }
        }
    }
    if runs.is_empty() {
        return None;
    }
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut parsed: Vec<Version> = Vec::new();
    let mut unknown = Vec::new();
    let mut level = Level::Same;
    for (cluster, v) in runs {
        match v {
            None => {
                unknown.push(cluster.to_owned());
                level = level.max(Level::Minor);
            }
            Some(text) => {
                let shown = match Version::parse(text) {
                    Some(v) => {
                        let shown = v.to_string();
                        for other in &parsed {
                            level = level.max(pair(other, &v));
                        }
                        parsed.push(v);
                        shown
                    }
                    None => {
                        level = level.max(Level::Minor);
                        format!("{text:?} (unreadable)")
                    }
                };
                versions.entry(shown).or_default().push(cluster.to_owned());
            }
        }
    }
    if versions.len() > 1 {
        level = level.max(Level::Minor);
    }
    Some(Skew {
        level,
        versions,
        unknown,
    })
}

impl Skew {
    /// `0.1.0 (commit abc) on east, west; 0.2.0 (commit def) on north; unknown on south`.
    pub(crate) fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .versions
            .iter()
            .map(|(v, on)| format!("{v} on {}", on.join(", ")))
            .collect();
        if !self.unknown.is_empty() {
            parts.push(format!("unknown on {}", self.unknown.join(", ")));
        }
        parts.join("; ")
    }

    /// The line for `check` and `status`, without its mark.
    pub(crate) fn message(&self) -> String {
        match (self.level, self.versions.keys().next()) {
            (Level::Same, Some(v)) => {
                format!("one version across the clusters and their peers: {v}")
            }
            _ => format!("version skew: {}", self.summary()),
        }
    }

    /// What to do about it; `None` when there is nothing to do.
    pub(crate) fn hint(&self) -> Option<String> {
        let older = (!self.unknown.is_empty()).then(|| {
            format!(
                " ({} older than version reporting: upgrade first)",
                self.unknown.join(", ")
            )
        });
        match self.level {
            Level::Same => None,
            Level::Minor => Some(format!(
                "minor skew{}, supported while an upgrade rolls from one cluster to the next: finish it so that every cluster runs one build (`clustermesh version`; `kubectl -n kube-system get deploy clustermesh-apiserver -o wide` shows the image)",
                older.unwrap_or_default()
            )),
            Level::Unsupported => Some(
                "versions of another major release or two or more minor releases apart are not supported in one mesh: upgrade the older clusters one minor release at a time".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(cluster: &'static str, version: Option<&'static str>) -> Reporter<'static> {
        Reporter {
            cluster,
            version,
            peers: Vec::new(),
        }
    }

    fn level(reporters: &[Reporter<'_>]) -> Option<Level> {
        assess(reporters).map(|s| s.level)
    }

    #[test]
    fn the_skew_rule() {
        use Level::*;
        let two = |a, b| level(&[at("east", Some(a)), at("west", Some(b))]);
        for (a, b, want) in [
            ("0.1.0+abc", "0.1.0+abc", Same),
            ("0.1.0+abc", "0.1.0+def", Minor),
            ("0.1.0+abc", "0.1.0", Minor),
            ("0.1.0+abc", "0.1.3+abc", Minor),
            ("0.1.0+abc", "0.2.0+abc", Minor),
            ("1.4.0+abc", "1.3.9+abc", Minor),
            ("1.2.0", "1.2.0-rc.1", Minor),
            ("0.1.0+abc", "0.3.0+abc", Unsupported),
            ("1.0.0+abc", "2.0.0+abc", Unsupported),
            ("1.9.0", "2.0.0", Unsupported),
            ("0.1.0+abc", "banana", Minor),
        ] {
            assert_eq!(two(a, b), Some(want), "{a} vs {b}");
            assert_eq!(two(b, a), Some(want), "{b} vs {a}");
        }
        // An apiserver older than version reporting: a warning, never a pass.
        assert_eq!(
            level(&[at("east", Some("0.1.0+abc")), at("west", None)]),
            Some(Minor)
        );
        // The widest pair decides.
        assert_eq!(
            level(&[
                at("east", Some("0.1.0")),
                at("west", Some("0.2.0")),
                at("north", Some("0.3.0"))
            ]),
            Some(Unsupported)
        );
        assert_eq!(level(&[]), None);
    }

    #[test]
    fn peers_count_for_clusters_not_checked_and_only_once_connected() {
        let east = Reporter {
            cluster: "east",
            version: Some("0.1.0+abc"),
            peers: vec![("west", Some("0.2.0+def")), ("north", None)],
        };
        let skew = assess(std::slice::from_ref(&east)).unwrap_or_else(|| panic!());
        assert_eq!(skew.level, Level::Minor);
        assert_eq!(
            skew.message(),
            "version skew: 0.1.0 (commit abc) on east; 0.2.0 (commit def) on west"
        );
        // west checked too: its own document wins over what east saw.
        let west = at("west", Some("0.1.0+abc"));
        let skew = assess(&[east, west]).unwrap_or_else(|| panic!());
        assert_eq!(skew.level, Level::Same);
        assert_eq!(
            skew.message(),
            "one version across the clusters and their peers: 0.1.0 (commit abc)"
        );
        assert_eq!(skew.hint(), None);
    }

    #[test]
    fn the_message_names_who_runs_what() {
        let skew = assess(&[
            at("west", Some("0.1.0+abc")),
            at("east", Some("0.1.0+abc")),
            at("north", Some("0.3.0+def")),
            at("south", None),
        ])
        .unwrap_or_else(|| panic!());
        assert_eq!(
            skew.message(),
            "version skew: 0.1.0 (commit abc) on east, west; 0.3.0 (commit def) on north; unknown on south"
        );
        assert!(
            skew.hint()
                .is_some_and(|h| h.starts_with("versions of another major release")),
            "{:?}",
            skew.hint()
        );
        let skew =
            assess(&[at("east", Some("0.1.0+abc")), at("south", None)]).unwrap_or_else(|| panic!());
        assert!(
            skew.hint().is_some_and(|h| h.starts_with(
                "minor skew (south older than version reporting: upgrade first), supported while"
            )),
            "{:?}",
            skew.hint()
        );
    }
}
