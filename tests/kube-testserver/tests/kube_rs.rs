//! kube-rs `Api`, `watcher()` and a reflector against the test server, unmodified.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use test_support::eventually;

const T: Duration = Duration::from_secs(20);

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "demo", "n": name}},
        "data": {"v": value}
    }))
    .unwrap()
}

fn kube_err(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn api_verbs_and_errors() {
    let h = common::start().await;
    for ctx in [h.context().to_owned(), format!("{}-cert", h.context())] {
        let client = common::client(&h, &ctx).await;
        let ns = format!("ns-{}", ctx.len());
        let nss: Api<Namespace> = Api::all(client.clone());
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

        let a = api
            .create(&PostParams::default(), &cm("a", "1"))
            .await
            .unwrap();
        assert!(a.metadata.uid.is_some());
        assert!(a.metadata.creation_timestamp.is_some());
        let rv_a: u64 = a.resource_version().unwrap().parse().unwrap();
        assert!(rv_a > 0);
        // 409 AlreadyExists on a name conflict.
        let e = api
            .create(&PostParams::default(), &cm("a", "2"))
            .await
            .unwrap_err();
        assert_eq!(kube_err(e), (409, "AlreadyExists".into()));
        // generateName.
        let mut g = cm("", "g");
        g.metadata.name = None;
        g.metadata.generate_name = Some("gen-".into());
        let g = api.create(&PostParams::default(), &g).await.unwrap();
        assert!(g.name_any().starts_with("gen-") && g.name_any().len() > 4);

        // Update with the current RV succeeds and bumps it; a stale RV is a 409 Conflict.
        let mut a2 = a.clone();
        a2.data = Some([("v".to_owned(), "2".to_owned())].into());
        let a2 = api.replace("a", &PostParams::default(), &a2).await.unwrap();
        assert!(a2.resource_version().unwrap().parse::<u64>().unwrap() > rv_a);
        let e = api
            .replace("a", &PostParams::default(), &a)
            .await
            .unwrap_err();
        assert_eq!(kube_err(e), (409, "Conflict".into()));

        // Patches: merge, JSON and strategic merge.
        api.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"m": "x"}})),
        )
        .await
        .unwrap();
        let p: Patch<()> = Patch::Json(
            serde_json::from_value(json!([{"op": "add", "path": "/data/j", "value": "y"}]))
                .unwrap(),
        );
        api.patch("a", &PatchParams::default(), &p).await.unwrap();
        api.patch(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"s": "z"}}})),
        )
        .await
        .unwrap();
        let got = api.get("a").await.unwrap();
        let data = got.data.clone().unwrap();
        assert_eq!(
            (data["v"].as_str(), data["m"].as_str(), data["j"].as_str()),
            ("2", "x", "y")
        );
        assert_eq!(got.annotations()["s"], "z");
        // A JSON patch that fails a test op is rejected and changes nothing.
        let p: Patch<()> = Patch::Json(serde_json::from_value(json!([{"op": "test", "path": "/data/v", "value": "nope"}, {"op": "remove", "path": "/data"}])).unwrap());
        let e = api
            .patch("a", &PatchParams::default(), &p)
            .await
            .unwrap_err();
        assert_eq!(kube_err(e).0, 422);
        assert_eq!(api.get("a").await.unwrap().data, got.data);

        // Label selectors, field selectors, limit/continue.
        for i in 0..7 {
            api.create(&PostParams::default(), &cm(&format!("p{i}"), "p"))
                .await
                .unwrap();
        }
        let sel = api
            .list(&ListParams::default().labels("n in (p1,p3),app=demo"))
            .await
            .unwrap();
        let names: Vec<_> = sel.items.iter().map(ResourceExt::name_any).collect();
        assert_eq!(names, ["p1", "p3"]);
        let sel = api
            .list(&ListParams::default().fields("metadata.name=p4"))
            .await
            .unwrap();
        assert_eq!(sel.items.len(), 1);
        let sel = api
            .list(&ListParams::default().labels("n!=p1,app"))
            .await
            .unwrap();
        assert_eq!(sel.items.len(), 8, "a, gen-*, p0, p2..p6");
        let mut seen = Vec::new();
        // The test's objects (the namespace also holds the root-CA publisher's ConfigMap).
        let mut lp = ListParams::default().labels("app=demo").limit(3);
        let mut pages = 0;
        loop {
            let page = api.list(&lp).await.unwrap();
            pages += 1;
            seen.extend(page.items.iter().map(ResourceExt::name_any));
            // Changes between pages do not show up in later pages (consistent snapshot).
            if pages == 1 {
                api.create(&PostParams::default(), &cm("zz-late", "l"))
                    .await
                    .unwrap();
            }
            match page.metadata.continue_ {
                Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
                _ => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 9);
        assert!(!seen.contains(&"zz-late".to_owned()));
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 9);

        // Delete, then NotFound.
        api.delete("a", &DeleteParams::default()).await.unwrap();
        let e = api.get("a").await.unwrap_err();
        assert_eq!(kube_err(e), (404, "NotFound".into()));
        let e = api.delete("a", &DeleteParams::default()).await.unwrap_err();
        assert_eq!(kube_err(e).0, 404);

        // A namespaced object in a namespace that does not exist.
        let missing: Api<ConfigMap> = Api::namespaced(client.clone(), "does-not-exist");
        let e = missing
            .create(&PostParams::default(), &cm("x", "1"))
            .await
            .unwrap_err();
        assert_eq!(kube_err(e).0, 404);
        // An invalid name.
        let e = api
            .create(&PostParams::default(), &cm("Not_Valid", "1"))
            .await
            .unwrap_err();
        assert_eq!(kube_err(e), (422, "Invalid".into()));
    }

    // Services get a cluster IP.
    let client = common::client(&h, h.context()).await;
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap();
    let svc = svcs.create(&PostParams::default(), &svc).await.unwrap();
    let ip = svc.spec.unwrap().cluster_ip.unwrap();
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{ip}");

    // No credentials, a wrong token: 401.
    let mut cfg = kube::Config::new(h.url().parse().unwrap());
    cfg.root_cert = Some(vec![pem_der(h.ca_pem())]);
    cfg.auth_info.token = Some("wrong".to_owned().into());
    let bad = kube::Client::try_from(cfg).unwrap();
    let e = Api::<ConfigMap>::default_namespaced(bad)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(kube_err(e).0, 401);
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// A reflector sees every create, update and delete.
#[tokio::test]
async fn reflector_sees_every_change() {
    let h = common::start().await;
    let client = common::client(&h, h.context()).await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("pre{i}"), "0"))
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store();
    // The test's objects (the namespace also holds the root-CA publisher's ConfigMap).
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default().labels("app=demo")),
    )
    .default_backoff()
    .applied_objects();
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while stream.next().await.is_some() {}
    });

    for i in 0..20 {
        api.create(&PostParams::default(), &cm(&format!("c{i}"), "0"))
            .await
            .unwrap();
    }
    for i in 0..20 {
        api.patch(
            &format!("c{i}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": "1"}})),
        )
        .await
        .unwrap();
    }
    for i in 0..5 {
        api.delete(&format!("pre{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    let expected: BTreeMap<String, String> = (5..10)
        .map(|i| (format!("pre{i}"), "0".to_owned()))
        .chain((0..20).map(|i| (format!("c{i}"), "1".to_owned())))
        .collect();
    eventually("the reflector's store matches the server", T, || {
        let state: BTreeMap<String, String> = reader
            .state()
            .iter()
            .map(|c| {
                (
                    c.name_any(),
                    c.data
                        .as_ref()
                        .and_then(|d| d.get("v").cloned())
                        .unwrap_or_default(),
                )
            })
            .collect();
        let ok = state == expected;
        async move { ok.then_some(()) }
    })
    .await;
    task.abort();
}

/// What a watcher consumer built from the events it saw.
#[derive(Default)]
struct Mirror {
    objects: BTreeMap<String, (u64, String)>,
    inits: usize,
    errors: usize,
    /// Live (non-initial) events that repeated or went back on an RV already applied.
    duplicates: usize,
    pending: Option<BTreeMap<String, (u64, String)>>,
}

impl Mirror {
    fn apply(&mut self, ev: watcher::Event<ConfigMap>) {
        let entry = |c: &ConfigMap| {
            let rv = c.resource_version().unwrap().parse::<u64>().unwrap();
            (
                c.name_any(),
                (
                    rv,
                    c.data
                        .as_ref()
                        .and_then(|d| d.get("v").cloned())
                        .unwrap_or_default(),
                ),
            )
        };
        match ev {
            watcher::Event::Init => {
                self.inits += 1;
                self.pending = Some(BTreeMap::new());
            }
            watcher::Event::InitApply(c) => {
                let (k, v) = entry(&c);
                self.pending.get_or_insert_default().insert(k, v);
            }
            watcher::Event::InitDone => self.objects = self.pending.take().unwrap_or_default(),
            watcher::Event::Apply(c) => {
                let (k, v) = entry(&c);
                if self.objects.get(&k).is_some_and(|old| old.0 >= v.0) {
                    self.duplicates += 1;
                }
                self.objects.insert(k, v);
            }
            watcher::Event::Delete(c) => {
                let (k, _) = entry(&c);
                if self.objects.remove(&k).is_none() {
                    self.duplicates += 1;
                }
            }
        }
    }

    fn values(&self) -> BTreeMap<String, String> {
        self.objects
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }
}

async fn server_state(api: &Api<ConfigMap>) -> BTreeMap<String, String> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| {
            (
                c.name_any(),
                c.data
                    .as_ref()
                    .and_then(|d| d.get("v").cloned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Polls the watcher (only while polled does it reconnect) until the mirror matches the server.
async fn drive_until_converged<S>(stream: &mut S, mirror: &mut Mirror, api: &Api<ConfigMap>)
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let want = server_state(api).await;
    drive_until(stream, mirror, &want).await;
}

async fn drive_until<S>(stream: &mut S, mirror: &mut Mirror, want: &BTreeMap<String, String>)
where
    S: futures::Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + T;
    while mirror.values() != *want || mirror.pending.is_some() {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        match next.expect("watcher did not converge in time") {
            Some(Ok(ev)) => mirror.apply(ev),
            Some(Err(_)) => mirror.errors += 1,
            None => panic!("watcher stream ended"),
        }
    }
}

async fn churn(api: &Api<ConfigMap>, round: usize) {
    for i in 0..10 {
        let name = format!("o{}", (round * 7 + i) % 25);
        match api.get_opt(&name).await.unwrap() {
            Some(_) if i % 3 == 0 => {
                api.delete(&name, &DeleteParams::default()).await.unwrap();
            }
            Some(_) => {
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"data": {"v": format!("r{round}")}})),
                )
                .await
                .unwrap();
            }
            None => {
                api.create(&PostParams::default(), &cm(&name, &format!("r{round}")))
                    .await
                    .unwrap();
            }
        }
    }
}

/// A forced watch close resumes from the last RV (no relist); a `410 Gone` relists; neither
/// loses nor duplicates anything.
#[tokio::test]
async fn watcher_recovers_from_forced_close_and_gone() {
    let h = common::start().await;
    let client = common::client(&h, h.context()).await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    churn(&api, 0).await;
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut mirror = Mirror::default();
    drive_until_converged(&mut stream, &mut mirror, &api).await;
    assert_eq!(mirror.inits, 1);

    // Forced close while the watcher is not looking; changes happen meanwhile.
    for round in 1..4 {
        h.close_watches();
        churn(&api, round).await;
        drive_until_converged(&mut stream, &mut mirror, &api).await;
    }
    assert_eq!(
        mirror.inits, 1,
        "a closed watch resumes from its resourceVersion without relisting"
    );
    assert_eq!(mirror.duplicates, 0);

    // Changes the watcher has not seen are compacted away: the resume gets 410 Gone and relists.
    h.close_watches();
    churn(&api, 4).await;
    h.compact();
    churn(&api, 5).await;
    drive_until_converged(&mut stream, &mut mirror, &api).await;
    assert_eq!(mirror.inits, 2, "410 Gone leads to exactly one relist");
    assert!(mirror.errors >= 1, "the watcher saw the 410");
    assert_eq!(mirror.duplicates, 0);

    // And it keeps following live changes afterwards.
    churn(&api, 6).await;
    drive_until_converged(&mut stream, &mut mirror, &api).await;
    assert_eq!(mirror.duplicates, 0);
}

/// Faults the watcher must ride out: 500s, 429s, a stalled server and a restart.
#[tokio::test]
async fn watcher_rides_out_errors_and_restart() {
    let mut h = common::start().await;
    let client = common::client(&h, h.context()).await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    churn(&api, 0).await;
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut mirror = Mirror::default();
    drive_until_converged(&mut stream, &mut mirror, &api).await;

    h.close_watches();
    churn(&api, 1).await;
    let want = server_state(&api).await;
    h.fail_next(3, 500);
    drive_until(&mut stream, &mut mirror, &want).await;
    assert!(mirror.errors >= 1, "the watcher saw the 500s");

    h.close_watches();
    churn(&api, 2).await;
    let want = server_state(&api).await;
    let errors = mirror.errors;
    h.fail_next(2, 429);
    drive_until(&mut stream, &mut mirror, &want).await;
    // kube's client may retry a 429 itself; either way every injected failure was served.
    assert!(mirror.errors >= errors);
    assert_eq!(h.pending_failures(), 0);

    // Raw requests see the injected codes as Status objects.
    h.fail_next(1, 500);
    assert_eq!(kube_err(api.get("o1").await.unwrap_err()).0, 500);
    // kube's client retries a 429 (it honours Retry-After) and then succeeds.
    h.fail_next(1, 429);
    api.get("o1").await.unwrap();
    assert_eq!(h.pending_failures(), 0);

    h.stall(Some(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    api.list(&ListParams::default()).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "stall delays responses"
    );
    h.stall(None);

    let rv_before = h.resource_version();
    h.restart().await.unwrap();
    assert_eq!(h.resource_version(), rv_before, "restart keeps state");
    churn(&api, 3).await;
    drive_until_converged(&mut stream, &mut mirror, &api).await;
    assert_eq!(mirror.duplicates, 0);
}

/// 8 concurrent writers × 1,000 updates: every watcher sees a gap-free, strictly increasing
/// resourceVersion sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_gap_free_resource_versions() {
    const WRITERS: usize = 8;
    const UPDATES: usize = 1000;
    let h = common::start().await;
    let client = common::client(&h, h.context()).await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for w in 0..WRITERS {
        api.create(&PostParams::default(), &cm(&format!("w{w}"), "initial"))
            .await
            .unwrap();
    }
    let start_rv = h.resource_version();
    let total = WRITERS * UPDATES;

    let mut watchers = Vec::new();
    for _ in 0..3 {
        let api = api.clone();
        let from = start_rv.to_string();
        watchers.push(tokio::spawn(async move {
            let mut rvs = Vec::with_capacity(total);
            let mut from = from;
            while rvs.len() < total {
                let wp = WatchParams::default().timeout(60);
                let mut s = api.watch(&wp, &from).await.unwrap().boxed();
                while let Some(ev) = s.try_next().await.unwrap() {
                    match ev {
                        WatchEvent::Modified(c) => {
                            let rv = c.resource_version().unwrap();
                            rvs.push(rv.parse::<u64>().unwrap());
                            from = rv;
                        }
                        WatchEvent::Bookmark(b) => from = b.metadata.resource_version,
                        other => panic!("unexpected event {other:?}"),
                    }
                    if rvs.len() == total {
                        break;
                    }
                }
            }
            rvs
        }));
    }

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let api = api.clone();
        writers.push(tokio::spawn(async move {
            for u in 0..UPDATES {
                api.patch(
                    &format!("w{w}"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"data": {"v": u.to_string()}})),
                )
                .await
                .unwrap();
            }
        }));
    }
    for w in writers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(h.resource_version(), start_rv + total as u64);
    for w in watchers {
        let rvs = tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<u64> = (start_rv + 1..=start_rv + total as u64).collect();
        assert_eq!(rvs.len(), expected.len());
        let first_gap = rvs.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(
            first_gap, None,
            "gap or reorder in the watched resourceVersions"
        );
    }
}

/// A CRD registers a new resource at runtime: no new code in the server.
#[tokio::test]
async fn custom_resources_from_a_crd() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    use kube::discovery::Discovery;

    let h = common::start().await;
    let client = common::client(&h, h.context()).await;
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    let crd: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "serviceexports.multicluster.x-k8s.io"},
        "spec": {
            "group": "multicluster.x-k8s.io", "scope": "Namespaced",
            "names": {"plural": "serviceexports", "singular": "serviceexport", "kind": "ServiceExport", "shortNames": ["svcex"]},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();

    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, _) = discovery
        .resolve_gvk(&GroupVersionKind::gvk(
            "multicluster.x-k8s.io",
            "v1alpha1",
            "ServiceExport",
        ))
        .expect("the CRD's resource is discoverable");
    assert_eq!(ar.plural, "serviceexports");
    let api: Api<DynamicObject> = Api::default_namespaced_with(client.clone(), &ar);
    let mut events = api
        .watch(&WatchParams::default().timeout(30), "0")
        .await
        .unwrap()
        .boxed();
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "web"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    match tokio::time::timeout(T, events.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Added(o)) => assert_eq!(o.name_any(), "web"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    api.delete("web", &DeleteParams::default()).await.unwrap();
    match tokio::time::timeout(T, events.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Deleted(o)) => assert_eq!(o.name_any(), "web"),
        other => panic!("expected DELETED, got {other:?}"),
    }
}
