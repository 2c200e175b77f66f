//! Just enough of the Kubernetes protobuf encoding for what kubectl sends as protobuf: its
//! typed `create namespace|configmap|secret` commands. Everything else kubectl and kube-rs send
//! is JSON. Field numbers follow `k8s.io/api` `generated.proto`.

use std::collections::BTreeMap;

use base64::Engine;
use prost::Message;
use serde_json::{Map, Value, json};

/// The 4-byte prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    generate_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    namespace: Option<String>,
    #[prost(btree_map = "string, string", tag = "11")]
    labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    annotations: BTreeMap<String, String>,
    #[prost(string, repeated, tag = "14")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct NamespaceSpec {
    #[prost(string, repeated, tag = "1")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Namespace {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<NamespaceSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct ConfigMap {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct Secret {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    r#type: Option<String>,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
    #[prost(bool, optional, tag = "5")]
    immutable: Option<bool>,
}

fn meta(m: Option<ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    if let Some(v) = m.name {
        put("name", json!(v));
    }
    if let Some(v) = m.generate_name {
        put("generateName", json!(v));
    }
    if let Some(v) = m.namespace {
        put("namespace", json!(v));
    }
    if !m.labels.is_empty() {
        put("labels", json!(m.labels));
    }
    if !m.annotations.is_empty() {
        put("annotations", json!(m.annotations));
    }
    if !m.finalizers.is_empty() {
        put("finalizers", json!(m.finalizers));
    }
    Value::Object(out)
}

fn b64(m: BTreeMap<String, Vec<u8>>) -> Value {
    let e = base64::engine::general_purpose::STANDARD;
    Value::Object(
        m.into_iter()
            .map(|(k, v)| (k, json!(e.encode(v))))
            .collect(),
    )
}

/// Decodes a protobuf body into the JSON form of the object, or says why it cannot.
pub fn to_json(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("a protobuf body must start with the k8s\\0 prefix")?;
    let unknown = Unknown::decode(rest).map_err(|e| format!("protobuf envelope: {e}"))?;
    let tm = unknown.type_meta.unwrap_or_default();
    let api_version = tm.api_version.unwrap_or_default();
    let kind = tm.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let bad = |e: prost::DecodeError| format!("protobuf {kind}: {e}");
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let n = Namespace::decode(raw.as_slice()).map_err(bad)?;
            let mut v = json!({"metadata": meta(n.metadata)});
            if let Some(spec) = n.spec.filter(|s| !s.finalizers.is_empty()) {
                v["spec"] = json!({"finalizers": spec.finalizers});
            }
            v
        }
        ("v1", "ConfigMap") => {
            let c = ConfigMap::decode(raw.as_slice()).map_err(bad)?;
            let mut v = json!({"metadata": meta(c.metadata)});
            if !c.data.is_empty() {
                v["data"] = json!(c.data);
            }
            if !c.binary_data.is_empty() {
                v["binaryData"] = b64(c.binary_data);
            }
            if let Some(i) = c.immutable {
                v["immutable"] = json!(i);
            }
            v
        }
        ("v1", "Secret") => {
            let s = Secret::decode(raw.as_slice()).map_err(bad)?;
            let mut v = json!({"metadata": meta(s.metadata), "type": s.r#type.unwrap_or_else(|| "Opaque".into())});
            let mut data = s.data;
            // stringData is write-only: it is merged into data, as the real server does.
            for (k, val) in s.string_data {
                data.insert(k, val.into_bytes());
            }
            if !data.is_empty() {
                v["data"] = b64(data);
            }
            if let Some(i) = s.immutable {
                v["immutable"] = json!(i);
            }
            v
        }
        _ => {
            return Err(format!(
                "protobuf bodies are supported for v1 Namespace, ConfigMap and Secret only, not {api_version} {kind}: send JSON"
            ));
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn envelope(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    #[test]
    fn decodes_configmap_and_secret() {
        let cm = ConfigMap {
            metadata: Some(ObjectMeta {
                name: Some("c".into()),
                labels: [("a".to_owned(), "b".to_owned())].into(),
                ..Default::default()
            }),
            data: [("k".to_owned(), "v".to_owned())].into(),
            ..Default::default()
        };
        let v = to_json(&envelope("ConfigMap", cm.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"a": "b"}}, "data": {"k": "v"}})
        );
        let s = Secret {
            metadata: Some(ObjectMeta {
                name: Some("s".into()),
                ..Default::default()
            }),
            string_data: [("p".to_owned(), "hi".to_owned())].into(),
            ..Default::default()
        };
        let v = to_json(&envelope("Secret", s.encode_to_vec())).unwrap();
        assert_eq!(v["data"]["p"], "aGk=");
        assert_eq!(v["type"], "Opaque");
    }

    #[test]
    fn rejects_garbage_and_unknown_kinds() {
        assert!(to_json(b"{}").unwrap_err().contains("prefix"));
        assert!(to_json(b"k8s\0\xff\xff\xff").is_err());
        assert!(
            to_json(&envelope("Pod", vec![]))
                .unwrap_err()
                .contains("send JSON")
        );
    }
}
