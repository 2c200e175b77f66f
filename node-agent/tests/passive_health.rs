//! Health from the kernel (ADR 0018), in the real kernel: the sock_ops program marks a backend
//! suspect the moment a translated connection to it is refused or its SYN goes unanswered, and
//! the connect hook skips it from the very next connect(), with no agent involved. Also: the
//! per-socket translation lives in socket storage, so TCP connects leave nothing behind in
//! the reverse-NAT map, and unconnected UDP's entries go with the socket.
//!
//! Needs root and bpffs (scripts/setup.sh mounts it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BackendProcess, Node, backend, counts, free_port, run, spec};
use node_agent::maps::{self, Config, Frontend, HealthReason, Proto};
use node_agent::program::{BackendSpec, DesiredService, Programmer};
use serde_json::Value;

/// A plain (unweighted, all-or-nothing) service at `vip` with `proto`.
fn svc(vip: &str, proto: Proto, tiers: [Vec<BackendSpec>; 2]) -> DesiredService {
    DesiredService {
        frontend: Frontend {
            addr: vip.parse().unwrap(),
            proto,
        },
        service: None,
        tiers,
        balancing: Default::default(),
    }
}

fn stat(p: &Programmer, name: &str) -> u64 {
    p.datapath()
        .stats()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

/// Drains the health ring: (address, reason) of each event.
fn events(p: &mut Programmer) -> Vec<(SocketAddr, HealthReason)> {
    let ring = p.datapath_mut().events.as_mut().unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let ev = maps::parse_health_event(&item).expect("a well-formed event");
        out.push((ev.addr, ev.reason));
    }
    out
}

/// Waits until `f` holds, or fails after `secs`.
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backend process is killed (connections refused): each client node loses at most one
/// connection per dead backend, and every later connection reaches a live one; the kernel
/// reports each suspicion once; a connection that succeeds after the quarantine clears it.
#[test]
fn a_refused_backend_is_skipped_from_the_next_connect() {
    let node = Node::new();
    let mut p = node.open();
    p.datapath_mut()
        .set_config(&Config {
            quarantine_ns: 60_000_000_000,
            syn_rto_jiffies: 0,
            flags: 0,
        })
        .unwrap();
    let (a1, a2) = (
        SocketAddr::from(([127, 0, 1, 21], free_port())),
        SocketAddr::from(([127, 0, 1, 22], free_port())),
    );
    let local1 = BackendProcess::start("local-1", a1);
    let local2 = BackendProcess::start("local-2", a2);
    let r1 = backend("remote-1", "127.0.2.21");
    let vip = "127.100.5.1:80";
    p.apply(&[svc(
        vip,
        Proto::Tcp,
        [vec![spec(a1, 1), spec(a2, 1)], vec![spec(r1, 2)]],
    )])
    .unwrap();
    let warm = node.client(true, "tcp", vip.parse().unwrap(), 50);
    assert_eq!(warm["failures"], 0, "{warm}");
    assert_eq!(counts(&warm).len(), 2, "both local backends serve: {warm}");

    // One local backend dies: at most one connection fails, the other local one takes over.
    drop(local1);
    let one_dead = node.client(true, "tcp", vip.parse().unwrap(), 300);
    println!("one local backend dead, 300 connects: {one_dead}");
    assert!(one_dead["failures"].as_u64().unwrap() <= 1, "{one_dead}");
    assert_eq!(
        counts(&one_dead).keys().collect::<Vec<_>>(),
        vec!["local-2"],
        "{one_dead}"
    );
    let b1 = p.backend(a1).unwrap();
    assert!(
        b1.suspect_at(maps::monotonic_ns()),
        "the kernel marked it suspect"
    );
    assert!(
        b1.healthy,
        "the agent's own state is untouched: this is the kernel alone"
    );
    assert_eq!(stat(&p, "suspects_marked"), 1);

    // Both die: the remote tier serves, at most one more failure (for the second backend).
    drop(local2);
    let both_dead = node.client(true, "tcp", vip.parse().unwrap(), 300);
    println!("both local backends dead, 300 connects: {both_dead}");
    assert!(both_dead["failures"].as_u64().unwrap() <= 1, "{both_dead}");
    assert_eq!(
        counts(&both_dead).keys().collect::<Vec<_>>(),
        vec!["remote-1"],
        "{both_dead}"
    );
    let evs = events(&mut p);
    assert_eq!(
        evs,
        vec![(a1, HealthReason::Refused), (a2, HealthReason::Refused)],
        "one event per suspicion"
    );
    // /state names the source: passive (the kernel), not a probe.
    let state = node_agent::agent::node_state_at(
        "east".into(),
        None,
        p.programmed().unwrap(),
        &[],
        &p.shares(),
        maps::monotonic_ns(),
    );
    let local_tier = &state.services[0].programmed[0];
    assert!(
        local_tier
            .iter()
            .all(|b| b.health_source() == Some("passive")),
        "{local_tier:?}"
    );
    assert_eq!(state.services[0].programmed[1][0].health_source(), None);

    // A re-programmed service keeps the kernel's suspicion (apply does not clear it).
    let ops = p
        .apply(&[svc(
            vip,
            Proto::Tcp,
            [vec![spec(a1, 1), spec(a2, 1)], vec![spec(r1, 2)]],
        )])
        .unwrap();
    assert_eq!(ops.writes, 0, "{ops:?}");
    assert!(p.backend(a2).unwrap().suspect_at(maps::monotonic_ns()));

    // local-1 comes back; once its quarantine is over a connection reaches it and that
    // success clears the suspicion in the kernel.
    let _back = BackendProcess::start("local-1", a1);
    p.set_suspect(a1, maps::monotonic_ns()).unwrap();
    wait_for("a connection to local-1 after its quarantine", 20, || {
        let run = node.client(true, "tcp", vip.parse().unwrap(), 20);
        counts(&run).contains_key("local-1")
    });
    assert_eq!(
        p.backend(a1).unwrap().suspect_until_ns,
        0,
        "cleared by success"
    );
    assert_eq!(stat(&p, "suspects_cleared_by_traffic"), 1);
    assert!(events(&mut p).contains(&(a1, HealthReason::Established)));
    // A re-probe by the agent would do the same for local-2 (set_health(true) clears).
    assert!(!p.set_health(a2, true).unwrap(), "it was never marked down");
    p.set_suspect(a2, 0).unwrap();
    assert_eq!(p.backend(a2).unwrap().suspect_until_ns, 0);
}

/// A network namespace with its loopback up, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = test_support::unique_name("cmbh");
        run(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Self(name)
    }

    fn exec(&self, cmd: &str) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.0))
            .args(["sh", "-c", cmd])
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Listeners answering with their name, in `ns`, as one process killed on drop.
struct Listeners(std::process::Child);

impl Listeners {
    fn start(ns: &Netns, list: &[(&str, SocketAddr)]) -> Self {
        use std::io::BufRead;
        let script = r#"
import socket, sys, threading
def serve(name, ip, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port)); s.listen(1024)
    ready.release()
    while True:
        c, _ = s.accept()
        try: c.sendall((name + "\n").encode())
        finally: c.close()
args = sys.argv[1:]
ready = threading.Semaphore(0)
for i in range(0, len(args), 3):
    threading.Thread(target=serve, args=(args[i], args[i+1], int(args[i+2])), daemon=True).start()
for _ in range(len(args) // 3): ready.acquire()
print("ready", flush=True)
threading.Event().wait()
"#;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.0))
            .args(["python3", "-c", script]);
        for (name, a) in list {
            cmd.args([(*name).to_owned(), a.ip().to_string(), a.port().to_string()]);
        }
        let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Self(child)
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend whose SYNs are dropped (a blackhole, as when its cluster's network dies): one
/// connection is stuck, the kernel marks the backend suspect when that SYN's first
/// retransmission timeout fires (shortened for translated connects by TIMEOUT_INIT), and every
/// later connection is served elsewhere.
#[test]
fn a_blackholed_backend_is_skipped_after_its_first_syn_timeout() {
    let node = Node::new();
    let ns = Netns::new();
    let mut p = node.open();
    p.datapath_mut()
        .set_config(&Config {
            quarantine_ns: 60_000_000_000,
            syn_rto_jiffies: node_agent::health::syn_rto_jiffies(Duration::from_millis(100)),
            flags: 0,
        })
        .unwrap();
    let port = 18_080;
    let (dark, lit) = (
        SocketAddr::from(([127, 0, 1, 31], port)),
        SocketAddr::from(([127, 0, 1, 32], port)),
    );
    let _servers = Listeners::start(&ns, &[("dark", dark), ("lit", lit)]);
    let vip = "127.100.6.1:80";
    p.apply(&[svc(
        vip,
        Proto::Tcp,
        [vec![spec(dark, 1), spec(lit, 1)], vec![]],
    )])
    .unwrap();
    // The rule lives in the test's own namespace and goes with it.
    let drop_syns = ns.exec(&format!(
        "iptables -A OUTPUT -d {} -p tcp --dport {port} --syn -j DROP",
        dark.ip()
    ));
    assert!(
        drop_syns.status.success(),
        "{}",
        String::from_utf8_lossy(&drop_syns.stderr)
    );
    // 60 sequential connects, each allowed 1 s: a stuck one costs its timeout.
    let client = format!(
        "echo $$ > {}/cgroup.procs && exec python3 {} tcp 127.100.6.1 80 60",
        node.cgroup.display(),
        node.script.path().display()
    );
    let started = Instant::now();
    let started_ns = maps::monotonic_ns();
    let out = ns.exec(&client);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("blackholed backend, 60 connects: {run} in {took:?}");
    assert!(run["failures"].as_u64().unwrap() <= 1, "{run}");
    assert_eq!(
        counts(&run).get("lit"),
        Some(&(60 - run["failures"].as_u64().unwrap()))
    );
    let ring = p.datapath_mut().events.as_mut().unwrap();
    let first = ring
        .next()
        .and_then(|item| maps::parse_health_event(&item))
        .expect("an event");
    println!(
        "blackholed backend suspect {:.0} ms after the client process started (SYN timeout 100 ms, python start-up included)",
        (first.ts_ns - started_ns) as f64 / 1e6
    );
    assert_eq!((first.addr, first.reason), (dark, HealthReason::SynTimeout));
    assert!(p.backend(dark).unwrap().suspect_at(maps::monotonic_ns()));
    assert_eq!(stat(&p, "suspects_marked"), 1);
}

/// TCP connects leave nothing in the reverse-NAT map (the translation lives in socket storage
/// and goes with the socket); unconnected UDP writes it and sock_release removes it.
#[test]
fn the_reverse_nat_map_does_not_grow_with_connections() {
    let node = Node::new();
    let mut p = node.open();
    let b = backend("only", "127.0.1.41");
    let vip = "127.100.7.1:80";
    let udp_vip = format!("127.100.7.2:{}", b.port());
    p.apply(&[
        svc(vip, Proto::Tcp, [vec![spec(b, 1)], vec![]]),
        svc(&udp_vip, Proto::Udp, [vec![spec(b, 1)], vec![]]),
    ])
    .unwrap();
    let tcp_run = node.client(true, "tcp", vip.parse().unwrap(), 2000);
    assert_eq!(tcp_run["failures"], 0);
    assert_eq!(tcp_run["sources"], serde_json::json!([vip]), "getpeername");
    assert_eq!(
        p.datapath().revnat_entries().unwrap(),
        0,
        "2,000 TCP connects wrote no reverse-NAT entry"
    );
    let udp_run = node.client(true, "udp", udp_vip.parse().unwrap(), 200);
    assert_eq!(udp_run["failures"], 0, "{udp_run}");
    assert_eq!(udp_run["sources"], serde_json::json!([udp_vip]), "recvmsg");
    assert_eq!(
        p.datapath().revnat_entries().unwrap(),
        0,
        "each UDP socket's entry went with it"
    );
}

/// With `--tcp-peer-rewrite=false` TCP sockets keep no per-socket state: `getpeername()` shows
/// the backend, and passive health works the same (sock_ops finds the backend by the
/// connection's address). UDP replies are still reverse-translated.
#[test]
fn without_per_socket_state_passive_health_works_and_getpeername_shows_the_backend() {
    let node = Node::new();
    let mut p = node.open();
    p.datapath_mut()
        .update_config(|c| {
            c.quarantine_ns = 60_000_000_000;
            c.flags |= maps::CFG_NO_PEER_REWRITE;
        })
        .unwrap();
    let (a1, a2) = (
        SocketAddr::from(([127, 0, 1, 81], free_port())),
        SocketAddr::from(([127, 0, 1, 82], free_port())),
    );
    let local1 = BackendProcess::start("local-1", a1);
    let _local2 = BackendProcess::start("local-2", a2);
    let udp = backend("udp", "127.0.1.83");
    let vip = "127.100.10.1:80";
    let udp_vip = format!("127.100.10.2:{}", udp.port());
    p.apply(&[
        svc(vip, Proto::Tcp, [vec![spec(a1, 1), spec(a2, 1)], vec![]]),
        svc(&udp_vip, Proto::Udp, [vec![spec(udp, 1)], vec![]]),
    ])
    .unwrap();
    let run = node.client(true, "tcp", vip.parse().unwrap(), 50);
    assert_eq!(run["failures"], 0, "{run}");
    let mut backends = vec![a1.to_string(), a2.to_string()];
    backends.sort();
    assert_eq!(
        run["sources"],
        serde_json::json!(backends),
        "the backends, not {vip}"
    );
    let udp_run = node.client(true, "udp", udp_vip.parse().unwrap(), 10);
    assert_eq!(
        udp_run["sources"],
        serde_json::json!([udp_vip]),
        "{udp_run}"
    );
    drop(local1);
    let one_dead = node.client(true, "tcp", vip.parse().unwrap(), 300);
    println!("no per-socket state, one backend dead, 300 connects: {one_dead}");
    assert!(one_dead["failures"].as_u64().unwrap() <= 1, "{one_dead}");
    assert_eq!(
        counts(&one_dead).keys().collect::<Vec<_>>(),
        vec!["local-2"]
    );
    assert!(p.backend(a1).unwrap().suspect_at(maps::monotonic_ns()));
}
