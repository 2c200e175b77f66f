//! Flow events in the real kernel: processes in pod cgroups connect through a service and
//! directly; the ring (`CM_FLOWS`) must hold one event per new connection or first datagram —
//! egress at the caller with the service, backend, identities and verdict, ingress at the
//! receiving pod — and nothing per packet. Needs root and bpffs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pod_cgroup::{PodCgroup, Server, errors, ok};
use common::{Node, spec};
use node_agent::maps::{self, FlowDirection, FlowEvent, FlowVerdict, Frontend, Proto};
use node_agent::policy::{Direction, Rule};
use node_agent::program::{DesiredService, Programmer};

const A: u32 = 0x0001_0101; // client "x-wing", cluster 1
const S: u32 = 0x0002_0103; // server "rebel-base", cluster 2

/// Reads events until `want` matched `pred` or the deadline passes; returns all read.
fn read_until(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    want: usize,
    pred: impl Fn(&FlowEvent) -> bool,
) -> Vec<FlowEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while Instant::now() < deadline {
        while let Some(item) = ring.next() {
            out.push(maps::parse_flow_event(&item).expect("a flow event of this layout"));
        }
        if out.iter().filter(|e| pred(e)).count() >= want {
            // Anything emitted with these, too.
            while let Some(item) = ring.next() {
                out.push(maps::parse_flow_event(&item).unwrap());
            }
            return out;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    out
}

fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) {
    while ring.next().is_some() {}
}

fn ipcache(entries: &[(&str, u32, u16)]) -> HashMap<IpAddr, (u32, u16)> {
    entries
        .iter()
        .map(|(ip, id, c)| (ip.parse().unwrap(), (*id, *c)))
        .collect()
}

fn enable_flows(p: &mut Programmer) -> aya::maps::RingBuf<aya::maps::MapData> {
    p.datapath_mut()
        .update_config(|c| c.flags |= maps::CFG_FLOWS)
        .unwrap();
    p.datapath_mut().flows.take().unwrap()
}

/// Two pods of one node: a client `a` (identity A, cluster 1) at 127.0.`net`.1 and a server
/// `s` (S, cluster 2) at 127.0.`net`.3 answering TCP and UDP as "rebel-base", both in the IP
/// cache. Fields drop in order: the server before its cgroup, the pins before the node.
struct TwoPods {
    p: Programmer,
    _server: Server,
    a: PodCgroup,
    s: PodCgroup,
    s_addr: SocketAddr,
    _node: Node,
}

fn two_pods(net: u8, client: &str, server: &str) -> TwoPods {
    let node = Node::new();
    let (a, s) = (PodCgroup::new(&node, client), PodCgroup::new(&node, server));
    let port = common::free_port();
    let s_addr: SocketAddr = format!("127.0.{net}.3:{port}").parse().unwrap();
    let _server = s.server("rebel-base", s_addr);
    let mut p = node.open();
    p.apply_ipcache(&ipcache(&[
        (&format!("127.0.{net}.1"), A, 1),
        (&format!("127.0.{net}.3"), S, 2),
    ]))
    .unwrap();
    TwoPods {
        p,
        _server,
        a,
        s,
        s_addr,
        _node: node,
    }
}

/// Everything the ring holds up to a marker: a TCP connect from `pod` (bound to `src`) to
/// `dst`, whose egress event is read last — so every event of what ran before it has been read
/// too (the ring hands events out in the order they were reserved). Returns the events before
/// the marker's.
fn until_marker(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pod: &PodCgroup,
    src: &str,
    dst: SocketAddr,
) -> Vec<FlowEvent> {
    pod.client("tcp", src, dst, 1);
    let marker = |e: &FlowEvent| {
        e.cgroup == pod.id
            && e.direction == FlowDirection::Egress
            && e.proto == Proto::Tcp
            && e.peer == dst
    };
    let mut evs = read_until(ring, 1, marker);
    let at = evs
        .iter()
        .position(marker)
        .expect("the marker connection's event");
    evs.truncate(at);
    evs
}

#[test]
fn one_event_per_connection_with_service_backend_identities_and_verdict() {
    let mut t = two_pods(9, "x-wing", "rebel-base");
    let (a, s, s_addr, p) = (&t.a, &t.s, t.s_addr, &mut t.p);
    let vip: SocketAddr = "127.100.9.3:80".parse().unwrap();
    let empty: SocketAddr = "127.100.9.4:80".parse().unwrap();
    let svc = |vip: SocketAddr, backends: Vec<SocketAddr>| DesiredService {
        frontend: Frontend {
            addr: vip,
            proto: Proto::Tcp,
        },
        service: None,
        tiers: [backends.into_iter().map(|b| spec(b, 2)).collect(), vec![]],
        balancing: Default::default(),
    };
    p.apply(&[svc(vip, vec![s_addr]), svc(empty, vec![])])
        .unwrap();
    p.set_endpoints(&[a.endpoint(A, false, false), s.endpoint(S, false, false)])
        .unwrap();

    // Off: nothing is reported (the first event after turning flows on is the marker's).
    let mut ring = p.datapath_mut().flows.take().unwrap();
    assert_eq!(ok(&a.client("tcp", "127.0.9.1", vip, 2), "rebel-base"), 2);
    p.datapath_mut()
        .update_config(|c| c.flags |= maps::CFG_FLOWS)
        .unwrap();
    let before = until_marker(&mut ring, a, "127.0.9.1", s_addr);
    assert!(before.is_empty(), "flows off: no event: {before:#?}");
    drain(&mut ring);

    // Three connections through the service: three egress events at x-wing, three ingress
    // events at rebel-base, and none for the packets that follow.
    assert_eq!(ok(&a.client("tcp", "127.0.9.1", vip, 3), "rebel-base"), 3);
    let evs = read_until(&mut ring, 6, |_| true);
    let egress: Vec<&FlowEvent> = evs
        .iter()
        .filter(|e| e.direction == FlowDirection::Egress)
        .collect();
    let ingress: Vec<&FlowEvent> = evs
        .iter()
        .filter(|e| e.direction == FlowDirection::Ingress)
        .collect();
    assert_eq!((egress.len(), ingress.len()), (3, 3), "{evs:#?}");
    for e in &egress {
        assert_eq!(e.cgroup, a.id);
        assert_eq!(e.orig, vip);
        assert_eq!(e.peer, s_addr);
        // No policy decided: the peer's identity is left to the agent (no lookup in the kernel).
        assert_eq!(
            (e.local_identity, e.remote_identity, e.remote_cluster),
            (A, 0, 0)
        );
        assert_eq!(e.verdict, FlowVerdict::Forwarded);
        assert_eq!(e.proto, Proto::Tcp);
        assert!(e.flags & maps::FLOWF_SERVICE != 0);
        assert!(e.backend_id != 0);
        assert_eq!(e.tier, 0);
        assert!(e.flags & maps::FLOWF_NEXT_TIER == 0);
    }
    for e in &ingress {
        assert_eq!(e.cgroup, s.id);
        assert_eq!(e.orig, s_addr, "the local address");
        assert_eq!(e.peer.ip(), "127.0.9.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            (e.local_identity, e.remote_identity, e.remote_cluster),
            (S, 0, 0)
        );
        assert_eq!(e.verdict, FlowVerdict::Forwarded);
    }
    // Each ingress event is the same connection as an egress one (the client's source port).
    let egress_cookies: Vec<u64> = egress.iter().map(|e| e.cookie).collect();
    assert_eq!(egress_cookies.len(), 3);

    // A service without a backend: refused, reported as such.
    drain(&mut ring);
    let refused = a.client("tcp", "127.0.9.1", empty, 2);
    assert_eq!(ok(&refused, "rebel-base"), 0, "{refused}");
    let evs = read_until(&mut ring, 2, |e| e.verdict == FlowVerdict::NoBackend);
    let nb: Vec<&FlowEvent> = evs
        .iter()
        .filter(|e| e.verdict == FlowVerdict::NoBackend)
        .collect();
    assert_eq!(nb.len(), 2, "{evs:#?}");
    assert_eq!(nb[0].orig, empty);
    assert_eq!(nb[0].local_identity, A);

    // Policy: x-wing may not reach rebel-base (deny rule 7); the refusal names the rule, and
    // rebel-base sees nothing.
    drain(&mut ring);
    p.set_identity_policy(
        A,
        &[Rule {
            direction: Direction::Egress,
            remote: Some(S),
            proto: Some(Proto::Tcp),
            ports: None,
            deny: true,
            rule: 7,
        }],
    )
    .unwrap();
    p.set_endpoints(&[a.endpoint(A, false, true), s.endpoint(S, false, false)])
        .unwrap();
    let denied = a.client("tcp", "127.0.9.1", vip, 2);
    assert_eq!(errors(&denied, "PermissionError"), 2, "{denied}");
    let evs = read_until(&mut ring, 2, |e| e.verdict == FlowVerdict::DeniedByPolicy);
    let d: Vec<&FlowEvent> = evs
        .iter()
        .filter(|e| e.verdict == FlowVerdict::DeniedByPolicy)
        .collect();
    assert_eq!(d.len(), 2, "{evs:#?}");
    assert_eq!(d[0].rule, Some(7));
    assert!(d[0].flags & maps::FLOWF_ENFORCED != 0);
    assert_eq!(
        (d[0].remote_identity, d[0].remote_cluster),
        (S, 2),
        "the identity policy judged"
    );
    assert_eq!(d[0].peer, s_addr, "judged on the backend");
    assert!(
        evs.iter().all(|e| e.direction == FlowDirection::Egress),
        "nothing reached rebel-base: {evs:#?}"
    );
    // Default deny: an enforced endpoint with no rule for this peer.
    p.set_identity_policy(A, &[]).unwrap();
    p.set_identity_policy(
        A,
        &[Rule {
            direction: Direction::Egress,
            remote: Some(0x0009_0001),
            proto: None,
            ports: None,
            deny: false,
            rule: 8,
        }],
    )
    .unwrap();
    drain(&mut ring);
    let denied = a.client("tcp", "127.0.9.1", vip, 1);
    assert_eq!(errors(&denied, "PermissionError"), 1, "{denied}");
    let evs = read_until(&mut ring, 1, |e| e.verdict == FlowVerdict::DeniedByDefault);
    let d = evs
        .iter()
        .find(|e| e.verdict == FlowVerdict::DeniedByDefault)
        .unwrap();
    assert_eq!(d.rule, None);
}

#[test]
fn udp_reports_the_first_datagram_per_socket_and_peer_only() {
    let mut t = two_pods(8, "client", "server");
    let (a, s, s_addr, p) = (&t.a, &t.s, t.s_addr, &mut t.p);
    p.set_endpoints(&[a.endpoint(A, false, false), s.endpoint(S, false, false)])
        .unwrap();
    let mut ring = enable_flows(p);
    // One socket, ten datagrams and their answers.
    let script = format!(
        "{}exec python3 -c 'import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\ns.bind((\"127.0.8.1\",0))\nfor _ in range(10):\n    s.sendto(b\"x\",(\"{}\",{}))\n    s.recvfrom(64)\nprint(\"done\")'",
        a.join(),
        s_addr.ip(),
        s_addr.port()
    );
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("done"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evs = until_marker(&mut ring, a, "127.0.8.1", s_addr);
    let count = |cg: u64, d: FlowDirection| {
        evs.iter()
            .filter(|e| e.cgroup == cg && e.direction == d && e.proto == Proto::Udp)
            .count()
    };
    // The client's first send, the server's first datagram in, the server's first answer
    // out, the client's first answer in: one each, whatever the number of datagrams.
    assert_eq!(count(a.id, FlowDirection::Egress), 1, "{evs:#?}");
    assert_eq!(count(s.id, FlowDirection::Ingress), 1, "{evs:#?}");
    assert_eq!(count(s.id, FlowDirection::Egress), 1, "{evs:#?}");
    assert_eq!(count(a.id, FlowDirection::Ingress), 1, "{evs:#?}");
}

/// Sends one datagram from one UDP socket in `pod` (bound to `src`) to each of `peers`
/// (`rounds` times over); every `sendto` must succeed. Returns how many were sent.
fn udp_to_many(pod: &PodCgroup, src: &str, peers: usize, rounds: usize) -> u64 {
    let script = format!(
        "{}exec python3 -c 'import json, socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((\"{src}\",0))\nsent, errors = 0, {{}}\nfor _ in range({rounds}):\n    for i in range({peers}):\n        try:\n            s.sendto(b\"x\",(\"127.31.%d.%d\" % (i // 250, i % 250 + 1), 9))\n            sent += 1\n        except Exception as e:\n            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1\nprint(json.dumps({{\"sent\": sent, \"errors\": errors}}))'",
        pod.join(),
    );
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!({}), "no send fails: {v}");
    v["sent"].as_u64().unwrap()
}

fn flows_lost(p: &Programmer) -> u64 {
    p.datapath()
        .stats()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == "flow_events_lost")
        .unwrap()
        .1
}

/// With flows on and nobody reading, the ring fills: every send and connect still succeeds,
/// and every event that found no room is counted (`flow_events_lost`): events kept plus
/// events lost is exactly the number of flows.
#[test]
fn a_ring_nobody_reads_drops_and_counts_events_and_fails_no_call() {
    let mut t = two_pods(10, "client", "server");
    let (a, s, s_addr, p) = (&t.a, &t.s, t.s_addr, &mut t.p);
    p.set_endpoints(&[a.endpoint(A, false, false), s.endpoint(S, false, false)])
        .unwrap();
    let mut ring = enable_flows(p);
    let before = flows_lost(p);
    // More first datagrams than the ring (4 MiB, 96 bytes an event) holds.
    const PEERS: usize = 60_000;
    assert_eq!(udp_to_many(a, "127.0.10.1", PEERS, 1), PEERS as u64);
    let lost_udp = flows_lost(p) - before;
    assert!(lost_udp > 0, "a full ring drops (and counts)");
    // Connections while the ring is full: all succeed, their events are counted as lost.
    let run = a.client("tcp", "127.0.10.1", s_addr, 20);
    assert_eq!(ok(&run, "rebel-base"), 20, "{run}");
    let lost = flows_lost(p) - before;
    assert_eq!(
        lost - lost_udp,
        40,
        "egress and ingress of each connection lost"
    );
    let mut kept = 0u64;
    while let Some(item) = ring.next() {
        let e = maps::parse_flow_event(&item).expect("a flow event of this layout");
        assert_eq!(
            (e.cgroup, e.direction, e.proto),
            (a.id, FlowDirection::Egress, Proto::Udp),
            "{e:?}"
        );
        kept += 1;
    }
    assert_eq!(kept + lost_udp, PEERS as u64, "each flow kept or counted");
    // Drained: events flow again.
    let run = a.client("tcp", "127.0.10.1", s_addr, 1);
    assert_eq!(ok(&run, "rebel-base"), 1, "{run}");
    let evs = read_until(&mut ring, 2, |e| e.proto == Proto::Tcp);
    assert_eq!(evs.iter().filter(|e| e.proto == Proto::Tcp).count(), 2);
}

/// One UDP socket talking to many peers: one event per peer, however many datagrams each
/// gets (the seen-map remembers every pair, it does not forget a long-lived socket's peers).
#[test]
fn a_udp_socket_sending_to_many_peers_is_one_flow_per_peer() {
    let node = Node::new();
    let a = PodCgroup::new(&node, "client");
    let mut p = node.open();
    p.apply_ipcache(&ipcache(&[("127.0.11.1", A, 1)])).unwrap();
    p.set_endpoints(&[a.endpoint(A, false, false)]).unwrap();
    let mut ring = enable_flows(&mut p);
    const PEERS: usize = 2_000;
    assert_eq!(udp_to_many(&a, "127.0.11.1", PEERS, 5), 5 * PEERS as u64);
    // The marker: a connect to a port nobody listens on (refused, reported all the same).
    let evs = until_marker(
        &mut ring,
        &a,
        "127.0.11.1",
        SocketAddr::from(([127, 0, 11, 9], common::free_port())),
    );
    let peers: std::collections::HashSet<SocketAddr> = evs.iter().map(|e| e.peer).collect();
    assert_eq!(evs.len(), PEERS, "one event per peer, not per datagram");
    assert_eq!(peers.len(), PEERS, "each peer once");
    assert!(evs.iter().all(|e| e.direction == FlowDirection::Egress
        && e.proto == Proto::Udp
        && e.peer.port() == 9
        && e.local_identity == A));
    assert_eq!(flows_lost(&p), 0);
}

/// IPv6: a TCP connection and a UDP datagram over [::1] between two pods are reported with
/// IPv6 addresses and the right ports, at egress and at ingress.
#[test]
fn ipv6_flows_carry_ipv6_addresses_and_ports() {
    let node = Node::new();
    let (a, s) = (
        PodCgroup::new(&node, "client6"),
        PodCgroup::new(&node, "server6"),
    );
    let port = common::free_port();
    let mut p = node.open();
    p.apply_ipcache(&ipcache(&[("::1", S, 2)])).unwrap();
    p.set_endpoints(&[a.endpoint(A, false, false), s.endpoint(S, false, false)])
        .unwrap();
    let mut ring = enable_flows(&mut p);
    let server = format!(
        "{}exec python3 -c 'import socket, threading\nt=socket.socket(socket.AF_INET6)\nt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nt.bind((\"::1\",{port}))\nt.listen(8)\nu=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\nu.bind((\"::1\",{port}))\ndef udp():\n    while True:\n        d, src = u.recvfrom(64)\n        u.sendto(b\"v6\", src)\nthreading.Thread(target=udp, daemon=True).start()\nprint(\"ready\", flush=True)\nwhile True:\n    c, _ = t.accept()\n    c.sendall(b\"v6\")\n    c.close()'",
        s.join()
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(server)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _server = common::pod_cgroup::Server({
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        child
    });
    let client = format!(
        "{}exec python3 -c 'import socket\nt=socket.socket(socket.AF_INET6)\nt.settimeout(2)\nt.connect((\"::1\",{port}))\nassert t.recv(8) == b\"v6\"\ntcp = t.getsockname()[1]\nu=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\nu.settimeout(2)\nu.sendto(b\"x\",(\"::1\",{port}))\nassert u.recvfrom(8)[0] == b\"v6\"\nprint(tcp, u.getsockname()[1])'",
        a.join()
    );
    let out = Command::new("sh").arg("-c").arg(client).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let (tcp_port, udp_port) = (ports[0], ports[1]);
    let server_addr: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let evs = read_until(&mut ring, 6, |_| true);
    let find = |cg: u64, d: FlowDirection, proto: Proto| {
        evs.iter()
            .filter(|e| e.cgroup == cg && e.direction == d && e.proto == proto)
            .collect::<Vec<_>>()
    };
    for proto in [Proto::Tcp, Proto::Udp] {
        let client_port = if proto == Proto::Tcp {
            tcp_port
        } else {
            udp_port
        };
        let out = find(a.id, FlowDirection::Egress, proto);
        assert_eq!(out.len(), 1, "{proto:?} egress: {evs:#?}");
        assert_eq!((out[0].orig, out[0].peer), (server_addr, server_addr));
        assert_eq!(
            (
                out[0].local_identity,
                out[0].remote_identity,
                out[0].remote_cluster
            ),
            (A, 0, 0),
            "no policy: the agent resolves the peer"
        );
        let inn = find(s.id, FlowDirection::Ingress, proto);
        assert_eq!(inn.len(), 1, "{proto:?} ingress: {evs:#?}");
        assert_eq!(inn[0].orig, server_addr, "the local address");
        assert_eq!(
            inn[0].peer,
            format!("[::1]:{client_port}")
                .parse::<SocketAddr>()
                .unwrap(),
            "the client's address and port"
        );
        assert_eq!(inn[0].local_identity, S);
    }
}

#[test]
fn an_ingress_refusal_is_reported_at_the_receiving_pod_with_its_rule() {
    const B: u32 = 0x0001_0102;
    let mut t = two_pods(12, "x-wing", "rebel-base");
    let (a, s, s_addr, p) = (&t.a, &t.s, t.s_addr, &mut t.p);
    let mut ring = enable_flows(p);
    let ingress_from = |remote: u32, deny: bool, rule: u32| Rule {
        direction: Direction::Ingress,
        remote: Some(remote),
        proto: Some(Proto::Tcp),
        ports: None,
        deny,
        rule,
    };
    // rebel-base admits only B: x-wing's SYN is dropped by default.
    p.set_identity_policy(S, &[ingress_from(B, false, 9)])
        .unwrap();
    p.set_endpoints(&[a.endpoint(A, false, false), s.endpoint(S, true, false)])
        .unwrap();
    let run = a.client("tcp", "127.0.12.1", s_addr, 1);
    assert_eq!(ok(&run, "rebel-base"), 0, "{run}");
    let evs = read_until(&mut ring, 1, |e| {
        e.direction == FlowDirection::Ingress && e.verdict == FlowVerdict::DeniedByDefault
    });
    let d = evs
        .iter()
        .find(|e| {
            e.direction == FlowDirection::Ingress && e.verdict == FlowVerdict::DeniedByDefault
        })
        .unwrap_or_else(|| panic!("no ingress refusal in {evs:#?}"));
    assert_eq!(d.cgroup, s.id, "reported at the receiving pod");
    assert_eq!(
        (d.local_identity, d.remote_identity, d.remote_cluster),
        (S, A, 1)
    );
    assert_eq!(d.rule, None);
    assert!(d.flags & maps::FLOWF_ENFORCED != 0);
    // The caller's own event says it left (its egress is not enforced).
    assert!(evs.iter().any(|e| e.direction == FlowDirection::Egress
        && e.cgroup == a.id
        && e.verdict == FlowVerdict::Forwarded));

    // An explicit deny for x-wing names its rule.
    drain(&mut ring);
    p.set_identity_policy(S, &[ingress_from(B, false, 9), ingress_from(A, true, 11)])
        .unwrap();
    let run = a.client("tcp", "127.0.12.1", s_addr, 1);
    assert_eq!(ok(&run, "rebel-base"), 0, "{run}");
    let evs = read_until(&mut ring, 1, |e| e.verdict == FlowVerdict::DeniedByPolicy);
    let d = evs
        .iter()
        .find(|e| e.verdict == FlowVerdict::DeniedByPolicy)
        .unwrap_or_else(|| panic!("no deny in {evs:#?}"));
    assert_eq!((d.direction, d.rule), (FlowDirection::Ingress, Some(11)));
}
