//! Identity policy in the real kernel: processes in pod cgroups under the node's cgroup, each
//! with its own loopback address mapped to an identity in the IP cache. Egress is refused at
//! `connect()`/`sendmsg()` (after service translation) with `EPERM`; ingress drops a new
//! connection's SYN or an unsolicited datagram at the receiving pod's cgroup; replies to what
//! a pod opened itself always pass. Needs root and bpffs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};

use common::pod_cgroup::{CLIENT, PodCgroup, errors, ok};
use common::{Node, spec};
use node_agent::maps::{Frontend, Proto};
use node_agent::policy::{self, Direction, Outcome, Rule};
use node_agent::program::{DesiredService, Programmer};
use serde_json::Value;

const A: u32 = 0x0001_0101; // client "x-wing"
const B: u32 = 0x0001_0102; // client with other labels
const S: u32 = 0x0002_0103; // server "rebel-base", cluster 2
const T: u32 = 0x0003_0104; // another server, cluster 3

fn egress(
    remote: Option<u32>,
    proto: Option<Proto>,
    ports: Option<(u16, u16)>,
    deny: bool,
) -> Rule {
    Rule {
        direction: Direction::Egress,
        remote,
        proto,
        ports,
        deny,
        rule: 0,
    }
}

fn ingress(remote: Option<u32>, proto: Option<Proto>, ports: Option<(u16, u16)>) -> Rule {
    Rule {
        direction: Direction::Ingress,
        remote,
        proto,
        ports,
        deny: false,
        rule: 1,
    }
}

fn ipcache(entries: &[(&str, u32, u16)]) -> HashMap<IpAddr, (u32, u16)> {
    entries
        .iter()
        .map(|(ip, id, c)| (ip.parse().unwrap(), (*id, *c)))
        .collect()
}

fn counts(p: &Programmer) -> HashMap<(Direction, Outcome, u16), u64> {
    policy::verdict_counts(p.datapath(), &[0, 1, 2, 3])
        .unwrap()
        .into_iter()
        .map(|(c, d, o, n)| ((d, o, c), n))
        .collect()
}

#[test]
fn egress_and_ingress_by_identity_with_ports_deny_and_replies() {
    let node = Node::new();
    let (a, b, s, t) = (
        PodCgroup::new(&node, "x-wing"),
        PodCgroup::new(&node, "other"),
        PodCgroup::new(&node, "rebel-base"),
        PodCgroup::new(&node, "tie"),
    );
    let port = common::free_port();
    let s_addr: SocketAddr = format!("127.0.6.3:{port}").parse().unwrap();
    let t_addr: SocketAddr = format!("127.0.6.4:{port}").parse().unwrap();
    let _s = s.server("rebel-base", s_addr);
    let _t = t.server("tie", t_addr);
    let mut p = node.open();
    p.apply_ipcache(&ipcache(&[
        ("127.0.6.1", A, 1),
        ("127.0.6.2", B, 1),
        ("127.0.6.3", S, 2),
        ("127.0.6.4", T, 3),
    ]))
    .unwrap();
    // A service in front of each server: egress is decided on the backend chosen.
    let vip_s: SocketAddr = "127.100.6.3:80".parse().unwrap();
    let vip_t: SocketAddr = "127.100.6.4:80".parse().unwrap();
    let svc = |vip: SocketAddr, be: SocketAddr| DesiredService {
        frontend: Frontend {
            addr: vip,
            proto: Proto::Tcp,
        },
        service: None,
        tiers: [vec![spec(be, 2)], vec![]],
        balancing: Default::default(),
    };
    p.apply(&[svc(vip_s, s_addr), svc(vip_t, t_addr)]).unwrap();

    // No policy: everything flows.
    assert_eq!(ok(&a.client("tcp", "127.0.6.1", t_addr, 3), "tie"), 3);

    // x-wing: egress to rebel-base on TCP `port` only; UDP to anything on `port`; TCP to tie
    // denied explicitly even though a range would allow it.
    let rules = [
        egress(Some(S), Some(Proto::Tcp), Some((port, port)), false),
        egress(None, Some(Proto::Udp), Some((port, port)), false),
        egress(
            Some(T),
            Some(Proto::Tcp),
            Some((port.saturating_sub(5), port + 5)),
            false,
        ),
        egress(Some(T), Some(Proto::Tcp), Some((port, port)), true),
    ];
    p.set_identity_policy(A, &rules).unwrap();
    p.set_endpoints(&[a.endpoint(A, false, true)]).unwrap();
    let to_s = a.client("tcp", "127.0.6.1", s_addr, 5);
    assert_eq!(ok(&to_s, "rebel-base"), 5, "{to_s}");
    let via_vip = a.client("tcp", "127.0.6.1", vip_s, 5);
    assert_eq!(ok(&via_vip, "rebel-base"), 5, "{via_vip}");
    let to_t = a.client("tcp", "127.0.6.1", t_addr, 3);
    assert_eq!(errors(&to_t, "PermissionError"), 3, "deny wins: {to_t}");
    let t_vip = a.client("tcp", "127.0.6.1", vip_t, 3);
    assert_eq!(
        errors(&t_vip, "PermissionError"),
        3,
        "after translation: {t_vip}"
    );
    let udp_t = a.client("udp", "127.0.6.1", t_addr, 3);
    assert_eq!(ok(&udp_t, "tie"), 3, "UDP allowed to any peer: {udp_t}");
    // Another pod is not selected: unaffected.
    assert_eq!(ok(&b.client("tcp", "127.0.6.2", t_addr, 2), "tie"), 2);

    // rebel-base: ingress from x-wing on TCP and UDP `port` only. Its own outbound
    // connection to tie (no egress policy) gets its replies: a SYN-ACK is no new connection.
    p.set_identity_policy(S, &[ingress(Some(A), None, Some((port, port)))])
        .unwrap();
    p.set_endpoints(&[a.endpoint(A, false, true), s.endpoint(S, true, false)])
        .unwrap();
    assert_eq!(
        ok(&a.client("tcp", "127.0.6.1", s_addr, 5), "rebel-base"),
        5
    );
    assert_eq!(
        ok(&a.client("udp", "127.0.6.1", s_addr, 3), "rebel-base"),
        3
    );
    let from_b = b.client("tcp", "127.0.6.2", s_addr, 2);
    assert_eq!(errors(&from_b, "TimeoutError"), 2, "SYN dropped: {from_b}");
    let udp_b = b.client("udp", "127.0.6.2", s_addr, 2);
    assert_eq!(
        errors(&udp_b, "TimeoutError"),
        2,
        "datagram dropped: {udp_b}"
    );
    let out_s = s.client("tcp", "127.0.6.3", t_addr, 3);
    assert_eq!(ok(&out_s, "tie"), 3, "replies pass: {out_s}");
    let udp_out_s = s.client("udp", "127.0.6.3", t_addr, 3);
    assert_eq!(ok(&udp_out_s, "tie"), 3, "UDP replies pass: {udp_out_s}");

    let c = counts(&p);
    println!("verdicts: {c:?}");
    assert!(c[&(Direction::Egress, Outcome::Allowed, 2)] >= 10);
    assert!(c[&(Direction::Egress, Outcome::DeniedByPolicy, 3)] >= 6);
    assert!(c[&(Direction::Ingress, Outcome::Allowed, 1)] >= 8);
    assert!(c[&(Direction::Ingress, Outcome::DeniedByDefault, 1)] >= 4);

    // The agent goes away: enforcement stays; a new agent learns the tables and the same
    // state writes nothing.
    drop(p);
    let meanwhile = b.client("tcp", "127.0.6.2", s_addr, 1);
    assert_eq!(errors(&meanwhile, "TimeoutError"), 1, "{meanwhile}");
    let mut p = node.open();
    let w = p.set_identity_policy(A, &rules).unwrap();
    let w2 = p
        .set_identity_policy(S, &[ingress(Some(A), None, Some((port, port)))])
        .unwrap();
    let w3 = p
        .set_endpoints(&[a.endpoint(A, false, true), s.endpoint(S, true, false)])
        .unwrap();
    assert_eq!(
        (
            w.writes + w2.writes + w3.writes,
            w.deletes + w2.deletes + w3.deletes
        ),
        (0, 0)
    );

    // Policies gone: the endpoints first, then their entries; everything flows again.
    p.set_endpoints(&[]).unwrap();
    p.set_identity_policy(A, &[]).unwrap();
    p.set_identity_policy(S, &[]).unwrap();
    assert_eq!(p.datapath().policy.iter().count(), 0);
    assert_eq!(ok(&a.client("tcp", "127.0.6.1", t_addr, 2), "tie"), 2);
    assert_eq!(
        ok(&b.client("tcp", "127.0.6.2", s_addr, 2), "rebel-base"),
        2
    );
}

/// A new remote identity appearing changes no verdict of an existing one, and its own entry
/// takes effect with the next connection; one identity's entries are rewritten without a
/// window in which an allowed port is refused.
#[test]
fn a_new_remote_identity_is_added_without_touching_the_others() {
    let node = Node::new();
    let (a, s) = (
        PodCgroup::new(&node, "x-wing"),
        PodCgroup::new(&node, "rebel-base"),
    );
    let port = common::free_port();
    let s_addr: SocketAddr = format!("127.0.7.3:{port}").parse().unwrap();
    let s2_addr: SocketAddr = format!("127.0.7.5:{port}").parse().unwrap();
    let _s = s.server("rebel-base", s_addr);
    let _s2 = s.server("rebel-base-2", s2_addr);
    let mut p = node.open();
    let s2 = 0x0002_0199;
    p.apply_ipcache(&ipcache(&[("127.0.7.3", S, 2), ("127.0.7.5", s2, 2)]))
        .unwrap();
    let allow = |ids: &[u32]| -> Vec<Rule> {
        ids.iter()
            .map(|id| egress(Some(*id), Some(Proto::Tcp), None, false))
            .collect()
    };
    p.set_identity_policy(A, &allow(&[S])).unwrap();
    p.set_endpoints(&[a.endpoint(A, false, true)]).unwrap();
    let loop_client = {
        let cmd = format!(
            "{}exec python3 -c '{}' tcp 127.0.7.1 {} {} 400",
            a.join(),
            CLIENT.replace('\'', "'\\''"),
            s_addr.ip(),
            s_addr.port()
        );
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    assert_eq!(
        errors(&a.client("tcp", "127.0.7.1", s2_addr, 1), "PermissionError"),
        1
    );
    // While the loop runs: the new identity is allowed (entries for S untouched).
    let before = p.policy_tables().entries(A).unwrap().clone();
    let ops = p.set_identity_policy(A, &allow(&[S, s2])).unwrap();
    assert_eq!(
        (ops.writes, ops.deletes),
        (1, 0),
        "one new entry, none rewritten"
    );
    let after = p.policy_tables().entries(A).unwrap();
    assert!(before.iter().all(|(k, v)| after.get(k) == Some(v)));
    assert_eq!(
        ok(&a.client("tcp", "127.0.7.1", s2_addr, 2), "rebel-base-2"),
        2
    );
    let out = loop_client.wait_with_output().unwrap();
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        ok(&run, "rebel-base"),
        400,
        "no refusal during the change: {run}"
    );
    p.set_endpoints(&[]).unwrap();
    p.set_identity_policy(A, &[]).unwrap();
}

/// The kernel caches each peer's identity and port sets per (local identity, direction,
/// protocol, address); every change of the policy or the IP cache makes the cache stale at
/// once: the very next connect is judged on the new state.
#[test]
fn a_cached_verdict_never_outlives_a_policy_or_ip_cache_change() {
    let node = Node::new();
    let (a, s) = (
        PodCgroup::new(&node, "x-wing"),
        PodCgroup::new(&node, "rebel-base"),
    );
    let port = common::free_port();
    let s_addr: SocketAddr = format!("127.0.11.3:{port}").parse().unwrap();
    let _s = s.server("rebel-base", s_addr);
    let mut p = node.open();
    // Opening the maps made every earlier entry stale: the generation is never 0 (an
    // all-zero slot never matches), and the hash has its random seed.
    let opened = p.datapath().policy_gen();
    assert_ne!(opened, 0);
    assert_ne!(p.datapath().policy_seed().unwrap(), 0);
    p.apply_ipcache(&ipcache(&[("127.0.11.1", A, 1), ("127.0.11.3", S, 2)]))
        .unwrap();
    p.set_identity_policy(A, &[egress(Some(S), Some(Proto::Tcp), None, false)])
        .unwrap();
    assert!(p.datapath().policy_gen() > opened, "each change bumps it");
    p.set_endpoints(&[a.endpoint(A, false, true)]).unwrap();
    // Allowed, several times: the verdict is cached.
    assert_eq!(
        ok(&a.client("tcp", "127.0.11.1", s_addr, 3), "rebel-base"),
        3
    );
    // The policy changes to a deny: the next connect is refused.
    p.set_identity_policy(A, &[egress(Some(S), Some(Proto::Tcp), None, true)])
        .unwrap();
    let run = a.client("tcp", "127.0.11.1", s_addr, 1);
    assert_eq!(
        errors(&run, "PermissionError"),
        1,
        "after the policy change: {run}"
    );
    // Allowed again, cached again.
    p.set_identity_policy(A, &[egress(Some(S), Some(Proto::Tcp), None, false)])
        .unwrap();
    assert_eq!(
        ok(&a.client("tcp", "127.0.11.1", s_addr, 3), "rebel-base"),
        3
    );
    // The address now belongs to another identity (T, not allowed): refused at once.
    p.apply_ipcache(&ipcache(&[("127.0.11.1", A, 1), ("127.0.11.3", T, 3)]))
        .unwrap();
    let run = a.client("tcp", "127.0.11.1", s_addr, 1);
    assert_eq!(
        errors(&run, "PermissionError"),
        1,
        "after the IP cache change: {run}"
    );
    // And back.
    p.apply_ipcache(&ipcache(&[("127.0.11.1", A, 1), ("127.0.11.3", S, 2)]))
        .unwrap();
    assert_eq!(
        ok(&a.client("tcp", "127.0.11.1", s_addr, 2), "rebel-base"),
        2
    );
}

/// Connects to each address given (`ip ip ...` on stdin, port in argv) in the order given, and
/// prints one outcome letter per address: `a` allowed (refused by the peer, nothing listens),
/// `d` denied (EPERM), `x` anything else.
const SPRAY: &str = r#"
import errno, socket, sys
port = int(sys.argv[1])
out = []
for ip in sys.stdin.read().split():
    s = socket.socket()
    try:
        s.connect((ip, port))
        out.append("x")
    except PermissionError:
        out.append("d")
    except ConnectionRefusedError:
        out.append("a")
    except OSError:
        out.append("x")
    finally:
        s.close()
print("".join(out))
"#;

/// The verdict cache holds 32,768 slots in 16,384 two-way buckets that the programs write in
/// place: with 40,000 peers (every bucket contended, entries evicted all the time) and two
/// processes on two CPUs connecting concurrently in opposite orders, twice over, every connect
/// still gets its own peer's verdict — even peers allowed, odd ones denied by default.
#[test]
fn the_verdict_cache_gives_every_peer_its_own_verdict_under_eviction_and_concurrent_writers() {
    const PEERS: usize = 40_000;
    let node = Node::new();
    let a = PodCgroup::new(&node, "x-wing");
    let mut p = node.open();
    let addr = |i: usize| format!("127.{}.{}.{}", 40 + i / 62_500, i / 250 % 250, i % 250 + 1);
    let id = |i: usize| 0x0004_0000 + i as u32 + 1;
    let mut cache: HashMap<IpAddr, (u32, u16)> = (0..PEERS)
        .map(|i| (addr(i).parse().unwrap(), (id(i), 4)))
        .collect();
    cache.insert("127.0.12.1".parse().unwrap(), (A, 1));
    p.apply_ipcache(&cache).unwrap();
    let allowed: Vec<Rule> = (0..PEERS)
        .step_by(2)
        .map(|i| egress(Some(id(i)), Some(Proto::Tcp), None, false))
        .collect();
    p.set_identity_policy(A, &allowed).unwrap();
    p.set_endpoints(&[a.endpoint(A, false, true)]).unwrap();
    let port = common::free_port();
    let forward: Vec<String> = (0..PEERS).map(addr).collect();
    let backward: Vec<String> = forward.iter().rev().cloned().collect();
    let spray = |order: &Vec<String>| {
        use std::io::Write;
        let cmd = format!(
            "{}exec python3 -c '{}' {port}",
            a.join(),
            SPRAY.replace('\'', "'\\''")
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = order.join(" ");
        std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        child
    };
    for round in 0..2 {
        let (f, b) = (spray(&forward), spray(&backward));
        let (f, b) = (f.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert!(f.status.success() && b.status.success(), "sprayers failed");
        let f = String::from_utf8(f.stdout).unwrap();
        let b: String = String::from_utf8(b.stdout)
            .unwrap()
            .trim()
            .chars()
            .rev()
            .collect();
        for (who, got) in [("forward", f.trim()), ("backward", b.as_str())] {
            assert_eq!(
                got.len(),
                PEERS,
                "round {round}, {who}: one outcome per peer"
            );
            let wrong: Vec<String> = got
                .chars()
                .enumerate()
                .filter(|(i, c)| *c != if i % 2 == 0 { 'a' } else { 'd' })
                .take(5)
                .map(|(i, c)| format!("{} got {c}", addr(i)))
                .collect();
            assert!(
                wrong.is_empty(),
                "round {round}, {who}: wrong verdicts: {wrong:?}"
            );
        }
    }
}

/// A change that fails part way (here `CM_POLICY` runs full) leaves the maps between two
/// states; the agent re-reads them, so the next change deletes what the failed one left
/// behind: a peer the failed change allowed is refused once the policy no longer names it.
#[test]
fn after_a_change_that_failed_part_way_the_next_change_removes_what_it_left() {
    const CAPACITY: u32 = 1 << 20; // CM_POLICY's entries
    let node = Node::new();
    let (a, s) = (
        PodCgroup::new(&node, "x-wing"),
        PodCgroup::new(&node, "rebel-base"),
    );
    let port = common::free_port();
    let s_addr: SocketAddr = format!("127.0.13.3:{port}").parse().unwrap();
    let t_addr: SocketAddr = format!("127.0.13.4:{port}").parse().unwrap();
    let _s = s.server("rebel-base", s_addr);
    let _t = s.server("tie", t_addr);
    let mut p = node.open();
    // T's identity sorts first among the many below, so the failed change writes it.
    let many = |i: u32| 0x0100_0000 + i;
    p.apply_ipcache(&ipcache(&[
        ("127.0.13.3", S, 2),
        ("127.0.13.4", many(0), 3),
    ]))
    .unwrap();
    p.set_identity_policy(A, &[egress(Some(S), Some(Proto::Tcp), None, false)])
        .unwrap();
    p.set_endpoints(&[a.endpoint(A, false, true)]).unwrap();
    assert_eq!(
        errors(&a.client("tcp", "127.0.13.1", t_addr, 1), "PermissionError"),
        1
    );
    // More peers than the map holds: the change fails part way.
    let too_many: Vec<Rule> = (0..CAPACITY + 10)
        .map(|i| egress(Some(many(i)), Some(Proto::Tcp), None, false))
        .collect();
    assert!(p.set_identity_policy(A, &too_many).is_err());
    assert_eq!(
        ok(&a.client("tcp", "127.0.13.1", t_addr, 1), "tie"),
        1,
        "what the failed change wrote is in force"
    );
    // The policy goes back to S only: everything else goes, T is refused again.
    p.set_identity_policy(A, &[egress(Some(S), Some(Proto::Tcp), None, false)])
        .unwrap();
    assert_eq!(p.datapath().policy.iter().count(), 1, "one entry left");
    assert_eq!(
        errors(&a.client("tcp", "127.0.13.1", t_addr, 1), "PermissionError"),
        1,
        "T refused again"
    );
    assert_eq!(
        ok(&a.client("tcp", "127.0.13.1", s_addr, 1), "rebel-base"),
        1
    );
}
