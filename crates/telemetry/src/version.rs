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

#[cfg(test)]
mod tests {
    use super::*;

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
