//! Identity policy in the kernel's maps: which local endpoints (pod cgroups) have a policy for
//! which direction, and per local identity the allowed and denied peers and ports.
//!
//! The resolved rules of one local identity ([`Rule`]: peer identity or any, protocol or any,
//! port range or every port, allow or deny) are compiled into disjoint longest-prefix entries
//! of `CM_POLICY` ([`compile`]): per (direction, protocol, peer) the port space is cut at every
//! rule's bounds, each piece takes *deny* if a deny rule covers it, else *allow* if an allow
//! rule does, and the pieces become aligned power-of-two blocks (a port prefix). So the kernel
//! needs one lookup for the peer and one for "any peer", and a deny always wins.
//!
//! Order of writes ([`Tables`]): an identity's new entries before its stale ones go (a port
//! changes verdict once, never passes through "no entry"), an endpoint's entries before the
//! flag that enforces them, and the flag cleared before its entries go. Other identities' and
//! other peers' entries are never touched by a change, so a new remote identity changes no
//! verdict of an existing one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya::maps::lpm_trie::Key;

use crate::datapath::Datapath;
use crate::datapath::Error;
use crate::maps::{self, EndpointVal, PolicyData, PolicyVal, Proto};
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
/// Bits of the key before the port.
const PORT_PREFIX_START: u32 = 80;

/// An entry of `CM_POLICY`: (prefix length, key data).
pub type EntryKey = (u32, PolicyData);

/// Encodes the data of a policy key.
pub fn key_data(local: u32, dir: Direction, proto: Proto, remote: u32, port: u16) -> PolicyData {
    let mut d = [0u8; 12];
    d[..4].copy_from_slice(&local.to_be_bytes());
    d[4] = dir as u8;
    d[5] = proto.number();
    d[6..10].copy_from_slice(&remote.to_be_bytes());
    d[10..12].copy_from_slice(&port.to_be_bytes());
    d
}

/// Decodes the data of a policy key into (local, direction, protocol number, remote, port).
pub fn parse_key_data(d: &PolicyData) -> (u32, u8, u8, u32, u16) {
    (
        u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
        d[4],
        d[5],
        u32::from_be_bytes([d[6], d[7], d[8], d[9]]),
        u16::from_be_bytes([d[10], d[11]]),
    )
}

/// Encodes a verdict.
pub fn verdict_val(v: Verdict) -> PolicyVal {
    let mut out = [0u8; 8];
    out[0] = if v.deny { VERDICT_DENY } else { VERDICT_ALLOW };
    out[4..8].copy_from_slice(&v.rule.to_ne_bytes());
    out
}

/// Decodes a verdict.
pub fn parse_verdict_val(v: &PolicyVal) -> Verdict {
    Verdict {
        deny: v[0] == VERDICT_DENY,
        rule: u32::from_ne_bytes([v[4], v[5], v[6], v[7]]),
    }
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

/// The inclusive range `[lo, hi]` as aligned blocks: (first port, prefix bits over the port).
pub fn range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

/// Inclusive port ranges with their verdicts.
type Ranges = Vec<(u32, u32, Verdict)>;

/// The `CM_POLICY` entries of one local identity.
pub fn compile(local: u32, rules: &[Rule]) -> BTreeMap<EntryKey, Verdict> {
    // Per (direction, protocol, peer): the rules' port ranges with their verdicts.
    let mut groups: BTreeMap<(Direction, u8, u32), Ranges> = BTreeMap::new();
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
    for ((dir, proto, remote), ranges) in groups {
        let cuts: BTreeSet<u32> = ranges
            .iter()
            .flat_map(|(lo, hi, _)| [*lo, hi + 1])
            .collect();
        let cuts: Vec<u32> = cuts.into_iter().collect();
        // Pieces between cuts with their verdict, adjacent equal pieces merged.
        let mut pieces: Vec<(u32, u32, Verdict)> = Vec::new();
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
                Some(last) if last.1 + 1 == lo && last.2 == v => last.1 = hi,
                _ => pieces.push((lo, hi, v)),
            }
        }
        for (lo, hi, v) in pieces {
            for (port, bits) in range_prefixes(lo as u16, hi as u16) {
                let d = key_data(local, dir, proto_of(proto), remote, port);
                out.insert((PORT_PREFIX_START + bits, d), v);
            }
        }
    }
    out
}

fn proto_of(n: u8) -> Proto {
    Proto::from_number(n).unwrap_or(Proto::Tcp)
}

/// What the agent has written to the policy maps, kept to write only differences.
#[derive(Debug, Default)]
pub struct Tables {
    entries: HashMap<u32, BTreeMap<EntryKey, Verdict>>,
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
        let mut t = Self::default();
        for item in dp.policy.iter() {
            let (k, v) = item.map_err(map_err(maps::POLICY))?;
            let data = k.data();
            let (local, ..) = parse_key_data(&data);
            t.entries
                .entry(local)
                .or_default()
                .insert((k.prefix_len(), data), parse_verdict_val(&v));
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

    /// Makes `local`'s entries those of `rules` (empty: none): new and changed entries first,
    /// then the stale ones.
    pub fn set_identity(
        &mut self,
        dp: &mut Datapath,
        local: u32,
        rules: &[Rule],
    ) -> Result<Ops, Error> {
        let wanted = compile(local, rules);
        let empty = BTreeMap::new();
        let current = self.entries.get(&local).unwrap_or(&empty);
        let mut ops = Ops::default();
        for (k, v) in &wanted {
            if current.get(k) != Some(v) {
                dp.policy
                    .insert(&Key::new(k.0, k.1), verdict_val(*v), 0)
                    .map_err(map_err(maps::POLICY))?;
                ops.writes += 1;
            }
        }
        for k in current.keys().filter(|k| !wanted.contains_key(*k)) {
            dp.policy
                .remove(&Key::new(k.0, k.1))
                .map_err(map_err(maps::POLICY))?;
            ops.deletes += 1;
        }
        if wanted.is_empty() {
            self.entries.remove(&local);
        } else {
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

    /// The entries of `local` as programmed.
    pub fn entries(&self, local: u32) -> Option<&BTreeMap<EntryKey, Verdict>> {
        self.entries.get(&local)
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

    /// The verdict a port gets from compiled entries, as the kernel's longest-prefix match
    /// then the deny-wins combination of peer and any-peer does.
    fn kernel(entries: &BTreeMap<EntryKey, Verdict>, remote: u32, port: u16) -> Option<bool> {
        let lpm = |r: u32| {
            entries
                .iter()
                .filter(|((len, d), _)| {
                    let (_, _, _, rem, p) = parse_key_data(d);
                    let bits = len - PORT_PREFIX_START;
                    let mask = if bits == 0 {
                        0
                    } else {
                        u16::MAX << (16 - bits)
                    };
                    rem == r && (p & mask) == (port & mask)
                })
                .max_by_key(|((len, _), _)| *len)
                .map(|(_, v)| v.deny)
        };
        match (lpm(remote), lpm(0)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), _) | (_, Some(false)) => Some(false),
            _ => None,
        }
    }

    #[test]
    fn ranges_become_aligned_blocks() {
        assert_eq!(range_prefixes(0, 65_535), vec![(0, 0)]);
        assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(range_prefixes(8080, 8083), vec![(8080, 14)]);
        assert_eq!(
            range_prefixes(1, 6),
            vec![(1, 16), (2, 15), (4, 15), (6, 16)]
        );
        assert_eq!(range_prefixes(65_535, 65_535), vec![(65_535, 16)]);
        // Every range covers exactly its ports.
        for (lo, hi) in [(0u16, 0u16), (3, 1000), (1024, 65_535), (7, 8)] {
            let covered: u32 = range_prefixes(lo, hi)
                .iter()
                .map(|(_, bits)| 1u32 << (16 - bits))
                .sum();
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1, "{lo}-{hi}");
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
        let e = compile(100, &rules);
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
        // No two entries of one group overlap.
        let mut seen: BTreeMap<(u8, u8, u32), Vec<(u32, u32)>> = BTreeMap::new();
        for (len, d) in e.keys() {
            let (_, dir, proto, rem, p) = parse_key_data(d);
            let size = 1u32 << (16 - (len - PORT_PREFIX_START));
            let span = (u32::from(p), u32::from(p) + size - 1);
            let list = seen.entry((dir, proto, rem)).or_default();
            assert!(
                list.iter().all(|(a, b)| span.1 < *a || *b < span.0),
                "overlap {span:?} in {list:?}"
            );
            list.push(span);
        }
    }

    #[test]
    fn every_port_is_one_entry_per_protocol_and_values_round_trip() {
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
        );
        assert_eq!(e.len(), 2);
        assert!(e.keys().all(|(len, _)| *len == PORT_PREFIX_START));
        let v = Verdict {
            deny: true,
            rule: 77,
        };
        assert_eq!(parse_verdict_val(&verdict_val(v)), v);
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
        assert_eq!(
            parse_key_data(&key_data(1, Direction::Egress, Proto::Udp, 2, 53)),
            (1, 1, 17, 2, 53)
        );
    }
}
