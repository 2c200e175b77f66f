//! The three patch flavours kubectl and kube-rs send: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902) and strategic merge patch.
//!
//! Strategic merge patch is implemented for what clients send for the built-in types here: maps
//! merge recursively, `null` deletes, lists of objects with a known merge key (containers and
//! volumes by `name`, Service ports by `port`, container ports by `containerPort`, conditions by
//! `type`, ...) merge element-wise, other lists are replaced, and the directives `$patch`
//! (`replace`, `delete`), `$retainKeys`, `$deleteFromPrimitiveList/<field>` and
//! `$setElementOrder/<field>` are honoured (the last one by ignoring order). Server-side apply
//! is not supported (415).

use serde_json::{Map, Value};

/// A patch that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The patch body is not valid JSON of the right shape.
    #[error("invalid patch: {0}")]
    Invalid(String),
    /// A JSON patch operation failed (e.g. `test` mismatch, missing path).
    #[error("json patch failed: {0}")]
    Failed(String),
    /// A content type we do not implement.
    #[error("unsupported patch type {0:?}")]
    Unsupported(String),
}

/// Applies `patch` of `content_type` to `target`.
pub fn apply(target: &mut Value, content_type: &str, patch: &[u8]) -> Result<(), Error> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    match ct {
        "application/merge-patch+json" => {
            let p: Value =
                serde_json::from_slice(patch).map_err(|e| Error::Invalid(e.to_string()))?;
            json_patch::merge(target, &p);
            Ok(())
        }
        "application/json-patch+json" => {
            let p: json_patch::Patch =
                serde_json::from_slice(patch).map_err(|e| Error::Invalid(e.to_string()))?;
            json_patch::patch(target, &p).map_err(|e| Error::Failed(e.to_string()))
        }
        "application/strategic-merge-patch+json" => {
            let p: Value =
                serde_json::from_slice(patch).map_err(|e| Error::Invalid(e.to_string()))?;
            if !p.is_object() {
                return Err(Error::Invalid(
                    "a strategic merge patch must be an object".into(),
                ));
            }
            strategic(target, &p, "");
            Ok(())
        }
        other => Err(Error::Unsupported(other.to_owned())),
    }
}

/// The merge key of the list at `path` (`/spec/template/spec/containers`), if it has one.
fn merge_key(path: &str) -> Option<&'static str> {
    let field = path.rsplit('/').next()?;
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "ports" if path.ends_with("/spec/ports") && !path.contains("containers") => "port",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// A copy of `v` with every directive key removed.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

fn strategic(target: &mut Value, patch: &Value, path: &str) {
    let Some(pm) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    match pm.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip(patch);
            return;
        }
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(tm) = target.as_object_mut() else {
        return;
    };
    for (k, v) in pm {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (tm.get_mut(field), v.as_array()) {
                list.retain(|x| !remove.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let child = format!("{path}/{k}");
        match v {
            Value::Null => {
                tm.remove(k);
            }
            Value::Object(_) => {
                let slot = tm.entry(k.clone()).or_insert(Value::Null);
                strategic(slot, v, &child);
                if slot.is_null() {
                    tm.remove(k);
                }
            }
            Value::Array(items) => match (merge_key(&child), tm.get_mut(k)) {
                (Some(key), Some(Value::Array(existing))) => {
                    merge_list(existing, items, key, &child)
                }
                _ => {
                    tm.insert(k.clone(), strip(v));
                }
            },
            other => {
                tm.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(Value::Array(retain)) = pm.get("$retainKeys") {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        tm.retain(|k, _| keep.contains(&k.as_str()));
    }
}

fn merge_list(existing: &mut Vec<Value>, items: &[Value], key: &str, path: &str) {
    for item in items {
        let Some(id) = item.get(key) else {
            existing.push(strip(item));
            continue;
        };
        let pos = existing.iter().position(|e| e.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic(&mut existing[i], item, path),
            (None, false) => existing.push(strip(item)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(mut target: Value, patch: Value) -> Value {
        apply(
            &mut target,
            "application/strategic-merge-patch+json",
            patch.to_string().as_bytes(),
        )
        .unwrap();
        target
    }

    #[test]
    fn merge_patch_sets_and_deletes_annotations() {
        let mut o = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        apply(
            &mut o,
            "application/merge-patch+json",
            br#"{"metadata":{"annotations":{"a":null,"c":"3"}}}"#,
        )
        .unwrap();
        assert_eq!(
            o,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}})
        );
    }

    #[test]
    fn json_patch_applies_and_reports_failures() {
        let mut o = json!({"spec": {"replicas": 1}});
        apply(
            &mut o,
            "application/json-patch+json",
            br#"[{"op":"replace","path":"/spec/replicas","value":3}]"#,
        )
        .unwrap();
        assert_eq!(o["spec"]["replicas"], 3);
        let e = apply(
            &mut o,
            "application/json-patch+json",
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        );
        assert!(e.is_err());
    }

    #[test]
    fn strategic_merge_merges_lists_by_key_and_honours_directives() {
        let svc = json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53}], "selector": {"app": "a", "old": "x"}}});
        let out = smp(
            svc,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 53, "$patch": "delete"}], "selector": {"$patch": "replace", "app": "b"}}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"name": "http", "port": 80, "targetPort": 8080}])
        );
        assert_eq!(out["spec"]["selector"], json!({"app": "b"}));

        let pod = json!({"spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}]}, "metadata": {"finalizers": ["f1", "f2"]}});
        let out = smp(
            pod,
            json!({"spec": {"containers": [{"name": "b", "image": "y:2"}], "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}]}, "metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}),
        );
        assert_eq!(out["spec"]["containers"][1]["image"], "y:2");
        assert_eq!(out["spec"]["containers"][0]["image"], "x:1");
        assert_eq!(out["metadata"]["finalizers"], json!(["f2"]));

        let out = smp(
            json!({"a": {"x": 1, "y": 2}}),
            json!({"a": {"$retainKeys": ["x"], "x": 5}}),
        );
        assert_eq!(out, json!({"a": {"x": 5}}));
        assert!(apply(&mut json!({}), "application/apply-patch+yaml", b"{}").is_err());
    }
}
