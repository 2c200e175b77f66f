//! Server-side apply and field ownership (`metadata.managedFields`), as the apiserver's
//! structured-merge-diff does it for the cases operators and kubectl users rely on:
//!
//! * `PATCH` with `application/apply-patch+yaml` and a `fieldManager` creates the object when
//!   it is absent, else merges the applied configuration into it;
//! * every field the applied configuration sets is owned by that manager (an `Apply` entry);
//!   fields a manager applied before and no longer applies are removed, unless another manager
//!   owns them too;
//! * applying a value that differs from the live one of a field another manager owns is a
//!   `409 Conflict` naming the field and the manager, unless `force=true`, which takes the
//!   field over;
//! * every other write (create, update, patch) records an `Update` entry for its manager
//!   (`fieldManager`, else the client's user agent) owning the fields it changed, and takes
//!   them from the other managers.
//!
//! Lists are merged as the schema says: `map` lists by their keys (`k:{...}` in `fieldsV1`),
//! `set` lists by value (`v:...`), anything else replaced whole (atomic).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// How a list is merged and owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    /// Replaced whole, owned as one field.
    Atomic,
    /// Items are values, merged as a set.
    Set,
    /// Items are objects identified by these keys.
    Map(Vec<String>),
}

/// Tells the list type of the list at a path of field names (list items are not in the path).
pub trait ListTypes {
    /// The list type at `path` (e.g. `["spec", "template", "spec", "containers"]`).
    fn list_type(&self, path: &[String]) -> ListType;
}

/// Every list atomic: what a schema without list annotations means.
#[derive(Debug, Clone, Copy)]
pub struct AllAtomic;

impl ListTypes for AllAtomic {
    fn list_type(&self, _path: &[String]) -> ListType {
        ListType::Atomic
    }
}

/// One owned field: the path of `fieldsV1` keys (`f:spec`, `k:{"port":80}`, `v:"x"`).
type FieldPath = Vec<String>;

/// The set of fields a manager owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet(BTreeSet<FieldPath>);

/// Metadata fields a manager can own; the rest of `metadata` is the server's.
const OWNED_META: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

fn item_key(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        if let Some(v) = item.get(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    format!("k:{}", Value::Object(m))
}

impl FieldSet {
    /// The leaf fields `obj` sets (a map's or list item's own entry `.` included, as in
    /// `fieldsV1`).
    pub fn of(obj: &Value, types: &dyn ListTypes) -> Self {
        let mut set = BTreeSet::new();
        let Some(m) = obj.as_object() else {
            return Self(set);
        };
        for (k, v) in m {
            match k.as_str() {
                "apiVersion" | "kind" | "status" => {}
                "metadata" => {
                    if let Some(meta) = v.as_object() {
                        for (mk, mv) in meta {
                            if OWNED_META.contains(&mk.as_str()) {
                                walk(
                                    mv,
                                    &mut vec!["f:metadata".into(), format!("f:{mk}")],
                                    &mut vec!["metadata".into(), mk.clone()],
                                    types,
                                    &mut set,
                                );
                            }
                        }
                    }
                }
                _ => walk(
                    v,
                    &mut vec![format!("f:{k}")],
                    &mut vec![k.clone()],
                    types,
                    &mut set,
                ),
            }
        }
        Self(set)
    }

    /// Fields in `self` but not `other`.
    fn minus(&self, other: &Self) -> Self {
        Self(self.0.difference(&other.0).cloned().collect())
    }

    /// Whether nothing is owned.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The paths no other path extends: the fields themselves, without the entries of the
    /// maps and list items that hold them.
    pub fn leaves(&self) -> BTreeSet<&FieldPath> {
        self.0
            .iter()
            .filter(|p| p.last().is_none_or(|l| l != "."))
            .filter(|p| {
                !self
                    .0
                    .range::<FieldPath, _>((
                        std::ops::Bound::Excluded(*p),
                        std::ops::Bound::Unbounded,
                    ))
                    .next()
                    .is_some_and(|q| q.starts_with(p))
            })
            .collect()
    }

    /// The `fieldsV1` object.
    pub fn to_fields_v1(&self) -> Value {
        let mut root = json!({});
        for path in &self.0 {
            let mut cur = &mut root;
            for seg in path {
                if !cur.get(seg).is_some_and(Value::is_object) {
                    cur[seg.as_str()] = json!({});
                }
                cur = &mut cur[seg.as_str()];
            }
        }
        root
    }

    /// Reads a `fieldsV1` object back.
    pub fn from_fields_v1(v: &Value) -> Self {
        fn go(v: &Value, path: &mut Vec<String>, out: &mut BTreeSet<FieldPath>) {
            match v.as_object() {
                Some(m) if !m.is_empty() => {
                    for (k, child) in m {
                        if k == "." {
                            out.insert(path.clone());
                            continue;
                        }
                        path.push(k.clone());
                        go(child, path, out);
                        path.pop();
                    }
                }
                _ => {
                    if !path.is_empty() {
                        out.insert(path.clone());
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        go(v, &mut Vec::new(), &mut out);
        Self(out)
    }
}

fn walk(
    v: &Value,
    path: &mut FieldPath,
    names: &mut Vec<String>,
    types: &dyn ListTypes,
    out: &mut BTreeSet<FieldPath>,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(format!("f:{k}"));
                names.push(k.clone());
                walk(child, path, names, types, out);
                names.pop();
                path.pop();
            }
        }
        Value::Array(items) => match types.list_type(names) {
            ListType::Atomic => {
                out.insert(path.clone());
            }
            ListType::Set => {
                for it in items {
                    path.push(format!("v:{it}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListType::Map(keys) => {
                for it in items {
                    path.push(item_key(it, &keys));
                    let mut dot = path.clone();
                    dot.push(".".into());
                    out.insert(dot);
                    if let Some(m) = it.as_object() {
                        for (k, child) in m {
                            path.push(format!("f:{k}"));
                            names.push(k.clone());
                            walk(child, path, names, types, out);
                            names.pop();
                            path.pop();
                        }
                    }
                    path.pop();
                }
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at a field path in `obj` (`None`: absent).
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        if seg == "." {
            return Some(cur);
        }
        cur = if let Some(name) = seg.strip_prefix("f:") {
            cur.get(name)?
        } else if let Some(keys) = seg.strip_prefix("k:") {
            let want: Value = serde_json::from_str(keys).ok()?;
            let want = want.as_object()?;
            cur.as_array()?
                .iter()
                .find(|it| want.iter().all(|(k, v)| it.get(k) == Some(v)))?
        } else if let Some(val) = seg.strip_prefix("v:") {
            let want: Value = serde_json::from_str(val).ok()?;
            cur.as_array()?.iter().find(|it| **it == want)?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Removes the field at `path` from `obj`.
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    if last == "." {
        // A list item's own entry: remove the item.
        if let Some((item, list_path)) = parent.split_last() {
            remove_item(obj, list_path, item);
        }
        return;
    }
    let mut cur = obj;
    for seg in parent {
        let next = if let Some(name) = seg.strip_prefix("f:") {
            cur.get_mut(name)
        } else if let Some(keys) = seg.strip_prefix("k:") {
            let Ok(Value::Object(want)) = serde_json::from_str::<Value>(keys) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|it| want.iter().all(|(k, v)| it.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(name) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(name);
        }
    } else if let Some(val) = last.strip_prefix("v:")
        && let Ok(want) = serde_json::from_str::<Value>(val)
        && let Some(a) = cur.as_array_mut()
    {
        a.retain(|it| *it != want);
    }
}

fn remove_item(obj: &mut Value, list_path: &[String], item: &str) {
    let Some(list) = value_at_mut(obj, list_path) else {
        return;
    };
    let Some(keys) = item.strip_prefix("k:") else {
        return;
    };
    let Ok(Value::Object(want)) = serde_json::from_str::<Value>(keys) else {
        return;
    };
    if let Some(a) = list.as_array_mut() {
        a.retain(|it| !want.iter().all(|(k, v)| it.get(k) == Some(v)));
    }
}

fn value_at_mut<'a>(obj: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = obj;
    for seg in path {
        cur = if let Some(name) = seg.strip_prefix("f:") {
            cur.get_mut(name)?
        } else if let Some(keys) = seg.strip_prefix("k:") {
            let want: Value = serde_json::from_str(keys).ok()?;
            let want = want.as_object()?.clone();
            cur.as_array_mut()?
                .iter_mut()
                .find(|it| want.iter().all(|(k, v)| it.get(k) == Some(v)))?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Merges `applied` into `live` (maps deep, lists by their type).
fn merge(live: &mut Value, applied: &Value, names: &mut Vec<String>, types: &dyn ListTypes) {
    match (live.as_object_mut(), applied.as_object()) {
        (Some(lm), Some(am)) => {
            for (k, av) in am {
                names.push(k.clone());
                match lm.get_mut(k) {
                    Some(lv) if lv.is_object() && av.is_object() => merge(lv, av, names, types),
                    Some(lv) if lv.is_array() && av.is_array() => {
                        merge_list(lv, av, names, types);
                    }
                    _ => {
                        lm.insert(k.clone(), av.clone());
                    }
                }
                names.pop();
            }
        }
        _ => *live = applied.clone(),
    }
}

fn merge_list(live: &mut Value, applied: &Value, names: &mut Vec<String>, types: &dyn ListTypes) {
    let (Some(la), Some(aa)) = (live.as_array_mut(), applied.as_array()) else {
        return;
    };
    match types.list_type(names) {
        ListType::Atomic => *la = aa.clone(),
        ListType::Set => {
            for it in aa {
                if !la.contains(it) {
                    la.push(it.clone());
                }
            }
        }
        ListType::Map(keys) => {
            for it in aa {
                let k = item_key(it, &keys);
                match la.iter_mut().find(|x| item_key(x, &keys) == k) {
                    Some(existing) => merge(existing, it, names, types),
                    None => la.push(it.clone()),
                }
            }
        }
    }
}

/// One `managedFields` entry, parsed.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: Value,
    fields: FieldSet,
}

fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().to_owned(),
            operation: e["operation"].as_str().unwrap_or("Update").to_owned(),
            subresource: e["subresource"].as_str().map(str::to_owned),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
            time: e.get("time").cloned().unwrap_or(Value::Null),
            fields: FieldSet::from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

fn write_entries(obj: &mut Value, list: &[Entry]) {
    let v: Vec<Value> = list
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut o = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": e.fields.to_fields_v1(),
            });
            if let Some(s) = &e.subresource {
                o["subresource"] = json!(s);
            }
            o
        })
        .collect();
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    if v.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(v);
    }
}

fn now() -> Value {
    let t = time::OffsetDateTime::now_utc();
    json!(
        t.replace_nanosecond(0)
            .ok()
            .and_then(|t| t
                .format(&time::format_description::well_known::Rfc3339)
                .ok())
            .unwrap_or_default()
    )
}

fn render(path: &FieldPath) -> String {
    let mut out = String::new();
    for seg in path {
        if seg == "." {
            continue;
        }
        if let Some(n) = seg.strip_prefix("f:") {
            out.push('.');
            out.push_str(n);
        } else if let Some(k) = seg.strip_prefix("k:") {
            out.push('[');
            out.push_str(k);
            out.push(']');
        } else if let Some(v) = seg.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// A server-side apply conflict: the fields and who owns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflicts(pub Vec<(String, String)>);

impl Conflicts {
    /// The `Status` message, as the apiserver words it.
    pub fn message(&self) -> String {
        let mut managers: Vec<&str> = self.0.iter().map(|(m, _)| m.as_str()).collect();
        managers.dedup();
        let list: Vec<String> = self
            .0
            .iter()
            .map(|(m, f)| format!("conflict with \"{m}\": {f}"))
            .collect();
        if list.len() == 1 {
            format!("Apply failed with 1 conflict: {}", list[0])
        } else {
            format!(
                "Apply failed with {} conflicts: {}",
                list.len(),
                list.join("\n")
            )
        }
    }

    /// The `Status` causes.
    pub fn causes(&self) -> Vec<Value> {
        self.0
            .iter()
            .map(|(m, f)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": f}))
            .collect()
    }
}

/// Applies `applied` for `manager` onto `live` (`None`: the object does not exist yet).
/// Returns the object to store, with its `managedFields`.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    subresource: Option<&str>,
    types: &dyn ListTypes,
) -> Result<Value, Conflicts> {
    let api_version = applied["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mine = FieldSet::of(applied, types);
    let Some(live) = live else {
        let mut obj = applied.clone();
        write_entries(
            &mut obj,
            &[Entry {
                manager: manager.into(),
                operation: "Apply".into(),
                subresource: subresource.map(str::to_owned),
                api_version,
                time: now(),
                fields: mine,
            }],
        );
        return Ok(obj);
    };
    let mut list = entries(live);
    let same = |e: &Entry| {
        e.manager == manager && e.operation == "Apply" && e.subresource.as_deref() == subresource
    };
    // Conflicts: a field someone else owns, applied with a different value.
    let mut conflicts = Vec::new();
    for e in list.iter().filter(|e| !same(e)) {
        for f in mine.0.intersection(&e.fields.0) {
            if value_at(live, f) != value_at(applied, f) {
                conflicts.push((e.manager.clone(), render(f)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(Conflicts(conflicts));
    }
    let before = list
        .iter()
        .find(|e| same(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut obj = live.clone();
    merge(
        &mut obj,
        &strip_server_fields(applied),
        &mut Vec::new(),
        types,
    );
    // Fields this manager applied before and no longer applies go, unless others own them.
    for f in &before.minus(&mine).0 {
        let shared = list.iter().filter(|e| !same(e)).any(|e| {
            e.fields
                .0
                .iter()
                .any(|g| g.starts_with(f) || f.starts_with(g))
        });
        if !shared {
            remove_at(&mut obj, f);
        }
    }
    for e in list.iter_mut().filter(|e| !same(e)) {
        if force {
            e.fields = e.fields.minus(&mine);
        } else {
            // Fields applied with the same value are shared; nothing to take.
        }
    }
    // As the apiserver's managed-fields updater: the entry (and its time) changes only when the
    // manager's fields do, so an apply that changes nothing is no write at all. Fields are
    // compared by the fields themselves: whether a list item's own entry (`.`) was written
    // depends on the path the set took (apply, or an update since).
    let (time, mine) = match list
        .iter()
        .find(|e| same(e) && e.fields.leaves() == mine.leaves() && e.api_version == api_version)
    {
        Some(e) => (e.time.clone(), mine),
        None => (now(), mine),
    };
    let entry = Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        subresource: subresource.map(str::to_owned),
        api_version,
        time,
        fields: mine,
    };
    match list.iter().position(same) {
        Some(i) => {
            list[i] = entry;
            let mut seen = false;
            list.retain(|e| {
                let dup = same(e) && seen;
                seen |= same(e);
                !dup
            });
        }
        None => list.push(entry),
    }
    let stored = entries(live);
    let equivalent = |a: &Entry, b: &Entry| {
        a.manager == b.manager
            && a.operation == b.operation
            && a.subresource == b.subresource
            && a.api_version == b.api_version
            && a.time == b.time
            && a.fields.leaves() == b.fields.leaves()
    };
    let kept: Vec<&Entry> = list.iter().filter(|e| !e.fields.is_empty()).collect();
    if kept.len() == stored.len() && kept.iter().zip(&stored).all(|(a, b)| equivalent(a, b)) {
        // Nothing changed hands: the entries stay as stored, byte for byte.
        obj["metadata"]["managedFields"] = live["metadata"]["managedFields"].clone();
    } else {
        write_entries(&mut obj, &list);
    }
    Ok(obj)
}

/// What an applied configuration may not set: the server's metadata.
fn strip_server_fields(applied: &Value) -> Value {
    let mut a = applied.clone();
    if let Some(meta) = a.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in [
            "managedFields",
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            meta.remove(f);
        }
    }
    a
}

/// Records an ordinary write (create, update, patch) by `manager`: it owns the fields it
/// changed, taken from every other manager.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: Option<&str>,
    types: &dyn ListTypes,
) {
    let mut list = match old {
        Some(o) => entries(o),
        None => entries(new),
    };
    let after = FieldSet::of(new, types);
    let changed: FieldSet = match old {
        None => after.clone(),
        Some(o) => FieldSet(
            after
                .0
                .iter()
                .filter(|f| value_at(o, f) != value_at(new, f))
                .cloned()
                .collect(),
        ),
    };
    // Fields that are gone are nobody's.
    for e in &mut list {
        e.fields = FieldSet(
            e.fields
                .0
                .iter()
                .filter(|f| value_at(new, f).is_some())
                .cloned()
                .collect(),
        );
    }
    if changed.is_empty() && old.is_some() {
        write_entries(new, &list);
        return;
    }
    let same = |e: &Entry| {
        e.manager == manager && e.operation == "Update" && e.subresource.as_deref() == subresource
    };
    for e in list.iter_mut().filter(|e| !same(e)) {
        e.fields = e.fields.minus(&changed);
    }
    let mut mine = list
        .iter()
        .find(|e| same(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    mine.0.extend(changed.0);
    list.retain(|e| !same(e));
    list.push(Entry {
        manager: manager.into(),
        operation: "Update".into(),
        subresource: subresource.map(str::to_owned),
        api_version: new["apiVersion"].as_str().unwrap_or_default().to_owned(),
        time: now(),
        fields: mine,
    });
    write_entries(new, &list);
}

/// The manager name of a write without `fieldManager`: the client's user agent up to the
/// first `/` (`kubectl`, `kube-rs`, `OpenAPI-Generator`), as the apiserver derives it.
pub fn manager_from_user_agent(ua: Option<&str>) -> String {
    let ua = ua.unwrap_or("unknown");
    let name = ua.split('/').next().unwrap_or(ua).trim();
    let name: String = name.chars().take(128).collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ports;
    impl ListTypes for Ports {
        fn list_type(&self, path: &[String]) -> ListType {
            match path.last().map(String::as_str) {
                Some("ports") => ListType::Map(vec!["port".into(), "protocol".into()]),
                Some("finalizers") => ListType::Set,
                _ => ListType::Atomic,
            }
        }
    }

    fn svc(replicas: i64) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"replicas": replicas, "ports": [{"port": 80, "protocol": "TCP"}]}})
    }

    #[test]
    fn apply_creates_then_conflicts_with_another_manager() {
        let created = apply(None, &svc(1), "alice", false, None, &Ports).unwrap();
        assert_eq!(created["metadata"]["managedFields"][0]["manager"], "alice");
        assert_eq!(
            created["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:ports"]["k:{\"port\":80,\"protocol\":\"TCP\"}"]
                ["."],
            json!({})
        );
        // Bob applies a different replicas: conflict; forced, he owns it.
        let err = apply(Some(&created), &svc(3), "bob", false, None, &Ports).unwrap_err();
        assert_eq!(err.0, vec![("alice".into(), ".spec.replicas".into())]);
        assert!(err.message().starts_with("Apply failed with 1 conflict"));
        let forced = apply(Some(&created), &svc(3), "bob", true, None, &Ports).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let alice = &forced["metadata"]["managedFields"][0];
        assert_eq!(alice["manager"], "alice");
        assert!(alice["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        // Same value: shared, no conflict.
        assert!(apply(Some(&forced), &svc(3), "carol", false, None, &Ports).is_ok());
    }

    #[test]
    fn a_field_no_longer_applied_is_removed() {
        let created = apply(None, &svc(1), "alice", false, None, &Ports).unwrap();
        let mut less = svc(1);
        less["metadata"]["labels"] = json!({});
        let next = apply(Some(&created), &less, "alice", false, None, &Ports).unwrap();
        assert!(next["metadata"]["labels"].get("app").is_none(), "{next}");
    }

    #[test]
    fn updates_take_the_fields_they_change() {
        let created = apply(None, &svc(1), "alice", false, None, &Ports).unwrap();
        let mut edited = created.clone();
        edited["spec"]["replicas"] = json!(5);
        record_update(Some(&created), &mut edited, "kubectl-edit", None, &Ports);
        let err = apply(Some(&edited), &svc(1), "alice", false, None, &Ports).unwrap_err();
        assert_eq!(
            err.0,
            vec![("kubectl-edit".into(), ".spec.replicas".into())]
        );
        assert_eq!(
            manager_from_user_agent(Some("kubectl/v1.32.4 (linux/amd64)")),
            "kubectl"
        );
    }
}
