//! The three patch flavours kubectl and kube-rs send: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902) and strategic merge patch.
//!
//! Strategic merge patch follows the kind's official schema ([`crate::schema::PatchMeta`]):
//! maps merge recursively and `null` deletes; a list merges only where the schema says
//! `x-kubernetes-patch-strategy: merge` (lists of objects element-wise by their
//! `x-kubernetes-patch-merge-key`, lists of scalars as sets); every other list is replaced, as
//! in the apiserver. The directives `$patch` (`replace`, `delete`, also as a list element),
//! `$retainKeys`, `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>` are
//! honoured. Kinds without a schema (custom resources) refuse strategic merge patch with `415`,
//! as the apiserver does. Server-side apply is not supported (415).

use serde_json::{Map, Value};

use crate::schema::PatchMeta;

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
    /// A strategic merge patch for a kind without a schema (a custom resource).
    #[error(
        "the body of the request was in an unknown format - accepted media types include: \
         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
    )]
    NoStrategicMerge,
}

/// Applies `patch` of `content_type` to `target`. `meta` is the kind's strategic-merge-patch
/// metadata ([`crate::schema::Schemas::patch_meta`]); without it (a custom resource) a
/// strategic merge patch is refused with [`Error::NoStrategicMerge`].
pub fn apply(
    target: &mut Value,
    content_type: &str,
    patch: &[u8],
    meta: Option<&PatchMeta<'_>>,
) -> Result<(), Error> {
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
            let Some(meta) = meta else {
                return Err(Error::NoStrategicMerge);
            };
            if !p.is_object() {
                return Err(Error::Invalid(
                    "a strategic merge patch must be an object".into(),
                ));
            }
            strategic(target, &p, Some(*meta));
            Ok(())
        }
        other => Err(Error::Unsupported(other.to_owned())),
    }
}

/// The directive keys of a strategic merge patch.
fn is_directive(key: &str) -> bool {
    matches!(key, "$patch" | "$retainKeys")
        || key.starts_with("$setElementOrder/")
        || key.starts_with("$deleteFromPrimitiveList/")
}

/// A copy of `v` with every directive removed.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !is_directive(k))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|x| directive(x).is_none())
                .map(strip)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The `$patch` directive of a map.
fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

fn strategic(target: &mut Value, patch: &Value, meta: Option<PatchMeta<'_>>) {
    let Some(pm) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    match directive(patch) {
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
        if is_directive(k) {
            continue;
        }
        let child = meta.and_then(|m| m.field(k));
        match v {
            Value::Null => {
                tm.remove(k);
            }
            Value::Object(_) => {
                let slot = tm.entry(k.clone()).or_insert(Value::Null);
                strategic(slot, v, child);
                if slot.is_null() {
                    tm.remove(k);
                }
            }
            Value::Array(items) => match child.filter(PatchMeta::merges) {
                Some(list_meta) => {
                    let slot = tm.entry(k.clone()).or_insert(Value::Null);
                    merge_list(slot, items, list_meta);
                }
                None => {
                    tm.insert(k.clone(), strip(v));
                }
            },
            other => {
                tm.insert(k.clone(), other.clone());
            }
        }
    }
    for (k, order) in pm {
        if let (Some(field), Some(order)) = (k.strip_prefix("$setElementOrder/"), order.as_array())
        {
            let key = meta
                .and_then(|m| m.field(field))
                .and_then(|m| m.merge_key());
            if let Some(Value::Array(list)) = tm.get_mut(field) {
                set_element_order(list, order, key);
            }
        }
    }
    if let Some(Value::Array(retain)) = pm.get("$retainKeys") {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        tm.retain(|k, _| keep.contains(&k.as_str()));
    }
}

/// Merges patch `items` into the list at `slot` whose strategy is `merge`.
fn merge_list(slot: &mut Value, items: &[Value], meta: PatchMeta<'_>) {
    if items.iter().any(|i| directive(i) == Some("replace")) {
        *slot = strip(&Value::Array(items.to_vec()));
        return;
    }
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    let Some(existing) = slot.as_array_mut() else {
        return;
    };
    let Some(key) = meta.merge_key() else {
        // A list of scalars merges as a set.
        for item in items {
            if !existing.contains(item) {
                existing.push(item.clone());
            }
        }
        return;
    };
    for item in items {
        let Some(id) = item.get(key) else {
            existing.push(strip(item));
            continue;
        };
        let pos = existing.iter().position(|e| e.get(key) == Some(id));
        match (pos, directive(item) == Some("delete")) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic(&mut existing[i], item, Some(meta)),
            (None, false) => existing.push(strip(item)),
        }
    }
}

/// Orders `list` as `$setElementOrder` says: the listed elements take the positions that
/// listed elements hold, in the given order; the others (server-only) keep theirs.
fn set_element_order(list: &mut [Value], order: &[Value], key: Option<&str>) {
    let id = |v: &Value| match key {
        Some(k) => v.get(k).cloned(),
        None => Some(v.clone()),
    };
    let rank = |v: &Value| {
        let this = id(v)?;
        order.iter().position(|o| id(o).as_ref() == Some(&this))
    };
    let slots: Vec<usize> = (0..list.len())
        .filter(|&i| rank(&list[i]).is_some())
        .collect();
    let mut listed: Vec<Value> = slots.iter().map(|&i| list[i].clone()).collect();
    listed.sort_by_key(|v| rank(v).unwrap_or(usize::MAX));
    for (slot, v) in slots.into_iter().zip(listed) {
        list[slot] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schemas;
    use serde_json::json;

    const SMP: &str = "application/strategic-merge-patch+json";

    /// Applies a strategic merge patch to an object of `group/version` `kind`, with the
    /// metadata of the official schema.
    fn smp(gvk: (&str, &str, &str), mut target: Value, patch: Value) -> Value {
        let schemas = Schemas::shared().unwrap();
        let meta = schemas.patch_meta(gvk.0, gvk.1, gvk.2).unwrap();
        apply(&mut target, SMP, patch.to_string().as_bytes(), Some(&meta)).unwrap();
        target
    }

    const POD: (&str, &str, &str) = ("", "v1", "Pod");
    const DEPLOYMENT: (&str, &str, &str) = ("apps", "v1", "Deployment");

    #[test]
    fn merge_patch_sets_and_deletes_annotations() {
        let mut o = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        apply(
            &mut o,
            "application/merge-patch+json",
            br#"{"metadata":{"annotations":{"a":null,"c":"3"}}}"#,
            None,
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
            None,
        )
        .unwrap();
        assert_eq!(o["spec"]["replicas"], 3);
        let e = apply(
            &mut o,
            "application/json-patch+json",
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
            None,
        );
        assert!(matches!(e, Err(Error::Failed(_))));
        assert!(matches!(
            apply(&mut json!({}), "application/apply-patch+yaml", b"{}", None),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn service_ports_merge_by_port_and_directives_apply() {
        let svc = json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53}], "selector": {"app": "a", "old": "x"}}});
        let out = smp(
            ("", "v1", "Service"),
            svc,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 53, "$patch": "delete"}], "selector": {"$patch": "replace", "app": "b"}}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([{"name": "http", "port": 80, "targetPort": 8080}])
        );
        assert_eq!(out["spec"]["selector"], json!({"app": "b"}));
    }

    #[test]
    fn pod_containers_merge_by_name_and_finalizers_as_a_set() {
        let pod = json!({"spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}]}, "metadata": {"finalizers": ["f1", "f2"]}});
        let out = smp(
            POD,
            pod.clone(),
            json!({"spec": {"containers": [{"name": "b", "image": "y:2"}], "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}]}, "metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}),
        );
        assert_eq!(out["spec"]["containers"][1]["image"], "y:2");
        assert_eq!(out["spec"]["containers"][0]["image"], "x:1");
        assert_eq!(out["metadata"]["finalizers"], json!(["f2"]));

        // finalizers have strategy merge and no key: a set union.
        let out = smp(
            POD,
            pod.clone(),
            json!({"metadata": {"finalizers": ["f2", "f3"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["f1", "f2", "f3"]));

        // $setElementOrder reorders the listed elements; a new one is added.
        let out = smp(
            POD,
            pod,
            json!({"spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "b"}, {"name": "a"}], "containers": [{"name": "c", "image": "z:1"}]}}),
        );
        let names: Vec<&str> = out["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["c", "b", "a"]);
    }

    #[test]
    fn deployment_containers_and_their_env_merge_by_name() {
        let d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "app:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["--x", "--y"]},
            {"name": "side", "image": "side:1"}
        ]}}}});
        let out = smp(
            DEPLOYMENT,
            d,
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "app", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}, {"name": "A", "$patch": "delete"}], "args": ["--z"]}
            ]}}}}),
        );
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().unwrap().len(), 2, "{cs}");
        assert_eq!(cs[0]["image"], "app:1");
        assert_eq!(
            cs[0]["env"],
            json!([{"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
        // args has no patch strategy: replaced, not merged.
        assert_eq!(cs[0]["args"], json!(["--z"]));
        assert_eq!(cs[1], json!({"name": "side", "image": "side:1"}));
    }

    #[test]
    fn lists_without_strategy_are_replaced_and_retain_keys_clears() {
        // Service externalIPs and Pod tolerations carry no patch strategy.
        let out = smp(
            ("", "v1", "Service"),
            json!({"spec": {"externalIPs": ["1.1.1.1", "2.2.2.2"]}}),
            json!({"spec": {"externalIPs": ["3.3.3.3"]}}),
        );
        assert_eq!(out["spec"]["externalIPs"], json!(["3.3.3.3"]));
        let out = smp(
            POD,
            json!({"spec": {"tolerations": [{"key": "a"}, {"key": "b"}]}}),
            json!({"spec": {"tolerations": [{"key": "c"}]}}),
        );
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "c"}]));

        // spec.strategy is retainKeys: switching to Recreate drops rollingUpdate.
        let out = smp(
            DEPLOYMENT,
            json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
        );
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));

        // A list element {"$patch": "replace"} replaces the whole merging list.
        let out = smp(
            POD,
            json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
            json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "c"}]}}),
        );
        assert_eq!(out["spec"]["containers"], json!([{"name": "c"}]));
    }

    #[test]
    fn custom_resources_refuse_strategic_merge() {
        let mut o = json!({"spec": {}});
        let e = apply(&mut o, SMP, br#"{"spec":{"a":1}}"#, None).unwrap_err();
        assert!(matches!(e, Error::NoStrategicMerge));
        assert!(e.to_string().contains("application/merge-patch+json"));
    }
}
