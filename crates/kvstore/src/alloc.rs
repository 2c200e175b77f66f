//! Identity allocation, safe across concurrent allocators (apiserver replicas).
//!
//! Two records per identity, both written in one transaction that succeeds only if neither
//! exists yet:
//!
//! * `alloc/<cluster>/labels/<sha256 of canonical labels>` → the ID (decimal);
//! * `alloc/<cluster>/ids/<id>` → the canonical label text.
//!
//! The compare on the labels record makes one label set get one ID (whoever loses the race
//! reads the winner's ID from the same transaction); the compare on the ID record makes one
//! ID go to one label set. The records carry no lease: an ID stays with its labels across
//! restarts until [`Allocator::release`] removes both records (garbage collection, done by the
//! exporter after a grace period).

use std::collections::BTreeSet;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use model::{ClusterId, ClusterName, Labels, NumericIdentity, keys};
use rand::Rng;
use tokio::sync::Mutex;

use crate::{Client, Error, Result};

/// How many lost races one allocation tolerates before giving up.
const MAX_ATTEMPTS: usize = 256;

/// Allocates identities of one cluster.
pub struct Allocator {
    client: Client,
    cluster: ClusterName,
    cluster_id: ClusterId,
    /// Local parts known to be taken (a cache; etcd's compare is the authority).
    used: Mutex<BTreeSet<u16>>,
}

impl std::fmt::Debug for Allocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("cluster", &self.cluster)
            .field("cluster_id", &self.cluster_id)
            .finish()
    }
}

fn labels_digest(labels: &Labels) -> String {
    ring::digest::digest(&ring::digest::SHA256, labels.canonical().as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Allocator {
    /// An allocator for `cluster`, primed with the IDs already taken.
    pub async fn new(client: &Client, cluster: ClusterName, cluster_id: ClusterId) -> Result<Self> {
        let this = Self {
            client: client.clone(),
            cluster,
            cluster_id,
            used: Mutex::new(BTreeSet::new()),
        };
        this.refresh().await?;
        Ok(this)
    }

    /// Re-reads which IDs are taken.
    async fn refresh(&self) -> Result<()> {
        let prefix = keys::alloc_ids_prefix(&self.cluster);
        let (kvs, _) = self.client.list_raw(&prefix).await?;
        let mut used = self.used.lock().await;
        used.clear();
        for kv in kvs {
            if let Some(id) = kv
                .key
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<u32>().ok())
                .and_then(|n| NumericIdentity::new(n).ok())
            {
                used.insert(id.local());
            }
        }
        Ok(())
    }

    fn parse_id(&self, key: &str, value: &[u8]) -> Result<NumericIdentity> {
        let corrupt = |reason: String| Error::AllocatorCorrupt {
            key: key.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(value).map_err(|e| corrupt(e.to_string()))?;
        let raw: u32 = text
            .parse()
            .map_err(|_| corrupt(format!("{text:?} is not a number")))?;
        let id = NumericIdentity::new(raw).map_err(|e| corrupt(e.to_string()))?;
        if id.cluster() != Some(self.cluster_id) {
            return Err(corrupt(format!(
                "identity {id} is not in cluster {}'s range",
                self.cluster_id
            )));
        }
        Ok(id)
    }

    /// The ID of `labels`, if one was allocated.
    pub async fn lookup(&self, labels: &Labels) -> Result<Option<NumericIdentity>> {
        let key = keys::alloc_labels(&self.cluster, &labels_digest(labels));
        match self.client.get_raw(&key).await? {
            Some(kv) => self.parse_id(&key, &kv.value).map(Some),
            None => Ok(None),
        }
    }

    /// The ID of `labels`, allocating one if needed. The same labels always get the same ID,
    /// from any allocator of this cluster.
    pub async fn allocate(&self, labels: &Labels) -> Result<NumericIdentity> {
        let canonical = labels.canonical();
        let labels_key = keys::alloc_labels(&self.cluster, &labels_digest(labels));
        if let Some(kv) = self.client.get_raw(&labels_key).await? {
            return self.parse_id(&labels_key, &kv.value);
        }
        for _ in 0..MAX_ATTEMPTS {
            let local = self.pick().await?;
            let Some(id) = NumericIdentity::scoped(self.cluster_id, local) else {
                continue;
            };
            let id_key = keys::alloc_id(&self.cluster, id);
            let txn = Txn::new()
                .when([
                    Compare::create_revision(labels_key.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(id_key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(labels_key.as_str(), id.get().to_string(), None),
                    TxnOp::put(id_key.as_str(), canonical.clone(), None),
                ])
                .or_else([TxnOp::get(labels_key.as_str(), None)]);
            let resp = self
                .client
                .etcd()
                .txn(txn)
                .await
                .map_err(|source| Error::Request {
                    op: "allocate",
                    key: labels_key.clone(),
                    source,
                })?;
            self.used.lock().await.insert(local);
            if resp.succeeded() {
                return Ok(id);
            }
            // Lost a race: either someone allocated these labels, or took this ID.
            let winner = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            if let Some(value) = winner {
                return self.parse_id(&labels_key, &value);
            }
        }
        Err(Error::AllocationContended {
            cluster: self.cluster.clone(),
            labels: canonical,
            attempts: MAX_ATTEMPTS,
        })
    }

    /// A local part not known to be taken, chosen at random so that concurrent allocators
    /// rarely pick the same one.
    async fn pick(&self) -> Result<u16> {
        for refreshed in [false, true] {
            if refreshed {
                self.refresh().await?;
            }
            let used = self.used.lock().await;
            let free = usize::from(NumericIdentity::MAX_LOCAL) - used.len();
            if free == 0 {
                continue;
            }
            let start: u16 =
                rand::rng().random_range(NumericIdentity::MIN_LOCAL..=NumericIdentity::MAX_LOCAL);
            let found = (start..=NumericIdentity::MAX_LOCAL)
                .chain(NumericIdentity::MIN_LOCAL..start)
                .find(|l| !used.contains(l));
            if let Some(l) = found {
                return Ok(l);
            }
        }
        Err(Error::IdentitiesExhausted {
            cluster: self.cluster.clone(),
            used: self.used.lock().await.len(),
        })
    }

    /// Frees `id` if it still belongs to `labels`: both records go in one transaction, which
    /// does nothing if the records changed in between.
    pub async fn release(&self, id: NumericIdentity, labels: &Labels) -> Result<bool> {
        let labels_key = keys::alloc_labels(&self.cluster, &labels_digest(labels));
        let id_key = keys::alloc_id(&self.cluster, id);
        let txn = Txn::new()
            .when([
                Compare::value(labels_key.as_str(), CompareOp::Equal, id.get().to_string()),
                Compare::value(id_key.as_str(), CompareOp::Equal, labels.canonical()),
            ])
            .and_then([
                TxnOp::delete(labels_key.as_str(), None),
                TxnOp::delete(id_key.as_str(), None),
            ]);
        let resp = self
            .client
            .etcd()
            .txn(txn)
            .await
            .map_err(|source| Error::Request {
                op: "release",
                key: id_key.clone(),
                source,
            })?;
        if resp.succeeded() {
            self.used.lock().await.remove(&id.local());
        }
        Ok(resp.succeeded())
    }
}
