//! Authentication of ServiceAccount tokens and RBAC authorization, as the apiserver's RBAC
//! authorizer decides from the Roles, ClusterRoles and bindings that were applied: a request by
//! a ServiceAccount is allowed only if a rule bound to it (or to one of its groups) covers the
//! verb, API group, resource (with subresource) and, where given, the resource name.
//!
//! The cluster's admin (the kubeconfig's token and client certificate) is `system:masters`
//! and is allowed everything, as on a cluster. Discovery, `/version` and `/openapi` are open
//! to every authenticated user (the `system:discovery` role).
//!
//! Every decision about a ServiceAccount is recorded, so a test can list the requests a
//! component made and the rules it was granted but never used ([`Audit`]).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::registry::Gvr;
use crate::store::Store;

/// Who makes a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// The cluster's admin (`system:masters`): allowed everything.
    Admin,
    /// A ServiceAccount, from a token the TokenRequest API issued.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl User {
    /// The username, as the apiserver writes it.
    pub fn username(&self) -> String {
        match self {
            Self::Admin => "kubernetes-admin".into(),
            Self::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }

    /// The groups, as the apiserver gives them.
    pub fn groups(&self) -> Vec<String> {
        match self {
            Self::Admin => vec!["system:masters".into(), "system:authenticated".into()],
            Self::ServiceAccount { namespace, .. } => vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }
}

/// What a request asks for, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// The API group (`""` for core).
    pub group: String,
    /// The resource, with `/subresource` where one is named (`pods/status`).
    pub resource: String,
    /// The namespace, if namespaced.
    pub namespace: Option<String>,
    /// The object's name, for requests on one object.
    pub name: Option<String>,
}

impl Attributes {
    /// The RBAC attributes of a request on `gvr`.
    pub fn new(
        verb: &str,
        gvr: &Gvr,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Self {
        Self {
            verb: verb.into(),
            group: gvr.group.clone(),
            resource: match subresource {
                Some(s) => format!("{}/{s}", gvr.resource),
                None => gvr.resource.clone(),
            },
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
        }
    }

    /// The `403` message of the apiserver for `user` asking this.
    pub fn forbidden_message(&self, user: &User) -> String {
        let (resource, sub) = match self.resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (self.resource.as_str(), None),
        };
        let what = if self.group.is_empty() {
            resource.to_owned()
        } else {
            format!("{resource}.{}", self.group)
        };
        let named = self
            .name
            .as_ref()
            .map(|n| format!(" \"{n}\""))
            .unwrap_or_default();
        let sub_text = sub
            .map(|s| format!(" with subresource \"{s}\""))
            .unwrap_or_default();
        let scope = match &self.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        format!(
            "{what}{named} is forbidden: User \"{}\" cannot {} resource \"{resource}\"{sub_text} in API group \"{}\" {scope}",
            user.username(),
            self.verb,
            self.group,
        )
    }
}

/// One RBAC rule, as it sits in a role (its index in the role, for the audit listing).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    /// `Role <namespace>/<name>` or `ClusterRole <name>`.
    pub role: String,
    /// Index in the role's `rules`.
    pub index: usize,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn matches(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let resources = strings(rule, "resources");
    let resource_ok = resources.iter().any(|r| {
        r == "*"
            || *r == a.resource
            || r.strip_suffix("/*").is_some_and(|base| {
                a.resource.split('/').next() == Some(base) && a.resource.contains('/')
            })
    });
    let names = strings(rule, "resourceNames");
    let name_ok = names.is_empty()
        || a.name
            .as_ref()
            .is_some_and(|n| names.iter().any(|x| x == n));
    matches(&strings(rule, "verbs"), &a.verb)
        && matches(&strings(rule, "apiGroups"), &a.group)
        && resource_ok
        && name_ok
}

fn subject_matches(subject: &Value, user: &User, binding_ns: Option<&str>) -> bool {
    let kind = subject
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = subject
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match kind {
        "ServiceAccount" => {
            let ns = subject
                .get("namespace")
                .and_then(Value::as_str)
                .or(binding_ns)
                .unwrap_or_default();
            matches!(user, User::ServiceAccount { namespace, name: n } if namespace == ns && n == name)
        }
        "User" => user.username() == name,
        "Group" => user.groups().iter().any(|g| g == name),
        _ => false,
    }
}

fn gvr(resource: &str) -> Gvr {
    Gvr {
        group: "rbac.authorization.k8s.io".into(),
        version: "v1".into(),
        resource: resource.into(),
    }
}

/// Decides whether `user` may do `a`. `Ok` carries the rule that allowed it (`None` for the
/// admin and for non-resource requests).
pub fn authorize(store: &Store, user: &User, a: &Attributes) -> Result<Option<RuleRef>, String> {
    if *user == User::Admin {
        return Ok(None);
    }
    let bindings = |kind_resource: &str, ns: Option<&str>| -> Vec<Value> {
        store
            .list(&gvr(kind_resource), ns, None)
            .unwrap_or_default()
            .into_iter()
            .map(|o| (*o).clone())
            .collect()
    };
    let role = |kind: &str, name: &str, ns: Option<&str>| -> Option<(String, Value)> {
        let (resource, label) = if kind == "ClusterRole" {
            ("clusterroles", format!("ClusterRole {name}"))
        } else {
            ("roles", format!("Role {}/{name}", ns.unwrap_or_default()))
        };
        store
            .list(
                &gvr(resource),
                if kind == "ClusterRole" { None } else { ns },
                None,
            )
            .ok()?
            .into_iter()
            .find(|r| r.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
            .map(|r| (label, (*r).clone()))
    };
    let mut candidates: Vec<(String, Value)> = Vec::new();
    for b in bindings("clusterrolebindings", None) {
        if strings_objs(&b, "subjects")
            .iter()
            .any(|s| subject_matches(s, user, None))
            && let Some(r) = role(
                "ClusterRole",
                b.pointer("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                None,
            )
        {
            candidates.push(r);
        }
    }
    if let Some(ns) = a.namespace.as_deref() {
        for b in bindings("rolebindings", Some(ns)) {
            if !strings_objs(&b, "subjects")
                .iter()
                .any(|s| subject_matches(s, user, Some(ns)))
            {
                continue;
            }
            let kind = b
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let name = b
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(r) = role(kind, name, Some(ns)) {
                candidates.push(r);
            }
        }
    }
    for (label, r) in &candidates {
        for (i, rule) in strings_objs(r, "rules").iter().enumerate() {
            if rule_allows(rule, a) {
                return Ok(Some(RuleRef {
                    role: label.clone(),
                    index: i,
                }));
            }
        }
    }
    Err(a.forbidden_message(user))
}

fn strings_objs(v: &Value, key: &str) -> Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// What ServiceAccounts asked and which rules answered: the requests made, the ones refused,
/// and (with [`Audit::unused_rules`]) what was granted and never needed.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// `(user, attributes without the name, allowed by)` of every allowed request.
    pub allowed: BTreeSet<(String, String, Option<RuleRef>)>,
    /// `(user, the 403 message)` of every refused request.
    pub refused: BTreeSet<(String, String)>,
}

impl Audit {
    /// Records a decision.
    pub fn record(
        &mut self,
        user: &User,
        a: &Attributes,
        decision: &Result<Option<RuleRef>, String>,
    ) {
        if *user == User::Admin {
            return;
        }
        match decision {
            Ok(rule) => {
                let what = format!(
                    "{} {}{}{}",
                    a.verb,
                    if a.group.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", a.group)
                    },
                    a.resource,
                    a.namespace
                        .as_ref()
                        .map(|n| format!(" in {n}"))
                        .unwrap_or_default()
                );
                self.allowed.insert((user.username(), what, rule.clone()));
            }
            Err(m) => {
                self.refused.insert((user.username(), m.clone()));
            }
        }
    }

    /// The rules of the roles bound to `user` that no recorded request needed.
    pub fn unused_rules(&self, store: &Store, user: &User) -> Vec<(RuleRef, Value)> {
        let used: BTreeSet<RuleRef> = self
            .allowed
            .iter()
            .filter(|(u, _, _)| *u == user.username())
            .filter_map(|(_, _, r)| r.clone())
            .collect();
        let mut out = Vec::new();
        let mut roles: Vec<(String, Value)> = Vec::new();
        for b in store
            .list(&gvr("clusterrolebindings"), None, None)
            .unwrap_or_default()
        {
            if strings_objs(&b, "subjects")
                .iter()
                .any(|s| subject_matches(s, user, None))
            {
                let name = b
                    .pointer("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                for r in store
                    .list(&gvr("clusterroles"), None, None)
                    .unwrap_or_default()
                {
                    if r.pointer("/metadata/name").and_then(Value::as_str) == Some(name) {
                        roles.push((format!("ClusterRole {name}"), (*r).clone()));
                    }
                }
            }
        }
        for b in store
            .list(&gvr("rolebindings"), None, None)
            .unwrap_or_default()
        {
            let ns = b
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if strings_objs(&b, "subjects")
                .iter()
                .any(|s| subject_matches(s, user, Some(&ns)))
            {
                let name = b
                    .pointer("/roleRef/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                for r in store
                    .list(&gvr("roles"), Some(&ns), None)
                    .unwrap_or_default()
                {
                    if r.pointer("/metadata/name").and_then(Value::as_str) == Some(name) {
                        roles.push((format!("Role {ns}/{name}"), (*r).clone()));
                    }
                }
            }
        }
        for (label, r) in roles {
            for (i, rule) in strings_objs(&r, "rules").into_iter().enumerate() {
                let rr = RuleRef {
                    role: label.clone(),
                    index: i,
                };
                if !used.contains(&rr) {
                    out.push((rr, rule));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn forbidden_messages_read_like_the_apiserver() {
        let a = Attributes::new(
            "list",
            &Gvr {
                group: String::new(),
                version: "v1".into(),
                resource: "pods".into(),
            },
            None,
            None,
            None,
        );
        let u = User::ServiceAccount {
            namespace: "kube-system".into(),
            name: "x".into(),
        };
        assert_eq!(
            a.forbidden_message(&u),
            "pods is forbidden: User \"system:serviceaccount:kube-system:x\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
        );
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let rule = json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["status"]});
        let gvr = Gvr {
            group: String::new(),
            version: "v1".into(),
            resource: "configmaps".into(),
        };
        assert!(rule_allows(
            &rule,
            &Attributes::new("get", &gvr, None, Some("ns"), Some("status"))
        ));
        assert!(!rule_allows(
            &rule,
            &Attributes::new("get", &gvr, None, Some("ns"), Some("other"))
        ));
        assert!(!rule_allows(
            &rule,
            &Attributes::new("update", &gvr, None, Some("ns"), Some("status"))
        ));
        let star = json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]});
        assert!(rule_allows(
            &star,
            &Attributes::new("delete", &gvr, Some("status"), None, None)
        ));
        let sub = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]});
        let pods = Gvr {
            group: String::new(),
            version: "v1".into(),
            resource: "pods".into(),
        };
        assert!(!rule_allows(
            &sub,
            &Attributes::new("patch", &pods, Some("status"), Some("n"), Some("p"))
        ));
    }
}
