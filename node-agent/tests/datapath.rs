//! The socket load-balancing programs in the real kernel: real connect()/sendmsg() from
//! processes in a test cgroup. Needs root and bpffs (scripts/setup.sh mounts it).
//!
//! Service addresses are in 127.100.0.0/16: a connect() the programs do not translate is
//! refused at once by the loopback, which makes the negative control quick and unambiguous.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::{Node, Pod, backend, counts, spec};
use model::service::ServiceName;
use node_agent::maps::{Frontend, Proto};
use node_agent::program::{BackendSpec, DesiredService, Reason};

/// `n` backends in 127.0.3.0/24 that nothing listens on.
fn many(n: usize) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| {
            spec(
                SocketAddr::from(([127, 0, 3, (i % 250) as u8], 1000 + i as u16)),
                2,
            )
        })
        .collect()
}

fn service(name: &str) -> Option<ServiceName> {
    Some(ServiceName::new("shop", name).unwrap())
}

/// The frontends the maps hold, read back from the kernel, with their backends per tier.
fn read_back(p: &node_agent::program::Programmer) -> BTreeMap<Frontend, Vec<Vec<SocketAddr>>> {
    p.programmed()
        .unwrap()
        .into_iter()
        .map(|(f, tiers)| {
            (
                f,
                tiers
                    .iter()
                    .map(|t| t.iter().map(|b| b.addr).collect())
                    .collect(),
            )
        })
        .collect()
}

fn frontend(vip: &str, proto: Proto) -> Frontend {
    Frontend {
        addr: vip.parse().unwrap(),
        proto,
    }
}

#[test]
fn affinity_tiers_health_udp_restart_and_negative_control() {
    let node = Node::new();
    let l1 = backend("local-1", "127.0.1.1");
    let l2 = backend("local-2", "127.0.1.2");
    let r1 = backend("remote-1", "127.0.2.1");
    let r2 = backend("remote-2", "127.0.2.2");
    let local = vec![spec(l1, 1), spec(l2, 1)];
    let remote = vec![spec(r1, 2), spec(r2, 2)];
    let both: Vec<BackendSpec> = local.iter().chain(&remote).copied().collect();
    let vip_local = "127.100.0.1:80";
    let vip_remote = "127.100.0.2:80";
    let vip_none = "127.100.0.3:80";
    let vip_udp = "127.100.0.4:53";
    let desired = vec![
        DesiredService {
            frontend: frontend(vip_local, Proto::Tcp),
            service: None,
            tiers: [local.clone(), remote.clone()],
            balancing: Default::default(),
        },
        DesiredService {
            frontend: frontend(vip_remote, Proto::Tcp),
            service: None,
            tiers: [remote.clone(), local.clone()],
            balancing: Default::default(),
        },
        DesiredService {
            frontend: frontend(vip_none, Proto::Tcp),
            service: None,
            tiers: [both.clone(), vec![]],
            balancing: Default::default(),
        },
        // UDP to l1 only; the port must match the backend's.
        DesiredService {
            frontend: frontend(vip_udp, Proto::Udp),
            service: None,
            tiers: [vec![spec(l1, 1)], vec![]],
            balancing: Default::default(),
        },
    ];
    let mut p = node.open();
    let ops = p.apply(&desired).unwrap();
    assert!(ops.writes > 0);

    // Affinity: 200 connections each.
    let n = 200;
    let local_run = node.client(true, "tcp", vip_local.parse().unwrap(), n);
    let remote_run = node.client(true, "tcp", vip_remote.parse().unwrap(), n);
    let none_run = node.client(true, "tcp", vip_none.parse().unwrap(), n);
    println!(
        "affinity local: {local_run}\naffinity remote: {remote_run}\naffinity none: {none_run}"
    );
    for run in [&local_run, &remote_run, &none_run] {
        assert_eq!(run["failures"], 0);
    }
    assert!(counts(&local_run).keys().all(|k| k.starts_with("local")));
    assert_eq!(counts(&local_run).len(), 2, "both local backends are used");
    assert!(counts(&remote_run).keys().all(|k| k.starts_with("remote")));
    assert_eq!(counts(&none_run).len(), 4, "none: all four backends");
    // getpeername shows the service address, not the backend's.
    assert_eq!(local_run["sources"], serde_json::json!([vip_local]));

    // UDP through sendmsg/recvmsg: replies come from the service address.
    let udp = node.client(true, "udp", vip_udp.parse().unwrap(), 20);
    println!("udp: {udp}");
    assert_eq!(udp["failures"], 0);
    assert_eq!(counts(&udp), BTreeMap::from([("local-1".to_owned(), 20)]));
    assert_eq!(udp["sources"], serde_json::json!([vip_udp]));

    // Local backends unhealthy: the next tier serves, with no other map change.
    assert!(p.set_health(l1, false).unwrap());
    assert!(p.set_health(l2, false).unwrap());
    let failover = node.client(true, "tcp", vip_local.parse().unwrap(), n);
    assert_eq!(failover["failures"], 0);
    assert!(
        counts(&failover).keys().all(|k| k.starts_with("remote")),
        "{failover}"
    );
    p.set_health(l1, true).unwrap();
    p.set_health(l2, true).unwrap();
    let back = node.client(true, "tcp", vip_local.parse().unwrap(), n);
    assert!(
        counts(&back).keys().all(|k| k.starts_with("local")),
        "{back}"
    );

    // Negative control: a process outside the cgroup is not translated.
    let outside = node.client(false, "tcp", vip_local.parse().unwrap(), 5);
    assert_eq!(outside["failures"], 5, "{outside}");

    // The agent goes away: programs stay attached, traffic keeps flowing.
    drop(p);
    let meanwhile = node.client(true, "tcp", vip_local.parse().unwrap(), 50);
    assert_eq!(meanwhile["failures"], 0);
    // A new agent reuses maps and links: the same desired state writes nothing.
    let mut p = node.open();
    assert_eq!(p.services(), 4);
    let ops = p.apply(&desired).unwrap();
    assert_eq!((ops.writes, ops.deletes), (0, 0), "restart rewrote nothing");

    // More backends than a tier holds: that service alone is refused, nothing is written.
    let mut too_big = desired.clone();
    too_big.push(DesiredService {
        frontend: frontend("127.100.0.9:80", Proto::Tcp),
        service: None,
        tiers: [many(300), vec![]],
        balancing: Default::default(),
    });
    let ops = p.apply(&too_big).unwrap();
    assert_eq!((ops.writes, ops.deletes), (0, 0), "{ops:?}");
    assert_eq!(ops.refused.len(), 1);
    assert!(matches!(
        ops.refused[0].reason,
        Reason::TierFull {
            tier: 0,
            wanted: 300,
            capacity: 256
        }
    ));
    assert_eq!(p.services(), 4);
    assert_eq!(
        p.apply(&desired).unwrap(),
        Default::default(),
        "the refused service left nothing behind"
    );

    // IPv6: connect6 translates to an IPv6 backend; getpeername shows the service.
    let v6a = backend("six-a", "::1");
    let v6b = backend("six-b", "::1");
    let vip6 = "[fd00:cafe::1]:80";
    let mut with_v6 = desired.clone();
    with_v6.push(DesiredService {
        frontend: frontend(vip6, Proto::Tcp),
        service: None,
        tiers: [vec![spec(v6a, 1)], vec![spec(v6b, 2)]],
        balancing: Default::default(),
    });
    p.apply(&with_v6).unwrap();
    let six = node.client(true, "tcp", vip6.parse().unwrap(), 50);
    println!("ipv6: {six}");
    assert_eq!(six["failures"], 0);
    assert_eq!(counts(&six), BTreeMap::from([("six-a".to_owned(), 50)]));
    assert_eq!(six["sources"], serde_json::json!([vip6]));
    assert!(p.set_health(v6a, false).unwrap());
    let six = node.client(true, "tcp", vip6.parse().unwrap(), 20);
    assert_eq!(counts(&six), BTreeMap::from([("six-b".to_owned(), 20)]));
    p.apply(&desired).unwrap();

    // The IP cache: written, changed, emptied; an unchanged state writes nothing.
    let mut entries = std::collections::HashMap::new();
    entries.insert("10.1.0.5".parse().unwrap(), (0x0001_0101u32, 1u16));
    entries.insert("fd00::5".parse().unwrap(), (0x0002_0101u32, 2u16));
    assert_eq!(
        p.apply_ipcache(&entries).unwrap().writes,
        4,
        "prefix and host entries"
    );
    assert_eq!(p.apply_ipcache(&entries).unwrap(), Default::default());
    entries.remove(&"fd00::5".parse().unwrap());
    assert_eq!(p.apply_ipcache(&entries).unwrap().deletes, 2);
    assert_eq!(p.datapath().ipcache.iter().count(), 1);

    // Removing services deletes their entries; connections to them are no longer translated.
    let ops = p.apply(&desired[..1]).unwrap();
    assert!(ops.deletes >= 3);
    let gone = node.client(true, "tcp", vip_remote.parse().unwrap(), 3);
    assert_eq!(gone["failures"], 3);
}

/// A peer sends a service 300 ready backends (a tier holds 256): that service alone is refused,
/// named with the limit; a new local service in the same desired state is programmed and
/// serves. Once it shrinks to 3 backends it is programmed and the refusal goes away.
#[test]
fn an_oversized_service_is_refused_alone() {
    let node = Node::new();
    let (w1, w2) = (backend("web-1", "127.0.1.1"), backend("web-2", "127.0.1.2"));
    let (b1, b2, b3) = (
        backend("big-1", "127.0.1.3"),
        backend("big-2", "127.0.1.4"),
        backend("big-3", "127.0.1.5"),
    );
    let vip_web: SocketAddr = "127.100.1.1:80".parse().unwrap();
    let vip_big: SocketAddr = "127.100.1.2:80".parse().unwrap();
    let web = DesiredService {
        frontend: frontend("127.100.1.1:80", Proto::Tcp),
        service: service("web"),
        tiers: [vec![spec(w1, 1), spec(w2, 1)], vec![]],
        balancing: Default::default(),
    };
    let oversized = DesiredService {
        frontend: frontend("127.100.1.2:80", Proto::Tcp),
        service: service("big"),
        tiers: [vec![spec(b1, 1)], many(300)],
        balancing: Default::default(),
    };
    let mut p = node.open();
    let ops = p.apply(&[oversized.clone(), web.clone()]).unwrap();

    // The oversized service is refused, named, with the field and the limit.
    assert_eq!(ops.refused.len(), 1, "{ops:?}");
    let r = &ops.refused[0];
    assert_eq!(r.frontend, oversized.frontend);
    assert_eq!(r.service, service("big"));
    assert_eq!(
        r.reason,
        Reason::TierFull {
            tier: 1,
            wanted: 300,
            capacity: 256
        }
    );
    assert!(!r.kept_previous);
    assert_eq!(
        r.to_string(),
        "service shop/big frontend 127.100.1.2:80/tcp: tiers[1] has 300 backends, a tier holds 256 (MAX_TIER_SLOTS)"
    );
    // The good one is programmed (read back from the kernel) and serves; the refused one is
    // not in the maps at all.
    assert_eq!(
        read_back(&p),
        BTreeMap::from([(web.frontend, vec![vec![w1, w2], vec![]])])
    );
    assert_eq!((p.services(), p.backends()), (1, 2));
    let run = node.client(true, "tcp", vip_web, 50);
    assert_eq!(run["failures"], 0, "{run}");
    assert!(counts(&run).keys().all(|k| k.starts_with("web")), "{run}");
    let refused = node.client(true, "tcp", vip_big, 2);
    assert_eq!(refused["failures"], 2, "not translated: {refused}");

    // The same state again writes nothing and reports the same refusal.
    let again = p.apply(&[oversized.clone(), web.clone()]).unwrap();
    assert_eq!((again.writes, again.deletes), (0, 0));
    assert_eq!(again.refused, ops.refused);

    // It shrinks to 3 backends: programmed, serving, no refusal.
    let shrunk = DesiredService {
        tiers: [vec![spec(b1, 1), spec(b2, 1), spec(b3, 1)], vec![]],
        ..oversized
    };
    let ops = p.apply(&[web.clone(), shrunk.clone()]).unwrap();
    assert!(ops.refused.is_empty(), "{ops:?}");
    assert_eq!(
        read_back(&p)[&shrunk.frontend],
        vec![vec![b1, b2, b3], vec![]]
    );
    let big = node.client(true, "tcp", vip_big, 60);
    assert_eq!(big["failures"], 0, "{big}");
    assert_eq!(counts(&big).len(), 3, "{big}");
    let run = node.client(true, "tcp", vip_web, 20);
    assert_eq!(run["failures"], 0, "{run}");
}

/// Bad input never erases good state: a programmed service that grows past a tier keeps its
/// last programming (also across an agent restart) while the rest of the node follows the
/// desired state; shrunk again, it is reprogrammed.
#[test]
fn a_programmed_service_that_grows_past_the_limit_keeps_its_old_programming() {
    let node = Node::new();
    let (a1, a2, a3) = (
        backend("api-1", "127.0.1.1"),
        backend("api-2", "127.0.1.2"),
        backend("api-3", "127.0.1.3"),
    );
    let (w1, w2) = (backend("web-1", "127.0.1.4"), backend("web-2", "127.0.1.5"));
    let vip_api: SocketAddr = "127.100.2.1:80".parse().unwrap();
    let vip_web: SocketAddr = "127.100.2.2:80".parse().unwrap();
    let api = DesiredService {
        frontend: frontend("127.100.2.1:80", Proto::Tcp),
        service: service("api"),
        tiers: [vec![spec(a1, 1), spec(a2, 1)], vec![]],
        balancing: Default::default(),
    };
    let web = DesiredService {
        frontend: frontend("127.100.2.2:80", Proto::Tcp),
        service: service("web"),
        tiers: [vec![spec(w1, 1)], vec![]],
        balancing: Default::default(),
    };
    let mut p = node.open();
    assert!(
        p.apply(&[api.clone(), web.clone()])
            .unwrap()
            .refused
            .is_empty()
    );
    let before = read_back(&p);

    // api grows past a tier; web changes in the same state.
    let grown = DesiredService {
        tiers: [vec![spec(a1, 1), spec(a2, 1)], many(300)],
        ..api.clone()
    };
    let web2 = DesiredService {
        tiers: [vec![spec(w1, 1), spec(w2, 1)], vec![]],
        ..web.clone()
    };
    let state = [grown.clone(), web2.clone()];
    let ops = p.apply(&state).unwrap();
    assert_eq!(ops.refused.len(), 1, "{ops:?}");
    assert_eq!(ops.refused[0].service, service("api"));
    assert!(ops.refused[0].kept_previous);
    let now = read_back(&p);
    assert_eq!(
        now[&api.frontend], before[&api.frontend],
        "api kept as it was"
    );
    assert_eq!(
        now[&web.frontend],
        vec![vec![w1, w2], vec![]],
        "web followed"
    );
    assert_eq!(p.backends(), 4, "none of the 300 written");
    let run = node.client(true, "tcp", vip_api, 50);
    assert_eq!(run["failures"], 0, "{run}");
    assert_eq!(counts(&run).len(), 2, "{run}");
    assert_eq!(counts(&node.client(true, "tcp", vip_web, 50)).len(), 2);
    // Its backends are still health-checked and can fail over.
    assert!(p.set_health(a1, false).unwrap());
    let run = node.client(true, "tcp", vip_api, 20);
    assert_eq!(
        counts(&run),
        BTreeMap::from([("api-2".to_owned(), 20)]),
        "{run}"
    );
    assert!(p.set_health(a1, true).unwrap());

    // A restarted agent learns what the kept programming references and keeps it too.
    drop(p);
    let mut p = node.open();
    let ops = p.apply(&state).unwrap();
    assert_eq!((ops.writes, ops.deletes), (0, 0), "{ops:?}");
    assert!(ops.refused[0].kept_previous);
    assert_eq!(read_back(&p), now);

    // Shrunk again, it is reprogrammed and the refusal goes away.
    let shrunk = DesiredService {
        tiers: [vec![spec(a3, 1)], vec![]],
        ..api.clone()
    };
    let ops = p.apply(&[shrunk.clone(), web2.clone()]).unwrap();
    assert!(ops.refused.is_empty(), "{ops:?}");
    assert_eq!(read_back(&p)[&api.frontend], vec![vec![a3], vec![]]);
    assert_eq!(p.backends(), 3, "api-1 and api-2 removed");
    let run = node.client(true, "tcp", vip_api, 20);
    assert_eq!(
        counts(&run),
        BTreeMap::from([("api-3".to_owned(), 20)]),
        "{run}"
    );
}

/// A client in a pod (its own network namespace, a child cgroup of the node's cgroup) reaching
/// backends on the host side through the veth.
#[test]
fn pods_in_their_own_network_namespace_and_child_cgroup() {
    let node = Node::new();
    let pod = Pod::new(&node);
    let ip = pod.host_ip.to_string();
    let (l1, l2, r1) = (
        backend("local-1", &ip),
        backend("local-2", &ip),
        backend("remote-1", &ip),
    );
    let mut p = node.open();
    let vip_local: SocketAddr = "10.96.7.1:80".parse().unwrap();
    let vip_remote: SocketAddr = "10.96.7.2:80".parse().unwrap();
    p.apply(&[
        DesiredService {
            frontend: Frontend {
                addr: vip_local,
                proto: Proto::Tcp,
            },
            service: None,
            tiers: [vec![spec(l1, 1), spec(l2, 1)], vec![spec(r1, 2)]],
            balancing: Default::default(),
        },
        DesiredService {
            frontend: Frontend {
                addr: vip_remote,
                proto: Proto::Tcp,
            },
            service: None,
            tiers: [vec![spec(r1, 2)], vec![spec(l1, 1), spec(l2, 1)]],
            balancing: Default::default(),
        },
    ])
    .unwrap();
    let local = pod.client(&node, true, vip_local, 200);
    let remote = pod.client(&node, true, vip_remote, 200);
    println!("pod, affinity local: {local}\npod, affinity remote: {remote}");
    assert_eq!(local["failures"], 0);
    assert_eq!(
        counts(&local).keys().cloned().collect::<Vec<_>>(),
        ["local-1", "local-2"]
    );
    assert_eq!(
        counts(&remote),
        BTreeMap::from([("remote-1".to_owned(), 200)])
    );
    // Negative control: the same netns, outside the node's cgroup tree.
    let outside = pod.client(&node, false, vip_local, 2);
    assert_eq!(outside["failures"], 2);
}

/// The maps are sized from configuration: 100,000 services (over the default 65,536) are
/// programmed and translated; an agent configured for another size refuses the pinned maps
/// instead of misusing them.
#[test]
fn a_hundred_thousand_services_with_maps_sized_for_them() {
    let node = Node::new();
    let mut p = node.open_sized(131_072).unwrap();
    let b = backend("only", "127.0.1.71");
    let vip = |i: usize| {
        SocketAddr::from((
            [127, 101, (i / 250 / 250) as u8, (i / 250 % 250) as u8 + 1],
            (1000 + i % 250) as u16,
        ))
    };
    let desired: Vec<DesiredService> = (0..100_000)
        .map(|i| DesiredService {
            frontend: Frontend {
                addr: vip(i),
                proto: Proto::Tcp,
            },
            service: None,
            tiers: [vec![spec(b, 1)], vec![]],
            balancing: Default::default(),
        })
        .collect();
    let ops = p.apply(&desired).unwrap();
    assert!(ops.refused.is_empty(), "{:?}", &ops.refused[..1]);
    assert_eq!(p.services(), 100_000);
    for i in [0, 65_536, 99_999] {
        let run = node.client(true, "tcp", vip(i), 3);
        assert_eq!(run["failures"], 0, "service {i}: {run}");
    }
    drop(p);
    let e = node.open_sized(65_536).unwrap_err().to_string();
    assert!(e.contains("131072") && e.contains("--max-services"), "{e}");
    // At the default size the same desired state is refused past 65,536 services, the rest
    // programmed (a fresh node: the pins of the other size are gone).
    drop(node);
    let node = Node::new();
    let mut p = node.open();
    let ops = p.apply(&desired).unwrap();
    assert_eq!(p.services(), 65_536);
    assert_eq!(ops.refused.len(), 100_000 - 65_536);
    assert_eq!(ops.refused[0].reason.kind(), "services_full");
}

/// getpeername() of a translated TCP socket shows its own service address on both paths: a
/// backend with one frontend (the socket is marked, no socket storage) and a backend shared by
/// two frontends (socket storage), through the transitions between them; a connection made
/// straight to a backend's address is not marked and shows the backend.
#[test]
fn getpeername_shows_each_sockets_service_with_and_without_socket_storage() {
    let node = Node::new();
    let b1 = backend("b1", "127.0.1.21");
    let b2 = backend("b2", "127.0.1.22");
    let (vip_a, vip_b) = ("127.100.0.21:80", "127.100.0.22:80");
    let svc = |vip: &str, backends: &[SocketAddr]| DesiredService {
        frontend: frontend(vip, Proto::Tcp),
        service: None,
        tiers: [backends.iter().map(|b| spec(*b, 1)).collect(), vec![]],
        balancing: Default::default(),
    };
    let mut p = node.open();
    let sources = |vip: &str| {
        let run = node.client(true, "tcp", vip.parse().unwrap(), 20);
        assert_eq!(run["failures"], 0, "{run}");
        run["sources"].clone()
    };
    let one_frontend = |p: &node_agent::program::Programmer, b: SocketAddr| {
        p.backend(b).expect("programmed").one_frontend
    };

    // One frontend each: marked sockets.
    p.apply(&[svc(vip_a, &[b1]), svc(vip_b, &[b2])]).unwrap();
    assert!(one_frontend(&p, b1) && one_frontend(&p, b2));
    assert_eq!(sources(vip_a), serde_json::json!([vip_a]));
    assert_eq!(sources(vip_b), serde_json::json!([vip_b]));
    // Straight to the backend: not translated, not marked, the backend's address.
    assert_eq!(
        sources(&b1.to_string()),
        serde_json::json!([b1.to_string()])
    );

    // b1 shared by both frontends: socket storage, each socket its own service.
    p.apply(&[svc(vip_a, &[b1]), svc(vip_b, &[b1, b2])])
        .unwrap();
    assert!(!one_frontend(&p, b1) && one_frontend(&p, b2));
    assert_eq!(sources(vip_a), serde_json::json!([vip_a]));
    assert_eq!(sources(vip_b), serde_json::json!([vip_b]));

    // A leaves: b1 has one frontend again (B), set once the plan is carried out.
    p.apply(&[svc(vip_b, &[b1, b2])]).unwrap();
    assert!(one_frontend(&p, b1));
    assert_eq!(sources(vip_b), serde_json::json!([vip_b]));

    // b1 moves from B to a new A in one apply: B's and A's sockets each show their service.
    p.apply(&[svc(vip_a, &[b1]), svc(vip_b, &[b2])]).unwrap();
    assert!(one_frontend(&p, b1) && one_frontend(&p, b2));
    assert_eq!(sources(vip_a), serde_json::json!([vip_a]));
    assert_eq!(sources(vip_b), serde_json::json!([vip_b]));

    // A restarted agent learns the index and the flags: the same state writes nothing.
    drop(p);
    let mut p = node.open();
    let ops = p.apply(&[svc(vip_a, &[b1]), svc(vip_b, &[b2])]).unwrap();
    assert_eq!((ops.writes, ops.deletes), (0, 0), "{ops:?}");
    assert_eq!(sources(vip_a), serde_json::json!([vip_a]));
}

/// A tier's slots move between the service's value (at most `INLINE_SLOTS` backends) and
/// `CM_SLOTS` as it grows and shrinks: every step serves from exactly the wanted backends, the
/// read-back matches, and nothing is left in `CM_SLOTS` once the tier fits inline again.
#[test]
fn tiers_move_between_inline_slots_and_the_slots_map() {
    use node_agent::maps::INLINE_SLOTS;
    let node = Node::new();
    let names: [&'static str; 10] = ["i0", "i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "i9"];
    let all: Vec<SocketAddr> = names
        .iter()
        .enumerate()
        .map(|(i, n)| backend(n, &format!("127.0.1.{}", 40 + i)))
        .collect();
    let vip = "127.100.0.40:80";
    let desired = |k: usize| {
        vec![DesiredService {
            frontend: frontend(vip, Proto::Tcp),
            service: None,
            tiers: [all[..k].iter().map(|b| spec(*b, 1)).collect(), vec![]],
            balancing: Default::default(),
        }]
    };
    let mut p = node.open();
    for k in [
        2,
        INLINE_SLOTS,
        INLINE_SLOTS + 2,
        INLINE_SLOTS,
        3,
        INLINE_SLOTS + 1,
        1,
    ] {
        p.apply(&desired(k)).unwrap();
        let back = read_back(&p);
        assert_eq!(
            back[&frontend(vip, Proto::Tcp)][0],
            all[..k].to_vec(),
            "{k} backends"
        );
        let in_map = p.datapath().slots.keys().count();
        let expect = if k > INLINE_SLOTS { k } else { 0 };
        assert_eq!(in_map, expect, "CM_SLOTS entries with {k} backends");
        let run = node.client(true, "tcp", vip.parse().unwrap(), 40 * k);
        assert_eq!(run["failures"], 0, "{run}");
        let used = counts(&run);
        assert_eq!(used.len(), k, "every one of {k} backends serves: {run}");
        assert!(
            used.keys().all(|n| names[..k].contains(&n.as_str())),
            "{run}"
        );
    }
}

/// A socket translated once, then disconnected (`connect(AF_UNSPEC)`) and connected again
/// straight to another backend's address, is not marked by its first connection: its
/// getpeername() shows the backend it is connected to now, not that backend's service.
#[test]
fn a_socket_reconnected_straight_to_a_backend_shows_that_backend() {
    let node = Node::new();
    let b1 = backend("b1", "127.0.1.31");
    let b2 = backend("b2", "127.0.1.32");
    let (vip_a, vip_b) = ("127.100.0.31:80", "127.100.0.32:80");
    let svc = |vip: &str, b: SocketAddr| DesiredService {
        frontend: frontend(vip, Proto::Tcp),
        service: None,
        tiers: [vec![spec(b, 1)], vec![]],
        balancing: Default::default(),
    };
    let mut p = node.open();
    p.apply(&[svc(vip_a, b1), svc(vip_b, b2)]).unwrap();
    assert!(p.backend(b2).expect("programmed").one_frontend);
    let script = format!(
        r#"import ctypes, json, socket
libc = ctypes.CDLL(None, use_errno=True)
class Unspec(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_char * 14)]
s = socket.socket()
s.connect(("{}", {}))
first = "%s:%d" % s.getpeername()
s.recv(64)
if libc.connect(s.fileno(), ctypes.byref(Unspec(0)), ctypes.sizeof(Unspec)) != 0:
    raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
s.connect(("{}", {}))
second = "%s:%d" % s.getpeername()
print(json.dumps({{"first": first, "second": second, "answer": s.recv(64).decode().strip()}}))"#,
        "127.100.0.31",
        80,
        b2.ip(),
        b2.port()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec python3 -c '{}'",
            node.cgroup.display(),
            script.replace('\'', "'\\''")
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["first"], vip_a, "translated: the service: {v}");
    assert_eq!(v["answer"], "b2", "{v}");
    assert_eq!(
        v["second"],
        b2.to_string(),
        "reconnected straight to b2: b2, not b2's service: {v}"
    );
}

/// 20 connects through `vip`, every one answered by the backend `name`.
fn answered_only_by(node: &Node, vip: &str, name: &str) {
    let run = node.client(true, "tcp", vip.parse().unwrap(), 20);
    assert_eq!(run["failures"], 0, "{run}");
    assert_eq!(
        counts(&run).into_keys().collect::<Vec<_>>(),
        [name],
        "{run}"
    );
}

/// The ID of `addr` in `CM_BACKENDS`, read back from the kernel's address → ID map.
fn backend_id(p: &node_agent::program::Programmer, addr: SocketAddr) -> Option<u32> {
    let r = p
        .datapath()
        .backend_ids
        .get(&node_agent::maps::sockaddr_key(&addr), 0)
        .ok()?;
    Some(node_agent::maps::parse_backend_ref(&r).0)
}

/// Backends are array entries indexed by ID: a removed backend's entry is retired at once, its
/// ID rests for the grace period before another backend gets it, connects through each
/// service reach only that service's backends across the reuse, and an agent taking the maps
/// over learns the IDs in use.
#[test]
fn a_backend_id_is_reused_only_after_its_grace_period_and_never_crosses_services() {
    let node = Node::new();
    let (a1, a2, b1) = (
        backend("a-1", "127.0.1.81"),
        backend("a-2", "127.0.1.82"),
        backend("b-1", "127.0.1.83"),
    );
    let svc = |vip: &str, name: &str, be: SocketAddr| DesiredService {
        frontend: frontend(vip, Proto::Tcp),
        service: service(name),
        tiers: [vec![spec(be, 1)], vec![]],
        balancing: Default::default(),
    };
    let (vip_a, vip_b) = ("127.100.8.1:80", "127.100.8.2:80");
    let mut p = node.open();
    p.apply(&[svc(vip_a, "a", a1)]).unwrap();
    let id1 = backend_id(&p, a1).expect("a-1 has an ID");
    let freed = std::time::Instant::now();
    // a-1 replaced by a-2: a-1's entry is zero, a-2 takes a fresh ID (a-1's rests).
    let ops = p.apply(&[svc(vip_a, "a", a2)]).unwrap();
    assert_eq!(ops.deletes, 1, "{ops:?}");
    let id2 = backend_id(&p, a2).unwrap();
    assert_ne!(id2, id1, "a freed ID is not reused at once");
    assert_eq!(backend_id(&p, a1), None);
    let retired = p.datapath().backends.get(&id1, 0).unwrap();
    let b = node_agent::maps::parse_backend_val(&retired).unwrap();
    assert_eq!(
        (b.addr, b.healthy, b.one_frontend),
        (a1, false, false),
        "a removed backend is retired in place: only its state changes until the ID is reused"
    );
    // Past the grace period, the next new backend (another service's) gets a-1's ID.
    std::thread::sleep(node_agent::ids::GRACE.saturating_sub(freed.elapsed()));
    p.apply(&[svc(vip_a, "a", a2), svc(vip_b, "b", b1)])
        .unwrap();
    assert_eq!(backend_id(&p, b1), Some(id1), "rested: reused");
    // A kernel health event about a-1 queued before the reuse names ID and address: it is not
    // taken for b-1.
    assert_eq!(p.event_backend(id1, a1), None);
    assert_eq!(p.event_backend(id1, b1), Some(b1));
    answered_only_by(&node, vip_a, "a-2");
    answered_only_by(&node, vip_b, "b-1");
    // Another agent takes over: the same IDs, nothing rewritten.
    drop(p);
    let mut p = node.open();
    assert_eq!(
        (backend_id(&p, a2), backend_id(&p, b1)),
        (Some(id2), Some(id1))
    );
    let again = p
        .apply(&[svc(vip_a, "a", a2), svc(vip_b, "b", b1)])
        .unwrap();
    assert_eq!((again.writes, again.deletes), (0, 0), "{again:?}");
    // An agent stopped between a backend's writes left it without its address entry (and a
    // stale address entry naming another ID): the next agent still reserves the ID a slot
    // holds, rewrites the entry, drops the stale one, and a new backend gets another ID.
    drop(p);
    {
        let mut dp = node_agent::datapath::Datapath::open(&node.dir, &node.cgroup).unwrap();
        dp.backend_ids
            .remove(&node_agent::maps::sockaddr_key(&a2))
            .unwrap();
        dp.backend_ids
            .insert(
                node_agent::maps::sockaddr_key(&a1),
                node_agent::maps::backend_ref(id2 + 100, None),
                0,
            )
            .unwrap();
    }
    let mut p = node.open();
    assert_eq!(backend_id(&p, a2), Some(id2), "rewritten at take-over");
    assert_eq!(backend_id(&p, a1), None, "the stale entry is gone");
    let c1 = backend("c-1", "127.0.1.84");
    p.apply(&[
        svc(vip_a, "a", a2),
        svc(vip_b, "b", b1),
        svc("127.100.8.3:80", "c", c1),
    ])
    .unwrap();
    let c_id = backend_id(&p, c1).unwrap();
    assert!(c_id != id1 && c_id != id2, "{c_id}");
    answered_only_by(&node, vip_a, "a-2");
}

/// Pins left by an agent whose backends map was a hash map are refused with what to do,
/// instead of being misread as an array.
#[test]
fn pins_of_the_hash_map_layout_are_refused_with_a_drain_hint() {
    let node = Node::new();
    std::fs::create_dir_all(&node.dir).unwrap();
    let pin = node.dir.join("CM_BACKENDS");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "32",
            "entries",
            "262145",
            "name",
            "CM_BACKENDS",
            "flags",
            "1",
        ])
        .output()
        .expect("bpftool runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = node.open_sized(65_536).unwrap_err().to_string();
    assert!(
        e.contains("CM_BACKENDS") && e.contains("hash map") && e.contains("remove the pins"),
        "{e}"
    );
}
