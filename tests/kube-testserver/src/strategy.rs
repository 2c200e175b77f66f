//! Per-kind behaviour of the built-in types, as the apiserver's registry strategies have it:
//! defaulting, the status a create starts with, which part of an object the main resource and
//! the `status` subresource may change, immutable fields, and the semantic validation that the
//! OpenAPI schemas cannot express (a Pod needs containers, a Service ports, ...).
//!
//! Only the rules our controllers, kubectl and the conformance suite exercise are here; the
//! README lists what is left out.

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::field_error::FieldError;
use crate::registry::Resource;

fn group_kind(res: &Resource) -> (&str, &str) {
    (res.gvr.group.as_str(), res.kind.as_str())
}

fn set_default(obj: &mut Value, key: &str, value: Value) {
    if let Some(m) = obj.as_object_mut()
        && m.get(key).is_none_or(Value::is_null)
    {
        m.insert(key.to_owned(), value);
    }
}

fn object_at<'a>(obj: &'a mut Value, key: &str) -> &'a mut Value {
    if !obj.get(key).is_some_and(Value::is_object) {
        obj[key] = json!({});
    }
    &mut obj[key]
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn items_mut<'a>(v: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    v.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// Whether a kind's `status` is owned by its `status` subresource: reset on create (except
/// where the creator legitimately reports it, like a Node), ignored by updates of the object.
fn status_reset_on_create(res: &Resource) -> bool {
    res.has_subresource("status") && !matches!(group_kind(res), ("", "Node") | ("", "Namespace"))
}

/// Fills in what the apiserver fills in on create and resets what a create may not set.
pub fn prepare_create(res: &Resource, obj: &mut Value) {
    if status_reset_on_create(res)
        && let Some(m) = obj.as_object_mut()
    {
        m.remove("status");
    }
    default(res, obj);
    if let ("", "Pod") = group_kind(res) {
        let qos = qos_class(obj);
        let status = object_at(obj, "status");
        set_default(status, "phase", json!("Pending"));
        set_default(status, "qosClass", json!(qos));
    }
    if let ("", "Namespace") = group_kind(res) {
        let status = object_at(obj, "status");
        status["phase"] = json!("Active");
    }
    if let ("", "Service") = group_kind(res) {
        obj["status"] = json!({"loadBalancer": {}});
    }
    if let ("", "Pod") = group_kind(res)
        && let Some(spec) = obj.get_mut("spec")
    {
        default_tolerations(spec);
    }
}

/// The `DefaultTolerationSeconds` admission plugin: pods tolerate a not-ready or unreachable
/// node for 300 s unless they say otherwise.
fn default_tolerations(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    if !spec.get("tolerations").is_some_and(Value::is_array) {
        spec["tolerations"] = json!([]);
    }
    let Some(list) = spec["tolerations"].as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let covered = list.iter().any(|t| {
            let k = t.get("key").and_then(Value::as_str);
            let effect = t.get("effect").and_then(Value::as_str);
            let exists_all =
                k.is_none() && t.get("operator").and_then(Value::as_str) == Some("Exists");
            (k == Some(key) || exists_all) && effect.is_none_or(|e| e == "NoExecute")
        });
        if !covered {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}

/// Defaults of a kind, applied on create and on every update (as the apiserver's decoder does).
pub fn default(res: &Resource, obj: &mut Value) {
    match group_kind(res) {
        ("", "Service") => default_service(obj),
        ("", "Pod") => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
            }
        }
        ("", "Secret") => {
            set_default(obj, "type", json!("Opaque"));
            fold_string_data(obj);
        }
        ("", "Namespace") => {
            let name = str_at(obj, "/metadata/name").unwrap_or_default().to_owned();
            let labels = object_at(object_at(obj, "metadata"), "labels");
            labels["kubernetes.io/metadata.name"] = json!(name);
            let spec = object_at(obj, "spec");
            set_default(spec, "finalizers", json!(["kubernetes"]));
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            for p in items_mut(obj, "ports") {
                set_default(p, "protocol", json!("TCP"));
            }
        }
        ("apps", "Deployment") => {
            let spec = object_at(obj, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            let strategy = object_at(spec, "strategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = object_at(strategy, "rollingUpdate");
                set_default(ru, "maxUnavailable", json!("25%"));
                set_default(ru, "maxSurge", json!("25%"));
            }
            default_template(spec);
        }
        ("apps", "DaemonSet") => {
            let spec = object_at(obj, "spec");
            set_default(spec, "revisionHistoryLimit", json!(10));
            let strategy = object_at(spec, "updateStrategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = object_at(strategy, "rollingUpdate");
                set_default(ru, "maxUnavailable", json!(1));
                set_default(ru, "maxSurge", json!(0));
            }
            default_template(spec);
        }
        ("apps", "StatefulSet") => {
            let spec = object_at(obj, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            let strategy = object_at(spec, "updateStrategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = object_at(strategy, "rollingUpdate");
                set_default(ru, "partition", json!(0));
            }
            let pvc = object_at(spec, "persistentVolumeClaimRetentionPolicy");
            set_default(pvc, "whenDeleted", json!("Retain"));
            set_default(pvc, "whenScaled", json!("Retain"));
            default_template(spec);
        }
        ("apps", "ReplicaSet") => {
            let spec = object_at(obj, "spec");
            set_default(spec, "replicas", json!(1));
            default_template(spec);
        }
        ("batch", "Job") => {
            let uid = str_at(obj, "/metadata/uid").unwrap_or_default().to_owned();
            let name = str_at(obj, "/metadata/name").unwrap_or_default().to_owned();
            let spec = object_at(obj, "spec");
            default_job_spec(spec, &uid, &name);
        }
        ("batch", "CronJob") => {
            let spec = object_at(obj, "spec");
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            let jt = object_at(spec, "jobTemplate");
            let js = object_at(jt, "spec");
            set_default(js, "backoffLimit", json!(6));
            set_default(js, "completionMode", json!("NonIndexed"));
            set_default(js, "suspend", json!(false));
            default_template(js);
        }
        ("networking.k8s.io", "NetworkPolicy") => {
            let spec = object_at(obj, "spec");
            if spec.get("policyTypes").is_none_or(Value::is_null) {
                let mut types = vec![json!("Ingress")];
                if spec.get("egress").is_some_and(|e| !e.is_null()) {
                    types.push(json!("Egress"));
                }
                spec["policyTypes"] = Value::Array(types);
            }
            for dir in ["ingress", "egress"] {
                for rule in items_mut(spec, dir) {
                    for p in items_mut(rule, "ports") {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
        _ => {}
    }
}

fn default_service(obj: &mut Value) {
    let spec = object_at(obj, "spec");
    set_default(spec, "type", json!("ClusterIP"));
    let external_name = spec["type"] == "ExternalName";
    set_default(spec, "sessionAffinity", json!("None"));
    if !external_name {
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
        set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
        set_default(spec, "ipFamilies", json!(["IPv4"]));
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    for p in items_mut(spec, "ports") {
        set_default(p, "protocol", json!("TCP"));
        let port = p.get("port").cloned().unwrap_or(Value::Null);
        set_default(p, "targetPort", port);
    }
}

fn default_template(spec: &mut Value) {
    if let Some(pod_spec) = spec.pointer_mut("/template/spec") {
        default_pod_spec(pod_spec);
    }
}

fn default_job_spec(spec: &mut Value, uid: &str, name: &str) {
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completions", json!(1));
    set_default(spec, "parallelism", json!(1));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    set_default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    set_default(spec, "manualSelector", json!(false));
    if spec["manualSelector"] != true && !uid.is_empty() {
        // The apiserver generates the selector and the template's labels from the Job's uid
        // and name.
        let labels = json!({
            "batch.kubernetes.io/controller-uid": uid,
            "controller-uid": uid,
            "batch.kubernetes.io/job-name": name,
            "job-name": name,
        });
        if spec.get("selector").is_none_or(Value::is_null) {
            spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        }
        let tmeta = object_at(object_at(spec, "template"), "metadata");
        let tl = object_at(tmeta, "labels");
        if let (Some(m), Some(add)) = (tl.as_object_mut(), labels.as_object()) {
            for (k, v) in add {
                m.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    default_template(spec);
}

/// Pod spec defaults (also of workload templates).
fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    set_default(spec, "priority", json!(0));
    if spec.get("serviceAccountName").is_none_or(Value::is_null) {
        let sa = spec
            .get("serviceAccount")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        spec["serviceAccountName"] = json!(sa);
    }
    if spec.get("serviceAccount").is_none_or(Value::is_null) {
        spec["serviceAccount"] = spec["serviceAccountName"].clone();
    }
    for list in ["containers", "initContainers"] {
        for c in items_mut(spec, list) {
            default_container(c);
        }
    }
}

fn default_container(c: &mut Value) {
    {
        set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
        set_default(c, "terminationMessagePolicy", json!("File"));
        set_default(c, "resources", json!({}));
        // Requests default to the limits.
        if let Some(limits) = c
            .pointer("/resources/limits")
            .and_then(Value::as_object)
            .cloned()
        {
            let requests = object_at(object_at(c, "resources"), "requests");
            for (k, v) in limits {
                set_default(requests, &k, v);
            }
        }
        let image = c.get("image").and_then(Value::as_str).unwrap_or("");
        let policy = if image_is_latest(image) {
            "Always"
        } else {
            "IfNotPresent"
        };
        set_default(c, "imagePullPolicy", json!(policy));
        for p in items_mut(c, "ports") {
            set_default(p, "protocol", json!("TCP"));
        }
    }
}

fn image_is_latest(image: &str) -> bool {
    if image.contains('@') {
        return false;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, tag)) => tag == "latest",
        None => true,
    }
}

fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let has = |c: &Value, kind: &str| {
        c.pointer(&format!("/resources/{kind}"))
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    };
    if containers
        .iter()
        .all(|c| !has(c, "requests") && !has(c, "limits"))
    {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let l = c.pointer(&format!("/resources/limits/{r}"));
            let q = c.pointer(&format!("/resources/requests/{r}"));
            l.is_some() && (q.is_none() || q == l)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Folds a Secret's `stringData` into `data` (write-only field, never stored).
fn fold_string_data(obj: &mut Value) {
    let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) else {
        return;
    };
    let Some(sd) = sd.as_object() else { return };
    let data = object_at(obj, "data");
    for (k, v) in sd {
        let s = v.as_str().unwrap_or_default();
        data[k] = json!(base64::engine::general_purpose::STANDARD.encode(s));
    }
}

/// The decode errors the Go decoder raises for byte fields: a Secret's `data` and a
/// ConfigMap's `binaryData` must be base64 (400, before any validation).
pub fn decode_errors(res: &Resource, obj: &Value) -> Option<String> {
    let field = match group_kind(res) {
        ("", "Secret") => "data",
        ("", "ConfigMap") => "binaryData",
        _ => return None,
    };
    let map = obj.get(field)?.as_object()?;
    for (k, v) in map {
        let Some(s) = v.as_str() else { continue };
        if let Err(e) = base64::engine::general_purpose::STANDARD.decode(s) {
            let at = match e {
                base64::DecodeError::InvalidByte(i, _)
                | base64::DecodeError::InvalidLastSymbol(i, _) => i,
                _ => s.len(),
            };
            return Some(format!(
                "illegal base64 data at input byte {at} (field {field}[{k:?}])"
            ));
        }
    }
    None
}

/// How an update of the object (`status: false`) or of its `status` subresource
/// (`status: true`) is narrowed to what that endpoint may change.
pub fn prepare_update(res: &Resource, old: &Value, new: &mut Value, status: bool) {
    if status {
        // The status subresource changes the status and nothing else.
        let st = new.get("status").cloned();
        let rv = new.pointer("/metadata/resourceVersion").cloned();
        let managed = new.pointer("/metadata/managedFields").cloned();
        *new = old.clone();
        match st {
            Some(s) => new["status"] = s,
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        if let Some(rv) = rv {
            new["metadata"]["resourceVersion"] = rv;
        }
        if let Some(mf) = managed {
            new["metadata"]["managedFields"] = mf;
        }
        return;
    }
    if res.has_subresource("status") {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    default(res, new);
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_1035_label(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok =
        prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253 && p.split('.').all(is_dns_label));
    name_ok && prefix_ok
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

fn validate_labels(path: &str, labels: Option<&Value>, errs: &mut Vec<FieldError>) {
    let Some(m) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in m {
        if !is_qualified_name(k) {
            errs.push(FieldError::invalid(
                path,
                json!(k),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
            ));
        }
        if let Some(s) = v.as_str()
            && !is_label_value(s)
        {
            errs.push(FieldError::invalid(
                path.to_string(),
                json!(s),
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
            ));
        }
    }
}

fn validate_meta(res: &Resource, obj: &Value, errs: &mut Vec<FieldError>) {
    let name = str_at(obj, "/metadata/name").unwrap_or_default();
    let dns_label_names = matches!(group_kind(res), ("", "Namespace") | ("", "Service"));
    if dns_label_names {
        let ok = if res.kind == "Service" {
            is_dns_1035_label(name)
        } else {
            is_dns_label(name)
        };
        if !ok {
            let why = if res.kind == "Service" {
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
            } else {
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
            };
            errs.push(FieldError::invalid("metadata.name", json!(name), why));
        }
    }
    validate_labels("metadata.labels", obj.pointer("/metadata/labels"), errs);
    let finalizers = obj
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, f) in finalizers.iter().enumerate() {
        let s = f.as_str().unwrap_or_default();
        if !is_qualified_name(s) {
            errs.push(FieldError::invalid(
                format!("metadata.finalizers[{i}]"),
                json!(s),
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            ));
        } else if kube_core_group(&res.gvr.group)
            && !s.contains('/')
            && !matches!(s, "kubernetes" | "orphan" | "foregroundDeletion")
        {
            errs.push(FieldError::invalid(
                format!("metadata.finalizers[{i}]"),
                json!(s),
                "name is neither a standard finalizer name nor is it fully qualified",
            ));
        }
    }
}

/// Whether kube-apiserver's own validation (pkg/apis/core's ObjectMeta checks, stricter on
/// finalizer names) applies to objects of `group`; CRDs (apiextensions-apiserver) and custom
/// resources get the generic ObjectMeta validation only.
fn kube_core_group(group: &str) -> bool {
    group.is_empty()
        || matches!(group, "apps" | "batch" | "policy" | "autoscaling")
        || (group.ends_with(".k8s.io") && group != "apiextensions.k8s.io")
}

fn validate_ports(path: &str, ports: &[Value], errs: &mut Vec<FieldError>, named: bool) {
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("{path}[{i}]");
        match p.get("port").and_then(Value::as_i64) {
            Some(n) if (1..=65535).contains(&n) => {}
            Some(n) => errs.push(FieldError::invalid(
                format!("{at}.port"),
                json!(n),
                "must be between 1 and 65535, inclusive",
            )),
            None => errs.push(FieldError::required(format!("{at}.port"))),
        }
        if let Some(proto) = p.get("protocol").and_then(Value::as_str)
            && !matches!(proto, "TCP" | "UDP" | "SCTP")
        {
            errs.push(FieldError::not_supported(
                format!("{at}.protocol"),
                json!(proto),
                &["SCTP", "TCP", "UDP"],
            ));
        }
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if named && ports.len() > 1 && name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name")));
        }
        if !name.is_empty() && !names.insert(name.to_owned()) {
            errs.push(FieldError {
                field: format!("{at}.name"),
                kind: crate::field_error::FieldErrorKind::Duplicate,
                value: Some(json!(name)),
            });
        }
    }
}

fn validate_pod_spec(path: &str, spec: Option<&Value>, errs: &mut Vec<FieldError>) {
    let Some(spec) = spec else {
        errs.push(FieldError::required(format!("{path}.containers")));
        return;
    };
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        errs.push(FieldError::required(format!("{path}.containers")));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in containers.iter().enumerate() {
        let at = format!("{path}.containers[{i}]");
        match c.get("name").and_then(Value::as_str) {
            None | Some("") => errs.push(FieldError::required(format!("{at}.name"))),
            Some(n) if !is_dns_label(n) => errs.push(FieldError::invalid(
                format!("{at}.name"),
                json!(n),
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
            )),
            Some(n) => {
                if !names.insert(n.to_owned()) {
                    errs.push(FieldError {
                        field: format!("{at}.name"),
                        kind: crate::field_error::FieldErrorKind::Duplicate,
                        value: Some(json!(n)),
                    });
                }
            }
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
        {
            errs.push(FieldError::required(format!("{at}.image")));
        }
    }
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str)
        && !matches!(rp, "Always" | "OnFailure" | "Never")
    {
        errs.push(FieldError::not_supported(
            format!("{path}.restartPolicy"),
            json!(rp),
            &["Always", "OnFailure", "Never"],
        ));
    }
}

fn validate_selector_matches_template(spec: &Value, errs: &mut Vec<FieldError>, required: bool) {
    let Some(sel) = spec.get("selector").filter(|s| !s.is_null()) else {
        if required {
            errs.push(FieldError::required("spec.selector"));
        }
        return;
    };
    let labels = spec
        .pointer("/template/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let match_labels = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let exprs = sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if match_labels.is_empty() && exprs.is_empty() {
        errs.push(FieldError::invalid(
            "spec.selector",
            sel.clone(),
            "empty selector is invalid for deployment",
        ));
        return;
    }
    let ok = match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && exprs.iter().all(|e| expression_matches(e, &labels));
    if !ok {
        errs.push(FieldError::invalid(
            "spec.template.metadata.labels",
            Value::Object(labels),
            "`selector` does not match template `labels`",
        ));
    }
}

fn expression_matches(e: &Value, labels: &Map<String, Value>) -> bool {
    let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
    let values: Vec<&str> = e
        .get("values")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let have = labels.get(key).and_then(Value::as_str);
    match e.get("operator").and_then(Value::as_str) {
        Some("In") => have.is_some_and(|h| values.contains(&h)),
        Some("NotIn") => have.is_none_or(|h| !values.contains(&h)),
        Some("Exists") => have.is_some(),
        Some("DoesNotExist") => have.is_none(),
        _ => false,
    }
}

/// Semantic validation of an object about to be stored (create and update).
pub fn validate(res: &Resource, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    validate_meta(res, obj, &mut errs);
    match group_kind(res) {
        ("", "Pod") => validate_pod_spec("spec", obj.get("spec"), &mut errs),
        ("", "Service") => {
            let ty = str_at(obj, "/spec/type").unwrap_or("ClusterIP");
            let headless = str_at(obj, "/spec/clusterIP") == Some("None");
            let ports = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if ports.is_empty() && !headless && ty != "ExternalName" {
                errs.push(FieldError::required("spec.ports"));
            }
            validate_ports("spec.ports", &ports, &mut errs, true);
            if !matches!(
                ty,
                "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
            ) {
                errs.push(FieldError::not_supported(
                    "spec.type",
                    json!(ty),
                    &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
                ));
            }
            if ty == "ExternalName" && str_at(obj, "/spec/externalName").is_none_or(str::is_empty) {
                errs.push(FieldError::required("spec.externalName"));
            }
            validate_labels("spec.selector", obj.pointer("/spec/selector"), &mut errs);
        }
        ("events.k8s.io", "Event") => validate_event(obj, &mut errs),
        ("discovery.k8s.io", "EndpointSlice") => {
            match str_at(obj, "/addressType") {
                None | Some("") => errs.push(FieldError::required("addressType")),
                Some("IPv4" | "IPv6" | "FQDN") => {}
                Some(other) => errs.push(FieldError::not_supported(
                    "addressType",
                    json!(other),
                    &["FQDN", "IPv4", "IPv6"],
                )),
            }
            let eps = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (i, ep) in eps.iter().enumerate() {
                let n = ep
                    .get("addresses")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                if n == 0 {
                    errs.push(FieldError::required(format!("endpoints[{i}].addresses")));
                } else if n > 100 {
                    errs.push(FieldError {
                        field: format!("endpoints[{i}].addresses"),
                        kind: crate::field_error::FieldErrorKind::TooMany(100),
                        value: None,
                    });
                }
            }
            if eps.len() > 1000 {
                errs.push(FieldError {
                    field: "endpoints".into(),
                    kind: crate::field_error::FieldErrorKind::TooMany(1000),
                    value: None,
                });
            }
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
            validate_selector_matches_template(&spec, &mut errs, true);
            validate_pod_spec(
                "spec.template.spec",
                spec.pointer("/template/spec"),
                &mut errs,
            );
            if let Some(r) = spec.get("replicas").and_then(Value::as_i64)
                && r < 0
            {
                errs.push(FieldError::invalid(
                    "spec.replicas",
                    json!(r),
                    "must be greater than or equal to 0",
                ));
            }
        }
        ("batch", "Job") => {
            let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
            validate_pod_spec(
                "spec.template.spec",
                spec.pointer("/template/spec"),
                &mut errs,
            );
            if !matches!(
                str_at(&spec, "/template/spec/restartPolicy"),
                Some("OnFailure" | "Never")
            ) {
                errs.push(FieldError::not_supported(
                    "spec.template.spec.restartPolicy",
                    spec.pointer("/template/spec/restartPolicy")
                        .cloned()
                        .unwrap_or(json!("")),
                    &["OnFailure", "Never"],
                ));
            }
        }
        ("batch", "CronJob") => {
            match str_at(obj, "/spec/schedule") {
                None | Some("") => errs.push(FieldError::required("spec.schedule")),
                Some(s) => {
                    if let Err(why) = parse_cron(s) {
                        errs.push(FieldError::invalid("spec.schedule", json!(s), why));
                    }
                }
            }
            let js = obj.pointer("/spec/jobTemplate/spec");
            validate_pod_spec(
                "spec.jobTemplate.spec.template.spec",
                js.and_then(|j| j.pointer("/template/spec")),
                &mut errs,
            );
        }
        ("policy", "PodDisruptionBudget")
            if obj
                .pointer("/spec/minAvailable")
                .is_some_and(|v| !v.is_null())
                && obj
                    .pointer("/spec/maxUnavailable")
                    .is_some_and(|v| !v.is_null()) =>
        {
            errs.push(FieldError::invalid(
                "spec",
                obj["spec"].clone(),
                "minAvailable and maxUnavailable cannot be both set",
            ));
        }
        ("rbac.authorization.k8s.io", "Role" | "ClusterRole") => {
            let rules = obj
                .get("rules")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (i, r) in rules.iter().enumerate() {
                if r.get("verbs")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
                {
                    errs.push(FieldError::required(format!("rules[{i}].verbs")));
                }
            }
        }
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => {
            for f in ["apiGroup", "kind", "name"] {
                if obj
                    .pointer(&format!("/roleRef/{f}"))
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    if f == "apiGroup" {
                        continue;
                    }
                    errs.push(FieldError::required(format!("roleRef.{f}")));
                }
            }
        }
        _ => {}
    }
    errs
}

/// Semantic validation of an object about to be created: [`validate`] plus the rules the
/// apiserver applies on create only.
pub fn validate_create(res: &Resource, obj: &Value) -> Vec<FieldError> {
    let mut errs = validate(res, obj);
    if let ("events.k8s.io", "Event") = group_kind(res) {
        validate_event_create(obj, &mut errs);
    }
    errs
}

/// Limits of `events.k8s.io/v1` Events (`k8s.io/kubernetes/pkg/apis/core/validation`).
const EVENT_REPORTING_INSTANCE_MAX: usize = 128;
const EVENT_ACTION_MAX: usize = 128;
const EVENT_REASON_MAX: usize = 128;
const EVENT_NOTE_MAX: usize = 1024;

fn non_empty(obj: &Value, key: &str) -> bool {
    obj.get(key)
        .is_some_and(|v| !v.is_null() && v != "" && v != 0)
}

/// `legacyValidateEvent` for an `events.k8s.io/v1` Event, on create and update. Field paths are
/// the internal type's, as the apiserver reports them (`note` is `message`, `regarding` is
/// `involvedObject`).
fn validate_event(obj: &Value, errs: &mut Vec<FieldError>) {
    let ns = str_at(obj, "/metadata/namespace").unwrap_or_default();
    let regarding_ns = str_at(obj, "/regarding/namespace").unwrap_or_default();
    let mismatch = || {
        FieldError::invalid(
            "involvedObject.namespace",
            json!(regarding_ns),
            "does not match event.namespace",
        )
    };
    if !non_empty(obj, "eventTime") {
        let ok = if regarding_ns.is_empty() {
            ns.is_empty() || ns == "default"
        } else {
            ns == regarding_ns
        };
        if !ok {
            errs.push(mismatch());
        }
        return;
    }
    if regarding_ns.is_empty() && ns != "default" && ns != "kube-system" {
        errs.push(mismatch());
    }
    let len = |key: &str| str_at(obj, &format!("/{key}")).map_or(0, str::len);
    let too_long = |field: &str, max: usize| {
        FieldError::invalid(
            field,
            json!(""),
            format!("can have at most {max} characters"),
        )
    };
    let controller = str_at(obj, "/reportingController").unwrap_or_default();
    if controller.is_empty() {
        errs.push(FieldError::required("reportingController"));
    }
    if !is_qualified_name(controller) {
        errs.push(FieldError::invalid(
            "reportingController",
            json!(controller),
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
        ));
    }
    for (key, max) in [
        ("reportingInstance", EVENT_REPORTING_INSTANCE_MAX),
        ("action", EVENT_ACTION_MAX),
        ("reason", EVENT_REASON_MAX),
    ] {
        if len(key) == 0 {
            errs.push(FieldError::required(key));
        }
        if len(key) > max {
            errs.push(too_long(key, max));
        }
    }
    if len("note") > EVENT_NOTE_MAX {
        errs.push(too_long("message", EVENT_NOTE_MAX));
    }
}

/// `validateV1EventSeries`: a series counts at least two occurrences and says when the last was.
fn validate_event_series(obj: &Value, errs: &mut Vec<FieldError>) {
    let Some(series) = obj.get("series").filter(|v| !v.is_null()) else {
        return;
    };
    if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
        errs.push(FieldError::invalid(
            "series.count",
            json!(""),
            "should be at least 2",
        ));
    }
    if !non_empty(series, "lastObservedTime") {
        errs.push(FieldError::required("series.lastObservedTime"));
    }
}

/// The strict rules of `ValidateEventCreate` for `events.k8s.io/v1`.
fn validate_event_create(obj: &Value, errs: &mut Vec<FieldError>) {
    validate_event_series(obj, errs);
    if !non_empty(obj, "eventTime") {
        errs.push(FieldError::required("eventTime"));
    }
    let ty = str_at(obj, "/type").unwrap_or_default();
    if ty != "Normal" && ty != "Warning" {
        errs.push(FieldError::invalid(
            "type",
            json!(""),
            format!("has invalid value: {ty}"),
        ));
    }
    for key in [
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
        "deprecatedSource",
    ] {
        let set = match obj.get(key) {
            Some(Value::Object(m)) => m.values().any(|v| v != "" && !v.is_null()),
            Some(v) => !v.is_null() && v != "" && v != 0,
            None => false,
        };
        if set {
            errs.push(FieldError::invalid(key, json!(""), "needs to be unset"));
        }
    }
}

/// The update rules of `ValidateEventUpdate` for `events.k8s.io/v1`: a changed series is
/// valid, everything but the series is immutable.
fn validate_event_update(old: &Value, new: &Value, errs: &mut Vec<FieldError>) {
    if old.get("series") != new.get("series") {
        validate_event_series(new, errs);
    }
    for (key, field) in [
        ("regarding", "involvedObject"),
        ("reason", "reason"),
        ("note", "message"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("type", "type"),
        ("eventTime", "eventTime"),
        ("action", "action"),
        ("related", "related"),
        ("reportingController", "reportingController"),
        ("reportingInstance", "reportingInstance"),
    ] {
        let value = |o: &Value| o.get(key).filter(|v| !v.is_null()).cloned();
        if value(old) != value(new) {
            errs.push(FieldError::immutable(
                field,
                new.get(key).cloned().unwrap_or(Value::Null),
            ));
        }
    }
}

/// Checks a cron schedule as the CronJob controller's parser does: five fields (minute, hour,
/// day of month, month, day of week) with `*`, ranges, steps and lists, or a descriptor.
fn parse_cron(s: &str) -> Result<(), String> {
    let s = s.trim();
    let s = match s.split_once(' ') {
        Some((tz, rest)) if tz.starts_with("TZ=") || tz.starts_with("CRON_TZ=") => rest.trim(),
        _ => s,
    };
    if s.starts_with('@') {
        return match s {
            "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@midnight"
            | "@hourly" => Ok(()),
            _ if s.starts_with("@every ") => Ok(()),
            _ => Err(format!("unrecognized descriptor: {s}")),
        };
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "expected exactly 5 fields, found {}: {s}",
            fields.len()
        ));
    }
    let bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
    let names: [&[&str]; 5] = [
        &[],
        &[],
        &[],
        &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
        &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    ];
    for (i, field) in fields.iter().enumerate() {
        let (lo, hi) = bounds[i];
        for part in field.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, st)) => (r, Some(st)),
                None => (part, None),
            };
            if let Some(st) = step
                && st.parse::<u32>().map_or(true, |n| n == 0)
            {
                return Err(format!("invalid step {st:?} in {part:?}"));
            }
            if range == "*" || range == "?" {
                continue;
            }
            let value = |t: &str| -> Result<u32, String> {
                if let Ok(n) = t.parse::<u32>() {
                    return Ok(n);
                }
                names[i]
                    .iter()
                    .position(|n| n.eq_ignore_ascii_case(t))
                    .map(|p| {
                        let p = u32::try_from(p).unwrap_or(0);
                        if i == 3 { p + 1 } else { p }
                    })
                    .ok_or_else(|| format!("failed to parse int from {t}"))
            };
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None => {
                    let v = value(range)?;
                    (v, v)
                }
            };
            if a < lo || b > hi || a > b {
                return Err(format!(
                    "end of range ({b}) above maximum ({hi}) or beginning of range ({a}) below minimum ({lo}): {part}"
                ));
            }
        }
    }
    Ok(())
}

/// Fields that may not change, and the other update-only rules.
pub fn validate_update(res: &Resource, old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = validate(res, new);
    let changed = |p: &str| old.pointer(p) != new.pointer(p);
    match group_kind(res) {
        ("", "Service") => {
            let old_ip = str_at(old, "/spec/clusterIP").unwrap_or_default();
            let becomes_external = str_at(new, "/spec/type") == Some("ExternalName");
            if !old_ip.is_empty() && changed("/spec/clusterIP") && !becomes_external {
                errs.push(FieldError::immutable(
                    "spec.clusterIP",
                    new.pointer("/spec/clusterIP").cloned().unwrap_or(json!("")),
                ));
            }
        }
        ("", "Pod") => {
            let strip = |spec: Option<&Value>| {
                let mut s = spec.cloned().unwrap_or(Value::Null);
                for list in ["containers", "initContainers"] {
                    for c in items_mut(&mut s, list) {
                        if let Some(m) = c.as_object_mut() {
                            m.remove("image");
                        }
                    }
                }
                if let Some(m) = s.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                    m.remove("terminationGracePeriodSeconds");
                }
                s
            };
            if strip(old.get("spec")) != strip(new.get("spec")) {
                errs.push(FieldError::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
        }
        ("", "ConfigMap" | "Secret") => {
            if old.get("immutable") == Some(&json!(true)) {
                if changed("/immutable") {
                    errs.push(FieldError::forbidden(
                        "immutable",
                        "field is immutable when `immutable` is set",
                    ));
                }
                for f in ["data", "binaryData"] {
                    if changed(&format!("/{f}")) {
                        errs.push(FieldError::forbidden(
                            f,
                            "field is immutable when `immutable` is set",
                        ));
                    }
                }
            }
            if res.kind == "Secret" && changed("/type") {
                errs.push(FieldError::immutable(
                    "type",
                    new.get("type").cloned().unwrap_or(Value::Null),
                ));
            }
        }
        ("events.k8s.io", "Event") => validate_event_update(old, new, &mut errs),
        ("discovery.k8s.io", "EndpointSlice") if changed("/addressType") => {
            errs.push(FieldError::immutable(
                "addressType",
                new.get("addressType").cloned().unwrap_or(Value::Null),
            ));
        }
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet")
            if changed("/spec/selector") =>
        {
            errs.push(FieldError::immutable(
                "spec.selector",
                new.pointer("/spec/selector")
                    .cloned()
                    .unwrap_or(Value::Null),
            ));
        }
        ("batch", "Job") => {
            if changed("/spec/selector") {
                errs.push(FieldError::immutable(
                    "spec.selector",
                    new.pointer("/spec/selector")
                        .cloned()
                        .unwrap_or(Value::Null),
                ));
            }
            if changed("/spec/completions") {
                errs.push(FieldError::immutable(
                    "spec.completions",
                    new.pointer("/spec/completions")
                        .cloned()
                        .unwrap_or(Value::Null),
                ));
            }
        }
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding")
            if changed("/roleRef") =>
        {
            errs.push(FieldError::invalid(
                "roleRef",
                new.get("roleRef").cloned().unwrap_or(Value::Null),
                "cannot change roleRef",
            ));
        }
        _ => {}
    }
    errs
}

/// Whether a DELETE of this kind answers with the deleted object rather than a `Status`
/// (the apiserver's `ReturnDeletedObject`).
pub fn returns_deleted_object(res: &Resource) -> bool {
    matches!(
        group_kind(res),
        ("", "Pod" | "Service" | "Namespace" | "ServiceAccount")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Gvr, Registry};

    fn res(group: &str, resource: &str) -> Resource {
        Registry::default()
            .get(&Gvr {
                group: group.into(),
                version: "v1".into(),
                resource: resource.into(),
            })
            .cloned()
            .expect("builtin")
    }

    /// `events.k8s.io/v1` as kube-apiserver 1.32 validates it: strict on create, only the
    /// series may change afterwards (what kube-runtime's `Recorder` does).
    #[test]
    fn events_are_strict_on_create_and_only_their_series_changes() {
        let events = res("events.k8s.io", "events");
        let ev = json!({
            "metadata": {"name": "web.1", "namespace": "shop"},
            "eventTime": "2026-12-07T12:00:00.000000Z",
            "regarding": {"kind": "Service", "namespace": "shop", "name": "web"},
            "reason": "InvalidGlobalServiceAnnotation", "note": "bad", "action": "Export",
            "type": "Warning", "reportingController": "clustermesh-apiserver",
            "reportingInstance": "r1",
        });
        assert!(validate_create(&events, &ev).is_empty());
        let messages =
            |errs: Vec<FieldError>| errs.iter().map(FieldError::message).collect::<Vec<_>>();
        let mut bad = ev.clone();
        for key in ["eventTime", "action"] {
            bad.as_object_mut().unwrap().remove(key);
        }
        bad["deprecatedCount"] = json!(1);
        bad["type"] = json!("Bad");
        assert_eq!(
            messages(validate_create(&events, &bad)),
            [
                "eventTime: Required value",
                "type: Invalid value: \"\": has invalid value: Bad",
                "deprecatedCount: Invalid value: \"\": needs to be unset",
            ]
        );
        let mut series = ev.clone();
        series["series"] = json!({"count": 2, "lastObservedTime": "2026-12-07T12:00:01.000000Z"});
        assert!(validate_update(&events, &ev, &series).is_empty());
        let mut one = ev.clone();
        one["series"] = json!({"count": 1, "lastObservedTime": "2026-12-07T12:00:01.000000Z"});
        assert_eq!(
            messages(validate_update(&events, &ev, &one)),
            ["series.count: Invalid value: \"\": should be at least 2"]
        );
        let mut note = series.clone();
        note["note"] = json!("other");
        assert_eq!(
            messages(validate_update(&events, &ev, &note)),
            ["message: Invalid value: \"other\": field is immutable"]
        );
    }

    #[test]
    fn services_get_their_defaults_and_need_ports() {
        let svc = res("", "services");
        let mut o = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}});
        prepare_create(&svc, &mut o);
        assert_eq!(o["spec"]["type"], "ClusterIP");
        assert_eq!(o["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(o["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(o["spec"]["sessionAffinity"], "None");
        assert!(validate(&svc, &o).is_empty());
        let bare = json!({"metadata": {"name": "web"}, "spec": {}});
        assert_eq!(
            validate(&svc, &bare)[0].message(),
            "spec.ports: Required value"
        );
    }

    #[test]
    fn pods_need_containers_and_keep_their_spec() {
        let pod = res("", "pods");
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}, "status": {"phase": "Running"}});
        prepare_create(&pod, &mut p);
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(p["status"]["qosClass"], "BestEffort");
        let none = json!({"metadata": {"name": "p"}, "spec": {"containers": []}});
        assert_eq!(
            validate(&pod, &none)[0].message(),
            "spec.containers: Required value"
        );
        let mut changed = p.clone();
        changed["spec"]["nodeName"] = json!("n2");
        assert!(
            validate_update(&pod, &p, &changed)[0]
                .message()
                .starts_with("spec: Forbidden")
        );
        let mut image = p.clone();
        image["spec"]["containers"][0]["image"] = json!("nginx:2");
        assert!(validate_update(&pod, &p, &image).is_empty());
    }

    #[test]
    fn status_endpoint_changes_only_status() {
        let pod = res("", "pods");
        let old = json!({"metadata": {"name": "p", "labels": {"a": "1"}}, "spec": {"x": 1}, "status": {"phase": "Pending"}});
        let mut new = json!({"metadata": {"name": "p", "labels": {"a": "2"}}, "spec": {"x": 2}, "status": {"phase": "Running"}});
        prepare_update(&pod, &old, &mut new, true);
        assert_eq!(new["metadata"]["labels"]["a"], "1");
        assert_eq!(new["status"]["phase"], "Running");
        let mut main =
            json!({"metadata": {"name": "p"}, "spec": {"x": 1}, "status": {"phase": "Failed"}});
        prepare_update(&pod, &old, &mut main, false);
        assert_eq!(main["status"]["phase"], "Pending");
    }

    #[test]
    fn secrets_fold_string_data_and_refuse_bad_base64() {
        let secret = res("", "secrets");
        let mut s = json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}});
        prepare_create(&secret, &mut s);
        assert_eq!(s["data"]["k"], "dg==");
        assert!(s.get("stringData").is_none());
        assert_eq!(s["type"], "Opaque");
        assert!(decode_errors(&secret, &json!({"data": {"k": "!!"}})).is_some());
    }
}
