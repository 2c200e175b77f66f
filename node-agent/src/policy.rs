//! Identity policy in the kernel's maps: which local endpoints (pod cgroups) have a policy for
//! which direction, and per local identity the allowed and denied peers and ports.
//!
//! The resolved rules of one local identity ([`Rule`]: peer identity or any, protocol or any,
//! port range or every port, allow or deny) are compiled per (direction, protocol, peer) into a
//! *port set* ([`compile`]): the port space cut at every rule's bounds, each piece *deny* if a
//! deny rule covers it, else *allow* if an allow rule does, adjacent equal pieces merged — at
//! most [`MAX_PORT_RANGES`] disjoint ranges. `CM_POLICY` maps (local, peer, direction,
//! protocol) to a set's ID and `CM_POLICY_SETS` holds each distinct set once. So the kernel does
//! one exact lookup for the peer and one for "any peer" (then a short scan), whatever the
//! number of identities, and a deny always wins.
//!
//! Order of writes ([`Tables`]): a new set before the entries that point at it, an identity's
//! new entries before its stale ones go, sets no entry uses last; an endpoint's entries before
//! the flag that enforces them, and the flag cleared before its entries go. Other identities'
//! and other peers' entries are never touched by a change, so a new remote identity changes no
//! verdict of an existing one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::datapath::Datapath;
use crate::datapath::Error;
use crate::maps::{self, EndpointVal, PolicyKey, PortSetVal, Proto};
use crate::program::Ops;

/// Which way a connection goes, seen from the local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the endpoint.
    Ingress = 0,
    /// From the endpoint.
    Egress = 1,
}

/// One resolved rule of a local identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Direction.
    pub direction: Direction,
    /// The peer's identity; `None`: any peer.
    pub remote: Option<u32>,
    /// TCP or UDP; `None`: both.
    pub proto: Option<Proto>,
    /// Inclusive port range; `None`: every port.
    pub ports: Option<(u16, u16)>,
    /// A deny rule (wins over any allow).
    pub deny: bool,
    /// The caller's index of the rule (kept in the entry: names what decided).
    pub rule: u32,
}

/// A local endpoint: a cgroup (a pod's, or one of its descendants') and its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// The cgroup's ID (its inode number in cgroup v2).
    pub cgroup_id: u64,
    /// The pod's identity.
    pub identity: u32,
    /// Default deny for ingress (a policy selects it for ingress).
    pub ingress: bool,
    /// Default deny for egress.
    pub egress: bool,
}

/// A verdict entry: allow or deny, and the rule that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Verdict {
    /// A deny.
    pub deny: bool,
    /// The rule's index.
    pub rule: u32,
}

const VERDICT_ALLOW: u8 = 1;
const VERDICT_DENY: u8 = 2;
const EP_INGRESS: u32 = 1;
const EP_EGRESS: u32 = 2;

pub use crate::maps::MAX_PORT_RANGES;

/// A `CM_POLICY` key: (direction, protocol number, peer identity; 0 = any peer) of a local
/// identity.
pub type Group = (Direction, u8, u32);

/// A port set: disjoint inclusive ranges in order, each with its verdict.
pub type PortSet = Vec<(u16, u16, Verdict)>;

/// Encodes a `CM_POLICY` key.
pub fn policy_key(local: u32, g: &Group) -> PolicyKey {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&local.to_ne_bytes());
    k[4..8].copy_from_slice(&g.2.to_ne_bytes());
    k[8] = g.0 as u8;
    k[9] = g.1;
    k
}

/// Decodes a `CM_POLICY` key into (local, group).
pub fn parse_policy_key(k: &PolicyKey) -> (u32, Group) {
    let dir = if k[8] == Direction::Ingress as u8 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    (
        u32::from_ne_bytes([k[0], k[1], k[2], k[3]]),
        (dir, k[9], u32::from_ne_bytes([k[4], k[5], k[6], k[7]])),
    )
}

/// Encodes a port set.
pub fn port_set_val(set: &PortSet) -> PortSetVal {
    let mut v = [0u8; crate::maps::PORT_SET_LEN];
    let n = set.len().min(MAX_PORT_RANGES);
    v[..4].copy_from_slice(&(n as u32).to_ne_bytes());
    for (i, (lo, hi, verdict)) in set.iter().take(n).enumerate() {
        let o = 4 + 12 * i;
        v[o..o + 2].copy_from_slice(&lo.to_ne_bytes());
        v[o + 2..o + 4].copy_from_slice(&hi.to_ne_bytes());
        v[o + 4] = if verdict.deny {
            VERDICT_DENY
        } else {
            VERDICT_ALLOW
        };
        v[o + 8..o + 12].copy_from_slice(&verdict.rule.to_ne_bytes());
    }
    v
}

/// Decodes a port set.
pub fn parse_port_set(v: &PortSetVal) -> PortSet {
    let n = (u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) as usize).min(MAX_PORT_RANGES);
    (0..n)
        .map(|i| {
            let o = 4 + 12 * i;
            (
                u16::from_ne_bytes([v[o], v[o + 1]]),
                u16::from_ne_bytes([v[o + 2], v[o + 3]]),
                Verdict {
                    deny: v[o + 4] == VERDICT_DENY,
                    rule: u32::from_ne_bytes([v[o + 8], v[o + 9], v[o + 10], v[o + 11]]),
                },
            )
        })
        .collect()
}

/// Encodes an endpoint's value.
pub fn endpoint_val(e: &Endpoint) -> EndpointVal {
    let flags = if e.ingress { EP_INGRESS } else { 0 } | if e.egress { EP_EGRESS } else { 0 };
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&e.identity.to_ne_bytes());
    v[4..].copy_from_slice(&flags.to_ne_bytes());
    v
}

/// Decodes an endpoint's value into (identity, ingress, egress).
pub fn parse_endpoint_val(v: &EndpointVal) -> (u32, bool, bool) {
    let flags = u32::from_ne_bytes([v[4], v[5], v[6], v[7]]);
    (
        u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
        flags & EP_INGRESS != 0,
        flags & EP_EGRESS != 0,
    )
}

/// Inclusive port ranges with their verdicts.
type Ranges = Vec<(u32, u32, Verdict)>;

/// A group that needs more disjoint ranges than a port set holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "local identity {local}: {dir} {proto} rules for peer {peer} cut the ports into {ranges} ranges, a port set holds {max}",
    dir = group.0.label(),
    proto = if group.1 == Proto::Udp.number() { "UDP" } else { "TCP" },
    peer = if group.2 == 0 { "any".to_owned() } else { group.2.to_string() },
    max = MAX_PORT_RANGES
)]
pub struct TooManyRanges {
    /// The local identity.
    pub local: u32,
    /// The group.
    pub group: Group,
    /// Ranges it needs.
    pub ranges: usize,
}

/// The port sets of one local identity, by group.
pub fn compile(local: u32, rules: &[Rule]) -> Result<BTreeMap<Group, PortSet>, TooManyRanges> {
    let mut groups: BTreeMap<Group, Ranges> = BTreeMap::new();
    for r in rules {
        let (lo, hi) = r.ports.map_or((0, 65_535), |(a, b)| (a.min(b), a.max(b)));
        let protos: &[Proto] = match r.proto {
            Some(Proto::Tcp) => &[Proto::Tcp],
            Some(Proto::Udp) => &[Proto::Udp],
            None => &[Proto::Tcp, Proto::Udp],
        };
        for p in protos {
            groups
                .entry((r.direction, p.number(), r.remote.unwrap_or(0)))
                .or_default()
                .push((
                    u32::from(lo),
                    u32::from(hi),
                    Verdict {
                        deny: r.deny,
                        rule: r.rule,
                    },
                ));
        }
    }
    let mut out = BTreeMap::new();
    for (group, ranges) in groups {
        let cuts: BTreeSet<u32> = ranges
            .iter()
            .flat_map(|(lo, hi, _)| [*lo, hi + 1])
            .collect();
        let cuts: Vec<u32> = cuts.into_iter().collect();
        // Pieces between cuts with their verdict, adjacent equal pieces merged.
        let mut pieces: PortSet = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let covering = ranges.iter().filter(|(a, b, _)| *a <= lo && hi <= *b);
            // A deny wins; among equals the lowest rule index names the decision.
            let Some(v) = covering
                .map(|(_, _, v)| *v)
                .min_by_key(|v| (!v.deny, v.rule))
            else {
                continue;
            };
            match pieces.last_mut() {
                Some(last) if u32::from(last.1) + 1 == lo && last.2 == v => last.1 = hi as u16,
                _ => pieces.push((lo as u16, hi as u16, v)),
            }
        }
        if pieces.len() > MAX_PORT_RANGES {
            return Err(TooManyRanges {
                local,
                group,
                ranges: pieces.len(),
            });
        }
        out.insert(group, pieces);
    }
    Ok(out)
}

/// What the agent has written to the policy maps, kept to write only differences.
#[derive(Debug, Default)]
pub struct Tables {
    entries: HashMap<u32, BTreeMap<Group, PortSet>>,
    /// Each distinct set: its ID and how many entries point at it.
    sets: HashMap<PortSet, (u32, usize)>,
    next_set: u32,
    endpoints: BTreeMap<u64, Endpoint>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        reason: e.to_string(),
    }
}

impl Tables {
    /// Learns what an earlier agent wrote, so that the same desired state writes nothing.
    pub fn learn(dp: &Datapath) -> Result<Self, Error> {
        let mut t = Self {
            next_set: 1,
            ..Self::default()
        };
        let mut by_id: HashMap<u32, PortSet> = HashMap::new();
        for item in dp.policy_sets.iter() {
            let (id, v) = item.map_err(map_err(maps::POLICY_SETS))?;
            by_id.insert(id, parse_port_set(&v));
            t.next_set = t.next_set.max(id + 1);
        }
        for item in dp.policy.iter() {
            let (k, id) = item.map_err(map_err(maps::POLICY))?;
            let Some(set) = by_id.get(&id) else { continue };
            let (local, group) = parse_policy_key(&k);
            t.entries
                .entry(local)
                .or_default()
                .insert(group, set.clone());
            t.sets.entry(set.clone()).or_insert((id, 0)).1 += 1;
        }
        for item in dp.endpoints.iter() {
            let (cgroup_id, v) = item.map_err(map_err(maps::ENDPOINTS))?;
            let (identity, ingress, egress) = parse_endpoint_val(&v);
            t.endpoints.insert(
                cgroup_id,
                Endpoint {
                    cgroup_id,
                    identity,
                    ingress,
                    egress,
                },
            );
        }
        Ok(t)
    }

    /// Makes `local`'s entries those of `rules` (empty: none): new sets, then new and changed
    /// entries, then the stale entries, then the sets nothing uses. Rules that need more
    /// ranges than a set holds change nothing and are an error.
    pub fn set_identity(
        &mut self,
        dp: &mut Datapath,
        local: u32,
        rules: &[Rule],
    ) -> Result<Ops, Error> {
        let wanted = compile(local, rules).map_err(|e| Error::Map {
            map: maps::POLICY,
            reason: e.to_string(),
        })?;
        let result = self.write_identity(dp, local, wanted);
        if result.is_err() {
            // A write failed part way: what the maps hold is no longer what this copy says.
            // Learn it back, so that the next change deletes what it must (an entry left
            // behind must not keep allowing a peer).
            match Self::learn(dp) {
                Ok(t) => *self = t,
                Err(e) => {
                    tracing::error!(error = %e, "re-reading the policy maps after a failed write")
                }
            }
        }
        result
    }

    fn write_identity(
        &mut self,
        dp: &mut Datapath,
        local: u32,
        wanted: BTreeMap<Group, PortSet>,
    ) -> Result<Ops, Error> {
        let current = self.entries.remove(&local).unwrap_or_default();
        let mut ops = Ops::default();
        let mut released = Vec::new();
        for (g, set) in &wanted {
            if current.get(g) == Some(set) {
                continue;
            }
            let id = match self.sets.get_mut(set) {
                Some((id, refs)) => {
                    *refs += 1;
                    *id
                }
                None => {
                    let id = self.next_set;
                    self.next_set += 1;
                    dp.policy_sets
                        .insert(id, port_set_val(set), 0)
                        .map_err(map_err(maps::POLICY_SETS))?;
                    ops.writes += 1;
                    self.sets.insert(set.clone(), (id, 1));
                    id
                }
            };
            dp.policy
                .insert(policy_key(local, g), id, 0)
                .map_err(map_err(maps::POLICY))?;
            ops.writes += 1;
            if let Some(old) = current.get(g) {
                released.push(old.clone());
            }
        }
        for (g, old) in current.iter().filter(|(g, _)| !wanted.contains_key(*g)) {
            dp.policy
                .remove(&policy_key(local, g))
                .map_err(map_err(maps::POLICY))?;
            ops.deletes += 1;
            released.push(old.clone());
        }
        for set in released {
            if let Some((id, refs)) = self.sets.get_mut(&set) {
                *refs -= 1;
                if *refs == 0 {
                    let id = *id;
                    self.sets.remove(&set);
                    dp.policy_sets
                        .remove(&id)
                        .map_err(map_err(maps::POLICY_SETS))?;
                    ops.deletes += 1;
                }
            }
        }
        if !wanted.is_empty() {
            self.entries.insert(local, wanted);
        }
        Ok(ops)
    }

    /// Makes the endpoints map hold exactly `endpoints`; turns the programs' policy lookups on
    /// while any endpoint is listed. Call after [`Tables::set_identity`] for the identities
    /// that gain enforcement, and before it for those that lose it.
    pub fn set_endpoints(
        &mut self,
        dp: &mut Datapath,
        endpoints: &[Endpoint],
    ) -> Result<Ops, Error> {
        let wanted: BTreeMap<u64, Endpoint> = endpoints.iter().map(|e| (e.cgroup_id, *e)).collect();
        let mut ops = Ops::default();
        if !wanted.is_empty() {
            dp.update_config(|c| c.flags |= maps::CFG_POLICY)?;
        }
        for (id, e) in &wanted {
            if self.endpoints.get(id) != Some(e) {
                dp.endpoints
                    .insert(id, endpoint_val(e), 0)
                    .map_err(map_err(maps::ENDPOINTS))?;
                ops.writes += 1;
            }
        }
        for id in self.endpoints.keys().filter(|k| !wanted.contains_key(*k)) {
            dp.endpoints.remove(id).map_err(map_err(maps::ENDPOINTS))?;
            ops.deletes += 1;
        }
        if wanted.is_empty() {
            dp.update_config(|c| c.flags &= !maps::CFG_POLICY)?;
        }
        self.endpoints = wanted;
        Ok(ops)
    }

    /// The port sets of `local` as programmed, by group.
    pub fn entries(&self, local: u32) -> Option<&BTreeMap<Group, PortSet>> {
        self.entries.get(&local)
    }

    /// Distinct port sets programmed.
    pub fn sets(&self) -> usize {
        self.sets.len()
    }

    /// The endpoints as programmed.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }
}

/// Outcome of a policy decision, as the kernel counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// An allow rule matched (and no deny).
    Allowed = 0,
    /// A deny rule matched.
    DeniedByPolicy = 1,
    /// Enforced and nothing matched.
    DeniedByDefault = 2,
}

impl Outcome {
    /// Every outcome, in the kernel's order.
    pub const ALL: [Outcome; 3] = [
        Outcome::Allowed,
        Outcome::DeniedByPolicy,
        Outcome::DeniedByDefault,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::DeniedByPolicy => "denied_by_policy",
            Outcome::DeniedByDefault => "denied_by_default",
        }
    }
}

impl Direction {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// The kernel's verdict counters for the peer clusters `clusters` (0: addresses of no
/// cluster), summed over CPUs: (cluster ID, direction, outcome, count), counts above zero only.
pub fn verdict_counts(
    dp: &Datapath,
    clusters: &[u16],
) -> Result<Vec<(u16, Direction, Outcome, u64)>, Error> {
    let mut out = Vec::new();
    for c in clusters {
        for dir in [Direction::Ingress, Direction::Egress] {
            for o in Outcome::ALL {
                let idx = (u32::from(*c & 0x0fff) * 2 + dir as u32) * 3 + o as u32;
                let n: u64 = dp
                    .policy_stats
                    .get(&idx, 0)
                    .map_err(map_err(maps::POLICY_STATS))?
                    .iter()
                    .sum();
                if n > 0 {
                    out.push((*c, dir, o, n));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(remote: Option<u32>, ports: Option<(u16, u16)>, deny: bool, idx: u32) -> Rule {
        Rule {
            direction: Direction::Egress,
            remote,
            proto: Some(Proto::Tcp),
            ports,
            deny,
            rule: idx,
        }
    }

    /// The verdict a port gets, as the kernel decides: the peer's set, then any peer's; a deny
    /// from either wins, else an allow.
    fn kernel(sets: &BTreeMap<Group, PortSet>, remote: u32, port: u16) -> Option<bool> {
        let find = |r: u32| {
            sets.get(&(Direction::Egress, Proto::Tcp.number(), r))
                .and_then(|s| s.iter().find(|(lo, hi, _)| *lo <= port && port <= *hi))
                .map(|(_, _, v)| v.deny)
        };
        match (find(remote), find(0)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), _) | (_, Some(false)) => Some(false),
            _ => None,
        }
    }

    #[test]
    fn deny_wins_over_allow_for_the_same_peer_and_for_any_peer() {
        let rules = [
            rule(Some(7), Some((80, 90)), false, 1),
            rule(Some(7), Some((85, 85)), true, 2),
            rule(None, Some((443, 443)), false, 3),
            rule(None, Some((88, 88)), true, 4),
        ];
        let e = compile(100, &rules).unwrap();
        for (port, want) in [
            (80, Some(false)),
            (84, Some(false)),
            (85, Some(true)),
            (86, Some(false)),
            (88, Some(true)),
            (90, Some(false)),
            (91, None),
            (443, Some(false)),
        ] {
            assert_eq!(kernel(&e, 7, port), want, "peer 7, port {port}");
        }
        assert_eq!(kernel(&e, 8, 80), None, "another peer");
        assert_eq!(kernel(&e, 8, 443), Some(false), "any peer");
        assert_eq!(kernel(&e, 8, 88), Some(true), "any peer's deny");
        // Ranges of one set are disjoint and in order.
        for set in e.values() {
            assert!(set.windows(2).all(|w| w[0].1 < w[1].0), "{set:?}");
        }
        assert_eq!(e[&(Direction::Egress, 6, 7)].len(), 3, "80-84, 85, 86-90");
    }

    #[test]
    fn a_set_holds_at_most_max_port_ranges() {
        let many: Vec<Rule> = (0..=MAX_PORT_RANGES as u16)
            .map(|i| rule(Some(7), Some((1000 + 2 * i, 1000 + 2 * i)), false, 0))
            .collect();
        let e = compile(5, &many).unwrap_err();
        assert_eq!(e.ranges, MAX_PORT_RANGES + 1);
        assert!(e.to_string().contains("peer 7"), "{e}");
        assert!(compile(5, &many[..MAX_PORT_RANGES]).is_ok());
    }

    #[test]
    fn every_port_is_one_range_per_protocol_and_values_round_trip() {
        let e = compile(
            5,
            &[Rule {
                direction: Direction::Ingress,
                remote: Some(9),
                proto: None,
                ports: None,
                deny: false,
                rule: 0,
            }],
        )
        .unwrap();
        assert_eq!(e.len(), 2);
        assert!(
            e.values()
                .all(|s| s.len() == 1 && s[0].0 == 0 && s[0].1 == 65_535)
        );
        let set: PortSet = vec![
            (
                53,
                53,
                Verdict {
                    deny: false,
                    rule: 3,
                },
            ),
            (
                8000,
                8080,
                Verdict {
                    deny: true,
                    rule: 77,
                },
            ),
        ];
        assert_eq!(parse_port_set(&port_set_val(&set)), set);
        let g: Group = (Direction::Egress, 17, 0x0002_0001);
        assert_eq!(parse_policy_key(&policy_key(42, &g)), (42, g));
        let ep = Endpoint {
            cgroup_id: 42,
            identity: 0x0001_0005,
            ingress: true,
            egress: false,
        };
        assert_eq!(
            parse_endpoint_val(&endpoint_val(&ep)),
            (0x0001_0005, true, false)
        );
    }
}
