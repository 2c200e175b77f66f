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

use crate::field_error::{FieldError, invalid_message};
use crate::registry::{Gvr, Registry, Resource};
use crate::schema::CrdSchema;
use crate::strategy;

/// The finalizer the garbage collector handles for `propagationPolicy=Orphan`.
pub const ORPHAN: &str = "orphan";
/// The finalizer the garbage collector handles for `propagationPolicy=Foreground`.
pub const FOREGROUND: &str = "foregroundDeletion";
/// The finalizer that removes a CRD's custom resources before the CRD.
pub const CRD_CLEANUP: &str = "customresourcecleanup.apiextensions.k8s.io";

/// How dependents are treated when their owner is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Dependents are kept; their owner references to the deleted owner are removed.
    Orphan,
    /// The owner goes at once; the garbage collector deletes the dependents afterwards.
    Background,
    /// The owner stays until its blocking dependents are gone.
    Foreground,
}

/// `DeleteOptions`, from the query and the body.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// `gracePeriodSeconds`.
    pub grace: Option<i64>,
    /// `propagationPolicy` (or the deprecated `orphanDependents`).
    pub propagation: Option<Propagation>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

/// What a delete did.
#[derive(Debug, Clone)]
pub enum Deleted {
    /// The object is gone; its last state.
    Gone(Arc<Value>),
    /// The object is terminating (finalizers, grace period): its state now.
    Pending(Arc<Value>),
}

fn namespaces_gvr() -> Gvr {
    Gvr {
        group: String::new(),
        version: "v1".into(),
        resource: "namespaces".into(),
    }
}

/// `metadata.finalizers`.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn add_finalizer(obj: &mut Value, f: &str) {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    let meta = &mut obj["metadata"];
    if !meta.get("finalizers").is_some_and(Value::is_array) {
        meta["finalizers"] = json!([]);
    }
    if let Some(list) = meta["finalizers"].as_array_mut()
        && !list.iter().any(|x| x == f)
    {
        list.push(json!(f));
    }
}

fn remove_finalizer(obj: &mut Value, f: &str) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(list) = meta.get_mut("finalizers").and_then(Value::as_array_mut) {
        list.retain(|x| x != f);
        if list.is_empty() {
            meta.remove("finalizers");
        }
    }
}

fn set_if_absent(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        m.entry(key.to_owned()).or_insert(v);
    }
}

/// The conditions a terminating namespace reports about what is left in it.
fn namespace_conditions(remaining: &[(Key, Arc<Value>)]) -> Value {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut finalizer_counts: BTreeMap<String, usize> = BTreeMap::new();
    for ((gvr, _, _), v) in remaining {
        let what = if gvr.group.is_empty() {
            gvr.resource.clone()
        } else {
            format!("{}.{}", gvr.resource, gvr.group)
        };
        *counts.entry(what).or_default() += 1;
        for f in finalizers(v) {
            *finalizer_counts.entry(f).or_default() += 1;
        }
    }
    let cond = |ty: &str, ok: bool, reason: &str, message: String| json!({"type": ty, "status": if ok { "False" } else { "True" }, "reason": reason, "message": message});
    let content: Vec<String> = counts
        .iter()
        .map(|(r, n)| format!("{r} has {n} resource instances"))
        .collect();
    let fins: Vec<String> = finalizer_counts
        .iter()
        .map(|(f, n)| format!("{f} in {n} resource instances"))
        .collect();
    json!([
        cond(
            "NamespaceDeletionDiscoveryFailure",
            true,
            "ResourcesDiscovered",
            "All resources successfully discovered".into()
        ),
        cond(
            "NamespaceDeletionGroupVersionParsingFailure",
            true,
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed".into()
        ),
        cond(
            "NamespaceDeletionContentFailure",
            true,
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization".into()
        ),
        if content.is_empty() {
            cond(
                "NamespaceContentRemaining",
                true,
                "ContentRemoved",
                "All content successfully removed".into(),
            )
        } else {
            cond(
                "NamespaceContentRemaining",
                false,
                "SomeResourcesRemain",
                format!("Some resources are remaining: {}", content.join(", ")),
            )
        },
        if fins.is_empty() {
            cond(
                "NamespaceFinalizersRemaining",
                true,
                "ContentHasNoFinalizers",
                "All content-preserving finalizers finished".into(),
            )
        } else {
            cond(
                "NamespaceFinalizersRemaining",
                false,
                "SomeFinalizersRemain",
                format!(
                    "Some content in the namespace has finalizers remaining: {}",
                    fins.join(", ")
                ),
            )
        },
    ])
}

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
    pub details: Option<Box<(String, String, String)>>,
    /// `details.causes`.
    pub causes: Vec<Value>,
    /// `details.retryAfterSeconds` (and a `Retry-After` header).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// A new error.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            causes: Vec::new(),
            retry_after: None,
        }
    }

    /// A `422 Invalid` for `name` of `res`, a cause per field.
    pub fn invalid(res: &Resource, name: &str, errors: &[FieldError]) -> Self {
        let mut e = Self::new(
            422,
            "Invalid",
            invalid_message(&qualified_kind(res), name, errors),
        );
        e.details = Some(Box::new((
            name.to_owned(),
            res.gvr.group.clone(),
            res.kind.clone(),
        )));
        e.causes = errors.iter().map(FieldError::cause).collect();
        e
    }

    fn about(mut self, res: &Resource, name: &str) -> Self {
        self.details = Some(Box::new((
            name.to_owned(),
            res.gvr.group.clone(),
            res.gvr.resource.clone(),
        )));
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
        if let Some((name, group, kind)) = self.details.as_deref() {
            s["details"] = json!({"name": name, "kind": kind});
            if !group.is_empty() {
                s["details"]["group"] = json!(group);
            }
        }
        if !self.causes.is_empty() {
            if !s.get("details").is_some_and(Value::is_object) {
                s["details"] = json!({});
            }
            s["details"]["causes"] = Value::Array(self.causes.clone());
        }
        if let Some(r) = self.retry_after {
            if !s.get("details").is_some_and(Value::is_object) {
                s["details"] = json!({});
            }
            s["details"]["retryAfterSeconds"] = json!(r);
        }
        s
    }

    /// `404 NotFound` for `name` of `res`.
    pub fn not_found_in(res: &Resource, name: &str) -> Self {
        Self::not_found(res, name)
    }

    fn not_found(res: &Resource, name: &str) -> Self {
        let what = qualified(res);
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found")).about(res, name)
    }
}

/// `Kind` for the core group, `Kind.group` otherwise, as `422 Invalid` messages name kinds.
pub fn qualified_kind(res: &Resource) -> String {
    if res.gvr.group.is_empty() {
        res.kind.clone()
    } else {
        format!("{}.{}", res.kind, res.gvr.group)
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

/// A CRD's compiled schemas, per served resource version, with their raw form.
type CompiledSchemas = Vec<(Gvr, (Arc<CrdSchema>, Value))>;

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
    next_node_port: i64,
    /// The cluster CA the root-CA publisher puts in every namespace (`kube-root-ca.crt`).
    root_ca: Option<String>,
    /// The compiled schemas of custom resources (per served version) and their raw form.
    crd_schemas: BTreeMap<Gvr, (Arc<CrdSchema>, Value)>,
    /// When terminating pods' grace periods end.
    grace_deadlines: BTreeMap<Key, tokio::time::Instant>,
    /// Wakes the reconciler.
    notify: Arc<tokio::sync::Notify>,
}

fn rfc3339_now() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
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
            next_node_port: 0,
            root_ca: None,
            crd_schemas: BTreeMap::new(),
            grace_deadlines: BTreeMap::new(),
            notify: Arc::new(tokio::sync::Notify::new()),
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
                let _ = s.create(&ns, None, json!({"metadata": {"name": name}}), false);
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

    fn check_namespace(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<String, ApiError> {
        if !res.namespaced {
            return Ok(String::new());
        }
        let ns = ns.ok_or_else(|| ApiError::new(400, "BadRequest", "a namespace is required"))?;
        let key = (namespaces_gvr(), String::new(), ns.to_owned());
        let Some(nsobj) = self.objects.get(&key) else {
            return Err(
                ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                    .about(self.registry.get(&key.0).unwrap_or(res), ns),
            );
        };
        if nsobj.pointer("/metadata/deletionTimestamp").is_some() {
            let mut e = ApiError::new(
                403,
                "Forbidden",
                if name.is_empty() {
                    format!(
                        "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        qualified(res)
                    )
                } else {
                    format!(
                        "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        qualified(res)
                    )
                },
            );
            e.causes.push(json!({"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}));
            return Err(e);
        }
        Ok(ns.to_owned())
    }

    fn allocate_cluster_ip(&mut self, dry_run: bool) -> String {
        let n = self.next_cluster_ip;
        if !dry_run {
            self.next_cluster_ip += 1;
        }
        format!("10.96.{}.{}", (n / 254) % 256, n % 254 + 1)
    }

    /// Gives every port of a NodePort or LoadBalancer Service without one a node port from
    /// 30000-32767 that no other Service uses.
    fn allocate_node_ports(&mut self, svc: &mut Value, dry_run: bool) {
        let mut used: std::collections::BTreeSet<i64> = self
            .objects
            .iter()
            .filter(|(k, _)| k.0.resource == "services" && k.0.group.is_empty())
            .flat_map(|(_, v)| {
                v.pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
                    .collect::<Vec<_>>()
            })
            .collect();
        let Some(ports) = svc.pointer_mut("/spec/ports").and_then(Value::as_array_mut) else {
            return;
        };
        for p in ports.iter() {
            if let Some(n) = p.get("nodePort").and_then(Value::as_i64) {
                used.insert(n);
            }
        }
        let mut next = self.next_node_port;
        for p in ports.iter_mut() {
            if p.get("nodePort").and_then(Value::as_i64).unwrap_or(0) > 0 {
                continue;
            }
            for _ in 0..2768 {
                let candidate = 30000 + (next % 2768);
                next = next.wrapping_add(1);
                if used.insert(candidate) {
                    p["nodePort"] = json!(candidate);
                    break;
                }
            }
        }
        if !dry_run {
            self.next_node_port = next;
        }
    }

    fn key(res: &Resource, ns: Option<&str>, name: &str) -> Key {
        (
            res.gvr.clone(),
            if res.namespaced {
                ns.unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            name.to_owned(),
        )
    }

    /// Creates an object (with `dry_run`: validated and returned, nothing stored).
    pub fn create(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        mut body: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let given = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let ns = self.check_namespace(res, ns, &given)?;
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
        } else {
            meta.remove("namespace");
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
                return Err(ApiError::invalid(
                    res,
                    "",
                    &[FieldError::required("metadata.name")],
                ));
            }
        };
        if !is_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                res,
                &name,
                &[FieldError::invalid(
                    "metadata.name",
                    json!(name),
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
                )],
            ));
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
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(uid()));
        meta.insert("creationTimestamp".into(), json!(rfc3339_now()));
        meta.insert("generation".into(), json!(1));
        meta.remove("resourceVersion");
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        meta.remove("selfLink");
        strategy::prepare_create(res, &mut body);
        if let Some(msg) = strategy::decode_errors(res, &body) {
            return Err(ApiError::new(400, "BadRequest", msg));
        }
        let errs = strategy::validate_create(res, &body);
        if !errs.is_empty() {
            return Err(ApiError::invalid(res, &name, &errs));
        }
        match res.kind.as_str() {
            "Service" => {
                let ty = body
                    .pointer("/spec/type")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let ty = ty.as_deref();
                let set = body
                    .pointer("/spec/clusterIP")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty());
                if ty == Some("ExternalName") {
                    if let Some(spec) = body.get_mut("spec").and_then(Value::as_object_mut) {
                        spec.remove("clusterIP");
                        spec.remove("clusterIPs");
                    }
                } else if set {
                    let ip = body["spec"]["clusterIP"].clone();
                    set_if_absent(&mut body["spec"], "clusterIPs", json!([ip]));
                } else {
                    let ip = self.allocate_cluster_ip(dry_run);
                    body["spec"]["clusterIP"] = json!(ip);
                    body["spec"]["clusterIPs"] = json!([ip]);
                }
                if matches!(ty, Some("NodePort" | "LoadBalancer")) {
                    self.allocate_node_ports(&mut body, dry_run);
                }
            }
            "CustomResourceDefinition" => {
                let (resources, schemas) = self.validate_crd(&body, &name)?;
                let names = body.pointer("/spec/names").cloned().unwrap_or(Value::Null);
                let stored: Vec<Value> = body
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|v| v.get("storage") == Some(&json!(true)))
                    .filter_map(|v| v.get("name").cloned())
                    .collect();
                body["status"] = json!({
                    "acceptedNames": names,
                    "storedVersions": stored,
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": rfc3339_now()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": rfc3339_now()}
                    ]
                });
                add_finalizer(&mut body, CRD_CLEANUP);
                if !dry_run {
                    for r in resources {
                        self.registry.add(r);
                    }
                    self.crd_schemas.extend(schemas);
                }
            }
            _ => {}
        }
        if dry_run {
            return Ok(Arc::new(body));
        }
        self.rv += 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(body);
        self.objects.insert(key.clone(), Arc::clone(&obj));
        self.record(ChangeKind::Added, &key, Arc::clone(&obj), None);
        if res.kind == "Namespace" {
            self.notify.notify_one();
        }
        Ok(obj)
    }

    fn validate_crd(
        &self,
        crd: &Value,
        name: &str,
    ) -> Result<(Vec<Resource>, CompiledSchemas), ApiError> {
        let crd_res = self
            .registry
            .get(&Gvr {
                group: "apiextensions.k8s.io".into(),
                version: "v1".into(),
                resource: "customresourcedefinitions".into(),
            })
            .cloned()
            .ok_or_else(|| ApiError::new(500, "InternalError", "CRDs are not registered"))?;
        let mut errs = Vec::new();
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("");
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("");
        if group.is_empty() {
            errs.push(FieldError::required("spec.group"));
        }
        if plural.is_empty() {
            errs.push(FieldError::required("spec.names.plural"));
        }
        if crd
            .pointer("/spec/names/kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.push(FieldError::required("spec.names.kind"));
        }
        if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
            errs.push(FieldError::invalid(
                "metadata.name",
                json!(name),
                "must be spec.names.plural+\".\"+spec.group",
            ));
        }
        match crd.pointer("/spec/scope").and_then(Value::as_str) {
            Some("Namespaced" | "Cluster") => {}
            None | Some("") => errs.push(FieldError::required("spec.scope")),
            Some(other) => errs.push(FieldError::not_supported(
                "spec.scope",
                json!(other),
                &["Cluster", "Namespaced"],
            )),
        }
        let versions = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if versions.is_empty() {
            errs.push(FieldError::invalid(
                "spec.versions",
                json!([]),
                "must have exactly one version marked as storage version",
            ));
        }
        let storage = versions
            .iter()
            .filter(|v| v.get("storage") == Some(&json!(true)))
            .count();
        if !versions.is_empty() && storage != 1 {
            errs.push(FieldError::invalid(
                "spec.versions",
                json!(
                    versions
                        .iter()
                        .filter_map(|v| v.get("name"))
                        .collect::<Vec<_>>()
                ),
                "must have exactly one version marked as storage version",
            ));
        }
        let mut schemas = Vec::new();
        for (i, v) in versions.iter().enumerate() {
            if v.get("served").and_then(Value::as_bool).is_none() {
                errs.push(FieldError::required(format!("spec.versions[{i}].served")));
            }
            match v.pointer("/schema/openAPIV3Schema") {
                None => errs.push(FieldError::required(format!(
                    "spec.versions[{i}].schema.openAPIV3Schema"
                ))),
                Some(raw) => match CrdSchema::compile_at(
                    raw,
                    &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                ) {
                    Ok(c) => {
                        let version = v.get("name").and_then(Value::as_str).unwrap_or_default();
                        schemas.push((
                            Gvr {
                                group: group.to_owned(),
                                version: version.to_owned(),
                                resource: plural.to_owned(),
                            },
                            (Arc::new(c), raw.clone()),
                        ));
                    }
                    Err(mut e) => errs.append(&mut e),
                },
            }
        }
        if !errs.is_empty() {
            return Err(ApiError::invalid(&crd_res, name, &errs));
        }
        let resources = Registry::from_crd(crd)
            .ok_or_else(|| ApiError::invalid(&crd_res, name, &[FieldError::required("spec")]))?;
        Ok((resources, schemas))
    }

    /// The compiled schema of a custom resource and its `openAPIV3Schema`.
    pub fn crd_schema(&self, gvr: &Gvr) -> Option<(Arc<CrdSchema>, Value)> {
        self.crd_schemas.get(gvr).cloned()
    }

    /// Every CRD object.
    pub fn crds(&self) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.0.resource == "customresourcedefinitions")
            .map(|(_, v)| (**v).clone())
            .collect()
    }

    /// Reads one object.
    pub fn get(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        self.objects
            .get(&Self::key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Replaces an object (`status`: through the `status` subresource). A stale
    /// `metadata.resourceVersion` is a 409; an update that changes nothing is not a write (no
    /// new RV, no event). With `dry_run` the would-be object is returned and nothing stored.
    pub fn update(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        mut body: Value,
        status: bool,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let current = self.get(res, ns, name)?;
        let key = Self::key(res, ns, name);
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
        for field in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
            let given = body.pointer(&format!("/metadata/{field}"));
            if given.is_some_and(|g| !g.is_null())
                && given != current.pointer(&format!("/metadata/{field}"))
            {
                return Err(ApiError::invalid(
                    res,
                    name,
                    &[FieldError {
                        field: format!("metadata.{field}"),
                        kind: crate::field_error::FieldErrorKind::Invalid(
                            "field is immutable; may only be changed via deletion".into(),
                        ),
                        value: given.cloned(),
                    }],
                ));
            }
        }
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
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
        body["metadata"]["resourceVersion"] = current_rv.clone();
        if res.kind == "CustomResourceDefinition" && !status {
            // The status is the apiserver's: accepted names and stored versions (a new storage
            // version is added to those objects may be stored in).
            body["status"] = current.get("status").cloned().unwrap_or(Value::Null);
            let storage: Vec<Value> = body
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|v| v.get("storage") == Some(&json!(true)))
                .filter_map(|v| v.get("name").cloned())
                .collect();
            if let Some(stored) = body
                .pointer_mut("/status/storedVersions")
                .and_then(Value::as_array_mut)
            {
                for v in storage {
                    if !stored.contains(&v) {
                        stored.push(v);
                    }
                }
            }
        }
        strategy::prepare_update(res, &current, &mut body, status);
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            let old = finalizers(&current);
            let added: Vec<String> = finalizers(&body)
                .into_iter()
                .filter(|f| !old.contains(f))
                .collect();
            if !added.is_empty() {
                let list: Vec<String> = added.iter().map(|f| format!("{f:?}")).collect();
                return Err(ApiError::invalid(
                    res,
                    name,
                    &[FieldError::forbidden(
                        "metadata.finalizers",
                        format!(
                            "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                            list.join(", ")
                        ),
                    )],
                ));
            }
        }
        if let Some(msg) = strategy::decode_errors(res, &body) {
            return Err(ApiError::new(400, "BadRequest", msg));
        }
        if !status {
            let errs = strategy::validate_update(res, &current, &body);
            if !errs.is_empty() {
                return Err(ApiError::invalid(res, name, &errs));
            }
        }
        if body == *current {
            return Ok(current);
        }
        if !status && spec_part(&body) != spec_part(&current) {
            let g = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            body["metadata"]["generation"] = json!(g + 1);
        }
        if dry_run {
            return Ok(Arc::new(body));
        }
        if res.kind == "CustomResourceDefinition" && !status {
            let (resources, schemas) = self.validate_crd(&body, name)?;
            for r in Registry::from_crd(&current).unwrap_or_default() {
                self.registry.remove(&r.gvr);
                self.crd_schemas.remove(&r.gvr);
            }
            for r in resources {
                self.registry.add(r);
            }
            self.crd_schemas.extend(schemas);
        }
        let obj = self.write(&key, body, &current);
        if Self::finished(&obj) {
            self.notify.notify_one();
            return Ok(self.remove(&key).unwrap_or(obj));
        }
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            self.notify.notify_one();
        }
        Ok(obj)
    }

    /// Stores `body` as the next revision of the object at `key`.
    fn write(&mut self, key: &Key, mut body: Value, current: &Arc<Value>) -> Arc<Value> {
        self.rv += 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(body);
        self.objects.insert(key.clone(), Arc::clone(&obj));
        self.record(
            ChangeKind::Modified,
            key,
            Arc::clone(&obj),
            Some(Arc::clone(current)),
        );
        obj
    }

    /// Whether a terminating object may go: no finalizers left and no grace period running.
    fn finished(obj: &Value) -> bool {
        obj.pointer("/metadata/deletionTimestamp").is_some()
            && finalizers(obj).is_empty()
            && obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 0
            && !(obj["kind"] == "Namespace"
                && obj
                    .pointer("/spec/finalizers")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty()))
    }

    /// Deletes an object, as the apiserver does: at once, or — with finalizers, a graceful
    /// Pod, a Namespace with content, a foreground or orphan propagation — by first setting
    /// `deletionTimestamp`; [`Store::reconcile`] finishes it.
    pub fn delete(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<Deleted, ApiError> {
        let current = self.get(res, ns, name)?;
        let key = Self::key(res, ns, name);
        if let Some(uid) = &opts.uid {
            let have = current.pointer("/metadata/uid").and_then(Value::as_str);
            if have != Some(uid.as_str()) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        qualified(res),
                        have.unwrap_or_default()
                    ),
                )
                .about(res, name));
            }
        }
        if let Some(rv) = &opts.resource_version {
            let have = current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            if have != Some(rv.as_str()) {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        qualified(res),
                        have.unwrap_or_default()
                    ),
                )
                .about(res, name));
            }
        }
        if res.kind == "Namespace" && matches!(name, "default" | "kube-system" | "kube-public") {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
            )
            .about(res, name));
        }
        let mut next = (*current).clone();
        match opts.propagation {
            Some(Propagation::Orphan) => {
                remove_finalizer(&mut next, FOREGROUND);
                add_finalizer(&mut next, ORPHAN);
            }
            Some(Propagation::Foreground) => {
                remove_finalizer(&mut next, ORPHAN);
                add_finalizer(&mut next, FOREGROUND);
            }
            Some(Propagation::Background) => {
                remove_finalizer(&mut next, ORPHAN);
                remove_finalizer(&mut next, FOREGROUND);
            }
            None => {}
        }
        // Pods bound to a node terminate gracefully (the kubelet stops them).
        let grace = if res.kind == "Pod" && res.gvr.group.is_empty() {
            let bound = current
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            let done = matches!(
                current.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
            let default = current
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30);
            let g = opts.grace.unwrap_or(default);
            let g = if g < 0 { 1 } else { g };
            if bound && !done { g } else { 0 }
        } else {
            0
        };
        let already = current.pointer("/metadata/deletionTimestamp").is_some();
        let ns_pending = res.kind == "Namespace";
        let pending = !finalizers(&next).is_empty() || grace > 0 || ns_pending;
        if !pending {
            if opts.dry_run {
                return Ok(Deleted::Gone(current));
            }
            self.grace_deadlines.remove(&key);
            self.notify.notify_one();
            return Ok(Deleted::Gone(
                self.remove_object(res, &key).unwrap_or(current),
            ));
        }
        let now = time::OffsetDateTime::now_utc();
        if already {
            // A second delete may only shorten a running grace period.
            let running = current
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if grace < running {
                next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                next["metadata"]["deletionTimestamp"] =
                    json!(rfc3339(now + time::Duration::seconds(grace)));
            }
        } else {
            next["metadata"]["deletionTimestamp"] =
                json!(rfc3339(now + time::Duration::seconds(grace)));
            next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            if ns_pending {
                next["status"]["phase"] = json!("Terminating");
            }
        }
        if opts.dry_run {
            return Ok(Deleted::Pending(Arc::new(next)));
        }
        if grace > 0 {
            let at =
                tokio::time::Instant::now() + std::time::Duration::from_secs(grace.unsigned_abs());
            let e = self.grace_deadlines.entry(key.clone()).or_insert(at);
            if at < *e {
                *e = at;
            }
        } else {
            self.grace_deadlines.remove(&key);
        }
        self.notify.notify_one();
        if next == *current {
            return Ok(Deleted::Pending(current));
        }
        if Self::finished(&next) {
            return Ok(Deleted::Gone(
                self.remove_object(res, &key).unwrap_or(current),
            ));
        }
        Ok(Deleted::Pending(self.write(&key, next, &current)))
    }

    /// Removes an object for good; a CRD takes its resources out of the registry.
    fn remove_object(&mut self, res: &Resource, key: &Key) -> Option<Arc<Value>> {
        let gone = self.remove(key)?;
        if res.kind == "CustomResourceDefinition" {
            for r in Registry::from_crd(&gone).unwrap_or_default() {
                self.registry.remove(&r.gvr);
                self.crd_schemas.remove(&r.gvr);
            }
        }
        Some(gone)
    }

    fn remove(&mut self, key: &Key) -> Option<Arc<Value>> {
        let prev = self.objects.remove(key)?;
        self.grace_deadlines.remove(key);
        self.rv += 1;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let last = Arc::new(last);
        self.record(ChangeKind::Deleted, key, Arc::clone(&last), Some(prev));
        self.notify.notify_one();
        Some(last)
    }

    /// The CRD that defines `res`, if it is a custom resource.
    pub fn crd_of(&self, res: &Resource) -> Option<Arc<Value>> {
        if res.gvr.group.is_empty() || self.registry.is_builtin(&res.gvr) {
            return None;
        }
        let key = (
            Gvr {
                group: "apiextensions.k8s.io".into(),
                version: "v1".into(),
                resource: "customresourcedefinitions".into(),
            },
            String::new(),
            format!("{}.{}", res.gvr.resource, res.gvr.group),
        );
        self.objects.get(&key).cloned()
    }

    /// Whether `res` is a custom resource (served from a CRD).
    pub fn is_custom(&self, res: &Resource) -> bool {
        !self.registry.is_builtin(&res.gvr)
    }

    /// Sets the CA certificate published in every namespace as ConfigMap `kube-root-ca.crt`.
    pub fn set_root_ca(&mut self, pem: &str) {
        self.root_ca = Some(pem.to_owned());
        self.notify.notify_one();
    }

    /// The notifier [`Store::reconcile`] should be run on.
    pub fn notifier(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.notify)
    }

    fn resource_of(&self, key: &Key) -> Option<Resource> {
        self.registry.get(&key.0).cloned()
    }

    /// Finishes what deletions started, as the kubelet, the namespace controller, the garbage
    /// collector and the CRD finalizer do on a real cluster. Returns when it should run next at
    /// the latest (a grace period ending).
    pub fn reconcile(&mut self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        for _ in 0..16 {
            if !self.reconcile_once(now) {
                break;
            }
        }
        self.grace_deadlines.values().min().copied()
    }

    fn finish_or_write(&mut self, key: &Key, next: Value, current: &Arc<Value>) {
        if Self::finished(&next) {
            if let Some(res) = self.resource_of(key) {
                self.remove_object(&res, key);
            } else {
                self.remove(key);
            }
        } else if next != **current {
            self.write(key, next, current);
        }
    }

    fn delete_background(&mut self, key: &Key) {
        let Some(res) = self.resource_of(key) else {
            self.remove(key);
            return;
        };
        let ns = (!key.1.is_empty()).then_some(key.1.as_str());
        let _ = self.delete(&res, ns, &key.2, &DeleteOptions::default());
    }

    /// Every object in namespace `ns`.
    fn namespace_content(&self, ns: &str) -> Vec<(Key, Arc<Value>)> {
        self.objects
            .iter()
            .filter(|(k, _)| k.1 == ns && self.registry.get(&k.0).is_some_and(|r| r.namespaced))
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    fn reconcile_once(&mut self, now: tokio::time::Instant) -> bool {
        let mut changed = false;
        // The kubelet: a pod whose grace period ended is deleted with grace 0.
        let due: Vec<Key> = self
            .grace_deadlines
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.grace_deadlines.remove(&key);
            if let Some(current) = self.objects.get(&key).cloned() {
                let mut next = (*current).clone();
                next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                self.finish_or_write(&key, next, &current);
                changed = true;
            }
        }
        // The namespace controller.
        let terminating: Vec<(Key, Arc<Value>)> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                k.0 == namespaces_gvr() && v.pointer("/metadata/deletionTimestamp").is_some()
            })
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (nskey, nsobj) in terminating {
            let inside = self.namespace_content(&nskey.2);
            for (k, v) in &inside {
                if v.pointer("/metadata/deletionTimestamp").is_none() {
                    self.delete_background(k);
                    changed = true;
                }
            }
            let remaining = self.namespace_content(&nskey.2);
            let Some(current) = self.objects.get(&nskey).cloned() else {
                continue;
            };
            let mut next = (*current).clone();
            next["status"]["conditions"] = namespace_conditions(&remaining);
            if remaining.is_empty()
                && let Some(f) = next
                    .pointer_mut("/spec/finalizers")
                    .and_then(Value::as_array_mut)
            {
                f.retain(|x| x != "kubernetes");
            }
            if next != *nsobj {
                self.finish_or_write(&nskey, next, &current);
                changed = true;
            }
        }
        // The CRD finalizer: a terminating CRD takes its custom resources with it.
        let crds: Vec<(Key, Arc<Value>)> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                k.0.resource == "customresourcedefinitions"
                    && v.pointer("/metadata/deletionTimestamp").is_some()
                    && finalizers(v).iter().any(|f| f == CRD_CLEANUP)
            })
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (key, crd) in crds {
            let gvrs: Vec<Gvr> = Registry::from_crd(&crd)
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.gvr)
                .collect();
            let crs: Vec<(Key, Arc<Value>)> = self
                .objects
                .iter()
                .filter(|(k, _)| gvrs.contains(&k.0))
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect();
            for (k, v) in &crs {
                if v.pointer("/metadata/deletionTimestamp").is_none() {
                    self.delete_background(k);
                    changed = true;
                }
            }
            if crs.is_empty() {
                let mut next = (*crd).clone();
                remove_finalizer(&mut next, CRD_CLEANUP);
                self.finish_or_write(&key, next, &crd);
                changed = true;
            }
        }
        changed |= self.collect_garbage();
        changed |= self.namespace_defaults();
        changed
    }

    /// The ServiceAccount controller and the root-CA publisher: every active namespace has a
    /// `default` ServiceAccount and a `kube-root-ca.crt` ConfigMap.
    fn namespace_defaults(&mut self) -> bool {
        let active: Vec<String> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                k.0 == namespaces_gvr() && v.pointer("/metadata/deletionTimestamp").is_none()
            })
            .map(|(k, _)| k.2.clone())
            .collect();
        let core = |resource: &str| Gvr {
            group: String::new(),
            version: "v1".into(),
            resource: resource.into(),
        };
        let (Some(sa), Some(cm)) = (
            self.registry.get(&core("serviceaccounts")).cloned(),
            self.registry.get(&core("configmaps")).cloned(),
        ) else {
            return false;
        };
        let mut changed = false;
        for ns in active {
            if !self
                .objects
                .contains_key(&(sa.gvr.clone(), ns.clone(), "default".into()))
            {
                changed |= self
                    .create(
                        &sa,
                        Some(&ns),
                        json!({"metadata": {"name": "default"}}),
                        false,
                    )
                    .is_ok();
            }
            if let Some(ca) = self.root_ca.clone()
                && !self.objects.contains_key(&(
                    cm.gvr.clone(),
                    ns.clone(),
                    "kube-root-ca.crt".into(),
                ))
            {
                changed |= self
                    .create(
                        &cm,
                        Some(&ns),
                        json!({"metadata": {"name": "kube-root-ca.crt", "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}}, "data": {"ca.crt": ca}}),
                        false,
                    )
                    .is_ok();
            }
        }
        changed
    }

    /// The garbage collector: dependents of owners that are gone are deleted; foreground
    /// owners wait for their blocking dependents; orphaning owners release their dependents.
    fn collect_garbage(&mut self) -> bool {
        let mut changed = false;
        let mut uids: BTreeMap<String, Key> = BTreeMap::new();
        let mut any_owned = false;
        for (k, v) in &self.objects {
            if let Some(u) = v.pointer("/metadata/uid").and_then(Value::as_str) {
                uids.insert(u.to_owned(), k.clone());
            }
            any_owned |= v
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
        }
        let deleting = |v: &Value, f: &str| {
            v.pointer("/metadata/deletionTimestamp").is_some()
                && finalizers(v).iter().any(|x| x == f)
        };
        let owners_in: Vec<(Key, Arc<Value>)> = self
            .objects
            .iter()
            .filter(|(_, v)| deleting(v, ORPHAN) || deleting(v, FOREGROUND))
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        if !any_owned && owners_in.is_empty() {
            return false;
        }
        let dependents_of =
            |objects: &BTreeMap<Key, Arc<Value>>, uid: &str| -> Vec<(Key, Arc<Value>)> {
                objects
                    .iter()
                    .filter(|(_, v)| {
                        v.pointer("/metadata/ownerReferences")
                            .and_then(Value::as_array)
                            .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
                    })
                    .map(|(k, v)| (k.clone(), Arc::clone(v)))
                    .collect()
            };
        for (okey, owner) in owners_in {
            let uid = owner
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let deps = dependents_of(&self.objects, &uid);
            if deleting(&owner, ORPHAN) {
                for (dk, dv) in deps {
                    let mut next = (*dv).clone();
                    if let Some(refs) = next
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        refs.retain(|r| r["uid"] != uid.as_str());
                    }
                    self.write(&dk, next, &dv);
                }
                if let Some(cur) = self.objects.get(&okey).cloned() {
                    let mut next = (*cur).clone();
                    remove_finalizer(&mut next, ORPHAN);
                    self.finish_or_write(&okey, next, &cur);
                }
                changed = true;
            } else {
                for (dk, dv) in &deps {
                    if dv.pointer("/metadata/deletionTimestamp").is_none() {
                        self.delete_background(dk);
                        changed = true;
                    }
                }
                let blocking = dependents_of(&self.objects, &uid).iter().any(|(_, dv)| {
                    dv.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter().any(|r| {
                                r["uid"] == uid.as_str() && r["blockOwnerDeletion"] == true
                            })
                        })
                });
                if !blocking && let Some(cur) = self.objects.get(&okey).cloned() {
                    let mut next = (*cur).clone();
                    remove_finalizer(&mut next, FOREGROUND);
                    self.finish_or_write(&okey, next, &cur);
                    changed = true;
                }
            }
        }
        // Dependents whose owners are all gone.
        let orphans: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| v.pointer("/metadata/deletionTimestamp").is_none())
            .filter(|(_, v)| {
                v.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        !refs.is_empty()
                            && refs
                                .iter()
                                .all(|r| r["uid"].as_str().is_none_or(|u| !uids.contains_key(u)))
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in orphans {
            self.delete_background(&k);
            changed = true;
        }
        changed
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
