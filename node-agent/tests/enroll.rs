//! Per-node certificates (ADR 0022): node agents enroll at their apiserver with their pod-bound
//! projected ServiceAccount token, against a real apiserver (real etcd, the Kubernetes API
//! test server, the apiserver running as its ServiceAccount with exactly `deploy/`'s RBAC).
//! No BPF: the enrollment client is the agent's own module, and the Mesh API is read with the
//! certificates it obtained.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use certs::{Ca, LeafSpec, MeshIdentity, Reloader, Role};
use clustermesh_apiserver::config::Config;
use clustermesh_apiserver::enroll;
use clustermesh_apiserver::readiness::Readiness;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use model::{ClusterId, ClusterName, NodeName};
use node_agent::enroll::{Enroller, Error as EnrollError, Outcome};
use serde_json::json;
use test_support::{Etcd, eventually};

const T: Duration = Duration::from_secs(30);

struct Cluster {
    name: ClusterName,
    id: ClusterId,
    _etcd: Etcd,
    kube: kube_testserver::Handle,
    admin: kube::Client,
    ca: Ca,
    dir: tempfile::TempDir,
    mesh: String,
    enroll: String,
    apiserver: clustermesh_apiserver::Running,
    _enroll: enroll::Running,
}

/// Applies `deploy/base/rbac.yaml` with kubectl; returns a kubeconfig of the apiserver's
/// ServiceAccount.
fn deploy_rbac(kube: &kube_testserver::Handle, dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(["-n", "kube-system", "apply", "-f"])
        .arg(repo.join("deploy/base/rbac.yaml"))
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = kube
        .service_account_token("kube-system", "clustermesh-apiserver")
        .unwrap();
    let mut kc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kube.kubeconfig()).unwrap()).unwrap();
    kc["users"][0]["user"] = json!({ "token": token });
    let path = dir.join("apiserver-sa.kubeconfig");
    std::fs::write(&path, serde_json::to_vec(&kc).unwrap()).unwrap();
    path
}

impl Cluster {
    async fn up(name: &str, id: u64) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let name = ClusterName::new(test_support::unique_name(name)).unwrap();
        let id = ClusterId::new(id).unwrap();
        let etcd = Etcd::start().await.unwrap();
        let kube = kube_testserver::start(kube_testserver::Config::new(name.clone()))
            .await
            .unwrap();
        let admin = kube.client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(&name, certs::issue::DEFAULT_CA_VALIDITY).unwrap();
        let server = ca
            .issue(
                &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Apiserver))
                    .ips(["127.0.0.1".parse().unwrap()]),
            )
            .unwrap();
        test_support::write_tls(&dir.path().join("mesh-tls"), &ca, &server).unwrap();
        // The node-agent issuer, as `clustermesh install` makes it: the apiserver holds this
        // intermediate's key, never the cluster CA's.
        let issuer = ca
            .issue_node_agent_issuer(&name, id, Duration::from_secs(86_400))
            .unwrap();
        let issuer_dir = dir.path().join("issuer");
        std::fs::create_dir_all(&issuer_dir).unwrap();
        std::fs::write(issuer_dir.join("tls.crt"), issuer.cert_pem()).unwrap();
        std::fs::write(issuer_dir.join("tls.key"), issuer.key_pem()).unwrap();
        let kubeconfig = deploy_rbac(&kube, dir.path());
        let mesh_port = test_support::free_port().unwrap();
        let config = Config {
            cluster_name: name.clone(),
            cluster_id: id,
            etcd: etcd.config(),
            lease_ttl: Duration::from_secs(30),
            kubeconfig: Some(kubeconfig.clone()),
            kube_context: None,
            namespace: "kube-system".into(),
            replica: format!("{name}-0"),
            leader_lease: Duration::from_secs(10),
            identity_gc_grace: Duration::from_secs(60),
            health_bind: "127.0.0.1:0".parse().unwrap(),
            mesh_bind: format!("127.0.0.1:{mesh_port}").parse().unwrap(),
            mesh_tls: Some(certs::TlsFiles::in_dir(&dir.path().join("mesh-tls"))),
            peers_dir: None,
            peers_from_secrets: false,
            peer_quota: Default::default(),
            node_agent_state_port: model::node_state::NODE_AGENT_STATE_PORT,
            node_agent_observe_port: meshapi::observe::NODE_AGENT_OBSERVE_PORT,
            grants_dir: None,
        };
        let apiserver = clustermesh_apiserver::start(config.clone()).await.unwrap();
        tokio::time::timeout(T, apiserver.ready().wait_for(Readiness::is_ready))
            .await
            .unwrap()
            .unwrap();
        let sa_client = {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .unwrap(),
            )
            .unwrap()
        };
        let running = enroll::start(
            enroll::Config {
                bind: "127.0.0.1:0".parse().unwrap(),
                issuer: certs::TlsFiles::in_dir(&issuer_dir),
                namespace: "kube-system".into(),
                service_account: "clustermesh-node-agent".into(),
                audience: model::enroll::AUDIENCE.into(),
                validity: Duration::from_secs(3600),
            },
            &config,
            sa_client,
            apiserver.metrics().clone(),
        )
        .await
        .unwrap();
        Self {
            name,
            id,
            _etcd: etcd,
            kube,
            admin,
            ca,
            dir,
            mesh: format!("127.0.0.1:{mesh_port}"),
            enroll: running.addr().to_string(),
            apiserver,
            _enroll: running,
        }
    }

    /// A Node and the node agent's Pod on it, running as `service_account`.
    async fn node_with_pod(&self, node: &str, pod: &str, service_account: &str) {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        if nodes.get_opt(node).await.unwrap().is_none() {
            nodes
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": node}})).unwrap(),
                )
                .await
                .unwrap();
        }
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), "kube-system");
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": pod},
                "spec": {"serviceAccountName": service_account, "nodeName": node,
                         "containers": [{"name": "agent", "image": "clustermesh"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    }

    /// The projected token the kubelet writes for `pod` (`audience`, bound to the Pod), in a
    /// file.
    async fn token_file(&self, pod: &str, service_account: &str, audience: &str) -> PathBuf {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), "kube-system");
        let tr: TokenRequest = serde_json::from_value(json!({"spec": {
            "audiences": [audience], "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod}}}))
        .unwrap();
        let token = sas
            .create_token_request(service_account, &PostParams::default(), &tr)
            .await
            .unwrap()
            .status
            .unwrap()
            .token;
        let path = self.dir.path().join(format!(
            "token-{pod}-{}",
            audience.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ));
        std::fs::write(&path, token).unwrap();
        path
    }

    fn enroller(&self, node: &str, token_file: &Path, tls_dir: &str) -> Enroller {
        let ca_file = self.dir.path().join("mesh-tls/ca.crt");
        Enroller::new(node_agent::enroll::Config {
            endpoints: vec![self.enroll.clone()],
            cluster: self.name.clone(),
            cluster_id: self.id,
            node: NodeName::new(node).unwrap(),
            token_file: token_file.to_owned(),
            ca_file,
            tls_dir: self.dir.path().join(tls_dir),
        })
    }

    fn enrollments(&self, result: &str) -> f64 {
        self.apiserver
            .metrics()
            .value(enroll::ENROLLMENTS, &[result])
    }

    /// A Mesh API Watch with the certificate in `tls_dir`.
    async fn watch(&self, tls_dir: &str) -> Result<(), tonic::Status> {
        let tls = Reloader::load(certs::TlsFiles::in_dir(&self.dir.path().join(tls_dir))).unwrap();
        let connected =
            meshapi::client::connect(&self.name, std::slice::from_ref(&self.mesh), &tls)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = connected.client;
        let mut stream = client
            .watch(wire::pb::WatchRequest::default())
            .await?
            .into_inner();
        stream.message().await?;
        Ok(())
    }
}

fn fingerprint(o: &Outcome) -> String {
    match o {
        Outcome::Issued { fingerprint, .. } => fingerprint.clone(),
        Outcome::Kept { .. } => panic!("expected a new certificate, got {o:?}"),
    }
}

fn refused(e: EnrollError) -> (u16, String, String) {
    match e {
        EnrollError::Refused {
            status,
            reason,
            error,
            ..
        } => (status, reason, error),
        other => panic!("expected a refusal, got {other:#}"),
    }
}

fn identity_in(dir: &Path) -> MeshIdentity {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(dir.join("tls.crt")).unwrap();
    MeshIdentity::from_cert_der(der.as_ref()).unwrap()
}

/// Two node agents of one cluster obtain different certificates, each naming its own node;
/// one node's token cannot obtain a certificate for another node, a token of another
/// ServiceAccount or for another audience is refused (each with its reason, counted); a
/// certificate past two thirds of its life is renewed; and on the Mesh API node A's
/// certificate is node A: it is refused once A's Node is deleted while B's is still admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_node_agent_enrolls_for_its_own_node_only() {
    let c = Cluster::up("enr", 41).await;
    const SA: &str = "clustermesh-node-agent";
    c.node_with_pod("n1", "agent-n1", SA).await;
    c.node_with_pod("n2", "agent-n2", SA).await;
    c.node_with_pod("n1", "intruder", "default").await;
    let t1 = c.token_file("agent-n1", SA, "clustermesh").await;
    let t2 = c.token_file("agent-n2", SA, "clustermesh").await;

    // Two agents, two certificates, each of its own node.
    let a1 = c.enroller("n1", &t1, "tls-n1");
    let a2 = c.enroller("n2", &t2, "tls-n2");
    let f1 = fingerprint(&a1.ensure().await.unwrap());
    let f2 = fingerprint(&a2.ensure().await.unwrap());
    assert_ne!(f1, f2);
    for (dir, node) in [("tls-n1", "n1"), ("tls-n2", "n2")] {
        assert_eq!(
            identity_in(&c.dir.path().join(dir)),
            MeshIdentity::node_agent(c.name.clone(), c.id, NodeName::new(node).unwrap())
        );
    }
    assert_eq!(c.enrollments("issued"), 2.0);
    // Held and not due: kept, nothing asked.
    assert!(matches!(a1.ensure().await.unwrap(), Outcome::Kept { .. }));
    assert_eq!(c.enrollments("issued"), 2.0);

    // n1's token for node n2: refused, said so, counted; nothing written.
    let (status, reason, error) = refused(
        c.enroller("n2", &t1, "tls-stolen")
            .enroll()
            .await
            .unwrap_err(),
    );
    assert_eq!((status, reason.as_str()), (403, "wrong-node"));
    assert_eq!(
        error,
        "the token of pod kube-system/agent-n1 (on node n1) cannot obtain a certificate for node n2"
    );
    assert_eq!(c.enrollments("wrong-node"), 1.0);
    assert!(!c.dir.path().join("tls-stolen/tls.crt").exists());

    // A token of another ServiceAccount, from a pod on the right node.
    let ti = c.token_file("intruder", "default", "clustermesh").await;
    let (status, reason, error) =
        refused(c.enroller("n1", &ti, "tls-i").enroll().await.unwrap_err());
    assert_eq!((status, reason.as_str()), (403, "wrong-service-account"));
    assert!(
        error.contains("system:serviceaccount:kube-system:default"),
        "{error}"
    );
    assert_eq!(c.enrollments("wrong-service-account"), 1.0);

    // The agent's token for the Kubernetes API audience instead of the mesh's.
    let tk = c
        .token_file("agent-n1", SA, kube_testserver::authn::API_AUDIENCE)
        .await;
    let (status, reason, error) =
        refused(c.enroller("n1", &tk, "tls-k").enroll().await.unwrap_err());
    assert_eq!((status, reason.as_str()), (401, "unauthenticated"));
    assert!(
        error.contains("invalid for the target audiences [\"clustermesh\"]"),
        "{error}"
    );

    // Renewal: a certificate of n1 past two thirds of its life is replaced by ensure().
    let issuer = Ca::from_pem(
        &std::fs::read_to_string(c.dir.path().join("issuer/tls.crt")).unwrap(),
        &std::fs::read_to_string(c.dir.path().join("issuer/tls.key")).unwrap(),
    )
    .unwrap();
    let old = certs::Request::generate().unwrap();
    let aged = issuer
        .sign_request(
            &old.csr_pem,
            &LeafSpec::new(MeshIdentity::node_agent(
                c.name.clone(),
                c.id,
                NodeName::new("n1").unwrap(),
            ))
            .validity(
                time::OffsetDateTime::now_utc() - Duration::from_secs(50 * 60),
                Duration::from_secs(60 * 60),
            ),
        )
        .unwrap();
    let files = a1.files();
    std::fs::write(&files.key, &old.key_pem).unwrap();
    std::fs::write(&files.cert, format!("{aged}{}", issuer.cert_pem())).unwrap();
    let renewed = fingerprint(&a1.ensure().await.unwrap());
    assert_ne!(renewed, f1);
    assert_eq!(
        certs::fingerprint_pem(&std::fs::read(&files.cert).unwrap()).unwrap(),
        renewed
    );
    assert_eq!(c.enrollments("issued"), 3.0);

    // The Mesh API: both admitted with what they enrolled for.
    for dir in ["tls-n1", "tls-n2"] {
        eventually("the node agent is admitted", T, || async {
            c.watch(dir).await.ok()
        })
        .await;
    }
    // Node n1 leaves: n1's certificate is refused, n2's still admitted. A's certificate
    // cannot stand in for B.
    let nodes: Api<Node> = Api::all(c.admin.clone());
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    let e = eventually("n1's certificate refused", T, || async {
        c.watch("tls-n1").await.err()
    })
    .await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("n1"), "{e}");
    c.watch("tls-n2").await.expect("n2 is still admitted");
    // And n1 cannot enroll again while its Node is gone (its pod is still there).
    let (status, reason, _) = refused(a1.enroll().await.unwrap_err());
    assert_eq!((status, reason.as_str()), (403, "no-node"));

    // What enrollment asks Kubernetes (TokenReviews, the Node) is what deploy/ grants it.
    let audit = c.kube.audit();
    let refused_rbac: Vec<_> = audit
        .refused
        .iter()
        .filter(|(u, m)| {
            u == "system:serviceaccount:kube-system:clustermesh-apiserver"
                && ["\"tokenreviews\"", "\"nodes\"", "\"pods\""]
                    .iter()
                    .any(|r| m.contains(r))
        })
        .collect();
    assert!(refused_rbac.is_empty(), "{refused_rbac:?}");
    assert!(
        audit.allowed.iter().any(|(u, what, _)| {
            u == "system:serviceaccount:kube-system:clustermesh-apiserver"
                && what.starts_with("create authentication.k8s.io/tokenreviews")
        }),
        "{:?}",
        audit.allowed
    );
    let _ = &c.ca;
}
