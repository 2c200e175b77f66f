//! `cilium.io/v2` `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy`.
//!
//! Must not accept a field it does not enforce (CIDR, FQDN, service, node and L7 rules are
//! refused by name).

use std::collections::BTreeSet;

use model::Label;
use serde_json::Value;

use super::{
    Error, Obj, Result, bool_field, check_fields, field, index, join, label_selector, list_field,
    metadata, object_at, object_field, port_range, str_field,
};
use crate::rule::{
    Direction, Entity, L4, PeerRule, Peers, Policy, PolicyKind, PolicyRef, PortSpec, Rule, Verdict,
};
use crate::selector::{ClusterScope, Requirement, Selector, Source};

/// Cilium's namespace label on pods.
const KEY_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Cilium's cluster label on identities.
const KEY_CLUSTER: &str = "io.cilium.k8s.policy.cluster";
/// Cilium's prefix for namespace labels copied onto pods.
const PREFIX_NAMESPACE_LABELS: &str = "io.cilium.k8s.namespace.labels.";
/// Cilium's service account label, which our identities do not carry.
const KEY_SERVICE_ACCOUNT: &str = "io.cilium.k8s.policy.serviceaccount";

pub(super) fn parse(top: &Obj, namespaced: bool) -> Result<Policy> {
    let (name, namespace) = metadata(top, namespaced)?;
    let kind = if namespaced {
        PolicyKind::CiliumNetworkPolicy
    } else {
        PolicyKind::CiliumClusterwideNetworkPolicy
    };
    let ns = namespace.as_deref();
    let mut rules = Vec::new();
    if let Some(spec) = field(top, "spec") {
        rules.push(rule(spec, "spec", ns)?);
    }
    let (specs, path) = list_field(top, "", "specs")?;
    for (i, spec) in specs.iter().enumerate() {
        rules.push(rule(spec, &index(&path, i), ns)?);
    }
    if rules.is_empty() {
        return Err(Error::Missing {
            path: "spec".into(),
        });
    }
    Ok(Policy {
        origin: PolicyRef::new(kind, ns, &name),
        rules,
    })
}

fn rule(v: &Value, path: &str, ns: Option<&str>) -> Result<Rule> {
    let o = object_at(v, path)?;
    check_fields(
        o,
        path,
        &[
            "endpointSelector",
            "ingress",
            "ingressDeny",
            "egress",
            "egressDeny",
            "enableDefaultDeny",
            "labels",
            "description",
            "log",
        ],
        &[("nodeSelector", "host policies (nodeSelector) are")],
    )?;
    let subject = field(o, "endpointSelector").ok_or_else(|| Error::Missing {
        path: join(path, "endpointSelector"),
    })?;
    let subject = selector(subject, &join(path, "endpointSelector"), ns, Role::Subject)?;

    let (mut default_ingress, mut default_egress) = (true, true);
    if let Some((dd, dpath)) = object_field(o, path, "enableDefaultDeny")? {
        check_fields(dd, &dpath, &["ingress", "egress"], &[])?;
        default_ingress = bool_field(dd, &dpath, "ingress")?.unwrap_or(true);
        default_egress = bool_field(dd, &dpath, "egress")?.unwrap_or(true);
    }

    let mut peer_rules = Vec::new();
    let mut has = [false; 2];
    for (name, direction, verdict) in [
        ("ingress", Direction::Ingress, Verdict::Allow),
        ("ingressDeny", Direction::Ingress, Verdict::Deny),
        ("egress", Direction::Egress, Verdict::Allow),
        ("egressDeny", Direction::Egress, Verdict::Deny),
    ] {
        let (list, lpath) = list_field(o, path, name)?;
        for (i, r) in list.iter().enumerate() {
            peer_rules.push(peer_rule(r, &index(&lpath, i), direction, verdict, ns)?);
        }
        has[direction as usize] |= !list.is_empty();
    }
    Ok(Rule {
        subject,
        enforce_ingress: default_ingress && has[Direction::Ingress as usize],
        enforce_egress: default_egress && has[Direction::Egress as usize],
        peer_rules,
    })
}

fn peer_rule(
    v: &Value,
    path: &str,
    direction: Direction,
    verdict: Verdict,
    ns: Option<&str>,
) -> Result<PeerRule> {
    let o = object_at(v, path)?;
    let (endpoints, entities) = match direction {
        Direction::Ingress => ("fromEndpoints", "fromEntities"),
        Direction::Egress => ("toEndpoints", "toEntities"),
    };
    const CIDR: &str = "CIDR peers are";
    check_fields(
        o,
        path,
        &[endpoints, entities, "toPorts"],
        &[
            ("fromCIDR", CIDR),
            ("fromCIDRSet", CIDR),
            ("toCIDR", CIDR),
            ("toCIDRSet", CIDR),
            ("fromRequires", "fromRequires is"),
            ("toRequires", "toRequires is"),
            ("fromGroups", "group peers are"),
            ("toGroups", "group peers are"),
            ("fromNodes", "node peers are"),
            ("toNodes", "node peers are"),
            ("toServices", "service peers are"),
            ("toFQDNs", "FQDN peers are"),
            ("icmps", "ICMP rules are"),
            ("authentication", "mutual authentication is"),
        ],
    )?;

    let mut selectors = Vec::new();
    let (list, lpath) = list_field(o, path, endpoints)?;
    for (i, s) in list.iter().enumerate() {
        selectors.push(selector(s, &index(&lpath, i), ns, Role::Peer)?);
    }
    let mut ents = BTreeSet::new();
    let (list, lpath) = list_field(o, path, entities)?;
    for (i, e) in list.iter().enumerate() {
        ents.insert(entity(e, &index(&lpath, i))?);
    }

    let mut ports = Vec::new();
    let (list, lpath) = list_field(o, path, "toPorts")?;
    for (i, pr) in list.iter().enumerate() {
        let path = index(&lpath, i);
        let pr = object_at(pr, &path)?;
        const L7: &str = "L7 rules are";
        check_fields(
            pr,
            &path,
            &["ports"],
            &[
                ("rules", L7),
                ("listener", L7),
                ("originatingTLS", L7),
                ("terminatingTLS", L7),
                ("serverNames", L7),
            ],
        )?;
        let (list, ppath) = list_field(pr, &path, "ports")?;
        if list.is_empty() {
            return Err(Error::Empty {
                path: ppath,
                what: "port",
            });
        }
        for (j, p) in list.iter().enumerate() {
            ports.push(port(p, &index(&ppath, j))?);
        }
    }

    let peers = if ents.contains(&Entity::All)
        || (selectors.is_empty() && ents.is_empty() && !ports.is_empty())
    {
        Peers::Any
    } else {
        Peers::Listed {
            selectors,
            entities: ents,
        }
    };
    Ok(PeerRule {
        direction,
        verdict,
        peers,
        ports,
    })
}

fn port(v: &Value, path: &str) -> Result<PortSpec> {
    let o = object_at(v, path)?;
    check_fields(o, path, &["port", "endPort", "protocol"], &[])?;
    let proto = match str_field(o, path, "protocol")? {
        None | Some("ANY") => L4::Any,
        Some("TCP") => L4::Tcp,
        Some("UDP") => L4::Udp,
        Some(other) => {
            return Err(Error::Protocol {
                path: join(path, "protocol"),
                value: other.to_owned(),
                accepted: "TCP, UDP, ANY",
            });
        }
    };
    // Cilium requires a port; "0" is its wildcard.
    if field(o, "port").is_none() {
        return Err(Error::Missing {
            path: join(path, "port"),
        });
    }
    port_range(o, path, 0, proto)
}

fn entity(v: &Value, path: &str) -> Result<Entity> {
    let name = v.as_str().ok_or_else(|| Error::Type {
        path: path.to_owned(),
        expected: "a string",
    })?;
    Ok(match name {
        "world" => Entity::World,
        "host" => Entity::Host,
        "cluster" => Entity::Cluster,
        "mesh" => Entity::Mesh,
        "all" => Entity::All,
        "remote-node" | "kube-apiserver" | "health" | "init" | "unmanaged" | "ingress"
        | "world-ipv4" | "world-ipv6" => {
            return Err(Error::UnsupportedEntity {
                path: path.to_owned(),
                value: name.to_owned(),
            });
        }
        _ => {
            return Err(Error::Entity {
                path: path.to_owned(),
                value: name.to_owned(),
            });
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `endpointSelector`: local cluster, always the policy's namespace.
    Subject,
    /// `fromEndpoints`/`toEndpoints`.
    Peer,
}

fn selector(v: &Value, path: &str, ns: Option<&str>, role: Role) -> Result<Selector> {
    let mut requirements = label_selector(v, path, &key)?;
    let names = |reqs: &[Requirement], key| reqs.iter().any(|r| r.names(Label::SOURCE_MESH, key));
    if let Some(ns) = ns
        && (role == Role::Subject || !names(&requirements, Label::KEY_NAMESPACE))
    {
        requirements.push(Requirement::equals(
            Label::SOURCE_MESH,
            Label::KEY_NAMESPACE,
            ns,
        ));
    }
    let cluster = match role {
        Role::Subject => ClusterScope::Local,
        Role::Peer if names(&requirements, Label::KEY_CLUSTER) => ClusterScope::Any,
        Role::Peer => ClusterScope::LocalByDefault,
    };
    Ok(Selector {
        requirements,
        cluster,
    })
}

/// A key as Cilium users write it → our label source and key.
fn key(written: &str, path: &str) -> Result<(Source, String)> {
    let (source, key) = match written.split_once(':') {
        None => (Source::Exact(Label::SOURCE_POD.to_owned()), written),
        Some(("k8s", key)) => (Source::Exact(Label::SOURCE_POD.to_owned()), key),
        Some(("any", key)) => (Source::Any, key),
        Some(("reserved", _)) => {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                what: "reserved labels in selectors are (use fromEntities/toEntities)",
            });
        }
        Some((other, _)) => {
            return Err(Error::LabelSource {
                path: path.to_owned(),
                source_name: other.to_owned(),
            });
        }
    };
    let mesh = |k: &str| Ok((Source::Exact(Label::SOURCE_MESH.to_owned()), k.to_owned()));
    match key {
        KEY_POD_NAMESPACE => mesh(Label::KEY_NAMESPACE),
        KEY_CLUSTER => mesh(Label::KEY_CLUSTER),
        KEY_SERVICE_ACCOUNT => Err(Error::Unsupported {
            path: path.to_owned(),
            what: "service account selectors are",
        }),
        k => match k.strip_prefix(PREFIX_NAMESPACE_LABELS) {
            Some(ns_key) => Ok((
                Source::Exact(Label::SOURCE_NAMESPACE.to_owned()),
                ns_key.to_owned(),
            )),
            None => Ok((source, k.to_owned())),
        },
    }
}
