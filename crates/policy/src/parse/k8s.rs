//! `networking.k8s.io/v1` `NetworkPolicy`, with local-cluster semantics.
//!
//! Must not accept `ipBlock` peers or SCTP (refused by name) nor reach other clusters.

use std::collections::BTreeSet;

use model::Label;
use serde_json::Value;

use super::{
    Error, Obj, Result, check_fields, field, index, join, label_selector, list_field, metadata,
    object_at, object_field, port_range, str_field,
};
use crate::rule::{
    Direction, L4, PeerRule, Peers, Policy, PolicyKind, PolicyRef, PortSpec, Rule, Verdict,
};
use crate::selector::{ClusterScope, Requirement, Selector, Source};

pub(super) fn parse(top: &Obj) -> Result<Policy> {
    let (name, namespace) = metadata(top, true)?;
    let ns = namespace.as_deref().unwrap_or_default();
    let (spec, path) = object_field(top, "", "spec")?.ok_or_else(|| Error::Missing {
        path: "spec".into(),
    })?;
    check_fields(
        spec,
        &path,
        &["podSelector", "policyTypes", "ingress", "egress"],
        &[],
    )?;
    let pod_selector = field(spec, "podSelector").ok_or_else(|| Error::Missing {
        path: join(&path, "podSelector"),
    })?;
    let mut requirements = label_selector(pod_selector, &join(&path, "podSelector"), &pod_key)?;
    requirements.push(Requirement::equals(
        Label::SOURCE_MESH,
        Label::KEY_NAMESPACE,
        ns,
    ));
    let subject = Selector {
        requirements,
        cluster: ClusterScope::Local,
    };

    let (ingress, ipath) = list_field(spec, &path, "ingress")?;
    let (egress, epath) = list_field(spec, &path, "egress")?;
    let (types, tpath) = list_field(spec, &path, "policyTypes")?;
    let (mut enforce_ingress, mut enforce_egress) = (false, false);
    for (i, t) in types.iter().enumerate() {
        match t.as_str() {
            Some("Ingress") => enforce_ingress = true,
            Some("Egress") => enforce_egress = true,
            Some(other) => {
                return Err(Error::PolicyType {
                    path: index(&tpath, i),
                    value: other.to_owned(),
                });
            }
            None => {
                return Err(Error::Type {
                    path: index(&tpath, i),
                    expected: "a string",
                });
            }
        }
    }
    if types.is_empty() {
        // Kubernetes' defaulting: always Ingress, Egress when there are egress rules.
        enforce_ingress = true;
        enforce_egress = !egress.is_empty();
    }

    let mut peer_rules = Vec::new();
    for (list, lpath, direction, enforced) in [
        (ingress, ipath, Direction::Ingress, enforce_ingress),
        (egress, epath, Direction::Egress, enforce_egress),
    ] {
        for (i, r) in list.iter().enumerate() {
            let rule = peer_rule(r, &index(&lpath, i), direction, ns)?;
            // Rules of a direction the policy does not enforce have no effect in Kubernetes.
            if enforced {
                peer_rules.push(rule);
            }
        }
    }
    Ok(Policy {
        origin: PolicyRef::new(PolicyKind::NetworkPolicy, Some(ns), &name),
        rules: vec![Rule {
            subject,
            enforce_ingress,
            enforce_egress,
            peer_rules,
        }],
    })
}

fn peer_rule(v: &Value, path: &str, direction: Direction, ns: &str) -> Result<PeerRule> {
    let o = object_at(v, path)?;
    let peers_name = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    check_fields(o, path, &[peers_name, "ports"], &[])?;
    let (list, lpath) = list_field(o, path, peers_name)?;
    let mut selectors = Vec::new();
    for (i, p) in list.iter().enumerate() {
        selectors.push(peer(p, &index(&lpath, i), ns)?);
    }
    let (list, ppath) = list_field(o, path, "ports")?;
    let mut ports = Vec::new();
    for (i, p) in list.iter().enumerate() {
        ports.push(port(p, &index(&ppath, i))?);
    }
    let peers = if selectors.is_empty() {
        // No `from`/`to`: every source or destination, as in Kubernetes.
        Peers::Any
    } else {
        Peers::Listed {
            selectors,
            entities: BTreeSet::new(),
        }
    };
    Ok(PeerRule {
        direction,
        verdict: Verdict::Allow,
        peers,
        ports,
    })
}

fn peer(v: &Value, path: &str, ns: &str) -> Result<Selector> {
    let o = object_at(v, path)?;
    check_fields(
        o,
        path,
        &["podSelector", "namespaceSelector"],
        &[("ipBlock", "ipBlock peers are")],
    )?;
    let pods = field(o, "podSelector");
    let namespaces = field(o, "namespaceSelector");
    let mut requirements = Vec::new();
    if let Some(p) = pods {
        requirements.extend(label_selector(p, &join(path, "podSelector"), &pod_key)?);
    }
    match namespaces {
        Some(n) => requirements.extend(label_selector(
            n,
            &join(path, "namespaceSelector"),
            &namespace_key,
        )?),
        None if pods.is_some() => requirements.push(Requirement::equals(
            Label::SOURCE_MESH,
            Label::KEY_NAMESPACE,
            ns,
        )),
        None => {
            return Err(Error::EmptyPeer {
                path: path.to_owned(),
            });
        }
    }
    Ok(Selector {
        requirements,
        cluster: ClusterScope::Local,
    })
}

fn port(v: &Value, path: &str) -> Result<PortSpec> {
    let o = object_at(v, path)?;
    check_fields(o, path, &["port", "endPort", "protocol"], &[])?;
    let proto = match str_field(o, path, "protocol")? {
        None | Some("TCP") => L4::Tcp,
        Some("UDP") => L4::Udp,
        Some("SCTP") => {
            return Err(Error::Unsupported {
                path: join(path, "protocol"),
                what: "SCTP is",
            });
        }
        Some(other) => {
            return Err(Error::Protocol {
                path: join(path, "protocol"),
                value: other.to_owned(),
                accepted: "TCP, UDP",
            });
        }
    };
    port_range(o, path, 1, proto)
}

fn pod_key(written: &str, _path: &str) -> Result<(Source, String)> {
    Ok((
        Source::Exact(Label::SOURCE_POD.to_owned()),
        written.to_owned(),
    ))
}

fn namespace_key(written: &str, _path: &str) -> Result<(Source, String)> {
    Ok((
        Source::Exact(Label::SOURCE_NAMESPACE.to_owned()),
        written.to_owned(),
    ))
}
