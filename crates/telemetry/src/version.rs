//! The version of every binary of the workspace, in one place: the crate version, the git
//! commit and the build date that `build.rs` stamped in.

/// The workspace version (`0.1.0`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binaries were built from (12 hex digits), or `unknown`.
pub const COMMIT: &str = env!("CLUSTERMESH_GIT_COMMIT");
/// The build date, `YYYY-MM-DD` (UTC).
pub const BUILD_DATE: &str = env!("CLUSTERMESH_BUILD_DATE");

/// What `--version` and `clustermesh version` print after the binary's name:
/// `0.1.0 (commit 0123456789ab, built 2025-01-31)`.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CLUSTERMESH_GIT_COMMIT"),
    ", built ",
    env!("CLUSTERMESH_BUILD_DATE"),
    ")"
);

/// What an apiserver reports of itself, in its status document and to its peers
/// (`ClusterInfo`): `0.1.0+0123456789ab`, the crate version and the commit as semver build
/// metadata. [`Version::parse`] reads it back.
pub const REPORTED: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "+",
    env!("CLUSTERMESH_GIT_COMMIT")
);

/// A reported version, read back: `major.minor.patch[-pre][+commit]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major release.
    pub major: u64,
    /// Minor release.
    pub minor: u64,
    /// Patch release.
    pub patch: u64,
    /// Pre-release, if any (`rc.1`).
    pub pre: Option<String>,
    /// The commit (build metadata), if given.
    pub commit: Option<String>,
}

impl Version {
    /// Reads `0.1.0+0123456789ab` (or `0.1.0`, as older apiservers report); `None` for anything
    /// else.
    pub fn parse(s: &str) -> Option<Self> {
        let (rest, commit) = match s.split_once('+') {
            Some((r, c)) if !c.is_empty() => (r, Some(c.to_owned())),
            Some(_) => return None,
            None => (s, None),
        };
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) if !p.is_empty() => (c, Some(p.to_owned())),
            Some(_) => return None,
            None => (rest, None),
        };
        let mut n = core.split('.').map(|p| p.parse::<u64>().ok());
        let (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) =
            (n.next(), n.next(), n.next(), n.next())
        else {
            return None;
        };
        Some(Self {
            major,
            minor,
            patch,
            pre,
            commit,
        })
    }

    /// The release without the commit: `0.1.0`, `0.2.0-rc.1`.
    pub fn release(&self) -> String {
        match &self.pre {
            Some(p) => format!("{}.{}.{}-{p}", self.major, self.minor, self.patch),
            None => format!("{}.{}.{}", self.major, self.minor, self.patch),
        }
    }
}

impl std::fmt::Display for Version {
    /// `0.1.0 (commit 0123456789ab)`, or `0.1.0` without a commit.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.commit {
            Some(c) => write!(f, "{} (commit {c})", self.release()),
            None => f.write_str(&self.release()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_version_reads_back() {
        let v = Version::parse(REPORTED).unwrap_or_else(|| panic!("{REPORTED}"));
        assert_eq!(v.release(), VERSION);
        assert_eq!(v.commit.as_deref(), Some(COMMIT));
        assert_eq!(
            Version::parse("1.22.3-rc.1+abc"),
            Some(Version {
                major: 1,
                minor: 22,
                patch: 3,
                pre: Some("rc.1".into()),
                commit: Some("abc".into()),
            })
        );
        assert_eq!(
            Version::parse("0.1.0").map(|v| v.to_string()).as_deref(),
            Some("0.1.0")
        );
        assert_eq!(
            Version::parse("0.1.0+abc")
                .map(|v| v.to_string())
                .as_deref(),
            Some("0.1.0 (commit abc)")
        );
        for bad in ["", "0.1", "0.1.0.1", "v0.1.0", "0.1.0+", "0.1.x", "0.1.0-"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_version_names_crate_version_commit_and_date() {
        assert!(LONG.starts_with(VERSION), "{LONG}");
        assert!(LONG.contains(&format!("commit {COMMIT}")), "{LONG}");
        assert!(
            COMMIT == "unknown" || COMMIT.chars().all(|c| c.is_ascii_hexdigit()),
            "{COMMIT}"
        );
        let d: Vec<&str> = BUILD_DATE.split('-').collect();
        assert_eq!(d.len(), 3, "{BUILD_DATE}");
        assert!(d.iter().all(|p| p.parse::<u32>().is_ok()), "{BUILD_DATE}");
    }
}
