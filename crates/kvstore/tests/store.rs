//! The store against a real etcd with mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use kvstore::watch::{Event, Watcher};
use kvstore::{Client, Session};
use model::keys::{self, Kind, Scope};
use model::{ClusterId, ClusterName, Label, Labels};
use test_support::{Etcd, Proxy, eventually};

const WAIT: Duration = Duration::from_secs(20);

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn key(i: usize) -> String {
    format!(
        "/clustermesh/v1/state/east/endpoints/10.0.{}.{}",
        i / 250,
        i % 250 + 1
    )
}

/// Collects events until `pred` holds for the list collected so far.
/// Waits (at most [`WAIT`]) until the session's liveness satisfies `pred`; `what` names it.
async fn until_liveness(
    rx: &mut tokio::sync::watch::Receiver<kvstore::session::Liveness>,
    pred: impl FnMut(&kvstore::session::Liveness) -> bool,
    what: &str,
) {
    tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
        .unwrap();
}

async fn collect_until(w: &mut Watcher, pred: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !pred(&out) {
            out.push(w.next().await.unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("events so far: {out:#?}"));
    out
}

#[tokio::test]
async fn etcd_refuses_clients_without_a_valid_certificate() {
    let etcd = Etcd::start().await.unwrap();
    // The harness' own client works.
    etcd.client().await.unwrap();

    // Plaintext to a TLS port.
    let mut cfg = kvstore::Config::new(vec![format!("http://127.0.0.1:{}", etcd.port())], None);
    cfg.connect_timeout = Duration::from_secs(2);
    assert!(
        Client::connect(cfg).await.is_err(),
        "plaintext must be refused"
    );

    // TLS without a client certificate.
    let ca = std::fs::read(&etcd.client_files().ca).unwrap();
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)),
        );
    let mut anon = etcd_client::Client::connect([etcd.endpoint()], Some(opts))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), anon.get("/", None)).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "a client without a certificate must be refused"
    );

    // A certificate from another CA.
    let other = certs::Ca::generate(
        &ClusterName::new("mallory").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let leaf = other
        .issue(&certs::LeafSpec::new(certs::MeshIdentity::new(
            east(),
            ClusterId::new(1).unwrap(),
            certs::Role::Apiserver,
        )))
        .unwrap();
    let dir = etcd.scratch("mallory");
    std::fs::create_dir_all(&dir).unwrap();
    let files = certs::TlsFiles::in_dir(&dir);
    std::fs::write(&files.cert, &leaf.cert_pem).unwrap();
    std::fs::write(&files.key, &leaf.key_pem).unwrap();
    std::fs::copy(&etcd.client_files().ca, &files.ca).unwrap();
    let mut cfg = kvstore::Config::new(vec![etcd.endpoint()], Some(files));
    cfg.connect_timeout = Duration::from_secs(2);
    let e = Client::connect(cfg).await.unwrap_err().to_string();
    assert!(e.contains("cannot connect to etcd"), "{e}");
}

#[tokio::test]
async fn typed_objects_round_trip_under_the_key_layout() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let svc = model::GlobalService {
        cluster: east(),
        name: model::ServiceName::new("shop", "cart").unwrap(),
        cluster_ips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![model::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: model::Protocol::Tcp,
        }],
        backends: vec![],
        shared: true,
        affinity: model::Affinity::Local,
        balancing: Default::default(),
    };
    c.put(Scope::State, &svc).await.unwrap();
    let raw = c
        .get_raw("/clustermesh/v1/state/east/services/shop/cart")
        .await
        .unwrap();
    assert!(raw.is_some(), "stored under the documented key");
    let got = c
        .get::<model::GlobalService>(Scope::State, &east(), "shop/cart")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.object, svc);
    let (all, _) = c
        .list::<model::GlobalService>(Scope::State, &east())
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert!(
        c.delete(Scope::State, &east(), Kind::Services, "shop/cart")
            .await
            .unwrap()
    );
    assert!(
        c.get::<model::GlobalService>(Scope::State, &east(), "shop/cart")
            .await
            .unwrap()
            .is_none()
    );

    // A garbled value is reported with its key, not returned as an object.
    c.put_raw(
        "/clustermesh/v1/state/east/services/shop/bad",
        vec![0xff, 0x01],
    )
    .await
    .unwrap();
    let e = c
        .get::<model::GlobalService>(Scope::State, &east(), "shop/bad")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("shop/bad"), "{e}");
}

#[tokio::test]
async fn a_cluster_cannot_be_registered_again_under_another_id() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let cfg = |id| wire::ClusterConfig {
        name: east(),
        id: ClusterId::new(id).unwrap(),
        capabilities: vec![],
    };
    c.register_cluster(&cfg(1)).await.unwrap();
    c.register_cluster(&cfg(1)).await.unwrap();
    let e = c.register_cluster(&cfg(2)).await.unwrap_err().to_string();
    assert!(e.contains("ID 1") && e.contains("ID 2"), "{e}");
    let stored = c
        .get_raw(&keys::cluster_config(&east()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        wire::ClusterConfig::decode(&stored.value).unwrap(),
        cfg(1),
        "record untouched"
    );
}

#[tokio::test]
async fn watch_lists_then_follows_changes() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    c.put_raw(&key(1), b"one".to_vec()).await.unwrap();
    let mut w = Watcher::new(&c, "/clustermesh/v1/state/east/");
    let init = collect_until(&mut w, |e| matches!(e.last(), Some(Event::InitDone { .. }))).await;
    assert_eq!(init.len(), 3);
    assert!(matches!(&init[1], Event::InitApply(kv) if kv.key == key(1)));
    c.put_raw(&key(2), b"two".to_vec()).await.unwrap();
    c.delete_raw(&key(1)).await.unwrap();
    c.put_raw(
        "/clustermesh/v1/state/west/endpoints/10.9.9.9",
        b"other prefix".to_vec(),
    )
    .await
    .unwrap();
    let ev = collect_until(&mut w, |e| e.len() == 2).await;
    assert!(matches!(&ev[0], Event::Apply(kv) if kv.key == key(2) && kv.value == b"two"));
    assert!(matches!(&ev[1], Event::Delete { key: k, .. } if *k == key(1)));
}

/// Applies watch events to a map, as a consumer would.
fn apply(state: &mut BTreeMap<String, Vec<u8>>, events: &[Event]) -> (usize, usize) {
    let (mut applies, mut deletes) = (0, 0);
    for e in events {
        match e {
            Event::InitApply(kv) | Event::Apply(kv) => {
                applies += 1;
                state.insert(kv.key.clone(), kv.value.clone());
            }
            Event::Delete { key, .. } => {
                deletes += 1;
                assert!(
                    state.remove(key).is_some(),
                    "delete of a key never reported: {key}"
                );
            }
            Event::Init | Event::InitDone { .. } => {}
        }
    }
    (applies, deletes)
}

async fn snapshot(c: &Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    c.list_raw(prefix)
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

#[tokio::test]
async fn watch_resumes_after_a_dropped_connection_without_gaps_or_repeats() {
    let etcd = Etcd::start().await.unwrap();
    let direct = etcd.client().await.unwrap();
    let proxy = Proxy::start(([127, 0, 0, 1], etcd.port()).into())
        .await
        .unwrap();
    let via = Client::connect(etcd.config_via(proxy.addr()))
        .await
        .unwrap();
    let prefix = "/clustermesh/v1/state/east/";
    for i in 0..10 {
        direct.put_raw(&key(i), vec![i as u8]).await.unwrap();
    }
    let mut w = Watcher::new(&via, prefix);
    let mut state = BTreeMap::new();
    let init = collect_until(&mut w, |e| matches!(e.last(), Some(Event::InitDone { .. }))).await;
    apply(&mut state, &init);
    // One live event, so that the watch stream is open when the connection breaks.
    direct.put_raw(&key(0), b"live".to_vec()).await.unwrap();
    let live = collect_until(&mut w, |e| !e.is_empty()).await;
    apply(&mut state, &live);

    // Cut the connection and keep it down while the data changes.
    proxy.set_blocked(true);
    proxy.cut();
    for i in 0..5 {
        direct.put_raw(&key(i), vec![100 + i as u8]).await.unwrap(); // 5 updates
    }
    for i in 5..8 {
        direct.delete_raw(&key(i)).await.unwrap(); // 3 deletes
    }
    for i in 10..14 {
        direct.put_raw(&key(i), vec![i as u8]).await.unwrap(); // 4 creates
    }
    let target = direct.current_revision().await.unwrap();
    proxy.set_blocked(false);

    let mut events = Vec::new();
    while w.revision() < target {
        events.push(
            tokio::time::timeout(WAIT, w.next())
                .await
                .expect("watch resumed")
                .unwrap(),
        );
    }
    let (applies, deletes) = apply(&mut state, &events);
    assert_eq!(
        (applies, deletes),
        (9, 3),
        "exactly the missed changes, once each: {events:#?}"
    );
    assert_eq!(state, snapshot(&direct, prefix).await);
    assert!(w.stats().reconnects >= 1, "{:?}", w.stats());
    assert_eq!(w.stats().relists, 0);
}

#[tokio::test]
async fn watch_survives_compaction_with_only_real_differences() {
    let etcd = Etcd::start().await.unwrap();
    let direct = etcd.client().await.unwrap();
    let proxy = Proxy::start(([127, 0, 0, 1], etcd.port()).into())
        .await
        .unwrap();
    let via = Client::connect(etcd.config_via(proxy.addr()))
        .await
        .unwrap();
    let prefix = "/clustermesh/v1/state/east/";
    for i in 0..6 {
        direct.put_raw(&key(i), vec![i as u8]).await.unwrap();
    }
    let mut w = Watcher::new(&via, prefix);
    let mut state = BTreeMap::new();
    let init = collect_until(&mut w, |e| matches!(e.last(), Some(Event::InitDone { .. }))).await;
    apply(&mut state, &init);

    proxy.set_blocked(true);
    proxy.cut();
    direct.put_raw(&key(0), b"changed".to_vec()).await.unwrap(); // changed
    direct.delete_raw(&key(1)).await.unwrap(); // deleted
    direct.put_raw(&key(2), b"x".to_vec()).await.unwrap(); // changed twice
    direct.put_raw(&key(2), b"y".to_vec()).await.unwrap();
    direct.delete_raw(&key(3)).await.unwrap(); // deleted and re-created with the same value
    direct.put_raw(&key(3), vec![3]).await.unwrap();
    direct.put_raw(&key(20), b"new".to_vec()).await.unwrap(); // created
    direct
        .put_raw(&key(21), b"ephemeral".to_vec())
        .await
        .unwrap(); // created and deleted
    direct.delete_raw(&key(21)).await.unwrap();
    // keys 4 and 5 do not change.
    let rev = direct.current_revision().await.unwrap();
    direct.compact(rev).await.unwrap();
    proxy.set_blocked(false);

    let mut events = Vec::new();
    while w.revision() < rev {
        events.push(
            tokio::time::timeout(WAIT, w.next())
                .await
                .expect("watch recovered")
                .unwrap(),
        );
    }
    assert_eq!(w.stats().relists, 1, "{events:#?}");
    let mut applied: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Apply(kv) => Some(kv.key.clone()),
            _ => None,
        })
        .collect();
    applied.sort();
    let deleted: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delete { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    let mut want_applied = vec![key(0), key(2), key(3), key(20)];
    want_applied.sort();
    assert_eq!(applied, want_applied, "only changed keys are applied");
    assert_eq!(deleted, vec![key(1)], "only gone keys are deleted");
    apply(&mut state, &events);
    assert_eq!(state, snapshot(&direct, prefix).await);

    // And it keeps following live changes after the relist.
    direct.put_raw(&key(4), b"live".to_vec()).await.unwrap();
    let ev = collect_until(&mut w, |e| !e.is_empty()).await;
    assert!(matches!(&ev[0], Event::Apply(kv) if kv.key == key(4)));
}

#[tokio::test]
async fn watch_resumes_after_etcd_restarts() {
    let mut etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let prefix = "/clustermesh/v1/state/east/";
    c.put_raw(&key(0), b"a".to_vec()).await.unwrap();
    let mut w = Watcher::new(&c, prefix);
    let mut state = BTreeMap::new();
    let init = collect_until(&mut w, |e| matches!(e.last(), Some(Event::InitDone { .. }))).await;
    apply(&mut state, &init);
    etcd.stop();
    etcd.restart().await.unwrap();
    let c2 = etcd.client().await.unwrap();
    c2.put_raw(&key(1), b"b".to_vec()).await.unwrap();
    let ev = collect_until(&mut w, |e| !e.is_empty()).await;
    apply(&mut state, &ev);
    assert_eq!(state, snapshot(&c2, prefix).await);
}

#[tokio::test]
async fn exported_keys_hang_on_no_lease_and_a_lost_lease_is_recreated() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let record = keys::session(&east());
    let (session, adopted) = Session::resume(
        &c,
        Duration::from_secs(2),
        &record,
        &keys::cluster_prefix(Scope::State, &east()),
    )
    .await
    .unwrap();
    assert!(!adopted);
    let items: Vec<(String, Vec<u8>)> = (0..3).map(|i| (key(i), vec![i as u8])).collect();
    session.put_many(items.clone()).await.unwrap();
    let lease = session.lease().await;
    let (kvs, _) = c.list_raw("/clustermesh/v1/state/east/").await.unwrap();
    assert_eq!(kvs.len(), 3);
    assert!(kvs.iter().all(|kv| kv.lease == 0), "exports carry no lease");
    assert_eq!(c.get_raw(&record).await.unwrap().unwrap().lease, lease);

    // Someone revokes the lease: the exports stay, and the record comes back under a new lease.
    c_revoke(&c, lease).await;
    eventually("the session record under a new lease", WAIT, || async {
        let kv = c.get_raw(&record).await.ok()??;
        (kv.lease != lease && kv.lease != 0).then_some(())
    })
    .await;
    assert_eq!(
        c.list_raw("/clustermesh/v1/state/east/")
            .await
            .unwrap()
            .0
            .len(),
        3
    );
    assert_eq!(session.recreated().await, 1);

    // Closing the session is the owner withdrawing everything: keys and record go at once.
    session.close().await.unwrap();
    assert!(
        c.list_raw("/clustermesh/v1/state/east/")
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert!(c.get_raw(&record).await.unwrap().is_none());
}

/// A hung etcd (its process stopped: connections accepted, nothing answered) is reported as
/// unreachable by the session's liveness — not left `Alive` while every request waits
/// forever — and `Alive` again once it answers. Found by `clustermesh check` on the lab: an
/// apiserver stayed "elected and ready" for minutes against a hung etcd.
#[tokio::test]
async fn a_hung_etcd_is_reported_unreachable_and_alive_again_when_it_answers() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let session = Session::start(&c, Duration::from_secs(3)).await.unwrap();
    let mut liveness = session.liveness();
    struct Thaw<'a>(&'a Etcd);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.thaw();
        }
    }
    etcd.freeze();
    let thaw = Thaw(&etcd);
    until_liveness(
        &mut liveness,
        |l| !matches!(l, kvstore::session::Liveness::Alive),
        "liveness reports the hung etcd",
    )
    .await;
    drop(thaw);
    until_liveness(
        &mut liveness,
        |l| *l == kvstore::session::Liveness::Alive,
        "liveness reports the recovery",
    )
    .await;
}

/// Issue 13, case 1: an exporter cut from etcd for longer than its lease TTL. Nothing it
/// exported is deleted; when etcd is reachable again the lease is re-created by the keep-alive
/// loop itself (no write by the exporter needed) and liveness reports the outage and its end.
#[tokio::test]
async fn a_cut_longer_than_the_ttl_deletes_nothing_and_recovers_by_itself() {
    let etcd = Etcd::start().await.unwrap();
    let observer = etcd.client().await.unwrap();
    let proxy = Proxy::start(([127, 0, 0, 1], etcd.port()).into())
        .await
        .unwrap();
    let mut cfg = etcd.config_via(proxy.addr());
    cfg.connect_timeout = Duration::from_secs(1);
    let c = Client::connect(cfg).await.unwrap();
    let record = keys::session(&east());
    let (session, _) = Session::resume(
        &c,
        Duration::from_secs(2),
        &record,
        &keys::cluster_prefix(Scope::State, &east()),
    )
    .await
    .unwrap();
    let items: Vec<(String, Vec<u8>)> = (0..50).map(|i| (key(i), vec![i as u8])).collect();
    session.put_many(items).await.unwrap();
    let lease = session.lease().await;
    let mut liveness = session.liveness();
    let mut w = Watcher::new(&observer, keys::cluster_prefix(Scope::State, &east()));
    collect_until(&mut w, |e| matches!(e.last(), Some(Event::InitDone { .. }))).await;

    proxy.set_blocked(true);
    proxy.cut();
    // The lease expires while the exporter cannot reach etcd.
    eventually("the session record expired", WAIT, || async {
        observer
            .get_raw(&record)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // Unreachable first, then — past the TTL — the lease lost.
    until_liveness(
        &mut liveness,
        |l| matches!(l, kvstore::session::Liveness::LeaseLost { .. }),
        "liveness reports the lost lease",
    )
    .await;
    assert_eq!(
        observer
            .list_raw("/clustermesh/v1/state/east/")
            .await
            .unwrap()
            .0
            .len(),
        50,
        "nothing exported was deleted"
    );

    proxy.set_blocked(false);
    eventually("the record back under a new lease", WAIT, || async {
        let kv = observer.get_raw(&record).await.ok()??;
        (kv.lease != lease && kv.lease != 0).then_some(())
    })
    .await;
    until_liveness(
        &mut liveness,
        |l| *l == kvstore::session::Liveness::Alive,
        "liveness reports the recovery",
    )
    .await;
    // Not one delete event on the exported prefix during the whole outage.
    let probe = key(999);
    observer.put_raw(&probe, vec![1]).await.unwrap();
    let events = collect_until(
        &mut w,
        |e| matches!(e.last(), Some(Event::Apply(kv)) if kv.key == probe),
    )
    .await;
    assert!(
        events.iter().all(|e| !matches!(e, Event::Delete { .. })),
        "no deletion during the outage: {events:?}"
    );
}

async fn c_revoke(c: &Client, lease: i64) {
    // Revoke through a second session-less path: a plain lease revoke on the same etcd.
    let other = Client::connect(c.config().clone()).await.unwrap();
    other.revoke_lease(lease).await.unwrap();
}

#[tokio::test]
async fn synced_marker_lands_after_every_key_of_the_initial_state() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let mut w = Watcher::new(&c, keys::cluster_prefix(Scope::State, &east()));
    collect_until(&mut w, |e| matches!(e.last(), Some(Event::InitDone { .. }))).await;
    let session = Session::start(&c, Duration::from_secs(10)).await.unwrap();
    let n = 1000; // several transactions of at most 128 operations
    let items: Vec<(String, Vec<u8>)> = (0..n).map(|i| (key(i), vec![1])).collect();
    let rev = session
        .sync_initial(Scope::State, &east(), Kind::Endpoints, items)
        .await
        .unwrap();
    let marker_key = keys::synced(Scope::State, &east(), Kind::Endpoints);
    let events = collect_until(
        &mut w,
        |e| matches!(e.last(), Some(Event::Apply(kv)) if kv.key == marker_key),
    )
    .await;
    let objects: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Apply(kv) if kv.key != marker_key))
        .collect();
    assert_eq!(objects.len(), n, "every key landed before the marker");
    let marker = c
        .synced(Scope::State, &east(), Kind::Endpoints)
        .await
        .unwrap()
        .unwrap();
    assert!(
        marker.revision < rev,
        "the marker is written after the state it vouches for"
    );
    let last_object = objects
        .iter()
        .filter_map(|e| match e {
            Event::Apply(kv) => Some(kv.mod_revision),
            _ => None,
        })
        .max();
    assert_eq!(
        last_object,
        Some(marker.revision),
        "the marker names the revision of the last key"
    );

    // Writing the same state again is a no-op: no revision bump, no event.
    let before = c.current_revision().await.unwrap();
    let items: Vec<(String, Vec<u8>)> = (0..n).map(|i| (key(i), vec![1])).collect();
    assert_eq!(session.put_many(items).await.unwrap(), 0);
    assert_eq!(c.current_revision().await.unwrap(), before);
}

fn labels(i: usize) -> Labels {
    [
        Label::new("k8s", "app", format!("app-{i}")).unwrap(),
        Label::new("k8s-ns", "team", format!("team-{}", i % 7)).unwrap(),
        Label::new("mesh", "cluster", "east").unwrap(),
    ]
    .into_iter()
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocators_never_share_an_id_and_ids_are_stable() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let cid = ClusterId::new(7).unwrap();
    let n = 1000;
    let mut tasks = Vec::new();
    for a in 0..2 {
        let alloc = kvstore::alloc::Allocator::new(&c, east(), cid)
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            // Both allocators ask for all label sets, in different orders, 8 at a time.
            let order: Vec<usize> = if a == 0 {
                (0..n).collect()
            } else {
                (0..n).rev().collect()
            };
            let alloc = std::sync::Arc::new(alloc);
            let mut out = HashMap::new();
            for chunk in order.chunks(8) {
                let futs = chunk.iter().map(|&i| {
                    let alloc = alloc.clone();
                    async move { (i, alloc.allocate(&labels(i)).await.unwrap()) }
                });
                out.extend(futures::future::join_all(futs).await);
            }
            out
        }));
    }
    let a = tasks.remove(0).await.unwrap();
    let b = tasks.remove(0).await.unwrap();
    assert_eq!(a, b, "one label set, one ID, whichever allocator asked");
    let ids: HashSet<_> = a.values().collect();
    assert_eq!(ids.len(), n, "no ID given to two label sets");
    assert!(a.values().all(|id| id.cluster() == Some(cid)));
    let (records, _) = c.list_raw(&keys::alloc_ids_prefix(&east())).await.unwrap();
    assert_eq!(records.len(), n, "exactly one ID record per label set");

    // A new allocator (a restarted apiserver) returns the same IDs.
    let again = kvstore::alloc::Allocator::new(&c, east(), cid)
        .await
        .unwrap();
    for i in (0..n).step_by(97) {
        assert_eq!(again.allocate(&labels(i)).await.unwrap(), a[&i]);
        assert_eq!(again.lookup(&labels(i)).await.unwrap(), Some(a[&i]));
    }

    // Release frees both records; a stale release (wrong labels) does nothing.
    assert!(!again.release(a[&0], &labels(1)).await.unwrap());
    assert!(again.release(a[&0], &labels(0)).await.unwrap());
    assert_eq!(again.lookup(&labels(0)).await.unwrap(), None);
}

/// A prefix far larger than one gRPC message (4 MiB) lists completely, in pages, at one
/// revision; the watcher's initial listing does too.
#[tokio::test]
async fn large_prefixes_list_in_pages_at_one_revision() {
    let etcd = Etcd::start().await.unwrap();
    let c = etcd.client().await.unwrap();
    let prefix = "/clustermesh/v1/state/big/endpoints/";
    // 5,000 keys × 1 KiB = 5 MiB.
    let items: Vec<(String, Vec<u8>)> = (0..5000)
        .map(|i| (format!("{prefix}{i:05}"), vec![b'x'; 1024]))
        .collect();
    c.put_many(&items, 0).await.unwrap();
    // A key just after the prefix range must not be included.
    c.put_raw("/clustermesh/v1/state/big/endpoints0", vec![1])
        .await
        .unwrap();
    let (kvs, rev) = c.list_raw(prefix).await.unwrap();
    assert_eq!(kvs.len(), 5000);
    assert!(
        kvs.windows(2).all(|w| w[0].key < w[1].key),
        "sorted, no duplicates"
    );
    assert!(kvs.iter().all(|kv| kv.mod_revision <= rev));
    let mut w = Watcher::new(&c, prefix);
    let mut n = 0;
    loop {
        match w.next().await.unwrap() {
            Event::InitApply(_) => n += 1,
            Event::InitDone { .. } => break,
            _ => {}
        }
    }
    assert_eq!(n, 5000);
}
