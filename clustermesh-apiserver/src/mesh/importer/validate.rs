//! Validation of every object a peer sends, before anything is written: its cluster is the
//! peer, its name and kind make a key inside the peer's prefix, it decodes, its content names
//! the same cluster and name, its size is bounded, and no reserved or foreign identity is
//! carried. Each refusal concerns its object alone. Must not write anything.

use std::net::IpAddr;

use model::keys::{self, Kind, Scope};
use model::{ClusterId, ClusterName, NumericIdentity};
use wire::{Codec, pb};

/// Largest value one imported object may have: well under etcd's request limit (1.5 MiB), so
/// that an object between the two limits is refused alone instead of failing the local write
/// and putting the peer into a reconnect loop.
pub const MAX_OBJECT_BYTES: usize = 512 * 1024;

/// Why an object a peer sent is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// It belongs to another cluster.
    #[error("peer {peer} sent a {kind} object {name:?} of cluster {cluster:?}: refused")]
    ForeignCluster {
        /// The peer.
        peer: ClusterName,
        /// The kind it said.
        kind: String,
        /// The name it said.
        name: String,
        /// The cluster it said.
        cluster: String,
    },
    /// It is larger than [`MAX_OBJECT_BYTES`].
    #[error(
        "peer {peer} sent {kind} {name:?} of {bytes} bytes, over the {MAX_OBJECT_BYTES}-byte limit of one object: refused"
    )]
    TooLarge {
        /// The peer.
        peer: ClusterName,
        /// The kind it said.
        kind: String,
        /// The name it said.
        name: String,
        /// Its size.
        bytes: usize,
    },
    /// Its kind is unknown.
    #[error("peer {peer} sent an object of unknown kind {kind:?}")]
    UnknownKind {
        /// The peer.
        peer: ClusterName,
        /// The kind it said.
        kind: String,
    },
    /// Its name does not make a key inside the peer's prefix.
    #[error("peer {peer} sent an object with an invalid name {name:?}")]
    InvalidName {
        /// The peer.
        peer: ClusterName,
        /// The name it said.
        name: String,
    },
    /// Its content names another cluster or object.
    #[error(
        "peer {peer} sent {kind} {name:?} whose content names cluster {owner} and name {content_name:?}: refused"
    )]
    ContentMismatch {
        /// The peer.
        peer: ClusterName,
        /// The kind.
        kind: Kind,
        /// The name it said.
        name: String,
        /// The cluster its content names.
        owner: ClusterName,
        /// The name its content has.
        content_name: String,
    },
    /// It does not decode.
    #[error("peer {peer} sent an invalid {kind} {name:?}")]
    Decode {
        /// The peer.
        peer: ClusterName,
        /// The kind.
        kind: Kind,
        /// The name it said.
        name: String,
        /// Why.
        source: wire::Error,
    },
    /// A service a peer must not send (invalid, or unshared with backends).
    #[error("peer {peer} sent an invalid {kind} {name:?}")]
    InvalidService {
        /// The peer.
        peer: ClusterName,
        /// The kind.
        kind: Kind,
        /// The name it said.
        name: String,
        /// Why (boxed: the model's error is large).
        source: Box<model::service::Error>,
    },
    /// An endpoint with a reserved identity.
    #[error(
        "peer {peer} sent endpoint {ip} with reserved identity {identity}{}: reserved identities are never imported",
        reserved_name(*identity)
    )]
    ReservedEndpoint {
        /// The peer.
        peer: ClusterName,
        /// The endpoint.
        ip: IpAddr,
        /// Its identity.
        identity: NumericIdentity,
    },
    /// An endpoint with an identity of another cluster's range.
    #[error(
        "peer {peer} (ID {peer_id}) sent endpoint {ip} with identity {identity} from another cluster's range: refused"
    )]
    ForeignEndpoint {
        /// The peer.
        peer: ClusterName,
        /// Its ID.
        peer_id: ClusterId,
        /// The endpoint.
        ip: IpAddr,
        /// Its identity.
        identity: NumericIdentity,
    },
    /// An identity of the reserved space.
    #[error(
        "peer {peer} sent identity {id}{} of the reserved space: reserved identities are never imported",
        reserved_name(*id)
    )]
    ReservedIdentity {
        /// The peer.
        peer: ClusterName,
        /// The identity.
        id: NumericIdentity,
    },
    /// An identity of another cluster's range.
    #[error("peer {peer} (ID {peer_id}) sent identity {id} from another cluster's range: refused")]
    ForeignIdentity {
        /// The peer.
        peer: ClusterName,
        /// Its ID.
        peer_id: ClusterId,
        /// The identity.
        id: NumericIdentity,
    },
}

/// Checks one change a peer sent; returns its kind, name and value (`None`: a deletion).
pub(super) fn validate(
    peer: &ClusterName,
    peer_id: ClusterId,
    c: &pb::Change,
) -> Result<(Kind, String, Option<Vec<u8>>), Refused> {
    if c.cluster != peer.as_str() {
        return Err(Refused::ForeignCluster {
            peer: peer.clone(),
            kind: c.kind.clone(),
            name: c.name.clone(),
            cluster: c.cluster.clone(),
        });
    }
    if c.value.len() > MAX_OBJECT_BYTES {
        return Err(Refused::TooLarge {
            peer: peer.clone(),
            kind: c.kind.clone(),
            name: c.name.clone(),
            bytes: c.value.len(),
        });
    }
    let kind: Kind = c.kind.parse().map_err(|_| Refused::UnknownKind {
        peer: peer.clone(),
        kind: c.kind.clone(),
    })?;
    let key = keys::object_key(Scope::Cache, peer, kind, &c.name);
    match keys::parse(&key) {
        Ok(keys::Parsed::Object {
            cluster,
            kind: k,
            name,
            ..
        }) if cluster == *peer && k == kind && name == c.name => {}
        _ => {
            return Err(Refused::InvalidName {
                peer: peer.clone(),
                name: c.name.clone(),
            });
        }
    }
    if c.op == pb::change::Op::Delete as i32 {
        return Ok((kind, c.name.clone(), None));
    }
    let check = |owner: &ClusterName, name: String| -> Result<(), Refused> {
        if owner != peer || name != c.name {
            return Err(Refused::ContentMismatch {
                peer: peer.clone(),
                kind,
                name: c.name.clone(),
                owner: owner.clone(),
                content_name: name,
            });
        }
        Ok(())
    };
    let bad = |source: wire::Error| Refused::Decode {
        peer: peer.clone(),
        kind,
        name: c.name.clone(),
        source,
    };
    match kind {
        Kind::Services => {
            let o = model::GlobalService::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
            o.validate_from_peer()
                .map_err(|source| Refused::InvalidService {
                    peer: peer.clone(),
                    kind,
                    name: c.name.clone(),
                    source: Box::new(source),
                })?;
        }
        Kind::Endpoints => {
            let o = model::Endpoint::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
            if o.identity.is_reserved() {
                return Err(Refused::ReservedEndpoint {
                    peer: peer.clone(),
                    ip: o.ip,
                    identity: o.identity,
                });
            }
            if o.identity.cluster() != Some(peer_id) {
                return Err(Refused::ForeignEndpoint {
                    peer: peer.clone(),
                    peer_id,
                    ip: o.ip,
                    identity: o.identity,
                });
            }
        }
        Kind::Identities => {
            let o = model::Identity::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
            if o.id.is_reserved() {
                return Err(Refused::ReservedIdentity {
                    peer: peer.clone(),
                    id: o.id,
                });
            }
            if o.id.cluster() != Some(peer_id) {
                return Err(Refused::ForeignIdentity {
                    peer: peer.clone(),
                    peer_id,
                    id: o.id,
                });
            }
        }
        Kind::Nodes => {
            let o = model::Node::decode(&c.value).map_err(bad)?;
            check(&o.cluster, model::Object::object_name(&o))?;
        }
    }
    Ok((kind, c.name.clone(), Some(c.value.clone())))
}

/// ` (host)` for a named reserved identity, nothing otherwise.
fn reserved_name(id: NumericIdentity) -> String {
    id.reserved_name()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Issue 12, case 7: an object between the Mesh API's message limit and etcd's request
    /// limit is refused alone (it would fail the local write and loop the peer's stream).
    #[test]
    fn an_object_over_the_size_limit_is_refused_alone() {
        let peer = ClusterName::new("west").unwrap();
        let id = ClusterId::new(2).unwrap();
        let c = pb::Change {
            op: pb::change::Op::Put as i32,
            cluster: "west".into(),
            kind: "services".into(),
            name: "demo/big".into(),
            value: vec![0; MAX_OBJECT_BYTES + 1],
            revision: 1,
            origin_unix_micros: 0,
        };
        let e = validate(&peer, id, &c).unwrap_err().to_string();
        assert!(e.contains("limit of one object"), "{e}");
    }
}
