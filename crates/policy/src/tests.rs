//! Resolution tests: the documented cross-cluster example, cluster defaults, entities,
//! verdicts, ports, NetworkPolicy, the incremental resolver against `resolve`, and the
//! performance figures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use model::{ClusterName, Label, Labels};
use serde_json::{Value, json};

use crate::*;

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

/// A pod identity as the exporter labels it: `k8s:` pod labels, `k8s-ns:` namespace labels,
/// `mesh:cluster`, `mesh:namespace`.
fn ident(
    id: u32,
    c: &str,
    ns: &str,
    pod: &[(&str, &str)],
    ns_labels: &[(&str, &str)],
) -> IdentityInfo {
    let mut labels = Labels::new()
        .with(Label::new("mesh", "cluster", c).unwrap())
        .with(Label::new("mesh", "namespace", ns).unwrap());
    for (k, v) in pod {
        labels.insert(Label::new("k8s", *k, *v).unwrap());
    }
    for (k, v) in ns_labels {
        labels.insert(Label::new("k8s-ns", *k, *v).unwrap());
    }
    IdentityInfo {
        id,
        cluster: cluster(c),
        labels,
    }
}

const EAST_XWING: u32 = 0x1_0001;
const EAST_BASE: u32 = 0x1_0002;
const WEST_BASE: u32 = 0x2_0001;
const WEST_OTHER: u32 = 0x2_0002;
const NORTH_BASE: u32 = 0x3_0001;

/// The example: x-wing in east, rebel-base in east, west and north, another pod in west.
fn star_wars() -> Vec<IdentityInfo> {
    vec![
        ident(EAST_XWING, "east", "default", &[("name", "x-wing")], &[]),
        ident(EAST_BASE, "east", "default", &[("name", "rebel-base")], &[]),
        ident(WEST_BASE, "west", "default", &[("name", "rebel-base")], &[]),
        ident(
            WEST_OTHER,
            "west",
            "default",
            &[("name", "tie-fighter")],
            &[],
        ),
        ident(
            NORTH_BASE,
            "north",
            "default",
            &[("name", "rebel-base")],
            &[],
        ),
    ]
}

fn cnp(name: &str, spec: Value) -> Policy {
    parse(&json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .unwrap()
}

fn x_wing_egress(to: Value) -> Policy {
    cnp(
        "x-wing",
        json!({
            "endpointSelector": {"matchLabels": {"name": "x-wing"}},
            "egress": [to],
        }),
    )
}

fn resolve_east(policies: &[Policy], opts: Options) -> Resolved {
    resolve(policies, &star_wars(), &cluster("east"), opts)
}

/// The remotes of an endpoint's entries of one direction and verdict.
fn remotes(r: &Resolved, ep: u32, dir: Direction, verdict: Verdict) -> BTreeSet<Remote> {
    r.endpoints[&ep]
        .entries
        .iter()
        .filter(|e| e.direction == dir && e.verdict == verdict)
        .map(|e| e.remote)
        .collect()
}

fn ids(v: &[u32]) -> BTreeSet<Remote> {
    v.iter().map(|i| Remote::Identity(*i)).collect()
}

#[test]
fn x_wing_reaches_only_the_rebel_base_of_the_cluster_its_policy_names() {
    let p = x_wing_egress(json!({"toEndpoints": [{"matchLabels": {
        "name": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}]}));
    for opts in [
        Options::default(),
        Options {
            peer_selectors_any_cluster: true,
        },
    ] {
        let r = resolve_east(std::slice::from_ref(&p), opts);
        assert_eq!(
            r.endpoints.keys().copied().collect::<Vec<_>>(),
            [EAST_XWING]
        );
        let ep = &r.endpoints[&EAST_XWING];
        assert!(ep.egress_enforced && !ep.ingress_enforced);
        // west's rebel-base only: not east's, not west's other pod, not north's
        assert_eq!(
            remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
            ids(&[WEST_BASE])
        );
        assert_eq!(
            ep.entries[0],
            PolicyEntry {
                direction: Direction::Egress,
                remote: Remote::Identity(WEST_BASE),
                proto: L4::Any,
                ports: None,
                verdict: Verdict::Allow,
                origin: std::sync::Arc::new(PolicyRef::new(
                    PolicyKind::CiliumNetworkPolicy,
                    Some("default"),
                    "x-wing"
                )),
            }
        );
    }
    // the third cluster's rebel-base once the policy names it
    let p = x_wing_egress(json!({"toEndpoints": [{
        "matchLabels": {"name": "rebel-base"},
        "matchExpressions": [{"key": "io.cilium.k8s.policy.cluster", "operator": "In", "values": ["west", "north"]}]}]}));
    let r = resolve_east(&[p], Options::default());
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        ids(&[WEST_BASE, NORTH_BASE])
    );
}

#[test]
fn a_selector_without_cluster_selects_the_local_cluster_unless_the_flag_is_set() {
    let p = x_wing_egress(json!({"toEndpoints": [{"matchLabels": {"name": "rebel-base"}}]}));
    let r = resolve_east(std::slice::from_ref(&p), Options::default());
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        ids(&[EAST_BASE])
    );
    let r = resolve_east(
        &[p],
        Options {
            peer_selectors_any_cluster: true,
        },
    );
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        ids(&[EAST_BASE, WEST_BASE, NORTH_BASE])
    );
}

#[test]
fn entities_name_reserved_identities_clusters_and_the_mesh() {
    let cases: [(&str, BTreeSet<Remote>); 5] = [
        ("world", ids(&[2])),
        ("host", ids(&[1])),
        ("cluster", ids(&[1, EAST_XWING, EAST_BASE])),
        (
            "mesh",
            ids(&[1, EAST_XWING, EAST_BASE, WEST_BASE, WEST_OTHER, NORTH_BASE]),
        ),
        ("all", BTreeSet::from([Remote::Any])),
    ];
    for (entity, want) in cases {
        let p = x_wing_egress(json!({"toEntities": [entity]}));
        let r = resolve_east(&[p], Options::default());
        assert_eq!(
            remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
            want,
            "{entity}"
        );
    }
}

#[test]
fn deny_and_allow_entries_are_both_kept_for_the_consumer() {
    let allow = x_wing_egress(json!({"toEntities": ["mesh"]}));
    let deny = cnp(
        "no-west",
        json!({
            "endpointSelector": {"matchLabels": {"name": "x-wing"}},
            "egressDeny": [{"toEndpoints": [{"matchLabels": {"io.cilium.k8s.policy.cluster": "west"}}],
                            "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}],
        }),
    );
    let r = resolve_east(&[allow, deny], Options::default());
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Deny),
        ids(&[WEST_BASE, WEST_OTHER])
    );
    let west_base: Vec<_> = r.endpoints[&EAST_XWING]
        .entries
        .iter()
        .filter(|e| e.remote == Remote::Identity(WEST_BASE))
        .map(|e| (e.proto, e.ports, e.verdict, e.origin.name.clone()))
        .collect();
    assert_eq!(
        west_base,
        [
            (
                L4::Tcp,
                Some((443, 443)),
                Verdict::Deny,
                "no-west".to_owned()
            ),
            (L4::Any, None, Verdict::Allow, "x-wing".to_owned()),
        ]
    );
}

#[test]
fn a_deny_only_policy_enforces_its_direction() {
    let deny = cnp(
        "deny",
        json!({
            "endpointSelector": {},
            "ingressDeny": [{"fromEntities": ["world"]}],
        }),
    );
    let r = resolve_east(&[deny], Options::default());
    for id in [EAST_XWING, EAST_BASE] {
        let ep = &r.endpoints[&id];
        assert!(ep.ingress_enforced && !ep.egress_enforced);
        assert_eq!(
            remotes(&r, id, Direction::Ingress, Verdict::Deny),
            ids(&[2])
        );
    }
}

#[test]
fn ports_and_port_ranges_multiply_with_peers() {
    let p = x_wing_egress(json!({
        "toEndpoints": [{"matchLabels": {"name": "rebel-base"}}],
        "toEntities": ["world"],
        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}, {"port": "8000", "endPort": 8080}]},
                    {"ports": [{"port": "53", "protocol": "UDP"}]}],
    }));
    let r = resolve_east(&[p], Options::default());
    let got: Vec<_> = r.endpoints[&EAST_XWING]
        .entries
        .iter()
        .map(|e| (e.remote, e.proto, e.ports))
        .collect();
    let mut want = Vec::new();
    for remote in [Remote::Identity(2), Remote::Identity(EAST_BASE)] {
        want.push((remote, L4::Tcp, Some((80, 80))));
        want.push((remote, L4::Udp, Some((53, 53))));
        want.push((remote, L4::Any, Some((8000, 8080))));
    }
    assert_eq!(got, want, "sorted by direction, remote, protocol, ports");

    // toPorts without peers: any peer, L4 only
    let l4 = x_wing_egress(json!({"toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}));
    let r = resolve_east(&[l4], Options::default());
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        BTreeSet::from([Remote::Any])
    );
}

#[test]
fn an_empty_rule_enforces_without_allowing() {
    let p = cnp(
        "lockdown",
        json!({"endpointSelector": {}, "ingress": [{}], "egress": [{}]}),
    );
    let r = resolve_east(&[p], Options::default());
    for id in [EAST_XWING, EAST_BASE] {
        let ep = &r.endpoints[&id];
        assert!(ep.ingress_enforced && ep.egress_enforced && ep.entries.is_empty());
    }
}

#[test]
fn endpoint_selectors_select_local_pods_of_the_policy_namespace() {
    let mut identities = star_wars();
    identities.push(ident(0x1_0003, "east", "other", &[("name", "x-wing")], &[]));
    let namespaced = x_wing_egress(json!({"toEntities": ["world"]}));
    let clusterwide = parse(&json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "bases"},
        "spec": {"endpointSelector": {"matchLabels": {"name": "rebel-base"}}, "ingress": [{}]},
    }))
    .unwrap();
    let r = resolve(
        &[namespaced, clusterwide],
        &identities,
        &cluster("east"),
        Options::default(),
    );
    // not 0x1_0003 (other namespace), not west's or north's rebel-base (other clusters)
    assert_eq!(
        r.endpoints.keys().copied().collect::<Vec<_>>(),
        [EAST_XWING, EAST_BASE]
    );
}

#[test]
fn cilium_peers_stay_in_the_policy_namespace_unless_they_name_one() {
    let identities = vec![
        ident(EAST_XWING, "east", "default", &[("name", "x-wing")], &[]),
        ident(0x1_0010, "east", "default", &[("app", "db")], &[]),
        ident(0x1_0011, "east", "prod", &[("app", "db")], &[("team", "a")]),
        ident(0x1_0012, "east", "dev", &[("app", "db")], &[("team", "b")]),
    ];
    let run = |to: Value| {
        let r = resolve(
            &[x_wing_egress(to)],
            &identities,
            &cluster("east"),
            Options::default(),
        );
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow)
    };
    assert_eq!(
        run(json!({"toEndpoints": [{"matchLabels": {"app": "db"}}]})),
        ids(&[0x1_0010])
    );
    assert_eq!(
        run(
            json!({"toEndpoints": [{"matchLabels": {"app": "db", "io.kubernetes.pod.namespace": "prod"}}]})
        ),
        ids(&[0x1_0011])
    );
    assert_eq!(
        run(
            json!({"toEndpoints": [{"matchLabels": {"app": "db"}, "matchExpressions": [
            {"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}]})
        ),
        ids(&[0x1_0010, 0x1_0011, 0x1_0012])
    );
    // namespace labels alone keep the namespace restriction (as in Cilium)
    assert_eq!(
        run(
            json!({"toEndpoints": [{"matchLabels": {"io.cilium.k8s.namespace.labels.team": "a"}}]})
        ),
        ids(&[])
    );
    assert_eq!(
        run(
            json!({"toEndpoints": [{"matchLabels": {"io.cilium.k8s.namespace.labels.team": "a"},
            "matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}]})
        ),
        ids(&[0x1_0011])
    );
}

#[test]
fn network_policy_reaches_local_peers_only_and_defaults_its_types() {
    let mut identities = star_wars();
    identities.push(ident(
        0x1_0020,
        "east",
        "prod",
        &[("name", "probe")],
        &[("team", "a")],
    ));
    identities.push(ident(
        0x2_0020,
        "west",
        "prod",
        &[("name", "probe")],
        &[("team", "a")],
    ));
    let np = |spec: Value| {
        parse(&json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "np", "namespace": "default"}, "spec": spec,
        }))
        .unwrap()
    };
    let policy = np(json!({
        "podSelector": {"matchLabels": {"name": "rebel-base"}},
        "ingress": [{"from": [
            {"podSelector": {"matchLabels": {"name": "x-wing"}}},
            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
        ], "ports": [{"port": 443}]}],
    }));
    let east = cluster("east");
    for opts in [
        Options::default(),
        Options {
            peer_selectors_any_cluster: true,
        },
    ] {
        let r = resolve(std::slice::from_ref(&policy), &identities, &east, opts);
        assert_eq!(r.endpoints.keys().copied().collect::<Vec<_>>(), [EAST_BASE]);
        let ep = &r.endpoints[&EAST_BASE];
        assert!(
            ep.ingress_enforced && !ep.egress_enforced,
            "policyTypes default to Ingress"
        );
        assert_eq!(
            remotes(&r, EAST_BASE, Direction::Ingress, Verdict::Allow),
            ids(&[EAST_XWING, 0x1_0020])
        );
        assert!(
            ep.entries
                .iter()
                .all(|e| e.proto == L4::Tcp && e.ports == Some((443, 443)))
        );
    }
    // both directions in policyTypes, no rules: deny all both ways
    let r = resolve(
        &[np(
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        )],
        &identities,
        &east,
        Options::default(),
    );
    let ep = &r.endpoints[&EAST_XWING];
    assert!(ep.ingress_enforced && ep.egress_enforced && ep.entries.is_empty());
    // an egress rule without `to`: any destination
    let r = resolve(
        &[np(json!({"podSelector": {}, "egress": [{}]}))],
        &identities,
        &east,
        Options::default(),
    );
    assert!(r.endpoints[&EAST_XWING].egress_enforced);
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        BTreeSet::from([Remote::Any])
    );
}

#[test]
fn unselected_endpoints_are_absent_and_reserved_identities_are_ignored() {
    let mut identities = star_wars();
    identities.push(ident(1, "east", "default", &[("name", "x-wing")], &[]));
    let p = x_wing_egress(json!({"toEndpoints": [{"matchLabels": {"name": "x-wing"}}]}));
    let r = resolve(&[p], &identities, &cluster("east"), Options::default());
    assert_eq!(
        r.endpoints.keys().copied().collect::<Vec<_>>(),
        [EAST_XWING]
    );
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        ids(&[EAST_XWING])
    );
}

/// xorshift64*: deterministic, dependency-free randomness for the property test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const CLUSTERS: [&str; 3] = ["east", "west", "north"];
const NAMESPACES: [&str; 2] = ["default", "prod"];
const NAMES: [&str; 3] = ["a", "b", "c"];

fn random_identity(rng: &mut Rng) -> IdentityInfo {
    let c = rng.below(CLUSTERS.len());
    let id = ((c as u32 + 1) << 16) | (rng.below(6) as u32 + 1);
    let mut pod = vec![("name", rng.pick(&NAMES))];
    if rng.chance(50) {
        pod.push(("tier", rng.pick(&["x", "y"])));
    }
    let ns_labels = if rng.chance(50) {
        vec![("team", rng.pick(&["red", "blue"]))]
    } else {
        vec![]
    };
    ident(id, CLUSTERS[c], rng.pick(&NAMESPACES), &pod, &ns_labels)
}

fn random_cilium_selector(rng: &mut Rng) -> Value {
    let mut labels = serde_json::Map::new();
    let mut exprs = Vec::new();
    if rng.chance(70) {
        labels.insert("name".into(), json!(rng.pick(&NAMES)));
    }
    if rng.chance(30) {
        labels.insert(
            "io.cilium.k8s.policy.cluster".into(),
            json!(rng.pick(&CLUSTERS)),
        );
    }
    if rng.chance(20) {
        exprs.push(json!({"key": "io.cilium.k8s.policy.cluster", "operator": "NotIn", "values": [rng.pick(&CLUSTERS)]}));
    }
    if rng.chance(30) {
        exprs.push(json!({"key": "io.kubernetes.pod.namespace", "operator": "Exists"}));
    }
    if rng.chance(20) {
        exprs.push(json!({"key": "tier", "operator": rng.pick(&["Exists", "DoesNotExist"])}));
    }
    if rng.chance(20) {
        labels.insert(
            "io.cilium.k8s.namespace.labels.team".into(),
            json!(rng.pick(&["red", "blue"])),
        );
    }
    json!({"matchLabels": labels, "matchExpressions": exprs})
}

fn random_ports(rng: &mut Rng) -> Value {
    let n = rng.below(3);
    let ports: Vec<Value> = (0..n)
        .map(|_| json!({"port": rng.pick(&["80", "443", "0"]), "protocol": rng.pick(&["TCP", "UDP", "ANY"])}))
        .collect();
    if ports.is_empty() {
        json!([])
    } else {
        json!([{"ports": ports}])
    }
}

fn random_cilium_rule(rng: &mut Rng, ingress: bool) -> Value {
    let (eps, ents) = if ingress {
        ("fromEndpoints", "fromEntities")
    } else {
        ("toEndpoints", "toEntities")
    };
    let mut r = serde_json::Map::new();
    if rng.chance(70) {
        r.insert(
            eps.into(),
            json!(
                (0..rng.below(2) + 1)
                    .map(|_| random_cilium_selector(rng))
                    .collect::<Vec<_>>()
            ),
        );
    }
    if rng.chance(30) {
        r.insert(
            ents.into(),
            json!([rng.pick(&["world", "host", "cluster", "mesh", "all"])]),
        );
    }
    r.insert("toPorts".into(), random_ports(rng));
    Value::Object(r)
}

fn random_policy(rng: &mut Rng) -> Policy {
    let name = rng.pick(&["p1", "p2", "p3", "p4"]);
    let ns = rng.pick(&NAMESPACES);
    let obj = match rng.below(3) {
        0 | 1 => {
            let kind = if rng.chance(50) {
                "CiliumNetworkPolicy"
            } else {
                "CiliumClusterwideNetworkPolicy"
            };
            let mut spec = serde_json::Map::new();
            let subject = if rng.chance(30) {
                json!({})
            } else {
                json!({"matchLabels": {"name": rng.pick(&NAMES)}})
            };
            spec.insert("endpointSelector".into(), subject);
            for (field, ingress) in [
                ("ingress", true),
                ("ingressDeny", true),
                ("egress", false),
                ("egressDeny", false),
            ] {
                if rng.chance(40) {
                    let rules: Vec<Value> = (0..rng.below(2) + 1)
                        .map(|_| random_cilium_rule(rng, ingress))
                        .collect();
                    spec.insert(field.into(), json!(rules));
                }
            }
            json!({"apiVersion": "cilium.io/v2", "kind": kind,
                   "metadata": {"name": name, "namespace": ns}, "spec": spec})
        }
        _ => {
            let peer = |rng: &mut Rng| match rng.below(3) {
                0 => json!({"podSelector": {"matchLabels": {"name": rng.pick(&NAMES)}}}),
                1 => {
                    json!({"namespaceSelector": {"matchLabels": {"team": rng.pick(&["red", "blue"])}}})
                }
                _ => json!({"podSelector": {}, "namespaceSelector": {}}),
            };
            let mut spec = serde_json::Map::new();
            spec.insert(
                "podSelector".into(),
                json!({"matchLabels": {"name": rng.pick(&NAMES)}}),
            );
            if rng.chance(50) {
                spec.insert(
                    "ingress".into(),
                    json!([{"from": (0..rng.below(2)).map(|_| peer(rng)).collect::<Vec<_>>()}]),
                );
            }
            if rng.chance(50) {
                spec.insert(
                    "egress".into(),
                    json!([{"to": (0..rng.below(2)).map(|_| peer(rng)).collect::<Vec<_>>(),
                                                     "ports": [{"port": 53, "protocol": "UDP"}]}]),
                );
            }
            if rng.chance(30) {
                spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
            }
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": name, "namespace": ns}, "spec": spec})
        }
    };
    parse(&obj).unwrap_or_else(|e| panic!("generated policy refused: {e}: {obj}"))
}

#[test]
fn the_incremental_resolver_always_equals_a_full_resolve() {
    let east = cluster("east");
    for (seed, any_cluster) in [
        (0x5EED_u64, false),
        (0xBEEF, true),
        (0xC0FFEE, false),
        (0xF00D, true),
    ] {
        let opts = Options {
            peer_selectors_any_cluster: any_cluster,
        };
        let mut rng = Rng(seed);
        let mut resolver = Resolver::new(east.clone(), opts);
        let mut policies: BTreeMap<PolicyRef, Policy> = BTreeMap::new();
        let mut identities: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
        let mut before = Resolved::default();
        for step in 0..600 {
            let changed = match rng.below(10) {
                0..=3 => {
                    let i = random_identity(&mut rng);
                    identities.insert(i.id, i.clone());
                    resolver.upsert_identity(i)
                }
                4 => {
                    let Some(&id) = identities.keys().nth(rng.below(identities.len().max(1)))
                    else {
                        continue;
                    };
                    identities.remove(&id);
                    resolver.remove_identity(id)
                }
                5..=7 => {
                    let p = random_policy(&mut rng);
                    policies.insert(p.origin.clone(), p.clone());
                    resolver.upsert_policy(p)
                }
                _ => {
                    let Some(origin) = policies
                        .keys()
                        .nth(rng.below(policies.len().max(1)))
                        .cloned()
                    else {
                        continue;
                    };
                    policies.remove(&origin);
                    resolver.remove_policy(&origin)
                }
            };
            let ps: Vec<Policy> = policies.values().cloned().collect();
            let is: Vec<IdentityInfo> = identities.values().cloned().collect();
            let want = resolve(&ps, &is, &east, opts);
            let got = resolver.snapshot();
            assert_eq!(got, want, "seed {seed:#x} step {step}");
            let really: BTreeSet<u32> = want
                .endpoints
                .keys()
                .chain(before.endpoints.keys())
                .filter(|id| want.endpoints.get(id) != before.endpoints.get(id))
                .copied()
                .collect();
            assert_eq!(changed, really, "changed set, seed {seed:#x} step {step}");
            for (id, ep) in &want.endpoints {
                assert_eq!(resolver.endpoint(*id), Some(ep));
            }
            before = want;
        }
        assert!(
            !before.endpoints.is_empty(),
            "the sequence ends with selected endpoints"
        );
    }
}

/// Figures for the benchmark: 10,000 identities × 100 local endpoints. Prints, never
/// asserts a time. Run with `cargo test -p policy --release -- --nocapture performance`.
#[test]
fn performance_of_10000_identities_and_100_endpoints() {
    let east = cluster("east");
    let clusters = ["east", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"];
    let mut identities = Vec::new();
    for i in 0..100u32 {
        identities.push(ident(
            0x1_0000 | (i + 1),
            "east",
            "default",
            &[("app", &format!("app-{}", i % 20))],
            &[],
        ));
    }
    for i in 0..9_900u32 {
        let c = 1 + (i % 9) as usize;
        let id = ((c as u32 + 1) << 16) | (i / 9 + 1);
        identities.push(ident(
            id,
            clusters[c],
            "default",
            &[("app", &format!("svc-{}", i % 50))],
            &[],
        ));
    }
    let mut policies = Vec::new();
    for j in 0..20 {
        let svcs: Vec<String> = (0..5)
            .map(|k| format!("svc-{}", (j * 5 + k) % 50))
            .collect();
        policies.push(cnp(
            &format!("app-{j}"),
            json!({
                "endpointSelector": {"matchLabels": {"app": format!("app-{j}")}},
                "egress": [{"toEndpoints": [{"matchExpressions": [
                    {"key": "app", "operator": "In", "values": svcs},
                    {"key": "io.cilium.k8s.policy.cluster", "operator": "Exists"}]}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}, {"port": "443", "protocol": "TCP"}]}]}],
                "egressDeny": [{"toEntities": ["world"]}],
            }),
        ));
    }
    policies.push(
        parse(&json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": "mesh-ingress"},
            "spec": {"endpointSelector": {}, "ingress": [{"fromEntities": ["mesh"],
                     "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]},
        }))
        .unwrap(),
    );

    let t = Instant::now();
    let full = resolve(&policies, &identities, &east, Options::default());
    let full_time = t.elapsed();
    let entries: usize = full.endpoints.values().map(|e| e.entries.len()).sum();
    assert_eq!(full.endpoints.len(), 100);

    let t = Instant::now();
    let mut resolver = Resolver::new(east.clone(), Options::default());
    for p in &policies {
        resolver.upsert_policy(p.clone());
    }
    for i in &identities {
        resolver.upsert_identity(i.clone());
    }
    let load_time = t.elapsed();
    let t = Instant::now();
    let mut identities_first = Resolver::new(east.clone(), Options::default());
    for i in &identities {
        identities_first.upsert_identity(i.clone());
    }
    for p in &policies {
        identities_first.upsert_policy(p.clone());
    }
    let load_identities_first = t.elapsed();
    drop(identities_first);

    // one remote identity changes labels: leaves svc-0's policies, joins svc-7's
    let mut moved = identities[100].clone();
    moved
        .labels
        .insert(Label::new("k8s", "app", "svc-7").unwrap());
    let t = Instant::now();
    let changed = resolver.upsert_identity(moved.clone());
    let change_time = t.elapsed();
    // what the agent does next: read the changed endpoints (their sorted lists are rebuilt)
    let t = Instant::now();
    let reread: usize = changed
        .iter()
        .map(|id| resolver.endpoint(*id).map_or(0, |e| e.entries.len()))
        .sum();
    let reread_time = t.elapsed();

    // a new local endpoint appears
    let fresh = ident(0x1_0000 | 500, "east", "default", &[("app", "app-3")], &[]);
    let t = Instant::now();
    let changed_local = resolver.upsert_identity(fresh.clone());
    let local_time = t.elapsed();

    let mut after = identities.clone();
    after[100] = moved;
    after.push(fresh);
    assert_eq!(
        resolver.snapshot(),
        resolve(&policies, &after, &east, Options::default())
    );

    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "policy performance ({build} build): {} identities, {} endpoints, {} policies\n  \
         resolve: {full_time:?}, {entries} entries ({:.0} per endpoint)\n  \
         Resolver initial load: {load_time:?} (policies first), \
         {load_identities_first:?} (identities first)\n  \
         one remote identity relabelled: {change_time:?}, {} endpoints changed; \
         reading them back: {reread_time:?} ({reread} entries)\n  \
         one local identity added: {local_time:?}, {} endpoints changed\n  \
         entry size: {} bytes ({:.0} MB for the sorted lists)",
        identities.len(),
        full.endpoints.len(),
        policies.len(),
        entries as f64 / full.endpoints.len() as f64,
        changed.len(),
        changed_local.len(),
        std::mem::size_of::<PolicyEntry>(),
        (entries * std::mem::size_of::<PolicyEntry>()) as f64 / 1e6,
    );
}

/// A peer cannot pass for another cluster's workloads by putting that cluster's name in its
/// identities' labels: the cluster a selector matches is the identity's origin.
#[test]
fn a_spoofed_cluster_label_does_not_select() {
    let p = x_wing_egress(json!({"toEndpoints": [{"matchLabels": {
        "name": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}]}));
    let mut identities = star_wars();
    let mut spoof = ident(0x3_0009, "north", "default", &[("name", "rebel-base")], &[]);
    spoof
        .labels
        .insert(Label::new("mesh", "cluster", "west").unwrap());
    identities.push(spoof);
    let r = resolve(&[p], &identities, &cluster("east"), Options::default());
    assert_eq!(
        remotes(&r, EAST_XWING, Direction::Egress, Verdict::Allow),
        ids(&[WEST_BASE]),
        "north's identity claiming mesh:cluster=west is not west's"
    );
}
