//! The etcd-backed store: the only code that talks to etcd.
//!
//! * [`Client`]: connect over mTLS, typed get/list/put/delete of model objects under the key
//!   layout of [`model::keys`], batched writes, the cluster config record;
//! * [`watch`]: a prefix watch that resumes from its revision after a dropped connection and
//!   relists (emitting only real differences) after a compaction;
//! * [`session`]: leased writes for exported state, kept alive and re-created if the lease
//!   expires, and synced markers written only after the initial state has landed;
//! * [`alloc`]: identity allocation that is safe across concurrent allocators.
//!
//! Must not build keys itself (that is `model::keys`) nor encode values itself (that is
//! `wire`). Only the apiserver links this crate for writing (invariant 2).

pub mod alloc;
pub mod session;
pub mod watch;

use std::time::Duration;

use etcd_client::{
    Certificate, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp,
};
use model::ClusterName;
use model::keys::{self, Kind, Scope};
use wire::Codec;

pub use session::Session;
pub use watch::Watcher;

/// Keys per page of a listing.
pub const LIST_PAGE: i64 = 2000;

/// The end of the key range of everything under `prefix` (etcd's `--prefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The largest number of operations etcd accepts in one transaction (its `--max-txn-ops`
/// default).
pub const MAX_TXN_OPS: usize = 128;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TLS files could not be read.
    #[error("etcd tls material")]
    Tls {
        /// The underlying error.
        source: certs::Error,
    },
    /// etcd could not be reached, or refused us (TLS or otherwise).
    #[error("cannot connect to etcd at {endpoints}")]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// The client error.
        source: etcd_client::Error,
    },
    /// A request failed.
    #[error("etcd {op} {key:?}")]
    Request {
        /// The operation.
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// The client error.
        source: etcd_client::Error,
    },
    /// A request was not answered in time (etcd hung, or the path to it stalled).
    #[error("etcd {op}: not answered within {after:?}")]
    NotAnswered {
        /// The operation.
        op: &'static str,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// A value did not decode into its model type.
    #[error("value of {key:?} is invalid")]
    Decode {
        /// Its key.
        key: String,
        /// The decoder's error.
        source: wire::Error,
    },
    /// A key did not follow the layout.
    #[error(transparent)]
    Key(#[from] keys::Error),
    /// This etcd already holds a different cluster under this name.
    #[error(
        "etcd already holds cluster {name} with ID {existing}; refusing to register it as ID {requested}"
    )]
    ClusterIdMismatch {
        /// The cluster.
        name: ClusterName,
        /// The ID stored.
        existing: model::ClusterId,
        /// The ID we were configured with.
        requested: model::ClusterId,
    },
    /// No identity is free in the cluster's range.
    #[error("identity space of cluster {cluster} is exhausted ({used} of 65535 identities in use)")]
    IdentitiesExhausted {
        /// The cluster.
        cluster: ClusterName,
        /// How many are in use.
        used: usize,
    },
    /// Allocation kept losing races.
    #[error(
        "could not allocate an identity in cluster {cluster} for {labels:?} after {attempts} attempts"
    )]
    AllocationContended {
        /// The cluster.
        cluster: ClusterName,
        /// The label set.
        labels: String,
        /// How many attempts were made.
        attempts: usize,
    },
    /// The allocator's records are inconsistent (a labels record pointing nowhere valid).
    #[error("identity allocator record {key:?} is corrupt: {reason}")]
    AllocatorCorrupt {
        /// The record.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An etcd revision.
pub type Revision = i64;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port` endpoints.
    pub endpoints: Vec<String>,
    /// Client certificate, key and the CA that signed etcd's server certificate. `None` only
    /// for plaintext test set-ups.
    pub tls: Option<certs::TlsFiles>,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
}

impl Config {
    /// A config with the default timeout.
    pub fn new(endpoints: Vec<String>, tls: Option<certs::TlsFiles>) -> Self {
        Self {
            endpoints,
            tls,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A key, its value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision of the last change.
    pub mod_revision: Revision,
    /// Revision of the creation.
    pub create_revision: Revision,
    /// The lease it is attached to, 0 for none.
    pub lease: i64,
}

impl Kv {
    fn from_etcd(kv: &etcd_client::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
        }
    }
}

/// A decoded object with the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The object.
    pub object: T,
    /// Revision of its last change.
    pub mod_revision: Revision,
}

/// A connection to etcd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: etcd_client::Client,
    config: Config,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.config.endpoints)
            .finish()
    }
}

impl Client {
    /// Connects and makes one request, so that TLS and authentication problems show here and
    /// not at the first real use.
    pub async fn connect(config: Config) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(files) = &config.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|source| Error::Tls {
                    source: certs::Error::Io {
                        path: p.to_owned(),
                        source,
                    },
                })
            };
            let tls = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(&files.ca)?))
                .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
            opts = opts.with_tls(tls);
        }
        let endpoints = config.endpoints.join(",");
        let connect_err = |source| Error::Connect {
            endpoints: endpoints.clone(),
            source,
        };
        let mut inner = etcd_client::Client::connect(&config.endpoints, Some(opts))
            .await
            .map_err(connect_err)?;
        match tokio::time::timeout(config.connect_timeout, inner.status()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(connect_err(e)),
            Err(_) => {
                return Err(connect_err(etcd_client::Error::WatchError(format!(
                    "no answer within {:?}",
                    config.connect_timeout
                ))));
            }
        }
        Ok(Self { inner, config })
    }

    /// The underlying etcd client, for the modules of this crate.
    pub(crate) fn etcd(&self) -> etcd_client::Client {
        self.inner.clone()
    }

    /// The config this client was made from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Reads one key.
    pub async fn get_raw(&self, key: &str) -> Result<Option<Kv>> {
        let resp = self
            .etcd()
            .get(key, None)
            .await
            .map_err(|source| Error::Request {
                op: "get",
                key: key.to_owned(),
                source,
            })?;
        Ok(resp.kvs().first().map(Kv::from_etcd))
    }

    /// Lists every key under `prefix`, with the revision the listing is consistent at. Reads
    /// in pages of [`LIST_PAGE`] keys, all at the revision of the first page, so that a large
    /// prefix neither exceeds the gRPC message limit nor mixes revisions.
    pub async fn list_raw(&self, prefix: &str) -> Result<(Vec<Kv>, Revision)> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut out = Vec::new();
        let mut rev = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let resp = self
                .etcd()
                .get(from.clone(), Some(opts))
                .await
                .map_err(|source| Error::Request {
                    op: "list",
                    key: prefix.to_owned(),
                    source,
                })?;
            if rev == 0 {
                rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            out.extend(resp.kvs().iter().map(Kv::from_etcd));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((out, rev))
    }

    /// The store's current revision.
    pub async fn current_revision(&self) -> Result<Revision> {
        let resp = self
            .etcd()
            .get(keys::ROOT, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|source| Error::Request {
                op: "revision",
                key: keys::ROOT.to_owned(),
                source,
            })?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// Writes one key (no lease). Returns the revision of the write.
    pub async fn put_raw(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        self.put_with_lease(key, value, 0).await
    }

    pub(crate) async fn put_with_lease(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Revision> {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let resp = self
            .etcd()
            .put(key, value, opts)
            .await
            .map_err(|source| Error::Request {
                op: "put",
                key: key.to_owned(),
                source,
            })?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// Deletes one key. Returns whether it existed.
    pub async fn delete_raw(&self, key: &str) -> Result<bool> {
        let resp = self
            .etcd()
            .delete(key, None)
            .await
            .map_err(|source| Error::Request {
                op: "delete",
                key: key.to_owned(),
                source,
            })?;
        Ok(resp.deleted() > 0)
    }

    /// Deletes every key under `prefix`. Returns how many there were.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        let resp = self
            .etcd()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(|source| Error::Request {
                op: "delete-prefix",
                key: prefix.to_owned(),
                source,
            })?;
        Ok(resp.deleted())
    }

    /// Writes many keys in transactions of at most [`MAX_TXN_OPS`] operations, attached to
    /// `lease` (0 for none). Returns the revision of the last transaction.
    pub async fn put_many(&self, items: &[(String, Vec<u8>)], lease: i64) -> Result<Revision> {
        if let [(key, value)] = items {
            // One key needs no transaction; a plain put is cheaper for etcd.
            return self.put_with_lease(key, value.clone(), lease).await;
        }
        let mut rev = 0;
        for chunk in items.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    TxnOp::put(k.as_str(), v.clone(), opts)
                })
                .collect();
            let resp = self
                .etcd()
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|source| Error::Request {
                    op: "put-many",
                    key: chunk.first().map(|(k, _)| k.clone()).unwrap_or_default(),
                    source,
                })?;
            rev = resp.header().map(|h| h.revision()).unwrap_or(rev);
        }
        Ok(rev)
    }

    /// Deletes many keys in transactions of at most [`MAX_TXN_OPS`] operations.
    pub async fn delete_many(&self, keys: &[String]) -> Result<Revision> {
        let mut rev = 0;
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(k.as_str(), None))
                .collect();
            let resp = self
                .etcd()
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|source| Error::Request {
                    op: "delete-many",
                    key: chunk.first().cloned().unwrap_or_default(),
                    source,
                })?;
            rev = resp.header().map(|h| h.revision()).unwrap_or(rev);
        }
        Ok(rev)
    }

    /// Revokes a lease: every key attached to it is deleted.
    pub async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.etcd()
            .lease_revoke(lease)
            .await
            .map_err(|source| Error::Request {
                op: "lease-revoke",
                key: format!("{lease:x}"),
                source,
            })?;
        Ok(())
    }

    /// Compacts the store's history up to `revision`.
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        self.etcd()
            .compact(revision, None)
            .await
            .map_err(|source| Error::Request {
                op: "compact",
                key: String::new(),
                source,
            })?;
        Ok(())
    }

    /// Reads one object of `cluster` in `scope`.
    pub async fn get<T: Codec>(
        &self,
        scope: Scope,
        cluster: &ClusterName,
        name: &str,
    ) -> Result<Option<Versioned<T>>> {
        let key = keys::object_key(scope, cluster, T::KIND, name);
        self.get_raw(&key).await?.map(decode).transpose()
    }

    /// Lists every object of one kind of `cluster` in `scope`.
    pub async fn list<T: Codec>(
        &self,
        scope: Scope,
        cluster: &ClusterName,
    ) -> Result<(Vec<Versioned<T>>, Revision)> {
        let (kvs, rev) = self
            .list_raw(&keys::kind_prefix(scope, cluster, T::KIND))
            .await?;
        Ok((kvs.into_iter().map(decode).collect::<Result<_>>()?, rev))
    }

    /// Writes one object (no lease).
    pub async fn put<T: Codec>(&self, scope: Scope, object: &T) -> Result<Revision> {
        self.put_raw(&keys::object(scope, object), object.encode())
            .await
    }

    /// Deletes one object by name. Returns whether it existed.
    pub async fn delete(
        &self,
        scope: Scope,
        cluster: &ClusterName,
        kind: Kind,
        name: &str,
    ) -> Result<bool> {
        self.delete_raw(&keys::object_key(scope, cluster, kind, name))
            .await
    }

    /// Records this cluster's name and ID in etcd, or checks that the record already there
    /// agrees. Refuses to change the ID of an existing cluster: every identity it allocated
    /// encodes the old ID.
    pub async fn register_cluster(&self, config: &wire::ClusterConfig) -> Result<()> {
        let key = keys::cluster_config(&config.name);
        let resp = self
            .etcd()
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), config.encode(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await
            .map_err(|source| Error::Request {
                op: "register-cluster",
                key: key.clone(),
                source,
            })?;
        if resp.succeeded() {
            return Ok(());
        }
        let existing = first_get(&resp).ok_or_else(|| Error::AllocatorCorrupt {
            key: key.clone(),
            reason: "record vanished while being read".into(),
        })?;
        let existing =
            wire::ClusterConfig::decode(&existing.value).map_err(|source| Error::Decode {
                key: key.clone(),
                source,
            })?;
        if existing.id != config.id {
            return Err(Error::ClusterIdMismatch {
                name: config.name.clone(),
                existing: existing.id,
                requested: config.id,
            });
        }
        if existing != *config {
            self.put_raw(&key, config.encode()).await?;
        }
        Ok(())
    }

    /// Reads a synced marker.
    pub async fn synced(
        &self,
        scope: Scope,
        cluster: &ClusterName,
        kind: Kind,
    ) -> Result<Option<wire::pb::SyncedMarker>> {
        let key = keys::synced(scope, cluster, kind);
        let Some(kv) = self.get_raw(&key).await? else {
            return Ok(None);
        };
        <wire::pb::SyncedMarker as prost::Message>::decode(kv.value.as_slice())
            .map(Some)
            .map_err(|source| Error::Decode {
                key,
                source: wire::Error::Decode {
                    message: "SyncedMarker",
                    source,
                },
            })
    }
}

fn first_get(resp: &etcd_client::TxnResponse) -> Option<Kv> {
    resp.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(Kv::from_etcd),
        _ => None,
    })
}

fn decode<T: Codec>(kv: Kv) -> Result<Versioned<T>> {
    let object = T::decode(&kv.value).map_err(|source| Error::Decode {
        key: kv.key.clone(),
        source,
    })?;
    Ok(Versioned {
        object,
        mod_revision: kv.mod_revision,
    })
}
