//! Resolution: policies × identities → per-endpoint allow/deny entries, in one pass.
//!
//! [`resolve`] is the reference the incremental [`crate::Resolver`] is tested against; both use
//! the matching helpers here.
//!
//! Must not apply precedence: entries carry both verdicts, the consumer lets Deny win.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use model::{ClusterName, Labels, NumericIdentity};

use crate::rule::{Direction, Entity, L4, PeerRule, Peers, Policy, PolicyRef, PortSpec, Verdict};
use crate::selector::{LabelIndex, Selector};

/// Resolution options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// The compatibility flag: a Cilium peer selector without a cluster label selects every
    /// cluster (the behaviour before Cilium 1.19) instead of the policy's own.
    pub peer_selectors_any_cluster: bool,
}

/// An identity the agent knows, local or imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Its number.
    pub id: u32,
    /// The cluster that allocated it.
    pub cluster: ClusterName,
    /// Its labels, as the exporter built them.
    pub labels: Labels,
}

/// The peer an entry applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Remote {
    /// One identity (cluster-scoped, or reserved such as HOST or WORLD).
    Identity(u32),
    /// Every peer.
    Any,
}

/// One allow or deny entry of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    /// Direction, seen from the endpoint.
    pub direction: Direction,
    /// The peer.
    pub remote: Remote,
    /// The protocol.
    pub proto: L4,
    /// Inclusive port range; `None` = every port.
    pub ports: Option<(u16, u16)>,
    /// Allow or deny; Deny wins.
    pub verdict: Verdict,
    /// The policy it comes from (shared by all its entries).
    pub origin: Arc<PolicyRef>,
}

/// The resolved policy of one local identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Ingress is default-deny: only what an `Allow` entry allows gets in.
    pub ingress_enforced: bool,
    /// Egress is default-deny.
    pub egress_enforced: bool,
    /// Sorted, deduplicated.
    pub entries: Vec<PolicyEntry>,
}

/// The resolved policy of every local identity some policy selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// By local identity.
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
}

/// Where selectors are resolved: the local cluster and the options.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub(crate) local: ClusterName,
    pub(crate) opts: Options,
}

/// An identity prepared for matching.
#[derive(Debug, Clone)]
pub(crate) struct Known {
    pub(crate) cluster: ClusterName,
    pub(crate) labels: Labels,
    pub(crate) index: LabelIndex,
}

impl Known {
    pub(crate) fn new(info: &IdentityInfo) -> Self {
        // The cluster label is the identity's origin (which the importer checked against the
        // peer's certificate), never what its labels claim: a peer could put another
        // cluster's name in them to pass for that cluster's workloads.
        let mut labels = info.labels.clone();
        if let Ok(l) = model::Label::new(
            model::Label::SOURCE_MESH,
            model::Label::KEY_CLUSTER,
            info.cluster.to_string(),
        ) {
            labels.insert(l);
        }
        Self {
            cluster: info.cluster.clone(),
            index: LabelIndex::new(&labels),
            labels,
        }
    }
}

impl Scope {
    /// Whether `subject` selects `identity` as an endpoint (local identities only).
    pub(crate) fn selects(&self, subject: &Selector, identity: &Known) -> bool {
        identity.cluster == self.local
            && subject.matches(&self.local, false, &identity.cluster, &identity.index)
    }

    /// Whether `peers` name `identity` through a selector or the `cluster`/`mesh` entities
    /// (reserved identities are added by [`reserved_peers`]).
    pub(crate) fn is_peer(&self, peers: &Peers, identity: &Known) -> bool {
        if peers.is_any() {
            return false;
        }
        match peers {
            Peers::Any => false,
            Peers::Listed {
                selectors,
                entities,
            } => {
                entities.contains(&Entity::Mesh)
                    || (entities.contains(&Entity::Cluster) && identity.cluster == self.local)
                    || selectors.iter().any(|s| {
                        s.matches(
                            &self.local,
                            self.opts.peer_selectors_any_cluster,
                            &identity.cluster,
                            &identity.index,
                        )
                    })
            }
        }
    }
}

/// Reserved identities an identity list never holds and selectors never match: they come from
/// entities only.
pub(crate) fn is_reserved(id: u32) -> bool {
    id <= NumericIdentity::MAX_RESERVED
}

/// The reserved identities `peers` name through entities.
pub(crate) fn reserved_peers(peers: &Peers) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    if let Peers::Listed { entities, .. } = peers {
        for e in entities {
            match e {
                Entity::World => out.insert(NumericIdentity::WORLD.get()),
                Entity::Host | Entity::Cluster | Entity::Mesh => {
                    out.insert(NumericIdentity::HOST.get())
                }
                Entity::All => false,
            };
        }
    }
    out
}

/// Appends the entries of `rule` for `remotes` (ignored when the rule's peers are any).
pub(crate) fn push_entries(
    out: &mut Vec<PolicyEntry>,
    origin: &Arc<PolicyRef>,
    rule: &PeerRule,
    remotes: impl IntoIterator<Item = u32>,
) {
    let all = [PortSpec::ALL];
    let ports: &[PortSpec] = if rule.ports.is_empty() {
        &all
    } else {
        &rule.ports
    };
    let mut push = |remote| {
        for p in ports {
            out.push(PolicyEntry {
                direction: rule.direction,
                remote,
                proto: p.proto,
                ports: p.ports,
                verdict: rule.verdict,
                origin: origin.clone(),
            });
        }
    };
    if rule.peers.is_any() {
        push(Remote::Any);
    } else {
        for id in remotes {
            push(Remote::Identity(id));
        }
    }
}

/// Sorts and deduplicates an endpoint's entries.
pub(crate) fn finish(ep: &mut EndpointPolicy) {
    ep.entries.sort_unstable();
    ep.entries.dedup();
}

/// Resolves `policies` against `identities` for the endpoints of `local_cluster`.
///
/// Identities with a reserved number are ignored (entities stand for them); when an identity
/// number appears twice the last one counts. Every policy given applies, even two with the same
/// origin ([`crate::Resolver`] keeps one policy per origin).
pub fn resolve(
    policies: &[Policy],
    identities: &[IdentityInfo],
    local_cluster: &ClusterName,
    opts: Options,
) -> Resolved {
    let scope = Scope {
        local: local_cluster.clone(),
        opts,
    };
    let known: BTreeMap<u32, Known> = identities
        .iter()
        .filter(|i| !is_reserved(i.id))
        .map(|i| (i.id, Known::new(i)))
        .collect();
    let mut endpoints: BTreeMap<u32, EndpointPolicy> = BTreeMap::new();
    for policy in policies {
        for rule in &policy.rules {
            let subjects: Vec<u32> = known
                .iter()
                .filter(|(_, k)| scope.selects(&rule.subject, k))
                .map(|(id, _)| *id)
                .collect();
            if subjects.is_empty() {
                continue;
            }
            let origin = Arc::new(policy.origin.clone());
            let mut entries = Vec::new();
            for pr in &rule.peer_rules {
                let mut remotes = reserved_peers(&pr.peers);
                if !pr.peers.is_any() {
                    remotes.extend(
                        known
                            .iter()
                            .filter(|(_, k)| scope.is_peer(&pr.peers, k))
                            .map(|(id, _)| *id),
                    );
                }
                push_entries(&mut entries, &origin, pr, remotes);
            }
            for id in subjects {
                let ep = endpoints.entry(id).or_default();
                ep.ingress_enforced |= rule.enforce_ingress;
                ep.egress_enforced |= rule.enforce_egress;
                ep.entries.extend(entries.iter().cloned());
            }
        }
    }
    for ep in endpoints.values_mut() {
        finish(ep);
    }
    Resolved { endpoints }
}
