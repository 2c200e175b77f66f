//! Socket-LB benchmarks:
//! - connect() latency through our socket-LB, kube-proxy's nftables mode (its verdict map:
//!   `ip daddr . meta l4proto . th dport vmap` → a chain per service → DNAT) and the
//!   kube-proxy-style iptables chain, at 1, 10,000 and 100,000 services. Each row runs in a
//!   fresh network namespace of its own (a child process), and every measurement is paired
//!   with its baseline in the same seconds: blocks of 100 connects alternate between the path
//!   and a direct connect to the backend. The tax on a connect to a non-service address is
//!   paired the same way: the path's hook present (our cgroup, the `OUTPUT` jump, the nft
//!   rule) against absent. The backlog is 4,096 and the listen overflows are reported (0: no
//!   SYN was retransmitted for want of room);
//! - map update throughput, single-element against batched;
//! - failover time with passive health: from a backend's death to the first connection
//!   answered by the next tier.
//!
//! Run (root): `cargo bench -p node-agent --bench socket_lb`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{listen_overflows, pcts};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node_agent::datapath::{self, Datapath};
use node_agent::maps::{Frontend, Proto};
use node_agent::program::{BackendSpec, DesiredService, Programmer};
use serde_json::{Value, json};

/// Blocks of `BLOCK` connects per condition, alternating.
const BLOCKS: usize = 30;
const BLOCK: usize = 100;
const COUNTS: [usize; 3] = [1, 10_000, 100_000];
const ROW_VAR: &str = "CMBENCH_ROW";

fn sh(cmd: &str) {
    let s = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(s.success(), "{cmd}");
}

fn listener(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || for _ in l.incoming() {});
    a
}

/// A backend with a 4,096 backlog that accepts and closes, on its own thread.
fn backend(ip: &str) -> SocketAddr {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let l = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
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

/// Alternating blocks: `on()` before each block of the path, `off()` before each baseline
/// block; returns (path latencies, baseline latencies), sorted.
fn paired(
    path: &[SocketAddr],
    base: SocketAddr,
    on: impl Fn(),
    off: impl Fn(),
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut k = 0usize;
    for _ in 0..BLOCKS {
        on();
        for _ in 0..BLOCK {
            k += 1;
            a.push(connect_once(path[(k * 7919) % path.len()]));
        }
        off();
        for _ in 0..BLOCK {
            b.push(connect_once(base));
        }
    }
    a.sort();
    b.sort();
    (a, b)
}

/// A backend that answers every connection with one tag byte, until stopped.
struct Tagged {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn tagged(l: TcpListener, tag: u8) -> Tagged {
    use std::sync::atomic::{AtomicBool, Ordering};
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = std::io::Write::write_all(&mut s, &[tag]);
                }
                Err(_) => std::thread::sleep(Duration::from_micros(100)),
            }
        }
    });
    Tagged {
        addr,
        stop,
        thread: Some(thread),
    }
}

impl Tagged {
    /// Closes the listening socket (the backend "dies").
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vip(i: usize) -> SocketAddr {
    SocketAddr::from((
        [
            127,
            200 + (i / 62_500) as u8,
            (i / 250 % 250) as u8,
            (i % 250 + 1) as u8,
        ],
        80,
    ))
}

fn services(n: usize, backend: SocketAddr) -> Vec<DesiredService> {
    (0..n)
        .map(|i| DesiredService {
            frontend: Frontend {
                addr: vip(i),
                proto: Proto::Tcp,
            },
            service: None,
            tiers: [
                vec![BackendSpec {
                    addr: backend,
                    cluster_id: 1,
                    zone: 0,
                }],
                vec![],
            ],
            balancing: Default::default(),
        })
        .collect()
}

fn pipe_to(cmd: &str, args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{cmd} {args:?}");
}

/// kube-proxy's iptables mode in short: a chain of one DNAT rule per service, jumped to from
/// nat OUTPUT.
fn iptables_chain(n: usize, backend: SocketAddr) {
    let mut rules = String::from("*nat\n:CMBENCH - [0:0]\n");
    for i in 0..n {
        rules.push_str(&format!(
            "-A CMBENCH -d {}/32 -p tcp --dport 80 -j DNAT --to-destination {backend}\n",
            vip(i).ip()
        ));
    }
    rules.push_str("-A OUTPUT -j CMBENCH\nCOMMIT\n");
    pipe_to("iptables-restore", &["--noflush"], &rules);
}

/// kube-proxy's nftables mode: a verdict map from address, protocol and port to a chain per
/// service that DNATs.
fn nft_ruleset(n: usize, backend: SocketAddr) {
    let mut r = String::from("table ip cmbench {\n");
    for i in 0..n {
        r.push_str(&format!(
            "  chain svc{i} {{\n    meta l4proto tcp dnat to {backend}\n  }}\n"
        ));
    }
    r.push_str("  map svcs {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if n > 0 {
        r.push_str("    elements = {\n");
        for i in 0..n {
            r.push_str(&format!(
                "      {} . tcp . 80 : goto svc{i},\n",
                vip(i).ip()
            ));
        }
        r.push_str("    }\n");
    }
    r.push_str("  }\n  chain output {\n    type nat hook output priority -100; policy accept;\n    ip daddr . meta l4proto . th dport vmap @svcs\n  }\n}\n");
    pipe_to("nft", &["-f", "-"], &r);
}

/// One row, inside its own fresh namespace: prints one JSON line.
fn run_row(kind: &str, n: usize) {
    let backend = backend("127.0.1.1");
    let vips: Vec<SocketAddr> = (0..n.max(1)).map(vip).collect();
    let setup = Instant::now();
    let (path, tax) = match kind {
        "direct" => (
            paired(&[backend], backend, || {}, || {}),
            (Vec::new(), Vec::new()),
        ),
        "iptables" => {
            iptables_chain(n, backend);
            // The hook: nat OUTPUT's jump to the chain, present for the path, absent for the
            // baseline blocks.
            let on = || {
                sh(
                    "iptables -t nat -C OUTPUT -j CMBENCH 2>/dev/null || iptables -t nat -A OUTPUT -j CMBENCH",
                )
            };
            let off = || sh("iptables -t nat -D OUTPUT -j CMBENCH");
            let path = paired(&vips, backend, on, off);
            let tax = paired(&[backend], backend, on, off);
            (path, tax)
        }
        "nft" => {
            nft_ruleset(n, backend);
            // The hook: the output chain's verdict-map rule.
            let rule =
                "nft add rule ip cmbench output ip daddr . meta l4proto . th dport vmap @svcs";
            let on = || {
                sh(&format!(
                    "nft list chain ip cmbench output | grep -q vmap || {rule}"
                ))
            };
            let off = || sh("nft flush chain ip cmbench output");
            let path = paired(&vips, backend, on, off);
            let tax = paired(&[backend], backend, on, off);
            (path, tax)
        }
        "ours" => {
            let name = test_support::unique_name("cmrow");
            let cgroup = Path::new("/sys/fs/cgroup/unified").join(&name);
            let pins = Path::new("/sys/fs/bpf").join(&name);
            std::fs::create_dir_all(&cgroup).unwrap();
            let sizes = node_agent::maps::Sizes {
                services: (n.max(1) as u32).next_power_of_two().max(1024),
            };
            let mut p =
                Programmer::new(Datapath::open_sized(&pins, &cgroup, sizes).unwrap()).unwrap();
            assert!(p.apply(&services(n, backend)).unwrap().refused.is_empty());
            let join = |cg: &Path| {
                std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap()
            };
            let root = Path::new("/sys/fs/cgroup/unified");
            let path = paired(&vips, backend, || join(&cgroup), || join(root));
            let tax = paired(&[backend], backend, || join(&cgroup), || join(root));
            join(root);
            drop(p);
            let _ = datapath::remove(&pins);
            let _ = std::fs::remove_dir(&cgroup);
            (path, tax)
        }
        other => panic!("unknown row {other}"),
    };
    let row = json!({
        "kind": kind,
        "services": n,
        "setup_s": setup.elapsed().as_secs_f64(),
        "path": pcts(&path.0),
        "direct": pcts(&path.1),
        "tax_on": if tax.0.is_empty() { Value::Null } else { pcts(&tax.0) },
        "tax_off": if tax.1.is_empty() { Value::Null } else { pcts(&tax.1) },
        "listen_overflows": listen_overflows(),
    });
    println!("{row}");
}

/// Runs `kind`/`n` in a fresh namespace (a child process) and returns its JSON line.
fn row_in_fresh_netns(kind: &str, n: usize) -> Value {
    let ns = test_support::unique_name("cmrow");
    sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(std::env::current_exe().unwrap())
        .env(ROW_VAR, format!("{kind}:{n}"))
        .env("CLUSTERMESH_BENCH_NETNS", &ns)
        .output()
        .unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(
        out.status.success(),
        "row {kind} {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn main() {
    if let Ok(row) = std::env::var(ROW_VAR) {
        let (kind, n) = row.split_once(':').unwrap();
        run_row(kind, n.parse().unwrap());
        return;
    }
    // Everything in a namespace of its own; each row in a fresh one below it.
    let name = test_support::reexec_in_private_netns("cmbench");
    let mut report =
        String::from("## Socket-LB: connect() through each path, paired with a direct connect\n\n");
    report.push_str(&format!("Each row in a fresh network namespace; {BLOCKS} blocks of {BLOCK} sequential connect()+close through the path, alternating with blocks of direct connects to the backend (the baseline, same seconds). TCP over loopback, backlog 4,096. µs p50 / p90 / p99; ratio = path p50 / direct p50. Tax: a connect to a non-service address with the path's hook present against absent, paired the same way.\n\n"));
    report.push_str("| path | services | path µs | direct µs (same seconds) | ratio | non-service connect: hook on / off µs | tax ratio | listen overflows |\n|---|---|---|---|---|---|---|---|\n");
    let mut rows = vec![("direct", 0)];
    for n in COUNTS {
        for kind in ["iptables", "nft", "ours"] {
            rows.push((kind, n));
        }
    }
    for (kind, n) in rows {
        let r = row_in_fresh_netns(kind, n);
        let f = |v: &Value| -> String {
            if v.is_null() {
                return "-".into();
            }
            let a: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| format!("{:.1}", x.as_f64().unwrap()))
                .collect();
            a.join(" / ")
        };
        let p50 = |v: &Value| v[0].as_f64().unwrap_or(f64::NAN);
        let label = match kind {
            "direct" => "direct against direct (noise floor)",
            "iptables" => "iptables DNAT chain (kube-proxy iptables)",
            "nft" => "nftables verdict map (kube-proxy nftables)",
            _ => "clustermesh socket-LB",
        };
        let line = format!(
            "| {label} | {n} | {} | {} | {:.2}× | {} / {} | {} | {} |\n",
            f(&r["path"]),
            f(&r["direct"]),
            p50(&r["path"]) / p50(&r["direct"]),
            f(&r["tax_on"]),
            f(&r["tax_off"]),
            if r["tax_on"].is_null() {
                "-".into()
            } else {
                format!("{:.2}×", p50(&r["tax_on"]) / p50(&r["tax_off"]))
            },
            r["listen_overflows"]
        );

        report.push_str(&line);
    }

    let cgroup = Path::new("/sys/fs/cgroup/unified").join(&name);
    let pins = Path::new("/sys/fs/bpf").join(&name);
    std::fs::create_dir_all(&cgroup).unwrap();
    let backend = listener("127.0.1.1");
    let dp = Datapath::open(&pins, &cgroup).unwrap();
    let mut p = Programmer::new(dp).unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    // Map update throughput: 10,000 services (20,001 entries) into empty maps, one syscall per
    // element against one batch per map and phase; best of three each.
    let mut update_rows = String::new();
    let big = services(10_000, backend);
    for batching in [false, true] {
        let mut best = Duration::MAX;
        let mut writes = 0;
        for _ in 0..3 {
            p.apply(&[]).unwrap();
            p.set_batching(batching);
            let t0 = Instant::now();
            writes = p.apply(&big).unwrap().writes;
            best = best.min(t0.elapsed());
        }
        update_rows.push_str(&format!(
            "- Map updates, {}: {writes} entries for 10,000 services in {:.1} ms = {:.0} updates/s\n",
            if batching { "batched (BPF_MAP_UPDATE_BATCH)" } else { "single-element" },
            best.as_secs_f64() * 1e3,
            writes as f64 / best.as_secs_f64()
        ));
    }
    p.apply(&[]).unwrap();

    // Failover: the local backend dies (connections refused); the kernel's passive health
    // skips it from the next connect; the first connection answered by the remote tier ends
    // the measurement.
    let local_addr: SocketAddr = {
        let l = TcpListener::bind("127.0.1.2:0").unwrap();
        l.local_addr().unwrap()
    };
    let remote_tagged = tagged(TcpListener::bind("127.0.2.2:0").unwrap(), b'R');
    let remote_addr = remote_tagged.addr;
    let mut local = tagged(TcpListener::bind(local_addr).unwrap(), b'L');
    let svc = vec![DesiredService {
        frontend: Frontend {
            addr: vip(20_000),
            proto: Proto::Tcp,
        },
        service: None,
        tiers: [
            vec![BackendSpec {
                addr: local_addr,
                cluster_id: 1,
                zone: 0,
            }],
            vec![BackendSpec {
                addr: remote_addr,
                cluster_id: 2,
                zone: 0,
            }],
        ],
        balancing: Default::default(),
    }];
    p.apply(&svc).unwrap();
    let programmer = Arc::new(Mutex::new(p));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(vec![local_addr, remote_addr]);
    let health = rt.spawn(node_agent::health::run(
        node_agent::agent::HealthConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            fall: 2,
            rise: 2,
            sweep_rate: 50,
            retry_rate: 200,
            max_in_flight: 64,
            quarantine: Duration::from_secs(10),
            syn_timeout: None,
        },
        rx,
        Arc::clone(&programmer),
        node_agent::agent::registry(),
    ));
    let who = || -> Option<u8> {
        let mut s = TcpStream::connect_timeout(&vip(20_000), Duration::from_millis(200)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut b).ok()?;
        Some(b[0])
    };
    let mut failovers = Vec::new();
    for _ in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while who() != Some(b'L') {
            assert!(Instant::now() < deadline, "local backend not serving");
            std::thread::sleep(Duration::from_millis(10));
        }
        local.stop();
        let killed = Instant::now();
        let mut failures = 0;
        let first_remote = loop {
            match who() {
                Some(b'R') => break killed.elapsed(),
                _ => failures += 1,
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        failovers.push((first_remote, failures));
        local = tagged(TcpListener::bind(local_addr).unwrap(), b'L');
    }
    health.abort();
    drop(tx);
    let mut f: Vec<Duration> = failovers.iter().map(|(d, _)| *d).collect();
    f.sort();
    let failed: usize = failovers.iter().map(|(_, n)| n).sum();
    report.push('\n');
    report.push_str(&update_rows);
    report.push_str(&format!(
        "- Failover (backend death → first successful connection to the next tier), passive health in the kernel: median {:.1} ms, worst {:.1} ms over {} kills; {failed} connection attempts failed in all (a client retrying every 1 ms)\n",
        f[f.len() / 2].as_secs_f64() * 1e3,
        f[f.len() - 1].as_secs_f64() * 1e3,
        f.len()
    ));
    print!("{report}");
    drop(programmer);
    let _ = datapath::remove(&pins);
    // Leave the cgroup before removing it.
    let _ = std::fs::write(
        "/sys/fs/cgroup/unified/cgroup.procs",
        std::process::id().to_string(),
    );
    let _ = std::fs::remove_dir(&cgroup);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("socket_lb.md"), &report);
    }
}
