//! The OpenAPI documents kubectl and the Python client read: the `/openapi/v3` index, one
//! OpenAPI 3.0 document per served group-version (`/openapi/v3/api/v1`,
//! `/openapi/v3/apis/<group>/<version>`) and the Swagger 2.0 document at `/openapi/v2`.
//!
//! Every schema comes from the official 1.32 definitions ([`Schemas`]), converted from their
//! JSON-schema form (`#/$defs/` refs, `["string", "null"]` types) to OpenAPI's; custom
//! resources get their CRD version's `openAPIV3Schema` under `<reversed group>.<version>.<Kind>`
//! (`io.cilium.v2.CiliumNetworkPolicy`). The paths carry the operations the server serves,
//! with `x-kubernetes-action` and `x-kubernetes-group-version-kind` and the query parameters
//! of each verb: kubectl enables server-side field validation when it finds `fieldValidation`
//! among the parameters of a kind's PATCH operation.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::registry::Resource;
use crate::schema::{OBJECT_META, Schemas, ref_name};

const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";
const STATUS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";
const DELETE_OPTIONS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions";
const PATCH: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch";
const INT_OR_STRING: &str = "io.k8s.apimachinery.pkg.util.intstr.IntOrString";
const QUANTITY: &str = "io.k8s.apimachinery.pkg.api.resource.Quantity";

const API_VERSION_DOC: &str = "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources";
const KIND_DOC: &str = "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";
const METADATA_DOC: &str = "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";
const LIST_METADATA_DOC: &str = "Standard list metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds";

/// Which document is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// OpenAPI 3.0, refs to `#/components/schemas/`.
    V3,
    /// Swagger 2.0, refs to `#/definitions/`.
    V2,
}

impl Flavor {
    fn reference(self, name: &str) -> String {
        match self {
            Self::V3 => format!("#/components/schemas/{name}"),
            Self::V2 => format!("#/definitions/{name}"),
        }
    }
}

/// `api/v1` or `apis/<group>/<version>`: a group-version's path below `/openapi/v3/`.
pub fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The inverse of [`gv_path`].
fn parse_gv_path(path: &str) -> Option<(&str, &str)> {
    let path = path.trim_matches('/');
    if let Some(v) = path.strip_prefix("api/") {
        return (!v.is_empty() && !v.contains('/')).then_some(("", v));
    }
    let (group, version) = path.strip_prefix("apis/")?.split_once('/')?;
    (!group.is_empty() && !version.is_empty() && !version.contains('/')).then_some((group, version))
}

/// `/openapi/v3`: every served group-version with the URL of its document; the `hash` query
/// parameter is the SHA-512 of the document, so it changes whenever the document does.
pub fn v3_index(schemas: &Schemas, resources: &[Resource], crds: &[Value]) -> Value {
    let gvs: BTreeSet<(&str, &str)> = resources
        .iter()
        .map(|r| (r.gvr.group.as_str(), r.gvr.version.as_str()))
        .collect();
    let mut paths = Map::new();
    for (group, version) in gvs {
        let path = gv_path(group, version);
        let Some(doc) = v3_group_version(schemas, resources, crds, &path) else {
            continue;
        };
        let url = format!("/openapi/v3/{path}?hash={}", content_hash(&doc));
        paths.insert(path, json!({ "serverRelativeURL": url }));
    }
    json!({ "paths": paths })
}

/// The upper-case hex SHA-512 of a document's JSON.
fn content_hash(doc: &Value) -> String {
    let bytes = serde_json::to_vec(doc).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA512, &bytes);
    digest.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}

/// `/openapi/v3/<path>`: the OpenAPI 3.0 document of one group-version (`api/v1`,
/// `apis/apps/v1`), or `None` if no resource is served there.
pub fn v3_group_version(
    schemas: &Schemas,
    resources: &[Resource],
    crds: &[Value],
    path: &str,
) -> Option<Value> {
    let (group, version) = parse_gv_path(path)?;
    let served: Vec<&Resource> = resources
        .iter()
        .filter(|r| r.gvr.group == group && r.gvr.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut doc = Doc::new(schemas, crds, Flavor::V3);
    for r in served {
        doc.resource(r);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": doc.paths,
        "components": {
            "schemas": doc.finish_schemas(),
            "securitySchemes": {"BearerToken": {
                "type": "apiKey",
                "description": "Bearer Token authentication",
                "name": "authorization",
                "in": "header",
            }},
        },
    }))
}

/// `/openapi/v2`: the Swagger 2.0 document of every served resource.
pub fn v2(schemas: &Schemas, resources: &[Resource], crds: &[Value]) -> Value {
    let mut doc = Doc::new(schemas, crds, Flavor::V2);
    for r in resources {
        doc.resource(r);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": doc.paths,
        "definitions": doc.finish_schemas(),
        "securityDefinitions": {"BearerToken": {
            "type": "apiKey",
            "description": "Bearer Token authentication",
            "name": "authorization",
            "in": "header",
        }},
        "security": [{"BearerToken": []}],
    })
}

/// A document being built: its paths, and the schemas they need.
struct Doc<'a> {
    schemas: &'a Schemas,
    crds: &'a [Value],
    flavor: Flavor,
    paths: Map<String, Value>,
    /// Official definitions to include, with everything they reference.
    wanted: BTreeSet<String>,
    /// Schemas made here (custom resources and their lists).
    made: BTreeMap<String, Value>,
}

impl<'a> Doc<'a> {
    fn new(schemas: &'a Schemas, crds: &'a [Value], flavor: Flavor) -> Self {
        Self {
            schemas,
            crds,
            flavor,
            paths: Map::new(),
            wanted: [STATUS, DELETE_OPTIONS, PATCH]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            made: BTreeMap::new(),
        }
    }

    fn reference(&self, name: &str) -> Value {
        json!({ "$ref": self.flavor.reference(name) })
    }

    /// The schema names of a resource's kind and list kind, adding them to the document.
    fn kind_schemas(&mut self, r: &Resource) -> (String, String) {
        let (g, v, kind) = (
            r.gvr.group.as_str(),
            r.gvr.version.as_str(),
            r.kind.as_str(),
        );
        if let Some(def) = self.schemas.kind_def(g, v, kind) {
            let def = def.to_owned();
            let list = self
                .schemas
                .kind_def(g, v, &format!("{kind}List"))
                .map(str::to_owned);
            self.wanted.insert(def.clone());
            if let Some(list) = &list {
                self.wanted.insert(list.clone());
            }
            let list = list.unwrap_or_else(|| format!("{def}List"));
            return (def, list);
        }
        let reversed: Vec<&str> = g.split('.').rev().collect();
        let name = format!("{}.{v}.{kind}", reversed.join("."));
        let list_name = format!("{name}List");
        let schema = crd_schema(self.crds, g, v, kind);
        let mut root = match schema {
            Some(s) => convert_crd(s, self.flavor),
            None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        };
        if let Some(obj) = root.as_object_mut() {
            let props = obj
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut();
            if let Some(props) = props {
                props.insert(
                    "apiVersion".into(),
                    json!({"description": API_VERSION_DOC, "type": "string"}),
                );
                props.insert(
                    "kind".into(),
                    json!({"description": KIND_DOC, "type": "string"}),
                );
                props.insert(
                    "metadata".into(),
                    self.described_ref(OBJECT_META, METADATA_DOC),
                );
            }
            obj.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": g, "kind": kind, "version": v}]),
            );
        }
        let list = json!({
            "description": format!("{kind}List is a list of {kind}"),
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {"description": API_VERSION_DOC, "type": "string"},
                "items": {
                    "description": format!("List of {}. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md", r.gvr.resource),
                    "type": "array",
                    "items": self.reference(&name),
                },
                "kind": {"description": KIND_DOC, "type": "string"},
                "metadata": self.described_ref(LIST_META, LIST_METADATA_DOC),
            },
            "x-kubernetes-group-version-kind": [{"group": g, "kind": format!("{kind}List"), "version": v}],
        });
        self.made.insert(name.clone(), root);
        self.made.insert(list_name.clone(), list);
        self.wanted.insert(OBJECT_META.into());
        self.wanted.insert(LIST_META.into());
        (name, list_name)
    }

    /// A `$ref` with a description beside it, as each flavour allows it.
    fn described_ref(&self, name: &str, description: &str) -> Value {
        match self.flavor {
            Flavor::V3 => json!({"allOf": [self.reference(name)], "description": description}),
            Flavor::V2 => json!({"$ref": self.flavor.reference(name), "description": description}),
        }
    }

    /// The paths of one resource.
    fn resource(&mut self, r: &Resource) {
        let (kind_schema, list_schema) = self.kind_schemas(r);
        let builtin = self.schemas.knows(&r.gvr.group, &r.gvr.version, &r.kind);
        let ops = Ops {
            doc: self,
            r,
            kind_schema: &kind_schema,
            list_schema: &list_schema,
            builtin,
        };
        let base = if r.gvr.group.is_empty() {
            format!("/api/{}", r.gvr.version)
        } else {
            format!("/apis/{}/{}", r.gvr.group, r.gvr.version)
        };
        let plural = &r.gvr.resource;
        let (collection, scope) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{plural}"),
                "Namespaced",
            )
        } else {
            (format!("{base}/{plural}"), "")
        };
        let mut entries: Vec<(String, Value)> = Vec::new();
        entries.push((
            collection.clone(),
            ops.path_item(
                &[false, r.namespaced],
                &[
                    ("get", ops.op("list", scope, "", "list")),
                    ("post", ops.op("create", scope, "", "post")),
                    (
                        "delete",
                        ops.op("delete", scope, "Collection", "deletecollection"),
                    ),
                ],
            ),
        ));
        let item = format!("{collection}/{{name}}");
        entries.push((
            item.clone(),
            ops.path_item(
                &[true, r.namespaced],
                &[
                    ("get", ops.op("read", scope, "", "get")),
                    ("put", ops.op("replace", scope, "", "put")),
                    ("patch", ops.op("patch", scope, "", "patch")),
                    ("delete", ops.op("delete", scope, "", "delete")),
                ],
            ),
        ));
        if r.namespaced {
            entries.push((
                format!("{base}/{plural}"),
                ops.path_item(
                    &[false, false],
                    &[("get", ops.op("list", "", "ForAllNamespaces", "list"))],
                ),
            ));
        }
        if r.has_subresource("status") {
            entries.push((
                format!("{item}/status"),
                ops.path_item(
                    &[true, r.namespaced],
                    &[
                        ("get", ops.op("read", scope, "Status", "get")),
                        ("put", ops.op("replace", scope, "Status", "put")),
                        ("patch", ops.op("patch", scope, "Status", "patch")),
                    ],
                ),
            ));
        }
        for (path, item) in entries {
            self.paths.insert(path, item);
        }
    }

    /// The schemas section: the made ones plus every wanted official definition and all that
    /// they reference, converted.
    fn finish_schemas(&mut self) -> Map<String, Value> {
        let mut out = Map::new();
        let mut todo: Vec<String> = self.wanted.iter().cloned().collect();
        for made in self.made.values() {
            collect_refs(made, self.flavor, &mut todo);
        }
        let mut seen: BTreeSet<String> = BTreeSet::new();
        while let Some(name) = todo.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let Some(def) = self.schemas.def(&name) else {
                continue;
            };
            collect_def_refs(def, &mut todo);
            out.insert(name.clone(), convert_def(&name, def, self.flavor));
        }
        for (name, s) in std::mem::take(&mut self.made) {
            out.insert(name, s);
        }
        out
    }
}

/// The `openAPIV3Schema` of `kind` at `version` among the CRD objects.
fn crd_schema<'c>(crds: &'c [Value], group: &str, version: &str, kind: &str) -> Option<&'c Value> {
    crds.iter()
        .filter(|c| {
            c.pointer("/spec/group").and_then(Value::as_str) == Some(group)
                && c.pointer("/spec/names/kind").and_then(Value::as_str) == Some(kind)
        })
        .flat_map(|c| {
            c.pointer("/spec/versions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|v| v.get("name").and_then(Value::as_str) == Some(version))
        .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
}

/// Official definitions referenced (transitively gathered by the caller) from `node`.
fn collect_def_refs(node: &Value, out: &mut Vec<String>) {
    match node {
        Value::Object(m) => {
            if let Some(name) = ref_name(node) {
                out.push(name.to_owned());
            }
            for (k, v) in m {
                if k == "properties" {
                    // Property names (even `$ref` in JSONSchemaProps) are not refs.
                    if let Some(props) = v.as_object() {
                        for p in props.values() {
                            collect_def_refs(p, out);
                        }
                    }
                } else if k != "$ref" {
                    collect_def_refs(v, out);
                }
            }
        }
        Value::Array(a) => {
            for v in a {
                collect_def_refs(v, out);
            }
        }
        _ => {}
    }
}

/// Official definitions referenced from a schema already in the output form.
fn collect_refs(node: &Value, flavor: Flavor, out: &mut Vec<String>) {
    let prefix = flavor.reference("");
    match node {
        Value::Object(m) => {
            if let Some(name) = m
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix(prefix.as_str()))
            {
                out.push(name.to_owned());
            }
            for v in m.values() {
                collect_refs(v, flavor, out);
            }
        }
        Value::Array(a) => {
            for v in a {
                collect_refs(v, flavor, out);
            }
        }
        _ => {}
    }
}

/// One official definition in OpenAPI form.
fn convert_def(name: &str, def: &Value, flavor: Flavor) -> Value {
    let description = def.get("description").cloned();
    let special = match (name, flavor) {
        (INT_OR_STRING, Flavor::V3) => Some(json!({
            "oneOf": [{"type": "integer"}, {"type": "string"}],
            "format": "int-or-string",
        })),
        (INT_OR_STRING, Flavor::V2) => Some(json!({"type": "string", "format": "int-or-string"})),
        (QUANTITY, Flavor::V3) => Some(json!({"oneOf": [{"type": "string"}, {"type": "number"}]})),
        (QUANTITY, Flavor::V2) => Some(json!({"type": "string"})),
        _ => None,
    };
    if let Some(mut s) = special {
        if let (Some(d), Some(m)) = (description, s.as_object_mut()) {
            m.insert("description".into(), d);
        }
        return s;
    }
    let mut out = convert(def, flavor);
    // The JSON-schema form pins apiVersion and kind with enums; the apiserver's spec does not.
    if def.get("x-kubernetes-group-version-kind").is_some()
        && let Some(props) = out.get_mut("properties").and_then(Value::as_object_mut)
    {
        for k in ["apiVersion", "kind"] {
            if let Some(Value::Object(p)) = props.get_mut(k) {
                p.remove("enum");
            }
        }
    }
    out
}

/// A JSON-schema node of the definitions in OpenAPI form.
fn convert(node: &Value, flavor: Flavor) -> Value {
    let Some(m) = node.as_object() else {
        return node.clone();
    };
    if let Some(name) = ref_name(node) {
        let target = flavor.reference(name);
        let rest: Map<String, Value> = m
            .iter()
            .filter(|(k, _)| k.as_str() != "$ref")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if rest.is_empty() {
            return json!({ "$ref": target });
        }
        let mut out = rest;
        match flavor {
            Flavor::V3 => {
                out.insert("allOf".into(), json!([{ "$ref": target }]));
            }
            Flavor::V2 => {
                out.insert("$ref".into(), json!(target));
            }
        }
        return Value::Object(out);
    }
    let mut out = Map::new();
    for (k, v) in m {
        let converted = match k.as_str() {
            "type" => match v {
                Value::Array(ts) => match ts.iter().find(|t| t.as_str() != Some("null")) {
                    Some(t) => t.clone(),
                    None => continue,
                },
                other => other.clone(),
            },
            "properties" => Value::Object(
                v.as_object()
                    .map(|props| {
                        props
                            .iter()
                            .map(|(pk, pv)| (pk.clone(), convert(pv, flavor)))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            "items" | "additionalProperties" if v.is_object() => convert(v, flavor),
            "oneOf" | "anyOf" | "allOf" => match v {
                Value::Array(a) => Value::Array(a.iter().map(|x| convert(x, flavor)).collect()),
                other => other.clone(),
            },
            _ => v.clone(),
        };
        out.insert(k.clone(), converted);
    }
    Value::Object(out)
}

/// A CRD's `openAPIV3Schema` for the document: as is for v3; for v2 without what Swagger 2.0
/// cannot say (`nullable`, `oneOf`, `anyOf`, `allOf`, `not`).
fn convert_crd(schema: &Value, flavor: Flavor) -> Value {
    match flavor {
        Flavor::V3 => schema.clone(),
        Flavor::V2 => strip_v3_only(schema),
    }
}

fn strip_v3_only(node: &Value) -> Value {
    let Some(m) = node.as_object() else {
        return node.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        let converted = match k.as_str() {
            "nullable" | "oneOf" | "anyOf" | "allOf" | "not" => continue,
            "properties" => Value::Object(
                v.as_object()
                    .map(|props| {
                        props
                            .iter()
                            .map(|(pk, pv)| (pk.clone(), strip_v3_only(pv)))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            "items" | "additionalProperties" if v.is_object() => strip_v3_only(v),
            _ => v.clone(),
        };
        out.insert(k.clone(), converted);
    }
    Value::Object(out)
}

/// What an operation says: description, query parameters, request body (media types and
/// schema) and responses (code and schema).
type OpShape = (
    String,
    Vec<&'static Param>,
    Option<(Vec<&'static str>, String)>,
    Vec<(&'static str, String)>,
);

/// The operations of one resource.
struct Ops<'d, 'a> {
    doc: &'d Doc<'a>,
    r: &'d Resource,
    kind_schema: &'d str,
    list_schema: &'d str,
    builtin: bool,
}

/// One query or path parameter: name, description, JSON type.
struct Param {
    name: &'static str,
    description: &'static str,
    ty: &'static str,
}

const fn param(name: &'static str, ty: &'static str, description: &'static str) -> Param {
    Param {
        name,
        description,
        ty,
    }
}

const ALLOW_WATCH_BOOKMARKS: Param = param(
    "allowWatchBookmarks",
    "boolean",
    "allowWatchBookmarks requests watch events with type \"BOOKMARK\". Servers that do not implement bookmarks may ignore this flag and bookmarks are sent at the server's discretion. Clients should not assume bookmarks are returned at any specific interval, nor may they assume the server will send any BOOKMARK event during a session. If this is not a watch, this field is ignored.",
);
const CONTINUE: Param = param(
    "continue",
    "string",
    "The continue option should be set when retrieving more results from the server. Since this value is server defined, clients may only use the continue value from a previous query result with identical query parameters (except for the value of continue) and the server may reject a continue value it does not recognize.",
);
const DRY_RUN: Param = param(
    "dryRun",
    "string",
    "When present, indicates that modifications should not be persisted. An invalid or unrecognized dryRun directive will result in an error response and no further processing of the request. Valid values are: - All: all dry run stages will be processed",
);
const FIELD_MANAGER: Param = param(
    "fieldManager",
    "string",
    "fieldManager is a name associated with the actor or entity that is making these changes. The value must be less than or 128 characters long, and only contain printable characters, as defined by https://golang.org/pkg/unicode/#IsPrint.",
);
const FIELD_SELECTOR: Param = param(
    "fieldSelector",
    "string",
    "A selector to restrict the list of returned objects by their fields. Defaults to everything.",
);
const FIELD_VALIDATION: Param = param(
    "fieldValidation",
    "string",
    "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore: This will ignore any unknown fields that are silently dropped from the object, and will ignore all but the last duplicate field that the decoder encounters. This is the default behavior prior to v1.23. - Warn: This will send a warning via the standard warning response header for each unknown field that is dropped from the object, and for each duplicate field that is encountered. The request will still succeed if there are no other errors, and will only persist the last of any duplicate fields. This is the default in v1.23+ - Strict: This will fail the request with a BadRequest error if any unknown fields would be dropped from the object, or if any duplicate fields are present. The error returned from the server will contain all unknown and duplicate fields encountered.",
);
const FORCE: Param = param(
    "force",
    "boolean",
    "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting fields owned by other people. Force flag must be unset for non-apply patch requests.",
);
const GRACE_PERIOD_SECONDS: Param = param(
    "gracePeriodSeconds",
    "integer",
    "The duration in seconds before the object should be deleted. Value must be non-negative integer. The value zero indicates delete immediately. If this value is nil, the default grace period for the specified type will be used. Defaults to a per object value if not specified. zero means delete immediately.",
);
const IGNORE_STORE_READ_ERROR: Param = param(
    "ignoreStoreReadErrorWithClusterBreakingPotential",
    "boolean",
    "if set to true, it will trigger an unsafe deletion of the resource in case the normal deletion flow fails with a corrupt object error. A resource is considered corrupt if it can not be retrieved from the underlying storage successfully because of a) its data can not be transformed e.g. decryption failure, or b) it fails to decode into an object. NOTE: unsafe deletion ignores finalizer constraints, skips precondition checks, and removes the object from the storage. WARNING: This may potentially break the cluster if the workload associated with the resource being unsafe-deleted relies on normal deletion flow. Use only if you REALLY know what you are doing. The default value is false, and the user must opt in to enable it",
);
const LABEL_SELECTOR: Param = param(
    "labelSelector",
    "string",
    "A selector to restrict the list of returned objects by their labels. Defaults to everything.",
);
const LIMIT: Param = param(
    "limit",
    "integer",
    "limit is a maximum number of responses to return for a list call. If more items exist, the server will set the `continue` field on the list metadata to a value that can be used with the same initial query to retrieve the next set of results.",
);
const ORPHAN_DEPENDENTS: Param = param(
    "orphanDependents",
    "boolean",
    "Deprecated: please use the PropagationPolicy, this field will be deprecated in 1.7. Should the dependent objects be orphaned. If true/false, the \"orphan\" finalizer will be added to/removed from the object's finalizers list. Either this field or PropagationPolicy may be set, but not both.",
);
const PROPAGATION_POLICY: Param = param(
    "propagationPolicy",
    "string",
    "Whether and how garbage collection will be performed. Either this field or OrphanDependents may be set, but not both. The default policy is decided by the existing finalizer set in the metadata.finalizers and the resource-specific default policy. Acceptable values are: 'Orphan' - orphan the dependents; 'Background' - allow the garbage collector to delete the dependents in the background; 'Foreground' - a cascading policy that deletes all dependents in the foreground.",
);
const RESOURCE_VERSION: Param = param(
    "resourceVersion",
    "string",
    "resourceVersion sets a constraint on what resource versions a request may be served from. See https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions for details.\n\nDefaults to unset",
);
const RESOURCE_VERSION_MATCH: Param = param(
    "resourceVersionMatch",
    "string",
    "resourceVersionMatch determines how resourceVersion is applied to list calls. It is highly recommended that resourceVersionMatch be set for list calls where resourceVersion is set See https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions for details.\n\nDefaults to unset",
);
const SEND_INITIAL_EVENTS: Param = param(
    "sendInitialEvents",
    "boolean",
    "`sendInitialEvents=true` may be set together with `watch=true`. In that case, the watch stream will begin with synthetic events to produce the current state of objects in the collection. Once all such events have been sent, a synthetic \"Bookmark\" event will be sent.",
);
const TIMEOUT_SECONDS: Param = param(
    "timeoutSeconds",
    "integer",
    "Timeout for the list/watch call. This limits the duration of the call, regardless of any activity or inactivity.",
);
const WATCH: Param = param(
    "watch",
    "boolean",
    "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications. Specify resourceVersion.",
);
const PRETTY: Param = param(
    "pretty",
    "string",
    "If 'true', then the output is pretty printed. Defaults to 'false' unless the user-agent indicates a browser or command-line tool (curl and wget) follow the same convention.",
);

impl Ops<'_, '_> {
    fn query(&self, p: &Param) -> Value {
        match self.doc.flavor {
            Flavor::V3 => json!({
                "name": p.name, "in": "query", "description": p.description,
                "schema": {"type": p.ty, "uniqueItems": true},
            }),
            Flavor::V2 => json!({
                "name": p.name, "in": "query", "description": p.description,
                "type": p.ty, "uniqueItems": true,
            }),
        }
    }

    fn path_param(&self, name: &str, what: &str) -> Value {
        let description = format!("{what} of the {}", self.r.kind);
        let description = match name {
            "namespace" => "object name and auth scope, such as for teams and projects".to_owned(),
            _ => description,
        };
        match self.doc.flavor {
            Flavor::V3 => json!({
                "name": name, "in": "path", "description": description, "required": true,
                "schema": {"type": "string", "uniqueItems": true},
            }),
            Flavor::V2 => json!({
                "name": name, "in": "path", "description": description, "required": true,
                "type": "string", "uniqueItems": true,
            }),
        }
    }

    /// A path item: the operations plus the path-level parameters (`name` and `namespace`
    /// where the path has them, and `pretty`).
    fn path_item(&self, has: &[bool; 2], ops: &[(&str, Value)]) -> Value {
        let mut params = Vec::new();
        if has[0] {
            params.push(self.path_param("name", "name"));
        }
        if has[1] {
            params.push(self.path_param("namespace", "namespace"));
        }
        params.push(self.query(&PRETTY));
        let mut item = Map::new();
        for (method, op) in ops {
            item.insert((*method).to_owned(), op.clone());
        }
        item.insert("parameters".into(), Value::Array(params));
        Value::Object(item)
    }

    fn media_types(&self, watchable: bool) -> Vec<&'static str> {
        let mut out = vec!["application/json", "application/yaml"];
        if self.builtin {
            out.push("application/vnd.kubernetes.protobuf");
        }
        if watchable {
            out.push("application/json;stream=watch");
            if self.builtin {
                out.push("application/vnd.kubernetes.protobuf;stream=watch");
            }
        }
        out
    }

    fn patch_types(&self) -> Vec<&'static str> {
        let mut out = vec![
            "application/apply-patch+yaml",
            "application/json-patch+json",
            "application/merge-patch+json",
        ];
        if self.builtin {
            out.push("application/strategic-merge-patch+json");
        }
        out
    }

    /// `description`, `operationId` verb and `x-kubernetes-action` of one operation; `scope`
    /// is `Namespaced` or empty, `suffix` `Status`, `Collection` or `ForAllNamespaces`.
    fn op(&self, verb: &str, scope: &str, suffix: &str, action: &str) -> Value {
        let r = self.r;
        let group_id = group_identifier(&r.gvr.group);
        let version_id = capitalize(&r.gvr.version);
        let operation_id = match suffix {
            "Collection" => format!("{verb}{group_id}{version_id}Collection{scope}{}", r.kind),
            _ => format!("{verb}{group_id}{version_id}{scope}{}{suffix}", r.kind),
        };
        let status = suffix == "Status";
        let (description, params, body, responses): OpShape = match action {
            "list" => (
                format!("list or watch objects of kind {}", r.kind),
                vec![
                    &ALLOW_WATCH_BOOKMARKS,
                    &CONTINUE,
                    &FIELD_SELECTOR,
                    &LABEL_SELECTOR,
                    &LIMIT,
                    &RESOURCE_VERSION,
                    &RESOURCE_VERSION_MATCH,
                    &SEND_INITIAL_EVENTS,
                    &TIMEOUT_SECONDS,
                    &WATCH,
                ],
                None,
                vec![("200", self.list_schema.to_owned())],
            ),
            "post" => (
                format!("create a {}", r.kind),
                vec![&DRY_RUN, &FIELD_MANAGER, &FIELD_VALIDATION],
                Some((self.media_types(false), self.kind_schema.to_owned())),
                vec![
                    ("200", self.kind_schema.to_owned()),
                    ("201", self.kind_schema.to_owned()),
                    ("202", self.kind_schema.to_owned()),
                ],
            ),
            "deletecollection" => (
                format!("delete collection of {}", r.kind),
                vec![
                    &CONTINUE,
                    &DRY_RUN,
                    &FIELD_SELECTOR,
                    &GRACE_PERIOD_SECONDS,
                    &IGNORE_STORE_READ_ERROR,
                    &LABEL_SELECTOR,
                    &LIMIT,
                    &ORPHAN_DEPENDENTS,
                    &PROPAGATION_POLICY,
                    &RESOURCE_VERSION,
                    &RESOURCE_VERSION_MATCH,
                    &SEND_INITIAL_EVENTS,
                    &TIMEOUT_SECONDS,
                ],
                Some((self.media_types(false), DELETE_OPTIONS.to_owned())),
                vec![("200", STATUS.to_owned())],
            ),
            "get" => (
                format!(
                    "read {}the specified {}",
                    if status { "status of " } else { "" },
                    r.kind
                ),
                vec![],
                None,
                vec![("200", self.kind_schema.to_owned())],
            ),
            "put" => (
                format!(
                    "replace {}the specified {}",
                    if status { "status of " } else { "" },
                    r.kind
                ),
                vec![&DRY_RUN, &FIELD_MANAGER, &FIELD_VALIDATION],
                Some((self.media_types(false), self.kind_schema.to_owned())),
                vec![
                    ("200", self.kind_schema.to_owned()),
                    ("201", self.kind_schema.to_owned()),
                ],
            ),
            "patch" => (
                format!(
                    "partially update {}the specified {}",
                    if status { "status of " } else { "" },
                    r.kind
                ),
                vec![&DRY_RUN, &FIELD_MANAGER, &FIELD_VALIDATION, &FORCE],
                Some((self.patch_types(), PATCH.to_owned())),
                vec![
                    ("200", self.kind_schema.to_owned()),
                    ("201", self.kind_schema.to_owned()),
                ],
            ),
            _ => (
                format!("delete a {}", r.kind),
                vec![
                    &DRY_RUN,
                    &GRACE_PERIOD_SECONDS,
                    &IGNORE_STORE_READ_ERROR,
                    &ORPHAN_DEPENDENTS,
                    &PROPAGATION_POLICY,
                ],
                Some((self.media_types(false), DELETE_OPTIONS.to_owned())),
                vec![("200", STATUS.to_owned()), ("202", STATUS.to_owned())],
            ),
        };
        let description = match suffix {
            "ForAllNamespaces" => format!("list or watch objects of kind {}", r.kind),
            _ => description,
        };
        let watchable = action == "list";
        let produces = self.media_types(watchable);
        let mut op = Map::new();
        op.insert("tags".into(), json!([tag(&r.gvr.group, &r.gvr.version)]));
        op.insert("description".into(), json!(description));
        op.insert("operationId".into(), json!(operation_id));
        let mut parameters: Vec<Value> = params.iter().map(|p| self.query(p)).collect();
        let mut response_map = Map::new();
        match self.doc.flavor {
            Flavor::V3 => {
                if let Some((types, schema)) = &body {
                    let content: Map<String, Value> = types
                        .iter()
                        .map(|t| {
                            (
                                (*t).to_owned(),
                                json!({"schema": self.doc.reference(schema)}),
                            )
                        })
                        .collect();
                    let mut rb = json!({"content": content});
                    if action != "delete" && action != "deletecollection" {
                        rb["required"] = json!(true);
                    }
                    op.insert("requestBody".into(), rb);
                }
                for (code, schema) in &responses {
                    let content: Map<String, Value> = produces
                        .iter()
                        .map(|t| {
                            (
                                (*t).to_owned(),
                                json!({"schema": self.doc.reference(schema)}),
                            )
                        })
                        .collect();
                    response_map.insert(
                        (*code).to_owned(),
                        json!({"description": code_text(code), "content": content}),
                    );
                }
            }
            Flavor::V2 => {
                if let Some((types, schema)) = &body {
                    let mut b =
                        json!({"name": "body", "in": "body", "schema": self.doc.reference(schema)});
                    if action != "delete" && action != "deletecollection" {
                        b["required"] = json!(true);
                    }
                    parameters.insert(0, b);
                    op.insert("consumes".into(), json!(types));
                } else {
                    op.insert("consumes".into(), json!(["*/*"]));
                }
                op.insert("produces".into(), json!(produces));
                op.insert("schemes".into(), json!(["https"]));
                for (code, schema) in &responses {
                    response_map.insert(
                        (*code).to_owned(),
                        json!({"description": code_text(code), "schema": self.doc.reference(schema)}),
                    );
                }
            }
        }
        response_map.insert("401".into(), json!({"description": "Unauthorized"}));
        if !parameters.is_empty() {
            op.insert("parameters".into(), Value::Array(parameters));
        }
        op.insert("responses".into(), Value::Object(response_map));
        op.insert("x-kubernetes-action".into(), json!(action));
        op.insert(
            "x-kubernetes-group-version-kind".into(),
            json!({"group": r.gvr.group, "kind": r.kind, "version": r.gvr.version}),
        );
        Value::Object(op)
    }
}

fn code_text(code: &str) -> &'static str {
    match code {
        "200" => "OK",
        "201" => "Created",
        "202" => "Accepted",
        _ => "",
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The group as the apiserver spells it in operation ids and tags, lower camel case:
/// `core`, `apps`, `rbacAuthorization` (`rbac.authorization.k8s.io`), `ciliumIo`.
fn group_camel(group: &str) -> String {
    if group.is_empty() {
        return "core".into();
    }
    let trimmed = group.strip_suffix(".k8s.io").unwrap_or(group);
    let mut parts = trimmed.split(['.', '-']);
    let mut out = parts.next().unwrap_or("").to_owned();
    for p in parts {
        out.push_str(&capitalize(p));
    }
    out
}

/// `Core`, `Apps`, `RbacAuthorization`.
fn group_identifier(group: &str) -> String {
    capitalize(&group_camel(group))
}

/// `core_v1`, `apps_v1`, `rbacAuthorization_v1`.
fn tag(group: &str, version: &str) -> String {
    format!("{}_{version}", group_camel(group))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn schemas() -> std::sync::Arc<Schemas> {
        Schemas::shared().unwrap()
    }

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "ciliumnetworkpolicies.cilium.io"},
            "spec": {
                "group": "cilium.io",
                "names": {"kind": "CiliumNetworkPolicy", "plural": "ciliumnetworkpolicies", "singular": "ciliumnetworkpolicy", "shortNames": ["cnp"]},
                "scope": "Namespaced",
                "versions": [{
                    "name": "v2", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {"endpointSelector": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}, "description": {"type": "string", "nullable": true}}},
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }}}
                }]
            }
        })
    }

    fn resources(crds: &[Value]) -> Vec<Resource> {
        let mut reg = Registry::default();
        for c in crds {
            for r in Registry::from_crd(c).unwrap() {
                reg.add(r);
            }
        }
        reg.all().cloned().collect()
    }

    #[test]
    fn v3_index_lists_every_served_group_version_with_a_content_hash() {
        let crds = [crd()];
        let res = resources(&crds);
        let index = v3_index(&schemas(), &res, &crds);
        let paths = index["paths"].as_object().unwrap();
        for p in [
            "api/v1",
            "apis/apps/v1",
            "apis/cilium.io/v2",
            "apis/rbac.authorization.k8s.io/v1",
        ] {
            let url = paths[p]["serverRelativeURL"].as_str().unwrap();
            let (path, hash) = url.split_once("?hash=").unwrap();
            assert_eq!(path, format!("/openapi/v3/{p}"));
            assert_eq!(hash.len(), 128, "{url}");
            let doc = v3_group_version(&schemas(), &res, &crds, p).unwrap();
            assert_eq!(hash, content_hash(&doc));
        }
        // The hash follows the content: another CRD schema, another hash.
        let mut changed = crd();
        changed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["x"] = json!({"type": "string"});
        let changed = [changed];
        let index2 = v3_index(&schemas(), &res, &changed);
        assert_ne!(
            index2["paths"]["apis/cilium.io/v2"],
            index["paths"]["apis/cilium.io/v2"]
        );
        assert_eq!(index2["paths"]["api/v1"], index["paths"]["api/v1"]);
        assert!(v3_group_version(&schemas(), &res, &crds, "apis/nope/v1").is_none());
        assert!(v3_group_version(&schemas(), &res, &crds, "bogus").is_none());
    }

    #[test]
    fn core_v1_document_has_service_operations_and_schemas() {
        let res = resources(&[]);
        let doc = v3_group_version(&schemas(), &res, &[], "api/v1").unwrap();
        assert_eq!(doc["openapi"], "3.0.0");
        let item = &doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"];
        let patch = &item["patch"];
        assert_eq!(patch["x-kubernetes-action"], "patch");
        assert_eq!(patch["operationId"], "patchCoreV1NamespacedService");
        assert_eq!(
            patch["x-kubernetes-group-version-kind"],
            json!({"group": "", "kind": "Service", "version": "v1"})
        );
        let names: Vec<&str> = patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["dryRun", "fieldManager", "fieldValidation", "force"]
        );
        assert!(
            patch["requestBody"]["content"]["application/strategic-merge-patch+json"].is_object()
        );
        assert_eq!(
            patch["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.Service"
        );
        let path_params: Vec<&str> = item["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(path_params, ["name", "namespace", "pretty"]);
        for p in [
            "/api/v1/namespaces/{namespace}/services",
            "/api/v1/services",
            "/api/v1/namespaces/{namespace}/services/{name}/status",
            "/api/v1/nodes/{name}",
            "/api/v1/namespaces/{namespace}/configmaps/{name}",
        ] {
            assert!(doc["paths"].get(p).is_some(), "{p}");
        }
        assert!(
            doc["paths"]
                .get("/api/v1/namespaces/{namespace}/configmaps/{name}/status")
                .is_none()
        );
        assert!(doc["paths"].get("/apis/apps/v1/deployments").is_none());
        let create = &doc["paths"]["/api/v1/namespaces/{namespace}/services"]["post"];
        assert!(
            create["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );

        let schemas_out = &doc["components"]["schemas"];
        let svc = &schemas_out["io.k8s.api.core.v1.Service"];
        assert_eq!(
            svc["x-kubernetes-group-version-kind"],
            json!([{"group": "", "kind": "Service", "version": "v1"}])
        );
        assert_eq!(svc["type"], "object");
        assert_eq!(
            svc["properties"]["spec"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.ServiceSpec"
        );
        assert!(svc["properties"]["kind"].get("enum").is_none());
        let ports = &schemas_out["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"];
        assert_eq!(ports["type"], "array");
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "port");
        assert_eq!(
            ports["x-kubernetes-list-map-keys"],
            json!(["port", "protocol"])
        );
        assert_eq!(
            ports["items"]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.ServicePort"
        );
        let ios = &schemas_out["io.k8s.apimachinery.pkg.util.intstr.IntOrString"];
        assert_eq!(ios["format"], "int-or-string");
        assert!(ios.get("oneOf").is_some());
        for reached in [
            "io.k8s.api.core.v1.ServicePort",
            "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
            "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
            "io.k8s.api.core.v1.PodSpec",
            "io.k8s.api.core.v1.ServiceList",
            "io.k8s.apimachinery.pkg.apis.meta.v1.Patch",
        ] {
            assert!(schemas_out.get(reached).is_some(), "{reached}");
        }
        // Every $ref resolves within the document.
        let mut refs = Vec::new();
        collect_refs(&doc, Flavor::V3, &mut refs);
        for r in refs {
            assert!(schemas_out.get(&r).is_some(), "dangling {r}");
        }
    }

    #[test]
    fn crd_group_version_document_carries_the_crd_schema() {
        let crds = [crd()];
        let res = resources(&crds);
        let doc = v3_group_version(&schemas(), &res, &crds, "apis/cilium.io/v2").unwrap();
        let cnp = &doc["components"]["schemas"]["io.cilium.v2.CiliumNetworkPolicy"];
        assert_eq!(
            cnp["x-kubernetes-group-version-kind"],
            json!([{"group": "cilium.io", "kind": "CiliumNetworkPolicy", "version": "v2"}])
        );
        assert_eq!(
            cnp["properties"]["metadata"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
        );
        assert_eq!(
            cnp["properties"]["spec"]["properties"]["description"]["nullable"],
            true
        );
        assert!(
            doc["components"]["schemas"]
                .get("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
                .is_some()
        );
        assert!(
            doc["components"]["schemas"]
                .get("io.cilium.v2.CiliumNetworkPolicyList")
                .is_some()
        );
        let patch = &doc["paths"]["/apis/cilium.io/v2/namespaces/{namespace}/ciliumnetworkpolicies/{name}"]
            ["patch"];
        assert_eq!(
            patch["operationId"],
            "patchCiliumIoV2NamespacedCiliumNetworkPolicy"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        // Custom resources take no strategic merge patch.
        assert!(
            patch["requestBody"]["content"]
                .get("application/strategic-merge-patch+json")
                .is_none()
        );
        assert!(
            doc["paths"]
                .get(
                    "/apis/cilium.io/v2/namespaces/{namespace}/ciliumnetworkpolicies/{name}/status"
                )
                .is_some()
        );
        let mut refs = Vec::new();
        collect_refs(&doc, Flavor::V3, &mut refs);
        for r in refs {
            assert!(
                doc["components"]["schemas"].get(&r).is_some(),
                "dangling {r}"
            );
        }
    }

    #[test]
    fn v2_is_swagger_with_definitions() {
        let crds = [crd()];
        let res = resources(&crds);
        let doc = v2(&schemas(), &res, &crds);
        assert_eq!(doc["swagger"], "2.0");
        let defs = doc["definitions"].as_object().unwrap();
        assert_eq!(
            defs["io.k8s.api.core.v1.Service"]["properties"]["spec"]["$ref"],
            "#/definitions/io.k8s.api.core.v1.ServiceSpec"
        );
        assert_eq!(
            defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"],
            json!({"type": "string", "format": "int-or-string"})
        );
        assert!(defs["io.cilium.v2.CiliumNetworkPolicy"]["properties"]["spec"]["properties"]["description"].get("nullable").is_none());
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(patch["parameters"][0]["in"], "body");
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation" && p["type"] == "string")
        );
        assert_eq!(
            patch["responses"]["200"]["schema"]["$ref"],
            "#/definitions/io.k8s.api.apps.v1.Deployment"
        );
        let mut refs = Vec::new();
        collect_refs(&doc, Flavor::V2, &mut refs);
        for r in refs {
            assert!(defs.contains_key(&r), "dangling {r}");
        }
    }
}
