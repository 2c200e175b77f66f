//! Leased writes: the keys a cluster exports live as long as its apiserver does.
//!
//! A [`Session`] owns one etcd lease, keeps it alive, and remembers every key written through
//! it. If the lease expires anyway (a long partition, or someone revoked it), the session grants
//! a new lease and writes every remembered key again, so exported state comes back without the
//! exporter doing anything. Synced markers are written through the session as well, and only
//! after the writes they vouch for have returned.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use model::ClusterName;
use model::keys::{self, Kind, Scope};
use prost::Message;
use tokio::sync::Mutex;

use crate::{Client, Error, Result, Revision};

struct State {
    lease: i64,
    /// Every key written through the session and not deleted since, with its value.
    keys: BTreeMap<String, Vec<u8>>,
    /// How many times the lease had to be re-created.
    recreated: u64,
}

/// A lease and the keys attached to it. Dropping the session stops the keep-alive; the keys
/// then expire with the lease (use [`Session::close`] to remove them at once).
pub struct Session {
    client: Client,
    ttl: Duration,
    state: Arc<Mutex<State>>,
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

impl Session {
    /// Grants a lease of `ttl` (at least one second) and starts keeping it alive.
    pub async fn start(client: &Client, ttl: Duration) -> Result<Self> {
        let lease = grant(client, ttl).await?;
        let state = Arc::new(Mutex::new(State {
            lease,
            keys: BTreeMap::new(),
            recreated: 0,
        }));
        let keepalive = tokio::spawn(keep_alive(client.clone(), ttl, Arc::clone(&state)));
        Ok(Self {
            client: client.clone(),
            ttl,
            state,
            keepalive,
        })
    }

    /// Adopts the lease recorded at `record_key` if it is still alive, taking over the keys
    /// under `held_prefix` that are attached to it (so that unchanged keys are not rewritten);
    /// otherwise starts a new lease. Either way the record then names this session's lease.
    /// Returns the session and whether it adopted a lease.
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
        let mut adopted = None;
        if let Some(lease) = recorded {
            let alive = client
                .etcd()
                .lease_time_to_live(lease, None)
                .await
                .map(|r| r.ttl() > 0)
                .unwrap_or(false);
            if alive {
                let (kvs, _) = client.list_raw(held_prefix).await?;
                let keys: BTreeMap<String, Vec<u8>> = kvs
                    .into_iter()
                    .filter(|kv| kv.lease == lease)
                    .map(|kv| (kv.key, kv.value))
                    .collect();
                adopted = Some((lease, keys));
            }
        }
        let was_adopted = adopted.is_some();
        let (lease, keys) = match adopted {
            Some(a) => a,
            None => (grant(client, ttl).await?, BTreeMap::new()),
        };
        let state = Arc::new(Mutex::new(State {
            lease,
            keys,
            recreated: 0,
        }));
        let keepalive = tokio::spawn(keep_alive(client.clone(), ttl, Arc::clone(&state)));
        let session = Self {
            client: client.clone(),
            ttl,
            state,
            keepalive,
        };
        session
            .put(record_key.to_owned(), lease.to_string().into_bytes())
            .await?;
        Ok((session, was_adopted))
    }

    /// The current lease ID.
    pub async fn lease(&self) -> i64 {
        self.state.lock().await.lease
    }

    /// How many times the lease was lost and re-created.
    pub async fn recreated(&self) -> u64 {
        self.state.lock().await.recreated
    }

    /// Writes one key attached to the lease.
    pub async fn put(&self, key: String, value: Vec<u8>) -> Result<Revision> {
        self.put_many(vec![(key, value)]).await
    }

    /// Writes many keys attached to the lease, in transactions of at most
    /// [`crate::MAX_TXN_OPS`]. Keys whose remembered value is already `value` are skipped (a
    /// no-op write would still bump the revision and wake every watcher). Returns the revision
    /// of the last write, or 0 when every item was a no-op.
    pub async fn put_many(&self, items: Vec<(String, Vec<u8>)>) -> Result<Revision> {
        let mut state = self.state.lock().await;
        let changed: Vec<(String, Vec<u8>)> = items
            .into_iter()
            .filter(|(k, v)| state.keys.get(k) != Some(v))
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let rev = match self.client.put_many(&changed, state.lease).await {
            Ok(rev) => rev,
            Err(e) if is_lease_gone(&e) => {
                recreate(&self.client, self.ttl, &mut state).await?;
                self.client.put_many(&changed, state.lease).await?
            }
            Err(e) => return Err(e),
        };
        state.keys.extend(changed);
        Ok(rev)
    }

    /// Deletes keys written through the session.
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
        let written_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or_default();
        let marker = wire::pb::SyncedMarker {
            cluster: cluster.to_string(),
            kind: kind.to_string(),
            revision,
            written_unix_ms,
        };
        self.put(keys::synced(scope, cluster, kind), marker.encode_to_vec())
            .await
    }

    /// Revokes the lease: every key of the session disappears at once.
    pub async fn close(self) -> Result<()> {
        self.keepalive.abort();
        let lease = self.state.lock().await.lease;
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

fn is_lease_gone(e: &Error) -> bool {
    matches!(e, Error::Request { source, .. } if source.to_string().contains("lease not found"))
}

/// Grants a new lease and writes every remembered key again under it.
async fn recreate(client: &Client, ttl: Duration, state: &mut State) -> Result<()> {
    let old = state.lease;
    let lease = grant(client, ttl).await?;
    let items: Vec<(String, Vec<u8>)> = state
        .keys
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    client.put_many(&items, lease).await?;
    state.lease = lease;
    state.recreated += 1;
    tracing::warn!(
        old_lease = format_args!("{old:x}"),
        new_lease = format_args!("{lease:x}"),
        keys = items.len(),
        "lease expired; re-created it and rewrote its keys"
    );
    Ok(())
}

/// Sends a keep-alive every third of the TTL. A response with TTL 0 means the lease is gone:
/// re-create it. A broken stream is re-opened with backoff.
async fn keep_alive(client: Client, ttl: Duration, state: Arc<Mutex<State>>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut backoff = Duration::from_millis(100);
    loop {
        let lease = state.lock().await.lease;
        let (mut keeper, mut stream) = match client.etcd().lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(lease = format_args!("{lease:x}"), error = %e, "keep-alive stream failed to open");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ttl);
                continue;
            }
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                break;
            }
            let resp = match tokio::time::timeout(ttl, stream.message()).await {
                Ok(Ok(Some(resp))) => resp,
                _ => break,
            };
            backoff = Duration::from_millis(100);
            if resp.ttl() <= 0 {
                let mut guard = state.lock().await;
                if guard.lease == lease
                    && let Err(e) = recreate(&client, ttl, &mut guard).await
                {
                    tracing::error!(error = %e, "cannot re-create the lease; retrying");
                }
                break;
            }
            tokio::time::sleep(period).await;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(ttl);
    }
}
