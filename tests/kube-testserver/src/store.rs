//! Generic object storage with Kubernetes resourceVersion semantics.
//!
//! One monotonic counter for the whole server; every write bumps it and is appended to a
//! bounded change log, and published to live watches, under one lock, so a watch that replays
//! from the log and then follows the live feed sees every change exactly once, in order. The
//! log doubles as MVCC history: paginated lists are served from the state at the first page's
//! revision. Changes older than the log are gone: watching or continuing from them is `410`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::registry::{Gvr, Registry, Resource};

/// A Kubernetes API error, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP code.
    pub code: u16,
    /// Status reason (`NotFound`, `AlreadyExists`, `Conflict`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `(name, group, kind)` of the object concerned.
    pub details: Option<(String, String, String)>,
}

impl ApiError {
    /// A new error.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, res: &Resource, name: &str) -> Self {
        self.details = Some((
            name.to_owned(),
            res.gvr.group.clone(),
            res.gvr.resource.clone(),
        ));
        self
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, group, kind)) = &self.details {
            s["details"] = json!({"name": name, "group": group, "kind": kind});
        }
        s
    }

    fn not_found(res: &Resource, name: &str) -> Self {
        let what = qualified(res);
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found")).about(res, name)
    }
}

fn qualified(res: &Resource) -> String {
    if res.gvr.group.is_empty() {
        res.gvr.resource.clone()
    } else {
        format!("{}.{}", res.gvr.resource, res.gvr.group)
    }
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted.
    Deleted,
}

/// One write.
#[derive(Debug)]
pub struct Change {
    /// Its resourceVersion.
    pub rv: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// Resource type.
    pub gvr: Gvr,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// The object after the change (for deletes: the last state, with the delete's RV).
    pub object: Arc<Value>,
    /// The object before the change.
    pub prev: Option<Arc<Value>>,
}

type Key = (Gvr, String, String);

/// What [`Store::watch_from`] returns: the retained changes to replay and the live feed.
pub type WatchStart = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

/// The whole state of the server.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    log: VecDeque<Arc<Change>>,
    retain: usize,
    /// Changes with an RV at or below this are no longer in the log.
    compacted: u64,
    tx: broadcast::Sender<Arc<Change>>,
    /// The resources served.
    pub registry: Registry,
    next_cluster_ip: u32,
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        })
}

/// Everything but `metadata.resourceVersion`, `metadata.generation` and `status`, to decide
/// whether an update changed the spec.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
        m.remove("metadata");
    }
    v
}

impl Store {
    /// An empty store with the `default`, `kube-system` and `kube-public` namespaces.
    pub fn new(retain: usize) -> Self {
        let (tx, _) = broadcast::channel(65_536);
        let mut s = Self {
            rv: 0,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            retain: retain.max(1),
            compacted: 0,
            tx,
            registry: Registry::default(),
            next_cluster_ip: 1,
        };
        let ns = s
            .registry
            .get(&Gvr {
                group: String::new(),
                version: "v1".into(),
                resource: "namespaces".into(),
            })
            .cloned();
        if let Some(ns) = ns {
            for name in ["default", "kube-system", "kube-public"] {
                let _ = s.create(&ns, None, json!({"metadata": {"name": name}}));
            }
        }
        s
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Forgets the change log: watches and list continuations from any earlier RV get 410.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted = self.rv;
    }

    fn record(
        &mut self,
        kind: ChangeKind,
        key: &Key,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        let change = Arc::new(Change {
            rv: self.rv,
            kind,
            gvr: key.0.clone(),
            namespace: key.1.clone(),
            name: key.2.clone(),
            object,
            prev,
        });
        self.log.push_back(Arc::clone(&change));
        while self.log.len() > self.retain {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.rv;
            }
        }
        let _ = self.tx.send(change);
    }

    fn check_namespace(&self, res: &Resource, ns: Option<&str>) -> Result<String, ApiError> {
        if !res.namespaced {
            return Ok(String::new());
        }
        let ns = ns.ok_or_else(|| ApiError::new(400, "BadRequest", "a namespace is required"))?;
        let key = (
            Gvr {
                group: String::new(),
                version: "v1".into(),
                resource: "namespaces".into(),
            },
            String::new(),
            ns.to_owned(),
        );
        if !self.objects.contains_key(&key) {
            return Err(
                ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                    .about(self.registry.get(&key.0).unwrap_or(res), ns),
            );
        }
        Ok(ns.to_owned())
    }

    fn allocate_cluster_ip(&mut self) -> String {
        let n = self.next_cluster_ip;
        self.next_cluster_ip += 1;
        format!("10.96.{}.{}", (n / 254) % 256, n % 254 + 1)
    }

    /// Creates an object.
    pub fn create(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        mut body: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let ns = self.check_namespace(res, ns)?;
        let obj = body
            .as_object_mut()
            .ok_or_else(|| ApiError::new(400, "BadRequest", "the body must be a JSON object"))?;
        obj.insert("apiVersion".into(), json!(res.gvr.api_version()));
        obj.insert("kind".into(), json!(res.kind));
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata must be an object"))?;
        if res.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), json!(ns));
                }
            }
        }
        let name = match (
            meta.get("name").and_then(Value::as_str),
            meta.get("generateName").and_then(Value::as_str),
        ) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                let suffix: String = (0..5)
                    .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
                    .collect();
                format!("{prefix}{suffix}")
            }
            _ => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        res.kind
                    ),
                ));
            }
        };
        if !is_dns_subdomain(&name) {
            return Err(ApiError::new(422, "Invalid", format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
                res.kind
            ))
            .about(res, &name));
        }
        let key = (res.gvr.clone(), ns, name.clone());
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", qualified(res)),
            )
            .about(res, &name));
        }
        self.rv += 1;
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(uid()));
        meta.insert("creationTimestamp".into(), json!(rfc3339_now()));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        match res.kind.as_str() {
            "Namespace" => {
                body["status"] = json!({"phase": "Active"});
            }
            "Service" => {
                let headless_or_external = body.pointer("/spec/type").and_then(Value::as_str)
                    == Some("ExternalName")
                    || body
                        .pointer("/spec/clusterIP")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty());
                if !headless_or_external {
                    let ip = self.allocate_cluster_ip();
                    if !body.get("spec").is_some_and(Value::is_object) {
                        body["spec"] = json!({});
                    }
                    body["spec"]["clusterIP"] = json!(ip);
                    body["spec"]["clusterIPs"] = json!([ip]);
                }
                if body.pointer("/spec/type").is_none() {
                    body["spec"]["type"] = json!("ClusterIP");
                }
            }
            "CustomResourceDefinition" => {
                let resources = Registry::from_crd(&body).ok_or_else(|| {
                    ApiError::new(422, "Invalid", "CustomResourceDefinition needs spec.group, spec.names.plural, spec.names.kind and spec.versions")
                })?;
                for r in resources {
                    self.registry.add(r);
                }
                let names = body.pointer("/spec/names").cloned().unwrap_or(Value::Null);
                body["status"] = json!({
                    "acceptedNames": names,
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}
                    ]
                });
            }
            _ => {}
        }
        let obj = Arc::new(body);
        self.objects.insert(key.clone(), Arc::clone(&obj));
        self.record(ChangeKind::Added, &key, Arc::clone(&obj), None);
        Ok(obj)
    }

    /// Reads one object.
    pub fn get(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let ns = if res.namespaced {
            ns.unwrap_or_default()
        } else {
            ""
        };
        self.objects
            .get(&(res.gvr.clone(), ns.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Replaces an object. A stale `metadata.resourceVersion` is a 409; an update that changes
    /// nothing is not a write (no new RV, no event).
    pub fn update(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let current = self.get(res, ns, name)?;
        let key = (
            res.gvr.clone(),
            if res.namespaced {
                ns.unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        );
        if !body.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body must be a JSON object",
            ));
        }
        let current_rv = current
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(Value::Null);
        match body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        {
            Some(rv) if !rv.is_empty() && Some(rv) != current_rv.as_str() => {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        qualified(res)
                    ),
                )
                .about(res, name));
            }
            _ => {}
        }
        if body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_some_and(|n| n != name)
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
        body["apiVersion"] = json!(res.gvr.api_version());
        body["kind"] = json!(res.kind);
        if !body.get("metadata").is_some_and(Value::is_object) {
            body["metadata"] = json!({});
        }
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
        ] {
            match current.pointer(&format!("/metadata/{field}")) {
                Some(v) => body["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = body["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        body["metadata"]["resourceVersion"] = current_rv;
        if body == *current {
            return Ok(current);
        }
        if spec_part(&body) != spec_part(&current) {
            let g = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            body["metadata"]["generation"] = json!(g + 1);
        }
        self.rv += 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(body);
        self.objects.insert(key.clone(), Arc::clone(&obj));
        self.record(ChangeKind::Modified, &key, Arc::clone(&obj), Some(current));
        Ok(obj)
    }

    /// Deletes an object (a Namespace takes its objects with it).
    pub fn delete(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let current = self.get(res, ns, name)?;
        if res.kind == "Namespace" {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| k.1 == name)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        if res.kind == "CustomResourceDefinition" {
            for r in Registry::from_crd(&current).unwrap_or_default() {
                self.registry.remove(&r.gvr);
            }
        }
        let key = (
            res.gvr.clone(),
            if res.namespaced {
                ns.unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        );
        Ok(self.remove(&key).unwrap_or(current))
    }

    fn remove(&mut self, key: &Key) -> Option<Arc<Value>> {
        let prev = self.objects.remove(key)?;
        self.rv += 1;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let last = Arc::new(last);
        self.record(ChangeKind::Deleted, key, Arc::clone(&last), Some(prev));
        Some(last)
    }

    /// The objects of one resource (in one namespace, or all), as of `at` (`None`: now).
    /// Returns 410 if `at` is older than the change log.
    pub fn list(
        &self,
        gvr: &Gvr,
        ns: Option<&str>,
        at: Option<u64>,
    ) -> Result<Vec<Arc<Value>>, ApiError> {
        let in_scope = |k: &Key| k.0 == *gvr && ns.is_none_or(|n| k.1 == n);
        let mut view: BTreeMap<Key, Arc<Value>> = self
            .objects
            .iter()
            .filter(|(k, _)| in_scope(k))
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        if let Some(at) = at.filter(|at| *at < self.rv) {
            if at < self.compacted {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    format!(
                        "The provided continue parameter is too old to display a consistent list result (resource version {at} is compacted)"
                    ),
                ));
            }
            for c in self.log.iter().rev().take_while(|c| c.rv > at) {
                let key = (c.gvr.clone(), c.namespace.clone(), c.name.clone());
                if !in_scope(&key) {
                    continue;
                }
                match (&c.kind, &c.prev) {
                    (ChangeKind::Added, _) => {
                        view.remove(&key);
                    }
                    (_, Some(prev)) => {
                        view.insert(key, Arc::clone(prev));
                    }
                    (_, None) => {}
                }
            }
        }
        Ok(view.into_values().collect())
    }

    /// Starts a watch: the changes after `from` still in the log, and a live feed of later
    /// ones. `410 Gone` if `from` is older than the log.
    pub fn watch_from(&self, from: u64) -> Result<WatchStart, ApiError> {
        if from < self.compacted {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {from} ({})", self.compacted + 1),
            ));
        }
        let replay = self.log.iter().filter(|c| c.rv > from).cloned().collect();
        Ok((replay, self.tx.subscribe()))
    }

    /// Subscribes to live changes only.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }
}
