//! Which resources exist: group, version, plural, kind, scope. Built-ins plus whatever
//! CustomResourceDefinitions register; storage is generic, so a new resource needs no code.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Group/version/resource: what a URL names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gvr {
    /// API group, empty for the core group.
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural resource name.
    pub resource: String,
}

impl Gvr {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// One resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Where it lives.
    pub gvr: Gvr,
    /// Its kind.
    pub kind: String,
    /// Singular name.
    pub singular: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: Vec<String>,
    /// Subresources served besides the object itself (`status`).
    pub subresources: Vec<String>,
    /// Discovery categories (`all`).
    pub categories: Vec<String>,
}

impl Resource {
    fn builtin(
        group: &str,
        version: &str,
        resource: &str,
        kind: &str,
        namespaced: bool,
        short: &[&str],
    ) -> Self {
        Self {
            gvr: Gvr {
                group: group.into(),
                version: version.into(),
                resource: resource.into(),
            },
            kind: kind.into(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| (*s).to_owned()).collect(),
            subresources: Vec::new(),
            categories: Vec::new(),
        }
    }

    fn with_status(mut self) -> Self {
        self.subresources.push("status".into());
        self
    }

    fn with_sub(mut self, sub: &str) -> Self {
        self.subresources.push(sub.into());
        self
    }

    fn in_all(mut self) -> Self {
        self.categories.push("all".into());
        self
    }

    /// Whether `sub` is served for this resource.
    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.iter().any(|s| s == sub)
    }

    fn discovery(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.gvr.resource,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
        });
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut out = vec![main];
        for sub in &self.subresources {
            let mut d = json!({
                "name": format!("{}/{sub}", self.gvr.resource),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            });
            match sub.as_str() {
                "log" => d["verbs"] = json!(["get"]),
                "token" => {
                    d["verbs"] = json!(["create"]);
                    d["kind"] = json!("TokenRequest");
                    d["group"] = json!("authentication.k8s.io");
                    d["version"] = json!("v1");
                }
                "scale" => {
                    d["kind"] = json!("Scale");
                    d["group"] = json!("autoscaling");
                    d["version"] = json!("v1");
                }
                _ => {}
            }
            out.push(d);
        }
        out
    }
}

/// Every known resource.
#[derive(Debug, Clone)]
pub struct Registry {
    resources: BTreeMap<Gvr, Resource>,
}

thread_local! {
    static BUILTIN: Vec<Gvr> = Registry::builtins().into_iter().map(|r| r.gvr).collect();
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Self {
            resources: BTreeMap::new(),
        };
        for res in Self::builtins() {
            r.add(res);
        }
        r
    }
}

impl Registry {
    fn builtins() -> Vec<Resource> {
        vec![
            Resource::builtin("", "v1", "namespaces", "Namespace", false, &["ns"]).with_status(),
            Resource::builtin("", "v1", "services", "Service", true, &["svc"])
                .with_status()
                .in_all(),
            Resource::builtin("", "v1", "pods", "Pod", true, &["po"])
                .with_status()
                .with_sub("log")
                .in_all(),
            Resource::builtin("", "v1", "nodes", "Node", false, &["no"]).with_status(),
            Resource::builtin("", "v1", "secrets", "Secret", true, &[]),
            Resource::builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
            Resource::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"])
                .with_sub("token"),
            Resource::builtin("", "v1", "events", "Event", true, &["ev"]),
            Resource::builtin("", "v1", "endpoints", "Endpoints", true, &["ep"]),
            Resource::builtin(
                "discovery.k8s.io",
                "v1",
                "endpointslices",
                "EndpointSlice",
                true,
                &[],
            ),
            Resource::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, &[]),
            Resource::builtin("events.k8s.io", "v1", "events", "Event", true, &["ev"]),
            Resource::builtin("apps", "v1", "deployments", "Deployment", true, &["deploy"])
                .with_status()
                .with_sub("scale")
                .in_all(),
            Resource::builtin("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"])
                .with_status()
                .in_all(),
            Resource::builtin("apps", "v1", "statefulsets", "StatefulSet", true, &["sts"])
                .with_status()
                .with_sub("scale")
                .in_all(),
            Resource::builtin("apps", "v1", "replicasets", "ReplicaSet", true, &["rs"])
                .with_status()
                .with_sub("scale")
                .in_all(),
            Resource::builtin(
                "apps",
                "v1",
                "controllerrevisions",
                "ControllerRevision",
                true,
                &[],
            ),
            Resource::builtin("batch", "v1", "jobs", "Job", true, &[])
                .with_status()
                .in_all(),
            Resource::builtin("batch", "v1", "cronjobs", "CronJob", true, &["cj"])
                .with_status()
                .in_all(),
            Resource::builtin(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
                &["pdb"],
            )
            .with_status(),
            Resource::builtin(
                "networking.k8s.io",
                "v1",
                "networkpolicies",
                "NetworkPolicy",
                true,
                &["netpol"],
            ),
            Resource::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "roles",
                "Role",
                true,
                &[],
            ),
            Resource::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "rolebindings",
                "RoleBinding",
                true,
                &[],
            ),
            Resource::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
                &[],
            ),
            Resource::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
                &[],
            ),
            Resource::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
            )
            .with_status(),
        ]
    }

    /// Adds (or replaces) a resource.
    pub fn add(&mut self, res: Resource) {
        self.resources.insert(res.gvr.clone(), res);
    }

    /// Removes a resource.
    pub fn remove(&mut self, gvr: &Gvr) {
        self.resources.remove(gvr);
    }

    /// Whether `gvr` is one of the built-in resources (not from a CRD).
    pub fn is_builtin(&self, gvr: &Gvr) -> bool {
        BUILTIN.with(|b| b.iter().any(|r| r == gvr))
    }

    /// Every resource served.
    pub fn all(&self) -> impl Iterator<Item = &Resource> {
        self.resources.values()
    }

    /// Looks a resource up.
    pub fn get(&self, gvr: &Gvr) -> Option<&Resource> {
        self.resources.get(gvr)
    }

    /// The resources a CRD object defines (one per served version).
    pub fn from_crd(crd: &Value) -> Option<Vec<Resource>> {
        let spec = crd.get("spec")?;
        let group = spec.get("group")?.as_str()?;
        let names = spec.get("names")?;
        let plural = names.get("plural")?.as_str()?;
        let kind = names.get("kind")?.as_str()?;
        let singular = names
            .get("singular")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| kind.to_lowercase());
        let short_names: Vec<String> = names
            .get("shortNames")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
        let categories: Vec<String> = names
            .get("categories")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let versions = spec.get("versions")?.as_array()?;
        Some(
            versions
                .iter()
                .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
                .filter_map(|v| {
                    let status = v.pointer("/subresources/status").is_some();
                    v.get("name")
                        .and_then(Value::as_str)
                        .map(|name| (name, status))
                })
                .map(|(version, status)| Resource {
                    gvr: Gvr {
                        group: group.into(),
                        version: version.into(),
                        resource: plural.into(),
                    },
                    kind: kind.into(),
                    singular: singular.clone(),
                    namespaced,
                    short_names: short_names.clone(),
                    subresources: if status {
                        vec!["status".into()]
                    } else {
                        Vec::new()
                    },
                    categories: categories.clone(),
                })
                .collect(),
        )
    }

    /// `/api`.
    pub fn core_versions(&self, server: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
        })
    }

    fn groups(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for gvr in self.resources.keys().filter(|g| !g.group.is_empty()) {
            let versions = groups.entry(&gvr.group).or_default();
            if !versions.contains(&gvr.version.as_str()) {
                versions.push(&gvr.version);
            }
        }
        groups
    }

    fn group_json(name: &str, versions: &[&str]) -> Value {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
            .collect();
        json!({
            "name": name,
            "versions": vs,
            "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
        })
    }

    /// `/apis`.
    pub fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|(name, versions)| Self::group_json(name, versions))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `/apis/<group>`.
    pub fn group(&self, group: &str) -> Option<Value> {
        let groups = self.groups();
        let versions = groups.get(group)?;
        let mut g = Self::group_json(group, versions);
        g["kind"] = json!("APIGroup");
        g["apiVersion"] = json!("v1");
        Some(g)
    }

    /// `/api/v1` or `/apis/<group>/<version>`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let resources: Vec<Value> = self
            .resources
            .values()
            .filter(|r| r.gvr.group == group && r.gvr.version == version)
            .flat_map(Resource::discovery)
            .collect();
        if resources.is_empty() {
            return None;
        }
        let gv = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        )
    }
}
