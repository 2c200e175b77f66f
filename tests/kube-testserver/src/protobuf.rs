//! Decodes the Kubernetes protobuf encoding (`application/vnd.kubernetes.protobuf`) of any
//! built-in Kubernetes 1.32 object into the JSON the real apiserver accepts for it.
//!
//! kubectl's typed commands (`create service|deployment|job|cronjob|role|rolebinding|
//! clusterrole|clusterrolebinding|serviceaccount|poddisruptionbudget|priorityclass|quota|
//! ingress|secret|configmap|namespace|token`) send protobuf; everything else kubectl and kube-rs
//! send is JSON.
//!
//! # How
//!
//! The wire format is the `k8s\0` magic followed by a `runtime.Unknown` envelope whose
//! `typeMeta` names the object's `apiVersion`/`kind` and whose `raw` is the object's message.
//! Nothing is hand-written per kind: `build.rs` compiles the upstream `generated.proto` files
//! of Kubernetes 1.32 (shipped as data by the crates.io package `k8s-rs-pb`) with `protoc`
//! into a `FileDescriptorSet` that is embedded here; the message is looked up by
//! `apiVersion`/`kind` (`apps/v1` `Deployment` → `api.apps.v1.Deployment`), decoded as a
//! [`prost_reflect::DynamicMessage`] and walked field by field. The descriptors are the
//! authority on field numbers and types, so every kind, sub-message, list and map decodes.
//!
//! Why this source: `k8s-pb` (kube-rs) ships only prost structs, whose snake_case field names
//! lose the JSON names (`clusterIP`, `podIPs`) and which carry no descriptors; `k8s-rs-pb`'s
//! own Rust is 12 MB of rust-protobuf code per version, far too heavy to compile, but its
//! package carries the `.proto` files themselves, which are what the apiserver's codec is
//! generated from.
//!
//! # The JSON
//!
//! Proto field names are the JSON names, except where Go's JSON encoding differs from the
//! message structure; those rules are applied here:
//!
//! - well-known types: `IntOrString` → number or string, `Quantity` → string, `Time` →
//!   RFC 3339 in seconds, `MicroTime` → RFC 3339 in microseconds, `Duration` → Go duration
//!   (`1h0m0s`), `RawExtension`/`FieldsV1`/apiextensions `JSON` → the embedded JSON (a nested
//!   protobuf object is decoded in turn), `Verbs`/`ExtraValue` → a string list,
//!   `JSONSchemaPropsOr{Array,Bool,StringArray}` → whichever side is set; `bytes` → base64.
//! - embedded Go structs (`json:",inline"`) are messages on the wire and flattened here:
//!   see [`INLINE`].
//! - field names frozen before they matched the JSON name: see [`RENAMES`], and JSONSchemaProps'
//!   `ref`/`schema`/`xKubernetes…` → `$ref`/`$schema`/`x-kubernetes-…`.
//!
//! Presence: a field absent from the wire is absent from the JSON. Go's generated marshallers
//! write every non-pointer field, zero or not, and the protos do not say which fields are
//! pointers, so zero numbers and `false` are kept (for a pointer such as `replicas: 0` the zero
//! is meaningful; for a value field it means what absence means), while empty strings and
//! bytes are dropped (nearly every such field is an `omitempty` value whose zero the apiserver
//! treats as unset; keeping `""` for an enum such as `restartPolicy` would fail validation) and
//! a zero `Time` (Go's `null`) is dropped. List elements and map values are always kept. No
//! defaulting happens here: that is the server's business, whatever the encoding.

use std::sync::OnceLock;

use base64::Engine;
use prost::Message;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, MapKey, MessageDescriptor, ReflectMessage,
};
use serde_json::{Map, Value};

/// The 4-byte prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

/// The descriptors of every message of Kubernetes 1.32 (k8s.io/api, apimachinery,
/// apiextensions-apiserver, kube-aggregator, metrics), compiled by `build.rs`.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/k8s-1.32.fds"));

/// How deep `RawExtension`s may nest protobuf objects inside each other.
const MAX_NESTING: usize = 8;

/// Fields that are Go structs embedded with `json:",inline"`: on the wire a sub-message, in
/// JSON its fields belong to the parent. (field name, message type's simple name).
pub const INLINE: &[(&str, &str)] = &[
    ("localObjectReference", "LocalObjectReference"),
    ("ephemeralContainerCommon", "EphemeralContainerCommon"),
    ("volumeSource", "VolumeSource"),
    ("persistentVolumeSource", "PersistentVolumeSource"),
    ("handler", "ProbeHandler"),
    ("ingressRuleValue", "IngressRuleValue"),
    ("deviceConfiguration", "DeviceConfiguration"),
    ("ruleWithOperations", "RuleWithOperations"),
    ("rule", "Rule"),
];

/// Proto field names that differ from the JSON name: go-to-protobuf froze the name it first
/// derived from the Go field. (package prefix, message, proto field name, JSON name).
pub const RENAMES: &[(&str, &str, &str, &str)] = &[
    (
        "api.admissionregistration.",
        "MutatingWebhookConfiguration",
        "Webhooks",
        "webhooks",
    ),
    (
        "api.admissionregistration.",
        "ValidatingWebhookConfiguration",
        "Webhooks",
        "webhooks",
    ),
    (
        "api.admissionregistration.",
        "Validation",
        "Expression",
        "expression",
    ),
    ("api.admissionregistration.", "Variable", "Name", "name"),
    (
        "api.admissionregistration.",
        "Variable",
        "Expression",
        "expression",
    ),
    ("api.authentication.", "BoundObjectReference", "uID", "uid"),
    (
        "api.networking.",
        "IngressClassParametersReference",
        "aPIGroup",
        "apiGroup",
    ),
];

/// The package of the apiextensions types, whose JSONSchemaProps names are special.
const APIEXTENSIONS: &str = "apiextensions_apiserver.pkg.apis.apiextensions.";

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

/// `runtime.Unknown`, the envelope of every protobuf body.
#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    content_encoding: Option<String>,
    #[prost(string, optional, tag = "4")]
    content_type: Option<String>,
}

/// Decodes a protobuf body into the JSON form of the object, or says why it cannot (naming the
/// kind and, for a bad value, the field path).
pub fn to_json(body: &[u8]) -> Result<Value, String> {
    decode(body, 0)
}

/// The protobuf message that carries `kind` of `api_version`, e.g. `api.apps.v1.Deployment`
/// for `apps/v1` `Deployment`. Kinds every group version registers (`DeleteOptions`,
/// `Status`, …) are found in meta/v1.
pub fn message_name(api_version: &str, kind: &str) -> Result<String, String> {
    message_for(api_version, kind).map(|m| m.full_name().to_owned())
}

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(DESCRIPTORS)
            .map_err(|e| format!("the built-in Kubernetes protobuf descriptors do not load: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn decode(body: &[u8], nesting: usize) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("a protobuf body must start with the k8s\\0 prefix")?;
    let unknown = Unknown::decode(rest).map_err(|e| format!("protobuf envelope: {e}"))?;
    if let Some(enc) = unknown
        .content_encoding
        .as_deref()
        .filter(|e| !e.is_empty())
    {
        return Err(format!(
            "protobuf envelope: contentEncoding {enc:?} is not supported"
        ));
    }
    let tm = unknown.type_meta.unwrap_or_default();
    let api_version = tm.api_version.unwrap_or_default();
    let kind = tm.kind.unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() {
        return Err(format!(
            "protobuf envelope: apiVersion {api_version:?} and kind {kind:?} must both be set"
        ));
    }
    let desc = message_for(&api_version, &kind)?;
    let raw = unknown.raw.unwrap_or_default();
    let msg = DynamicMessage::decode(desc, raw.as_slice())
        .map_err(|e| format!("protobuf {api_version} {kind}: {e}"))?;
    let mut obj = match message(&msg, nesting) {
        Ok(Some(Value::Object(o))) => o,
        Ok(_) => Map::new(),
        Err(e) => return Err(format!("protobuf {api_version} {kind}: {e}")),
    };
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(obj))
}

fn message_for(api_version: &str, kind: &str) -> Result<MessageDescriptor, String> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let pool = pool()?;
    let name = format!("{}.{version}.{kind}", proto_package(group));
    pool.get_message_by_name(&name)
        .or_else(|| pool.get_message_by_name(&format!("apimachinery.pkg.apis.meta.v1.{kind}")))
        .ok_or_else(|| {
            format!(
                "{api_version} {kind} is not a Kubernetes 1.32 kind with a protobuf encoding (no message {name}): send JSON"
            )
        })
}

/// The proto package (without version) of an API group.
fn proto_package(group: &str) -> String {
    match group {
        "" => "api.core".into(),
        "apiextensions.k8s.io" => "apiextensions_apiserver.pkg.apis.apiextensions".into(),
        "apiregistration.k8s.io" => "kube_aggregator.pkg.apis.apiregistration".into(),
        "internal.apiserver.k8s.io" => "api.apiserverinternal".into(),
        "metrics.k8s.io" => "metrics.pkg.apis.metrics".into(),
        "custom.metrics.k8s.io" => "metrics.pkg.apis.custom_metrics".into(),
        "external.metrics.k8s.io" => "metrics.pkg.apis.external_metrics".into(),
        "meta.k8s.io" => "apimachinery.pkg.apis.meta".into(),
        // apps, batch, policy, rbac.authorization.k8s.io, networking.k8s.io,
        // flowcontrol.apiserver.k8s.io, …: the group's first label.
        g => format!("api.{}", g.split('.').next().unwrap_or(g)),
    }
}

/// A conversion error: what failed, and where (the path is built on the way out).
struct Failure {
    path: Vec<String>,
    message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            path: Vec::new(),
            message: message.into(),
        }
    }

    fn at(mut self, segment: String) -> Self {
        self.path.push(segment);
        self
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut path = String::new();
        for seg in self.path.iter().rev() {
            if !path.is_empty() && !seg.starts_with('[') {
                path.push('.');
            }
            path.push_str(seg);
        }
        if path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{path}: {}", self.message)
        }
    }
}

/// The JSON of a message; `None` where Go's JSON would be `null` (a zero `Time`, an empty
/// `RawExtension`).
fn message(msg: &DynamicMessage, nesting: usize) -> Result<Option<Value>, Failure> {
    let desc = msg.descriptor();
    let full = desc.full_name();
    let simple = desc.name();
    match full {
        "apimachinery.pkg.util.intstr.IntOrString" => {
            return Ok(Some(if int_field(msg, "type") == 1 {
                Value::String(str_field(msg, "strVal"))
            } else {
                Value::from(int_field(msg, "intVal"))
            }));
        }
        "apimachinery.pkg.api.resource.Quantity"
        | "apimachinery.pkg.api.resource.QuantityValue" => {
            let s = str_field(msg, "string");
            return Ok(Some(Value::String(if s.is_empty() {
                "0".into()
            } else {
                s
            })));
        }
        "apimachinery.pkg.apis.meta.v1.Time" => {
            return time(int_field(msg, "seconds"), int_field(msg, "nanos"), false);
        }
        "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            return time(int_field(msg, "seconds"), int_field(msg, "nanos"), true);
        }
        "apimachinery.pkg.apis.meta.v1.Duration" => {
            return Ok(Some(Value::String(go_duration(int_field(msg, "duration")))));
        }
        "apimachinery.pkg.apis.meta.v1.FieldsV1" => return raw_json(msg, "Raw", nesting),
        "apimachinery.pkg.runtime.RawExtension" => return raw_json(msg, "raw", nesting),
        "apimachinery.pkg.apis.meta.v1.Verbs" => return list_field(msg, "items", nesting),
        _ => {}
    }
    if simple == "ExtraValue" {
        return list_field(msg, "items", nesting);
    }
    if full.starts_with(APIEXTENSIONS) {
        match simple {
            "JSON" => return raw_json(msg, "raw", nesting),
            "JSONSchemaPropsOrArray" | "JSONSchemaPropsOrBool" | "JSONSchemaPropsOrStringArray" => {
                return schema_or(msg, nesting);
            }
            _ => {}
        }
    }
    let mut out = Map::new();
    for (field, value) in msg.fields() {
        let name = field.name();
        let Some(v) = field_value(value, nesting).map_err(|e| e.at(json_name(&desc, name)))? else {
            continue;
        };
        if is_inline(&field) {
            if let Value::Object(inner) = v {
                out.extend(inner);
            }
            continue;
        }
        out.insert(json_name(&desc, name), v);
    }
    Ok(Some(Value::Object(out)))
}

fn is_inline(field: &FieldDescriptor) -> bool {
    field
        .kind()
        .as_message()
        .is_some_and(|m| !field.is_list() && INLINE.contains(&(field.name(), m.name())))
}

fn json_name(desc: &MessageDescriptor, name: &str) -> String {
    let package = desc.package_name();
    for (prefix, message, proto, json) in RENAMES {
        if desc.name() == *message && name == *proto && package.starts_with(prefix) {
            return (*json).to_owned();
        }
    }
    if desc.full_name().starts_with(APIEXTENSIONS) && desc.name() == "JSONSchemaProps" {
        match name {
            "ref" => return "$ref".into(),
            "schema" => return "$schema".into(),
            _ => {}
        }
        if let Some(rest) = name.strip_prefix("xKubernetes") {
            let mut out = String::from("x-kubernetes");
            for c in rest.chars() {
                if c.is_ascii_uppercase() {
                    out.push('-');
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            return out;
        }
    }
    name.to_owned()
}

/// The JSON of a set field; `None` drops it (empty strings and bytes, zero times).
fn field_value(value: &prost_reflect::Value, nesting: usize) -> Result<Option<Value>, Failure> {
    use prost_reflect::Value as P;
    match value {
        P::String(s) if s.is_empty() => Ok(None),
        P::Bytes(b) if b.is_empty() => Ok(None),
        P::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(
                    element(item, nesting)
                        .map_err(|e| e.at(format!("[{i}]")))?
                        .unwrap_or(Value::Null),
                );
            }
            Ok(Some(Value::Array(out)))
        }
        P::Map(entries) => {
            let mut out = Map::new();
            for (k, v) in entries {
                let key = map_key(k);
                let v = element(v, nesting)
                    .map_err(|e| e.at(format!("[{key:?}]")))?
                    .unwrap_or(Value::Null);
                out.insert(key, v);
            }
            Ok(Some(Value::Object(out)))
        }
        other => element(other, nesting),
    }
}

/// The JSON of a single value (a field's, a list element's or a map value), kept even when
/// empty.
fn element(value: &prost_reflect::Value, nesting: usize) -> Result<Option<Value>, Failure> {
    use prost_reflect::Value as P;
    Ok(Some(match value {
        P::Bool(b) => Value::Bool(*b),
        P::I32(n) => Value::from(*n),
        P::I64(n) => Value::from(*n),
        P::U32(n) => Value::from(*n),
        P::U64(n) => Value::from(*n),
        P::F32(n) => number(f64::from(*n))?,
        P::F64(n) => number(*n)?,
        P::String(s) => Value::String(s.clone()),
        P::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        P::EnumNumber(n) => Value::from(*n),
        P::Message(m) => return message(m, nesting),
        P::List(_) | P::Map(_) => {
            return Err(Failure::new(
                "a list or map nested directly in a list or map",
            ));
        }
    }))
}

fn number(n: f64) -> Result<Value, Failure> {
    serde_json::Number::from_f64(n)
        .map(Value::Number)
        .ok_or_else(|| Failure::new(format!("{n} has no JSON form")))
}

fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::String(s) => s.clone(),
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
    }
}

fn get<'a>(
    msg: &'a DynamicMessage,
    name: &str,
) -> Option<std::borrow::Cow<'a, prost_reflect::Value>> {
    msg.get_field_by_name(name)
}

fn int_field(msg: &DynamicMessage, name: &str) -> i64 {
    use prost_reflect::Value as P;
    match get(msg, name).as_deref() {
        Some(P::I32(n)) => i64::from(*n),
        Some(P::I64(n)) => *n,
        Some(P::U32(n)) => i64::from(*n),
        _ => 0,
    }
}

fn str_field(msg: &DynamicMessage, name: &str) -> String {
    match get(msg, name).as_deref() {
        Some(prost_reflect::Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

fn list_field(msg: &DynamicMessage, name: &str, nesting: usize) -> Result<Option<Value>, Failure> {
    match get(msg, name).as_deref() {
        Some(v @ prost_reflect::Value::List(_)) => field_value(v, nesting),
        _ => Ok(Some(Value::Array(Vec::new()))),
    }
}

/// `JSONSchemaPropsOr{Array,Bool,StringArray}` as their Go `MarshalJSON` writes them.
fn schema_or(msg: &DynamicMessage, nesting: usize) -> Result<Option<Value>, Failure> {
    let schema = || -> Result<Option<Value>, Failure> {
        match get(msg, "schema").as_deref() {
            Some(prost_reflect::Value::Message(m)) if msg.has_field_by_name("schema") => {
                message(m, nesting).map_err(|e| e.at("schema".into()))
            }
            _ => Ok(None),
        }
    };
    let list = |name: &str| -> Result<Option<Value>, Failure> {
        match get(msg, name).as_deref() {
            Some(v @ prost_reflect::Value::List(l)) if !l.is_empty() => {
                field_value(v, nesting).map_err(|e| e.at(name.into()))
            }
            _ => Ok(None),
        }
    };
    match msg.descriptor().name() {
        // a non-empty array wins, else the schema (or null)
        "JSONSchemaPropsOrArray" => Ok(list("jSONSchemas")?.or(schema()?)),
        "JSONSchemaPropsOrStringArray" => Ok(list("property")?.or(schema()?)),
        // the schema if set, else the boolean
        _ => Ok(Some(match schema()? {
            Some(s) => s,
            None => Value::Bool(matches!(
                get(msg, "allows").as_deref(),
                Some(prost_reflect::Value::Bool(true))
            )),
        })),
    }
}

/// Embedded JSON (or a nested protobuf object) in a bytes field.
fn raw_json(msg: &DynamicMessage, name: &str, nesting: usize) -> Result<Option<Value>, Failure> {
    let raw = match get(msg, name).as_deref() {
        Some(prost_reflect::Value::Bytes(b)) => b.clone(),
        _ => return Ok(None),
    };
    if raw.is_empty() {
        return Ok(None);
    }
    if raw.starts_with(MAGIC) {
        if nesting >= MAX_NESTING {
            return Err(Failure::new("protobuf objects nested too deeply"));
        }
        return decode(&raw, nesting + 1).map(Some).map_err(Failure::new);
    }
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| Failure::new(format!("{name} is neither JSON nor a protobuf object: {e}")))
}

/// Go's `metav1.Time` (RFC 3339, whole seconds) or `metav1.MicroTime` (six decimals), in UTC;
/// the zero time is Go's `null`.
fn time(seconds: i64, nanos: i64, micro: bool) -> Result<Option<Value>, Failure> {
    if seconds == 0 && nanos == 0 {
        return Ok(None);
    }
    let t = time::OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|e| Failure::new(format!("{seconds}s is not a time: {e}")))?;
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if micro {
        s.push_str(&format!(".{:06}", nanos.clamp(0, 999_999_999) / 1000));
    }
    s.push('Z');
    Ok(Some(Value::String(s)))
}

/// Go's `time.Duration.String()`: `0s`, `1.5ms`, `1h2m3.5s`, `-2m0s`.
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let sign = if ns < 0 { "-" } else { "" };
    let u = ns.unsigned_abs();
    // fraction of `u` in units of 10^digits, with trailing zeros trimmed
    let frac = |v: u64, digits: u32| -> String {
        let unit = 10u64.pow(digits);
        let (whole, rest) = (v / unit, v % unit);
        if rest == 0 {
            return whole.to_string();
        }
        let f = format!("{rest:0width$}", width = digits as usize);
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    if u < 1_000 {
        return format!("{sign}{u}ns");
    }
    if u < 1_000_000 {
        return format!("{sign}{}µs", frac(u, 3));
    }
    if u < 1_000_000_000 {
        return format!("{sign}{}ms", frac(u, 6));
    }
    let hours = u / 3_600_000_000_000;
    let minutes = (u / 60_000_000_000) % 60;
    let secs = frac(u % 60_000_000_000, 9);
    if hours > 0 {
        format!("{sign}{hours}h{minutes}m{secs}s")
    } else if minutes > 0 {
        format!("{sign}{minutes}m{secs}s")
    } else {
        format!("{sign}{secs}s")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    /// Encodes message `name` with the given fields (proto names).
    fn encode(name: &str, fields: &[(&str, prost_reflect::Value)]) -> Vec<u8> {
        let desc = pool().unwrap().get_message_by_name(name).unwrap();
        let mut m = DynamicMessage::new(desc);
        for (f, v) in fields {
            m.set_field_by_name(f, v.clone());
        }
        m.encode_to_vec()
    }

    fn msg(name: &str, fields: &[(&str, prost_reflect::Value)]) -> prost_reflect::Value {
        let desc = pool().unwrap().get_message_by_name(name).unwrap();
        let mut m = DynamicMessage::new(desc);
        for (f, v) in fields {
            m.set_field_by_name(f, v.clone());
        }
        prost_reflect::Value::Message(m)
    }

    /// Asserts `actual` is what Go's JSON encoding `expected` (kubectl's `--dry-run=client -o
    /// json` of the same command) means, under this module's presence rules: every non-null,
    /// non-empty-string value of `expected` is in `actual`, equal; `null`s and `""`s are absent;
    /// whatever else `actual` has is a Go zero value (0, false, or an object of such).
    fn assert_go_equivalent(expected: &Value, actual: &Value, path: &str) {
        fn zero(v: &Value) -> bool {
            match v {
                Value::Bool(b) => !b,
                Value::Number(n) => n.as_f64() == Some(0.0),
                Value::Object(o) => o.values().all(zero),
                _ => false,
            }
        }
        match (expected, actual) {
            (Value::Object(e), Value::Object(a)) => {
                for (k, ev) in e {
                    let p = format!("{path}.{k}");
                    match ev {
                        Value::Null => assert!(
                            a.get(k).is_none(),
                            "{p}: expected absent, got {:?}",
                            a.get(k)
                        ),
                        Value::String(s) if s.is_empty() => {
                            assert!(
                                a.get(k).is_none(),
                                "{p}: expected absent (\"\"), got {:?}",
                                a.get(k)
                            )
                        }
                        _ => {
                            let av = a
                                .get(k)
                                .unwrap_or_else(|| panic!("{p}: missing, expected {ev}"));
                            assert_go_equivalent(ev, av, &p);
                        }
                    }
                }
                for (k, av) in a {
                    if !e.contains_key(k) {
                        assert!(zero(av), "{path}.{k}: unexpected {av}");
                    }
                }
            }
            (Value::Array(e), Value::Array(a)) => {
                assert_eq!(e.len(), a.len(), "{path}: {expected} vs {actual}");
                for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                    assert_go_equivalent(ev, av, &format!("{path}[{i}]"));
                }
            }
            _ => assert_eq!(expected, actual, "{path}"),
        }
    }

    /// Bodies kubectl 1.32 sent for typed `create` commands, beside kubectl's own JSON of the
    /// same objects (`--dry-run=client -o json`); see tests/data/protobuf/README.md.
    const FIXTURES: &[&str] = &[
        "namespace",
        "service",
        "service-nodeport",
        "deployment",
        "deployment-zero",
        "serviceaccount",
        "role",
        "rolebinding",
        "clusterrole",
        "clusterrolebinding",
        "job",
        "cronjob",
        "pdb",
        "pdb-percent",
        "secret-generic",
        "secret-docker",
        "configmap",
        "priorityclass",
        "quota",
        "ingress",
        "token",
    ];

    fn fixture(name: &str) -> (Vec<u8>, Value) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/protobuf");
        let pb = std::fs::read(dir.join(format!("{name}.pb"))).unwrap();
        let json =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap())
                .unwrap();
        (pb, json)
    }

    #[test]
    fn kubectl_bodies_decode_to_kubectls_json() {
        for name in FIXTURES {
            let (pb, expected) = fixture(name);
            let actual = to_json(&pb).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_go_equivalent(&expected, &actual, name);
        }
    }

    #[test]
    fn kubectl_bodies_keep_their_types() {
        let (pb, _) = fixture("service");
        let v = to_json(&pb).unwrap();
        assert_eq!(v["spec"]["ports"][0]["targetPort"], json!(8080));
        assert_eq!(v["spec"]["ports"][1]["targetPort"], json!("https"));
        assert_eq!(v["spec"]["type"], "ClusterIP");
        let v = to_json(&fixture("deployment-zero").0).unwrap();
        assert_eq!(v["spec"]["replicas"], json!(0), "a pointer's zero is kept");
        assert!(
            v["spec"]["template"]["metadata"]
                .get("creationTimestamp")
                .is_none()
        );
        let v = to_json(&fixture("pdb-percent").0).unwrap();
        assert_eq!(v["spec"]["maxUnavailable"], "50%");
        let v = to_json(&fixture("quota").0).unwrap();
        assert_eq!(v["spec"]["hard"]["requests.cpu"], "500m");
        let v = to_json(&fixture("secret-generic").0).unwrap();
        let bin = base64::engine::general_purpose::STANDARD
            .decode(v["data"]["bin"].as_str().unwrap())
            .unwrap();
        assert_eq!(bin, (0..=255u8).collect::<Vec<_>>());
        let v = to_json(&fixture("configmap").0).unwrap();
        assert_eq!(v["data"]["x"], "y");
        assert!(v["binaryData"]["bin"].is_string());
        let v = to_json(&fixture("ingress").0).unwrap();
        assert_eq!(
            v["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["number"], 80,
            "IngressRuleValue is inlined into the rule"
        );
    }

    #[test]
    fn well_known_types() {
        use prost_reflect::Value as P;
        let time = msg(
            "apimachinery.pkg.apis.meta.v1.Time",
            &[("seconds", P::I64(1_700_000_000)), ("nanos", P::I32(5))],
        );
        let micro = msg(
            "apimachinery.pkg.apis.meta.v1.MicroTime",
            &[
                ("seconds", P::I64(1_700_000_000)),
                ("nanos", P::I32(123_456_789)),
            ],
        );
        let managed = msg(
            "apimachinery.pkg.apis.meta.v1.ManagedFieldsEntry",
            &[
                ("manager", P::String("kubectl".into())),
                (
                    "fieldsV1",
                    msg(
                        "apimachinery.pkg.apis.meta.v1.FieldsV1",
                        &[("Raw", P::Bytes(br#"{"f:data":{}}"#.to_vec().into()))],
                    ),
                ),
                ("time", time.clone()),
            ],
        );
        let meta = msg(
            "apimachinery.pkg.apis.meta.v1.ObjectMeta",
            &[
                ("name", P::String("l".into())),
                ("namespace", P::String(String::new())),
                ("creationTimestamp", time),
                ("managedFields", P::List(vec![managed])),
            ],
        );
        let raw = encode(
            "api.coordination.v1.Lease",
            &[
                ("metadata", meta),
                (
                    "spec",
                    msg(
                        "api.coordination.v1.LeaseSpec",
                        &[("renewTime", micro), ("leaseDurationSeconds", P::I32(0))],
                    ),
                ),
            ],
        );
        let v = to_json(&envelope("coordination.k8s.io/v1", "Lease", raw)).unwrap();
        assert_eq!(
            v,
            json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": "l",
                    "creationTimestamp": "2023-11-14T22:13:20Z",
                    "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:data": {}}, "time": "2023-11-14T22:13:20Z"}],
                },
                "spec": {"renewTime": "2023-11-14T22:13:20.123456Z", "leaseDurationSeconds": 0},
            })
        );
    }

    #[test]
    fn durations_print_as_go_does() {
        for (ns, s) in [
            (0, "0s"),
            (1, "1ns"),
            (1_500, "1.5µs"),
            (1_500_000, "1.5ms"),
            (1_000_000_000, "1s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (3_723_500_000_000, "1h2m3.5s"),
            (-120_000_000_000, "-2m0s"),
        ] {
            assert_eq!(go_duration(ns), s);
        }
    }

    #[test]
    fn embedded_objects_and_schema_names() {
        use prost_reflect::Value as P;
        // A RawExtension holding a nested protobuf object and one holding JSON.
        let inner = envelope(
            "v1",
            "ConfigMap",
            encode(
                "api.core.v1.ConfigMap",
                &[(
                    "metadata",
                    msg(
                        "apimachinery.pkg.apis.meta.v1.ObjectMeta",
                        &[("name", P::String("c".into()))],
                    ),
                )],
            ),
        );
        let raw = encode(
            "apimachinery.pkg.apis.meta.v1.List",
            &[(
                "items",
                P::List(vec![
                    msg(
                        "apimachinery.pkg.runtime.RawExtension",
                        &[("raw", P::Bytes(inner.into()))],
                    ),
                    msg(
                        "apimachinery.pkg.runtime.RawExtension",
                        &[("raw", P::Bytes(br#"{"kind":"Pod"}"#.to_vec().into()))],
                    ),
                ]),
            )],
        );
        let v = to_json(&envelope("v1", "List", raw)).unwrap();
        assert_eq!(
            v["items"],
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}, {"kind": "Pod"}])
        );

        // JSONSchemaProps: $ref, x-kubernetes-*, JSON defaults, OrBool/OrArray.
        let props = "apiextensions_apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps";
        let schema = msg(
            props,
            &[
                ("type", P::String("object".into())),
                ("xKubernetesPreserveUnknownFields", P::Bool(true)),
                ("ref", P::String("#/x".into())),
                (
                    "default",
                    msg(
                        "apiextensions_apiserver.pkg.apis.apiextensions.v1.JSON",
                        &[("raw", P::Bytes(b"{\"a\":1}".to_vec().into()))],
                    ),
                ),
                (
                    "additionalProperties",
                    msg(
                        "apiextensions_apiserver.pkg.apis.apiextensions.v1.JSONSchemaPropsOrBool",
                        &[("allows", P::Bool(false))],
                    ),
                ),
                (
                    "items",
                    msg(
                        "apiextensions_apiserver.pkg.apis.apiextensions.v1.JSONSchemaPropsOrArray",
                        &[(
                            "schema",
                            msg(props, &[("type", P::String("string".into()))]),
                        )],
                    ),
                ),
            ],
        );
        let v = match message(
            &match schema {
                P::Message(m) => m,
                _ => unreachable!(),
            },
            0,
        ) {
            Ok(Some(v)) => v,
            _ => panic!("schema"),
        };
        assert_eq!(
            v,
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true, "$ref": "#/x",
                   "default": {"a": 1}, "additionalProperties": false, "items": {"type": "string"}})
        );
    }

    #[test]
    fn finds_every_group() {
        for (av, kind, name) in [
            ("v1", "Service", "api.core.v1.Service"),
            ("apps/v1", "Deployment", "api.apps.v1.Deployment"),
            ("rbac.authorization.k8s.io/v1", "Role", "api.rbac.v1.Role"),
            (
                "networking.k8s.io/v1",
                "Ingress",
                "api.networking.v1.Ingress",
            ),
            (
                "scheduling.k8s.io/v1",
                "PriorityClass",
                "api.scheduling.v1.PriorityClass",
            ),
            (
                "flowcontrol.apiserver.k8s.io/v1",
                "FlowSchema",
                "api.flowcontrol.v1.FlowSchema",
            ),
            (
                "internal.apiserver.k8s.io/v1alpha1",
                "StorageVersion",
                "api.apiserverinternal.v1alpha1.StorageVersion",
            ),
            (
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "apiextensions_apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
            ),
            (
                "apiregistration.k8s.io/v1",
                "APIService",
                "kube_aggregator.pkg.apis.apiregistration.v1.APIService",
            ),
            (
                "metrics.k8s.io/v1beta1",
                "PodMetrics",
                "metrics.pkg.apis.metrics.v1beta1.PodMetrics",
            ),
            (
                "apps/v1",
                "DeleteOptions",
                "apimachinery.pkg.apis.meta.v1.DeleteOptions",
            ),
            (
                "authentication.k8s.io/v1",
                "TokenRequest",
                "api.authentication.v1.TokenRequest",
            ),
        ] {
            assert_eq!(message_name(av, kind).unwrap(), name);
        }
    }

    /// Checks the naming rules against the official 1.32 schemas where `scripts/setup.sh` put
    /// them (kubernetes-validate in the checkout's .venv): every JSON name the decoder gives a
    /// field of a message that has a schema definition is a property of that definition.
    #[test]
    fn json_names_match_the_openapi_schemas() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/lib");
        let Some(defs) = std::fs::read_dir(&root).ok().and_then(|dirs| {
            dirs.flatten().find_map(|d| {
                let p = d.path().join(
                    "site-packages/kubernetes_validate/kubernetes-json-schema/v1.32.0-local/_definitions.json",
                );
                std::fs::read(p).ok()
            })
        }) else {
            eprintln!("skipped: no kubernetes-validate schemas under {}", root.display());
            return;
        };
        let defs: Value = serde_json::from_slice(&defs).unwrap();
        let defs = &defs["$defs"];
        let special = [
            "IntOrString",
            "Quantity",
            "QuantityValue",
            "Time",
            "MicroTime",
            "Duration",
            "FieldsV1",
            "RawExtension",
            "Verbs",
            "ExtraValue",
            "JSON",
            "JSONSchemaPropsOrArray",
            "JSONSchemaPropsOrBool",
            "JSONSchemaPropsOrStringArray",
        ];
        let mut checked = 0;
        let mut wrong = Vec::new();
        for m in pool().unwrap().all_messages() {
            if special.contains(&m.name()) {
                continue;
            }
            let def = format!(
                "io.k8s.{}",
                m.full_name()
                    .replacen("apiextensions_apiserver", "apiextensions-apiserver", 1)
                    .replacen("kube_aggregator", "kube-aggregator", 1)
            );
            let Some(props) = defs[&def]["properties"].as_object() else {
                continue;
            };
            for f in m.fields() {
                checked += 1;
                if is_inline(&f) {
                    // not a property itself; its fields are the parent's
                    if props.contains_key(f.name()) {
                        wrong.push(format!(
                            "{}.{} is a property, not inline",
                            m.full_name(),
                            f.name()
                        ));
                    }
                    if let Some(inner) = f.kind().as_message() {
                        for g in inner.fields() {
                            let name = json_name(inner, g.name());
                            if !props.contains_key(&name) && !is_inline(&g) {
                                wrong.push(format!(
                                    "{}.{}.{} → {name}",
                                    m.full_name(),
                                    f.name(),
                                    g.name()
                                ));
                            }
                        }
                    }
                    continue;
                }
                let name = json_name(&m, f.name());
                if !props.contains_key(&name) {
                    wrong.push(format!("{}.{} → {name}", m.full_name(), f.name()));
                }
            }
        }
        assert!(checked > 2000, "only {checked} fields checked");
        assert!(
            wrong.is_empty(),
            "JSON names not in the 1.32 schemas: {wrong:#?}"
        );
    }

    #[test]
    fn rejects_what_it_cannot_decode() {
        assert!(to_json(b"{}").unwrap_err().contains("prefix"));
        assert!(
            to_json(b"k8s\0\xff\xff\xff")
                .unwrap_err()
                .contains("envelope")
        );
        let e = to_json(&envelope("v1", "Nope", vec![])).unwrap_err();
        assert!(e.contains("v1 Nope") && e.contains("send JSON"), "{e}");
        let e = to_json(&envelope("", "", vec![])).unwrap_err();
        assert!(e.contains("must both be set"), "{e}");
        // A field whose wire type does not match its descriptor.
        let e = to_json(&envelope("v1", "Service", vec![0x0a, 0x02, 0x08, 0x01])).unwrap_err();
        assert!(e.contains("protobuf v1 Service"), "{e}");
        // Embedded bytes that are neither JSON nor protobuf name their path.
        use prost_reflect::Value as P;
        let raw = encode(
            "apimachinery.pkg.apis.meta.v1.List",
            &[(
                "items",
                P::List(vec![msg(
                    "apimachinery.pkg.runtime.RawExtension",
                    &[("raw", P::Bytes(b"\x01nope".to_vec().into()))],
                )]),
            )],
        );
        let e = to_json(&envelope("v1", "List", raw)).unwrap_err();
        assert!(e.contains("items[0]: raw is neither JSON"), "{e}");
    }
}
