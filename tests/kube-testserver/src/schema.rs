//! Schema validation of objects, from the official Kubernetes 1.32 schemas.
//!
//! The schemas are the JSON-schema form of the apiserver's OpenAPI definitions that the PyPI
//! package `kubernetes-validate` ships (`scripts/setup.sh` installs it into `.venv`); nothing
//! here is hand-written. [`Schemas::check`] does for a built-in object what the apiserver's
//! decoder does (`sigs.k8s.io/json`: wrong JSON types and out-of-range integers are `400`
//! decode errors worded like Go's `encoding/json`; unknown fields are rejected, warned about
//! or dropped as the `fieldValidation` query parameter says) followed by the schema's
//! `required` properties (`422` field errors). [`CrdSchema`] compiles one CRD version's
//! `openAPIV3Schema` the way the apiextensions apiserver accepts it (structural schemas only)
//! and validates custom resources against it: defaulting, pruning of unknown fields, and the
//! OpenAPI value validations, with the apiserver's messages. [`PatchMeta`] walks a kind's
//! strategic-merge-patch metadata (`x-kubernetes-patch-strategy`, `-merge-key`) for
//! [`crate::patch`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use crate::field_error::{FieldError, invalid_message};

/// Where the 1.32 definitions live inside a Python site-packages directory.
const SITE_PACKAGES_PATH: &str =
    "site-packages/kubernetes_validate/kubernetes-json-schema/v1.32.0-local/_definitions.json";

const INT_OR_STRING: &str = "io.k8s.apimachinery.pkg.util.intstr.IntOrString";
const QUANTITY: &str = "io.k8s.apimachinery.pkg.api.resource.Quantity";
const TIME: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Time";
const MICRO_TIME: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime";
/// The definition of `metadata` for every kind.
pub const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

const RFC3339: &str = "2006-01-02T15:04:05Z07:00";
const RFC3339_MICRO: &str = "2006-01-02T15:04:05.000000Z07:00";

/// The `fieldValidation` query parameter of create, update and patch: what to do with
/// unknown (and duplicate) fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop unknown fields silently.
    Ignore,
    /// Drop unknown fields and warn about each (`Warning: 299 - "unknown field \"spec.x\""`);
    /// the apiserver's default.
    Warn,
    /// Reject the request with `400 BadRequest` (`strict decoding error: unknown field ...`).
    Strict,
}

impl FieldValidation {
    /// Parses the query parameter: absent or empty is `Warn`, as in the apiserver. Anything
    /// else than `Ignore`, `Warn` or `Strict` is the field error the apiserver reports, inside
    /// a `422` for `CreateOptions.meta.k8s.io ""` (or `UpdateOptions`, `PatchOptions`):
    /// `fieldValidation: Unsupported value: "x": supported values: "", "Ignore", "Strict", "Warn"`.
    pub fn parse(value: Option<&str>) -> Result<Self, FieldError> {
        match value.unwrap_or("") {
            "" | "Warn" => Ok(Self::Warn),
            "Ignore" => Ok(Self::Ignore),
            "Strict" => Ok(Self::Strict),
            other => Err(FieldError::not_supported(
                "fieldValidation",
                json!(other),
                &["", "Ignore", "Strict", "Warn"],
            )),
        }
    }
}

/// Why an object was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// The body does not decode into the kind (`400 BadRequest`); the message is the decoder's,
    /// e.g. `json: cannot unmarshal string into Go struct field ServicePort.spec.ports.port of
    /// type int32` or `strict decoding error: unknown field "spec.foo"`.
    Decode(String),
    /// The object decodes but is invalid (`422 Invalid`).
    Invalid(Vec<FieldError>),
}

impl Rejection {
    /// The HTTP status code: 400 or 422.
    pub fn code(&self) -> u16 {
        match self {
            Self::Decode(_) => 400,
            Self::Invalid(_) => 422,
        }
    }

    /// The `Status` reason: `BadRequest` or `Invalid`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(_) => "BadRequest",
            Self::Invalid(_) => "Invalid",
        }
    }

    /// The `Status` message, as the apiserver words it for an object of `kind` in `version`
    /// named `name`: `Service in version "v1" cannot be handled as a Service: <decode error>`,
    /// or `Pod "p" is invalid: spec.containers: Required value`.
    pub fn message(&self, kind: &str, version: &str, name: &str) -> String {
        match self {
            Self::Decode(msg) => {
                format!("{kind} in version \"{version}\" cannot be handled as a {kind}: {msg}")
            }
            Self::Invalid(errors) => invalid_message(kind, name, errors),
        }
    }
}

/// The official definitions of every built-in kind, by definition name
/// (`io.k8s.api.core.v1.Service`) and by group/version/kind.
#[derive(Debug)]
pub struct Schemas {
    defs: HashMap<String, Value>,
    kinds: HashMap<(String, String, String), String>,
}

static SHARED: Mutex<Option<Arc<Schemas>>> = Mutex::new(None);

impl Schemas {
    /// Finds `_definitions.json` of Kubernetes 1.32: `$KUBE_TESTSERVER_SCHEMAS` if set, else the
    /// `.venv` that `scripts/setup.sh` creates, searched in the checkout this crate was built
    /// from and in every ancestor of the running executable and of the current directory.
    pub fn discover() -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os("KUBE_TESTSERVER_SCHEMAS") {
            let p = PathBuf::from(p);
            if p.is_file() {
                return Ok(p);
            }
            bail!(
                "KUBE_TESTSERVER_SCHEMAS={} is not a file; it must name kubernetes-validate's \
                 v1.32.0-local/_definitions.json (run scripts/setup.sh to install it)",
                p.display()
            );
        }
        let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")];
        if let Ok(exe) = std::env::current_exe() {
            dirs.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
        }
        if let Ok(cwd) = std::env::current_dir() {
            dirs.extend(cwd.ancestors().map(Path::to_path_buf));
        }
        for dir in &dirs {
            if let Some(found) = find_in_venv(&dir.join(".venv")) {
                return Ok(found);
            }
        }
        bail!(
            "the official Kubernetes 1.32 schemas (PyPI kubernetes-validate, \
             .venv/lib/python3*/{SITE_PACKAGES_PATH}) were not found next to the checkout, the \
             executable or the current directory: run scripts/setup.sh (or set \
             KUBE_TESTSERVER_SCHEMAS to that file)"
        )
    }

    /// Reads and indexes a `_definitions.json`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut doc: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let Some(Value::Object(defs)) = doc.get_mut("$defs").map(Value::take) else {
            bail!("{} has no $defs map", path.display());
        };
        let defs: HashMap<String, Value> = defs.into_iter().collect();
        let mut kinds = HashMap::new();
        for (name, def) in &defs {
            for gvk in def
                .get("x-kubernetes-group-version-kind")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let part = |k: &str| gvk.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                kinds.insert((part("group"), part("version"), part("kind")), name.clone());
            }
        }
        Ok(Self { defs, kinds })
    }

    /// The schemas of this process, discovered and loaded once.
    pub fn shared() -> anyhow::Result<Arc<Self>> {
        let mut slot = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = slot.as_ref() {
            return Ok(Arc::clone(s));
        }
        let schemas = Arc::new(Self::load(&Self::discover()?)?);
        *slot = Some(Arc::clone(&schemas));
        Ok(schemas)
    }

    /// Whether `group/version` `kind` is a built-in kind with a definition.
    pub fn knows(&self, group: &str, version: &str, kind: &str) -> bool {
        self.kind_def(group, version, kind).is_some()
    }

    /// The definition name of a kind (`io.k8s.api.core.v1.Service`).
    pub fn kind_def(&self, group: &str, version: &str, kind: &str) -> Option<&str> {
        self.kinds
            .get(&(group.to_owned(), version.to_owned(), kind.to_owned()))
            .map(String::as_str)
    }

    /// A definition by name.
    pub fn def(&self, name: &str) -> Option<&Value> {
        self.defs.get(name)
    }

    /// Every definition, by name.
    pub fn defs(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.defs.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// `node` itself, or the definition its `$ref` names (with that name).
    fn resolve<'a>(&'a self, node: &'a Value) -> (&'a Value, Option<&'a str>) {
        match ref_name(node) {
            Some(name) => match self.defs.get_key_value(name) {
                Some((k, def)) => (def, Some(k.as_str())),
                None => (node, None),
            },
            None => (node, None),
        }
    }

    /// Decodes and validates a built-in object as the apiserver does on create and update:
    /// wrong types are a [`Rejection::Decode`], unknown fields are handled per `mode` (removed
    /// from `obj` unless `Strict`, which rejects), `null` fields are dropped (Go decodes them as
    /// zero values), then missing `required` properties are a [`Rejection::Invalid`]. Returns
    /// the warnings to send (`unknown field "spec.foo"`). Kinds without a definition (custom
    /// resources) pass unchanged with no warnings.
    pub fn check(
        &self,
        group: &str,
        version: &str,
        kind: &str,
        obj: &mut Value,
        mode: FieldValidation,
    ) -> Result<Vec<String>, Rejection> {
        let Some(def) = self.kind_def(group, version, kind) else {
            return Ok(Vec::new());
        };
        let root = json!({ "$ref": format!("#/$defs/{def}") });
        self.decode(&root, obj, "", mode)
    }

    /// [`Schemas::check`] for the `metadata` of an object whose kind has no definition (a
    /// custom resource): unknown fields, types and required fields of `ObjectMeta`, with paths
    /// under `metadata`.
    pub fn check_metadata(
        &self,
        metadata: &mut Value,
        mode: FieldValidation,
    ) -> Result<Vec<String>, Rejection> {
        let root = json!({ "$ref": format!("#/$defs/{OBJECT_META}") });
        self.decode(&root, metadata, "metadata", mode)
    }

    fn decode(
        &self,
        root: &Value,
        obj: &mut Value,
        path: &str,
        mode: FieldValidation,
    ) -> Result<Vec<String>, Rejection> {
        let mut d = Decoder {
            schemas: self,
            mode,
            hard: None,
            saved: None,
            unknown: Vec::new(),
            invalid: Vec::new(),
        };
        if !obj.is_null() {
            d.value(root, obj, path, path, "");
        }
        if let Some(msg) = d.hard.or(d.saved) {
            return Err(Rejection::Decode(msg));
        }
        conclude(&d.unknown, d.invalid, mode)
    }

    /// The strategic-merge-patch metadata of a built-in kind, to walk field by field.
    pub fn patch_meta(&self, group: &str, version: &str, kind: &str) -> Option<PatchMeta<'_>> {
        let def = self.kind_def(group, version, kind)?;
        Some(PatchMeta {
            schemas: self,
            node: self.defs.get(def)?,
        })
    }

    /// The Go type of a schema node, as `encoding/json` names it in errors (`int32`,
    /// `[]v1.Container`, `map[string]string`, `v1.ServiceSpec`).
    fn go_type(&self, node: &Value) -> String {
        if let Some(name) = ref_name(node) {
            return go_qualified(name);
        }
        let format = node.get("format").and_then(Value::as_str);
        match types(node).first().copied() {
            Some("string") if format == Some("byte") => "[]uint8".into(),
            Some("string") => "string".into(),
            Some("integer") => format.unwrap_or("int64").into(),
            Some("number") => "float64".into(),
            Some("boolean") => "bool".into(),
            Some("array") => match node.get("items") {
                Some(items) => format!("[]{}", self.go_type(items)),
                None => "[]interface {}".into(),
            },
            Some("object") => match node.get("additionalProperties") {
                Some(ap) if ap.is_object() => format!("map[string]{}", self.go_type(ap)),
                _ => "map[string]interface {}".into(),
            },
            _ => "interface {}".into(),
        }
    }
}

fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|p| p.join(SITE_PACKAGES_PATH))
        .find(|p| p.is_file())
}

/// The definition a `{"$ref": "#/$defs/<name>"}` node names.
pub(crate) fn ref_name(node: &Value) -> Option<&str> {
    node.get("$ref")?.as_str()?.strip_prefix("#/$defs/")
}

/// A node's JSON types without `null`.
pub(crate) fn types(node: &Value) -> Vec<&str> {
    match node.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect(),
        _ => Vec::new(),
    }
}

/// `io.k8s.api.core.v1.ServicePort` → `v1.ServicePort`.
fn go_qualified(def: &str) -> String {
    let mut parts = def.rsplit('.');
    let name = parts.next().unwrap_or(def);
    match parts.next() {
        Some(pkg) => format!("{pkg}.{name}"),
        None => name.to_owned(),
    }
}

/// `io.k8s.api.core.v1.ServicePort` → `ServicePort`.
fn go_short(def: &str) -> &str {
    def.rsplit('.').next().unwrap_or(def)
}

fn join(base: &str, field: &str) -> String {
    if base.is_empty() {
        field.to_owned()
    } else {
        format!("{base}.{field}")
    }
}

/// How Go's decoder names a JSON value in `cannot unmarshal <what>`.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The built-in decoder: Go's `encoding/json` (as forked by `sigs.k8s.io/json`) into the
/// kind's Go struct, driven by the schema.
struct Decoder<'s> {
    schemas: &'s Schemas,
    mode: FieldValidation,
    /// The first error that aborts decoding (from a type's own `UnmarshalJSON`).
    hard: Option<String>,
    /// The first type mismatch; Go keeps decoding and reports it at the end.
    saved: Option<String>,
    /// Unknown fields, as paths.
    unknown: Vec<String>,
    /// Missing required properties and values outside an `enum`.
    invalid: Vec<FieldError>,
}

impl Decoder<'_> {
    fn save(&mut self, msg: String) {
        if self.saved.is_none() && self.hard.is_none() {
            self.saved = Some(msg);
        }
    }

    fn abort(&mut self, msg: String) {
        if self.hard.is_none() {
            self.hard = Some(msg);
        }
    }

    /// `json: cannot unmarshal <what> into Go struct field <owner>.<go> of type <ty>`.
    fn type_error(what: &str, go: &str, owner: &str, ty: &str) -> String {
        if owner.is_empty() {
            format!("json: cannot unmarshal {what} into Go value of type {ty}")
        } else {
            format!("json: cannot unmarshal {what} into Go struct field {owner}.{go} of type {ty}")
        }
    }

    /// Decodes `v` (not null) against `node`. `api` is the path the apiserver prints
    /// (`spec.ports[0].port`), `go` the decoder's field stack (`spec.ports.port`), `owner` the
    /// Go struct holding the current field.
    fn value(&mut self, node: &Value, v: &mut Value, api: &str, go: &str, owner: &str) {
        let schemas = self.schemas;
        let (n, def) = schemas.resolve(node);
        match def {
            Some(INT_OR_STRING) => return self.int_or_string(v, go, owner),
            Some(QUANTITY) => return self.quantity(v),
            Some(TIME) => return self.time(v, go, owner, RFC3339),
            Some(MICRO_TIME) => return self.time(v, go, owner, RFC3339_MICRO),
            _ => {}
        }
        // Root apiVersion and kind carry enums in the JSON-schema form; a mismatch there is
        // the caller's (the URL's kind decides), not a field error.
        let enumeration = node
            .get("enum")
            .or_else(|| n.get("enum"))
            .and_then(Value::as_array);
        if let Some(allowed) = enumeration
            && api != "apiVersion"
            && api != "kind"
            && !allowed.contains(v)
        {
            let allowed: Vec<String> = allowed
                .iter()
                .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_owned))
                .collect();
            self.invalid.push(FieldError {
                field: api.to_owned(),
                kind: crate::field_error::FieldErrorKind::NotSupported(allowed),
                value: Some(v.clone()),
            });
        }
        let Some(ty) = types(n).first().copied() else {
            // No type: any JSON (apiextensions JSON, FieldsV1, ...).
            return;
        };
        match (ty, v) {
            ("object", Value::Object(m)) => {
                if let Some(props) = n.get("properties").and_then(Value::as_object) {
                    let owner = def.map(go_short).unwrap_or(owner);
                    self.object(n, props, m, api, go, owner);
                } else if let Some(ap) = n.get("additionalProperties").filter(|a| a.is_object()) {
                    for (k, item) in m.iter_mut() {
                        if !item.is_null() {
                            self.value(ap, item, &join(api, k), go, owner);
                        }
                    }
                }
                // An object without properties (RawExtension) keeps whatever it holds.
            }
            ("array", Value::Array(items)) => {
                if let Some(item_schema) = n.get("items") {
                    for (i, item) in items.iter_mut().enumerate() {
                        if !item.is_null() {
                            self.value(item_schema, item, &format!("{api}[{i}]"), go, owner);
                        }
                    }
                }
            }
            ("string", Value::String(s)) => {
                if n.get("format").and_then(Value::as_str) == Some("byte")
                    && let Err(at) = go_base64(s)
                {
                    self.save(format!("illegal base64 data at input byte {at}"));
                }
            }
            ("integer", Value::Number(num)) => {
                let format = n.get("format").and_then(Value::as_str).unwrap_or("int64");
                let fits = match format {
                    "int32" => num.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
                    _ => num.as_i64().is_some(),
                };
                if !fits {
                    let what = format!("number {num}");
                    self.save(Self::type_error(&what, go, owner, &schemas.go_type(node)));
                }
            }
            ("number", Value::Number(_)) | ("boolean", Value::Bool(_)) => {}
            (_, other) => {
                let what = json_kind(other);
                self.save(Self::type_error(what, go, owner, &schemas.go_type(node)));
            }
        }
    }

    fn object(
        &mut self,
        n: &Value,
        props: &Map<String, Value>,
        m: &mut Map<String, Value>,
        api: &str,
        go: &str,
        owner: &str,
    ) {
        let keys: Vec<String> = m.keys().cloned().collect();
        for k in keys {
            let child_api = join(api, &k);
            match props.get(&k) {
                Some(schema) => {
                    if m.get(&k).is_some_and(Value::is_null) {
                        m.remove(&k);
                    } else if let Some(item) = m.get_mut(&k) {
                        self.value(schema, item, &child_api, &join(go, &k), owner);
                    }
                }
                None => {
                    self.unknown.push(child_api);
                    if self.mode != FieldValidation::Strict {
                        m.remove(&k);
                    }
                }
            }
        }
        for r in n
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !m.contains_key(r) {
                self.invalid.push(FieldError::required(join(api, r)));
            }
        }
    }

    /// `intstr.IntOrString.UnmarshalJSON`: a string, or else an `int32`.
    fn int_or_string(&mut self, v: &Value, go: &str, owner: &str) {
        let what = match v {
            Value::String(_) => return,
            Value::Number(n) if n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()) => return,
            Value::Number(n) => format!("number {n}"),
            other => json_kind(other).to_owned(),
        };
        self.abort(Self::type_error(&what, go, owner, "int32"));
    }

    /// `resource.Quantity.UnmarshalJSON`: `ParseQuantity` of the string or the raw number.
    fn quantity(&mut self, v: &Value) {
        let text = match v {
            Value::String(s) => s.trim().to_owned(),
            other => other.to_string(),
        };
        if let Err(e) = parse_quantity(&text) {
            self.abort(e.to_owned());
        }
    }

    /// `metav1.Time.UnmarshalJSON` (and `MicroTime`): a string in `layout`.
    fn time(&mut self, v: &Value, go: &str, owner: &str, layout: &str) {
        match v {
            Value::String(s) => {
                if let Err(e) = go_time_parse(layout, s) {
                    self.abort(e);
                }
            }
            other => self.abort(Self::type_error(json_kind(other), go, owner, "string")),
        }
    }
}

/// Checks `s` as Go's `base64.StdEncoding.Decode` does; the error is the offset Go reports in
/// `illegal base64 data at input byte N`.
fn go_base64(s: &str) -> Result<(), usize> {
    let src = s.as_bytes();
    let valid = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/';
    let mut si = 0;
    loop {
        let mut j = 0;
        while j < 4 {
            if si == src.len() {
                return match j {
                    0 => Ok(()),
                    _ => Err(si - j),
                };
            }
            let c = src[si];
            si += 1;
            if c == b'\n' || c == b'\r' {
                continue;
            }
            if c == b'=' {
                match j {
                    0 | 1 => return Err(si - 1),
                    2 => {
                        while si < src.len() && (src[si] == b'\n' || src[si] == b'\r') {
                            si += 1;
                        }
                        if si == src.len() {
                            return Err(src.len());
                        }
                        if src[si] != b'=' {
                            return Err(si - 1);
                        }
                        si += 1;
                    }
                    _ => {}
                }
                while si < src.len() && (src[si] == b'\n' || src[si] == b'\r') {
                    si += 1;
                }
                return if si < src.len() { Err(si) } else { Ok(()) };
            }
            if !valid(c) {
                return Err(si - 1);
            }
            j += 1;
        }
    }
}

/// `resource.ParseQuantity`'s verdict on `s`.
fn parse_quantity(s: &str) -> Result<(), &'static str> {
    const FORMAT: &str = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let num_start = i;
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
        i += 1;
    }
    if i == num_start {
        return Err(FORMAT);
    }
    let number = &s[num_start..i];
    let suffix = &s[i..];
    let shape = regex_lite_suffix(suffix);
    if !shape {
        return Err(FORMAT);
    }
    if number.matches('.').count() > 1 || number == "." {
        return Err("unable to parse numeric part of quantity");
    }
    let known = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || is_exponent(suffix);
    if known {
        Ok(())
    } else {
        Err("unable to parse quantity's suffix")
    }
}

/// `[eEinumkKMGTP]*[-+]?[0-9]*`.
fn regex_lite_suffix(s: &str) -> bool {
    let rest = s.trim_start_matches(|c: char| "eEinumkKMGTP".contains(c));
    let rest = rest
        .strip_prefix('+')
        .or_else(|| rest.strip_prefix('-'))
        .unwrap_or(rest);
    rest.bytes().all(|c| c.is_ascii_digit())
}

/// `e<int>` / `E<int>`.
fn is_exponent(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('e').or_else(|| s.strip_prefix('E')) else {
        return false;
    };
    let digits = rest
        .strip_prefix('+')
        .or_else(|| rest.strip_prefix('-'))
        .unwrap_or(rest);
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
}

/// Go's `time.Parse(layout, value)` for the two layouts metav1 uses (RFC 3339, with or
/// without fixed microseconds), with Go's error messages.
fn go_time_parse(layout: &str, value: &str) -> Result<(), String> {
    let bad = |elem_value: &str, elem_layout: &str| {
        format!(
            "parsing time {value:?} as {layout:?}: cannot parse {elem_value:?} as {elem_layout:?}"
        )
    };
    let range = |what: &str| format!("parsing time {value:?}: {what} out of range");
    let micro = layout == RFC3339_MICRO;
    let digits =
        |s: &str, n: usize| s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit);
    let num = |s: &str, n: usize| s[..n].parse::<u32>().unwrap_or(0);
    let mut rest = value;
    // 2006
    if !digits(rest, 4) {
        return Err(bad(rest, "2006"));
    }
    let year = num(rest, 4);
    rest = &rest[4..];
    let two = |rest: &mut &str, sep: &str, elem: &str| -> Result<u32, String> {
        if !sep.is_empty() {
            match rest.strip_prefix(sep) {
                Some(r) => *rest = r,
                None => return Err(bad(rest, sep)),
            }
        }
        if !digits(rest, 2) {
            return Err(bad(rest, elem));
        }
        let n = num(rest, 2);
        *rest = &rest[2..];
        Ok(n)
    };
    let month = two(&mut rest, "-", "01")?;
    if !(1..=12).contains(&month) {
        return Err(range("month"));
    }
    let day = two(&mut rest, "-", "02")?;
    // "15" takes one or two digits.
    rest = rest.strip_prefix('T').ok_or_else(|| bad(rest, "T"))?;
    let hour_len = match (digits(rest, 1), digits(rest, 2)) {
        (false, _) => return Err(bad(rest, "15")),
        (true, false) => 1,
        (true, true) => 2,
    };
    if num(rest, hour_len) >= 24 {
        return Err(range("hour"));
    }
    rest = &rest[hour_len..];
    if two(&mut rest, ":", "04")? >= 60 {
        return Err(range("minute"));
    }
    if two(&mut rest, ":", "05")? >= 60 {
        return Err(range("second"));
    }
    if micro {
        let ok = rest.len() >= 7
            && (rest.starts_with('.') || rest.starts_with(','))
            && digits(&rest[1..], 6);
        if !ok {
            return Err(bad(rest, ".000000"));
        }
        rest = &rest[7..];
    } else if (rest.starts_with('.') || rest.starts_with(',')) && digits(&rest[1..], 1) {
        let n = rest[1..].bytes().take_while(u8::is_ascii_digit).count();
        rest = &rest[1 + n..];
    }
    if let Some(r) = rest.strip_prefix('Z') {
        rest = r;
    } else {
        let b = rest.as_bytes();
        let ok = b.len() >= 6
            && (b[0] == b'+' || b[0] == b'-')
            && digits(&rest[1..], 2)
            && b[3] == b':'
            && digits(&rest[4..], 2);
        if !ok {
            return Err(bad(rest, "Z07:00"));
        }
        if num(&rest[1..], 2) > 24 {
            return Err(range("time zone offset hour"));
        }
        if num(&rest[4..], 2) > 60 {
            return Err(range("time zone offset minute"));
        }
        rest = &rest[6..];
    }
    if !rest.is_empty() {
        return Err(format!("parsing time {value:?}: extra text: {rest:?}"));
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day < 1 || day > days {
        return Err(range("day"));
    }
    Ok(())
}

/// A kind's strategic-merge-patch metadata at one field: the field's list strategy and merge
/// key, and the metadata of the fields below it (following `$ref`s, array items and map
/// values).
#[derive(Debug, Clone, Copy)]
pub struct PatchMeta<'s> {
    schemas: &'s Schemas,
    node: &'s Value,
}

impl<'s> PatchMeta<'s> {
    /// The metadata of field `name` of this object (or of this list's items, or this map's
    /// values).
    pub fn field(&self, name: &str) -> Option<PatchMeta<'s>> {
        let (mut n, _) = self.schemas.resolve(self.node);
        if types(n).first() == Some(&"array") {
            n = self.schemas.resolve(n.get("items")?).0;
        }
        let child = match n.get("properties").and_then(Value::as_object) {
            Some(props) => props.get(name)?,
            None => n.get("additionalProperties").filter(|a| a.is_object())?,
        };
        Some(PatchMeta {
            schemas: self.schemas,
            node: child,
        })
    }

    /// The patch strategies of this field (`x-kubernetes-patch-strategy`, e.g. `merge`,
    /// `retainKeys`, `replace`).
    pub fn strategies(&self) -> impl Iterator<Item = &'s str> {
        self.node
            .get("x-kubernetes-patch-strategy")
            .and_then(Value::as_str)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Whether lists at this field are merged (rather than replaced).
    pub fn merges(&self) -> bool {
        self.strategies().any(|s| s == "merge")
    }

    /// The merge key of a list of objects (`x-kubernetes-patch-merge-key`, e.g. `name`).
    pub fn merge_key(&self) -> Option<&'s str> {
        self.node
            .get("x-kubernetes-patch-merge-key")
            .and_then(Value::as_str)
    }

    /// Whether this field is a list.
    pub fn is_list(&self) -> bool {
        types(self.schemas.resolve(self.node).0).first() == Some(&"array")
    }

    /// How server-side apply merges and owns this list: `x-kubernetes-list-type` and
    /// `x-kubernetes-list-map-keys`, else the patch merge key, else atomic.
    pub fn list_type(&self) -> crate::apply::ListType {
        list_type_of(self.node).unwrap_or_else(|| {
            list_type_of(self.schemas.resolve(self.node).0)
                .unwrap_or(crate::apply::ListType::Atomic)
        })
    }
}

/// The list type a schema node declares, if it declares one.
pub fn list_type_of(node: &Value) -> Option<crate::apply::ListType> {
    use crate::apply::ListType;
    match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys: Vec<String> = node
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Some(ListType::Map(keys))
        }
        Some("set") => Some(ListType::Set),
        Some(_) => Some(ListType::Atomic),
        None => {
            let merges = node
                .get("x-kubernetes-patch-strategy")
                .and_then(Value::as_str)
                .is_some_and(|s| s.split(',').any(|x| x.trim() == "merge"));
            match node
                .get("x-kubernetes-patch-merge-key")
                .and_then(Value::as_str)
            {
                Some(k) if merges => Some(ListType::Map(vec![k.to_owned()])),
                None if merges => Some(ListType::Set),
                _ => None,
            }
        }
    }
}

/// List types of a built-in kind, from its schema.
#[derive(Debug, Clone, Copy)]
pub struct KindListTypes<'s>(pub PatchMeta<'s>);

impl crate::apply::ListTypes for KindListTypes<'_> {
    fn list_type(&self, path: &[String]) -> crate::apply::ListType {
        let mut cur = self.0;
        for p in path {
            match cur.field(p) {
                Some(next) => cur = next,
                None => return crate::apply::ListType::Atomic,
            }
        }
        cur.list_type()
    }
}

/// List types of a custom resource, from its CRD version's `openAPIV3Schema`.
#[derive(Debug, Clone, Copy)]
pub struct CrdListTypes<'a>(pub &'a Value);

impl crate::apply::ListTypes for CrdListTypes<'_> {
    fn list_type(&self, path: &[String]) -> crate::apply::ListType {
        let mut cur = self.0;
        for p in path {
            if cur.get("type").and_then(Value::as_str) == Some("array") {
                match cur.get("items") {
                    Some(i) => cur = i,
                    None => return crate::apply::ListType::Atomic,
                }
            }
            let next = cur
                .pointer(&format!(
                    "/properties/{}",
                    p.replace('~', "~0").replace('/', "~1")
                ))
                .or_else(|| cur.get("additionalProperties").filter(|a| a.is_object()));
            match next {
                Some(n) => cur = n,
                None => return crate::apply::ListType::Atomic,
            }
        }
        list_type_of(cur).unwrap_or(crate::apply::ListType::Atomic)
    }
}

// ---------------------------------------------------------------------------------------------
// CustomResourceDefinition schemas

/// What `additionalProperties` says.
#[derive(Debug, Clone)]
enum Additional {
    /// Absent.
    Unset,
    /// `true` (keep anything) or `false`.
    Bool(bool),
    /// Every value has this schema.
    Schema(Box<Node>),
}

/// One compiled node of a structural schema.
#[derive(Debug, Clone)]
struct Node {
    ty: Option<String>,
    nullable: bool,
    properties: BTreeMap<String, Node>,
    additional: Additional,
    items: Option<Box<Node>>,
    required: Vec<String>,
    enumeration: Vec<Value>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
    multiple_of: Option<f64>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<(String, regex::Regex)>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    min_properties: Option<u64>,
    max_properties: Option<u64>,
    format: Option<String>,
    int_or_string: bool,
    preserve_unknown: bool,
    embedded_resource: bool,
    list_type: Option<String>,
    list_map_keys: Vec<String>,
    default: Option<Value>,
}

/// Where a node sits, for the structural "type must not be empty" message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Level {
    Root,
    Field,
    Item,
}

/// One CRD version's `schema.openAPIV3Schema`, compiled: validates, defaults and prunes custom
/// resources as the apiextensions apiserver does.
#[derive(Debug, Clone)]
pub struct CrdSchema {
    root: Node,
}

impl CrdSchema {
    /// Compiles a schema, refusing what the apiserver refuses in a CRD (non-structural
    /// schemas: a node without `type` unless `x-kubernetes-int-or-string` or
    /// `x-kubernetes-preserve-unknown-fields`, a root that is not an object, `$ref`,
    /// `uniqueItems`, `properties` with `additionalProperties`, arrays without `items`, bad
    /// `pattern`s and list types). Error paths are within the schema
    /// (`properties[spec].type`); the caller prefixes
    /// `spec.versions[i].schema.openAPIV3Schema.`.
    pub fn compile(schema: &Value) -> Result<Self, Vec<FieldError>> {
        Self::compile_at(schema, "")
    }

    /// [`CrdSchema::compile`] with error paths below `base`
    /// (`spec.versions[0].schema.openAPIV3Schema`).
    pub fn compile_at(schema: &Value, base: &str) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let root = compile_node(schema, base, Level::Root, &mut errors);
        if errors.is_empty() {
            Ok(Self { root })
        } else {
            Err(errors)
        }
    }

    /// Defaults, prunes and validates a custom resource. Unknown fields (outside
    /// `apiVersion`, `kind`, `metadata` at the root and below
    /// `x-kubernetes-preserve-unknown-fields: true`) are pruned; with `Warn` each is also a
    /// warning, with `Strict` they reject the object (`400`). Value errors are a
    /// [`Rejection::Invalid`] with the apiserver's messages. `metadata` is left to
    /// [`Schemas::check_metadata`].
    pub fn check(&self, obj: &mut Value, mode: FieldValidation) -> Result<Vec<String>, Rejection> {
        let mut v = CrValidator {
            unknown: Vec::new(),
            errors: Vec::new(),
        };
        v.value(&self.root, obj, "", true);
        conclude(&v.unknown, v.errors, mode)
    }
}

/// The outcome of a decode, as the apiserver orders it: unknown fields fail a `Strict`
/// request (400) before field errors (422); otherwise they are warnings under `Warn`.
fn conclude(
    unknown: &[String],
    invalid: Vec<FieldError>,
    mode: FieldValidation,
) -> Result<Vec<String>, Rejection> {
    let warnings: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    if mode == FieldValidation::Strict && !warnings.is_empty() {
        return Err(Rejection::Decode(format!(
            "strict decoding error: {}",
            warnings.join(", ")
        )));
    }
    if !invalid.is_empty() {
        return Err(Rejection::Invalid(invalid));
    }
    Ok(match mode {
        FieldValidation::Warn => warnings,
        _ => Vec::new(),
    })
}

fn child_path(base: &str, child: &str) -> String {
    join(base, child)
}

fn compile_node(s: &Value, path: &str, level: Level, errors: &mut Vec<FieldError>) -> Node {
    let get_bool = |k: &str| s.get(k).and_then(Value::as_bool).unwrap_or(false);
    let get_u64 = |k: &str| s.get(k).and_then(Value::as_u64);
    let get_f64 = |k: &str| s.get(k).and_then(Value::as_f64);
    let Some(obj) = s.as_object() else {
        errors.push(FieldError::invalid(
            path.to_owned(),
            s.clone(),
            "must be a schema object",
        ));
        return empty_node();
    };
    if obj.contains_key("$ref") {
        errors.push(FieldError::forbidden(
            child_path(path, "$ref"),
            "$ref is not supported",
        ));
    }
    let int_or_string = get_bool("x-kubernetes-int-or-string");
    let preserve_unknown = get_bool("x-kubernetes-preserve-unknown-fields");
    let embedded_resource = get_bool("x-kubernetes-embedded-resource");
    let ty = s.get("type").and_then(Value::as_str).map(str::to_owned);
    match ty.as_deref() {
        None | Some("") if !int_or_string && !preserve_unknown && !embedded_resource => {
            let why = match level {
                Level::Root => "must not be empty at the root",
                Level::Field => "must not be empty for specified object fields",
                Level::Item => "must not be empty for specified array items",
            };
            errors.push(FieldError::required_because(child_path(path, "type"), why));
        }
        None | Some("") => {}
        Some("array" | "boolean" | "integer" | "number" | "object" | "string") => {}
        Some(other) => errors.push(FieldError::not_supported(
            child_path(path, "type"),
            json!(other),
            &["array", "boolean", "integer", "number", "object", "string"],
        )),
    }
    if level == Level::Root && ty.as_deref().is_some_and(|t| t != "object") {
        errors.push(FieldError::invalid(
            child_path(path, "type"),
            json!(ty),
            "must be object at the root",
        ));
    }
    if int_or_string && ty.is_some() {
        errors.push(FieldError::invalid(
            child_path(path, "type"),
            json!(ty),
            "must be empty if x-kubernetes-int-or-string is true",
        ));
    }
    if get_bool("uniqueItems") {
        errors.push(FieldError::forbidden(
            child_path(path, "uniqueItems"),
            "uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
        ));
    }
    let mut properties = BTreeMap::new();
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, p) in props {
            let node = compile_node(
                p,
                &format!("{}[{k}]", child_path(path, "properties")),
                Level::Field,
                errors,
            );
            properties.insert(k.clone(), node);
        }
    }
    let additional = match s.get("additionalProperties") {
        None => Additional::Unset,
        Some(Value::Bool(b)) => Additional::Bool(*b),
        Some(ap) => Additional::Schema(Box::new(compile_node(
            ap,
            &child_path(path, "additionalProperties"),
            Level::Field,
            errors,
        ))),
    };
    if !properties.is_empty() && !matches!(additional, Additional::Unset | Additional::Bool(false))
    {
        errors.push(FieldError::forbidden(
            child_path(path, "additionalProperties"),
            "additionalProperties and properties are mutual exclusive",
        ));
    }
    let items = match s.get("items") {
        Some(Value::Array(_)) => {
            errors.push(FieldError::forbidden(
                child_path(path, "items"),
                "items must be a schema object and not an array",
            ));
            None
        }
        Some(it) => Some(Box::new(compile_node(
            it,
            &child_path(path, "items"),
            Level::Item,
            errors,
        ))),
        None => None,
    };
    if ty.as_deref() == Some("array") && items.is_none() {
        errors.push(FieldError::required_because(
            child_path(path, "items"),
            "must be specified",
        ));
    }
    let pattern = match s.get("pattern").and_then(Value::as_str) {
        Some(p) => match regex::Regex::new(p) {
            Ok(re) => Some((p.to_owned(), re)),
            Err(e) => {
                errors.push(FieldError::invalid(
                    child_path(path, "pattern"),
                    json!(p),
                    format!("must be a valid regular expression, but isn't: {e}"),
                ));
                None
            }
        },
        None => None,
    };
    let list_type = s
        .get("x-kubernetes-list-type")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let list_map_keys: Vec<String> = s
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    match list_type.as_deref() {
        None | Some("atomic") => {}
        Some("set") => {
            if let Some(it) = items.as_deref()
                && matches!(it.ty.as_deref(), Some("object" | "array"))
            {
                errors.push(FieldError::invalid(
                    child_path(path, "items.type"),
                    json!(it.ty),
                    "must be a scalar type if parent array type is set",
                ));
            }
        }
        Some("map") => {
            if list_map_keys.is_empty() {
                errors.push(FieldError::required_because(
                    child_path(path, "x-kubernetes-list-map-keys"),
                    "must not be empty if x-kubernetes-list-type is map",
                ));
            }
            if let Some(it) = items.as_deref()
                && it.ty.as_deref() != Some("object")
            {
                errors.push(FieldError::invalid(
                    child_path(path, "items.type"),
                    json!(it.ty),
                    "must be object if parent array's x-kubernetes-list-type is map",
                ));
            }
        }
        Some(other) => errors.push(FieldError::not_supported(
            child_path(path, "x-kubernetes-list-type"),
            json!(other),
            &["atomic", "map", "set"],
        )),
    }
    let required: Vec<String> = s
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    Node {
        ty,
        nullable: get_bool("nullable"),
        properties,
        additional,
        items,
        required,
        enumeration: s
            .get("enum")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        minimum: get_f64("minimum"),
        maximum: get_f64("maximum"),
        exclusive_minimum: get_bool("exclusiveMinimum"),
        exclusive_maximum: get_bool("exclusiveMaximum"),
        multiple_of: get_f64("multipleOf"),
        min_length: get_u64("minLength"),
        max_length: get_u64("maxLength"),
        pattern,
        min_items: get_u64("minItems"),
        max_items: get_u64("maxItems"),
        min_properties: get_u64("minProperties"),
        max_properties: get_u64("maxProperties"),
        format: s.get("format").and_then(Value::as_str).map(str::to_owned),
        int_or_string,
        preserve_unknown,
        embedded_resource,
        list_type,
        list_map_keys,
        default: s.get("default").cloned(),
    }
}

fn empty_node() -> Node {
    Node {
        ty: None,
        nullable: false,
        properties: BTreeMap::new(),
        additional: Additional::Unset,
        items: None,
        required: Vec::new(),
        enumeration: Vec::new(),
        minimum: None,
        maximum: None,
        exclusive_minimum: false,
        exclusive_maximum: false,
        multiple_of: None,
        min_length: None,
        max_length: None,
        pattern: None,
        min_items: None,
        max_items: None,
        min_properties: None,
        max_properties: None,
        format: None,
        int_or_string: false,
        preserve_unknown: true,
        embedded_resource: false,
        list_type: None,
        list_map_keys: Vec::new(),
        default: None,
    }
}

/// The JSON type name the OpenAPI validator reports.
fn openapi_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if is_integer(n) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_integer(n: &serde_json::Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
}

/// A number as Go's `%v` prints a float64 bound.
fn show_number(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

struct CrValidator {
    unknown: Vec<String>,
    errors: Vec<FieldError>,
}

impl CrValidator {
    fn invalid(&mut self, path: &str, value: &Value, why: String) {
        self.errors
            .push(FieldError::invalid(path.to_owned(), value.clone(), why));
    }

    /// Defaults, prunes and validates `v` (not null) against `node`.
    fn value(&mut self, node: &Node, v: &mut Value, path: &str, root: bool) {
        let actual = openapi_type(v);
        if node.int_or_string {
            if !matches!(actual, "integer" | "string") {
                self.errors.push(FieldError::type_invalid(
                    path,
                    json!(actual),
                    format!("{path} in body must be of type integer,string: {actual:?}"),
                ));
                return;
            }
        } else if let Some(ty) = node.ty.as_deref() {
            let ok = ty == actual || (ty == "number" && actual == "integer");
            if !ok {
                self.errors.push(FieldError::type_invalid(
                    path,
                    json!(actual),
                    format!("{path} in body must be of type {ty}: {actual:?}"),
                ));
                return;
            }
        }
        match v {
            Value::Object(m) => self.object(node, m, path, root),
            Value::Array(items) => self.array(node, items, path),
            Value::String(s) => self.string(node, s, path),
            Value::Number(n) => self.number(node, n, path),
            _ => {}
        }
        if !node.enumeration.is_empty() && !node.enumeration.contains(v) {
            let allowed: Vec<String> = node
                .enumeration
                .iter()
                .map(|e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            self.errors.push(FieldError {
                field: path.to_owned(),
                kind: crate::field_error::FieldErrorKind::NotSupported(allowed),
                value: Some(v.clone()),
            });
        }
    }

    fn object(&mut self, node: &Node, m: &mut Map<String, Value>, path: &str, root: bool) {
        // Defaulting first (also for nulls of non-nullable fields), as the apiserver does.
        for (k, p) in &node.properties {
            if let Some(d) = &p.default {
                let missing = match m.get(k) {
                    None => true,
                    Some(Value::Null) => !p.nullable,
                    Some(_) => false,
                };
                if missing {
                    m.insert(k.clone(), d.clone());
                }
            }
        }
        let keys: Vec<String> = m.keys().cloned().collect();
        for k in keys {
            let child = join(path, &k);
            let keep_meta = (root || node.embedded_resource)
                && matches!(k.as_str(), "apiVersion" | "kind" | "metadata");
            let schema = node.properties.get(&k).or(match &node.additional {
                Additional::Schema(s) => Some(s.as_ref()),
                _ => None,
            });
            match schema {
                Some(s) if !(keep_meta && k == "metadata") => {
                    if m.get(&k).is_some_and(Value::is_null) {
                        if !s.nullable {
                            m.remove(&k);
                        }
                    } else if let Some(item) = m.get_mut(&k) {
                        self.value(s, item, &child, false);
                    }
                }
                Some(_) => {}
                None if keep_meta
                    || node.preserve_unknown
                    || matches!(node.additional, Additional::Bool(true)) => {}
                None => {
                    self.unknown.push(child);
                    m.remove(&k);
                }
            }
        }
        for r in &node.required {
            if !m.contains_key(r) {
                self.errors.push(FieldError::required(join(path, r)));
            }
        }
        let count = m.len() as u64;
        if let Some(max) = node.max_properties
            && count > max
        {
            self.errors.push(FieldError::too_many(
                path,
                usize::try_from(max).unwrap_or(usize::MAX),
            ));
        }
        if let Some(min) = node.min_properties
            && count < min
        {
            let v = Value::Object(m.clone());
            self.invalid(
                path,
                &v,
                format!("{path} in body should have at least {min} properties"),
            );
        }
    }

    fn array(&mut self, node: &Node, items: &mut [Value], path: &str) {
        if let Some(it) = node.items.as_deref() {
            for (i, item) in items.iter_mut().enumerate() {
                let p = format!("{path}[{i}]");
                if item.is_null() {
                    if !it.nullable {
                        self.errors.push(FieldError::type_invalid(
                            &p,
                            json!("null"),
                            format!(
                                "{p} in body must be of type {}: \"null\"",
                                it.ty.as_deref().unwrap_or("object")
                            ),
                        ));
                    }
                } else {
                    self.value(it, item, &p, false);
                }
            }
        }
        let count = items.len() as u64;
        if let Some(max) = node.max_items
            && count > max
        {
            self.errors.push(FieldError::too_many(
                path,
                usize::try_from(max).unwrap_or(usize::MAX),
            ));
        }
        if let Some(min) = node.min_items
            && count < min
        {
            self.invalid(
                path,
                &Value::Array(items.to_vec()),
                format!("{path} in body should have at least {min} items"),
            );
        }
        match node.list_type.as_deref() {
            Some("set") => {
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        self.errors
                            .push(FieldError::duplicate(format!("{path}[{i}]"), item.clone()));
                    }
                }
            }
            Some("map") => {
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Map<String, Value> = node
                        .list_map_keys
                        .iter()
                        .filter_map(|k| item.get(k).map(|v| (k.clone(), v.clone())))
                        .collect();
                    let key = Value::Object(key);
                    if !seen.insert(key.to_string()) {
                        self.errors
                            .push(FieldError::duplicate(format!("{path}[{i}]"), key));
                    }
                }
            }
            _ => {}
        }
    }

    fn string(&mut self, node: &Node, s: &str, path: &str) {
        let v = json!(s);
        let chars = s.chars().count() as u64;
        if let Some(max) = node.max_length
            && chars > max
        {
            self.errors.push(FieldError::too_long(
                path,
                usize::try_from(max).unwrap_or(usize::MAX),
            ));
        }
        if let Some(min) = node.min_length
            && chars < min
        {
            self.invalid(
                path,
                &v,
                format!("{path} in body should be at least {min} chars long"),
            );
        }
        if let Some((p, re)) = &node.pattern
            && !re.is_match(s)
        {
            self.invalid(path, &v, format!("{path} in body should match '{p}'"));
        }
        if let Some(f) = node.format.as_deref()
            && !string_format_ok(f, s)
        {
            self.invalid(
                path,
                &v,
                format!("{path} in body must be of type {f}: {s:?}"),
            );
        }
    }

    fn number(&mut self, node: &Node, n: &serde_json::Number, path: &str) {
        let v = Value::Number(n.clone());
        let Some(f) = n.as_f64() else {
            return;
        };
        match node.format.as_deref() {
            Some("int32") if n.as_i64().is_none_or(|i| i32::try_from(i).is_err()) => {
                self.invalid(
                    path,
                    &v,
                    format!("{path} in body must be of type int32: \"{n}\""),
                );
            }
            Some("int64") if n.as_i64().is_none() && is_integer(n) => {
                self.invalid(
                    path,
                    &v,
                    format!("{path} in body must be of type int64: \"{n}\""),
                );
            }
            _ => {}
        }
        if let Some(max) = node.maximum {
            if node.exclusive_maximum && f >= max {
                self.invalid(
                    path,
                    &v,
                    format!("{path} in body should be less than {}", show_number(max)),
                );
            } else if f > max {
                self.invalid(
                    path,
                    &v,
                    format!(
                        "{path} in body should be less than or equal to {}",
                        show_number(max)
                    ),
                );
            }
        }
        if let Some(min) = node.minimum {
            if node.exclusive_minimum && f <= min {
                self.invalid(
                    path,
                    &v,
                    format!("{path} in body should be greater than {}", show_number(min)),
                );
            } else if f < min {
                self.invalid(
                    path,
                    &v,
                    format!(
                        "{path} in body should be greater than or equal to {}",
                        show_number(min)
                    ),
                );
            }
        }
        if let Some(m) = node.multiple_of
            && m != 0.0
            && (f / m).fract() != 0.0
        {
            self.invalid(
                path,
                &v,
                format!("{path} in body should be a multiple of {}", show_number(m)),
            );
        }
    }
}

/// The string formats the apiserver checks (unknown formats are accepted, as there).
fn string_format_ok(format: &str, s: &str) -> bool {
    use time::format_description::well_known::Rfc3339;
    match format {
        "date-time" | "datetime" => time::OffsetDateTime::parse(s, &Rfc3339).is_ok(),
        "date" => go_time_parse(RFC3339, &format!("{s}T00:00:00Z")).is_ok() && s.len() == 10,
        "byte" => go_base64(s).is_ok(),
        "uuid" => {
            let b = s.as_bytes();
            b.len() == 36
                && b.iter().enumerate().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => *c == b'-',
                    _ => c.is_ascii_hexdigit(),
                })
        }
        "ipv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
        "cidr" => s.split_once('/').is_some_and(|(ip, bits)| {
            ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok()
        }),
        "hostname" => {
            !s.is_empty()
                && s.len() <= 253
                && s.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                })
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas() -> Arc<Schemas> {
        Schemas::shared().unwrap()
    }

    fn check(
        kind: (&str, &str, &str),
        obj: &mut Value,
        mode: FieldValidation,
    ) -> Result<Vec<String>, Rejection> {
        schemas().check(kind.0, kind.1, kind.2, obj, mode)
    }

    const SERVICE: (&str, &str, &str) = ("", "v1", "Service");
    const POD: (&str, &str, &str) = ("", "v1", "Pod");

    #[test]
    fn field_validation_parses_like_the_apiserver() {
        assert_eq!(FieldValidation::parse(None), Ok(FieldValidation::Warn));
        assert_eq!(FieldValidation::parse(Some("")), Ok(FieldValidation::Warn));
        assert_eq!(
            FieldValidation::parse(Some("Strict")),
            Ok(FieldValidation::Strict)
        );
        assert_eq!(
            FieldValidation::parse(Some("Ignore")),
            Ok(FieldValidation::Ignore)
        );
        let e = FieldValidation::parse(Some("strict")).unwrap_err();
        assert_eq!(
            e.message(),
            "fieldValidation: Unsupported value: \"strict\": supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
        );
    }

    #[test]
    fn discovery_finds_the_official_schemas() {
        let path = Schemas::discover().unwrap();
        assert!(
            path.ends_with("v1.32.0-local/_definitions.json"),
            "{}",
            path.display()
        );
        let s = schemas();
        assert!(s.knows("", "v1", "Service"));
        assert!(s.knows("apps", "v1", "Deployment"));
        assert!(!s.knows("cilium.io", "v2", "CiliumNetworkPolicy"));
        assert_eq!(s.kind_def("", "v1", "Pod"), Some("io.k8s.api.core.v1.Pod"));
    }

    #[test]
    fn wrong_types_are_decode_errors_worded_like_go() {
        let mut svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"ports": [{"port": "abc"}]}});
        let e = check(SERVICE, &mut svc, FieldValidation::Strict).unwrap_err();
        assert_eq!(
            e,
            Rejection::Decode("json: cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int32".into())
        );
        assert_eq!(e.code(), 400);
        assert_eq!(
            e.message("Service", "v1", "s"),
            "Service in version \"v1\" cannot be handled as a Service: json: cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int32"
        );

        let mut svc = json!({"spec": {"ports": [{"port": 99999999999_i64}]}});
        assert_eq!(
            check(SERVICE, &mut svc, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("json: cannot unmarshal number 99999999999 into Go struct field ServicePort.spec.ports.port of type int32".into())
        );
        let mut svc = json!({"spec": {"ports": {"port": 80}}});
        assert_eq!(
            check(SERVICE, &mut svc, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("json: cannot unmarshal object into Go struct field ServiceSpec.spec.ports of type []v1.ServicePort".into())
        );
        let mut svc = json!({"metadata": {"labels": {"a": 1}}});
        assert_eq!(
            check(SERVICE, &mut svc, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("json: cannot unmarshal number into Go struct field ObjectMeta.metadata.labels of type string".into())
        );
        let mut svc = json!({"spec": {"ports": [{"port": 80, "targetPort": true}]}});
        assert_eq!(
            check(SERVICE, &mut svc, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("json: cannot unmarshal bool into Go struct field ServicePort.spec.ports.targetPort of type int32".into())
        );
        let mut secret = json!({"data": {"k": "not base64!"}});
        assert_eq!(
            check(("", "v1", "Secret"), &mut secret, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("illegal base64 data at input byte 3".into())
        );
        let mut cm = json!({"metadata": {"creationTimestamp": "2024-13-01T00:00:00Z"}});
        assert_eq!(
            check(("", "v1", "ConfigMap"), &mut cm, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("parsing time \"2024-13-01T00:00:00Z\": month out of range".into())
        );
        let mut cm = json!({"metadata": {"creationTimestamp": "yesterday"}});
        assert_eq!(
            check(("", "v1", "ConfigMap"), &mut cm, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("parsing time \"yesterday\" as \"2006-01-02T15:04:05Z07:00\": cannot parse \"yesterday\" as \"2006\"".into())
        );
        let mut pod = json!({"spec": {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1iK"}}}]}});
        assert_eq!(
            check(POD, &mut pod, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("unable to parse quantity's suffix".into())
        );
        let mut pod = json!({"spec": {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1x"}}}]}});
        assert_eq!(
            check(POD, &mut pod, FieldValidation::Warn).unwrap_err(),
            Rejection::Decode("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'".into())
        );
    }

    #[test]
    fn valid_objects_pass_and_nulls_are_dropped() {
        let mut svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "labels": {"app": "a"}, "annotations": null, "creationTimestamp": "2024-01-02T03:04:05Z"},
            "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}], "selector": {"app": "a"}, "clusterIP": null}});
        assert_eq!(
            check(SERVICE, &mut svc, FieldValidation::Strict),
            Ok(vec![])
        );
        assert!(svc["metadata"].get("annotations").is_none());
        assert!(svc["spec"].get("clusterIP").is_none());
        assert_eq!(svc["metadata"]["labels"], json!({"app": "a"}));

        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "x", "resources": {"limits": {"cpu": "500m", "memory": 1073741824}},
            "ports": [{"containerPort": 80}], "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]}});
        assert_eq!(check(POD, &mut pod, FieldValidation::Strict), Ok(vec![]));
        let mut secret =
            json!({"data": {"k": "aGVsbG8=", "e": ""}, "stringData": {"x": "y"}, "type": "Opaque"});
        assert_eq!(
            check(("", "v1", "Secret"), &mut secret, FieldValidation::Strict),
            Ok(vec![])
        );
        // A CRD object decodes strictly (JSONSchemaProps down the schema tree).
        let mut crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "ps.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced", "names": {"kind": "P", "plural": "ps"},
                "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object",
                        "x-kubernetes-preserve-unknown-fields": true, "properties": {"n": {"type": "integer", "default": 1, "enum": [1, 2]}}}}}}}]}});
        assert_eq!(
            check(
                ("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
                &mut crd.clone(),
                FieldValidation::Strict
            ),
            Ok(vec![])
        );
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["typo"] =
            json!(1);
        assert_eq!(
            check(
                ("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
                &mut crd,
                FieldValidation::Warn
            ),
            Ok(vec![
                "unknown field \"spec.versions[0].schema.openAPIV3Schema.properties.spec.typo\""
                    .to_owned()
            ])
        );
        // A kind without a definition passes untouched.
        let mut cr = json!({"spec": {"anything": 1}});
        assert_eq!(
            schemas().check(
                "cilium.io",
                "v2",
                "CiliumNetworkPolicy",
                &mut cr,
                FieldValidation::Strict
            ),
            Ok(vec![])
        );
        assert_eq!(cr, json!({"spec": {"anything": 1}}));
    }

    #[test]
    fn unknown_fields_per_field_validation() {
        let svc = json!({"metadata": {"name": "s", "bogus": 1},
            "spec": {"foo": 1, "ports": [{"port": 80, "bar": "x"}]}});

        let e = check(SERVICE, &mut svc.clone(), FieldValidation::Strict).unwrap_err();
        assert_eq!(
            e,
            Rejection::Decode("strict decoding error: unknown field \"metadata.bogus\", unknown field \"spec.foo\", unknown field \"spec.ports[0].bar\"".into())
        );

        let mut warned = svc.clone();
        let w = check(SERVICE, &mut warned, FieldValidation::Warn).unwrap();
        assert_eq!(
            w,
            [
                "unknown field \"metadata.bogus\"",
                "unknown field \"spec.foo\"",
                "unknown field \"spec.ports[0].bar\""
            ]
        );
        assert_eq!(
            warned,
            json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
        );

        let mut ignored = svc;
        assert_eq!(
            check(SERVICE, &mut ignored, FieldValidation::Ignore),
            Ok(vec![])
        );
        assert_eq!(ignored, warned);

        // Case matters, as in sigs.k8s.io/json.
        let mut pod = json!({"spec": {"Containers": [], "containers": [{"name": "a"}]}});
        assert_eq!(
            check(POD, &mut pod, FieldValidation::Strict).unwrap_err(),
            Rejection::Decode("strict decoding error: unknown field \"spec.Containers\"".into())
        );
        // Metadata of custom resources goes through ObjectMeta.
        let mut meta = json!({"name": "x", "labelz": {}});
        assert_eq!(
            schemas().check_metadata(&mut meta, FieldValidation::Warn),
            Ok(vec!["unknown field \"metadata.labelz\"".to_owned()])
        );
    }

    #[test]
    fn required_fields_are_field_errors() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {}});
        let e = check(POD, &mut pod, FieldValidation::Strict).unwrap_err();
        assert_eq!(
            e,
            Rejection::Invalid(vec![FieldError::required("spec.containers")])
        );
        assert_eq!(e.code(), 422);
        assert_eq!(
            e.message("Pod", "v1", "p"),
            "Pod \"p\" is invalid: spec.containers: Required value"
        );

        // Every error is reported, with item paths; a null required field is missing.
        let mut pod = json!({"spec": {"containers": [{"image": "x"}, {"name": "b", "ports": [{"name": "p"}], "env": [{"value": "v"}]}], "volumes": [{"name": null}]}});
        let Err(Rejection::Invalid(errs)) = check(POD, &mut pod, FieldValidation::Strict) else {
            panic!("expected field errors");
        };
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[0].name",
                "spec.containers[1].env[0].name",
                "spec.containers[1].ports[0].containerPort",
                "spec.volumes[0].name"
            ]
        );
    }

    #[test]
    fn enums_are_not_supported_errors() {
        // The official 1.32 JSON schemas carry no field enums (only apiVersion/kind), so this
        // test adds the apiserver's Service types to the real ServiceSpec to exercise the check.
        let mut s = Schemas::load(&Schemas::discover().unwrap()).unwrap();
        let spec = s.defs.get_mut("io.k8s.api.core.v1.ServiceSpec").unwrap();
        spec["properties"]["type"]["enum"] =
            json!(["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]);
        let mut svc = json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "Foo"}});
        let e = s
            .check("", "v1", "Service", &mut svc, FieldValidation::Strict)
            .unwrap_err();
        assert_eq!(
            e.message("Service", "v1", "s"),
            "Service \"s\" is invalid: spec.type: Unsupported value: \"Foo\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
        );
        let mut svc = json!({"spec": {"type": "NodePort"}});
        assert_eq!(
            s.check("", "v1", "Service", &mut svc, FieldValidation::Strict),
            Ok(vec![])
        );
        // The root kind enum is not a field error (the URL decides the kind).
        let mut svc = json!({"kind": "Pod"});
        assert_eq!(
            s.check("", "v1", "Service", &mut svc, FieldValidation::Strict),
            Ok(vec![])
        );
    }

    #[test]
    fn crd_schemas_must_be_structural() {
        let bad = json!({"type": "object", "properties": {
            "spec": {"properties": {"replicas": {"type": "integer"}}},
            "list": {"type": "array"},
            "ref": {"$ref": "#/definitions/x", "type": "string"},
            "u": {"type": "array", "items": {"type": "string"}, "uniqueItems": true},
            "p": {"type": "string", "pattern": "("},
            "free": {"x-kubernetes-preserve-unknown-fields": true},
            "ios": {"x-kubernetes-int-or-string": true}
        }});
        let errs =
            CrdSchema::compile_at(&bad, "spec.versions[0].schema.openAPIV3Schema").unwrap_err();
        let msgs: Vec<String> = errs.iter().map(FieldError::message).collect();
        assert!(msgs.contains(&"spec.versions[0].schema.openAPIV3Schema.properties[spec].type: Required value: must not be empty for specified object fields".to_owned()), "{msgs:#?}");
        assert!(msgs.contains(&"spec.versions[0].schema.openAPIV3Schema.properties[list].items: Required value: must be specified".to_owned()), "{msgs:#?}");
        assert!(msgs.contains(&"spec.versions[0].schema.openAPIV3Schema.properties[ref].$ref: Forbidden: $ref is not supported".to_owned()), "{msgs:#?}");
        assert!(
            msgs.iter().any(|m| m.starts_with(
                "spec.versions[0].schema.openAPIV3Schema.properties[u].uniqueItems: Forbidden"
            )),
            "{msgs:#?}"
        );
        assert!(msgs.iter().any(|m| m.starts_with("spec.versions[0].schema.openAPIV3Schema.properties[p].pattern: Invalid value: \"(\": must be a valid regular expression")), "{msgs:#?}");
        assert_eq!(msgs.len(), 5, "{msgs:#?}");

        let errs = CrdSchema::compile(&json!({"type": "string"})).unwrap_err();
        assert_eq!(
            errs[0].message(),
            "type: Invalid value: \"string\": must be object at the root"
        );
        let errs = CrdSchema::compile(&json!({"properties": {}})).unwrap_err();
        assert_eq!(
            errs[0].message(),
            "type: Required value: must not be empty at the root"
        );
    }

    fn policy_schema() -> CrdSchema {
        CrdSchema::compile(&json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["mode"], "properties": {
                "replicas": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
                "mode": {"type": "string", "enum": ["allow", "deny"]},
                "name": {"type": "string", "maxLength": 5, "pattern": "^[a-z]+$"},
                "port": {"x-kubernetes-int-or-string": true},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2, "x-kubernetes-list-type": "set"},
                "rules": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "to": {"type": "string", "nullable": true}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "when": {"type": "string", "format": "date-time"}
            }},
            "status": {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        }}))
        .unwrap()
    }

    #[test]
    fn custom_resources_are_pruned_defaulted_and_validated() {
        let schema = policy_schema();
        let cr = json!({"apiVersion": "cilium.io/v2", "kind": "P", "metadata": {"name": "p", "anything": 1},
            "spec": {"mode": "allow", "x": 1, "raw": {"keep": {"deep": true}}, "labels": {"a": "b"},
                "rules": [{"name": "r", "to": null, "junk": 2}], "port": "http"},
            "extra": true});
        let mut pruned = cr.clone();
        let w = schema.check(&mut pruned, FieldValidation::Warn).unwrap();
        assert_eq!(
            w,
            [
                "unknown field \"extra\"",
                "unknown field \"spec.rules[0].junk\"",
                "unknown field \"spec.x\""
            ]
        );
        assert_eq!(
            pruned,
            json!({"apiVersion": "cilium.io/v2", "kind": "P", "metadata": {"name": "p", "anything": 1},
                "spec": {"mode": "allow", "replicas": 1, "raw": {"keep": {"deep": true}}, "labels": {"a": "b"},
                    "rules": [{"name": "r", "to": null}], "port": "http"}})
        );
        let mut ignored = cr.clone();
        assert_eq!(
            schema.check(&mut ignored, FieldValidation::Ignore),
            Ok(vec![])
        );
        assert_eq!(ignored, pruned);
        assert_eq!(
            schema.check(&mut cr.clone(), FieldValidation::Strict),
            Err(Rejection::Decode("strict decoding error: unknown field \"extra\", unknown field \"spec.rules[0].junk\", unknown field \"spec.x\"".into()))
        );

        let mut bad = json!({"spec": {"replicas": "x", "mode": "maybe", "name": "TOOLONG", "port": true,
            "tags": ["a", "a", "b"], "rules": [{"name": "r"}, {"name": "r"}, {}], "when": "soon"}});
        let Err(Rejection::Invalid(errs)) = schema.check(&mut bad, FieldValidation::Strict) else {
            panic!("expected field errors");
        };
        let msgs: Vec<String> = errs.iter().map(FieldError::message).collect();
        assert_eq!(
            msgs,
            [
                "spec.mode: Unsupported value: \"maybe\": supported values: \"allow\", \"deny\"",
                "spec.name: Too long: may not be more than 5 bytes",
                "spec.name: Invalid value: \"TOOLONG\": spec.name in body should match '^[a-z]+$'",
                "spec.port: Invalid value: \"boolean\": spec.port in body must be of type integer,string: \"boolean\"",
                "spec.replicas: Invalid value: \"string\": spec.replicas in body must be of type integer: \"string\"",
                "spec.rules[2].name: Required value",
                "spec.rules[1]: Duplicate value: {\"name\":\"r\"}",
                "spec.tags: Too many: must have at most 2 items",
                "spec.tags[1]: Duplicate value: \"a\"",
                "spec.when: Invalid value: \"soon\": spec.when in body must be of type date-time: \"soon\"",
            ]
        );
        assert_eq!(errs[4].reason(), "FieldValueTypeInvalid");

        let mut range = json!({"spec": {"mode": "deny", "replicas": 11}});
        assert_eq!(
            schema
                .check(&mut range, FieldValidation::Strict)
                .unwrap_err(),
            Rejection::Invalid(vec![FieldError::invalid(
                "spec.replicas",
                json!(11),
                "spec.replicas in body should be less than or equal to 10"
            )])
        );
        let mut missing = json!({"spec": {}});
        assert_eq!(
            schema
                .check(&mut missing, FieldValidation::Strict)
                .unwrap_err(),
            Rejection::Invalid(vec![FieldError::required("spec.mode")])
        );
    }

    #[test]
    fn go_time_and_base64_edge_cases() {
        assert!(go_time_parse(RFC3339, "2024-02-29T23:59:59.123+02:00").is_ok());
        assert_eq!(
            go_time_parse(RFC3339, "2023-02-29T00:00:00Z").unwrap_err(),
            "parsing time \"2023-02-29T00:00:00Z\": day out of range"
        );
        assert_eq!(
            go_time_parse(RFC3339, "2024-01-01 00:00:00Z").unwrap_err(),
            "parsing time \"2024-01-01 00:00:00Z\" as \"2006-01-02T15:04:05Z07:00\": cannot parse \" 00:00:00Z\" as \"T\""
        );
        assert_eq!(
            go_time_parse(RFC3339, "2024-01-01T00:00:00Zjunk").unwrap_err(),
            "parsing time \"2024-01-01T00:00:00Zjunk\": extra text: \"junk\""
        );
        assert!(go_time_parse(RFC3339_MICRO, "2024-01-01T00:00:00.000001Z").is_ok());
        assert!(go_time_parse(RFC3339_MICRO, "2024-01-01T00:00:00Z").is_err());
        assert_eq!(go_base64("aGVsbG8="), Ok(()));
        assert_eq!(go_base64("aGVs\nbG8="), Ok(()));
        assert_eq!(go_base64("abc"), Err(0));
        assert_eq!(go_base64("abcd="), Err(4));
        assert_eq!(go_base64("ab=c"), Err(2));
        assert_eq!(parse_quantity("1Gi"), Ok(()));
        assert_eq!(parse_quantity("1e3"), Ok(()));
        assert!(parse_quantity("").is_err());
        assert!(parse_quantity("abc").is_err());
    }
}

#[cfg(test)]
mod nested_prune_tests {
    use super::*;

    #[test]
    fn unknown_fields_below_the_root_are_pruned_and_reported() {
        let s = CrdSchema::compile(&json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}}}))
        .expect("compiles");
        let mut obj = json!({"apiVersion": "x.io/v1", "kind": "Thing", "metadata": {"name": "t"},
            "spec": {"size": 2, "extra": "d"}, "toplevel": 1});
        let w = s.check(&mut obj, FieldValidation::Warn).expect("valid");
        assert_eq!(
            w,
            ["unknown field \"spec.extra\"", "unknown field \"toplevel\""]
        );
        assert_eq!(obj["spec"], json!({"size": 2}));
    }
}
