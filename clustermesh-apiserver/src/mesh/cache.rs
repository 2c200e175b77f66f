//! The watch cache: one etcd watch of the mesh state, fanned out to every Mesh API client.
//!
//! It keeps every `state/` and `cache/` key in memory with the revision it was written at and
//! the time this apiserver saw it, plus a ring of the latest updates so that a client can resume
//! from a revision. Clients subscribe to a bounded broadcast: a client that falls behind by more
//! than its capacity is not buffered for; it gets a fresh snapshot instead.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

use kvstore::watch::{Event, Watcher};
use model::ClusterName;
use model::keys::{self, Kind, Parsed, Scope};
use tokio::sync::{broadcast, watch};

/// How many updates the broadcast holds for slow clients before they must resync.
pub const CLIENT_BUFFER: usize = 16_384;
/// How many recent updates are kept for resumption.
pub const RESUME_RING: usize = 100_000;

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An object of a kind.
    Object(Kind, String),
    /// The synced marker of a kind.
    Synced(Kind),
}

/// One key's current value.
#[derive(Debug, Clone)]
pub struct Record {
    /// State (this cluster's exports) or cache (imported).
    pub scope: Scope,
    /// The owning cluster.
    pub cluster: ClusterName,
    /// What it is.
    pub item: Item,
    /// The value bytes.
    pub value: Arc<[u8]>,
    /// etcd revision of the write.
    pub revision: i64,
    /// When this apiserver saw it, µs since the epoch.
    pub seen_unix_micros: i64,
}

/// The kind of `r` when it is one of this cluster's own exported objects.
fn exported_kind(r: &Record) -> Option<Kind> {
    match (r.scope, &r.item) {
        (Scope::State, Item::Object(kind, _)) => Some(*kind),
        _ => None,
    }
}

/// A change: a new value, or a deletion (`value` empty and `deleted`).
#[derive(Debug, Clone)]
pub struct Update {
    /// The record (for a deletion: the last value, with the deletion's revision).
    pub record: Arc<Record>,
    /// Whether the key was deleted.
    pub deleted: bool,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Arc<Record>>,
    /// Objects of scope state per kind, kept with `objects` (read by the status every 0.2 s,
    /// which must not walk 100k records each time).
    exported: BTreeMap<Kind, usize>,
    ring: VecDeque<Update>,
    /// The cache holds every change up to this revision.
    revision: i64,
}

/// See the module docs.
#[derive(Debug)]
pub struct WatchCache {
    state: RwLock<State>,
    tx: broadcast::Sender<Update>,
    ready: watch::Sender<bool>,
}

/// Where a new client starts.
#[derive(Debug)]
pub struct Start {
    /// A snapshot (every record), if the client must start over.
    pub snapshot: Option<Vec<Arc<Record>>>,
    /// Updates after the client's revision, when it resumes.
    pub replay: Vec<Update>,
    /// Later updates.
    pub live: broadcast::Receiver<Update>,
    /// Everything up to this revision is in `snapshot` or `replay`.
    pub revision: i64,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

fn parse(key: &str) -> Option<(Scope, ClusterName, Item)> {
    match keys::parse(key).ok()? {
        Parsed::Object {
            scope,
            cluster,
            kind,
            name,
        } => Some((scope, cluster, Item::Object(kind, name))),
        Parsed::Synced {
            scope,
            cluster,
            kind,
        } => Some((scope, cluster, Item::Synced(kind))),
    }
}

impl WatchCache {
    /// Starts following etcd. [`WatchCache::ready`] turns true after the first listing.
    pub fn start(kv: &kvstore::Client) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, _) = broadcast::channel(CLIENT_BUFFER);
        let (ready, _) = watch::channel(false);
        let cache = Arc::new(Self {
            state: RwLock::new(State::default()),
            tx,
            ready,
        });
        let mut watcher = Watcher::new(kv, keys::ROOT);
        let this = Arc::clone(&cache);
        let task = tokio::spawn(async move {
            let mut initial: BTreeMap<String, Arc<Record>> = BTreeMap::new();
            loop {
                let event = match watcher.next().await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %telemetry::chain(&e), "watch cache: etcd listing failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                match event {
                    Event::Init => initial.clear(),
                    Event::InitApply(kv) => {
                        if let Some((scope, cluster, item)) = parse(&kv.key) {
                            initial.insert(
                                kv.key,
                                Arc::new(Record {
                                    scope,
                                    cluster,
                                    item,
                                    value: kv.value.into(),
                                    revision: kv.mod_revision,
                                    seen_unix_micros: now_micros(),
                                }),
                            );
                        }
                    }
                    Event::InitDone { revision } => {
                        let mut s = this.write();
                        s.objects = std::mem::take(&mut initial);
                        s.exported.clear();
                        let kinds: Vec<Kind> = s
                            .objects
                            .values()
                            .filter_map(|r| exported_kind(r))
                            .collect();
                        for k in kinds {
                            *s.exported.entry(k).or_insert(0) += 1;
                        }
                        s.revision = revision;
                        s.ring.clear();
                        drop(s);
                        this.ready.send_replace(true);
                    }
                    Event::Apply(kv) => {
                        if let Some((scope, cluster, item)) = parse(&kv.key) {
                            let record = Arc::new(Record {
                                scope,
                                cluster,
                                item,
                                value: kv.value.into(),
                                revision: kv.mod_revision,
                                seen_unix_micros: now_micros(),
                            });
                            this.push(kv.key, record, false);
                        }
                    }
                    Event::Delete { key, revision } => {
                        let old = this.read().objects.get(&key).cloned();
                        if let Some(old) = old {
                            let mut record = (*old).clone();
                            record.revision = revision;
                            record.seen_unix_micros = now_micros();
                            this.push(key, Arc::new(record), true);
                        }
                    }
                }
            }
        });
        (cache, task)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn push(&self, key: String, record: Arc<Record>, deleted: bool) {
        let mut s = self.write();
        s.revision = s.revision.max(record.revision);
        let old = if deleted {
            s.objects.remove(&key)
        } else {
            s.objects.insert(key, Arc::clone(&record))
        };
        let delta = match (old.as_deref().and_then(exported_kind), deleted) {
            (Some(k), true) => Some((k, false)),
            (None, false) => exported_kind(&record).map(|k| (k, true)),
            _ => None,
        };
        match delta {
            Some((k, true)) => *s.exported.entry(k).or_insert(0) += 1,
            Some((k, false)) => {
                if let Some(n) = s.exported.get_mut(&k) {
                    *n = n.saturating_sub(1);
                }
            }
            None => {}
        }
        let update = Update { record, deleted };
        s.ring.push_back(update.clone());
        while s.ring.len() > RESUME_RING {
            s.ring.pop_front();
        }
        // Sent under the lock so that a subscriber sees exactly the updates after its start.
        let _ = self.tx.send(update);
    }

    /// An empty, ready cache fed by hand (for tests of the streaming side).
    #[cfg(test)]
    pub(crate) fn detached() -> Arc<Self> {
        let (tx, _) = broadcast::channel(CLIENT_BUFFER);
        let (ready, _) = watch::channel(true);
        Arc::new(Self {
            state: RwLock::new(State::default()),
            tx,
            ready,
        })
    }

    /// Applies one change by hand (for tests of the streaming side).
    #[cfg(test)]
    pub(crate) fn put_for_test(&self, key: &str, value: Vec<u8>, revision: i64) {
        if let Some((scope, cluster, item)) = parse(key) {
            let record = Arc::new(Record {
                scope,
                cluster,
                item,
                value: value.into(),
                revision,
                seen_unix_micros: now_micros(),
            });
            self.push(key.to_owned(), record, false);
        }
    }

    /// Deletes one key by hand (for tests).
    #[cfg(test)]
    pub(crate) fn delete_for_test(&self, key: &str, revision: i64) {
        let old = self.read().objects.get(key).cloned();
        if let Some(old) = old {
            let mut record = (*old).clone();
            record.revision = revision;
            self.push(key.to_owned(), Arc::new(record), true);
        }
    }

    /// Waits for the first listing.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// The current revision of the cache.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// A consistent start: a snapshot (or, when `resume` is a revision still in the ring, the
    /// updates after it) and the live feed after that.
    pub fn subscribe(&self, resume: i64) -> Start {
        // The write lock orders this against `push`.
        let s = self.write();
        let live = self.tx.subscribe();
        let oldest_replayable = s.ring.front().map_or(s.revision, |u| u.record.revision - 1);
        if resume > 0 && resume >= oldest_replayable && resume <= s.revision {
            let replay = s
                .ring
                .iter()
                .filter(|u| u.record.revision > resume)
                .cloned()
                .collect();
            return Start {
                snapshot: None,
                replay,
                live,
                revision: s.revision,
            };
        }
        Start {
            snapshot: Some(s.objects.values().cloned().collect()),
            replay: Vec::new(),
            live,
            revision: s.revision,
        }
    }

    /// The number of records held.
    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    /// Objects of this cluster's own exports (scope state), per kind.
    pub fn exported(&self) -> BTreeMap<String, usize> {
        self.read()
            .exported
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.to_string(), *n))
            .collect()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_counts_follow_puts_rewrites_and_deletes_of_own_state_only() {
        let cache = WatchCache::detached();
        let east = ClusterName::new("east").unwrap_or_else(|e| panic!("{e}"));
        let west = ClusterName::new("west").unwrap_or_else(|e| panic!("{e}"));
        let ep = |scope, c: &ClusterName, n: &str| keys::object_key(scope, c, Kind::Endpoints, n);
        cache.put_for_test(&ep(Scope::State, &east, "10.0.0.1"), vec![1], 1);
        cache.put_for_test(&ep(Scope::State, &east, "10.0.0.2"), vec![1], 2);
        cache.put_for_test(&ep(Scope::State, &east, "10.0.0.2"), vec![2], 3);
        cache.put_for_test(&ep(Scope::Cache, &west, "10.1.0.1"), vec![1], 4);
        cache.put_for_test(
            &keys::synced(Scope::State, &east, Kind::Endpoints),
            vec![1],
            5,
        );
        assert_eq!(
            cache.exported(),
            BTreeMap::from([("endpoints".to_owned(), 2)])
        );
        cache.delete_for_test(&ep(Scope::State, &east, "10.0.0.1"), 6);
        cache.delete_for_test(&ep(Scope::State, &east, "10.9.9.9"), 7);
        cache.delete_for_test(&ep(Scope::Cache, &west, "10.1.0.1"), 8);
        assert_eq!(
            cache.exported(),
            BTreeMap::from([("endpoints".to_owned(), 1)])
        );
        cache.delete_for_test(&ep(Scope::State, &east, "10.0.0.2"), 9);
        assert!(cache.exported().is_empty());
    }
}
