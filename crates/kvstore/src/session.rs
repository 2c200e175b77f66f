//! The exporter's session: a liveness lease, and the keys it writes, which hang on no lease.
//!
//! Exported state is withdrawn only by its owner, by a confirmed removal at the source (a
//! Service deleted or un-annotated). So the keys written through a [`Session`] carry **no
//! lease**: losing etcd, a partition longer than any TTL, or a revoked lease never deletes them
//! ([ADR 0013](../../../docs/architecture/adr/0013-exports-outlive-faults.md)). What the lease
//! carries is only the session record (`sessions/<cluster>`): "this cluster's exporter is alive".
//! When the record's lease expires, readers learn the exporter stopped heartbeating; they keep
//! the state.
//!
//! The session remembers every key it wrote and its value, so that rewriting an unchanged value
//! is skipped (a no-op write would bump the revision and wake every watcher), and so that a
//! restarted exporter (which [`Session::resume`]s) can compute what is stale. Synced markers are
//! written only after the writes they vouch for have returned.
//!
//! Must not decide what to export or delete: that is the exporter's reconcile loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use model::ClusterName;
use model::keys::{self, Kind, Scope};
use prost::Message;
use telemetry::backoff::Backoff;
use tokio::sync::{Mutex, watch};

use crate::{Client, Error, Result, Revision};

/// Whether the session's lease is alive, as the keep-alive loop last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Keep-alives are answered.
    Alive,
    /// etcd does not answer keep-alives (since when, in Unix milliseconds, and the last error).
    /// The exported keys are untouched; only the session record may expire.
    Unreachable {
        /// When the first failed keep-alive of this outage happened.
        since_unix_ms: i64,
        /// The last error.
        error: String,
    },
    /// The lease is lost: no keep-alive answered for longer than the TTL (so etcd has expired
    /// the lease and the session record with it), or a lost lease could not be re-created.
    /// Readers see no heartbeat; the exported keys are still untouched.
    LeaseLost {
        /// When the lease was certainly gone (the last answered keep-alive plus the TTL, or
        /// when etcd reported it gone).
        since_unix_ms: i64,
        /// The last error.
        error: String,
    },
}

impl Liveness {
    /// The liveness after a failed attempt to reach etcd at `now_unix_ms` with `error`, given
    /// the lease `ttl` and when a keep-alive was last answered; whether it changed. No answer
    /// for longer than the TTL means the lease is lost.
    fn unreachable(
        &mut self,
        error: String,
        ttl: Duration,
        now_unix_ms: i64,
        answered_unix_ms: i64,
    ) -> bool {
        let expiry =
            answered_unix_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        match self {
            Liveness::Alive => {
                *self = Liveness::Unreachable {
                    since_unix_ms: now_unix_ms,
                    error,
                };
                true
            }
            Liveness::Unreachable { .. } if now_unix_ms >= expiry => {
                *self = Liveness::LeaseLost {
                    since_unix_ms: expiry,
                    error,
                };
                true
            }
            Liveness::Unreachable { error: old, .. } | Liveness::LeaseLost { error: old, .. } => {
                let changed = *old != error;
                *old = error;
                changed
            }
        }
    }

    /// The liveness after etcd said the lease is gone and a new one could not be granted at
    /// `now_unix_ms`; whether it changed.
    fn lost(&mut self, error: String, now_unix_ms: i64) -> bool {
        match self {
            Liveness::LeaseLost { error: old, .. } => {
                let changed = *old != error;
                *old = error;
                changed
            }
            _ => {
                *self = Liveness::LeaseLost {
                    since_unix_ms: now_unix_ms,
                    error,
                };
                true
            }
        }
    }
}

struct State {
    lease: i64,
    /// The session record: written with the lease, rewritten when the lease is re-created.
    record: Option<(String, Vec<u8>)>,
    /// Every key written through the session and not deleted since, with its value.
    keys: BTreeMap<String, Vec<u8>>,
    /// How many times the lease had to be re-created.
    recreated: u64,
}

/// A liveness lease and the (unleased) keys written through it. Dropping the session stops the
/// keep-alive; the keys stay, and the session record expires with the lease.
pub struct Session {
    client: Client,
    ttl: Duration,
    state: Arc<Mutex<State>>,
    liveness: watch::Receiver<Liveness>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("ttl", &self.ttl).finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

async fn grant(client: &Client, ttl: Duration) -> Result<i64> {
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let resp = client
        .etcd()
        .lease_grant(secs, None)
        .await
        .map_err(|source| Error::Request {
            op: "lease-grant",
            key: String::new(),
            source,
        })?;
    Ok(resp.id())
}

/// What etcd says of a lease.
enum LeaseState {
    Alive,
    Gone,
}

async fn lease_state(client: &Client, lease: i64, within: Duration) -> Result<LeaseState> {
    // A hung etcd accepts the request and never answers: bounded, so the caller reports it.
    let asked = tokio::time::timeout(within, client.etcd().lease_time_to_live(lease, None))
        .await
        .map_err(|_| Error::NotAnswered {
            op: "lease-time-to-live",
            after: within,
        })?;
    match asked {
        Ok(r) if r.ttl() > 0 => Ok(LeaseState::Alive),
        Ok(_) => Ok(LeaseState::Gone),
        Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
            Ok(LeaseState::Gone)
        }
        Err(source) => Err(Error::Request {
            op: "lease-time-to-live",
            key: String::new(),
            source,
        }),
    }
}

impl Session {
    fn spawn(client: &Client, ttl: Duration, state: State) -> Self {
        let state = Arc::new(Mutex::new(state));
        let (tx, liveness) = watch::channel(Liveness::Alive);
        let keepalive = tokio::spawn(keep_alive(client.clone(), ttl, Arc::clone(&state), tx));
        Self {
            client: client.clone(),
            ttl,
            state,
            liveness,
            keepalive,
        }
    }

    /// Grants a lease of `ttl` (at least one second) and starts keeping it alive.
    pub async fn start(client: &Client, ttl: Duration) -> Result<Self> {
        let lease = grant(client, ttl).await?;
        Ok(Self::spawn(
            client,
            ttl,
            State {
                lease,
                record: None,
                keys: BTreeMap::new(),
                recreated: 0,
            },
        ))
    }

    /// Adopts the lease recorded at `record_key` if it is still alive, otherwise starts a new
    /// one; either way the record then names this session's lease (written with it). The
    /// unleased keys under `held_prefix` are taken over as held, so that unchanged keys are not
    /// rewritten. Keys there that still hang on a lease (written by an earlier version) are not
    /// taken over: the next write of them detaches them from it. Returns the session and
    /// whether it adopted a lease.
    pub async fn resume(
        client: &Client,
        ttl: Duration,
        record_key: &str,
        held_prefix: &str,
    ) -> Result<(Self, bool)> {
        let recorded = client
            .get_raw(record_key)
            .await?
            .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok());
        let adopted = match recorded {
            Some(lease) => match lease_state(client, lease, ttl.max(Duration::from_secs(1))).await?
            {
                LeaseState::Alive => Some(lease),
                LeaseState::Gone => None,
            },
            None => None,
        };
        let (kvs, _) = client.list_raw(held_prefix).await?;
        let keys: BTreeMap<String, Vec<u8>> = kvs
            .into_iter()
            .filter(|kv| kv.lease == 0)
            .map(|kv| (kv.key, kv.value))
            .collect();
        let lease = match adopted {
            Some(l) => l,
            None => grant(client, ttl).await?,
        };
        let record = (record_key.to_owned(), lease.to_string().into_bytes());
        client
            .put_with_lease(&record.0, record.1.clone(), lease)
            .await?;
        let session = Self::spawn(
            client,
            ttl,
            State {
                lease,
                record: Some(record),
                keys,
                recreated: 0,
            },
        );
        Ok((session, adopted.is_some()))
    }

    /// The current lease ID.
    pub async fn lease(&self) -> i64 {
        self.state.lock().await.lease
    }

    /// How many times the lease was lost and re-created.
    pub async fn recreated(&self) -> u64 {
        self.state.lock().await.recreated
    }

    /// Whether keep-alives are answered; changes as they start or stop being answered.
    pub fn liveness(&self) -> watch::Receiver<Liveness> {
        self.liveness.clone()
    }

    /// Writes one key (no lease).
    pub async fn put(&self, key: String, value: Vec<u8>) -> Result<Revision> {
        self.put_many(vec![(key, value)]).await
    }

    /// Writes many keys (no lease), in transactions of at most [`crate::MAX_TXN_OPS`]. Keys
    /// whose remembered value is already `value` are skipped. Returns the revision of the last
    /// write, or 0 when every item was a no-op.
    pub async fn put_many(&self, items: Vec<(String, Vec<u8>)>) -> Result<Revision> {
        let mut state = self.state.lock().await;
        let changed: Vec<(String, Vec<u8>)> = items
            .into_iter()
            .filter(|(k, v)| state.keys.get(k) != Some(v))
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let rev = self.client.put_many(&changed, 0).await?;
        state.keys.extend(changed);
        Ok(rev)
    }

    /// Deletes keys written through the session (a confirmed removal at the source).
    pub async fn delete_many(&self, keys: &[String]) -> Result<Revision> {
        let mut state = self.state.lock().await;
        let rev = self.client.delete_many(keys).await?;
        for k in keys {
            state.keys.remove(k);
        }
        Ok(rev)
    }

    /// The keys the session holds under `prefix`, with their values.
    pub async fn held(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        let state = self.state.lock().await;
        state
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The value the session holds at `key`, if any.
    pub async fn held_value(&self, key: &str) -> Option<Vec<u8>> {
        self.state.lock().await.keys.get(key).cloned()
    }

    /// Writes the initial state of one kind of one cluster, then its synced marker. The marker
    /// is written only after every item has landed, and carries the revision at which they all
    /// had: a reader that sees the marker has seen every item.
    pub async fn sync_initial(
        &self,
        scope: Scope,
        cluster: &ClusterName,
        kind: Kind,
        items: Vec<(String, Vec<u8>)>,
    ) -> Result<Revision> {
        let mut rev = self.put_many(items).await?;
        if rev == 0 {
            rev = self.client.current_revision().await?;
        }
        self.mark_synced(scope, cluster, kind, rev).await
    }

    /// Writes the synced marker of one kind of one cluster.
    pub async fn mark_synced(
        &self,
        scope: Scope,
        cluster: &ClusterName,
        kind: Kind,
        revision: Revision,
    ) -> Result<Revision> {
        let marker = wire::pb::SyncedMarker {
            cluster: cluster.to_string(),
            kind: kind.to_string(),
            revision,
            written_unix_ms: now_unix_ms(),
        };
        self.put(keys::synced(scope, cluster, kind), marker.encode_to_vec())
            .await
    }

    /// Deletes every key of the session and revokes its lease: the owner withdraws everything
    /// it exported (decommissioning; never called on a fault).
    pub async fn close(self) -> Result<()> {
        self.keepalive.abort();
        let (lease, held, record) = {
            let state = self.state.lock().await;
            let held: Vec<String> = state.keys.keys().cloned().collect();
            (state.lease, held, state.record.clone())
        };
        self.client.delete_many(&held).await?;
        if let Some((key, _)) = record {
            self.client.delete_many(&[key]).await?;
        }
        self.client
            .etcd()
            .lease_revoke(lease)
            .await
            .map_err(|source| Error::Request {
                op: "lease-revoke",
                key: String::new(),
                source,
            })?;
        Ok(())
    }
}

/// Grants a new lease and writes the session record again under it. The exported keys hang on
/// no lease and are not touched.
async fn recreate(client: &Client, ttl: Duration, state: &mut State) -> Result<()> {
    let old = state.lease;
    let lease = grant(client, ttl).await?;
    if let Some((key, _)) = &state.record {
        let value = lease.to_string().into_bytes();
        client.put_with_lease(key, value.clone(), lease).await?;
        state.record = Some((key.clone(), value));
    }
    state.lease = lease;
    state.recreated += 1;
    tracing::warn!(
        old_lease = format_args!("{old:x}"),
        new_lease = format_args!("{lease:x}"),
        "session lease expired; re-created it and rewrote the session record (exported keys untouched)"
    );
    Ok(())
}

/// How one keep-alive stream ended.
enum Ended {
    /// etcd answered with TTL 0: the lease is gone.
    Expired,
    /// The stream failed or went silent; the lease may or may not be alive.
    Broken(String),
}

/// Keeps `lease` alive on one stream until it ends.
async fn run_stream(
    client: &Client,
    lease: i64,
    ttl: Duration,
    backoff: &mut Backoff,
    live: &watch::Sender<Liveness>,
    answered_unix_ms: &mut i64,
) -> Ended {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let answer_within = period.max(Duration::from_secs(1));
    let (mut keeper, mut stream) =
        match tokio::time::timeout(answer_within, client.etcd().lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Ended::Broken(format!("open keep-alive stream: {e}")),
            Err(_) => return Ended::Broken("keep-alive stream not opened in time".into()),
        };
    loop {
        match tokio::time::timeout(answer_within, keeper.keep_alive()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ended::Broken(format!("send keep-alive: {e}")),
            Err(_) => return Ended::Broken("keep-alive not sent in time".into()),
        }
        let resp = match tokio::time::timeout(answer_within, stream.message()).await {
            Ok(Ok(Some(resp))) => resp,
            Ok(Ok(None)) => return Ended::Broken("keep-alive stream closed".into()),
            Ok(Err(e)) => return Ended::Broken(format!("keep-alive: {e}")),
            Err(_) => return Ended::Broken("keep-alive not answered".into()),
        };
        if resp.ttl() <= 0 {
            return Ended::Expired;
        }
        backoff.healthy();
        *answered_unix_ms = now_unix_ms();
        live.send_if_modified(|l| {
            let changed = *l != Liveness::Alive;
            *l = Liveness::Alive;
            changed
        });
        tokio::time::sleep(period).await;
    }
}

/// Keeps the lease alive forever. Whatever ends a stream, etcd is asked whether the lease still
/// exists: if not (expired during an outage, or revoked), a new lease is granted and the record
/// rewritten at once; if etcd cannot be asked, the loop backs off and asks again.
async fn keep_alive(
    client: Client,
    ttl: Duration,
    state: Arc<Mutex<State>>,
    live: watch::Sender<Liveness>,
) {
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        (ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(2)),
        ttl,
    );
    // When a keep-alive was last answered (the lease was granted just before this loop).
    let mut answered = now_unix_ms();
    // The lease kept alive, known without the state's lock: a write waiting on a hung etcd
    // holds that lock, and liveness must still move on (only this loop changes the lease).
    let mut lease = state.lock().await.lease;
    loop {
        let gone = match run_stream(&client, lease, ttl, &mut backoff, &live, &mut answered).await {
            Ended::Expired => true,
            Ended::Broken(error) => {
                match lease_state(&client, lease, (ttl / 3).max(Duration::from_secs(1))).await {
                    Ok(LeaseState::Gone) => true,
                    Ok(LeaseState::Alive) => {
                        tracing::debug!(lease = format_args!("{lease:x}"), error = %error, "keep-alive stream broke; lease alive; reopening");
                        false
                    }
                    Err(e) => {
                        let error = telemetry::chain(&e).to_string();
                        live.send_if_modified(|l| {
                            l.unreachable(error, ttl, now_unix_ms(), answered)
                        });
                        tracing::debug!(error = %telemetry::chain(&e), "etcd unreachable for keep-alives; retrying");
                        backoff.wait().await;
                        continue;
                    }
                }
            }
        };
        if gone {
            let mut guard = state.lock().await;
            let recreated = if guard.lease == lease {
                let within = ttl.max(Duration::from_secs(1));
                match tokio::time::timeout(within, recreate(&client, ttl, &mut guard)).await {
                    Ok(r) => r,
                    Err(_) => Err(crate::Error::NotAnswered {
                        op: "re-create the session lease",
                        after: within,
                    }),
                }
            } else {
                Ok(())
            };
            lease = guard.lease;
            if let Err(e) = recreated {
                drop(guard);
                let error = telemetry::chain(&e).to_string();
                tracing::warn!(error = %error, "cannot re-create the session lease; retrying");
                live.send_if_modified(|l| l.lost(error, now_unix_ms()));
                backoff.wait().await;
                continue;
            }
            // A new lease, just granted: its TTL runs from now.
            answered = now_unix_ms();
            backoff.reset();
        } else {
            backoff.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn unreachable(since: i64, error: &str) -> Liveness {
        Liveness::Unreachable {
            since_unix_ms: since,
            error: error.into(),
        }
    }

    fn lost(since: i64, error: &str) -> Liveness {
        Liveness::LeaseLost {
            since_unix_ms: since,
            error: error.into(),
        }
    }

    #[test]
    fn an_outage_longer_than_the_ttl_is_a_lost_lease() {
        // The last keep-alive was answered at 500 ms; the outage is noticed at 1 s.
        // (before, error, now ms) → (after, changed)
        let table = [
            (Liveness::Alive, "a", 1_000, unreachable(1_000, "a"), true),
            (
                unreachable(1_000, "a"),
                "a",
                5_000,
                unreachable(1_000, "a"),
                false,
            ),
            (
                unreachable(1_000, "a"),
                "b",
                5_000,
                unreachable(1_000, "b"),
                true,
            ),
            (
                unreachable(1_000, "a"),
                "a",
                30_499,
                unreachable(1_000, "a"),
                false,
            ),
            (
                unreachable(1_000, "a"),
                "a",
                30_500,
                lost(30_500, "a"),
                true,
            ),
            (
                unreachable(1_000, "a"),
                "a",
                40_000,
                lost(30_500, "a"),
                true,
            ),
            (lost(30_500, "a"), "a", 90_000, lost(30_500, "a"), false),
            (lost(30_500, "a"), "c", 90_000, lost(30_500, "c"), true),
        ];
        for (before, error, now, after, changed) in table {
            let mut l = before.clone();
            let got = l.unreachable(error.into(), TTL, now, 500);
            assert_eq!(got, changed, "{before:?} at {now}");
            assert_eq!(l, after, "{before:?} at {now}");
        }
    }

    #[test]
    fn a_lease_that_cannot_be_re_created_is_lost_from_then() {
        let mut l = Liveness::Alive;
        assert!(l.lost("grant refused".into(), 7));
        assert_eq!(l, lost(7, "grant refused"));
        assert!(!l.lost("grant refused".into(), 9));
        let mut l = unreachable(1, "a");
        assert!(l.lost("b".into(), 9));
        assert_eq!(l, lost(9, "b"));
    }
}
