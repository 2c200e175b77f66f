//! ServiceAccount tokens as kube-apiserver 1.32 issues and checks them: the audiences a token
//! is valid for, its expiry, the object it is bound to (a Pod, with the Pod's node, a Secret or
//! a Node: the TokenRequest API's `boundObjectRef`), and the TokenReview API
//! (`authentication.k8s.io/v1`, create only) with which a component verifies a token it was
//! given, for its own audience.
//!
//! A token is refused once its bound object is gone or was recreated (another UID), as the
//! apiserver's service-account authenticator refuses it. Requests to this server itself need a
//! token for the API audience ([`API_AUDIENCE`]): a token made for another audience (a
//! projected volume's `audience: clustermesh`) opens no Kubernetes API.
//!
//! Must not store anything: tokens live in the server's memory, TokenReviews are answered,
//! never kept.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::rbac::User;
use crate::registry::Gvr;
use crate::store::{ApiError, Store};

/// The audience of this server's own API (`--api-audiences`): what a TokenRequest without
/// audiences gets, and what a request to this server must carry.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc";

/// `user.extra` keys the apiserver sets for a token bound to a Pod (1.32, with
/// `ServiceAccountTokenPodNodeInfo`, beta and on by default since 1.30).
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// See [`EXTRA_POD_NAME`].
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// See [`EXTRA_POD_NAME`].
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// See [`EXTRA_POD_NAME`].
pub const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";
/// The token's ID (`JTI=<id>`), on every token of the TokenRequest API.
pub const EXTRA_CREDENTIAL_ID: &str = "authentication.kubernetes.io/credential-id";

/// The object a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// `Pod`, `Secret` or `Node`.
    pub kind: String,
    /// Its name (in the ServiceAccount's namespace, for Pods and Secrets).
    pub name: String,
    /// Its UID when the token was issued.
    pub uid: String,
    /// For a Pod bound to a node: the node's name and UID (the UID empty when the Node could
    /// not be read, as the apiserver leaves it out).
    pub node: Option<(String, String)>,
}

/// What a token stands for.
#[derive(Debug, Clone)]
pub struct Token {
    /// The ServiceAccount (or the admin).
    pub user: User,
    /// The ServiceAccount's UID.
    pub uid: String,
    /// When it expires; `None`: never (the helper tokens of [`crate::Handle`]).
    pub expires: Option<SystemTime>,
    /// The audiences it is valid for.
    pub audiences: Vec<String>,
    /// The object it is bound to.
    pub bound: Option<Bound>,
    /// Its ID.
    pub id: String,
}

fn core(resource: &str) -> Gvr {
    Gvr {
        group: String::new(),
        version: "v1".into(),
        resource: resource.into(),
    }
}

fn get(store: &Store, resource: &str, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
    let res = store
        .registry
        .get(&core(resource))
        .cloned()
        .ok_or_else(|| ApiError::new(500, "InternalError", format!("{resource} are not served")))?;
    store.get(&res, ns, name).map(|v| (*v).clone())
}

fn uid_of(obj: &Value) -> String {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The checks of a TokenRequest's `spec.boundObjectRef` for ServiceAccount `namespace/name`,
/// as the apiserver's TokenRequest REST storage makes them: the kind must be a Pod, Secret or
/// Node of the core group; the object must exist; a Pod must run as this ServiceAccount; a
/// given UID must be the object's. A Pod's node (name and UID) is recorded when it has one.
pub fn bind(store: &Store, namespace: &str, name: &str, r: &Value) -> Result<Bound, ApiError> {
    let api_version = r.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
    let obj_name = r.get("name").and_then(Value::as_str).unwrap_or("");
    let want_uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let bad_kind = || {
        ApiError::new(
            400,
            "BadRequest",
            format!("cannot bind token to object of type {group}/{version}, Kind={kind}"),
        )
    };
    if !group.is_empty() {
        return Err(bad_kind());
    }
    let (obj, node) = match kind {
        "Pod" => {
            let pod = get(store, "pods", Some(namespace), obj_name)?;
            let sa = pod
                .pointer("/spec/serviceAccountName")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if sa != name {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "cannot bind token for serviceaccount \"{name}\" to pod running with different serviceaccount name."
                    ),
                ));
            }
            let node = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(|n| {
                    let uid = get(store, "nodes", None, n)
                        .map(|node| uid_of(&node))
                        .unwrap_or_default();
                    (n.to_owned(), uid)
                });
            (pod, node)
        }
        "Secret" => (get(store, "secrets", Some(namespace), obj_name)?, None),
        "Node" => (get(store, "nodes", None, obj_name)?, None),
        _ => return Err(bad_kind()),
    };
    let uid = uid_of(&obj);
    if !want_uid.is_empty() && want_uid != uid {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {kind} \"{obj_name}\": the UID in the bound object reference ({want_uid}) does not match the UID in record. The object might have been deleted and then recreated"
            ),
        ));
    }
    Ok(Bound {
        kind: kind.into(),
        name: obj_name.into(),
        uid,
        node,
    })
}

/// Authenticates `token` for `audiences` (the API audience when empty), as the apiserver's
/// service-account authenticator does: known, not expired, valid for one of the audiences, its
/// ServiceAccount and bound object still there with the same UID. Returns the token and the
/// audiences it matched, or the authenticator's error.
pub fn authenticate(
    store: &Store,
    token: Option<&Token>,
    audiences: &[String],
) -> Result<(Token, Vec<String>), String> {
    let Some(token) = token else {
        return Err("invalid bearer token".into());
    };
    if token.expires.is_some_and(|e| e <= SystemTime::now()) {
        return Err("service account token has expired".into());
    }
    let requested: Vec<String> = if audiences.is_empty() {
        vec![API_AUDIENCE.to_owned()]
    } else {
        audiences.to_vec()
    };
    let matched: Vec<String> = requested
        .iter()
        .filter(|a| token.audiences.contains(a))
        .cloned()
        .collect();
    if matched.is_empty() {
        return Err(format!(
            "token audiences {} is invalid for the target audiences {}",
            go_quoted(&token.audiences),
            go_quoted(&requested)
        ));
    }
    if let User::ServiceAccount { namespace, name } = &token.user {
        let invalidated = || "service account token has been invalidated".to_owned();
        let sa = get(store, "serviceaccounts", Some(namespace), name).map_err(|_| invalidated())?;
        if !token.uid.is_empty() && uid_of(&sa) != token.uid {
            return Err(invalidated());
        }
        if let Some(b) = &token.bound {
            let (resource, ns) = match b.kind.as_str() {
                "Pod" => ("pods", Some(namespace.as_str())),
                "Secret" => ("secrets", Some(namespace.as_str())),
                _ => ("nodes", None),
            };
            let obj = get(store, resource, ns, &b.name).map_err(|_| invalidated())?;
            let uid = uid_of(&obj);
            if uid != b.uid {
                return Err(format!(
                    "{} UID ({uid}) does not match claim ({})",
                    b.kind.to_lowercase(),
                    b.uid
                ));
            }
        }
    }
    Ok((token.clone(), matched))
}

/// Go's `%q` of a string slice: `["a" "b"]`.
fn go_quoted(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(" "))
}

/// `user.extra` of an authenticated token.
fn extra(token: &Token) -> Value {
    let mut extra = serde_json::Map::new();
    extra.insert(
        EXTRA_CREDENTIAL_ID.into(),
        json!([format!("JTI={}", token.id)]),
    );
    if let Some(b) = &token.bound {
        if b.kind == "Pod" {
            extra.insert(EXTRA_POD_NAME.into(), json!([b.name]));
            extra.insert(EXTRA_POD_UID.into(), json!([b.uid]));
            if let Some((node, uid)) = &b.node {
                extra.insert(EXTRA_NODE_NAME.into(), json!([node]));
                if !uid.is_empty() {
                    extra.insert(EXTRA_NODE_UID.into(), json!([uid]));
                }
            }
        } else if b.kind == "Node" {
            extra.insert(EXTRA_NODE_NAME.into(), json!([b.name]));
            extra.insert(EXTRA_NODE_UID.into(), json!([b.uid]));
        }
    }
    Value::Object(extra)
}

/// The answer to a TokenReview create whose body (`review`) the schemas already accepted:
/// `400` without a token, else the review with its `status` (authenticated or the error), as
/// the apiserver answers it (`201`).
pub fn review(
    store: &Store,
    tokens: &std::collections::HashMap<String, Token>,
    mut review: Value,
) -> Result<Value, ApiError> {
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if token.is_empty() {
        return Err(ApiError::new(
            400,
            "BadRequest",
            "token is required for TokenReview in authentication",
        ));
    }
    let audiences: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let status = match authenticate(store, tokens.get(&token), &audiences) {
        Ok((t, matched)) => json!({
            "authenticated": true,
            "user": {
                "username": t.user.username(),
                "uid": t.uid,
                "groups": t.user.groups(),
                "extra": extra(&t),
            },
            "audiences": matched,
        }),
        Err(e) => json!({"user": {}, "error": e}),
    };
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    let meta = review.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut meta = meta.as_object().cloned().unwrap_or_default();
    meta.insert("creationTimestamp".into(), Value::Null);
    review["metadata"] = Value::Object(meta);
    review["status"] = status;
    Ok(review)
}

/// Discovery of `authentication.k8s.io/v1`: TokenReview, create only, cluster-scoped.
pub fn resource_list() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "authentication.k8s.io/v1",
        "resources": [{
            "name": "tokenreviews",
            "singularName": "tokenreview",
            "namespaced": false,
            "kind": "TokenReview",
            "verbs": ["create"],
        }],
    })
}

/// `/apis/authentication.k8s.io` (an `APIGroup`).
pub fn group() -> Value {
    json!({
        "name": "authentication.k8s.io",
        "versions": [{"groupVersion": "authentication.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "authentication.k8s.io/v1", "version": "v1"},
    })
}

/// The RBAC resource of TokenReviews.
pub fn tokenreviews() -> Gvr {
    Gvr {
        group: "authentication.k8s.io".into(),
        version: "v1".into(),
        resource: "tokenreviews".into(),
    }
}
