//! The datapath v2's costs, each next to a baseline measured in the same run (ADR 0018, 0019):
//! - the kernel's own time per translated connect (`bpf_stats`: `run_time_ns / run_cnt` of
//!   `cm_connect4`), with passive health, spill-over and the peer rewrite on, at 1 and 10,000
//!   services (each with its own backends: the sockets are marked; with weights; with every
//!   service on the same two backends: socket storage), round robin over every service and
//!   over 100 of them, before and after 300,000 connects, against an empty program on the same
//!   hook, attached alongside through every row (its cost over the same connects: the floor in
//!   the same seconds); the memory floor of any design (two dependent cache lines per connect);
//!   the `sock_ops` program's time per connect; the tax on a connect to a non-service address;
//! - reverse-NAT entries left after 300,000 TCP connects;
//! - health-probe connects per second and the agent's CPU with 100, 1,000 and 10,000 live
//!   backends, against the previous design (every backend every 200 ms) run on the same
//!   backends;
//! - kernel memory of the maps (`bytes_memlock`) at the default sizes and with 10,000 services.
//!
//! Run (root): `cargo bench -p node-agent --bench datapath_cost`. `CMCOST_KERNEL_ONLY=1` stops
//! after the kernel rows; `CMCOST_MAX_SERVICES=N` sizes the maps for N services instead of the
//! default (to see whether the maps' size matters: it does not, measured).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Cleanup, attached, prog_stats, sh};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node_agent::datapath::{self, Datapath};
use node_agent::health::{self, HealthConfig};
use node_agent::maps::{self, Frontend, Proto};
use node_agent::program::{BackendSpec, Balancing, DesiredService, Programmer};

fn listener(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || for _ in l.incoming() {});
    a
}

fn vip(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 200, (i / 250) as u8, (i % 250 + 1) as u8], 80))
}

/// `n` services, each with its own local and remote backend (distinct addresses on the
/// wildcard listeners' ports): every backend has one frontend, the common case.
fn own_services(n: usize, local_port: u16, remote_port: u16) -> Vec<DesiredService> {
    (0..n)
        .map(|i| {
            let at = |net: u8, port: u16| {
                SocketAddr::from(([127, net, (i / 250) as u8, (i % 250 + 1) as u8], port))
            };
            let mut s = services(1, &[at(1, local_port), at(2, remote_port)]).remove(0);
            s.frontend.addr = vip(i);
            s
        })
        .collect()
}

/// Weighted by cluster as the agent programs it (weights replace the affinity's tiers: one
/// tier, a group per cluster), passive health on: two clusters 90/10 (the groups fit in the
/// service's value), or five clusters 60/10/10/10/10 (a `CM_GROUPS` entry).
fn weighted(
    mut svcs: Vec<DesiredService>,
    local_port: u16,
    clusters: usize,
) -> Vec<DesiredService> {
    for (i, s) in svcs.iter_mut().enumerate() {
        let [local, remote] = std::mem::take(&mut s.tiers);
        s.tiers[0] = local.into_iter().chain(remote).collect();
        for c in 3..=clusters {
            s.tiers[0].push(BackendSpec {
                addr: SocketAddr::from((
                    [127, c as u8, (i / 250) as u8, (i % 250 + 1) as u8],
                    local_port,
                )),
                cluster_id: c as u16,
                zone: 0,
            });
        }
        s.balancing.groups = match clusters {
            2 => vec![(1, 90), (1, 10)],
            _ => std::iter::once((1, 60))
                .chain(std::iter::repeat_n((1, 10), clusters - 1))
                .collect(),
        };
    }
    svcs
}

/// `n` services over the same `backends` (each backend has many frontends).
fn services(n: usize, backends: &[SocketAddr]) -> Vec<DesiredService> {
    (0..n)
        .map(|i| DesiredService {
            frontend: Frontend {
                addr: vip(i),
                proto: Proto::Tcp,
            },
            service: None,
            tiers: [
                vec![BackendSpec {
                    addr: backends[0],
                    cluster_id: 1,
                    zone: 0,
                }],
                backends[1..]
                    .iter()
                    .map(|a| BackendSpec {
                        addr: *a,
                        cluster_id: 2,
                        zone: 0,
                    })
                    .collect(),
            ],
            balancing: Balancing {
                overprov_pct: 140,
                min_healthy: 0,
                groups: Vec::new(),
            },
        })
        .collect()
}

/// Applies `desired`, every service programmed (a refused one would leave the row measuring
/// something else).
fn apply_all(p: &mut Programmer, desired: &[DesiredService]) {
    let ops = p.apply(desired).unwrap();
    assert!(ops.refused.is_empty(), "refused: {:?}", &ops.refused[..1]);
}

/// `n` connect()+close to `targets`, round robin.
fn connects(targets: &[SocketAddr], n: usize) {
    for i in 0..n {
        let t = targets[(i * 7919) % targets.len()];
        drop(TcpStream::connect_timeout(&t, Duration::from_secs(2)).unwrap());
    }
}

/// Nanoseconds per run of `ids` (summed) over `n` connects to `targets`, and runs per connect.
fn cost(ids: &[u64], targets: &[SocketAddr], n: usize) -> (f64, f64) {
    let before: Vec<(u64, u64)> = ids.iter().map(|id| prog_stats(*id)).collect();
    connects(targets, n);
    let (mut time, mut runs) = (0, 0);
    for (id, (t0, r0)) in ids.iter().zip(before) {
        let (t1, r1) = prog_stats(*id);
        time += t1 - t0;
        runs += r1 - r0;
    }
    (time as f64 / runs.max(1) as f64, runs as f64 / n as f64)
}

/// [`cost`] of `id` and, over the same connects, of `empty` (an empty program attached to the
/// same hook: the floor in the same seconds): (ns per run, runs per connect, the empty
/// program's ns per run).
fn cost_paired(id: u64, empty: u64, targets: &[SocketAddr], n: usize) -> (f64, f64, Option<f64>) {
    let (e0, er0) = prog_stats(empty);
    let (ns, runs) = cost(&[id], targets, n);
    let (e1, er1) = prog_stats(empty);
    (ns, runs, Some((e1 - e0) as f64 / (er1 - er0).max(1) as f64))
}

/// A row without a paired floor.
fn alone((ns, runs): (f64, f64)) -> (f64, f64, Option<f64>) {
    (ns, runs, None)
}

/// Kernel memory of every map pinned in `dir` (`bytes_memlock`, summed).
fn memlock(dir: &Path) -> u64 {
    maps::ALL
        .iter()
        .map(|m| common::memlock(&dir.join(m)))
        .sum()
}

/// An empty `cgroup/connect4` program: the hook's floor.
const EMPTY: &str = "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
    SEC(\"cgroup/connect4\") int empty(struct bpf_sock_addr *ctx) { return 1; }\n\
    char _license[] SEC(\"license\") = \"GPL\";\n";

/// The memory floor of any socket-LB at many services: the least a translated connect must
/// read when every connect goes to another service — one cache line for the service (an
/// array entry found by a multiplicative hash of the address, no probing, no key compare) and,
/// dependent on it, one line for the backend — and the rewrite. Every connect goes to
/// `TARGET` (the entries are zero; the index and address still wait for the loads).
const FLOOR: &str = r#"#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct line { __u32 id; __u32 pad[15]; };
struct be { __u32 ip; __u16 port; __u16 pad; __u32 more[5]; };
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 16384); __type(key, __u32); __type(value, struct line); } FLOOR_SVC SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 65536); __type(key, __u32); __type(value, struct be); } FLOOR_BE SEC(".maps");
SEC("cgroup/connect4") int floor2(struct bpf_sock_addr *ctx)
{
	__u32 ip = ctx->user_ip4;
	__u32 i = (ip * 2654435761u) >> 18;
	struct line *s = bpf_map_lookup_elem(&FLOOR_SVC, &i);
	if (!s)
		return 1;
	__u32 j = (s->id + ip * 40503u) & 65535;
	struct be *b = bpf_map_lookup_elem(&FLOOR_BE, &j);
	if (!b)
		return 1;
	ctx->user_ip4 = b->ip | TARGET_IP;
	ctx->user_port = b->port | TARGET_PORT;
	return 1;
}
char _license[] SEC("license") = "GPL";
"#;

/// A `cgroup/connect4` program from C `source` attached to `cgroup`, detached and unpinned on
/// drop.
struct BenchProgram {
    pin: PathBuf,
    cgroup: PathBuf,
}

impl BenchProgram {
    /// The empty program ([`EMPTY`]).
    fn empty(cgroup: &Path, dir: &Path) -> Self {
        Self::attach(cgroup, dir, "empty", EMPTY, "")
    }

    /// `source` compiled with clang `flags`; `name` is its program's name.
    fn attach(cgroup: &Path, dir: &Path, name: &str, source: &str, flags: &str) -> Self {
        let src = dir.join(format!("{name}.c"));
        let obj = dir.join(format!("{name}.o"));
        std::fs::write(&src, source).unwrap();
        sh(&format!(
            "clang -O2 -target bpf {flags} -I/usr/include/{}-linux-gnu -c {} -o {}",
            std::env::consts::ARCH,
            src.display(),
            obj.display()
        ));
        let pin = Path::new("/sys/fs/bpf").join(format!("cmcost-{name}-{}", std::process::id()));
        sh(&format!(
            "bpftool prog load {} {} type cgroup/connect4 && bpftool cgroup attach {} connect4 pinned {} multi",
            obj.display(),
            pin.display(),
            cgroup.display(),
            pin.display()
        ));
        Self {
            pin,
            cgroup: cgroup.to_owned(),
        }
    }
}

impl Drop for BenchProgram {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "bpftool cgroup detach {} connect4 pinned {}; rm -f {}",
                self.cgroup.display(),
                self.pin.display(),
                self.pin.display()
            ))
            .status();
    }
}

/// The process's CPU seconds so far.
fn cpu_seconds(metrics: &telemetry::metrics::Registry) -> f64 {
    telemetry::metrics::render_all(metrics)
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The previous design: every backend every 200 ms, all at once.
async fn probe_everything(targets: Vec<SocketAddr>, count: Arc<std::sync::atomic::AtomicU64>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let results = futures::future::join_all(targets.iter().map(|a| async move {
            tokio::time::timeout(
                Duration::from_millis(150),
                tokio::net::TcpStream::connect(a),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        }))
        .await;
        count.fetch_add(results.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The bench's pins and cgroup, removed on drop (also on panic): this process leaves the cgroup
/// first, then the programs are detached and unpinned.
fn main() {
    let name = test_support::reexec_in_private_netns("cmcost");
    telemetry::raise_fd_limit();
    // 300,000 connects from one address: reuse TIME_WAIT ports (this namespace only).
    sh("sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range='1024 65000'");
    let cgroup = Path::new("/sys/fs/cgroup/unified").join(&name);
    let pins = Path::new("/sys/fs/bpf").join(&name);
    std::fs::create_dir_all(&cgroup).unwrap();
    let stats_before = sh("sysctl -n kernel.bpf_stats_enabled").trim().to_owned();
    // Removes the pins, the links and the cgroup, and restores bpf_stats, also when a row
    // panics.
    let _cleanup = Cleanup {
        pins: pins.clone(),
        cgroup: cgroup.clone(),
        stats_before: stats_before.clone(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let backend = listener("127.0.1.1");
    let remote = listener("127.0.2.1");
    sh("sysctl -qw kernel.bpf_stats_enabled=1");
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    let n = 20_000;
    let mut report = String::from("## Datapath v2: the kernel's cost per connect (bpf_stats)\n\n");
    report.push_str(&format!("{n} sequential connect()+close per row from a process in the node's cgroup, TCP over loopback, in a private network namespace; `run_time_ns / run_cnt` of the program (bpf_stats, which adds its own clock reads: the empty program shows that floor).\n\n| program, state | services | ns per run | runs per connect | empty program, same connects | difference |\n|---|---|---|---|---|---|\n"));
    let mut row = |what: &str, services: &str, (ns, runs, floor): (f64, f64, Option<f64>)| {
        let (f, d) = floor.map_or(("–".to_owned(), "–".to_owned()), |f| {
            (format!("{f:.0}"), format!("{:.0}", ns - f))
        });
        let line = format!("| {what} | {services} | {ns:.0} | {runs:.1} | {f} | {d} |\n");
        eprint!("{line}");
        report.push_str(&line);
    };

    // Baseline: an empty program on the same hook, nothing else attached.
    {
        let empty = BenchProgram::empty(&cgroup, tmp.path());
        let id = attached(&cgroup, "empty");
        row(
            "empty connect4 program (baseline)",
            "-",
            alone(cost(&[id], &[backend], n)),
        );
        drop(empty);
    }
    // The memory floor: two dependent cache lines and the rewrite, per connect.
    {
        let ip = match backend.ip() {
            std::net::IpAddr::V4(v4) => u32::from_ne_bytes(v4.octets()),
            std::net::IpAddr::V6(_) => unreachable!("an IPv4 listener"),
        };
        let port = u32::from(backend.port().to_be());
        let floor = BenchProgram::attach(
            &cgroup,
            tmp.path(),
            "floor2",
            FLOOR,
            &format!("-g -DTARGET_IP={ip}u -DTARGET_PORT={port}u"),
        );
        let id = attached(&cgroup, "floor2");
        for count in [1, 100, 10_000] {
            let targets: Vec<SocketAddr> = (0..count).map(vip).collect();
            row(
                "floor: two dependent cache lines (service, backend) and the rewrite, round robin over that many addresses",
                &count.to_string(),
                alone(cost(&[id], &targets, n)),
            );
        }
        drop(floor);
    }
    // The empty program stays attached from here on: every row shows its cost over the same
    // connects (the floor in the same seconds, whatever the machine does meanwhile).
    let _paired_empty = BenchProgram::empty(&cgroup, tmp.path());
    let paired = attached(&cgroup, "empty");

    let sizes = std::env::var("CMCOST_MAX_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or_else(maps::Sizes::default, |services| maps::Sizes { services });
    let mut p = Programmer::new(Datapath::open_sized(&pins, &cgroup, sizes).unwrap()).unwrap();
    p.datapath_mut()
        .set_config(&maps::Config {
            quarantine_ns: 10_000_000_000,
            syn_rto_jiffies: health::syn_rto_jiffies(Duration::from_millis(200)),
            flags: 0,
        })
        .unwrap();
    let memlock_empty = memlock(&pins);
    // A reader drains the flow ring (as the agent does) while rows with flows on run.
    let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drainer = {
        let mut ring = p.datapath_mut().flows.take().unwrap();
        let stop = Arc::clone(&drained);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                while ring.next().is_some() {}
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let connect4 = attached(&cgroup, "cm_connect4");
    let sockops = attached(&cgroup, "cm_sockops");
    // Wildcard listeners: every 127.x address of a backend reaches them.
    let local_port = listener("0.0.0.0").port();
    let remote_port = listener("0.0.0.0").port();
    for count in [1, 10_000] {
        apply_all(&mut p, &own_services(count, local_port, remote_port));
        let targets: Vec<SocketAddr> = (0..count).map(vip).collect();
        let label = count.to_string();
        row(
            "cm_connect4, translated connect, round robin over every service",
            &label,
            cost_paired(connect4, paired, &targets, n),
        );
        if count > 100 {
            row(
                "cm_connect4, translated connect, round robin over 100 of them",
                &label,
                cost_paired(connect4, paired, &targets[..100], n),
            );
        }
        row(
            "cm_sockops (all callbacks), translated connect",
            &label,
            cost_paired(sockops, paired, &targets, n),
        );
        // Flow events on (the agent's default), the ring drained as the agent does.
        p.datapath_mut()
            .update_config(|c| c.flags |= maps::CFG_FLOWS)
            .unwrap();
        row(
            "cm_connect4, translated connect, round robin over every service, flow events on",
            &label,
            cost_paired(connect4, paired, &targets, n),
        );
        p.datapath_mut()
            .update_config(|c| c.flags &= !maps::CFG_FLOWS)
            .unwrap();
        row(
            "cm_connect4, connect to a non-service address",
            &label,
            cost_paired(connect4, paired, &[backend], n),
        );
        p.datapath_mut()
            .update_config(|c| c.flags |= maps::CFG_NO_PEER_REWRITE)
            .unwrap();
        row(
            "cm_connect4, translated connect, --tcp-peer-rewrite=false",
            &label,
            cost_paired(connect4, paired, &targets, n),
        );
        row(
            "cm_sockops (all callbacks), translated connect, --tcp-peer-rewrite=false",
            &label,
            cost_paired(sockops, paired, &targets, n),
        );
        p.datapath_mut()
            .update_config(|c| c.flags &= !maps::CFG_NO_PEER_REWRITE)
            .unwrap();
        for (clusters, what) in [
            (2, "cluster weights 90/10 (groups in the service's value)"),
            (5, "cluster weights over 5 clusters (a CM_GROUPS entry)"),
        ] {
            apply_all(
                &mut p,
                &weighted(
                    own_services(count, local_port, remote_port),
                    local_port,
                    clusters,
                ),
            );
            row(
                &format!("cm_connect4, translated connect, {what}"),
                &label,
                cost_paired(connect4, paired, &targets, n),
            );
            if count > 100 {
                row(
                    &format!("cm_connect4, {what}, round robin over 100 of them"),
                    &label,
                    cost_paired(connect4, paired, &targets[..100], n),
                );
            }
        }
        apply_all(&mut p, &services(count, &[backend, remote]));
        row(
            "cm_connect4, translated connect, every service on the same 2 backends (socket storage)",
            &label,
            cost_paired(connect4, paired, &targets, n),
        );
    }
    apply_all(&mut p, &own_services(10_000, local_port, remote_port));
    let memlock_10k = memlock(&pins);
    let targets: Vec<SocketAddr> = (0..10_000).map(vip).collect();
    let started = Instant::now();
    connects(&targets, 300_000);
    let bulk = started.elapsed();
    let revnat = p.datapath().revnat_entries().unwrap();
    row(
        "cm_connect4, translated connect, after 300,000 connects",
        "10000",
        cost_paired(connect4, paired, &targets, n),
    );
    report.push_str(&format!(
        "\nReverse-NAT entries after 300,000 TCP connects: **{revnat}** (before socket storage: one per connect, the LRU map full after 262,144). The 300,000 connects took {:.1} s.\n",
        bulk.as_secs_f64()
    ));
    report.push_str(&format!(
        "\nKernel memory of the maps (`bytes_memlock`, sum over the pinned maps): {:.1} MiB at the default sizes with nothing programmed, {:.1} MiB with 10,000 services.\n",
        memlock_empty as f64 / 1048576.0,
        memlock_10k as f64 / 1048576.0
    ));
    p.apply(&[]).unwrap();
    let _ = std::fs::write(
        "/sys/fs/cgroup/unified/cgroup.procs",
        std::process::id().to_string(),
    );
    sh(&format!(
        "sysctl -qw kernel.bpf_stats_enabled={stats_before}"
    ));
    drained.store(true, std::sync::atomic::Ordering::Relaxed);
    drainer.join().unwrap();

    // Probe load: live backends on 40 addresses, in this process (outside the node's cgroup).
    // CMCOST_KERNEL_ONLY=1 stops here (for quick comparisons of datapath variants).
    if std::env::var_os("CMCOST_KERNEL_ONLY").is_some() {
        print!("{report}");
        drop(p);
        let _ = datapath::remove(&pins);
        let _ = std::fs::remove_dir(&cgroup);
        return;
    }
    report.push_str("\n## Health probes: connects per second and agent CPU, 10 s per row\n\n| backends | design | probe connects/s | CPU (% of a core) |\n|---|---|---|---|\n");
    let programmer = Arc::new(Mutex::new(p));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Listeners that never accept: the kernel completes each probe's handshake (backlog 128,
    // far more than the probes one backend gets in a window); no thread per backend.
    let mut live: Vec<TcpListener> = Vec::new();
    for count in [100usize, 1_000, 10_000] {
        while live.len() < count {
            let i = live.len();
            live.push(
                TcpListener::bind(format!("127.0.{}.{}:0", 10 + i / 250, 1 + i % 250)).unwrap(),
            );
        }
        let addrs: Vec<SocketAddr> = live.iter().map(|l| l.local_addr().unwrap()).collect();
        let svcs: Vec<DesiredService> = addrs
            .chunks(250)
            .enumerate()
            .map(|(i, chunk)| DesiredService {
                frontend: Frontend {
                    addr: vip(i),
                    proto: Proto::Tcp,
                },
                service: None,
                tiers: [
                    chunk
                        .iter()
                        .map(|a| BackendSpec {
                            addr: *a,
                            cluster_id: 1,
                            zone: 0,
                        })
                        .collect(),
                    vec![],
                ],
                balancing: Balancing::default(),
            })
            .collect();
        programmer.lock().unwrap().apply(&svcs).unwrap();
        let targets = programmer.lock().unwrap().backends_of(Proto::Tcp);
        let window = Duration::from_secs(10);
        // Ours, at the default settings.
        let metrics = node_agent::agent::registry();
        let (_tx, rx) = tokio::sync::watch::channel(targets.clone());
        let cpu0 = cpu_seconds(&metrics);
        let task = rt.spawn(health::run(
            HealthConfig {
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(150),
                fall: 2,
                rise: 2,
                sweep_rate: 50,
                retry_rate: 200,
                max_in_flight: 256,
                quarantine: Duration::from_secs(10),
                syn_timeout: None,
            },
            rx,
            Arc::clone(&programmer),
            metrics.clone(),
        ));
        std::thread::sleep(window);
        task.abort();
        let cpu = cpu_seconds(&metrics) - cpu0;
        let probes: f64 = ["suspect", "down", "sweep"]
            .iter()
            .flat_map(|why| {
                ["ok", "fail", "inconclusive"].map(|r| metrics.value(health::m::PROBES, &[why, r]))
            })
            .sum();
        report.push_str(&format!(
            "| {count} | kernel evidence + sweep at 50/s (this design) | {:.0} | {:.1} |\n",
            probes / window.as_secs_f64(),
            cpu * 100.0 / window.as_secs_f64()
        ));
        // The previous design on the same backends.
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let cpu0 = cpu_seconds(&metrics);
        let task = rt.spawn(probe_everything(targets, Arc::clone(&done)));
        std::thread::sleep(window);
        task.abort();
        let cpu = cpu_seconds(&metrics) - cpu0;
        report.push_str(&format!(
            "| {count} | every backend every 200 ms (previous design, baseline) | {:.0} | {:.1} |\n",
            done.load(std::sync::atomic::Ordering::Relaxed) as f64 / window.as_secs_f64(),
            cpu * 100.0 / window.as_secs_f64()
        ));
    }
    print!("{report}");
    drop(programmer);
    let _ = datapath::remove(&pins);
    let _ = std::fs::remove_dir(&cgroup);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("datapath_cost.md"), &report);
    }
}
