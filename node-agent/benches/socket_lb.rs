//! Socket-LB benchmarks, in a network namespace of their own (re-executed under
//! `nsenter --net`, so bpffs and cgroupfs stay visible):
//! - connect() latency and rate through our socket-LB with 1, 1,000 and 10,000 services,
//!   against a direct connect and against a kube-proxy-style iptables DNAT chain with the
//!   same numbers of services;
//! - map update throughput (single-element updates; aya 0.14 exposes no batch operations);
//! - failover time: from a backend's death to the first successful connection to the next
//!   tier, with the agent's health checks (100 ms interval, 2 failures).
//!
//! Run (root): `cargo bench -p node-agent --bench socket_lb`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node_agent::datapath::{self, Datapath};
use node_agent::maps::{Frontend, Proto};
use node_agent::program::{BackendSpec, DesiredService, Programmer};

const SAMPLES: usize = 3000;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    test_support::percentile(sorted, p)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

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

/// connect() + close to `targets` (round robin), `SAMPLES` times; returns (sorted latencies,
/// connects per second).
fn measure(targets: &[SocketAddr]) -> (Vec<Duration>, f64) {
    let mut lat = Vec::with_capacity(SAMPLES);
    let started = Instant::now();
    for i in 0..SAMPLES {
        let t = targets[(i * 7919) % targets.len()];
        let t0 = Instant::now();
        let s = TcpStream::connect_timeout(&t, Duration::from_secs(2)).unwrap();
        lat.push(t0.elapsed());
        drop(s);
    }
    let rate = SAMPLES as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    (lat, rate)
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
    SocketAddr::from(([127, 200, (i / 250) as u8, (i % 250 + 1) as u8], 80))
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

fn iptables_chain(n: usize, backend: SocketAddr) {
    let mut rules = String::from("*nat\n:CMBENCH - [0:0]\n");
    for i in 0..n {
        let v = vip(i);
        rules.push_str(&format!(
            "-A CMBENCH -d {}/32 -p tcp --dport 80 -j DNAT --to-destination {backend}\n",
            v.ip()
        ));
    }
    rules.push_str("COMMIT\n");
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    sh("iptables -t nat -C OUTPUT -j CMBENCH 2>/dev/null || iptables -t nat -A OUTPUT -j CMBENCH");
}

fn iptables_clear() {
    let _ = Command::new("sh").arg("-c").arg("iptables -t nat -D OUTPUT -j CMBENCH; iptables -t nat -F CMBENCH; iptables -t nat -X CMBENCH").status();
}

fn main() {
    // Runs again inside a fresh network namespace; iptables rules and addresses stay there.
    let name = test_support::reexec_in_private_netns("cmbench");
    let cgroup = Path::new("/sys/fs/cgroup/unified").join(&name);
    let pins = Path::new("/sys/fs/bpf").join(&name);
    std::fs::create_dir_all(&cgroup).unwrap();
    let backend = listener("127.0.1.1");
    let mut report = String::from("## Socket-LB: connect() through the datapath\n\n");
    report.push_str(&format!("{SAMPLES} sequential connect()+close per row, TCP over loopback in a private network namespace; the VIP (127.200.0.0/16) rewritten to one backend. Latency of connect() only.\n\n"));
    report.push_str(
        "| path | services | p50 µs | p90 µs | p99 µs | connects/s |\n|---|---|---|---|---|---|\n",
    );
    let row = |r: &mut String, path: &str, n: usize, (lat, rate): (Vec<Duration>, f64)| {
        r.push_str(&format!(
            "| {path} | {n} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
            us(pct(&lat, 0.5)),
            us(pct(&lat, 0.9)),
            us(pct(&lat, 0.99)),
            rate
        ));
    };

    // Direct, then iptables DNAT chains (before joining the cgroup).
    row(
        &mut report,
        "direct connect to the backend (baseline)",
        0,
        measure(&[backend]),
    );
    for n in [1, 1000, 10_000] {
        iptables_chain(n, backend);
        let targets: Vec<SocketAddr> = (0..n).map(vip).collect();
        row(
            &mut report,
            "iptables DNAT chain (kube-proxy style)",
            n,
            measure(&targets),
        );
        iptables_clear();
    }

    // Ours: program n services, then connect from inside the cgroup.
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
    for n in [1, 1000, 10_000] {
        p.apply(&services(n, backend)).unwrap();
        let targets: Vec<SocketAddr> = (0..n).map(vip).collect();
        row(
            &mut report,
            "clustermesh socket-LB (connect4)",
            n,
            measure(&targets),
        );
    }

    // Failover: the local backend dies; health checks (100 ms, fall 2) flip it; the first
    // connection answered by the remote tier ends the measurement.
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
        "- Failover (backend death → first successful connection to the next tier), health checks every 100 ms, 2 failures: median {:.0} ms, worst {:.0} ms over {} kills; {failed} connection attempts failed in the detection windows (a client retrying every 1 ms)\n",
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
