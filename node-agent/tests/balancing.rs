//! Proportional spill-over and per-cluster weights (ADR 0019), decided in the kernel per
//! connection, from the healthy counts the agent keeps in the maps. Real connects from a
//! process in the node's cgroup. Needs root and bpffs (scripts/setup.sh mounts it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::{Node, backend, spec};
use node_agent::maps::{Frontend, Proto};
use node_agent::program::{Balancing, DesiredService};
use serde_json::Value;

const N: usize = 10_000;

/// The share of a run's connections (in %) answered by backends whose name starts with
/// `prefix`; the run must have had no failure.
fn share(run: &Value, prefix: &str) -> f64 {
    assert_eq!(run["failures"], 0, "{run}");
    let counts = run["counts"].as_object().unwrap();
    let total: u64 = counts.values().map(|n| n.as_u64().unwrap()).sum();
    let hits: u64 = counts
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum();
    hits as f64 * 100.0 / total as f64
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    println!("{what}: {got:.1} % (want {want} ± {tolerance})");
    assert!(
        (got - want).abs() <= tolerance,
        "{what}: {got:.2} %, want {want} ± {tolerance}"
    );
}

/// Four local backends, factor 1.4: killing 1, 2, 3 and 4 of them moves 0, 30, 65 and 100 % of
/// new connections to the remote tier — never all at once; below the minimum of healthy local
/// backends the local tier is skipped.
#[test]
fn spill_over_is_proportional_to_the_healthy_local_backends() {
    let node = Node::new();
    let mut p = node.open();
    let locals: Vec<SocketAddr> = ["local-1", "local-2", "local-3", "local-4"]
        .iter()
        .enumerate()
        .map(|(i, n)| backend(n, &format!("127.0.1.{}", 51 + i)))
        .collect();
    let remote = backend("remote-1", "127.0.2.51");
    let vip: SocketAddr = "127.100.8.1:80".parse().unwrap();
    let mut svc = DesiredService {
        frontend: Frontend {
            addr: vip,
            proto: Proto::Tcp,
        },
        service: None,
        tiers: [
            locals.iter().map(|a| spec(*a, 1)).collect(),
            vec![spec(remote, 2)],
        ],
        balancing: Balancing {
            overprov_pct: 140,
            min_healthy: 0,
            groups: Vec::new(),
        },
    };
    p.apply(std::slice::from_ref(&svc)).unwrap();
    for (dead, want) in [(0, 0.0), (1, 0.0), (2, 30.0), (3, 65.0), (4, 100.0)] {
        if dead > 0 {
            assert!(p.set_health(locals[dead - 1], false).unwrap());
        }
        let shares = p.shares()[&svc.frontend].clone();
        assert_eq!(
            f64::from(shares[1]),
            want,
            "/state shows the share: {shares:?}"
        );
        let run = node.client(true, "tcp", vip, N);
        within(
            &format!("{dead} of 4 local backends down: to the remote tier"),
            share(&run, "remote"),
            want,
            3.0,
        );
    }
    // Back up: all local again.
    for a in &locals {
        p.set_health(*a, true).unwrap();
    }
    let run = node.client(true, "tcp", vip, 1000);
    assert_eq!(run["counts"].get("remote-1"), None, "{run}");
    // A minimum of 3 healthy local backends: with 2, the local tier is skipped.
    svc.balancing.min_healthy = 3;
    p.apply(std::slice::from_ref(&svc)).unwrap();
    p.set_health(locals[0], false).unwrap();
    p.set_health(locals[1], false).unwrap();
    let run = node.client(true, "tcp", vip, 1000);
    assert_eq!(run["counts"]["remote-1"], 1000, "below the minimum: {run}");
    // The agent's counts follow a kernel suspicion too (note_suspect), not only its own.
    svc.balancing.min_healthy = 0;
    p.apply(std::slice::from_ref(&svc)).unwrap();
    p.set_health(locals[0], true).unwrap();
    p.set_health(locals[1], true).unwrap();
    p.note_suspect(locals[2], true).unwrap();
    p.note_suspect(locals[3], true).unwrap();
    let run = node.client(true, "tcp", vip, N);
    within(
        "2 of 4 local backends suspect: to the remote tier",
        share(&run, "remote"),
        30.0,
        3.0,
    );
}

/// Weights 90/10 and 50/50 between two clusters hold over 10,000 connections; a cluster with
/// no healthy backend gives its share to the others; clusters not named are the last resort.
#[test]
fn cluster_weights_split_new_connections() {
    let node = Node::new();
    let mut p = node.open();
    let east = [
        backend("east-1", "127.0.1.61"),
        backend("east-2", "127.0.1.62"),
    ];
    let west = [
        backend("west-1", "127.0.2.61"),
        backend("west-2", "127.0.2.62"),
    ];
    let south = backend("south-1", "127.0.3.61");
    let vip: SocketAddr = "127.100.9.1:80".parse().unwrap();
    let weighted = |e: u16, w: u16| DesiredService {
        frontend: Frontend {
            addr: vip,
            proto: Proto::Tcp,
        },
        service: None,
        tiers: [
            vec![
                spec(east[0], 1),
                spec(east[1], 1),
                spec(west[0], 2),
                spec(west[1], 2),
                spec(south, 3),
            ],
            vec![],
        ],
        balancing: Balancing {
            overprov_pct: 140,
            min_healthy: 0,
            groups: vec![(2, e), (2, w), (1, 0)],
        },
    };
    for (e, w) in [(90, 10), (50, 50)] {
        let ops = p.apply(&[weighted(e, w)]).unwrap();
        assert!(ops.refused.is_empty(), "{ops:?}");
        let run = node.client(true, "tcp", vip, N);
        within(
            &format!("weights {e}/{w}: east"),
            share(&run, "east"),
            f64::from(e),
            2.0,
        );
        within(
            &format!("weights {e}/{w}: west"),
            share(&run, "west"),
            f64::from(w),
            2.0,
        );
        assert_eq!(share(&run, "south"), 0.0, "weight 0 while others serve");
    }
    // West dead: its weight goes to east.
    p.apply(&[weighted(90, 10)]).unwrap();
    p.set_health(west[0], false).unwrap();
    p.set_health(west[1], false).unwrap();
    let run = node.client(true, "tcp", vip, 2000);
    assert_eq!(share(&run, "east"), 100.0, "{run}");
    // Everyone named dead: the cluster not named serves.
    p.set_health(east[0], false).unwrap();
    p.set_health(east[1], false).unwrap();
    let run = node.client(true, "tcp", vip, 200);
    assert_eq!(run["counts"]["south-1"], 200, "{run}");
    // More groups than a tier holds: that service alone is refused.
    let mut bad = weighted(1, 1);
    bad.balancing.groups = vec![(1, 1); 10];
    let ops = p.apply(&[bad]).unwrap();
    assert_eq!(ops.refused.len(), 1);
    assert_eq!(ops.refused[0].reason.kind(), "bad_groups");
}

/// More cluster groups than fit in the service's value (a `CM_GROUPS` entry) split as the
/// weights say too, follow health, and a service moves between the two layouts (five groups
/// → two, which fit inline → five again) without a connection lost or misdirected.
#[test]
fn many_cluster_groups_use_the_groups_map_and_move_to_and_from_the_service_value() {
    let node = Node::new();
    let mut p = node.open();
    let names = ["one", "two", "three", "four", "five"];
    let backends: Vec<SocketAddr> = names
        .iter()
        .enumerate()
        .map(|(i, n)| backend(n, &format!("127.0.4.{}", 61 + i)))
        .collect();
    let vip: SocketAddr = "127.100.9.2:80".parse().unwrap();
    let weighted = |groups: Vec<(u16, u16)>| DesiredService {
        frontend: Frontend {
            addr: vip,
            proto: Proto::Tcp,
        },
        service: None,
        tiers: [
            backends
                .iter()
                .enumerate()
                .map(|(i, b)| spec(*b, i as u16 + 1))
                .collect(),
            vec![],
        ],
        balancing: Balancing {
            overprov_pct: 140,
            min_healthy: 0,
            groups,
        },
    };
    let five = vec![(1, 40), (1, 30), (1, 10), (1, 10), (1, 10)];
    // A canary next to it, its two groups in its own value; then deleted: the five-group
    // service's CM_GROUPS entry is not touched (the canary never held one).
    let canary_vip: SocketAddr = "127.100.9.3:80".parse().unwrap();
    let canary = DesiredService {
        frontend: Frontend {
            addr: canary_vip,
            proto: Proto::Tcp,
        },
        tiers: [vec![spec(backends[0], 1), spec(backends[1], 2)], vec![]],
        balancing: Balancing {
            overprov_pct: 0,
            min_healthy: 0,
            groups: vec![(1, 90), (1, 10)],
        },
        service: None,
    };
    let ops = p.apply(&[weighted(five.clone()), canary]).unwrap();
    assert!(ops.refused.is_empty(), "{ops:?}");
    let run = node.client(true, "tcp", canary_vip, N);
    within("canary: one", share(&run, "one"), 90.0, 2.0);
    p.apply(&[weighted(five.clone())]).unwrap();
    let run = node.client(true, "tcp", vip, N);
    for (name, want) in names.iter().zip([40.0, 30.0, 10.0, 10.0, 10.0]) {
        within(
            &format!("five groups: {name}"),
            share(&run, name),
            want,
            2.0,
        );
    }
    // "one" dead: its 40 goes to the others in proportion (30/60, 10/60 ×3).
    p.set_health(backends[0], false).unwrap();
    let run = node.client(true, "tcp", vip, N);
    assert_eq!(share(&run, "one"), 0.0, "{run}");
    within("one dead: two", share(&run, "two"), 50.0, 2.0);
    within("one dead: three", share(&run, "three"), 100.0 / 6.0, 2.0);
    p.set_health(backends[0], true).unwrap();
    // Two groups (fit in the value), then five again.
    let two = vec![(2, 90), (3, 10)];
    p.apply(&[weighted(two)]).unwrap();
    let run = node.client(true, "tcp", vip, N);
    within(
        "two groups: one and two",
        share(&run, "one") + share(&run, "two"),
        90.0,
        2.0,
    );
    p.apply(&[weighted(five)]).unwrap();
    let run = node.client(true, "tcp", vip, N);
    within("five again: one", share(&run, "one"), 40.0, 2.0);
    within("five again: five", share(&run, "five"), 10.0, 2.0);
}
