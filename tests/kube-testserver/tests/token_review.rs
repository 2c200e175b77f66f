//! Tokens bound to a Pod and the TokenReview API, as kube-apiserver 1.32 serves them: the
//! token carries the Pod and its node, is valid for its audience only, and dies with its Pod.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

async fn create<K>(api: &Api<K>, v: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap()
}

fn token_request(pod: &str, uid: Option<&str>, audience: &str) -> TokenRequest {
    serde_json::from_value(json!({
        "spec": {
            "audiences": [audience],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid},
        }
    }))
    .unwrap()
}

async fn review(api: &Api<TokenReview>, token: &str, audience: &str) -> Value {
    let r = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"spec": {"token": token, "audiences": [audience]}}))
                .unwrap(),
        )
        .await
        .unwrap();
    serde_json::to_value(r.status.unwrap()).unwrap()
}

fn status_of(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn a_pod_bound_token_names_its_pod_and_node_for_its_audience_only() {
    let h = common::start().await;
    let client = common::client(&h, h.context()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = create(&nodes, json!({"metadata": {"name": "n1"}})).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "kube-system");
    create(&sas, json!({"metadata": {"name": "agent"}})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let pod = create(
        &pods,
        json!({"metadata": {"name": "agent-1"}, "spec": {
            "serviceAccountName": "agent", "nodeName": "n1",
            "containers": [{"name": "a", "image": "x"}]}}),
    )
    .await;
    create(
        &pods,
        json!({"metadata": {"name": "other"}, "spec": {
            "nodeName": "n1", "containers": [{"name": "a", "image": "x"}]}}),
    )
    .await;

    // The kubelet's request for a projected token.
    let tr = sas
        .create_token_request(
            "agent",
            &PostParams::default(),
            &token_request("agent-1", pod.metadata.uid.as_deref(), "clustermesh"),
        )
        .await
        .unwrap();
    let token = tr.status.unwrap().token;
    assert_eq!(tr.spec.audiences, vec!["clustermesh".to_owned()]);

    // Bound to a pod of another ServiceAccount, to a pod that is not there, with a stale UID.
    let (code, msg) = status_of(
        sas.create_token_request(
            "agent",
            &PostParams::default(),
            &token_request("other", None, "clustermesh"),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(
        msg.contains("to pod running with different serviceaccount name"),
        "{msg}"
    );
    let (code, _) = status_of(
        sas.create_token_request(
            "agent",
            &PostParams::default(),
            &token_request("gone", None, "clustermesh"),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 404);
    let (code, msg) = status_of(
        sas.create_token_request(
            "agent",
            &PostParams::default(),
            &token_request("agent-1", Some("0000"), "clustermesh"),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 409);
    assert!(msg.contains("does not match the UID in record"), "{msg}");

    // The review for its audience: the ServiceAccount, the pod and its node.
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let s = review(&reviews, &token, "clustermesh").await;
    assert_eq!(s["authenticated"], json!(true), "{s}");
    assert_eq!(
        s["user"]["username"],
        json!("system:serviceaccount:kube-system:agent")
    );
    assert_eq!(s["audiences"], json!(["clustermesh"]));
    let extra = &s["user"]["extra"];
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"],
        json!(["agent-1"])
    );
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"],
        json!([pod.metadata.uid.clone().unwrap()])
    );
    assert_eq!(
        extra["authentication.kubernetes.io/node-name"],
        json!(["n1"])
    );
    assert_eq!(
        extra["authentication.kubernetes.io/node-uid"],
        json!([node.metadata.uid.clone().unwrap()])
    );

    // Another audience: not authenticated, and the token opens no Kubernetes API either.
    let s = review(&reviews, &token, "other").await;
    assert_ne!(s["authenticated"], json!(true));
    assert!(
        s["error"].as_str().unwrap().contains(
            "token audiences [\"clustermesh\"] is invalid for the target audiences [\"other\"]"
        ),
        "{s}"
    );
    let mut kc: Value = serde_json::from_slice(&std::fs::read(h.kubeconfig()).unwrap()).unwrap();
    kc["users"][0]["user"] = json!({ "token": token });
    let as_token = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            serde_json::from_value(kc).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let (code, _) = status_of(
        Api::<Pod>::namespaced(as_token, "kube-system")
            .get("agent-1")
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 401, "a token for another audience opens no API");

    // No token; a ServiceAccount without `create tokenreviews`.
    let (code, msg) = status_of(
        reviews
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"spec": {}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (code, msg.as_str()),
        (400, "token is required for TokenReview in authentication")
    );
    let api_token = h.service_account_token("kube-system", "agent").unwrap();
    let mut kc: Value = serde_json::from_slice(&std::fs::read(h.kubeconfig()).unwrap()).unwrap();
    kc["users"][0]["user"] = json!({ "token": api_token });
    let as_agent = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            serde_json::from_value(kc).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    let (code, msg) = status_of(
        Api::<TokenReview>::all(as_agent)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"spec": {"token": token}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        msg.contains("cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"),
        "{msg}"
    );

    // The pod is gone: so is the token.
    pods.delete("agent-1", &test_support::kube::now())
        .await
        .unwrap();
    let s = review(&reviews, &token, "clustermesh").await;
    assert_ne!(s["authenticated"], json!(true));
    assert_eq!(
        s["error"],
        json!("service account token has been invalidated")
    );
}
