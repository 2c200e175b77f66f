//! A prefix watch that survives dropped connections and compaction.
//!
//! The watcher first lists the prefix and reports it as `Init`, `InitApply`..., `InitDone`.
//! From then on it watches from the revision after the last one it reported:
//!
//! * if the stream breaks (connection lost, etcd restarted), it re-opens the watch from that
//!   revision, so etcd replays exactly what was missed: no gap, no repeat;
//! * if etcd compacted that revision away, it lists the prefix again and reports only the real
//!   differences against what it had reported: `Apply` for new or changed keys, `Delete` for
//!   keys that are gone. A key that did not change produces nothing.
//!
//! Must not interpret values; it deals in raw [`Kv`]s.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use telemetry::backoff::Backoff;

use crate::{Client, Kv, Result, Revision};

/// What a watcher reports; the verbs are kube's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A (re)listing starts.
    Init,
    /// A key of the initial listing.
    InitApply(Kv),
    /// The initial listing is complete at this revision.
    InitDone {
        /// Revision of the listing.
        revision: Revision,
    },
    /// A key was created or changed.
    Apply(Kv),
    /// A key was deleted.
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion (or of the relist that found it gone).
        revision: Revision,
    },
}

/// Counters a watcher keeps, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Times the watch stream was re-opened after breaking.
    pub reconnects: u64,
    /// Times the prefix was relisted because of compaction.
    pub relists: u64,
}

/// A resumable watch of one prefix. Drive it with [`Watcher::next`].
pub struct Watcher {
    client: Client,
    prefix: String,
    /// Every key reported as present, with the revision it was reported at.
    known: HashMap<String, Revision>,
    /// The last revision received; the watch resumes after it.
    received: Revision,
    /// The revision of the last event handed to the caller.
    reported: Revision,
    listed: bool,
    stream: Option<WatchStream>,
    pending: VecDeque<Event>,
    backoff: Backoff,
    stats: Stats,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefix", &self.prefix)
            .field("received", &self.received)
            .field("known", &self.known.len())
            .finish()
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Watcher {
    /// A watcher of every key under `prefix`. Nothing happens until [`Watcher::next`].
    pub fn new(client: &Client, prefix: impl Into<String>) -> Self {
        Self {
            client: client.clone(),
            prefix: prefix.into(),
            known: HashMap::new(),
            received: 0,
            reported: 0,
            listed: false,
            stream: None,
            pending: VecDeque::new(),
            backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF, Duration::from_secs(10)),
            stats: Stats::default(),
        }
    }

    /// The revision the caller has caught up with: every change up to it has been returned
    /// by [`Watcher::next`].
    pub fn revision(&self) -> Revision {
        self.reported
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The next event. Waits as long as needed; connection problems are retried with
    /// backoff, never returned, so a caller only sees a consistent sequence of events. Only
    /// the very first listing returns errors (so that a misconfigured caller fails fast).
    pub async fn next(&mut self) -> Result<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                if self.pending.is_empty() {
                    self.reported = self.received;
                }
                return Ok(e);
            }
            if !self.listed {
                match self.list().await {
                    Ok(()) => continue,
                    Err(e) if self.received == 0 => return Err(e),
                    Err(e) => {
                        tracing::warn!(prefix = %self.prefix, error = %telemetry::chain(&e), "relist failed; retrying");
                        self.sleep_backoff().await;
                        continue;
                    }
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                self.open().await;
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            tracing::info!(
                                prefix = %self.prefix,
                                revision = self.received,
                                compacted = resp.compact_revision(),
                                "watch revision compacted; relisting"
                            );
                            self.stats.relists += 1;
                            self.listed = false;
                        } else {
                            tracing::warn!(prefix = %self.prefix, reason = resp.cancel_reason(), "watch canceled by etcd");
                        }
                        self.stream = None;
                        continue;
                    }
                    self.backoff.healthy();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let kv = Kv::from_etcd(kv);
                        self.received = self.received.max(kv.mod_revision);
                        match ev.event_type() {
                            EventType::Put => {
                                self.known.insert(kv.key.clone(), kv.mod_revision);
                                self.pending.push_back(Event::Apply(kv));
                            }
                            EventType::Delete => {
                                self.known.remove(&kv.key);
                                self.pending.push_back(Event::Delete {
                                    key: kv.key,
                                    revision: kv.mod_revision,
                                });
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(prefix = %self.prefix, revision = self.received, "watch stream broke; resuming");
                    self.stream = None;
                    self.stats.reconnects += 1;
                    self.sleep_backoff().await;
                }
            }
        }
    }

    /// Lists the prefix. The first time, reports it as an initial listing; after that (a
    /// compaction), reports only the differences against what was known.
    async fn list(&mut self) -> Result<()> {
        let (kvs, revision) = self.client.list_raw(&self.prefix).await?;
        let first = self.received == 0;
        if first {
            self.pending.push_back(Event::Init);
        }
        let mut seen = HashMap::with_capacity(kvs.len());
        for kv in kvs {
            seen.insert(kv.key.clone(), kv.mod_revision);
            if first {
                self.pending.push_back(Event::InitApply(kv));
            } else if self.known.get(&kv.key) != Some(&kv.mod_revision) {
                self.pending.push_back(Event::Apply(kv));
            }
        }
        if first {
            self.pending.push_back(Event::InitDone { revision });
        } else {
            let mut gone: Vec<&String> = self
                .known
                .keys()
                .filter(|k| !seen.contains_key(*k))
                .collect();
            gone.sort();
            for key in gone {
                self.pending.push_back(Event::Delete {
                    key: key.clone(),
                    revision,
                });
            }
        }
        self.known = seen;
        self.received = revision;
        self.listed = true;
        self.stream = None;
        Ok(())
    }

    async fn open(&mut self) {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.received + 1);
        match self
            .client
            .etcd()
            .watch(self.prefix.as_str(), Some(opts))
            .await
        {
            Ok(stream) => self.stream = Some(stream),
            Err(e) => {
                tracing::debug!(prefix = %self.prefix, error = %e, "cannot open watch; retrying");
                self.sleep_backoff().await;
            }
        }
    }

    async fn sleep_backoff(&mut self) {
        self.backoff.wait().await;
    }
}
