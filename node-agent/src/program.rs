//! Desired services → map entries. Only differences are written, in an order that never lets
//! a connect() see a half-written service: services no longer desired go first (the service,
//! then its slots), then backends nothing references any more; then new backends, slots, the
//! services' counts, slots past the new counts, and last the backends no longer used.
//!
//! Each desired service is checked on its own, against the maps' capacities, before the first
//! write (`plan`): one that cannot be programmed (a tier over [`MAX_TIER_SLOTS`], a frontend
//! another service claims, no room left in a map) is refused alone, named in a [`Refusal`]
//! with the limit it broke, and everything else is programmed. Bad input never erases good
//! state: a refused service that was programmed before keeps its last programming. Only a
//! failed map operation fails a whole [`Programmer::apply`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Instant;

use model::service::ServiceName;

use crate::datapath::{Datapath, Error};
use crate::ids::{self, IdPool};
use crate::maps::{
    self, BackendEntry, Frontend, GroupEntry, MAX_TIER_SLOTS, Proto, SVC_GROUPS_INLINE,
    SVC_WEIGHTED, SvcEntry, TIERS,
};
#[cfg(test)]
use crate::maps::{MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS};

/// One backend of a desired service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    /// Address and port.
    pub addr: SocketAddr,
    /// Its cluster's ID.
    pub cluster_id: u16,
    /// Its zone index (0 = unknown).
    pub zone: u16,
}

/// A service as it should be programmed: a frontend and its backends in tiers (the first
/// tier with a healthy backend serves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// The frontend.
    pub frontend: Frontend,
    /// The Service it comes from, when known (named in refusals).
    pub service: Option<ServiceName>,
    /// Backends per tier.
    pub tiers: [Vec<BackendSpec>; TIERS],
    /// How new connections are split (spill-over, weights).
    pub balancing: Balancing,
}

/// How a service splits new connections (ADR 0019). The default is the plain tiers: all or
/// nothing, unweighted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balancing {
    /// Overprovisioning factor × 100 (140 = 1.4); 0 = all or nothing.
    pub overprov_pct: u16,
    /// Below this many healthy backends the first tier is skipped.
    pub min_healthy: u16,
    /// The first tier's backends grouped by cluster, in slot order: (backends, weight). Empty:
    /// unweighted.
    pub groups: Vec<(u16, u16)>,
}

/// A frontend as read back from the maps, with its backends per tier.
pub type Programmed = (Frontend, [Vec<BackendEntry>; TIERS]);

/// Why a desired state was not programmed at all.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// More than the maps hold (the IP cache, which is all or nothing).
    #[error("{what}: {wanted} wanted, the map holds {capacity}")]
    Capacity {
        /// Which limit.
        what: String,
        /// How many were asked for.
        wanted: usize,
        /// The limit.
        capacity: usize,
    },
    /// A map operation failed.
    #[error(transparent)]
    Map(#[from] Error),
}

fn named(service: Option<&ServiceName>) -> String {
    service.map_or_else(|| "another service".to_owned(), ToString::to_string)
}

/// Why one desired service was not programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// A tier has more backends than a tier of the slots map holds.
    #[error("tiers[{tier}] has {wanted} backends, a tier holds {capacity} (MAX_TIER_SLOTS)")]
    TierFull {
        /// The tier.
        tier: usize,
        /// Its backends.
        wanted: usize,
        /// The limit.
        capacity: usize,
    },
    /// Another desired service has the same frontend and comes first (by frontend, then
    /// service name); it claims the frontend.
    #[error("frontend claimed by {}", named(.claimed_by.as_ref()))]
    DuplicateFrontend {
        /// The service that claims it.
        claimed_by: Option<ServiceName>,
    },
    /// The services map has no room for one more service.
    #[error("the services map is full: {capacity} services (--max-services)")]
    ServicesFull {
        /// The limit.
        capacity: usize,
    },
    /// The backends map has no room for the service's new backends.
    #[error("{wanted} new backends, {free} free of {capacity} (4 × --max-services)")]
    BackendsFull {
        /// Backends the service adds.
        wanted: usize,
        /// Room left.
        free: usize,
        /// The limit.
        capacity: usize,
    },
    /// A weighted tier with more cluster groups than a tier holds, or groups that do not
    /// cover the tier.
    #[error(
        "{groups} cluster groups over {backends} backends; a weighted tier holds {capacity} groups covering all its backends (MAX_GROUPS)"
    )]
    BadGroups {
        /// Groups asked for.
        groups: usize,
        /// Backends they cover.
        backends: usize,
        /// The limit.
        capacity: usize,
    },
    /// The cluster groups map has no room for one more service weighted over five or more
    /// clusters.
    #[error(
        "cluster weights over five or more cluster groups are on {capacity} services already, as many as CM_GROUPS holds (--max-services / 4, at least 64; up to four groups have no limit)"
    )]
    WeightedFull {
        /// The limit.
        capacity: usize,
    },
    /// The slots map has no room for the service's new slots.
    #[error("{wanted} new slots, {free} free of {capacity} (8 × --max-services)")]
    SlotsFull {
        /// Slots the service adds.
        wanted: usize,
        /// Room left.
        free: usize,
        /// The limit.
        capacity: usize,
    },
}

impl Reason {
    /// Every [`Reason::kind`], for metrics.
    pub const KINDS: [&'static str; 7] = [
        "tier_full",
        "duplicate_frontend",
        "services_full",
        "backends_full",
        "slots_full",
        "bad_groups",
        "weighted_full",
    ];

    /// A short name of the reason (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TierFull { .. } => Self::KINDS[0],
            Self::DuplicateFrontend { .. } => Self::KINDS[1],
            Self::ServicesFull { .. } => Self::KINDS[2],
            Self::BackendsFull { .. } => Self::KINDS[3],
            Self::SlotsFull { .. } => Self::KINDS[4],
            Self::BadGroups { .. } => Self::KINDS[5],
            Self::WeightedFull { .. } => Self::KINDS[6],
        }
    }
}

/// A desired service that was not programmed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Its frontend.
    pub frontend: Frontend,
    /// The Service, when known.
    pub service: Option<ServiceName>,
    /// Why.
    pub reason: Reason,
    /// Whether the maps keep the frontend's previous programming (it was programmed before).
    pub kept_previous: bool,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.service {
            Some(s) => write!(f, "service {s} frontend {}: {}", self.frontend, self.reason),
            None => write!(f, "frontend {}: {}", self.frontend, self.reason),
        }
    }
}

/// What one [`Programmer::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    /// Entries written.
    pub writes: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Desired services not programmed, in frontend order (always empty for the IP cache).
    pub refused: Vec<Refusal>,
}

/// The capacities a plan respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    services: usize,
    backends: usize,
    slots: usize,
    tier_slots: usize,
    /// Weighted services.
    weighted: usize,
}

impl Limits {
    /// The maps of `bpf/sock_lb.c` at their default sizes.
    #[cfg(test)]
    const MAPS: Self = Self {
        services: MAX_SERVICES,
        backends: MAX_BACKENDS,
        slots: MAX_SLOTS,
        tier_slots: MAX_TIER_SLOTS,
        weighted: MAX_SERVICES / 4,
    };

    /// The maps as loaded.
    fn of(sizes: maps::Sizes) -> Self {
        Self {
            services: sizes.services as usize,
            backends: sizes.backends() as usize,
            slots: sizes.slots() as usize,
            tier_slots: MAX_TIER_SLOTS,
            weighted: sizes.weighted() as usize,
        }
    }
}

/// A service as the maps hold it: its entry and the backends its slots reference.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    entry: SvcEntry,
    backends: BTreeSet<SocketAddr>,
    /// The backends per tier in slot order (for the healthy counts).
    tiers: [Vec<SocketAddr>; TIERS],
    /// The first tier's groups (start, len, weight) when weighted.
    groups: Vec<(u16, u16, u16)>,
}

impl Installed {
    /// Whether it holds a `CM_GROUPS` index (weighted, its groups not inline).
    fn uses_group_index(&self) -> bool {
        !self.groups.is_empty() && self.entry.flags & SVC_GROUPS_INLINE == 0
    }

    /// `CM_SLOTS` entries it takes (inline tiers take none).
    fn slots(&self) -> usize {
        self.entry.counts.iter().map(|c| maps::map_slots(*c)).sum()
    }
}

/// What an apply does with each desired service.
#[derive(Debug, Default)]
struct Plan<'a> {
    /// Services to program, by frontend.
    accepted: BTreeMap<Frontend, &'a DesiredService>,
    /// Every desired frontend: a programmed frontend not in it is deleted.
    desired: BTreeSet<Frontend>,
    /// Backends referenced while the plan is carried out (old slots and new); the others are
    /// deleted first.
    used_backends: HashSet<SocketAddr>,
    /// Backends referenced once it is carried out; the others are deleted last.
    final_backends: HashSet<SocketAddr>,
    /// Services refused, in frontend order.
    refused: Vec<Refusal>,
}

/// Decides, service by service, what `desired` can have of the maps, given what they hold.
///
/// For each frontend the first service (by frontend, then service name) claims it; the others
/// are refused. A service with a tier over the limit is refused. Room in the maps is counted as
/// the maps will be while the plan is carried out (services no longer desired are gone, every
/// still-desired service's old slots are still there): services already programmed are served
/// first, then new ones, each in frontend order; a service that does not fit is refused. A
/// refused service that was programmed keeps its old entries.
fn plan<'a>(
    current: &BTreeMap<Frontend, Installed>,
    desired: &'a [DesiredService],
    limits: Limits,
) -> Plan<'a> {
    let mut order: Vec<&DesiredService> = desired.iter().collect();
    order.sort_by(|a, b| (a.frontend, &a.service).cmp(&(b.frontend, &b.service)));
    let mut out = Plan::default();
    let mut claimants: Vec<&DesiredService> = Vec::new();
    for s in order {
        match claimants.last() {
            Some(first) if first.frontend == s.frontend => out.refused.push(Refusal {
                frontend: s.frontend,
                service: s.service.clone(),
                reason: Reason::DuplicateFrontend {
                    claimed_by: first.service.clone(),
                },
                kept_previous: false,
            }),
            _ => claimants.push(s),
        }
    }
    // What stays in the maps while the plan is carried out.
    let (mut used_services, mut used_slots, mut used_weighted) = (0usize, 0usize, 0usize);
    for s in &claimants {
        out.desired.insert(s.frontend);
        if let Some(old) = current.get(&s.frontend) {
            used_services += 1;
            used_slots += old.slots();
            used_weighted += usize::from(old.uses_group_index());
            out.used_backends.extend(&old.backends);
        }
    }
    let (programmed, new): (Vec<_>, Vec<_>) = claimants
        .into_iter()
        .partition(|s| current.contains_key(&s.frontend));
    for s in programmed.into_iter().chain(new) {
        let old = current.get(&s.frontend);
        let refuse = if let Some((tier, list)) = s
            .tiers
            .iter()
            .enumerate()
            .find(|(_, l)| l.len() > limits.tier_slots)
        {
            Some(Reason::TierFull {
                tier,
                wanted: list.len(),
                capacity: limits.tier_slots,
            })
        } else if !s.balancing.groups.is_empty()
            && (s.balancing.groups.len() > maps::MAX_GROUPS
                || s.balancing
                    .groups
                    .iter()
                    .map(|(n, _)| usize::from(*n))
                    .sum::<usize>()
                    != s.tiers[0].len())
        {
            Some(Reason::BadGroups {
                groups: s.balancing.groups.len(),
                backends: s.tiers[0].len(),
                capacity: maps::MAX_GROUPS,
            })
        } else {
            let new_service = usize::from(old.is_none());
            let new_weighted = usize::from(
                !s.balancing.groups.is_empty()
                    && !maps::groups_fit_inline(s.balancing.groups.len(), s.tiers[1].len())
                    && old.is_none_or(|o| !o.uses_group_index()),
            );
            let new_slots: usize = s
                .tiers
                .iter()
                .enumerate()
                .map(|(t, l)| {
                    maps::map_slots(u16::try_from(l.len()).unwrap_or(u16::MAX))
                        .saturating_sub(old.map_or(0, |o| maps::map_slots(o.entry.counts[t])))
                })
                .sum();
            let new_backends: BTreeSet<SocketAddr> = s
                .tiers
                .iter()
                .flatten()
                .map(|b| b.addr)
                .filter(|a| !out.used_backends.contains(a))
                .collect();
            if used_services + new_service > limits.services {
                Some(Reason::ServicesFull {
                    capacity: limits.services,
                })
            } else if used_slots + new_slots > limits.slots {
                Some(Reason::SlotsFull {
                    wanted: new_slots,
                    free: limits.slots.saturating_sub(used_slots),
                    capacity: limits.slots,
                })
            } else if used_weighted + new_weighted > limits.weighted {
                Some(Reason::WeightedFull {
                    capacity: limits.weighted,
                })
            } else if out.used_backends.len() + new_backends.len() > limits.backends {
                Some(Reason::BackendsFull {
                    wanted: new_backends.len(),
                    free: limits.backends.saturating_sub(out.used_backends.len()),
                    capacity: limits.backends,
                })
            } else {
                used_services += new_service;
                used_slots += new_slots;
                used_weighted += new_weighted;
                out.used_backends.extend(new_backends);
                None
            }
        };
        match refuse {
            None => {
                out.final_backends
                    .extend(s.tiers.iter().flatten().map(|b| b.addr));
                out.accepted.insert(s.frontend, s);
            }
            Some(reason) => {
                if let Some(old) = old {
                    out.final_backends.extend(&old.backends);
                }
                out.refused.push(Refusal {
                    frontend: s.frontend,
                    service: s.service.clone(),
                    reason,
                    kept_previous: old.is_some(),
                });
            }
        }
    }
    out.refused
        .sort_by(|a, b| (a.frontend, &a.service).cmp(&(b.frontend, &b.service)));
    out
}

/// The share of new connections each tier gets, in whole percent, from a service's entry: the
/// kernel's spill-over rule (`spills` in `bpf/sock_lb.c`) on the agent's healthy counts.
pub fn tier_shares(e: &SvcEntry) -> [u32; TIERS] {
    let [n0, n1] = e.counts.map(u64::from);
    let [h0, h1] = e.healthy.map(u64::from);
    if n0 == 0 {
        return [0, if n1 > 0 { 100 } else { 0 }];
    }
    if n1 == 0 || h1 == 0 {
        return [100, 0];
    }
    let stay_bp = if h0 < u64::from(e.min_healthy) {
        0
    } else if e.overprov_pct == 0 {
        if h0 > 0 { 10_000 } else { 0 }
    } else {
        (h0 * u64::from(e.overprov_pct) * 100 / n0).min(10_000)
    };
    let first = ((stay_bp + 50) / 100) as u32;
    [first, 100 - first]
}

/// Keeps the maps equal to the desired services.
pub struct Programmer {
    dp: Datapath,
    services: BTreeMap<Frontend, Installed>,
    backend_ids: HashMap<SocketAddr, u32>,
    health: HashMap<SocketAddr, bool>,
    /// Backends the agent knows the kernel suspects (they count as unhealthy).
    suspects: HashSet<SocketAddr>,
    /// Backend → the frontends whose tiers hold it.
    users: HashMap<SocketAddr, BTreeSet<Frontend>>,
    /// Backend → the frontend its `CM_BACKEND_IDS` entry names (for getpeername() of TCP
    /// sockets marked at connect()).
    fronts: HashMap<SocketAddr, SocketAddr>,
    /// What the policy maps hold.
    policy: crate::policy::Tables,
    next_svc: u32,
    /// `CM_BACKENDS` indices.
    backend_pool: IdPool,
    /// `CM_GROUPS` indices.
    group_pool: IdPool,
    batching: bool,
}

/// Writes `items` into the map in one batch when the kernel allows; whether it did (else the
/// caller writes them one by one).
fn write_batch<K: Copy, V: Copy>(
    map: &aya::maps::MapData,
    name: &'static str,
    items: &[(K, V)],
    batching: bool,
) -> bool {
    use std::os::fd::AsFd;
    if items.is_empty() {
        return true;
    }
    if !batching || items.len() < 2 {
        return false;
    }
    let keys: Vec<K> = items.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = items.iter().map(|(_, v)| *v).collect();
    match crate::batch::update(map.fd().as_fd(), &keys, &values) {
        Ok(n) if n == items.len() => return true,
        Ok(n) => tracing::debug!(
            map = name,
            written = n,
            wanted = items.len(),
            "partial batch; finishing one by one"
        ),
        Err(e) => {
            tracing::debug!(map = name, error = %e, "batch update unavailable; one by one")
        }
    }
    false
}

/// Writes `items` into a hash map in one batch when the kernel allows, one by one otherwise.
fn write_all<K: aya::Pod + Copy, V: aya::Pod + Copy>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    items: &[(K, V)],
    batching: bool,
) -> Result<(), Error> {
    use aya::maps::IterableMap;
    if write_batch(map.map(), name, items, batching) {
        return Ok(());
    }
    for (k, v) in items {
        map.insert(*k, *v, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// [`write_all`] for an array map (index → value).
fn write_array<V: aya::Pod + Copy>(
    map: &mut aya::maps::Array<aya::maps::MapData, V>,
    name: &'static str,
    items: &[(u32, V)],
    batching: bool,
) -> Result<(), Error> {
    use aya::maps::IterableMap;
    if write_batch(map.map(), name, items, batching) {
        return Ok(());
    }
    for (i, v) in items {
        map.set(*i, *v, 0).map_err(map_err(name))?;
    }
    Ok(())
}

impl std::fmt::Debug for Programmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programmer")
            .field("services", &self.services.len())
            .field("backends", &self.backend_ids.len())
            .finish()
    }
}

/// Whether a delete failed only because the entry was not there.
fn not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        reason: e.to_string(),
    }
}

impl Programmer {
    /// Takes over `dp`, learning the IDs of what an earlier agent programmed (and which
    /// backends each service's slots reference) so that the same desired state rewrites
    /// nothing.
    pub fn new(mut dp: Datapath) -> Result<Self, Error> {
        let mut backend_ids = HashMap::new();
        let mut by_id = HashMap::new();
        let mut health = HashMap::new();
        // Every backend has its address → ID entry: the array's entries in use, without
        // reading the whole array. An entry whose ID holds another address (or none) is a
        // leftover of an agent stopped between two writes: removed.
        let mut stale = Vec::new();
        for item in dp.backend_ids.iter() {
            let (k, r) = item.map_err(map_err(maps::BACKEND_IDS))?;
            let (id, _) = maps::parse_backend_ref(&r);
            let b = dp
                .backends
                .get(&id, 0)
                .ok()
                .and_then(|v| maps::parse_backend_val(&v))
                .filter(|b| maps::sockaddr_key(&b.addr) == k);
            match b {
                Some(b) => {
                    backend_ids.insert(b.addr, id);
                    by_id.insert(id, b.addr);
                    health.insert(b.addr, b.healthy);
                }
                None => stale.push(k),
            }
        }
        for k in stale {
            let _ = dp.backend_ids.remove(&k);
        }
        // Any backend a slot references is in use, with or without its address entry (it is
        // rewritten below): its ID must never be handed to another backend.
        let mut referenced = |bid: u32,
                              backend_ids: &mut HashMap<SocketAddr, u32>,
                              by_id: &mut HashMap<u32, SocketAddr>|
         -> Option<SocketAddr> {
            if let Some(a) = by_id.get(&bid) {
                return Some(*a);
            }
            let b = maps::parse_backend_val(&dp.backends.get(&bid, 0).ok()?)?;
            if backend_ids.contains_key(&b.addr) {
                return None;
            }
            backend_ids.insert(b.addr, bid);
            by_id.insert(bid, b.addr);
            health.insert(b.addr, b.healthy);
            Some(b.addr)
        };
        let mut services = BTreeMap::new();
        for item in dp.services.iter() {
            let (k, v) = item.map_err(map_err(maps::SERVICES))?;
            let Some(f) = maps::parse_svc_key(&k) else {
                continue;
            };
            let entry = maps::parse_svc_val(&v);
            let mut backends = BTreeSet::new();
            let mut tiers: [Vec<SocketAddr>; TIERS] = Default::default();
            for (tier, n) in entry.counts.iter().enumerate() {
                for slot in 0..*n {
                    // A slot that is missing references nothing (the slot gets rewritten).
                    let bid = if maps::tier_inline(*n) {
                        Some(entry.inline[tier][usize::from(slot)])
                    } else {
                        dp.slots
                            .get(&maps::slot_key(entry.id, tier as u16, slot), 0)
                            .ok()
                    };
                    if let Some(addr) =
                        bid.and_then(|bid| referenced(bid, &mut backend_ids, &mut by_id))
                    {
                        backends.insert(addr);
                        tiers[tier].push(addr);
                    }
                }
            }
            let groups = if entry.flags & SVC_GROUPS_INLINE != 0 {
                maps::parse_groups_inline(&entry.inline[1])
                    .into_iter()
                    .map(|g| (g.start, g.len, g.weight))
                    .collect()
            } else if entry.flags & SVC_WEIGHTED != 0 {
                dp.groups
                    .get(&u32::from(entry.group), 0)
                    .map(|v| {
                        maps::parse_groups_val(&v)
                            .into_iter()
                            .map(|g| (g.start, g.len, g.weight))
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            services.insert(
                f,
                Installed {
                    entry,
                    backends,
                    tiers,
                    groups,
                },
            );
        }
        let next_svc = services.values().map(|s| s.entry.id).max().unwrap_or(0) + 1;
        let now = Instant::now();
        let sizes = dp.sizes();
        let backend_pool = IdPool::new(
            1,
            sizes.backend_entries() - 1,
            ids::GRACE,
            backend_ids.values().copied(),
            now,
        );
        // Index 0 is never a group's: a value whose `group` is 0 names none.
        let group_pool = IdPool::new(
            1,
            sizes.group_entries() - 1,
            ids::GRACE,
            services
                .values()
                .filter(|s| s.uses_group_index())
                .map(|s| u32::from(s.entry.group)),
            now,
        );
        let policy = crate::policy::Tables::learn(&dp)?;
        let mut p = Self {
            dp,
            policy,
            services,
            backend_ids,
            health,
            suspects: HashSet::new(),
            users: HashMap::new(),
            fronts: HashMap::new(),
            next_svc,
            backend_pool,
            group_pool,
            batching: true,
        };
        p.index_users();
        // The address → ID index sock_ops reads, for every backend already programmed (the
        // frontend it names kept when the ID still matches).
        let mut known = Vec::new();
        for (a, id) in &p.backend_ids {
            let key = maps::sockaddr_key(a);
            let current = p.dp.backend_ids.get(&key, 0).ok();
            let front = current
                .as_ref()
                .map(maps::parse_backend_ref)
                .filter(|(i, _)| i == id)
                .and_then(|(_, f)| f);
            if let Some(f) = front {
                p.fronts.insert(*a, f);
            }
            let value = maps::backend_ref(*id, front);
            if current != Some(value) {
                known.push((key, value));
            }
        }
        write_all(&mut p.dp.backend_ids, maps::BACKEND_IDS, &known, true)?;
        Ok(p)
    }

    /// Rebuilds the backend → frontends index.
    fn index_users(&mut self) {
        self.users.clear();
        for (f, inst) in &self.services {
            for a in &inst.backends {
                self.users.entry(*a).or_default().insert(*f);
            }
        }
    }

    /// Whether new connections may go to `addr` as the agent sees it: not down, not suspect.
    fn usable(&self, addr: &SocketAddr) -> bool {
        self.health.get(addr).copied().unwrap_or(true) && !self.suspects.contains(addr)
    }

    /// The usable backends per tier and per group of `tiers`.
    fn healthy_counts(
        &self,
        tiers: &[Vec<SocketAddr>; TIERS],
        groups: &[(u16, u16, u16)],
    ) -> ([u16; TIERS], Vec<GroupEntry>) {
        let mut healthy = [0u16; TIERS];
        for (t, list) in tiers.iter().enumerate() {
            healthy[t] = list.iter().filter(|a| self.usable(a)).count() as u16;
        }
        let groups = groups
            .iter()
            .map(|(start, len, weight)| GroupEntry {
                start: *start,
                len: *len,
                weight: *weight,
                healthy: tiers[0]
                    .iter()
                    .skip(usize::from(*start))
                    .take(usize::from(*len))
                    .filter(|a| self.usable(a))
                    .count() as u16,
            })
            .collect();
        (healthy, groups)
    }

    /// Rewrites the healthy counts of every service that uses `addr` (after its health
    /// changed), so that spill-over and weights follow it.
    fn refresh(&mut self, addr: SocketAddr) -> Result<(), Error> {
        let Some(frontends) = self.users.get(&addr).cloned() else {
            return Ok(());
        };
        for f in frontends {
            let Some(inst) = self.services.get(&f) else {
                continue;
            };
            let (healthy, groups) = self.healthy_counts(&inst.tiers, &inst.groups);
            let mut entry = inst.entry;
            entry.healthy = healthy;
            if !groups.is_empty() {
                if entry.flags & SVC_GROUPS_INLINE != 0 {
                    entry.inline[1] = maps::groups_inline(&groups);
                } else {
                    self.dp
                        .groups
                        .set(u32::from(inst.entry.group), maps::groups_val(&groups), 0)
                        .map_err(map_err(maps::GROUPS))?;
                }
            }
            if entry != inst.entry {
                self.dp
                    .services
                    .insert(maps::svc_key(&f), maps::svc_val(&entry), 0)
                    .map_err(map_err(maps::SERVICES))?;
                if let Some(inst) = self.services.get_mut(&f) {
                    inst.entry = entry;
                }
            }
        }
        Ok(())
    }

    /// Whether writes of one phase go to the kernel as one batch (the default) or one by one
    /// (for comparison in benchmarks).
    pub fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    /// Services programmed.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// Backends programmed.
    pub fn backends(&self) -> usize {
        self.backend_ids.len()
    }

    /// The backends the programmed services of `proto` reference, sorted.
    pub fn backends_of(&self, proto: Proto) -> Vec<SocketAddr> {
        let set: BTreeSet<SocketAddr> = self
            .services
            .iter()
            .filter(|(f, _)| f.proto == proto)
            .flat_map(|(_, s)| s.backends.iter().copied())
            .collect();
        set.into_iter().collect()
    }

    /// Deletes the backends `keep` says no to.
    fn remove_backends(&mut self, keep: impl Fn(&SocketAddr) -> bool, ops: &mut Ops) {
        let unused: Vec<(SocketAddr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(a, _)| !keep(a))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in unused {
            let _ = self.dp.backend_ids.remove(&maps::sockaddr_key(&addr));
            // Retired in place (not active), and its ID rests before another backend gets it.
            if let Ok(v) = self.dp.backends.get(&id, 0)
                && v != [0u8; 32]
                && (v == maps::retired(&v)
                    || self.dp.backends.set(id, maps::retired(&v), 0).is_ok())
            {
                ops.deletes += 1;
            }
            self.backend_pool.give(id, Instant::now());
            self.backend_ids.remove(&addr);
            self.health.remove(&addr);
            self.suspects.remove(&addr);
            self.fronts.remove(&addr);
        }
    }

    /// Makes the maps equal to `desired`, except for the services it refuses (listed in
    /// [`Ops::refused`]; those programmed before keep their programming). Fails only when a map
    /// operation fails.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<Ops, ProgramError> {
        let plan = plan(&self.services, desired, Limits::of(self.dp.sizes()));
        let mut ops = Ops::default();
        // 1. Services no longer desired: the service first, then its slots; then the backends
        //    nothing references any more, to make room.
        let gone: Vec<Frontend> = self
            .services
            .keys()
            .filter(|f| !plan.desired.contains(f))
            .copied()
            .collect();
        for f in gone {
            let Some(old) = self.services.remove(&f) else {
                continue;
            };
            // Its backends' IDs are freed below: only once the service is surely gone.
            match self.dp.services.remove(&maps::svc_key(&f)) {
                Ok(()) => ops.deletes += 1,
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    self.services.insert(f, old);
                    self.index_users();
                    return Err(map_err(maps::SERVICES)(e).into());
                }
            }
            if old.uses_group_index() {
                let g = u32::from(old.entry.group);
                if self.dp.groups.set(g, [0u8; 64], 0).is_ok() {
                    ops.deletes += 1;
                }
                self.group_pool.give(g, Instant::now());
            }
            for tier in 0..TIERS {
                if maps::tier_inline(old.entry.counts[tier]) {
                    continue;
                }
                for slot in 0..old.entry.counts[tier] {
                    if self
                        .dp
                        .slots
                        .remove(&maps::slot_key(old.entry.id, tier as u16, slot))
                        .is_ok()
                    {
                        ops.deletes += 1;
                    }
                }
            }
        }
        self.remove_backends(|a| plan.used_backends.contains(a), &mut ops);
        // 2. New and changed backends.
        let mut wanted_backends: BTreeMap<SocketAddr, BackendSpec> = BTreeMap::new();
        for s in plan.accepted.values() {
            for b in s.tiers.iter().flatten() {
                wanted_backends.insert(b.addr, *b);
            }
        }
        // While the plan is carried out a backend is in the slots of its old frontends and its
        // new ones: it counts as having one frontend only when that set has one member (a
        // backend moving from one frontend to another has none for the move).
        let mut during: HashMap<SocketAddr, BTreeSet<Frontend>> = HashMap::new();
        for (f, inst) in &self.services {
            for a in &inst.backends {
                during.entry(*a).or_default().insert(*f);
            }
        }
        for (f, s) in &plan.accepted {
            for b in s.tiers.iter().flatten() {
                during.entry(b.addr).or_default().insert(*f);
            }
        }
        let one_front = |users: Option<&BTreeSet<Frontend>>| match users {
            Some(set) if set.len() == 1 => set.first().map(|f| f.addr),
            _ => None,
        };
        let mut backend_writes = Vec::new();
        let mut ref_writes = Vec::new();
        // Undone if this step fails: the IDs taken and the index's frontends changed.
        let mut taken = Vec::new();
        let mut prev_fronts = Vec::new();
        let mut failed = None;
        for (addr, spec) in &wanted_backends {
            let (id, is_new) = match self.backend_ids.get(addr) {
                Some(id) => (*id, false),
                // The plan keeps the backends within the map, whose quarter of spare IDs
                // lets removed backends' IDs rest: waiting for one is for a map churned
                // through that spare within a second.
                None => match self.backend_pool.take(Instant::now(), std::thread::sleep) {
                    Some(id) => {
                        taken.push((*addr, id));
                        (id, true)
                    }
                    None => {
                        failed = Some(ProgramError::Map(Error::Map {
                            map: maps::BACKENDS,
                            reason: "no free backend ID".into(),
                        }));
                        break;
                    }
                },
            };
            // The frontend in the index before the flag that makes connect() rely on it.
            let front = one_front(during.get(addr));
            if let Some(f) = front.filter(|f| self.fronts.get(addr) != Some(f)) {
                ref_writes.push((maps::sockaddr_key(addr), maps::backend_ref(id, Some(f))));
                prev_fronts.push((*addr, self.fronts.insert(*addr, f)));
            } else if is_new {
                ref_writes.push((maps::sockaddr_key(addr), maps::backend_ref(id, None)));
            }
            // The kernel's suspicion stays as it is: it is the kernel's to set.
            let current = self.dp.backends.get(&id, 0).ok();
            let entry = BackendEntry {
                addr: *addr,
                healthy: *self.health.get(addr).unwrap_or(&true),
                cluster_id: spec.cluster_id,
                zone: spec.zone,
                one_frontend: front.is_some(),
                suspect_until_ns: current
                    .as_ref()
                    .and_then(maps::parse_backend_val)
                    .filter(|b| b.addr == *addr)
                    .map_or(0, |b| b.suspect_until_ns),
            };
            let value = maps::backend_val(&entry);
            if current != Some(value) {
                backend_writes.push((id, value));
            }
            self.backend_ids.insert(*addr, id);
            self.health.entry(*addr).or_insert(true);
        }
        // Address → ID (and one frontend) for sock_ops and getpeername(), then the backends.
        ops.writes += ref_writes.len() + backend_writes.len();
        let written = match failed {
            Some(e) => Err(e),
            None => write_all(
                &mut self.dp.backend_ids,
                maps::BACKEND_IDS,
                &ref_writes,
                self.batching,
            )
            .and_then(|()| {
                write_array(
                    &mut self.dp.backends,
                    maps::BACKENDS,
                    &backend_writes,
                    self.batching,
                )
            })
            .map_err(ProgramError::from),
        };
        if let Err(e) = written {
            // As if never taken: the next apply writes these backends and their address
            // entries again (an ID half written rests, then is overwritten whole).
            let now = Instant::now();
            for (addr, id) in taken {
                self.backend_ids.remove(&addr);
                self.health.remove(&addr);
                self.backend_pool.give(id, now);
            }
            for (addr, prev) in prev_fronts.into_iter().rev() {
                match prev {
                    Some(f) => self.fronts.insert(addr, f),
                    None => self.fronts.remove(&addr),
                };
            }
            return Err(e);
        }
        // 3. Services: slots (all services), groups, counts, then slots past the counts.
        let mut slot_writes = Vec::new();
        let mut svc_writes = Vec::new();
        let mut group_writes = Vec::new();
        let mut group_deletes = Vec::new();
        let mut stale_slots = Vec::new();
        let mut installed = Vec::new();
        let mut taken_groups = Vec::new();
        let mut failed = None;
        for (frontend, s) in &plan.accepted {
            let old = self.services.get(frontend);
            let old_entry = old.map(|i| i.entry);
            let id = old_entry.map(|e| e.id).unwrap_or_else(|| {
                let id = self.next_svc;
                self.next_svc += 1;
                id
            });
            let mut counts = [0u16; TIERS];
            let mut inline = [[0u32; maps::INLINE_SLOTS]; TIERS];
            for (tier, list) in s.tiers.iter().enumerate() {
                // The plan bounds every tier by MAX_TIER_SLOTS, well within u16.
                counts[tier] = list.len() as u16;
                for (slot, b) in list.iter().enumerate() {
                    let bid = self.backend_ids[&b.addr];
                    if maps::tier_inline(counts[tier]) {
                        inline[tier][slot] = bid;
                        continue;
                    }
                    let key = maps::slot_key(id, tier as u16, slot as u16);
                    if self.dp.slots.get(&key, 0).ok() != Some(bid) {
                        slot_writes.push((key, bid));
                    }
                }
            }
            let tiers: [Vec<SocketAddr>; TIERS] = [
                s.tiers[0].iter().map(|b| b.addr).collect(),
                s.tiers[1].iter().map(|b| b.addr).collect(),
            ];
            let mut start = 0u16;
            let groups: Vec<(u16, u16, u16)> = s
                .balancing
                .groups
                .iter()
                .map(|(len, weight)| {
                    let g = (start, *len, *weight);
                    start += len;
                    g
                })
                .collect();
            let (healthy, group_entries) = self.healthy_counts(&tiers, &groups);
            let old_group = old.filter(|o| o.uses_group_index()).map(|o| o.entry.group);
            let mut group = 0;
            let groups_inline = !group_entries.is_empty()
                && maps::groups_fit_inline(group_entries.len(), usize::from(counts[1]));
            if groups_inline {
                // In the value itself: no CM_GROUPS entry to read per connect.
                inline[1] = maps::groups_inline(&group_entries);
                if let Some(g) = old_group {
                    group_deletes.push(u32::from(g));
                }
            } else if !group_entries.is_empty() {
                group = match old_group {
                    Some(g) => g,
                    // The plan keeps weighted services within CM_GROUPS (and its spare
                    // quarter lets indices rest); Sizes::weighted keeps indices in 16 bits.
                    None => match self
                        .group_pool
                        .take(Instant::now(), std::thread::sleep)
                        .map(|g| (g, u16::try_from(g)))
                    {
                        Some((_, Ok(g))) => {
                            taken_groups.push(u32::from(g));
                            g
                        }
                        other => {
                            if let Some((g, _)) = other {
                                self.group_pool.give(g, Instant::now());
                            }
                            failed = Some(ProgramError::Map(Error::Map {
                                map: maps::GROUPS,
                                reason: "no free group index".into(),
                            }));
                            break;
                        }
                    },
                };
                let value = maps::groups_val(&group_entries);
                if self.dp.groups.get(&u32::from(group), 0).ok() != Some(value) {
                    group_writes.push((u32::from(group), value));
                }
            } else if let Some(g) = old_group {
                group_deletes.push(u32::from(g));
            }
            let entry = SvcEntry {
                id,
                counts,
                healthy,
                overprov_pct: s.balancing.overprov_pct,
                min_healthy: s.balancing.min_healthy,
                flags: match (groups.is_empty(), groups_inline) {
                    (true, _) => 0,
                    (false, false) => SVC_WEIGHTED,
                    (false, true) => SVC_WEIGHTED | SVC_GROUPS_INLINE,
                },
                group,
                inline,
            };
            let key = maps::svc_key(frontend);
            if old_entry != Some(entry)
                || self.dp.services.get(&key, 0).ok() != Some(maps::svc_val(&entry))
            {
                svc_writes.push((key, maps::svc_val(&entry)));
            }
            if let Some(old) = old_entry {
                for (tier, (new_n, old_n)) in counts.iter().zip(old.counts).enumerate() {
                    // The old slots in CM_SLOTS the new layout does not overwrite.
                    let first = if maps::tier_inline(*new_n) { 0 } else { *new_n };
                    let last = if maps::tier_inline(old_n) { 0 } else { old_n };
                    for slot in first..last {
                        stale_slots.push(maps::slot_key(id, tier as u16, slot));
                    }
                }
            }
            let backends = s.tiers.iter().flatten().map(|b| b.addr).collect();
            installed.push((
                *frontend,
                Installed {
                    entry,
                    backends,
                    tiers,
                    groups,
                },
            ));
        }
        ops.writes += group_writes.len();
        // Every service's new slots before any service's new counts; stale slots after.
        ops.writes += slot_writes.len() + svc_writes.len();
        let written = match failed {
            Some(e) => Err(e),
            None => write_array(
                &mut self.dp.groups,
                maps::GROUPS,
                &group_writes,
                self.batching,
            )
            .and_then(|()| write_all(&mut self.dp.slots, maps::SLOTS, &slot_writes, self.batching))
            .and_then(|()| {
                write_all(
                    &mut self.dp.services,
                    maps::SERVICES,
                    &svc_writes,
                    self.batching,
                )
            })
            .map_err(ProgramError::from),
        };
        if let Err(e) = written {
            // No service of this apply was recorded as programmed: the group indices it took
            // go back (resting, in case a service entry was written with one).
            let now = Instant::now();
            for g in taken_groups {
                self.group_pool.give(g, now);
            }
            return Err(e);
        }
        for key in stale_slots {
            if self.dp.slots.remove(&key).is_ok() {
                ops.deletes += 1;
            }
        }
        for g in group_deletes {
            if self.dp.groups.set(g, [0u8; 64], 0).is_ok() {
                ops.deletes += 1;
            }
            self.group_pool.give(g, Instant::now());
        }
        self.services.extend(installed);
        self.index_users();
        // 4. Backends no longer referenced.
        self.remove_backends(|a| plan.final_backends.contains(a), &mut ops);
        // 5. Backends left with one frontend once the plan is carried out: that frontend in
        //    the index, then the flag.
        for addr in wanted_backends.keys() {
            if one_front(during.get(addr)).is_some() {
                continue;
            }
            let Some(f) = one_front(self.users.get(addr)) else {
                continue;
            };
            let id = self.backend_ids[addr];
            if self.fronts.get(addr) != Some(&f) {
                self.dp
                    .backend_ids
                    .insert(maps::sockaddr_key(addr), maps::backend_ref(id, Some(f)), 0)
                    .map_err(map_err(maps::BACKEND_IDS))?;
                self.fronts.insert(*addr, f);
                ops.writes += 1;
            }
            if self.update_backend(*addr, |b| b.one_frontend = true)? {
                ops.writes += 1;
            }
        }
        ops.refused = plan.refused;
        Ok(ops)
    }

    /// Makes the IP cache equal to `entries` (address → identity, cluster ID), as /32 or /128
    /// prefixes. Returns the map operations done.
    pub fn apply_ipcache(
        &mut self,
        entries: &HashMap<std::net::IpAddr, (u32, u16)>,
    ) -> Result<Ops, ProgramError> {
        let result = self.write_ipcache(entries);
        // Complete, or failed part way: cached verdicts are stale from here on either way.
        if !matches!(&result, Ok(ops) if ops.writes + ops.deletes == 0) {
            self.dp.bump_policy_gen();
        }
        result
    }

    fn write_ipcache(
        &mut self,
        entries: &HashMap<std::net::IpAddr, (u32, u16)>,
    ) -> Result<Ops, ProgramError> {
        use aya::maps::lpm_trie::Key;
        if entries.len() > maps::MAX_IPCACHE {
            return Err(ProgramError::Capacity {
                what: "ipcache entries".into(),
                wanted: entries.len(),
                capacity: maps::MAX_IPCACHE,
            });
        }
        let mut ops = Ops::default();
        let mut current: HashMap<(u32, maps::IpcacheAddr), maps::IpcacheVal> = HashMap::new();
        for item in self.dp.ipcache.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE))?;
            current.insert((k.prefix_len(), k.data()), v);
        }
        let mut wanted = HashMap::new();
        for (ip, (identity, cluster)) in entries {
            let net = ipnet::IpNet::from(*ip);
            wanted.insert(
                maps::ipcache_key(&net),
                maps::ipcache_val(*identity, *cluster),
            );
        }
        for ((len, addr), v) in &wanted {
            if current.get(&(*len, *addr)) != Some(v) {
                self.dp
                    .ipcache
                    .insert(&Key::new(*len, *addr), *v, 0)
                    .map_err(map_err(maps::IPCACHE))?;
                ops.writes += 1;
            }
        }
        for (len, addr) in current.keys() {
            if !wanted.contains_key(&(*len, *addr)) {
                self.dp
                    .ipcache
                    .remove(&Key::new(*len, *addr))
                    .map_err(map_err(maps::IPCACHE))?;
                ops.deletes += 1;
            }
        }
        // The host entries again, by exact address: what the programs look up.
        let mut hosts: HashMap<maps::IpcacheAddr, maps::IpcacheVal> = HashMap::new();
        for item in self.dp.ipcache_hosts.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE_HOSTS))?;
            hosts.insert(k, v);
        }
        for ((len, addr), v) in &wanted {
            if *len == 128 && hosts.get(addr) != Some(v) {
                self.dp
                    .ipcache_hosts
                    .insert(*addr, *v, 0)
                    .map_err(map_err(maps::IPCACHE_HOSTS))?;
                ops.writes += 1;
            }
        }
        for addr in hosts.keys() {
            if !wanted.contains_key(&(128, *addr)) {
                self.dp
                    .ipcache_hosts
                    .remove(addr)
                    .map_err(map_err(maps::IPCACHE_HOSTS))?;
                ops.deletes += 1;
            }
        }
        Ok(ops)
    }

    /// Marks a backend healthy or not, directly in the backends map. Returns whether it
    /// changed (unknown backends are ignored). Marking it healthy also clears the kernel's
    /// suspicion of it.
    pub fn set_health(&mut self, addr: SocketAddr, healthy: bool) -> Result<bool, Error> {
        if self.health.get(&addr) == Some(&healthy) {
            return Ok(false);
        }
        let changed = self.update_backend(addr, |b| {
            b.healthy = healthy;
            if healthy {
                b.suspect_until_ns = 0;
            }
        })?;
        if changed {
            self.health.insert(addr, healthy);
            if healthy {
                self.suspects.remove(&addr);
            }
            self.refresh(addr)?;
        }
        Ok(changed)
    }

    /// Sets the kernel's suspicion of a backend: skipped by new connections until
    /// `until_ns` (`CLOCK_MONOTONIC`), or no longer (0). Returns whether it changed.
    pub fn set_suspect(&mut self, addr: SocketAddr, until_ns: u64) -> Result<bool, Error> {
        let changed = self.update_backend(addr, |b| b.suspect_until_ns = until_ns)?;
        self.note_suspect(addr, until_ns > maps::monotonic_ns())?;
        Ok(changed)
    }

    /// Records what the agent knows of the kernel's suspicion of `addr` (the kernel set or
    /// cleared it itself), so that the healthy counts behind spill-over and weights follow.
    pub fn note_suspect(&mut self, addr: SocketAddr, suspect: bool) -> Result<(), Error> {
        if !self.backend_ids.contains_key(&addr) {
            return Ok(());
        }
        let changed = if suspect {
            self.suspects.insert(addr)
        } else {
            self.suspects.remove(&addr)
        };
        if changed {
            self.refresh(addr)?;
        }
        Ok(())
    }

    /// The backend as the kernel holds it now.
    pub fn backend(&self, addr: SocketAddr) -> Option<BackendEntry> {
        let id = self.backend_ids.get(&addr)?;
        let value = self.dp.backends.get(id, 0).ok()?;
        maps::parse_backend_val(&value)
    }

    /// The backend a kernel event names by ID and address, if that address is still
    /// programmed under that ID (IDs are reused for other backends once rested: an event
    /// queued before the reuse names the old backend, which must not be mistaken for the new).
    pub fn event_backend(&self, id: u32, addr: SocketAddr) -> Option<SocketAddr> {
        (self.backend_ids.get(&addr) == Some(&id)).then_some(addr)
    }

    /// Whether the agent has marked `addr` healthy (O(1)); `None` when not programmed.
    pub fn is_healthy(&self, addr: SocketAddr) -> Option<bool> {
        self.health.get(&addr).copied()
    }

    fn update_backend(
        &mut self,
        addr: SocketAddr,
        f: impl FnOnce(&mut BackendEntry),
    ) -> Result<bool, Error> {
        let Some(id) = self.backend_ids.get(&addr).copied() else {
            return Ok(false);
        };
        let Ok(value) = self.dp.backends.get(&id, 0) else {
            return Ok(false);
        };
        let Some(mut entry) = maps::parse_backend_val(&value) else {
            return Ok(false);
        };
        f(&mut entry);
        let new = maps::backend_val(&entry);
        if new == value {
            return Ok(false);
        }
        self.dp
            .backends
            .set(id, new, 0)
            .map_err(map_err(maps::BACKENDS))?;
        Ok(true)
    }

    /// Each programmed frontend's tier shares of new connections, in whole percent, as the
    /// kernel computes them from the healthy counts ([`tier_shares`]).
    pub fn shares(&self) -> HashMap<Frontend, Vec<u32>> {
        self.services
            .iter()
            .map(|(f, i)| (*f, tier_shares(&i.entry).to_vec()))
            .collect()
    }

    /// Makes the policy entries of local identity `local` those of `rules` (none: empty);
    /// see [`crate::policy::Tables::set_identity`].
    pub fn set_identity_policy(
        &mut self,
        local: u32,
        rules: &[crate::policy::Rule],
    ) -> Result<Ops, Error> {
        let result = self.policy.set_identity(&mut self.dp, local, rules);
        // Complete, or failed part way: cached verdicts of the previous entries are stale
        // from here on either way.
        if !matches!(&result, Ok(ops) if ops.writes + ops.deletes == 0) {
            self.dp.bump_policy_gen();
        }
        result
    }

    /// Makes the local endpoints those of `endpoints`; see
    /// [`crate::policy::Tables::set_endpoints`].
    pub fn set_endpoints(&mut self, endpoints: &[crate::policy::Endpoint]) -> Result<Ops, Error> {
        self.policy.set_endpoints(&mut self.dp, endpoints)
    }

    /// What the policy maps hold, as the agent wrote them.
    pub fn policy_tables(&self) -> &crate::policy::Tables {
        &self.policy
    }

    /// The datapath, to change its settings.
    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    /// What the kernel's maps hold, read back: every frontend with its backends per tier.
    pub fn programmed(&self) -> Result<Vec<Programmed>, Error> {
        let mut out = Vec::new();
        for item in self.dp.services.iter() {
            let (k, v) = item.map_err(map_err(maps::SERVICES))?;
            let Some(frontend) = maps::parse_svc_key(&k) else {
                continue;
            };
            let entry = maps::parse_svc_val(&v);
            let mut tiers: [Vec<BackendEntry>; TIERS] = Default::default();
            for (tier, list) in tiers.iter_mut().enumerate() {
                for slot in 0..entry.counts[tier] {
                    let bid = if maps::tier_inline(entry.counts[tier]) {
                        entry.inline[tier][usize::from(slot)]
                    } else {
                        let key = maps::slot_key(entry.id, tier as u16, slot);
                        self.dp.slots.get(&key, 0).map_err(map_err(maps::SLOTS))?
                    };
                    let val = self
                        .dp
                        .backends
                        .get(&bid, 0)
                        .map_err(map_err(maps::BACKENDS))?;
                    if let Some(b) = maps::parse_backend_val(&val) {
                        list.push(b);
                    }
                }
            }
            out.push((frontend, tiers));
        }
        out.sort_by_key(|(f, _)| *f);
        Ok(out)
    }

    /// Every backend address programmed, with its health.
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        self.health.iter().map(|(a, h)| (*a, *h)).collect()
    }

    /// The datapath.
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fe(i: u8) -> Frontend {
        Frontend {
            addr: SocketAddr::from(([10, 96, 0, i], 80)),
            proto: Proto::Tcp,
        }
    }

    fn backends(first: u16, n: usize) -> Vec<BackendSpec> {
        (0..n)
            .map(|i| BackendSpec {
                addr: SocketAddr::from(([10, 1, 0, 1], first + i as u16)),
                cluster_id: 1,
                zone: 0,
            })
            .collect()
    }

    fn svc(i: u8, name: &str, tiers: [Vec<BackendSpec>; TIERS]) -> DesiredService {
        DesiredService {
            frontend: fe(i),
            service: Some(ServiceName::new("shop", name).unwrap()),
            tiers,
            balancing: Default::default(),
        }
    }

    fn installed(s: &DesiredService, id: u32) -> (Frontend, Installed) {
        let counts = [s.tiers[0].len() as u16, s.tiers[1].len() as u16];
        let backends = s.tiers.iter().flatten().map(|b| b.addr).collect();
        (
            s.frontend,
            Installed {
                entry: SvcEntry {
                    id,
                    counts,
                    ..Default::default()
                },
                backends,
                tiers: [
                    s.tiers[0].iter().map(|b| b.addr).collect(),
                    s.tiers[1].iter().map(|b| b.addr).collect(),
                ],
                groups: Vec::new(),
            },
        )
    }

    fn accepted(p: &Plan<'_>) -> Vec<Frontend> {
        p.accepted.keys().copied().collect()
    }

    #[test]
    fn tier_shares_follow_the_kernels_spill_over_rule() {
        let e = |h0, overprov_pct, min_healthy| SvcEntry {
            counts: [4, 1],
            healthy: [h0, 1],
            overprov_pct,
            min_healthy,
            ..Default::default()
        };
        assert_eq!(tier_shares(&e(4, 140, 0)), [100, 0]);
        assert_eq!(tier_shares(&e(3, 140, 0)), [100, 0]);
        assert_eq!(tier_shares(&e(2, 140, 0)), [70, 30]);
        assert_eq!(tier_shares(&e(1, 140, 0)), [35, 65]);
        assert_eq!(tier_shares(&e(0, 140, 0)), [0, 100]);
        assert_eq!(tier_shares(&e(1, 0, 0)), [100, 0], "all or nothing");
        assert_eq!(tier_shares(&e(2, 140, 3)), [0, 100], "below the minimum");
        let mut dead_remote = e(1, 140, 0);
        dead_remote.healthy[1] = 0;
        assert_eq!(tier_shares(&dead_remote), [100, 0], "nowhere to spill to");
    }

    #[test]
    fn an_oversized_tier_refuses_its_service_alone() {
        let good = svc(1, "web", [backends(1000, 3), vec![]]);
        let bad = svc(2, "big", [backends(2000, 2), backends(3000, 300)]);
        let desired = [bad.clone(), good.clone()];
        let p = plan(&BTreeMap::new(), &desired, Limits::MAPS);
        assert_eq!(accepted(&p), [fe(1)]);
        assert_eq!(
            p.refused,
            [Refusal {
                frontend: fe(2),
                service: bad.service.clone(),
                reason: Reason::TierFull {
                    tier: 1,
                    wanted: 300,
                    capacity: MAX_TIER_SLOTS,
                },
                kept_previous: false,
            }]
        );
        assert_eq!(
            p.refused[0].to_string(),
            "service shop/big frontend 10.96.0.2:80/tcp: tiers[1] has 300 backends, a tier holds 256 (MAX_TIER_SLOTS)"
        );
        assert_eq!(p.final_backends.len(), 3, "none of the refused backends");
        assert_eq!(p.used_backends, p.final_backends);
    }

    #[test]
    fn a_programmed_service_that_grows_past_a_tier_keeps_its_old_programming() {
        let before = svc(2, "big", [backends(2000, 3), vec![]]);
        let current = BTreeMap::from([installed(&before, 7)]);
        let grown = svc(2, "big", [backends(2000, 300), vec![]]);
        let good = svc(1, "web", [backends(1000, 1), vec![]]);
        let desired = [good, grown];
        let p = plan(&current, &desired, Limits::MAPS);
        assert_eq!(accepted(&p), [fe(1)]);
        assert_eq!(p.refused.len(), 1);
        assert!(p.refused[0].kept_previous);
        assert!(p.desired.contains(&fe(2)), "so its entry is not deleted");
        for b in &before.tiers[0] {
            assert!(p.final_backends.contains(&b.addr), "its old backends stay");
        }
        assert_eq!(p.final_backends.len(), 4);
        // Shrunk again, it is programmed.
        let shrunk = [svc(2, "big", [backends(2000, 2), vec![]])];
        let p = plan(&current, &shrunk, Limits::MAPS);
        assert_eq!((accepted(&p), p.refused.len()), (vec![fe(2)], 0));
        assert_eq!(p.final_backends.len(), 2);
        assert_eq!(
            p.used_backends.len(),
            3,
            "old slots still referenced meanwhile"
        );
    }

    #[test]
    fn weighted_services_beyond_the_groups_map_are_refused_alone_and_programmed_ones_keep_theirs() {
        let limits = Limits {
            weighted: 1,
            ..Limits::MAPS
        };
        // Five groups: more than fit in the service's value, so each takes a CM_GROUPS entry.
        let weighted = |i: u8, name: &str| {
            let mut s = svc(i, name, [backends(1000 * u16::from(i), 5), vec![]]);
            s.balancing.groups = vec![(1, 50), (1, 20), (1, 10), (1, 10), (1, 10)];
            s
        };
        let old = weighted(9, "old");
        let (f, mut inst) = installed(&old, 1);
        inst.groups = (0..5).map(|i| (i, 1, 10)).collect();
        let current = BTreeMap::from([(f, inst)]);
        let desired = [
            weighted(2, "new"),
            old.clone(),
            svc(3, "plain", [backends(3000, 1), vec![]]),
        ];
        let p = plan(&current, &desired, limits);
        assert_eq!(
            accepted(&p),
            [fe(3), fe(9)],
            "the programmed one first; unweighted ones fit"
        );
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].frontend, fe(2));
        assert_eq!(p.refused[0].reason, Reason::WeightedFull { capacity: 1 });
        assert_eq!(p.refused[0].reason.kind(), "weighted_full");
        // The programmed one drops its weights: its groups stay while the plan is carried
        // out, so the new one fits once that is done.
        let plain = svc(9, "old", [backends(9000, 2), vec![]]);
        let desired = [weighted(2, "new"), plain.clone()];
        let p = plan(&current, &desired, limits);
        assert_eq!(accepted(&p), [fe(9)]);
        let current = BTreeMap::from([installed(&plain, 1)]);
        let p = plan(&current, &desired, limits);
        assert_eq!((accepted(&p), p.refused.len()), (vec![fe(2), fe(9)], 0));
        // Weights over up to four groups live in the service's value: never limited.
        let mut canary = svc(4, "canary", [backends(4000, 2), vec![]]);
        canary.balancing.groups = vec![(1, 90), (1, 10)];
        let desired = [weighted(2, "new"), canary, plain];
        let p = plan(&current, &desired, limits);
        assert_eq!((accepted(&p).len(), p.refused.len()), (3, 0));
    }

    #[test]
    fn a_frontend_desired_twice_is_claimed_by_the_first_service_by_name() {
        let web = svc(1, "web", [backends(1000, 1), vec![]]);
        let api = svc(1, "api", [backends(2000, 1), vec![]]);
        for desired in [[web.clone(), api.clone()], [api.clone(), web.clone()]] {
            let p = plan(&BTreeMap::new(), &desired, Limits::MAPS);
            assert_eq!(p.accepted[&fe(1)].service, api.service);
            assert_eq!(p.refused.len(), 1);
            assert_eq!(p.refused[0].service, web.service);
            assert_eq!(
                p.refused[0].reason,
                Reason::DuplicateFrontend {
                    claimed_by: api.service.clone()
                }
            );
            assert!(p.refused[0].reason.to_string().contains("shop/api"));
        }
    }

    #[test]
    fn full_maps_refuse_the_last_new_services_and_never_evict_programmed_ones() {
        let limits = Limits {
            services: 2,
            backends: 4,
            slots: 6,
            tier_slots: 4,
            weighted: 1,
        };
        let programmed = svc(9, "old", [backends(9000, 1), vec![]]);
        let current = BTreeMap::from([installed(&programmed, 1)]);
        // Services: the programmed one first, then new ones in frontend order.
        let desired = [
            svc(3, "c", [backends(3000, 1), vec![]]),
            svc(2, "b", [backends(2000, 1), vec![]]),
            programmed.clone(),
        ];
        let p = plan(&current, &desired, limits);
        assert_eq!(accepted(&p), [fe(2), fe(9)]);
        assert_eq!(p.refused[0].frontend, fe(3));
        assert_eq!(p.refused[0].reason, Reason::ServicesFull { capacity: 2 });
        assert!(!p.refused[0].kept_previous);
        // Backends: a programmed service's growth that does not fit is refused (it keeps its
        // old backends); new services take what is left in frontend order.
        let b = svc(2, "b", [backends(2000, 1), vec![]]);
        let current2 = BTreeMap::from([installed(&programmed, 1), installed(&b, 2)]);
        let desired2 = [
            svc(3, "c", [backends(3000, 1), vec![]]),
            svc(1, "a", [backends(1000, 1), vec![]]),
            svc(2, "b", [backends(2000, 4), vec![]]),
            programmed.clone(),
        ];
        let p = plan(
            &current2,
            &desired2,
            Limits {
                services: 4,
                backends: 3,
                ..limits
            },
        );
        assert_eq!(accepted(&p), [fe(1), fe(9)]);
        assert_eq!(
            p.refused
                .iter()
                .map(|r| (r.frontend, r.kept_previous, r.reason.clone()))
                .collect::<Vec<_>>(),
            [
                (
                    fe(2),
                    true,
                    Reason::BackendsFull {
                        wanted: 3,
                        free: 1,
                        capacity: 3,
                    }
                ),
                (
                    fe(3),
                    false,
                    Reason::BackendsFull {
                        wanted: 1,
                        free: 0,
                        capacity: 3,
                    }
                ),
            ]
        );
        assert_eq!(p.final_backends.len(), 3, "old b, old programmed, new a");
        // Slots in CM_SLOTS: one per backend of a tier bigger than INLINE_SLOTS (a smaller
        // tier lives in its service's value), old ones included while the plan is carried out.
        let big = maps::INLINE_SLOTS + 1;
        let old_big = svc(9, "old", [backends(9000, big), vec![]]);
        let current = BTreeMap::from([installed(&old_big, 1)]);
        let desired3 = [
            old_big.clone(),
            svc(
                1,
                "a",
                [backends(9000, big), backends(9000, maps::INLINE_SLOTS)],
            ),
            svc(2, "b", [backends(9000, 2), backends(9000, big)]),
        ];
        let p = plan(
            &current,
            &desired3,
            Limits {
                services: 3,
                backends: 100,
                slots: 2 * big + 2,
                tier_slots: 256,
                weighted: 1,
            },
        );
        assert_eq!(accepted(&p), [fe(1), fe(9)]);
        assert_eq!(
            p.refused[0].reason,
            Reason::SlotsFull {
                wanted: big,
                free: 2,
                capacity: 2 * big + 2,
            }
        );
    }

    #[test]
    fn services_no_longer_desired_make_room_first() {
        let limits = Limits {
            services: 1,
            backends: 1,
            slots: 1,
            tier_slots: 1,
            weighted: 1,
        };
        let gone = svc(9, "old", [backends(9000, 1), vec![]]);
        let current = BTreeMap::from([installed(&gone, 1)]);
        let desired = [svc(1, "new", [backends(1000, 1), vec![]])];
        let p = plan(&current, &desired, limits);
        assert_eq!(accepted(&p), [fe(1)]);
        assert!(p.refused.is_empty());
        assert!(!p.desired.contains(&fe(9)));
        assert!(!p.used_backends.contains(&gone.tiers[0][0].addr));
    }
}
