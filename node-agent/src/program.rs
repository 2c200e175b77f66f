//! Desired services → map entries. Only differences are written, in an order that never lets
//! a connect() see a half-written service: new backends, then slots, then the service's
//! counts, then slots past the new counts; removed services go before their slots and
//! backends. Everything is checked against the maps' capacities before the first write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use crate::datapath::{Datapath, Error};
use crate::maps::{
    self, BackendEntry, Frontend, MAX_BACKENDS, MAX_SERVICES, MAX_TIER_SLOTS, SvcEntry, TIERS,
};

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
    /// Backends per tier.
    pub tiers: [Vec<BackendSpec>; TIERS],
}

/// A frontend as read back from the maps, with its backends per tier.
pub type Programmed = (Frontend, [Vec<BackendEntry>; TIERS]);

/// Why a desired state was refused (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// More than the maps hold.
    #[error("{what}: {wanted} wanted, the map holds {capacity}")]
    Capacity {
        /// Which limit.
        what: String,
        /// How many were asked for.
        wanted: usize,
        /// The limit.
        capacity: usize,
    },
    /// A frontend appears twice.
    #[error("frontend {0:?} appears twice")]
    Duplicate(Frontend),
    /// A map operation failed.
    #[error(transparent)]
    Map(#[from] Error),
}

/// Map operations done by one [`Programmer::apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ops {
    /// Entries written.
    pub writes: usize,
    /// Entries deleted.
    pub deletes: usize,
}

/// Keeps the maps equal to the desired services.
pub struct Programmer {
    dp: Datapath,
    svc_ids: BTreeMap<Frontend, SvcEntry>,
    backend_ids: HashMap<SocketAddr, u32>,
    health: HashMap<SocketAddr, bool>,
    next_svc: u32,
    next_backend: u32,
    batching: bool,
}

/// Writes `items` into `map` in one batch when the kernel allows, one by one otherwise.
fn write_all<K: aya::Pod + Copy, V: aya::Pod + Copy>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    items: &[(K, V)],
    batching: bool,
) -> Result<(), Error> {
    use aya::maps::IterableMap;
    use std::os::fd::AsFd;
    if items.is_empty() {
        return Ok(());
    }
    if batching && items.len() > 1 {
        let keys: Vec<K> = items.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = items.iter().map(|(_, v)| *v).collect();
        match crate::batch::update(map.map().fd().as_fd(), &keys, &values) {
            Ok(n) if n == items.len() => return Ok(()),
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
    }
    for (k, v) in items {
        map.insert(*k, *v, 0).map_err(map_err(name))?;
    }
    Ok(())
}

impl std::fmt::Debug for Programmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programmer")
            .field("services", &self.svc_ids.len())
            .field("backends", &self.backend_ids.len())
            .finish()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |e| Error::Map {
        map,
        reason: e.to_string(),
    }
}

impl Programmer {
    /// Takes over `dp`, learning the IDs of what an earlier agent programmed so that the same
    /// desired state rewrites nothing.
    pub fn new(dp: Datapath) -> Result<Self, Error> {
        let mut svc_ids = BTreeMap::new();
        for item in dp.services.iter() {
            let (k, v) = item.map_err(map_err(maps::SERVICES))?;
            if let Some(f) = maps::parse_svc_key(&k) {
                svc_ids.insert(f, maps::parse_svc_val(&v));
            }
        }
        let mut backend_ids = HashMap::new();
        let mut health = HashMap::new();
        for item in dp.backends.iter() {
            let (id, v) = item.map_err(map_err(maps::BACKENDS))?;
            if let Some(b) = maps::parse_backend_val(&v) {
                backend_ids.insert(b.addr, id);
                health.insert(b.addr, b.healthy);
            }
        }
        let next_svc = svc_ids.values().map(|e| e.id).max().unwrap_or(0) + 1;
        let next_backend = backend_ids.values().copied().max().unwrap_or(0) + 1;
        Ok(Self {
            dp,
            svc_ids,
            backend_ids,
            health,
            next_svc,
            next_backend,
            batching: true,
        })
    }

    /// Whether writes of one phase go to the kernel as one batch (the default) or one by one
    /// (for comparison in benchmarks).
    pub fn set_batching(&mut self, on: bool) {
        self.batching = on;
    }

    /// Services programmed.
    pub fn services(&self) -> usize {
        self.svc_ids.len()
    }

    /// Backends programmed.
    pub fn backends(&self) -> usize {
        self.backend_ids.len()
    }

    fn check(desired: &[DesiredService]) -> Result<(), ProgramError> {
        if desired.len() > MAX_SERVICES {
            return Err(ProgramError::Capacity {
                what: "services".into(),
                wanted: desired.len(),
                capacity: MAX_SERVICES,
            });
        }
        let mut frontends = BTreeSet::new();
        let mut backends = BTreeSet::new();
        for s in desired {
            if !frontends.insert(s.frontend) {
                return Err(ProgramError::Duplicate(s.frontend));
            }
            for (tier, list) in s.tiers.iter().enumerate() {
                if list.len() > MAX_TIER_SLOTS {
                    return Err(ProgramError::Capacity {
                        what: format!("backends in tier {tier} of {:?}", s.frontend),
                        wanted: list.len(),
                        capacity: MAX_TIER_SLOTS,
                    });
                }
                backends.extend(list.iter().map(|b| b.addr));
            }
        }
        if backends.len() > MAX_BACKENDS {
            return Err(ProgramError::Capacity {
                what: "backends".into(),
                wanted: backends.len(),
                capacity: MAX_BACKENDS,
            });
        }
        Ok(())
    }

    /// Makes the maps equal to `desired`.
    pub fn apply(&mut self, desired: &[DesiredService]) -> Result<Ops, ProgramError> {
        Self::check(desired)?;
        let mut ops = Ops::default();
        // 1. Backends.
        let mut wanted_backends: BTreeMap<SocketAddr, BackendSpec> = BTreeMap::new();
        for s in desired {
            for b in s.tiers.iter().flatten() {
                wanted_backends.insert(b.addr, *b);
            }
        }
        let mut backend_writes = Vec::new();
        for (addr, spec) in &wanted_backends {
            let id = match self.backend_ids.get(addr) {
                Some(id) => *id,
                None => {
                    let id = self.next_backend;
                    self.next_backend += 1;
                    id
                }
            };
            let entry = BackendEntry {
                addr: *addr,
                healthy: *self.health.get(addr).unwrap_or(&true),
                cluster_id: spec.cluster_id,
                zone: spec.zone,
            };
            let value = maps::backend_val(&entry);
            if self.dp.backends.get(&id, 0).ok() != Some(value) {
                backend_writes.push((id, value));
            }
            self.backend_ids.insert(*addr, id);
            self.health.entry(*addr).or_insert(true);
        }
        ops.writes += backend_writes.len();
        write_all(
            &mut self.dp.backends,
            maps::BACKENDS,
            &backend_writes,
            self.batching,
        )?;
        // 2. Services: slots (all services), counts, then slots past the counts.
        let wanted: BTreeMap<Frontend, &DesiredService> =
            desired.iter().map(|s| (s.frontend, s)).collect();
        let mut slot_writes = Vec::new();
        let mut svc_writes = Vec::new();
        let mut stale_slots = Vec::new();
        let mut entries = Vec::new();
        for (frontend, s) in &wanted {
            let old = self.svc_ids.get(frontend).copied();
            let id = old.map(|e| e.id).unwrap_or_else(|| {
                let id = self.next_svc;
                self.next_svc += 1;
                id
            });
            let mut counts = [0u16; TIERS];
            for (tier, list) in s.tiers.iter().enumerate() {
                counts[tier] = list.len() as u16;
                for (slot, b) in list.iter().enumerate() {
                    let key = maps::slot_key(id, tier as u16, slot as u16);
                    let bid = self.backend_ids[&b.addr];
                    if self.dp.slots.get(&key, 0).ok() != Some(bid) {
                        slot_writes.push((key, bid));
                    }
                }
            }
            let entry = SvcEntry { id, counts };
            let key = maps::svc_key(frontend);
            if old != Some(entry)
                || self.dp.services.get(&key, 0).ok() != Some(maps::svc_val(&entry))
            {
                svc_writes.push((key, maps::svc_val(&entry)));
            }
            if let Some(old) = old {
                for (tier, (new_n, old_n)) in counts.iter().zip(old.counts).enumerate() {
                    for slot in *new_n..old_n {
                        stale_slots.push(maps::slot_key(id, tier as u16, slot));
                    }
                }
            }
            entries.push((*frontend, entry));
        }
        // Every service's new slots before any service's new counts; stale slots last.
        ops.writes += slot_writes.len() + svc_writes.len();
        write_all(&mut self.dp.slots, maps::SLOTS, &slot_writes, self.batching)?;
        write_all(
            &mut self.dp.services,
            maps::SERVICES,
            &svc_writes,
            self.batching,
        )?;
        for key in stale_slots {
            if self.dp.slots.remove(&key).is_ok() {
                ops.deletes += 1;
            }
        }
        self.svc_ids.extend(entries);
        // 3. Services no longer wanted: the service first, then its slots.
        let gone: Vec<(Frontend, SvcEntry)> = self
            .svc_ids
            .iter()
            .filter(|(f, _)| !wanted.contains_key(f))
            .map(|(f, e)| (*f, *e))
            .collect();
        for (f, e) in gone {
            if self.dp.services.remove(&maps::svc_key(&f)).is_ok() {
                ops.deletes += 1;
            }
            for tier in 0..TIERS {
                for slot in 0..e.counts[tier] {
                    if self
                        .dp
                        .slots
                        .remove(&maps::slot_key(e.id, tier as u16, slot))
                        .is_ok()
                    {
                        ops.deletes += 1;
                    }
                }
            }
            self.svc_ids.remove(&f);
        }
        // 4. Backends no longer referenced.
        let unused: Vec<(SocketAddr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(a, _)| !wanted_backends.contains_key(a))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in unused {
            if self.dp.backends.remove(&id).is_ok() {
                ops.deletes += 1;
            }
            self.backend_ids.remove(&addr);
            self.health.remove(&addr);
        }
        Ok(ops)
    }

    /// Makes the IP cache equal to `entries` (address → identity, cluster ID), as /32 or /128
    /// prefixes. Returns the map operations done.
    pub fn apply_ipcache(
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
        Ok(ops)
    }

    /// Marks a backend healthy or not, directly in the backends map. Returns whether it
    /// changed (unknown backends are ignored).
    pub fn set_health(&mut self, addr: SocketAddr, healthy: bool) -> Result<bool, Error> {
        let Some(id) = self.backend_ids.get(&addr).copied() else {
            return Ok(false);
        };
        if self.health.get(&addr) == Some(&healthy) {
            return Ok(false);
        }
        let Ok(value) = self.dp.backends.get(&id, 0) else {
            return Ok(false);
        };
        let Some(mut entry) = maps::parse_backend_val(&value) else {
            return Ok(false);
        };
        entry.healthy = healthy;
        self.dp
            .backends
            .insert(id, maps::backend_val(&entry), 0)
            .map_err(map_err(maps::BACKENDS))?;
        self.health.insert(addr, healthy);
        Ok(true)
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
                    let key = maps::slot_key(entry.id, tier as u16, slot);
                    let bid = self.dp.slots.get(&key, 0).map_err(map_err(maps::SLOTS))?;
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
