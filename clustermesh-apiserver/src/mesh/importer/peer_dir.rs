//! The peers directory: one sub-directory per peer, named after it, holding `endpoints`,
//! `ca.crt`, `tls.crt`, `tls.key` and optionally `cluster-id`. A scan reads it; only a
//! complete listing can confirm that a peer is gone. Must not connect to anything.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use certs::TlsFiles;
use model::{ClusterId, ClusterName};

/// Why a peer directory is not a usable configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Its name is not a file name.
    #[error("{}: not a peer directory", .path.display())]
    NotPeerDir {
        /// The directory.
        path: PathBuf,
    },
    /// Its name is not a cluster name.
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
    /// `endpoints` names none.
    #[error("{}: no endpoints", .path.display())]
    NoEndpoints {
        /// The file.
        path: PathBuf,
    },
    /// `cluster-id` is not a cluster ID.
    #[error("{}", .path.display())]
    ClusterId {
        /// The file.
        path: PathBuf,
        /// Why.
        source: model::cluster::Error,
    },
}

/// What [`PeerConfig::load`] returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One peer's configuration, read from its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer cluster.
    pub name: ClusterName,
    /// Its expected ID, when configured.
    pub cluster_id: Option<ClusterId>,
    /// `host:port` of its Mesh API.
    pub endpoints: Vec<String>,
    /// TLS files.
    pub tls: TlsFiles,
    /// The files' contents, to notice changes.
    fingerprint: Vec<u8>,
}

impl PeerConfig {
    /// Reads `dir` (named after the peer).
    pub fn load(dir: &Path) -> Result<Self> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::NotPeerDir {
                path: dir.to_owned(),
            })?;
        let name = ClusterName::new(name).map_err(|source| Error::Name {
            path: dir.to_owned(),
            source,
        })?;
        let read = |f: &str| {
            std::fs::read(dir.join(f)).map_err(|source| Error::Read {
                path: dir.join(f),
                source,
            })
        };
        let endpoints_raw = read("endpoints")?;
        let endpoints: Vec<String> = String::from_utf8_lossy(&endpoints_raw)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints {
                path: dir.join("endpoints"),
            });
        }
        let cluster_id = match std::fs::read_to_string(dir.join("cluster-id")) {
            Ok(s) => Some(
                s.trim()
                    .parse::<ClusterId>()
                    .map_err(|source| Error::ClusterId {
                        path: dir.join("cluster-id"),
                        source,
                    })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(Error::Read {
                    path: dir.join("cluster-id"),
                    source,
                });
            }
        };
        let tls = TlsFiles::in_dir(dir);
        let mut fingerprint = endpoints_raw;
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            fingerprint.extend(read(f)?);
        }
        if let Some(id) = cluster_id {
            fingerprint.extend(id.to_string().into_bytes());
        }
        Ok(Self {
            name,
            cluster_id,
            endpoints,
            tls,
            fingerprint,
        })
    }
}

/// One scan of the peers directory.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Peers whose configuration loaded.
    pub(super) found: HashMap<String, PeerConfig>,
    /// Every peer directory present, loadable or not.
    pub(super) present: HashSet<String>,
    /// Problems, by path: a directory that could not be read or is invalid.
    pub(super) problems: HashMap<PathBuf, String>,
    /// Whether the listing itself was complete. Only a complete listing can confirm that a
    /// peer's directory is gone.
    pub(super) complete: bool,
}

pub(super) fn scan(dir: &Path, own: &ClusterName) -> Scan {
    let mut out = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            out.problems
                .insert(dir.to_owned(), format!("list {}: {e}", dir.display()));
            return out;
        }
    };
    out.complete = true;
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                out.complete = false;
                out.problems
                    .insert(dir.to_owned(), format!("list {}: {err}", dir.display()));
                continue;
            }
        };
        let path = e.path();
        // Kubernetes Secret mounts hold `..data` links; only real peer directories count.
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => {
                // Cannot tell: count it as present so that its peer is not drained.
                out.present.insert(name);
                out.problems
                    .insert(path.clone(), format!("stat {}: {err}", path.display()));
                continue;
            }
        }
        out.present.insert(name.clone());
        match PeerConfig::load(&path) {
            Ok(cfg) if cfg.name == *own => {
                tracing::warn!(peer = %cfg.name, "ignoring a peer configuration for this cluster itself");
            }
            Ok(cfg) => {
                out.found.insert(name, cfg);
            }
            Err(e) => {
                out.problems.insert(path, telemetry::chain(&e).to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer_dir(root: &Path, name: &str) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("endpoints"), "127.0.0.1:1\n").unwrap();
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        d
    }

    /// Issue 12, case 3: a listing that fails is not an empty listing.
    #[test]
    fn an_unreadable_peers_directory_confirms_no_removal() {
        let own = ClusterName::new("east").unwrap();
        let root = tempfile::tempdir().unwrap();
        let s = scan(&root.path().join("missing"), &own);
        assert!(!s.complete, "a failed listing confirms nothing");
        assert_eq!(s.problems.len(), 1);
    }

    /// A peer directory whose files cannot be read (here `tls.crt` turned into a directory, an
    /// I/O error like EMFILE would be) is present: its peer keeps its last good configuration.
    #[test]
    fn a_peer_that_cannot_be_read_is_present_not_removed() {
        let own = ClusterName::new("east").unwrap();
        let root = tempfile::tempdir().unwrap();
        peer_dir(root.path(), "west");
        let south = peer_dir(root.path(), "south");
        std::fs::remove_file(south.join("tls.crt")).unwrap();
        std::fs::create_dir(south.join("tls.crt")).unwrap();
        let s = scan(root.path(), &own);
        assert!(s.complete);
        assert!(s.found.contains_key("west"));
        assert!(!s.found.contains_key("south"));
        assert!(s.present.contains("south"), "unreadable is not removed");
        assert!(s.problems.keys().any(|p| p.ends_with("south")));
        // A missing cluster-id is fine; an unreadable one is a problem, not "no ID".
        std::fs::create_dir(root.path().join("west").join("cluster-id")).unwrap();
        let s = scan(root.path(), &own);
        assert!(!s.found.contains_key("west") && s.present.contains("west"));
    }

    /// The peer Secret follower swaps a symlink: the scan sees the peer through it.
    #[test]
    fn a_symlinked_peer_directory_counts() {
        let own = ClusterName::new("east").unwrap();
        let root = tempfile::tempdir().unwrap();
        peer_dir(root.path(), ".v-west-1");
        std::os::unix::fs::symlink(".v-west-1", root.path().join("west")).unwrap();
        let s = scan(root.path(), &own);
        assert!(s.found.contains_key("west"));
        assert_eq!(s.found.len(), 1, "versioned directories are not peers");
    }
}
