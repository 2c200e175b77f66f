//! Identity policy's costs (ADR 0023), each next to its baseline in the same run:
//! - connect() latency from an endpoint (a child cgroup of the node's cgroup) with egress
//!   enforced and 1, 1,000 and 10,000 remote identities allowed (one `CM_POLICY` entry each,
//!   every address in the IP cache), against the same path with no policy (the endpoint not
//!   listed, `CFG_POLICY` off) and a direct connect from outside the node's cgroup. Each row
//!   runs in a fresh network namespace of its own (a child process); blocks of 100 connects
//!   alternate between the three, round robin over the allowed identities' addresses;
//! - the kernel's own time (`bpf_stats`, enabled through a `BPF_ENABLE_STATS` descriptor held
//!   for the measurement only, so the global sysctl is never touched) of `cm_connect4` per run
//!   with and without policy, and of `cm_ingress` per packet for a server whose endpoint has
//!   ingress enforced (as many allowed peers as the row), against the same with no policy;
//! - 10,000 remote identities in 10 clusters × 100 local identities, resolved by
//!   `policy::Resolver` and programmed into the real maps: `CM_POLICY` entries and kernel
//!   memory, the agent's memory, the time to program everything, and to recompute and
//!   reprogram after one remote identity is relabelled and after one policy changes; the
//!   kernel's cost per connect with the map that full.
//!
//! Everything it creates (namespaces, cgroups, pinned maps, the stats descriptor) goes with a
//! drop guard, also on panic. Run (root): `cargo bench -p node-agent --bench policy_cost`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{attached, listen_overflows, memlock, pcts, prog_stats, sh, us};

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use model::{ClusterName, Label, Labels};
use node_agent::datapath::{self, Datapath};
use node_agent::maps::{self, Proto};
use node_agent::policy::{self as np, Direction, Endpoint, Rule};
use node_agent::program::Programmer;
use policy::{IdentityInfo, Options, PolicyRef, Remote, Resolver};
use serde_json::{Value, json};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
const BPFFS: &str = "/sys/fs/bpf";
/// Blocks of `BLOCK` connects per condition, alternating.
const BLOCKS: usize = 30;
const BLOCK: usize = 100;
/// Blocks for the kernel's cost, alternating policy on and off.
const KERNEL_BLOCKS: usize = 10;
/// The peers of the working-set measurements (of the `n` allowed).
const WORKING_SET: usize = 100;
const KERNEL_BLOCK: usize = 500;
const COUNTS: [usize; 3] = [1, 1_000, 10_000];
const ROW_VAR: &str = "CMPOLICY_ROW";
/// `max_entries` of `CM_POLICY` (bpf/sock_lb.c).
const POLICY_CAPACITY: usize = 1_048_576;

/// The client endpoint's identity (cluster 1) and the ingress-enforced server's.
const CLIENT_ID: u32 = 0x0001_0101;
const SERVER_ID: u32 = 0x0001_0102;

/// A cgroup, removed on drop (this process first moved back to the root).
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn new(path: PathBuf) -> Self {
        std::fs::create_dir(&path).unwrap();
        Self { path }
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().ino()
    }

    /// Moves this process (every thread) here; sockets created afterwards belong here.
    fn join(&self) {
        std::fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap();
    }
}

fn join_root() {
    let _ = std::fs::write(
        Path::new(CGROUP_ROOT).join("cgroup.procs"),
        std::process::id().to_string(),
    );
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        join_root();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A pin directory, its maps and links removed on drop (declare before the `Programmer`).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = datapath::remove(&self.0);
    }
}

/// A named network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = test_support::unique_name("cmpolrow");
        sh(&format!("ip netns add {name}"));
        let ns = Self(name);
        sh(&format!("ip -n {} link set lo up", ns.0));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A TCP listener with a 4,096 backlog that accepts and closes, on its own thread; its socket
/// belongs to the cgroup this process is in when it is called.
fn backend(addr: &str) -> SocketAddr {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let l = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        s.bind(addr.parse().unwrap()).unwrap();
        s.listen(4096).unwrap().into_std().unwrap()
    });
    l.set_nonblocking(false).unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || for _ in l.incoming() {});
    a
}

/// One connect()+close; its latency.
fn connect_once(t: SocketAddr) -> Duration {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&t, Duration::from_secs(2)).unwrap();
    let d = t0.elapsed();
    drop(s);
    d
}

/// This process's resident memory.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn bpf_stats_sysctl() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// How a block of connects is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// From the endpoint's cgroup, its egress enforced.
    Policy,
    /// From the endpoint's cgroup, no endpoint listed (`CFG_POLICY` off).
    NoPolicy,
    /// From outside the node's cgroup: none of our programs runs.
    Direct,
}

/// Puts this process and the maps in `mode`: `on` are the endpoints listed with policy; the
/// connects come from `pod` (`None`: from outside the node's cgroup).
fn enter(mode: Mode, p: &mut Programmer, pod: Option<&Cgroup>, on: &[Endpoint]) {
    p.set_endpoints(if mode == Mode::Policy { on } else { &[] })
        .unwrap();
    match pod {
        Some(pod) if mode != Mode::Direct => pod.join(),
        _ => join_root(),
    }
}

/// Alternating blocks of connects over `targets` (round robin), one per mode in turn:
/// latencies per mode, sorted, and per mode the median over the rounds of its block's p50
/// minus the first mode's block p50 in the same round (a paired estimate: drift over the run
/// cancels out).
fn alternating(
    p: &mut Programmer,
    pod: &Cgroup,
    on: &[Endpoint],
    targets: &[SocketAddr],
    modes: &[Mode],
) -> (Vec<Vec<Duration>>, Vec<f64>) {
    let mut out = vec![Vec::new(); modes.len()];
    let mut diffs = vec![Vec::new(); modes.len()];
    let mut k = 0usize;
    for round in 0..BLOCKS {
        let mut p50s = vec![0.0; modes.len()];
        for j in 0..modes.len() {
            // Rotate the order each round: no mode always runs first or after another.
            let i = (j + round) % modes.len();
            enter(modes[i], p, Some(pod), on);
            let mut block = Vec::with_capacity(BLOCK);
            for _ in 0..BLOCK {
                k += 1;
                block.push(connect_once(targets[(k * 7919) % targets.len()]));
            }
            out[i].extend_from_slice(&block);
            p50s[i] = us(median(block));
        }
        for i in 0..modes.len() {
            diffs[i].push(p50s[0] - p50s[i]);
        }
    }
    join_root();
    for v in &mut out {
        v.sort();
    }
    let paired = diffs
        .into_iter()
        .map(|mut d| {
            d.sort_by(f64::total_cmp);
            d[d.len() / 2]
        })
        .collect();
    (out, paired)
}

/// The kernel's ns per run of program `id` and runs per connect, with policy on and off in
/// alternating blocks: [(ns, runs per connect) on, (ns, runs per connect) off].
fn kernel_cost(
    id: u64,
    p: &mut Programmer,
    pod: Option<&Cgroup>,
    on: &[Endpoint],
    targets: &[SocketAddr],
) -> [(f64, f64); 2] {
    let mut acc = [(0u64, 0u64); 2];
    let mut k = 0usize;
    for _ in 0..KERNEL_BLOCKS {
        for (i, m) in [Mode::Policy, Mode::NoPolicy].into_iter().enumerate() {
            enter(m, p, pod, on);
            let (t0, r0) = prog_stats(id);
            for _ in 0..KERNEL_BLOCK {
                k += 1;
                drop(
                    TcpStream::connect_timeout(
                        &targets[(k * 7919) % targets.len()],
                        Duration::from_secs(2),
                    )
                    .unwrap(),
                );
            }
            let (t1, r1) = prog_stats(id);
            acc[i].0 += t1 - t0;
            acc[i].1 += r1 - r0;
        }
    }
    join_root();
    let n = (KERNEL_BLOCKS * KERNEL_BLOCK) as f64;
    acc.map(|(t, r)| (t as f64 / r.max(1) as f64, r as f64 / n))
}

fn egress_allow(remote: u32, port: u16) -> Rule {
    Rule {
        direction: Direction::Egress,
        remote: Some(remote),
        proto: Some(Proto::Tcp),
        ports: Some((port, port)),
        deny: false,
        rule: 0,
    }
}

/// Address `i` of the remote identities (127.20.0.1 onwards, 250 per /24).
fn remote_addr(i: usize) -> IpAddr {
    IpAddr::from([
        127,
        20 + (i / 62_500) as u8,
        (i / 250 % 250) as u8,
        (i % 250 + 1) as u8,
    ])
}

/// One latency row, inside its own fresh namespace: prints one JSON line.
fn run_row(n: usize) {
    sh("sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='1024 65000'");
    let setup = Instant::now();
    join_root();
    // The latency server: outside the node's cgroup (no program sees its packets).
    let port = backend("0.0.0.0:0").port();
    let name = test_support::unique_name("cmpol");
    let node = Cgroup::new(Path::new(CGROUP_ROOT).join(&name));
    let client = Cgroup::new(node.path.join("client"));
    let server = Cgroup::new(node.path.join("server"));
    // The ingress server's socket belongs to the server pod.
    server.join();
    let ingress_server = backend("127.0.3.1:0");
    join_root();
    let pins = Pins(Path::new(BPFFS).join(&name));
    let mut p = Programmer::new(Datapath::open(&pins.0, &node.path).unwrap()).unwrap();

    // The IP cache: the `n` remote identities (10 clusters), the client's source address
    // (127.0.0.1, the loopback source) and the ingress server.
    let remotes: Vec<u32> = (0..n)
        .map(|i| ((i as u32 % 10 + 2) << 16) | (i as u32 / 10 + 0x100))
        .collect();
    let mut ipcache: HashMap<IpAddr, (u32, u16)> = remotes
        .iter()
        .enumerate()
        .map(|(i, id)| (remote_addr(i), (*id, (id >> 16) as u16)))
        .collect();
    ipcache.insert("127.0.0.1".parse().unwrap(), (CLIENT_ID, 1));
    ipcache.insert("127.0.3.1".parse().unwrap(), (SERVER_ID, 1));
    p.apply_ipcache(&ipcache).unwrap();
    // The client may reach every remote identity on the server's port; the server admits
    // the client and every remote identity on its port.
    let rules: Vec<Rule> = remotes.iter().map(|id| egress_allow(*id, port)).collect();
    p.set_identity_policy(CLIENT_ID, &rules).unwrap();
    let ingress_rules: Vec<Rule> = remotes
        .iter()
        .chain([CLIENT_ID].iter())
        .map(|id| Rule {
            direction: Direction::Ingress,
            ..egress_allow(*id, ingress_server.port())
        })
        .collect();
    p.set_identity_policy(SERVER_ID, &ingress_rules).unwrap();
    let entries = p.datapath().policy.iter().count();
    let client_ep = Endpoint {
        cgroup_id: client.id(),
        identity: CLIENT_ID,
        ingress: false,
        egress: true,
    };
    let server_ep = Endpoint {
        cgroup_id: server.id(),
        identity: SERVER_ID,
        ingress: true,
        egress: false,
    };
    let targets: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::new(remote_addr(i), port))
        .collect();

    // Enforcement is really on: an address of no allowed identity (WORLD) is refused.
    enter(Mode::Policy, &mut p, Some(&client), &[client_ep]);
    let refused = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 30, 0, 1], port)),
        Duration::from_secs(2),
    );
    assert_eq!(
        refused.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::PermissionDenied),
        "policy not enforced"
    );
    join_root();
    let setup_s = setup.elapsed().as_secs_f64();

    let (lat, paired) = alternating(
        &mut p,
        &client,
        &[client_ep],
        &targets,
        &[Mode::Policy, Mode::NoPolicy, Mode::Direct],
    );
    // A pod's working set: 100 of the allowed peers, the policy still selecting all `n`.
    let working_set = &targets[..n.min(WORKING_SET)];
    let (_, ws_paired) = alternating(
        &mut p,
        &client,
        &[client_ep],
        working_set,
        &[Mode::Policy, Mode::NoPolicy],
    );
    let allowed: u64 = np::verdict_counts(p.datapath(), &(0..12).collect::<Vec<u16>>())
        .unwrap()
        .iter()
        .filter(|(_, d, o, _)| *d == Direction::Egress && *o == np::Outcome::Allowed)
        .map(|(.., c)| c)
        .sum();
    assert!(allowed >= (BLOCKS * BLOCK) as u64, "allowed {allowed}");

    // The kernel's own cost, stats on for this part only.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    let connect4 = attached(&node.path, "cm_connect4");
    let ingress = attached(&node.path, "cm_ingress");
    let egress_cost = kernel_cost(connect4, &mut p, Some(&client), &[client_ep], &targets);
    // The same to one peer only: the trie's depth without the cache misses of many peers.
    let one_peer = kernel_cost(
        connect4,
        &mut p,
        Some(&client),
        &[client_ep],
        &targets[n / 2..=n / 2],
    );
    let ws_cost = kernel_cost(connect4, &mut p, Some(&client), &[client_ep], working_set);
    // Ingress: a client outside the node's cgroup (from 127.0.0.1: the client's identity)
    // to the server pod; only the server's packets meet cm_ingress.
    let ingress_cost = kernel_cost(ingress, &mut p, None, &[server_ep], &[ingress_server]);
    drop(stats);

    p.set_endpoints(&[]).unwrap();
    let row = json!({
        "n": n,
        "entries": entries,
        "setup_s": setup_s,
        "policy": pcts(&lat[0]),
        "nopolicy": pcts(&lat[1]),
        "direct": pcts(&lat[2]),
        "connect4": [egress_cost[0].0, egress_cost[1].0],
        "connect4_runs": egress_cost[0].1,
        "connect4_one_peer": [one_peer[0].0, one_peer[1].0],
        "connect4_working_set": [ws_cost[0].0, ws_cost[1].0],
        "paired": paired[1],
        "ws_paired": ws_paired[1],
        "ingress": [ingress_cost[0].0, ingress_cost[1].0],
        "ingress_runs": [ingress_cost[0].1, ingress_cost[1].1],
        "listen_overflows": listen_overflows(),
    });
    println!("{row}");
}

/// Runs row `n` in a fresh namespace (a child process) and returns its JSON line.
fn row_in_fresh_netns(n: usize) -> Value {
    let ns = Netns::new();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .arg(std::env::current_exe().unwrap())
        .env(ROW_VAR, n.to_string())
        .env("CLUSTERMESH_BENCH_NETNS", &ns.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "row {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Policy origins by index, as the agent interns them (`enforce.rs`).
#[derive(Default)]
struct Origins(HashMap<PolicyRef, u32>);

/// The kernel rules of one resolved endpoint, as the agent builds them (`enforce.rs`).
fn rules_of(ep: &policy::EndpointPolicy, origins: &mut Origins) -> Vec<Rule> {
    ep.entries
        .iter()
        .map(|e| {
            let next = origins.0.len() as u32;
            Rule {
                direction: match e.direction {
                    policy::Direction::Ingress => Direction::Ingress,
                    policy::Direction::Egress => Direction::Egress,
                },
                remote: match e.remote {
                    Remote::Identity(id) => Some(id),
                    Remote::Any => None,
                },
                proto: match e.proto {
                    policy::L4::Tcp => Some(Proto::Tcp),
                    policy::L4::Udp => Some(Proto::Udp),
                    policy::L4::Any => None,
                },
                ports: e.ports,
                deny: e.verdict == policy::Verdict::Deny,
                rule: *origins.0.entry((*e.origin).clone()).or_insert(next),
            }
        })
        .collect()
}

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

fn identity(id: u32, c: &str, pod: &[(&str, String)]) -> IdentityInfo {
    let mut labels = Labels::new()
        .with(Label::new("mesh", "cluster", c).unwrap())
        .with(Label::new("mesh", "namespace", "default").unwrap());
    for (k, v) in pod {
        labels.insert(Label::new("k8s", *k, v.as_str()).unwrap());
    }
    IdentityInfo {
        id,
        cluster: cluster(c),
        labels,
    }
}

const TIERS: [&str; 4] = ["web", "api", "db", "cache"];

/// Remote identity `n` of cluster `c` (2..=11): `app=svc-<n % 100>`, `tier=<n % 4>`.
fn remote_identity(c: u32, n: u32, svc: u32) -> IdentityInfo {
    identity(
        (c << 16) | (n + 1),
        &format!("c{c}"),
        &[
            ("app", format!("svc-{svc}")),
            ("tier", TIERS[n as usize % 4].to_owned()),
        ],
    )
}

fn ccnp(name: &str, spec: Value) -> policy::Policy {
    policy::parse(&json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// App `a`'s egress policy: 50 of the 100 services (`svc-10a` onwards, `extra` more) in every
/// cluster, TCP `ports`.
fn app_policy(a: u32, extra: u32, ports: (u16, u16)) -> policy::Policy {
    let svcs: Vec<String> = (0..50 + extra)
        .map(|k| format!("svc-{}", (a * 10 + k) % 100))
        .collect();
    ccnp(
        &format!("app-{a}-egress"),
        json!({
            "endpointSelector": {"matchLabels": {"app": format!("app-{a}")}},
            "egress": [{"toEndpoints": [{"matchExpressions": [
                {"key": "app", "operator": "In", "values": svcs},
                {"key": "io.cilium.k8s.policy.cluster", "operator": "Exists"}]}],
                "toPorts": [{"ports": [{"port": ports.0.to_string(), "endPort": ports.1, "protocol": "TCP"}]}]}],
        }),
    )
}

/// Programs `changed` local identities from the resolver: (kernel writes + deletes, time,
/// of which reading the resolver's sorted lists and building the rules).
fn reprogram(
    resolver: &Resolver,
    p: &mut Programmer,
    origins: &mut Origins,
    changed: &BTreeSet<u32>,
) -> (usize, Duration, Duration) {
    let t = Instant::now();
    let mut lists = Duration::ZERO;
    let mut ops = 0;
    for id in changed {
        let t = Instant::now();
        let rules = resolver
            .endpoint(*id)
            .map(|ep| rules_of(ep, origins))
            .unwrap_or_default();
        lists += t.elapsed();
        let o = p.set_identity_policy(*id, &rules).unwrap();
        ops += o.writes + o.deletes;
    }
    (ops, t.elapsed(), lists)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// 10,000 remote identities × 100 local identities: appends its section to `report`.
fn scale(report: &mut String) {
    sh("sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='1024 65000'");
    let east = "c1";
    // 100 local identities: `app=app-<i % 10>`, `team=team-<i % 5>`.
    let locals: Vec<IdentityInfo> = (0..100u32)
        .map(|i| {
            identity(
                (1 << 16) | (i + 1),
                east,
                &[
                    ("app", format!("app-{}", i % 10)),
                    ("team", format!("team-{}", i % 5)),
                ],
            )
        })
        .collect();
    // 10,000 remote identities, 1,000 in each of 10 clusters.
    let remotes: Vec<IdentityInfo> = (2..12u32)
        .flat_map(|c| (0..1_000u32).map(move |n| remote_identity(c, n, n % 100)))
        .collect();
    let mut policies: Vec<policy::Policy> =
        (0..10).map(|a| app_policy(a, 0, (8080, 8083))).collect();
    policies.push(ccnp(
        "team-0-dns-anywhere",
        json!({
            "endpointSelector": {"matchLabels": {"team": "team-0"}},
            "egress": [{"toEntities": ["mesh"],
                "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}],
        }),
    ));
    policies.push(ccnp(
        "from-web-tiers",
        json!({
            "endpointSelector": {},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"tier": "web"}, "matchExpressions": [
                {"key": "io.cilium.k8s.policy.cluster", "operator": "Exists"}]}],
                "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}],
        }),
    ));
    policies.push(ccnp(
        "no-world",
        json!({"endpointSelector": {}, "egressDeny": [{"toEntities": ["world"]}]}),
    ));

    // The resolver, as the agent keeps it.
    let rss0 = rss_bytes();
    let t = Instant::now();
    let mut resolver = Resolver::new(cluster(east), Options::default());
    for pol in &policies {
        resolver.upsert_policy(pol.clone());
    }
    for i in locals.iter().chain(&remotes) {
        resolver.upsert_identity(i.clone());
    }
    let selected: Vec<u32> = resolver.endpoints().map(|(id, _)| id).collect();
    let resolved_entries: usize = resolver.endpoints().map(|(_, e)| e.entries.len()).sum();
    let resolve_time = t.elapsed();
    let rss_resolver = rss_bytes().saturating_sub(rss0);

    // Capacity, before writing anything.
    let mut origins = Origins::default();
    let compiled: usize = selected
        .iter()
        .map(|id| {
            np::compile(
                *id,
                &rules_of(resolver.endpoint(*id).unwrap(), &mut origins),
            )
            .map_or(0, |groups| groups.len())
        })
        .sum();
    report.push_str(&format!(
        "\n## Identity policy at scale: 10,000 remote identities (10 clusters) × 100 local identities\n\n\
         {} policies: per local app (10 apps × 10 identities) egress to 50 of 100 services in every cluster on TCP 8080-8083; `mesh` entity on UDP 53 for one team (20 identities); ingress from the `web` tier of every cluster on TCP 8080 for all; egress deny to `world` for all. Resolved by `policy::Resolver`, programmed with `Programmer::set_identity_policy` into real maps in a private namespace.\n\n",
        policies.len()
    ));
    report.push_str(&format!(
        "- Resolver: {} local identities selected, {resolved_entries} resolved entries, initial load {:.0} ms; its memory: {:.1} MiB (VmRSS growth of the process across the load and first read; the sorted lists alone are {resolved_entries} × {} B = {:.1} MiB)\n",
        selected.len(),
        ms(resolve_time),
        rss_resolver as f64 / 1048576.0,
        std::mem::size_of::<policy::PolicyEntry>(),
        (resolved_entries * std::mem::size_of::<policy::PolicyEntry>()) as f64 / 1048576.0,
    ));
    if compiled > POLICY_CAPACITY {
        report.push_str(&format!(
            "- **`CM_POLICY` capacity exceeded**: {compiled} entries compiled, the map holds {POLICY_CAPACITY}; nothing programmed\n"
        ));
        return;
    }

    let name = test_support::unique_name("cmpolscale");
    let node = Cgroup::new(Path::new(CGROUP_ROOT).join(&name));
    let pod = Cgroup::new(node.path.join("pod"));
    let pins = Pins(Path::new(BPFFS).join(&name));
    let mut p = Programmer::new(Datapath::open(&pins.0, &node.path).unwrap()).unwrap();
    let memlock0 = memlock(&pins.0.join(maps::POLICY)) + memlock(&pins.0.join(maps::POLICY_SETS));
    let rss1 = rss_bytes();
    let t = Instant::now();
    let all: BTreeSet<u32> = selected.iter().copied().collect();
    let (writes, ..) = reprogram(&resolver, &mut p, &mut origins, &all);
    let program_time = t.elapsed();
    let rss_tables = rss_bytes().saturating_sub(rss1);
    let memlock1 = memlock(&pins.0.join(maps::POLICY)) + memlock(&pins.0.join(maps::POLICY_SETS));
    let t = Instant::now();
    let in_kernel = p.datapath().policy.iter().count();
    let iterate_time = t.elapsed();
    assert_eq!(in_kernel, compiled, "kernel entries against compiled");
    report.push_str(&format!(
        "- `CM_POLICY`: **{in_kernel} entries** of {POLICY_CAPACITY} ({:.0}% full; read back from the kernel in {:.1} s); {} distinct port sets; kernel memory (`bytes_memlock` of `CM_POLICY` and `CM_POLICY_SETS`): **{:.1} MiB** ({:.1} MiB empty)\n",
        in_kernel as f64 * 100.0 / POLICY_CAPACITY as f64,
        iterate_time.as_secs_f64(),
        p.policy_tables().sets(),
        memlock1 as f64 / 1048576.0,
        memlock0 as f64 / 1048576.0,
    ));
    report.push_str(&format!(
        "- Programming everything: {writes} writes in **{:.2} s** ({:.0} entries/s, one syscall per entry); the agent's copy of what it programmed: {:.1} MiB (VmRSS growth across programming)\n",
        program_time.as_secs_f64(),
        writes as f64 / program_time.as_secs_f64(),
        rss_tables as f64 / 1048576.0,
    ));

    // One remote identity relabelled svc-0 → svc-10 and back, 5 times: it leaves app-6's
    // policy and joins app-1's (10 local identities each).
    let mut change = Vec::new();
    let moved = remotes[0].clone();
    assert_eq!(moved.id & 0xffff, 1, "svc-0 of c2");
    for round in 0..10 {
        let id = if round % 2 == 0 {
            remote_identity(2, 0, 10)
        } else {
            moved.clone()
        };
        let t = Instant::now();
        let changed = resolver.upsert_identity(id);
        let resolve_t = t.elapsed();
        let (ops, program_t, lists_t) = reprogram(&resolver, &mut p, &mut origins, &changed);
        change.push((
            resolve_t + program_t,
            resolve_t,
            changed.len(),
            ops,
            lists_t,
        ));
    }
    let total = median(change.iter().map(|c| c.0).collect());
    let res = median(change.iter().map(|c| c.1).collect());
    let lists = median(change.iter().map(|c| c.4).collect());
    report.push_str(&format!(
        "- One remote identity relabelled (leaves one app's selection, joins another's): **{:.1} ms** to recompute and reprogram (median of 10, back and forth): resolver {:.2} ms; {} local identities changed, each reprogrammed whole: their sorted lists and rules {:.1} ms, compile + diff + {} kernel writes and deletes {:.1} ms\n",
        ms(total),
        ms(res),
        change[0].2,
        ms(lists),
        change[0].3,
        ms(total - res - lists),
    ));

    // One policy changed: app-3 allows one more service (100 identities), then its ports
    // widen to 8080-8087; each reverted.
    for (what, changed_policy) in [
        (
            "allows one more service (100 more remote identities)",
            app_policy(3, 1, (8080, 8083)),
        ),
        (
            "widens its ports to 8080-8087 (every entry's prefix changes)",
            app_policy(3, 0, (8080, 8087)),
        ),
    ] {
        let mut runs = Vec::new();
        for round in 0..6 {
            let pol = if round % 2 == 0 {
                changed_policy.clone()
            } else {
                app_policy(3, 0, (8080, 8083))
            };
            let t = Instant::now();
            let changed = resolver.upsert_policy(pol);
            let resolve_t = t.elapsed();
            let (ops, program_t, lists_t) = reprogram(&resolver, &mut p, &mut origins, &changed);
            runs.push((
                resolve_t + program_t,
                resolve_t,
                changed.len(),
                ops,
                lists_t,
            ));
        }
        let total = median(runs.iter().map(|c| c.0).collect());
        let res = median(runs.iter().map(|c| c.1).collect());
        let lists = median(runs.iter().map(|c| c.4).collect());
        report.push_str(&format!(
            "- One policy changed, app-3's {what}: **{:.1} ms** (median of 6, back and forth): resolver {:.2} ms; {} local identities changed: lists and rules {:.1} ms, compile + diff + {} kernel writes and deletes {:.1} ms\n",
            ms(total),
            ms(res),
            runs[0].2,
            ms(lists),
            runs[0].3,
            ms(total - res - lists),
        ));
    }

    // The kernel's cost per connect with the map this full: local identity app-0/team-0
    // (egress to svc-0..49 on 8080-8083) to 1,000 of its allowed remote identities.
    let local = locals[0].id;
    let port = backend("0.0.0.0:8080").port();
    let allowed: Vec<&IdentityInfo> = remotes
        .iter()
        .filter(|i| {
            let n = (i.id & 0xffff) - 1;
            n % 100 < 50
        })
        .take(1_000)
        .collect();
    let ipcache: HashMap<IpAddr, (u32, u16)> = remotes
        .iter()
        .enumerate()
        .map(|(i, r)| (remote_addr(i), (r.id, (r.id >> 16) as u16)))
        .collect();
    p.apply_ipcache(&ipcache).unwrap();
    let index: HashMap<u32, usize> = remotes.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let targets: Vec<SocketAddr> = allowed
        .iter()
        .map(|r| SocketAddr::new(remote_addr(index[&r.id]), port))
        .collect();
    let ep = Endpoint {
        cgroup_id: pod.id(),
        identity: local,
        ingress: false,
        egress: true,
    };
    let (lat, _) = alternating(
        &mut p,
        &pod,
        &[ep],
        &targets,
        &[Mode::Policy, Mode::NoPolicy, Mode::Direct],
    );
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    let connect4 = attached(&node.path, "cm_connect4");
    let cost = kernel_cost(connect4, &mut p, Some(&pod), &[ep], &targets);
    drop(stats);
    let f = |v: &[Duration]| {
        format!(
            "{:.1} / {:.1} / {:.1}",
            us(test_support::percentile(v, 0.5)),
            us(test_support::percentile(v, 0.9)),
            us(test_support::percentile(v, 0.99))
        )
    };
    report.push_str(&format!(
        "- With `CM_POLICY` this full, a connect from app-0's endpoint round robin over 1,000 allowed remote identities: policy on {} µs, no policy {} µs, direct {} µs (p50 / p90 / p99); `cm_connect4` **{:.0} ns** per run with policy, {:.0} ns without\n",
        f(&lat[0]),
        f(&lat[1]),
        f(&lat[2]),
        cost[0].0,
        cost[1].0,
    ));
    p.set_endpoints(&[]).unwrap();
    drop(p);
}

fn main() {
    if let Ok(n) = std::env::var(ROW_VAR) {
        run_row(n.parse().unwrap());
        return;
    }
    let _name = test_support::reexec_in_private_netns("cmpolicy");
    let stats_sysctl = bpf_stats_sysctl();
    let mut report = String::from(
        "## Identity policy: connect() with egress enforced, paired with the same path without policy and a direct connect\n\n",
    );
    report.push_str(&format!(
        "Each row in a fresh network namespace; {BLOCKS} blocks of {BLOCK} sequential connect()+close per condition, alternating (same seconds), round robin over the allowed identities' addresses (all in the IP cache, one `CM_POLICY` entry each, TCP over loopback, backlog 4,096). Policy on: from an endpoint cgroup (child of the node's cgroup) with egress enforced; no policy: the same cgroup, no endpoint listed (`CFG_POLICY` off); direct: from outside the node's cgroup. µs p50 / p90 / p99; policy − no policy at p50 pooled over all blocks, and paired: the median over the {BLOCKS} rounds of the two blocks' p50 difference in the same round (the order of the conditions rotating each round), over all the allowed peers and over the working set. Kernel: `run_time_ns / run_cnt` (bpf_stats) over {} connects per condition, alternating, round robin over the allowed identities (at 10,000 each peer is met at most once: every connect misses the verdict cache), again to one of them only, and over a working set of {WORKING_SET} of them (the policy still selecting all: what a pod that talks to a hundred peers pays); `cm_ingress` for a server pod with ingress enforced admitting the row's identities, per packet (runs per connect in brackets). The global `kernel.bpf_stats_enabled` was {stats_sysctl} during the latency blocks (1 adds two clock reads per program run).\n\n",
        KERNEL_BLOCKS * KERNEL_BLOCK
    ));
    report.push_str("| remote identities allowed | `CM_POLICY` entries | policy on µs | no policy µs | direct µs | policy − no policy, p50: pooled / paired / paired, working set | `cm_connect4` ns/run: policy / none | the same, one peer only | the same, working set | `cm_ingress` ns/run: policy / none | listen overflows |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for n in COUNTS {
        let r = row_in_fresh_netns(n);
        let f = |v: &Value| -> String {
            let a: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| format!("{:.1}", x.as_f64().unwrap()))
                .collect();
            a.join(" / ")
        };
        let p50 = |v: &Value| v[0].as_f64().unwrap_or(f64::NAN);
        let line = format!(
            "| {n} | {} | {} | {} | {} | {:+.2} / {:+.2} / {:+.2} µs | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} ({:.1}) / {:.0} ({:.1}) | {} |\n",
            r["entries"],
            f(&r["policy"]),
            f(&r["nopolicy"]),
            f(&r["direct"]),
            p50(&r["policy"]) - p50(&r["nopolicy"]),
            r["paired"].as_f64().unwrap_or(f64::NAN),
            r["ws_paired"].as_f64().unwrap_or(f64::NAN),
            r["connect4"][0].as_f64().unwrap_or(f64::NAN),
            r["connect4"][1].as_f64().unwrap_or(f64::NAN),
            r["connect4_one_peer"][0].as_f64().unwrap_or(f64::NAN),
            r["connect4_one_peer"][1].as_f64().unwrap_or(f64::NAN),
            r["connect4_working_set"][0].as_f64().unwrap_or(f64::NAN),
            r["connect4_working_set"][1].as_f64().unwrap_or(f64::NAN),
            r["ingress"][0].as_f64().unwrap_or(f64::NAN),
            r["ingress_runs"][0].as_f64().unwrap_or(f64::NAN),
            r["ingress"][1].as_f64().unwrap_or(f64::NAN),
            r["ingress_runs"][1].as_f64().unwrap_or(f64::NAN),
            r["listen_overflows"],
        );
        eprint!("{line}");
        report.push_str(&line);
    }
    // CMPOLICY_ROWS_ONLY=1: the connect rows only (quick comparisons of datapath variants).
    if std::env::var_os("CMPOLICY_ROWS_ONLY").is_none() {
        scale(&mut report);
    }
    print!("{report}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("policy_cost.md"), &report);
    }
}
