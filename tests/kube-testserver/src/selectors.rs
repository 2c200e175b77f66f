//! Label and field selectors, parsed once per request and matched against JSON objects.

use std::collections::BTreeSet;

use serde_json::Value;

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement {requirement:?}: {reason}")]
pub struct Error {
    /// The requirement text.
    pub requirement: String,
    /// What is wrong.
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    NotExists,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<(String, Op)>);

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set(req: &str, list: &str) -> Result<BTreeSet<String>, Error> {
    let inner = list
        .trim()
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or(Error {
            requirement: req.to_owned(),
            reason: "expected a parenthesised value list",
        })?;
    Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (x,y),!f,g`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut reqs = Vec::new();
        for raw in split_top(text) {
            let req = raw.trim();
            if req.is_empty() {
                continue;
            }
            let bad = |reason| Error {
                requirement: req.to_owned(),
                reason,
            };
            let parsed = if let Some(k) = req.strip_prefix('!') {
                (k.trim().to_owned(), Op::NotExists)
            } else if let Some((k, v)) = req.split_once("!=") {
                (k.trim().to_owned(), Op::NotEq(v.trim().to_owned()))
            } else if let Some((k, v)) = req.split_once("==") {
                (k.trim().to_owned(), Op::Eq(v.trim().to_owned()))
            } else if let Some((k, v)) = req.split_once('=') {
                (k.trim().to_owned(), Op::Eq(v.trim().to_owned()))
            } else if let Some((k, v)) = req.split_once(" notin ") {
                (k.trim().to_owned(), Op::NotIn(set(req, v)?))
            } else if let Some((k, v)) = req.split_once(" in ") {
                (k.trim().to_owned(), Op::In(set(req, v)?))
            } else {
                (req.to_owned(), Op::Exists)
            };
            if parsed.0.is_empty() || parsed.0.contains(char::is_whitespace) {
                return Err(bad("invalid label key"));
            }
            reqs.push(parsed);
        }
        Ok(Self(reqs))
    }

    /// Whether `object`'s labels satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        self.0.iter().all(|(k, op)| {
            let v = labels.and_then(|l| l.get(k)).and_then(Value::as_str);
            match op {
                Op::Eq(want) => v == Some(want.as_str()),
                Op::NotEq(want) => v != Some(want.as_str()),
                Op::In(set) => v.is_some_and(|v| set.contains(v)),
                Op::NotIn(set) => !v.is_some_and(|v| set.contains(v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }
}

/// A parsed field selector (`metadata.name=x,metadata.namespace!=y`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the selector; any dotted field path is accepted.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut reqs = Vec::new();
        for raw in text.split(',') {
            let req = raw.trim();
            if req.is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some((f, v)) = req.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = req.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = req.split_once('=') {
                (f, true, v)
            } else {
                return Err(Error {
                    requirement: req.to_owned(),
                    reason: "expected field=value or field!=value",
                });
            };
            reqs.push((
                format!("/{}", field.trim().replace('.', "/")),
                eq,
                value.trim().to_owned(),
            ));
        }
        Ok(Self(reqs))
    }

    /// Whether `object` satisfies every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let v = match object.pointer(path) {
                Some(Value::String(s)) => s.clone(),
                // Boolean field labels read "false" when unset (`spec.unschedulable`,
                // `spec.hostNetwork`).
                Some(Value::Null) | None if BOOL_FIELDS.contains(&path.as_str()) => "false".into(),
                Some(Value::Null) | None => String::new(),
                Some(Value::Array(a)) if path == "/status/podIPs" => a
                    .iter()
                    .filter_map(|p| p.get("ip").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(","),
                Some(other) => other.to_string(),
            };
            let hit = if path == "/status/podIPs" {
                v.split(',').any(|ip| ip == want)
            } else {
                v == *want
            };
            hit == *eq
        })
    }

    /// The first field this selector uses that `res` does not support as a field label (the
    /// apiserver answers such a selector with `400 field label not supported`).
    pub fn unsupported(&self, res: &crate::registry::Resource) -> Option<String> {
        let extra = supported_fields(&res.gvr.group, &res.kind);
        self.0.iter().find_map(|(path, _, _)| {
            let dotted = path.trim_start_matches('/').replace('/', ".");
            let ok = matches!(dotted.as_str(), "metadata.name" | "metadata.namespace")
                || extra.contains(&dotted.as_str());
            (!ok).then_some(dotted)
        })
    }
}

const BOOL_FIELDS: &[&str] = &["/spec/unschedulable", "/spec/hostNetwork"];

/// The field labels each built-in kind supports besides `metadata.name` and
/// `metadata.namespace` (the apiserver's field label conversion functions).
fn supported_fields(group: &str, kind: &str) -> &'static [&'static str] {
    match (group, kind) {
        ("", "Pod") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        ],
        ("", "Node") => &["spec.unschedulable"],
        ("", "Secret") => &["type"],
        ("", "Namespace") => &["status.phase"],
        ("", "Service") => &["spec.clusterIP", "spec.type"],
        ("", "Event") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "Event") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        ("apps", "ReplicaSet") => &["status.replicas"],
        ("batch", "Job") => &["status.successful"],
        ("certificates.k8s.io", "CertificateSigningRequest") => &["spec.signerName"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_cover_every_operator() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web,api)", true),
            ("app notin (web,api)", false),
            ("tier", true),
            ("!tier", false),
            ("missing", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("app in (api, web),tier", true),
        ];
        for (sel, want) in cases {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in web").is_err());
    }

    #[test]
    fn field_selectors_match_dotted_paths() {
        let o = json!({"metadata": {"name": "a", "namespace": "ns1"}});
        assert!(FieldSelector::parse("metadata.name=a").unwrap().matches(&o));
        assert!(!FieldSelector::parse("metadata.name=b").unwrap().matches(&o));
        assert!(
            FieldSelector::parse("metadata.namespace!=ns2,metadata.name==a")
                .unwrap()
                .matches(&o)
        );
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
