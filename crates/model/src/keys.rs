//! The etcd key layout, version 1. Every key the project reads or writes is built here and only
//! here; `docs/architecture/README.md` documents the same layout.
//!
//! ```text
//! /clustermesh/v1/clusters/<cluster>                       cluster config (name, ID)
//! /clustermesh/v1/state/<cluster>/<kind>/<name>            objects this cluster exports
//! /clustermesh/v1/state/<cluster>/synced/<kind>            its "initial state written" marker
//! /clustermesh/v1/cache/<peer>/<kind>/<name>               copies imported from a peer
//! /clustermesh/v1/cache/<peer>/synced/<kind>               the peer's synced marker, mirrored
//! /clustermesh/v1/alloc/<cluster>/ids/<id>                 identity allocator: ID -> labels
//! /clustermesh/v1/alloc/<cluster>/labels/<sha256 hex>      identity allocator: labels -> ID
//! /clustermesh/v1/sessions/<cluster>                       the exporter's lease ID (leased)
//! ```
//!
//! `<kind>` is one of `services`, `endpoints`, `identities`, `nodes`; `<name>` is
//! `namespace/name` for services, the IP address for endpoints, the decimal ID for identities and
//! the node name for nodes. A peer is served only keys under `state/<its cluster>/`.
//!
//! Must not do I/O; the store turns these strings into requests.

use std::fmt;
use std::str::FromStr;

use crate::{ClusterName, Object};

/// The root of every key, including the layout version.
pub const ROOT: &str = "/clustermesh/v1/";

/// The kinds of exported objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Global services ([`crate::GlobalService`]).
    Services,
    /// Endpoints ([`crate::Endpoint`]).
    Endpoints,
    /// Identities ([`crate::Identity`]).
    Identities,
    /// Nodes ([`crate::Node`]).
    Nodes,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [
        Kind::Services,
        Kind::Endpoints,
        Kind::Identities,
        Kind::Nodes,
    ];

    /// The key segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Endpoints => "endpoints",
            Self::Identities => "identities",
            Self::Nodes => "nodes",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::UnknownKind { kind: s.to_owned() })
    }
}

/// Whose copy of a cluster's state a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The cluster's own exports, written by its exporter.
    State,
    /// Copies of a peer's exports, written by the importer.
    Cache,
}

impl Scope {
    /// The key segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Cache => "cache",
        }
    }
}

/// A key that does not follow the layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not under [`ROOT`] or not one of the known shapes.
    #[error("key {key:?} does not follow the /clustermesh/v1 layout")]
    Layout {
        /// The refused key.
        key: String,
    },
    /// An unknown kind segment.
    #[error("unknown object kind {kind:?}")]
    UnknownKind {
        /// The refused segment.
        kind: String,
    },
    /// The cluster segment is not a valid cluster name.
    #[error("key {key:?} names an invalid cluster")]
    Cluster {
        /// The refused key.
        key: String,
        /// Why the name is invalid.
        source: crate::cluster::Error,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Key of a cluster's configuration record.
pub fn cluster_config(cluster: &ClusterName) -> String {
    format!("{ROOT}clusters/{cluster}")
}

/// Prefix of every cluster configuration record.
pub fn cluster_configs_prefix() -> String {
    format!("{ROOT}clusters/")
}

/// Prefix of everything held for `cluster` in `scope` (objects of every kind and markers).
pub fn cluster_prefix(scope: Scope, cluster: &ClusterName) -> String {
    format!("{ROOT}{}/{cluster}/", scope.as_str())
}

/// Prefix of every cluster's data in `scope`.
pub fn scope_prefix(scope: Scope) -> String {
    format!("{ROOT}{}/", scope.as_str())
}

/// Prefix of the objects of one kind of one cluster.
pub fn kind_prefix(scope: Scope, cluster: &ClusterName, kind: Kind) -> String {
    format!("{}{kind}/", cluster_prefix(scope, cluster))
}

/// Key of one object, by its parts.
pub fn object_key(scope: Scope, cluster: &ClusterName, kind: Kind, name: &str) -> String {
    format!("{}{name}", kind_prefix(scope, cluster, kind))
}

/// Key of `object` in `scope`.
pub fn object<T: Object>(scope: Scope, object: &T) -> String {
    object_key(scope, object.cluster(), T::KIND, &object.object_name())
}

/// Key of the synced marker of one kind of one cluster.
pub fn synced(scope: Scope, cluster: &ClusterName, kind: Kind) -> String {
    format!("{}synced/{kind}", cluster_prefix(scope, cluster))
}

/// Prefix of the identity allocator's ID records of `cluster`.
pub fn alloc_ids_prefix(cluster: &ClusterName) -> String {
    format!("{ROOT}alloc/{cluster}/ids/")
}

/// The allocator's record of one ID (value: the canonical label text).
pub fn alloc_id(cluster: &ClusterName, id: crate::NumericIdentity) -> String {
    format!("{}{id}", alloc_ids_prefix(cluster))
}

/// The allocator's record of one label set (value: the ID), by the SHA-256 of its canonical text.
pub fn alloc_labels(cluster: &ClusterName, labels_sha256_hex: &str) -> String {
    format!("{ROOT}alloc/{cluster}/labels/{labels_sha256_hex}")
}

/// Key of the record of the lease a cluster's exported state is attached to (value: the lease
/// ID in decimal; the record is attached to that lease). A new leader adopts the lease while it
/// is alive instead of rewriting every key.
pub fn session(cluster: &ClusterName) -> String {
    format!("{ROOT}sessions/{cluster}")
}

/// What a key under `state/` or `cache/` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An object.
    Object {
        /// State or cache.
        scope: Scope,
        /// The owning cluster.
        cluster: ClusterName,
        /// Its kind.
        kind: Kind,
        /// Its name (see the module docs).
        name: String,
    },
    /// A synced marker.
    Synced {
        /// State or cache.
        scope: Scope,
        /// The owning cluster.
        cluster: ClusterName,
        /// The kind it marks.
        kind: Kind,
    },
}

/// Parses a key under `state/` or `cache/`.
pub fn parse(key: &str) -> Result<Parsed> {
    let layout = || Error::Layout {
        key: key.to_owned(),
    };
    let rest = key.strip_prefix(ROOT).ok_or_else(layout)?;
    let mut parts = rest.splitn(4, '/');
    let scope = match parts.next() {
        Some("state") => Scope::State,
        Some("cache") => Scope::Cache,
        _ => return Err(layout()),
    };
    let cluster = parts.next().ok_or_else(layout)?;
    let cluster = ClusterName::new(cluster).map_err(|source| Error::Cluster {
        key: key.to_owned(),
        source,
    })?;
    let second = parts.next().ok_or_else(layout)?;
    let name = parts.next().ok_or_else(layout)?;
    if name.is_empty() {
        return Err(layout());
    }
    if second == "synced" {
        let kind = name.parse()?;
        return Ok(Parsed::Synced {
            scope,
            cluster,
            kind,
        });
    }
    Ok(Parsed::Object {
        scope,
        cluster,
        kind: second.parse()?,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn east() -> ClusterName {
        ClusterName::new("east").unwrap()
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        assert_eq!(cluster_config(&east()), "/clustermesh/v1/clusters/east");
        assert_eq!(
            object_key(Scope::State, &east(), Kind::Services, "shop/cart"),
            "/clustermesh/v1/state/east/services/shop/cart"
        );
        assert_eq!(
            object_key(Scope::Cache, &east(), Kind::Endpoints, "fd00::1"),
            "/clustermesh/v1/cache/east/endpoints/fd00::1"
        );
        assert_eq!(
            synced(Scope::State, &east(), Kind::Nodes),
            "/clustermesh/v1/state/east/synced/nodes"
        );
        assert_eq!(
            alloc_id(&east(), crate::NumericIdentity::new(65537).unwrap()),
            "/clustermesh/v1/alloc/east/ids/65537"
        );
        // A kind prefix never covers the synced markers nor another kind.
        let p = kind_prefix(Scope::State, &east(), Kind::Services);
        assert!(!synced(Scope::State, &east(), Kind::Services).starts_with(&p));
        // A cluster prefix never covers a cluster whose name extends it.
        let other = ClusterName::new("east-2").unwrap();
        assert!(
            !cluster_prefix(Scope::State, &other)
                .starts_with(&cluster_prefix(Scope::State, &east()))
        );
    }

    #[test]
    fn keys_parse_back_into_their_parts() {
        let k = object_key(Scope::State, &east(), Kind::Services, "shop/cart");
        assert_eq!(
            parse(&k).unwrap(),
            Parsed::Object {
                scope: Scope::State,
                cluster: east(),
                kind: Kind::Services,
                name: "shop/cart".into()
            }
        );
        let k = synced(Scope::Cache, &east(), Kind::Identities);
        assert_eq!(
            parse(&k).unwrap(),
            Parsed::Synced {
                scope: Scope::Cache,
                cluster: east(),
                kind: Kind::Identities
            }
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        for k in [
            "/other/v1/state/east/services/a/b",
            "/clustermesh/v1/state/east/services/",
            "/clustermesh/v1/state/east/services",
            "/clustermesh/v1/state/East/services/a/b",
            "/clustermesh/v1/state/east/widgets/a",
            "/clustermesh/v1/state/east/synced/widgets",
            "/clustermesh/v1/elsewhere/east/services/a/b",
            "/clustermesh/v2/state/east/services/a/b",
        ] {
            assert!(parse(k).is_err(), "{k}");
        }
    }
}
