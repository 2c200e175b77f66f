//! Issue 17 on the lab: flow visibility. A client pod in east calls a global service served
//! by both clusters (affinity local); `clustermesh observe` shows the flows at east (egress,
//! with the service, the backend and its tier) and at west (ingress), the failover to west
//! when east's backend dies, a connection refused by policy with the policy's name, and a
//! `--follow` stream that survives a node-agent and an apiserver restart.
//! About 2 minutes; run as root after `cargo build --workspace --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use multicluster::lab::{Component, Lab};
use multicluster::{LabCluster, scenarios};
use serde_json::Value;

const NS: &str = "rebel";

/// `clustermesh observe` with `args`: the flows it printed (JSON lines).
async fn observe(kc: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["observe", "-o", "json"];
    all.extend_from_slice(args);
    let out = multicluster::clustermesh(kc, &all).await.unwrap();
    assert_eq!(out.code, 0, "observe {args:?}: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until `observe` with `args` returns a flow passing `pred`; returns it.
async fn flow_where(
    kc: &std::path::Path,
    args: &[&str],
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let flows = observe(kc, args).await;
        if let Some(f) = flows.iter().find(|f| pred(f)) {
            return f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no such flow in {flows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn pod_of(v: &Value) -> String {
    format!(
        "{}/{}@{}",
        v["namespace"].as_str().unwrap_or_default(),
        v["pod"].as_str().unwrap_or_default(),
        v["cluster"].as_str().unwrap_or_default()
    )
}

/// A `--follow` observer: its JSON lines and its stderr, collected by threads.
struct Follower {
    child: std::process::Child,
    flows: Arc<StdMutex<Vec<Value>>>,
    stderr: Arc<StdMutex<Vec<String>>>,
}

impl Follower {
    fn start(kc: &std::path::Path, args: &[&str]) -> Self {
        let mut child =
            std::process::Command::new(multicluster::lab::binary("clustermesh").unwrap())
                .args(["observe", "-o", "json", "--follow"])
                .args(args)
                .env("KUBECONFIG", kc)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
        let flows = Arc::new(StdMutex::new(Vec::new()));
        let stderr = Arc::new(StdMutex::new(Vec::new()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let f = Arc::clone(&flows);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    f.lock().unwrap().push(v);
                }
            }
        });
        let e = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("follower: {line}");
                e.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            flows,
            stderr,
        }
    }

    /// Waits until a flow from x-wing with this socket-level marker shows: any new flow from
    /// x-wing after `after` (Unix nanos).
    async fn wait_flow_after(&self, after: i64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = self.flows.lock().unwrap().iter().any(|f| {
                f["timeUnixNanos"].as_i64().unwrap_or(0) > after
                    && f["source"]["pod"] == "x-wing"
                    && f["direction"] == "egress"
            });
            if seen {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the follower showed no new flow; stderr: {:#?}",
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Connects from x-wing (one a try) until a flow of x-wing after `after` shows.
    async fn connect_until_seen(
        &self,
        lab: &tokio::sync::Mutex<Lab>,
        target: SocketAddr,
        after: i64,
        what: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            lab.lock()
                .await
                .connect_from("east", "x-wing", target, 1)
                .unwrap();
            let seen = self.flows.lock().unwrap().iter().any(|f| {
                f["timeUnixNanos"].as_i64().unwrap_or(0) > after && f["source"]["pod"] == "x-wing"
            });
            if seen {
                return;
            }
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn said(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_across_clusters_failover_policy_and_restarts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create(dir.path(), true).unwrap();
    lab.install_cluster("east", 1, 1).await.unwrap();
    lab.install_cluster("west", 2, 1).await.unwrap();
    let kc = lab.kubeconfig();
    let ann: BTreeMap<String, String> = [
        ("service.cilium.io/global", "true"),
        ("service.cilium.io/affinity", "local"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let vip = lab
        .deploy("east", "rebel/rebel-base", 1, &ann)
        .await
        .unwrap();
    lab.deploy("west", "rebel/rebel-base", 1, &ann)
        .await
        .unwrap();
    let node = lab.cluster("east").unwrap().nodes[0].name.clone();
    let xwing = BTreeMap::from([("app".to_owned(), "x-wing".to_owned())]);
    lab.add_pod("east", NS, "x-wing", &node, &xwing)
        .await
        .unwrap();
    let target = SocketAddr::from((vip, 80));
    let lab = Arc::new(tokio::sync::Mutex::new(lab));
    let (east, west) = (
        LabCluster::new(&lab, "east").await,
        LabCluster::new(&lab, "west").await,
    );
    scenarios::connect(&kc, &east, &west).await.unwrap();

    // Both clusters' backends are programmed in east (west's as tier 1) before the calls.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tally = lab
            .lock()
            .await
            .connect_from("east", "x-wing", target, 3)
            .unwrap();
        if tally.keys().any(|k| k.ends_with("@east")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "east's backend not reached: {tally:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // 1. Tier 0: x-wing → east's rebel-base through the service.
    let f = flow_where(
        &kc,
        &[
            "--context",
            "east",
            "--service",
            "rebel/rebel-base",
            "--pod",
            "rebel/x-wing",
            "--last",
            "50",
        ],
        "tier 0 flow",
        |f| {
            f["source"]["pod"] == "x-wing"
                && f["destination"]["cluster"] == "east"
                && f["direction"] == "egress"
        },
    )
    .await;
    assert_eq!(pod_of(&f["source"]), "rebel/x-wing@east", "{f:#}");
    assert!(
        pod_of(&f["destination"]).starts_with("rebel/rebel-base-east"),
        "{f:#}"
    );
    assert_eq!(f["tier"], 0);
    assert_eq!(f["failedOver"], false);
    assert_eq!(f["verdict"], "forwarded");
    assert_eq!(f["direction"], "egress");
    assert_eq!(f["frontend"], target.to_string());

    // The other cluster's node agents probe east's backend: named as that node, not "world".
    let probe = flow_where(
        &kc,
        &[
            "--context",
            "east",
            "--from-cluster",
            "west",
            "--last",
            "500",
        ],
        "a probe from west's node",
        |f| f["direction"] == "ingress" && f["source"]["node"] == "west-node-1",
    )
    .await;
    assert_eq!(
        probe["source"]["labels"][0], "reserved:remote-node",
        "{probe:#}"
    );

    // 2. East's backend dies: the connections move to west, tier 1, shown as a failover in
    // east (egress) and as ingress in west.
    let east_pod = lab
        .lock()
        .await
        .cluster("east")
        .unwrap()
        .pods
        .iter()
        .find(|p| p.name.starts_with("rebel-base"))
        .unwrap()
        .name
        .clone();
    lab.lock().await.kill_backend("east", &east_pod).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tally = lab
            .lock()
            .await
            .connect_from("east", "x-wing", target, 3)
            .unwrap();
        if tally.keys().any(|k| k.ends_with("@west")) {
            break;
        }
        assert!(Instant::now() < deadline, "no failover to west: {tally:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let f = flow_where(
        &kc,
        &["--context", "east", "--to-cluster", "west", "--last", "50"],
        "failover flow",
        |f| {
            f["source"]["pod"] == "x-wing"
                && f["verdict"] == "forwarded"
                && f["direction"] == "egress"
        },
    )
    .await;
    assert_eq!(f["tier"], 1, "{f:#}");
    assert_eq!(f["failedOver"], true, "{f:#}");
    assert_eq!(f["service"], "rebel/rebel-base");
    assert!(
        pod_of(&f["destination"]).starts_with("rebel/rebel-base-west"),
        "{f:#}"
    );
    let w = flow_where(
        &kc,
        &[
            "--context",
            "west",
            "--from-cluster",
            "east",
            "--last",
            "50",
        ],
        "ingress at west",
        |f| f["direction"] == "ingress" && f["source"]["pod"] == "x-wing",
    )
    .await;
    assert_eq!(pod_of(&w["source"]), "rebel/x-wing@east", "{w:#}");
    assert!(
        pod_of(&w["destination"]).starts_with("rebel/rebel-base-west"),
        "{w:#}"
    );
    assert_eq!(w["service"], "rebel/rebel-base", "{w:#}");
    assert_eq!(w["verdict"], "forwarded");
    // Both contexts at once: both views of the connection, merged by time.
    let both = observe(
        &kc,
        &[
            "--context",
            "east",
            "--context",
            "west",
            "--pod",
            "rebel/x-wing",
            "--last",
            "200",
        ],
    )
    .await;
    assert!(both.iter().any(|f| f["cluster"] == "east"));
    assert!(both.iter().any(|f| f["cluster"] == "west"));
    let times: Vec<i64> = both
        .iter()
        .map(|f| f["timeUnixNanos"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "merged by time");
    // The table form names both pods and the verdict on one line.
    let table = multicluster::clustermesh(
        &kc,
        &[
            "observe",
            "--context",
            "east",
            "--to-cluster",
            "west",
            "--last",
            "1",
        ],
    )
    .await
    .unwrap();
    assert!(
        table
            .stdout
            .contains("rebel/x-wing@east → rebel/rebel-base-west")
            && table.stdout.contains("FORWARDED")
            && table.stdout.contains("(failover)"),
        "{}",
        table.stdout
    );

    // 3. Policy: x-wing may not reach west; the refusal names the policy.
    let client = lab.lock().await.client("east").await.unwrap();
    let cnp = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", "v2", "CiliumNetworkPolicy"),
        "ciliumnetworkpolicies",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, NS, &cnp);
    let obj = serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "no-west", "namespace": NS},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "x-wing"}},
            "egress": [{"toEntities": ["all"]}],
            "egressDeny": [{"toEndpoints": [{"matchLabels": {"io.cilium.k8s.policy.cluster": "west"}}]}],
        },
    });
    api.patch(
        "no-west",
        &PatchParams::apply("flows-test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tally = lab
            .lock()
            .await
            .connect_from("east", "x-wing", target, 2)
            .unwrap();
        if tally.get("failed") == Some(&2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never refused: {tally:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let d = flow_where(
        &kc,
        &["--context", "east", "--verdict", "denied", "--last", "20"],
        "denied flow",
        |f| f["source"]["pod"] == "x-wing",
    )
    .await;
    assert_eq!(d["verdict"], "denied_by_policy", "{d:#}");
    assert_eq!(
        d["reason"], "denied by CiliumNetworkPolicy rebel/no-west",
        "{d:#}"
    );
    assert_eq!(d["destination"]["cluster"], "west");
    // The service map of both clusters: x-wing → rebel-base in west, forwarded and refused.
    let page = dir.path().join("map.html");
    let out = multicluster::clustermesh(
        &kc,
        &[
            "map",
            "--context",
            "east",
            "--context",
            "west",
            "--since",
            "10m",
            "--output",
            page.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.code, 0, "map: {}", out.stderr);
    let html = std::fs::read_to_string(&page).unwrap();
    for verdict in ["forwarded", "denied_by_policy"] {
        assert!(
            html.contains(&format!(
                "data-source=\"east/rebel/x-wing\" data-destination=\"west/rebel/rebel-base\" data-service=\"rebel/rebel-base\" data-verdict=\"{verdict}\""
            )),
            "{verdict} edge missing from the map"
        );
    }
    api.delete("no-west", &Default::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tally = lab
            .lock()
            .await
            .connect_from("east", "x-wing", target, 2)
            .unwrap();
        if !tally.contains_key("failed") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {tally:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 4. `--follow` across a node-agent restart and an apiserver restart.
    let follower = Follower::start(&kc, &["--context", "east", "--pod", "rebel/x-wing"]);
    let t0 = now_nanos();
    lab.lock()
        .await
        .connect_from("east", "x-wing", target, 1)
        .unwrap();
    follower.wait_flow_after(t0, "before the restarts").await;
    {
        let mut l = lab.lock().await;
        l.crash("east", &Component::NodeAgent(node.clone()))
            .unwrap();
        l.restart("east", &Component::NodeAgent(node.clone()))
            .await
            .unwrap();
    }
    let t1 = now_nanos();
    // The new agent's flows reach the follower (the relay dials the node again).
    follower
        .connect_until_seen(&lab, target, t1, "no flow after the agent restart")
        .await;
    assert!(follower.said("reconnecting"), "the break was said");
    {
        let mut l = lab.lock().await;
        l.crash("east", &Component::Apiserver).unwrap();
        l.restart("east", &Component::Apiserver).await.unwrap();
    }
    let t2 = now_nanos();
    follower
        .connect_until_seen(&lab, target, t2, "no flow after the apiserver restart")
        .await;
    assert!(
        follower.said("lost the apiserver's stream"),
        "the apiserver restart was said: {:#?}",
        follower.stderr.lock().unwrap()
    );
    // No flow shown twice across the reconnects.
    let flows = follower.flows.lock().unwrap().clone();
    let mut keys: Vec<(i64, u64, String)> = flows
        .iter()
        .map(|f| {
            (
                f["timeUnixNanos"].as_i64().unwrap(),
                f["socketCookie"].as_u64().unwrap(),
                f["direction"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "a flow was shown twice");
    drop(follower);
    lab.lock().await.teardown();
}
