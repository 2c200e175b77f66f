//! Parser tests: what is read, how defaults apply, and that every refusal names its field.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::*;
use crate::rule::{Direction, Entity, Peers, PolicyKind, Verdict};
use crate::selector::{ClusterScope, Selector};

fn cnp(spec: Value) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "p", "namespace": "ns1"},
        "spec": spec,
    })
}

fn ccnp(spec: Value) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    })
}

fn netpol(spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "np", "namespace": "ns1"},
        "spec": spec,
    })
}

fn mesh(key: &str, value: &str) -> Requirement {
    Requirement::equals("mesh", key, value)
}

fn pod(key: &str, value: &str) -> Requirement {
    Requirement::equals("k8s", key, value)
}

#[test]
fn cilium_keys_are_read_as_cilium_users_write_them() {
    let p = parse(&cnp(json!({
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "egress": [{"toEndpoints": [{
            "matchLabels": {
                "k8s:tier": "db",
                "io.kubernetes.pod.namespace": "other",
                "io.cilium.k8s.namespace.labels.team": "blue",
            },
            "matchExpressions": [
                {"key": "any:role", "operator": "Exists"},
                {"key": "io.cilium.k8s.policy.cluster", "operator": "In", "values": ["west", "north"]},
            ],
        }]}],
    })))
    .unwrap();
    let rule = &p.rules[0];
    assert_eq!(
        rule.subject,
        Selector {
            requirements: vec![pod("app", "a"), mesh("namespace", "ns1")],
            cluster: ClusterScope::Local,
        }
    );
    let Peers::Listed { selectors, .. } = &rule.peer_rules[0].peers else {
        panic!("listed peers expected");
    };
    let mut want = Selector {
        requirements: vec![
            mesh("namespace", "other"),
            Requirement::equals("k8s-ns", "team", "blue"),
            pod("tier", "db"),
            Requirement {
                source: Source::Any,
                key: "role".into(),
                op: Op::Exists,
            },
            Requirement {
                source: Source::Exact("mesh".into()),
                key: "cluster".into(),
                op: Op::In(BTreeSet::from(["north".to_owned(), "west".to_owned()])),
            },
        ],
        // names the cluster itself, and the namespace: no defaults added
        cluster: ClusterScope::Any,
    };
    // matchLabels order depends on serde_json's map: compare as sets
    let mut got = selectors.clone();
    got[0].requirements.sort();
    want.requirements.sort();
    assert_eq!(got, vec![want]);
}

#[test]
fn cilium_peers_default_to_the_policy_namespace_and_local_cluster() {
    let p = parse(&cnp(json!({
        "endpointSelector": {},
        "ingress": [{"fromEndpoints": [{}, {"matchExpressions": [
            {"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}]}],
    })))
    .unwrap();
    let Peers::Listed { selectors, .. } = &p.rules[0].peer_rules[0].peers else {
        panic!("listed peers expected");
    };
    assert_eq!(selectors[0].requirements, vec![mesh("namespace", "ns1")]);
    assert_eq!(selectors[0].cluster, ClusterScope::LocalByDefault);
    assert_eq!(selectors[1].requirements.len(), 1, "no namespace added");
    assert_eq!(selectors[1].cluster, ClusterScope::LocalByDefault);
}

#[test]
fn clusterwide_selectors_are_not_namespace_restricted() {
    let p = parse(&ccnp(json!({
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}]}],
    })))
    .unwrap();
    assert_eq!(p.origin.kind, PolicyKind::CiliumClusterwideNetworkPolicy);
    assert_eq!(p.origin.namespace, None);
    assert_eq!(p.rules[0].subject.requirements, vec![pod("app", "a")]);
    let Peers::Listed { selectors, .. } = &p.rules[0].peer_rules[0].peers else {
        panic!("listed peers expected");
    };
    assert_eq!(selectors[0].requirements, vec![pod("app", "b")]);
}

#[test]
fn spec_and_specs_both_give_rules() {
    let mut obj = cnp(json!({"endpointSelector": {}}));
    obj["specs"] = json!([{"endpointSelector": {}}, {"endpointSelector": {}}]);
    assert_eq!(parse(&obj).unwrap().rules.len(), 3);
    obj.as_object_mut().unwrap().remove("spec");
    assert_eq!(parse(&obj).unwrap().rules.len(), 2);
}

#[test]
fn cilium_rule_shapes_decide_peers_ports_and_enforcement() {
    let p = parse(&cnp(json!({
        "endpointSelector": {},
        "ingress": [
            {},
            {"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}]},
            {"fromEntities": ["world", "host"]},
            {"fromEntities": ["all", "cluster"], "toPorts": [{"ports": [{"port": "8000", "endPort": 8080}]}]},
        ],
        "egressDeny": [{"toEntities": ["mesh"], "toPorts": [{"ports": [{"port": "0", "protocol": "UDP"}]}]}],
    })))
    .unwrap();
    let r = &p.rules[0];
    assert!(r.enforce_ingress && r.enforce_egress);
    let none = Peers::Listed {
        selectors: vec![],
        entities: BTreeSet::new(),
    };
    assert_eq!(r.peer_rules[0].peers, none);
    assert!(r.peer_rules[0].ports.is_empty());
    assert_eq!(r.peer_rules[1].peers, Peers::Any);
    assert_eq!(
        r.peer_rules[1].ports,
        vec![
            PortSpec {
                proto: L4::Tcp,
                ports: Some((80, 80))
            },
            PortSpec {
                proto: L4::Udp,
                ports: Some((53, 53))
            },
        ]
    );
    assert_eq!(
        r.peer_rules[2].peers,
        Peers::Listed {
            selectors: vec![],
            entities: BTreeSet::from([Entity::World, Entity::Host]),
        }
    );
    assert_eq!(r.peer_rules[3].peers, Peers::Any);
    assert_eq!(
        r.peer_rules[3].ports,
        vec![PortSpec {
            proto: L4::Any,
            ports: Some((8000, 8080))
        }]
    );
    let deny = &r.peer_rules[4];
    assert_eq!(
        (deny.direction, deny.verdict),
        (Direction::Egress, Verdict::Deny)
    );
    assert_eq!(
        deny.ports,
        vec![PortSpec {
            proto: L4::Udp,
            ports: None
        }]
    );
}

#[test]
fn enable_default_deny_false_keeps_the_direction_open() {
    let p = parse(&cnp(json!({
        "endpointSelector": {},
        "enableDefaultDeny": {"ingress": false},
        "ingress": [{"fromEntities": ["world"]}],
        "egressDeny": [{"toEntities": ["world"]}],
    })))
    .unwrap();
    assert!(!p.rules[0].enforce_ingress);
    assert!(p.rules[0].enforce_egress, "deny rules enforce too");
    let empty = parse(&cnp(json!({"endpointSelector": {}, "ingress": []}))).unwrap();
    assert!(!empty.rules[0].enforce_ingress, "an empty list is no rule");
}

#[test]
fn network_policy_types_default_as_kubernetes() {
    // (spec, ingress enforced, egress enforced, number of peer rules)
    let cases = [
        (json!({"podSelector": {}}), true, false, 0),
        (json!({"podSelector": {}, "egress": [{}]}), true, true, 1),
        (json!({"podSelector": {}, "egress": []}), true, false, 0),
        (
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
            false,
            true,
            0,
        ),
        // ingress rules of a direction not in policyTypes are dropped
        (
            json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
            false,
            true,
            0,
        ),
        (
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}]}),
            true,
            true,
            1,
        ),
    ];
    for (spec, ingress, egress, rules) in cases {
        let p = parse(&netpol(spec.clone())).unwrap();
        let r = &p.rules[0];
        assert_eq!(
            (r.enforce_ingress, r.enforce_egress, r.peer_rules.len()),
            (ingress, egress, rules),
            "{spec}"
        );
    }
}

#[test]
fn network_policy_peers_combine_pod_and_namespace_selectors() {
    let p = parse(&netpol(json!({
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"app": "web"}}},
                {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                {"podSelector": {"matchLabels": {"app": "web"}}, "namespaceSelector": {}},
            ],
            "ports": [{"port": 5432}, {"protocol": "UDP", "port": 1000, "endPort": 2000}, {}],
        }, {}],
    })))
    .unwrap();
    let r = &p.rules[0];
    assert_eq!(
        r.subject.requirements,
        vec![pod("app", "db"), mesh("namespace", "ns1")]
    );
    let Peers::Listed { selectors, .. } = &r.peer_rules[0].peers else {
        panic!("listed peers expected");
    };
    let reqs: Vec<_> = selectors.iter().map(|s| s.requirements.clone()).collect();
    assert_eq!(
        reqs,
        vec![
            vec![pod("app", "web"), mesh("namespace", "ns1")],
            vec![Requirement::equals("k8s-ns", "team", "a")],
            vec![pod("app", "web")],
        ]
    );
    assert!(selectors.iter().all(|s| s.cluster == ClusterScope::Local));
    assert_eq!(
        r.peer_rules[0].ports,
        vec![
            PortSpec {
                proto: L4::Tcp,
                ports: Some((5432, 5432))
            },
            PortSpec {
                proto: L4::Udp,
                ports: Some((1000, 2000))
            },
            PortSpec {
                proto: L4::Tcp,
                ports: None
            },
        ]
    );
    assert_eq!(r.peer_rules[1].peers, Peers::Any, "no from: every source");
}

#[test]
fn every_refusal_names_its_field() {
    let sel = json!({"endpointSelector": {}});
    let with = |extra: Value| {
        let mut s = sel.clone();
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        cnp(s)
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(
                json!({"egress": [{"toPorts": [{"ports": [{"port": "80"}, {"port": "80", "endPort": 79}]}]}]}),
            ),
            "spec.egress[0].toPorts[0].ports[1].endPort: must be >= port (80)",
        ),
        (
            with(json!({"ingress": [{"toPorts": [{"ports": [{"port": "http"}]}]}]})),
            "spec.ingress[0].toPorts[0].ports[0].port: named port \"http\" is not supported, give the port number",
        ),
        (
            with(json!({"ingress": [{"toPorts": [{"ports": [{"port": "70000"}]}]}]})),
            "spec.ingress[0].toPorts[0].ports[0].port: 70000 is out of range (0-65535)",
        ),
        (
            with(json!({"ingress": [{"toPorts": [{"ports": [{"endPort": 90}]}]}]})),
            "spec.ingress[0].toPorts[0].ports[0].port: required",
        ),
        (
            with(json!({"ingress": [{"toPorts": [{"ports": [{"port": "0", "endPort": 90}]}]}]})),
            "spec.ingress[0].toPorts[0].ports[0].endPort: needs a port number to start from",
        ),
        (
            with(
                json!({"ingress": [{"toPorts": [{"ports": [{"port": "1", "protocol": "SCTP"}]}]}]}),
            ),
            "spec.ingress[0].toPorts[0].ports[0].protocol: protocol \"SCTP\" is not supported (accepted: TCP, UDP, ANY)",
        ),
        (
            with(json!({"ingress": [{"toPorts": [{"ports": []}]}]})),
            "spec.ingress[0].toPorts[0].ports: must list at least one port",
        ),
        (
            with(
                json!({"ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": []}}]}]}),
            ),
            "spec.ingress[0].toPorts[0].rules: L7 rules are not supported",
        ),
        (
            with(json!({"egress": [{"toCIDR": ["10.0.0.0/8"]}]})),
            "spec.egress[0].toCIDR: CIDR peers are not supported",
        ),
        (
            with(json!({"egress": [{"toFQDNs": [{"matchName": "x"}]}]})),
            "spec.egress[0].toFQDNs: FQDN peers are not supported",
        ),
        (
            with(json!({"egress": [{"fromEndpoints": [{}]}]})),
            "spec.egress[0].fromEndpoints: unknown field",
        ),
        (
            with(json!({"egressDeny": [{"toEntities": ["world", "kube-apiserver"]}]})),
            "spec.egressDeny[0].toEntities[1]: entity \"kube-apiserver\" is not supported (accepted: world, host, cluster, mesh, all)",
        ),
        (
            with(json!({"ingressDeny": [{"fromEntities": ["galaxy"]}]})),
            "spec.ingressDeny[0].fromEntities[0]: unknown entity \"galaxy\" (accepted: world, host, cluster, mesh, all)",
        ),
        (
            with(
                json!({"ingress": [{"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}]}]}),
            ),
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: unknown operator \"Equals\" (accepted: In, NotIn, Exists, DoesNotExist)",
        ),
        (
            with(
                json!({"ingress": [{"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "In"}]}]}]}),
            ),
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator In needs at least one value",
        ),
        (
            with(
                json!({"ingress": [{"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}]}]}),
            ),
            "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator Exists needs no values",
        ),
        (
            with(json!({"ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]})),
            "spec.ingress[0].fromEndpoints[0].matchLabels.reserved:host: reserved labels in selectors are (use fromEntities/toEntities) not supported",
        ),
        (
            with(
                json!({"ingress": [{"fromEndpoints": [{"matchLabels": {"cidr:10.0.0.0/8": ""}}]}]}),
            ),
            "spec.ingress[0].fromEndpoints[0].matchLabels.cidr:10.0.0.0/8: label source \"cidr\" is not supported (accepted: k8s, any)",
        ),
        (
            with(json!({"ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a b"}}]}]})),
            "spec.ingress[0].fromEndpoints[0].matchLabels.app: invalid label",
        ),
        (
            with(json!({"ingress": [{"fromEndpoints": [{"matchLabels": {"app": 3}}]}]})),
            "spec.ingress[0].fromEndpoints[0].matchLabels.app: must be a string",
        ),
        (
            with(json!({"ingress": {"fromEndpoints": []}})),
            "spec.ingress: must be a list",
        ),
        (
            with(json!({"enableDefaultDeny": {"ingress": "no"}})),
            "spec.enableDefaultDeny.ingress: must be true or false",
        ),
        (
            with(json!({"nodeSelector": {}})),
            "spec.nodeSelector: host policies (nodeSelector) are not supported",
        ),
        (
            cnp(json!({"ingress": []})),
            "spec.endpointSelector: required",
        ),
        (
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                   "metadata": {"name": "p", "namespace": "n"},
                   "specs": [{"endpointSelector": {}}, {"endpointSelector": {"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "x"}}}]}),
            "specs[1].endpointSelector.matchLabels.io.cilium.k8s.policy.serviceaccount: service account selectors are not supported",
        ),
        (
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"}, "spec": {}}),
            "metadata.namespace: required",
        ),
        (
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "n"}}),
            "spec: required",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Pod"}),
            "v1/Pod is not a policy kind (cilium.io/v2 CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy, networking.k8s.io/v1 NetworkPolicy)",
        ),
        (
            netpol(
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}),
            ),
            "spec.ingress[0].from[0].ipBlock: ipBlock peers are not supported",
        ),
        (
            netpol(json!({"podSelector": {}, "egress": [{"to": [{}]}]})),
            "spec.egress[0].to[0]: must set podSelector or namespaceSelector",
        ),
        (
            netpol(
                json!({"podSelector": {}, "egress": [{"ports": [{"protocol": "SCTP", "port": 1}]}]}),
            ),
            "spec.egress[0].ports[0].protocol: SCTP is not supported",
        ),
        (
            netpol(json!({"podSelector": {}, "egress": [{"ports": [{"port": "http"}]}]})),
            "spec.egress[0].ports[0].port: named port \"http\" is not supported, give the port number",
        ),
        (
            netpol(json!({"podSelector": {}, "egress": [{"ports": [{"port": 0}]}]})),
            "spec.egress[0].ports[0].port: 0 is out of range (1-65535)",
        ),
        (
            netpol(
                json!({"podSelector": {}, "egress": [{"ports": [{"port": 443, "endPort": 80}]}]}),
            ),
            "spec.egress[0].ports[0].endPort: must be >= port (443)",
        ),
        (
            netpol(json!({"podSelector": {}, "policyTypes": ["Ingress", "Both"]})),
            "spec.policyTypes[1]: unknown policy type \"Both\" (accepted: Ingress, Egress)",
        ),
        (
            netpol(json!({"podSelector": {"matchLabels": {"a": "b"}, "matchFields": {}}})),
            "spec.podSelector.matchFields: unknown field",
        ),
        (netpol(json!({"ingress": []})), "spec.podSelector: required"),
    ];
    for (obj, want) in cases {
        match parse(&obj) {
            Ok(p) => panic!("accepted {obj}: {p:?}"),
            Err(e) => assert_eq!(e.to_string(), want),
        }
    }
}

#[test]
fn nulls_count_as_absent() {
    let p = parse(&cnp(json!({
        "endpointSelector": {"matchLabels": null},
        "ingress": null,
        "egress": [{"toEndpoints": null, "toPorts": [{"ports": [{"port": "80"}], "rules": null}]}],
    })))
    .unwrap();
    assert_eq!(p.rules[0].peer_rules.len(), 1);
    assert_eq!(p.rules[0].peer_rules[0].peers, Peers::Any);
}
