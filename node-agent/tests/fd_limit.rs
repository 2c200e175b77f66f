//! A probe that cannot run is no verdict: 10,000 live backends probed with the file descriptor
//! soft limit at 1,024 and more probes in flight than that allows. The probes that hit EMFILE
//! are counted as inconclusive; no live backend is marked suspect or down.
//!
//! Its own test binary: it lowers the process's fd limit. Needs root and bpffs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Node;
use node_agent::health::{self, HealthConfig};
use node_agent::maps::{Frontend, Proto};
use node_agent::program::{BackendSpec, DesiredService};

/// 10,000 listeners (40 addresses × 250 ports) in one child process, killed on drop.
struct Listeners(std::process::Child);

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SCRIPT: &str = r#"
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
base = int(sys.argv[1])
sel = selectors.DefaultSelector()
for a in range(40):
    for p in range(250):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.%d.%d" % (160 + a // 200, 1 + a % 200), base + p))
        s.listen(4096)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            c, _ = key.fileobj.accept()
            c.close()
        except OSError:
            pass
"#;

#[test]
fn ten_thousand_live_backends_at_an_fd_limit_of_1024_stay_healthy() {
    let node = Node::new();
    let base = 30_000u16;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT, &base.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _listeners = Listeners(child);
    assert_eq!(line.trim(), "ready", "listeners did not start");
    let addrs: Vec<SocketAddr> = (0..40u16)
        .flat_map(|a| {
            (0..250u16).map(move |p| {
                SocketAddr::from((
                    [127, 0, (160 + a / 200) as u8, (1 + a % 200) as u8],
                    base + p,
                ))
            })
        })
        .collect();
    let mut p = node.open();
    let desired: Vec<DesiredService> = addrs
        .chunks(250)
        .enumerate()
        .map(|(i, chunk)| DesiredService {
            frontend: Frontend {
                addr: SocketAddr::from(([127, 100, 20, i as u8 + 1], 80)),
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
            balancing: Default::default(),
        })
        .collect();
    let ops = p.apply(&desired).unwrap();
    assert!(ops.refused.is_empty());
    let targets = p.backends_of(Proto::Tcp);
    assert_eq!(targets.len(), 10_000);

    // The common default soft limit; the probes in flight may go past it.
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1024),
            maximum: rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum,
        },
    )
    .unwrap();
    let programmer = Arc::new(Mutex::new(p));
    let metrics = node_agent::agent::registry();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A process near its limit, as a busy agent would be: all but 16 descriptors taken, so
    // that the probes in flight run out of them.
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        held.push(f);
    }
    held.truncate(held.len().saturating_sub(16));
    let (_tx, rx) = tokio::sync::watch::channel(targets.clone());
    let task = rt.spawn(health::run(
        HealthConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            fall: 2,
            rise: 2,
            // Every backend swept about twice in 4 s, 3,000 probes in flight at most.
            sweep_rate: 5_000,
            retry_rate: 200,
            max_in_flight: 3_000,
            quarantine: Duration::from_secs(10),
            syn_timeout: None,
        },
        rx,
        Arc::clone(&programmer),
        metrics.clone(),
    ));
    let probes = |result: &str| -> f64 {
        ["suspect", "down", "sweep"]
            .iter()
            .map(|why| metrics.value(health::m::PROBES, &[why, result]))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while probes("ok") + probes("inconclusive") < 20_000.0 {
        assert!(Instant::now() < deadline, "the sweep did not get through");
        std::thread::sleep(Duration::from_millis(100));
    }
    task.abort();
    drop(held);
    let (ok, inconclusive, fail) = (probes("ok"), probes("inconclusive"), probes("fail"));
    println!("probes: {ok} ok, {inconclusive} inconclusive (no fd), {fail} failed");
    assert!(
        inconclusive > 0.0,
        "the fd limit was never hit: the test proves nothing"
    );
    let p = programmer.lock().unwrap();
    let now = node_agent::maps::monotonic_ns();
    let bad: Vec<SocketAddr> = targets
        .iter()
        .filter(|a| {
            let b = p.backend(**a).unwrap();
            !b.healthy || b.suspect_at(now)
        })
        .copied()
        .collect();
    assert!(
        bad.is_empty(),
        "{} live backends marked suspect or down: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}
