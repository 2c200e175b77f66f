//! The incremental resolver the node agent keeps: policies and identities in, the endpoints
//! whose resolved policy changed out.
//!
//! Each rule keeps the local identities its endpoint selector selects and, per peer rule, the
//! identities its selectors and entities name. Each endpoint keeps a reference count per entry
//! (two rules of one policy may give the same entry). A change re-evaluates only the changed
//! identity (or policy) against the rules and adjusts the counts it affects: one identity
//! change costs (rules × endpoints it touches × ports), not a recomputation. An endpoint is
//! reported changed only when an entry appeared or disappeared for good, or its enforcement
//! changed, within the operation. The sorted entry list is built on first read after a change.
//!
//! Must give exactly what [`crate::resolve`] gives on the same inputs.

use std::collections::hash_map;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use model::ClusterName;

use crate::resolve::{
    EndpointPolicy, IdentityInfo, Known, Options, PolicyEntry, Resolved, Scope, is_reserved,
    push_entries, reserved_peers,
};
use crate::rule::{PeerRule, Policy, PolicyRef, Rule};

/// Policies and identities, with every selected endpoint's resolved policy kept up to date.
#[derive(Debug, Clone)]
pub struct Resolver {
    scope: Scope,
    identities: BTreeMap<u32, Known>,
    policies: BTreeMap<PolicyRef, Compiled>,
    endpoints: Endpoints,
}

/// A policy with the identity sets of its rules.
#[derive(Debug, Clone)]
struct Compiled {
    /// The policy's origin, as its entries share it.
    origin: Arc<PolicyRef>,
    policy: Policy,
    rules: Vec<RuleState>,
}

#[derive(Debug, Clone, Default)]
struct RuleState {
    /// Local identities the endpoint selector selects.
    subjects: BTreeSet<u32>,
    /// Per peer rule: the non-reserved identities it names.
    peers: Vec<BTreeSet<u32>>,
}

/// Whether an endpoint is selected, and which directions are enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Flags {
    selected: bool,
    ingress: bool,
    egress: bool,
}

#[derive(Debug, Clone, Default)]
struct Endpoint {
    /// Selecting rules, and how many of them enforce each direction.
    rules: u32,
    ingress: u32,
    egress: u32,
    /// Entry → number of (rule, peer rule, remote, port) contributions.
    counts: BTreeMap<PolicyEntry, u32>,
    /// The sorted list, built on first read.
    view: OnceLock<EndpointPolicy>,
}

impl Endpoint {
    fn flags(&self) -> Flags {
        Flags {
            selected: self.rules > 0,
            ingress: self.ingress > 0,
            egress: self.egress > 0,
        }
    }

    fn view(&self) -> &EndpointPolicy {
        self.view.get_or_init(|| EndpointPolicy {
            ingress_enforced: self.ingress > 0,
            egress_enforced: self.egress > 0,
            entries: self.counts.keys().cloned().collect(),
        })
    }
}

/// What one operation changed: endpoints' flags before it, and entries whose presence it
/// flipped (+1 appeared, -1 disappeared; back to 0 is no change).
#[derive(Debug, Default)]
struct Tracker {
    flags: BTreeMap<u32, Flags>,
    flips: HashMap<(u32, PolicyEntry), i8>,
}

#[derive(Debug, Clone, Default)]
struct Endpoints(BTreeMap<u32, Endpoint>);

impl Endpoints {
    fn get(&mut self, id: u32, tracker: &mut Tracker) -> &mut Endpoint {
        let ep = self.0.entry(id).or_default();
        tracker.flags.entry(id).or_insert_with(|| ep.flags());
        ep
    }

    /// Adds (`add`) or removes one contribution of `entry` to endpoint `id`.
    fn count(&mut self, id: u32, entry: PolicyEntry, add: bool, tracker: &mut Tracker) {
        let ep = self.get(id, tracker);
        let flip = match ep.counts.entry(entry.clone()) {
            std::collections::btree_map::Entry::Vacant(v) => {
                if !add {
                    return; // never counted: nothing to remove (not reached)
                }
                v.insert(1);
                1
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                if add {
                    *o.get_mut() += 1;
                    0
                } else if *o.get() == 1 {
                    o.remove();
                    -1
                } else {
                    *o.get_mut() -= 1;
                    0
                }
            }
        };
        if flip != 0 {
            match tracker.flips.entry((id, entry)) {
                hash_map::Entry::Vacant(v) => {
                    v.insert(flip);
                }
                hash_map::Entry::Occupied(o) => {
                    // the opposite flip earlier in this operation: back where it was
                    o.remove();
                }
            }
        }
    }

    /// Adds or removes rule `rule` (of `origin`, with peer sets `peers`) on endpoint `id`.
    fn subject(
        &mut self,
        id: u32,
        origin: &Arc<PolicyRef>,
        rule: &Rule,
        peers: &[BTreeSet<u32>],
        add: bool,
        tracker: &mut Tracker,
    ) {
        let ep = self.get(id, tracker);
        let step = |n: &mut u32, on: bool| {
            if on {
                *n = if add { *n + 1 } else { n.saturating_sub(1) };
            }
        };
        step(&mut ep.rules, true);
        step(&mut ep.ingress, rule.enforce_ingress);
        step(&mut ep.egress, rule.enforce_egress);
        let mut entries = Vec::new();
        for (pr, members) in rule.peer_rules.iter().zip(peers) {
            push_entries(
                &mut entries,
                origin,
                pr,
                reserved_peers(&pr.peers)
                    .into_iter()
                    .chain(members.iter().copied()),
            );
        }
        for e in entries {
            self.count(id, e, add, tracker);
        }
    }

    /// Adds or removes remote `remote` of peer rule `pr` on every endpoint in `subjects`.
    fn remote(
        &mut self,
        subjects: &BTreeSet<u32>,
        origin: &Arc<PolicyRef>,
        pr: &PeerRule,
        remote: u32,
        add: bool,
        tracker: &mut Tracker,
    ) {
        let mut entries = Vec::new();
        push_entries(&mut entries, origin, pr, [remote]);
        for &id in subjects {
            for e in &entries {
                self.count(id, e.clone(), add, tracker);
            }
        }
    }

    /// Ends an operation: the endpoints whose policy changed, with their views reset and the
    /// unselected ones dropped.
    fn finish(&mut self, tracker: Tracker) -> BTreeSet<u32> {
        let mut changed: BTreeSet<u32> = tracker.flips.into_keys().map(|(id, _)| id).collect();
        for (id, before) in tracker.flags {
            let now = self.0.get(&id).map(Endpoint::flags).unwrap_or_default();
            if now != before {
                changed.insert(id);
            }
        }
        for id in &changed {
            if let Some(ep) = self.0.get_mut(id) {
                ep.view = OnceLock::new();
            }
        }
        self.0.retain(|_, ep| ep.rules > 0);
        changed
    }
}

impl Resolver {
    /// An empty resolver for the endpoints of `local_cluster`.
    pub fn new(local_cluster: ClusterName, opts: Options) -> Self {
        Self {
            scope: Scope {
                local: local_cluster,
                opts,
            },
            identities: BTreeMap::new(),
            policies: BTreeMap::new(),
            endpoints: Endpoints::default(),
        }
    }

    /// The resolved policy of a local identity, `None` when no policy selects it. The first
    /// read after a change sorts the endpoint's entries.
    pub fn endpoint(&self, id: u32) -> Option<&EndpointPolicy> {
        self.endpoints.0.get(&id).map(Endpoint::view)
    }

    /// Every selected local identity and its resolved policy.
    pub fn endpoints(&self) -> impl Iterator<Item = (u32, &EndpointPolicy)> {
        self.endpoints.0.iter().map(|(id, ep)| (*id, ep.view()))
    }

    /// A copy of everything, as [`crate::resolve`] returns it.
    pub fn snapshot(&self) -> Resolved {
        Resolved {
            endpoints: self.endpoints().map(|(id, ep)| (id, ep.clone())).collect(),
        }
    }

    /// Adds or replaces an identity, returning the endpoints whose policy changed. Reserved
    /// identities are ignored (entities stand for them).
    pub fn upsert_identity(&mut self, identity: IdentityInfo) -> BTreeSet<u32> {
        if is_reserved(identity.id) {
            return BTreeSet::new();
        }
        if let Some(old) = self.identities.get(&identity.id)
            && old.cluster == identity.cluster
            && old.labels == identity.labels
        {
            return BTreeSet::new();
        }
        self.identities.insert(identity.id, Known::new(&identity));
        self.reevaluate(identity.id)
    }

    /// Removes an identity, returning the endpoints whose policy changed.
    pub fn remove_identity(&mut self, id: u32) -> BTreeSet<u32> {
        if self.identities.remove(&id).is_none() {
            return BTreeSet::new();
        }
        self.reevaluate(id)
    }

    /// Adds a policy, or replaces the one with the same [`Policy::origin`], returning the
    /// endpoints whose policy changed.
    pub fn upsert_policy(&mut self, policy: Policy) -> BTreeSet<u32> {
        let mut tracker = Tracker::default();
        self.drop_policy(&policy.origin, &mut tracker);
        let (identities, scope) = (&self.identities, &self.scope);
        let rules: Vec<RuleState> = policy
            .rules
            .iter()
            .map(|rule| RuleState {
                subjects: identities
                    .iter()
                    .filter(|(_, k)| scope.selects(&rule.subject, k))
                    .map(|(id, _)| *id)
                    .collect(),
                peers: rule
                    .peer_rules
                    .iter()
                    .map(|pr| {
                        identities
                            .iter()
                            .filter(|(_, k)| scope.is_peer(&pr.peers, k))
                            .map(|(id, _)| *id)
                            .collect()
                    })
                    .collect(),
            })
            .collect();
        let origin = Arc::new(policy.origin.clone());
        for (rule, state) in policy.rules.iter().zip(&rules) {
            for &id in &state.subjects {
                self.endpoints
                    .subject(id, &origin, rule, &state.peers, true, &mut tracker);
            }
        }
        self.policies.insert(
            policy.origin.clone(),
            Compiled {
                origin,
                policy,
                rules,
            },
        );
        self.endpoints.finish(tracker)
    }

    /// Removes a policy, returning the endpoints whose policy changed.
    pub fn remove_policy(&mut self, origin: &PolicyRef) -> BTreeSet<u32> {
        let mut tracker = Tracker::default();
        self.drop_policy(origin, &mut tracker);
        self.endpoints.finish(tracker)
    }

    fn drop_policy(&mut self, origin: &PolicyRef, tracker: &mut Tracker) {
        let Some(old) = self.policies.remove(origin) else {
            return;
        };
        for (rule, state) in old.policy.rules.iter().zip(&old.rules) {
            for &id in &state.subjects {
                self.endpoints
                    .subject(id, &old.origin, rule, &state.peers, false, tracker);
            }
        }
    }

    /// Re-evaluates identity `id` (present, or just removed) against every rule.
    fn reevaluate(&mut self, id: u32) -> BTreeSet<u32> {
        let Self {
            scope,
            identities,
            policies,
            endpoints,
        } = self;
        let identity = identities.get(&id);
        let mut tracker = Tracker::default();
        for c in policies.values_mut() {
            let origin = &c.origin;
            for (rule, state) in c.policy.rules.iter().zip(&mut c.rules) {
                let was = state.subjects.contains(&id);
                let now = identity.is_some_and(|k| scope.selects(&rule.subject, k));
                // Leaving subject: withdraw with the old peer sets.
                if was && !now {
                    endpoints.subject(id, origin, rule, &state.peers, false, &mut tracker);
                    state.subjects.remove(&id);
                }
                // Peer sets: adjust the remaining subjects.
                for (pr, members) in rule.peer_rules.iter().zip(&mut state.peers) {
                    let peer = identity.is_some_and(|k| scope.is_peer(&pr.peers, k));
                    if peer != members.contains(&id) {
                        if peer {
                            members.insert(id);
                        } else {
                            members.remove(&id);
                        }
                        endpoints.remote(&state.subjects, origin, pr, id, peer, &mut tracker);
                    }
                }
                // Joining subject: apply with the new peer sets.
                if now && !was {
                    state.subjects.insert(id);
                    endpoints.subject(id, origin, rule, &state.peers, true, &mut tracker);
                }
            }
        }
        endpoints.finish(tracker)
    }
}
