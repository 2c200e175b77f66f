//! Stored Kubernetes objects (`serde_json::Value`) → [`Policy`].
//!
//! A field this crate does not implement is refused, never ignored, so a policy is applied
//! completely or not at all; every error names the field path
//! (`spec.egress[0].toPorts[0].ports[1].endPort: must be >= port (80)`).
//!
//! Must not resolve selectors nor know the local cluster.

mod cilium;
mod k8s;

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::rule::{L4, Policy, PortSpec};
use crate::selector::{Op, Requirement, Source};

/// Why a policy object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The object is not one of the kinds this crate parses.
    #[error(
        "{api_version}/{kind} is not a policy kind (cilium.io/v2 CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy, networking.k8s.io/v1 NetworkPolicy)"
    )]
    Kind {
        /// The object's `apiVersion`.
        api_version: String,
        /// The object's `kind`.
        kind: String,
    },
    /// A required field is missing (or null).
    #[error("{path}: required")]
    Missing {
        /// The field.
        path: String,
    },
    /// A field has the wrong JSON type.
    #[error("{path}: must be {expected}")]
    Type {
        /// The field.
        path: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A field the source kind has but this implementation does not enforce.
    #[error("{path}: {what} not supported")]
    Unsupported {
        /// The field.
        path: String,
        /// What is not supported, e.g. "L7 rules are".
        what: &'static str,
    },
    /// A field the source kind does not have.
    #[error("{path}: unknown field")]
    UnknownField {
        /// The field.
        path: String,
    },
    /// A port given by name.
    #[error("{path}: named port {name:?} is not supported, give the port number")]
    NamedPort {
        /// The field.
        path: String,
        /// The name given.
        name: String,
    },
    /// A port number outside its range.
    #[error("{path}: {value} is out of range ({min}-65535)")]
    PortRange {
        /// The field.
        path: String,
        /// The number given.
        value: u64,
        /// The smallest number allowed here.
        min: u16,
    },
    /// An `endPort` below its `port`.
    #[error("{path}: must be >= port ({port})")]
    EndPortBelowPort {
        /// The `endPort` field.
        path: String,
        /// The `port` it must not be below.
        port: u16,
    },
    /// An `endPort` without a `port` to start from.
    #[error("{path}: needs a port number to start from")]
    EndPortWithoutPort {
        /// The `endPort` field.
        path: String,
    },
    /// A protocol that is not accepted here.
    #[error("{path}: protocol {value:?} is not supported (accepted: {accepted})")]
    Protocol {
        /// The field.
        path: String,
        /// The protocol given.
        value: String,
        /// The accepted protocols.
        accepted: &'static str,
    },
    /// An entity name this crate does not know.
    #[error("{path}: unknown entity {value:?} (accepted: world, host, cluster, mesh, all)")]
    Entity {
        /// The field.
        path: String,
        /// The name given.
        value: String,
    },
    /// A Cilium entity this implementation does not enforce.
    #[error(
        "{path}: entity {value:?} is not supported (accepted: world, host, cluster, mesh, all)"
    )]
    UnsupportedEntity {
        /// The field.
        path: String,
        /// The name given.
        value: String,
    },
    /// A selector operator that is not `In`, `NotIn`, `Exists` or `DoesNotExist`.
    #[error("{path}: unknown operator {value:?} (accepted: In, NotIn, Exists, DoesNotExist)")]
    Operator {
        /// The field.
        path: String,
        /// The operator given.
        value: String,
    },
    /// `values` does not fit the operator.
    #[error("{path}: operator {op} needs {needs}")]
    Values {
        /// The `values` field.
        path: String,
        /// The operator.
        op: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// A selector key with a label source prefix this crate does not accept.
    #[error("{path}: label source {source_name:?} is not supported (accepted: k8s, any)")]
    LabelSource {
        /// The key's field.
        path: String,
        /// The source prefix given.
        source_name: String,
    },
    /// A selector key or value that is not a valid label.
    #[error("{path}: invalid label")]
    Label {
        /// The field.
        path: String,
        /// What is wrong with it.
        source: model::identity::Error,
    },
    /// A NetworkPolicy `policyTypes` entry that is not `Ingress` or `Egress`.
    #[error("{path}: unknown policy type {value:?} (accepted: Ingress, Egress)")]
    PolicyType {
        /// The field.
        path: String,
        /// The value given.
        value: String,
    },
    /// A list that must not be empty.
    #[error("{path}: must list at least one {what}")]
    Empty {
        /// The field.
        path: String,
        /// What it must list.
        what: &'static str,
    },
    /// A NetworkPolicy peer with neither `podSelector`, `namespaceSelector` nor `ipBlock`.
    #[error("{path}: must set podSelector or namespaceSelector")]
    EmptyPeer {
        /// The peer.
        path: String,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses a stored `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy` or `NetworkPolicy`.
pub fn parse(object: &Value) -> Result<Policy> {
    let top = object_at(object, "")?;
    let api_version = str_field(top, "", "apiVersion")?.unwrap_or_default();
    let kind = str_field(top, "", "kind")?.unwrap_or_default();
    match (api_version, kind) {
        ("cilium.io/v2", "CiliumNetworkPolicy") => cilium::parse(top, true),
        ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => cilium::parse(top, false),
        ("networking.k8s.io/v1", "NetworkPolicy") => k8s::parse(top),
        _ => Err(Error::Kind {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        }),
    }
}

type Obj = Map<String, Value>;

/// `path.name`, or `name` at the top.
fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn object_at<'a>(v: &'a Value, path: &str) -> Result<&'a Obj> {
    v.as_object().ok_or_else(|| Error::Type {
        path: path.to_owned(),
        expected: "an object",
    })
}

/// Checks an object's field names: `known` are read by the caller, `unsupported` are refused
/// with their reason, anything else is unknown. Null fields count as absent.
fn check_fields(
    o: &Obj,
    path: &str,
    known: &[&str],
    unsupported: &[(&str, &'static str)],
) -> Result<()> {
    for (name, value) in o {
        if value.is_null() || known.contains(&name.as_str()) {
            continue;
        }
        let path = join(path, name);
        return Err(match unsupported.iter().find(|(n, _)| n == name) {
            Some((_, what)) => Error::Unsupported { path, what },
            None => Error::UnknownField { path },
        });
    }
    Ok(())
}

/// A field's value; null counts as absent.
fn field<'a>(o: &'a Obj, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn str_field<'a>(o: &'a Obj, path: &str, name: &str) -> Result<Option<&'a str>> {
    field(o, name)
        .map(|v| {
            v.as_str().ok_or_else(|| Error::Type {
                path: join(path, name),
                expected: "a string",
            })
        })
        .transpose()
}

fn bool_field(o: &Obj, path: &str, name: &str) -> Result<Option<bool>> {
    field(o, name)
        .map(|v| {
            v.as_bool().ok_or_else(|| Error::Type {
                path: join(path, name),
                expected: "true or false",
            })
        })
        .transpose()
}

/// A list field, with the path of the list; absent or null is empty.
fn list_field<'a>(o: &'a Obj, path: &str, name: &str) -> Result<(&'a [Value], String)> {
    let path = join(path, name);
    match field(o, name) {
        None => Ok((&[], path)),
        Some(v) => match v.as_array() {
            Some(a) => Ok((a.as_slice(), path)),
            None => Err(Error::Type {
                path,
                expected: "a list",
            }),
        },
    }
}

fn object_field<'a>(o: &'a Obj, path: &str, name: &str) -> Result<Option<(&'a Obj, String)>> {
    let path = join(path, name);
    field(o, name)
        .map(|v| object_at(v, &path).map(|o| (o, path.clone())))
        .transpose()
}

/// `metadata.name` and `metadata.namespace` (the latter required only when `namespaced`).
fn metadata(top: &Obj, namespaced: bool) -> Result<(String, Option<String>)> {
    let (meta, path) = object_field(top, "", "metadata")?.ok_or_else(|| Error::Missing {
        path: "metadata".into(),
    })?;
    let name = str_field(meta, &path, "name")?.ok_or_else(|| Error::Missing {
        path: join(&path, "name"),
    })?;
    let namespace = if namespaced {
        Some(
            str_field(meta, &path, "namespace")?
                .ok_or_else(|| Error::Missing {
                    path: join(&path, "namespace"),
                })?
                .to_owned(),
        )
    } else {
        None
    };
    Ok((name.to_owned(), namespace))
}

/// Turns a key as written in a selector (and its field path) into a label source and key.
type KeyMap = dyn Fn(&str, &str) -> Result<(Source, String)>;

/// A Kubernetes `LabelSelector`; `key` turns a written key into a source and label key.
fn label_selector(v: &Value, path: &str, key: &KeyMap) -> Result<Vec<Requirement>> {
    let o = object_at(v, path)?;
    check_fields(o, path, &["matchLabels", "matchExpressions"], &[])?;
    let mut reqs = Vec::new();
    if let Some((labels, lpath)) = object_field(o, path, "matchLabels")? {
        for (k, v) in labels {
            let kpath = join(&lpath, k);
            let value = v.as_str().ok_or_else(|| Error::Type {
                path: kpath.clone(),
                expected: "a string",
            })?;
            let (source, key) = key(k, &kpath)?;
            check_label(&key, value, &kpath)?;
            reqs.push(Requirement {
                source,
                key,
                op: Op::In(BTreeSet::from([value.to_owned()])),
            });
        }
    }
    let (exprs, epath) = list_field(o, path, "matchExpressions")?;
    for (i, e) in exprs.iter().enumerate() {
        let path = index(&epath, i);
        let e = object_at(e, &path)?;
        check_fields(e, &path, &["key", "operator", "values"], &[])?;
        let written = str_field(e, &path, "key")?.ok_or_else(|| Error::Missing {
            path: join(&path, "key"),
        })?;
        let (source, key) = key(written, &join(&path, "key"))?;
        let operator = str_field(e, &path, "operator")?.ok_or_else(|| Error::Missing {
            path: join(&path, "operator"),
        })?;
        let (values, vpath) = list_field(e, &path, "values")?;
        let mut set = BTreeSet::new();
        for (j, v) in values.iter().enumerate() {
            let vpath = index(&vpath, j);
            let value = v.as_str().ok_or_else(|| Error::Type {
                path: vpath.clone(),
                expected: "a string",
            })?;
            check_label(&key, value, &vpath)?;
            set.insert(value.to_owned());
        }
        let op = match operator {
            "In" | "NotIn" if set.is_empty() => {
                return Err(Error::Values {
                    path: vpath,
                    op: if operator == "In" { "In" } else { "NotIn" },
                    needs: "at least one value",
                });
            }
            "Exists" | "DoesNotExist" if !set.is_empty() => {
                return Err(Error::Values {
                    path: vpath,
                    op: if operator == "Exists" {
                        "Exists"
                    } else {
                        "DoesNotExist"
                    },
                    needs: "no values",
                });
            }
            "In" => Op::In(set),
            "NotIn" => Op::NotIn(set),
            "Exists" => Op::Exists,
            "DoesNotExist" => Op::DoesNotExist,
            other => {
                return Err(Error::Operator {
                    path: join(&path, "operator"),
                    value: other.to_owned(),
                });
            }
        };
        reqs.push(Requirement { source, key, op });
    }
    Ok(reqs)
}

fn check_label(key: &str, value: &str, path: &str) -> Result<()> {
    model::Label::new(model::Label::SOURCE_POD, key, value)
        .map(drop)
        .map_err(|source| Error::Label {
            path: path.to_owned(),
            source,
        })
}

/// A port given as a number or a string of digits; any other string is a named port.
fn port_number(v: &Value, path: &str) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| Error::Type {
            path: path.to_owned(),
            expected: "a port number",
        }),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(s.parse::<u64>().unwrap_or(u64::MAX))
        }
        Value::String(s) => Err(Error::NamedPort {
            path: path.to_owned(),
            name: s.clone(),
        }),
        _ => Err(Error::Type {
            path: path.to_owned(),
            expected: "a port number",
        }),
    }
}

fn in_range(value: u64, min: u16, path: &str) -> Result<u16> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p >= min)
        .ok_or_else(|| Error::PortRange {
            path: path.to_owned(),
            value,
            min,
        })
}

/// `port` (absent, or 0 where `min_port` allows it: every port) and `endPort` (absent or 0:
/// none) → a port range.
fn port_range(o: &Obj, path: &str, min_port: u16, proto: L4) -> Result<PortSpec> {
    let port_path = join(path, "port");
    let port = field(o, "port")
        .map(|v| port_number(v, &port_path).and_then(|n| in_range(n, min_port, &port_path)))
        .transpose()?
        .filter(|p| *p != 0);
    let end_path = join(path, "endPort");
    let end = field(o, "endPort")
        .map(|v| match v {
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| Error::Type {
                    path: end_path.clone(),
                    expected: "a port number",
                })
                .and_then(|n| in_range(n, 0, &end_path)),
            _ => Err(Error::Type {
                path: end_path.clone(),
                expected: "a port number",
            }),
        })
        .transpose()?
        .filter(|p| *p != 0);
    let ports = match (port, end) {
        (None, None) => None,
        (None, Some(_)) => return Err(Error::EndPortWithoutPort { path: end_path }),
        (Some(p), None) => Some((p, p)),
        (Some(p), Some(e)) if e < p => {
            return Err(Error::EndPortBelowPort {
                path: end_path,
                port: p,
            });
        }
        (Some(p), Some(e)) => Some((p, e)),
    };
    Ok(PortSpec { proto, ports })
}

#[cfg(test)]
mod tests;
