//! HTTPS, routing, verbs, watch streaming, authentication and fault injection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use certs::{Ca, LeafSpec, MeshIdentity, Role};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use model::{ClusterId, ClusterName};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::registry::{Gvr, Resource};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{ApiError, Change, ChangeKind, DeleteOptions, Deleted, Propagation, Store};

type Body = BoxBody<Bytes, Infallible>;

/// The largest request body accepted.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// The emulated cluster's name: the kubeconfig context is named after it.
    pub cluster: ClusterName,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub bind: SocketAddr,
    /// How many changes the log keeps (watch replay and list continuation window).
    pub retain: usize,
    /// How often a watch with `allowWatchBookmarks` gets a bookmark (the apiserver: about
    /// once a minute).
    pub bookmark_interval: Duration,
    /// Directory for the CA, certificates and kubeconfig; a temporary one if `None`.
    pub dir: Option<PathBuf>,
}

impl Config {
    /// Defaults for a cluster named `cluster`: a free loopback port, 10,000 retained changes,
    /// a bookmark a minute, a temporary directory.
    pub fn new(cluster: ClusterName) -> Self {
        Self {
            cluster,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            retain: 10_000,
            bookmark_interval: Duration::from_secs(60),
            dir: None,
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    fail_count: AtomicU32,
    fail_code: AtomicU32,
    stall: Mutex<Option<Duration>>,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    /// ServiceAccount tokens the TokenRequest API issued, with when they expire.
    tokens: Mutex<std::collections::HashMap<String, crate::authn::Token>>,
    /// RBAC decisions about ServiceAccounts.
    audit: Mutex<crate::rbac::Audit>,
    /// The official schemas of the built-in kinds.
    schemas: Arc<crate::schema::Schemas>,
    token: String,
    faults: Faults,
    bookmark_interval: Duration,
    /// Bumped to close every open watch.
    close_watches: watch::Sender<u64>,
    addr: SocketAddr,
}

impl Shared {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        match self.store.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct Handle {
    shared: Arc<Shared>,
    tls: Arc<rustls::ServerConfig>,
    serving: JoinSet<()>,
    kubeconfig: PathBuf,
    ca_pem: String,
    context: String,
    reconciler: tokio::task::JoinHandle<()>,
    _tmp: Option<tempfile::TempDir>,
}

/// Writes `path` whole or not at all (a temporary file renamed over it): another process that
/// waits for the file (the lab waits for the kubeconfig) never reads it half written.
fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Starts the server and writes its kubeconfig.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    let (tmp, dir) = match &config.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("kube-testserver-")
                .tempdir()?;
            let d = t.path().to_owned();
            (Some(t), d)
        }
    };
    let ca = Ca::generate(&config.cluster, certs::issue::DEFAULT_CA_VALIDITY)?;
    let id = ClusterId::new(1)?;
    let server_leaf = ca.issue(
        &LeafSpec::new(MeshIdentity::new(
            config.cluster.clone(),
            id,
            Role::Apiserver,
        ))
        .dns(["localhost", "kubernetes.default.svc"])
        // And the address it is bound to, when that is another one (a lab's bridge, which
        // pods reach it on as in-cluster clients).
        .ips(
            std::iter::once("127.0.0.1".parse()?)
                .chain(
                    (!config.bind.ip().is_loopback() && !config.bind.ip().is_unspecified())
                        .then_some(config.bind.ip()),
                )
                .collect::<Vec<std::net::IpAddr>>(),
        ),
    )?;
    let admin_leaf = ca.issue(&LeafSpec::new(MeshIdentity::new(
        config.cluster.clone(),
        id,
        Role::Admin,
    )))?;
    write(&dir.join("ca.crt"), ca.cert_pem())?;
    write(&dir.join("server.crt"), &server_leaf.cert_pem)?;
    write(&dir.join("server.key"), &server_leaf.key_pem)?;
    let tls = Arc::new(server_tls(&ca, &server_leaf)?);

    let listener = TcpListener::bind(config.bind).await.context("bind")?;
    let addr = listener.local_addr()?;
    let token: String = (0..32)
        .map(|_| format!("{:x}", rand::random_range(0..16u8)))
        .collect();
    let context = config.cluster.to_string();
    let kubeconfig = dir.join("kubeconfig");
    write(
        &kubeconfig,
        &kubeconfig_text(&context, addr, &ca, &token, &admin_leaf),
    )?;

    let schemas = crate::schema::Schemas::shared()?;
    let mut store = Store::new(config.retain);
    store.set_root_ca(ca.cert_pem());
    let shared = Arc::new(Shared {
        store: Mutex::new(store),
        tokens: Mutex::default(),
        audit: Mutex::default(),
        schemas,
        token,
        faults: Faults::default(),
        bookmark_interval: config.bookmark_interval,
        close_watches: watch::channel(0).0,
        addr,
    });
    let mut serving = JoinSet::new();
    serving.spawn(serve(listener, Arc::clone(&tls), Arc::clone(&shared)));
    let reconciler = tokio::spawn(reconcile_loop(Arc::downgrade(&shared)));
    Ok(Handle {
        shared,
        tls,
        serving,
        kubeconfig,
        ca_pem: ca.cert_pem().to_owned(),
        context,
        reconciler,
        _tmp: tmp,
    })
}

/// Runs [`Store::reconcile`] whenever a deletion needs finishing and when grace periods end:
/// the part of the kubelet, namespace controller and garbage collector the API shows.
async fn reconcile_loop(shared: std::sync::Weak<Shared>) {
    let notify = match shared.upgrade() {
        Some(s) => s.store().notifier(),
        None => return,
    };
    loop {
        let next = match shared.upgrade() {
            Some(s) => s.store().reconcile(tokio::time::Instant::now()),
            None => return,
        };
        let wake = next.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = notify.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.reconciler.abort();
    }
}

fn server_tls(ca: &Ca, leaf: &certs::Leaf) -> anyhow::Result<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let chain = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())?];
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn kubeconfig_text(
    context: &str,
    addr: SocketAddr,
    ca: &Ca,
    token: &str,
    admin: &certs::Leaf,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let cert_ctx = format!("{context}-cert");
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": format!("https://{addr}"), "certificate-authority-data": b64(ca.cert_pem())}}],
        "users": [
            {"name": context, "user": {"token": token}},
            {"name": cert_ctx, "user": {"client-certificate-data": b64(&admin.cert_pem), "client-key-data": b64(&admin.key_pem)}}
        ],
        "contexts": [
            {"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}},
            {"name": cert_ctx, "context": {"cluster": context, "user": cert_ctx, "namespace": "default"}}
        ],
        "current-context": context,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let acceptor = acceptor.clone();
        let shared = Arc::clone(&shared);
        conns.spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let cert_auth = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let svc = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(shared, cert_auth, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Handle {
    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.shared.addr)
    }

    /// The kubeconfig file: context `<cluster>` (bearer token) and `<cluster>-cert` (client
    /// certificate).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube-rs client of this server, through its kubeconfig's current context (token).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The kubeconfig context of this cluster (token authentication).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The CA that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// A bearer token for ServiceAccount `namespace/name` (which must exist), as the
    /// TokenRequest API issues one: requests with it are authorized by RBAC.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        {
            let store = self.shared.store();
            let res = store
                .registry
                .get(&crate::registry::Gvr {
                    group: String::new(),
                    version: "v1".into(),
                    resource: "serviceaccounts".into(),
                })
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("serviceaccounts are not served"))?;
            store
                .get(&res, Some(namespace), name)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        }
        Ok(issue_token(
            &self.shared,
            namespace,
            name,
            None,
            vec![crate::authn::API_AUDIENCE.to_owned()],
            None,
        ))
    }

    /// The RBAC decisions about ServiceAccounts so far.
    pub fn audit(&self) -> crate::rbac::Audit {
        self.shared
            .audit
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// The rules bound to ServiceAccount `namespace/name` that none of its requests needed.
    pub fn unused_rules(&self, namespace: &str, name: &str) -> Vec<(crate::rbac::RuleRef, Value)> {
        let audit = self.audit();
        audit.unused_rules(
            &self.shared.store(),
            &crate::rbac::User::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
            },
        )
    }

    /// Fault: ends every open watch (clients see the stream close and re-watch).
    pub fn close_watches(&self) {
        self.shared.close_watches.send_modify(|g| *g += 1);
    }

    /// Fault: the next `count` requests fail with `code` (500 or 429).
    pub fn fail_next(&self, count: u32, code: u16) {
        self.shared
            .faults
            .fail_code
            .store(u32::from(code), Ordering::SeqCst);
        self.shared.faults.fail_count.store(count, Ordering::SeqCst);
    }

    /// How many injected failures are still to be served.
    pub fn pending_failures(&self) -> u32 {
        self.shared.faults.fail_count.load(Ordering::SeqCst)
    }

    /// Fault: every request waits `delay` before it is answered (`None` to stop).
    pub fn stall(&self, delay: Option<Duration>) {
        if let Ok(mut s) = self.shared.faults.stall.lock() {
            *s = delay;
        }
    }

    /// Fault: forgets the change log, as etcd compaction does: watches and list continuations
    /// from an earlier resourceVersion get `410 Gone`.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Fault: drops every connection and listens again on the same port, keeping all state.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.serving.shutdown().await;
        self.close_watches();
        let listener = bind_retry(self.shared.addr).await?;
        self.serving.spawn(serve(
            listener,
            Arc::clone(&self.tls),
            Arc::clone(&self.shared),
        ));
        Ok(())
    }
}

async fn bind_retry(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("bind {addr}")))
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.status());
    if e.code == 429 || e.retry_after.is_some() {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 3 <= b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a resource URL names.
struct Target {
    res: Resource,
    /// The CRD defining the resource, for custom resources (printer columns).
    crd: Option<Arc<Value>>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn resolve(shared: &Shared, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let (ns, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some((*ns).to_owned()), tail),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (*r, None, None),
        [r, n] => (*r, Some((*n).to_owned()), None),
        [r, n, s] => (*r, Some((*n).to_owned()), Some((*s).to_owned())),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let gvr = Gvr {
        group: group.into(),
        version: version.into(),
        resource: resource.into(),
    };
    let res = shared.store().registry.get(&gvr).cloned().ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    })?;
    if ns.is_some() && !res.namespaced {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("{} is not namespaced", res.gvr.resource),
        ));
    }
    let crd = shared.store().crd_of(&res);
    Ok(Target {
        res,
        crd,
        namespace: ns,
        name,
        subresource: sub,
    })
}

async fn handle(shared: Arc<Shared>, cert_auth: bool, req: Request<Incoming>) -> Response<Body> {
    let stall = shared.faults.stall.lock().ok().and_then(|s| *s);
    if let Some(d) = stall {
        tokio::time::sleep(d).await;
    }
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_owned);
    let user = match bearer {
        Some(t) if t == shared.token => Some(crate::rbac::User::Admin),
        Some(t) => {
            // Only a token for this API's audience opens it (a projected token made for
            // another audience does not).
            let store = shared.store();
            shared.tokens.lock().ok().and_then(|tokens| {
                crate::authn::authenticate(&store, tokens.get(&t), &[])
                    .ok()
                    .map(|(t, _)| t.user)
            })
        }
        None if cert_auth => Some(crate::rbac::User::Admin),
        None => None,
    };
    let Some(user) = user else {
        return error(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    };
    let remaining = shared.faults.fail_count.load(Ordering::SeqCst);
    if remaining > 0
        && shared
            .faults
            .fail_count
            .compare_exchange(remaining, remaining - 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    {
        let code = shared.faults.fail_code.load(Ordering::SeqCst);
        let e = if code == 429 {
            ApiError::new(
                429,
                "TooManyRequests",
                "injected fault: too many requests, please try again later",
            )
        } else {
            ApiError::new(500, "InternalError", "injected fault: internal error")
        };
        return error(&e);
    }
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let server = shared.addr.to_string();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["version"]) => json_response(
            200,
            &json!({
                "major": "1", "minor": "32", "gitVersion": "v1.32.0+clustermesh-testserver",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2024-12-11T00:00:00Z", "goVersion": "go1.23.4", "compiler": "gc",
                "platform": "linux/amd64"
            }),
        ),
        (&Method::GET, ["healthz" | "readyz" | "livez"]) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            r
        }
        (&Method::GET, ["openapi", "v2"]) => {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("*/*");
            if !(accept.contains("json") || accept.contains("*/*")) {
                return error(&ApiError::new(
                    406,
                    "NotAcceptable",
                    "only application/json is served for /openapi/v2",
                ));
            }
            let (resources, crds) = openapi_inputs(&shared);
            json_response(200, &crate::openapi::v2(&shared.schemas, &resources, &crds))
        }
        (&Method::GET, ["openapi", "v3"]) => {
            let (resources, crds) = openapi_inputs(&shared);
            json_response(
                200,
                &crate::openapi::v3_index(&shared.schemas, &resources, &crds),
            )
        }
        (&Method::GET, ["openapi", "v3", rest @ ..]) => {
            let (resources, crds) = openapi_inputs(&shared);
            match crate::openapi::v3_group_version(
                &shared.schemas,
                &resources,
                &crds,
                &rest.join("/"),
            ) {
                Some(doc) => json_response(200, &doc),
                None => error(&ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )),
            }
        }
        (&Method::GET, ["api"]) => {
            json_response(200, &shared.store().registry.core_versions(&server))
        }
        (&Method::GET, ["apis"]) => {
            let mut list = shared.store().registry.group_list();
            if let Some(groups) = list.get_mut("groups").and_then(Value::as_array_mut) {
                groups.push(crate::authn::group());
            }
            json_response(200, &list)
        }
        (&Method::GET, ["apis", "authentication.k8s.io"]) => {
            let mut g = crate::authn::group();
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            json_response(200, &g)
        }
        (&Method::GET, ["apis", "authentication.k8s.io", "v1"]) => {
            json_response(200, &crate::authn::resource_list())
        }
        (_, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            match token_review(&shared, &user, req).await {
                Ok(v) => json_response(201, &v),
                Err(e) => error(&e),
            }
        }
        (&Method::GET, ["api", "v1"]) => json_response(
            200,
            &shared
                .store()
                .registry
                .resource_list("", "v1")
                .unwrap_or(Value::Null),
        ),
        (&Method::GET, ["apis", g]) => match shared.store().registry.group(g) {
            Some(v) => json_response(200, &v),
            None => error(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        },
        (&Method::GET, ["apis", g, v]) => match shared.store().registry.resource_list(g, v) {
            Some(v) => json_response(200, &v),
            None => error(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        },
        (_, ["api", "v1", rest @ ..]) => {
            let (watch_prefix, rest) = strip_watch(rest);
            resource_request(&shared, &user, "", "v1", rest, watch_prefix, req).await
        }
        (_, ["apis", g, v, rest @ ..]) => {
            let (g, v) = ((*g).to_owned(), (*v).to_owned());
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            let (watch_prefix, rest) = strip_watch(&rest);
            resource_request(&shared, &user, &g, &v, rest, watch_prefix, req).await
        }
        _ => error(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// What the OpenAPI documents are made of: the resources served and the CRDs.
fn openapi_inputs(shared: &Shared) -> (Vec<Resource>, Vec<Value>) {
    let store = shared.store();
    (store.registry.all().cloned().collect(), store.crds())
}

fn strip_watch<'a>(rest: &'a [&'a str]) -> (bool, &'a [&'a str]) {
    match rest {
        ["watch", tail @ ..] => (true, tail),
        _ => (false, rest),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<(Option<String>, Vec<u8>), ApiError> {
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| ApiError::new(413, "RequestEntityTooLarge", format!("request body: {e}")))?
        .to_bytes();
    // kubectl's typed `create` commands send protobuf: decode what they send into JSON.
    if let Some(c) = &ct
        && c.starts_with("application/vnd.kubernetes.protobuf")
    {
        let v = crate::protobuf::to_json(&bytes)
            .map_err(|e| ApiError::new(415, "UnsupportedMediaType", e))?;
        return Ok((Some("application/json".into()), v.to_string().into_bytes()));
    }
    Ok((ct, bytes.to_vec()))
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            400,
            "BadRequest",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// A query boolean as the apiserver reads it: present and not `false`/`0` (any case) is true.
fn qbool(v: Option<&str>) -> bool {
    v.is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0"))
}

/// `resourceVersionMatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RvMatch {
    Exact,
    NotOlderThan,
}

use crate::field_error::FieldError;
use crate::tables::{IncludeObject, table};

struct ListOptions {
    label: LabelSelector,
    field: FieldSelector,
    limit: Option<usize>,
    cont: Option<String>,
    watch: bool,
    rv: Option<String>,
    rv_match: Option<RvMatch>,
    send_initial_events: Option<bool>,
    bookmarks: bool,
    timeout: Option<Duration>,
    table: bool,
    include_object: IncludeObject,
    dry_run: bool,
}

fn list_invalid(errors: &[crate::field_error::FieldError]) -> ApiError {
    let mut e = ApiError::new(
        422,
        "Invalid",
        crate::field_error::invalid_message("ListOptions.meta.k8s.io", "", errors),
    );
    e.details = Some(Box::new((
        String::new(),
        "meta.k8s.io".into(),
        "ListOptions".into(),
    )));
    e.causes = errors.iter().map(|f| f.cause()).collect();
    e
}

fn list_options(
    q: &[(String, String)],
    accept: &str,
    watch_prefix: bool,
    res: &Resource,
    method: &Method,
) -> Result<ListOptions, ApiError> {
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let bad = |e: crate::selectors::Error| ApiError::new(400, "BadRequest", e.to_string());
    let field = FieldSelector::parse(get("fieldSelector").unwrap_or("")).map_err(bad)?;
    if let Some(f) = field.unsupported(res) {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!("field label not supported: {f}"),
        ));
    }
    let dry_run = match get("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            let kind = if *method == Method::DELETE {
                "DeleteOptions"
            } else {
                write_options_kind(method)
            };
            let fe = FieldError::not_supported("dryRun", json!(other), &["All"]);
            return Err(options_invalid(kind, &fe));
        }
    };
    let watch = watch_prefix || qbool(get("watch"));
    let rv = get("resourceVersion")
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let cont = get("continue").filter(|c| !c.is_empty()).map(str::to_owned);
    let send_initial_events = get("sendInitialEvents").map(|v| qbool(Some(v)));
    let bookmarks = qbool(get("allowWatchBookmarks"));
    let mut errs = Vec::new();
    let rv_match = match get("resourceVersionMatch").filter(|m| !m.is_empty()) {
        None => None,
        Some("Exact") => Some(RvMatch::Exact),
        Some("NotOlderThan") => Some(RvMatch::NotOlderThan),
        Some(other) => {
            errs.push(FieldError::not_supported(
                "resourceVersionMatch",
                json!(other),
                &["Exact", "NotOlderThan", ""],
            ));
            None
        }
    };
    if let Some(m) = rv_match {
        if watch && send_initial_events.is_none() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if rv.is_none() && !(watch && send_initial_events.is_some()) {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if cont.is_some() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if m == RvMatch::Exact && rv.as_deref() == Some("0") {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if send_initial_events.is_some() {
        if !watch {
            errs.push(FieldError::forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            ));
        } else {
            if rv_match != Some(RvMatch::NotOlderThan) {
                errs.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if send_initial_events == Some(true) && !bookmarks {
                errs.push(FieldError::forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
    }
    if !errs.is_empty() {
        return Err(list_invalid(&errs));
    }
    let include_object = match get("includeObject") {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    };
    Ok(ListOptions {
        label: LabelSelector::parse(get("labelSelector").unwrap_or("")).map_err(bad)?,
        field,
        limit: get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0),
        cont,
        watch,
        rv,
        rv_match,
        send_initial_events,
        bookmarks,
        timeout: get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs),
        table: accept.contains("as=Table"),
        include_object,
        dry_run,
    })
}

/// `DeleteOptions` from the query and the (optional) body.
fn delete_options(
    q: &[(String, String)],
    body: &[u8],
    dry_run: bool,
) -> Result<DeleteOptions, ApiError> {
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let grace = match get("gracePeriodSeconds") {
        Some(g) => Some(g.parse::<i64>().map_err(|_| {
            ApiError::new(
                400,
                "BadRequest",
                format!("gracePeriodSeconds: invalid value {g:?}"),
            )
        })?),
        None => body.get("gracePeriodSeconds").and_then(Value::as_i64),
    };
    let policy = get("propagationPolicy").map(str::to_owned).or_else(|| {
        body.get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let orphan = get("orphanDependents")
        .map(|v| qbool(Some(v)))
        .or_else(|| body.get("orphanDependents").and_then(Value::as_bool));
    let propagation = match (policy.as_deref(), orphan) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                422,
                "Invalid",
                "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Invalid value: \"\": orphanDependents and deletionPropagation cannot be both set",
            ));
        }
        (Some("Orphan"), _) => Some(Propagation::Orphan),
        (Some("Background"), _) => Some(Propagation::Background),
        (Some("Foreground"), _) => Some(Propagation::Foreground),
        (Some(other), _) => {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                ),
            ));
        }
        (None, Some(true)) => Some(Propagation::Orphan),
        (None, Some(false)) => Some(Propagation::Background),
        (None, None) => None,
    };
    let body_dry = match body.get("dryRun").and_then(Value::as_array) {
        Some(a) if a.iter().any(|v| v != "All") => {
            return Err(ApiError::new(
                422,
                "Invalid",
                "DeleteOptions.meta.k8s.io \"\" is invalid: dryRun: Unsupported value: supported values: \"All\"",
            ));
        }
        Some(a) => !a.is_empty(),
        None => false,
    };
    Ok(DeleteOptions {
        grace,
        propagation,
        uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned),
        resource_version: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned),
        dry_run: dry_run || body_dry,
    })
}

fn details(res: &Resource, o: &Value) -> Value {
    let mut d = json!({
        "name": o.pointer("/metadata/name").cloned().unwrap_or(Value::Null),
        "kind": res.gvr.resource,
        "uid": o.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
    });
    if !res.gvr.group.is_empty() {
        d["group"] = json!(res.gvr.group);
    }
    d
}

/// The response to a delete: the object while it terminates (or for kinds that return it),
/// else a `Status` naming what was deleted.
fn deleted_response(res: &Resource, outcome: Deleted) -> (u16, Value) {
    match outcome {
        Deleted::Pending(o) => (200, (*o).clone()),
        Deleted::Gone(o) if crate::strategy::returns_deleted_object(res) => (200, (*o).clone()),
        Deleted::Gone(o) => (
            200,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": details(res, &o),
            }),
        ),
    }
}

/// Decodes a written object as the apiserver does before defaulting and validation: the
/// built-in kinds against their official schemas, custom resources against their CRD's (with
/// pruning); unknown fields per `fieldValidation`. Returns the warnings to send.
fn decode(
    shared: &Shared,
    target: &Target,
    body: &mut Value,
    mode: crate::schema::FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let res = &target.res;
    let name = body
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .or(target.name.as_deref())
        .unwrap_or_default()
        .to_owned();
    let reject = |r: crate::schema::Rejection| {
        let message = match &r {
            crate::schema::Rejection::Invalid(_) => {
                r.message(&crate::store::qualified_kind(res), &res.gvr.version, &name)
            }
            crate::schema::Rejection::Decode(_) => r.message(&res.kind, &res.gvr.version, &name),
        };
        let mut e = ApiError::new(r.code(), r.reason(), message);
        if let crate::schema::Rejection::Invalid(errs) = &r {
            e.details = Some(Box::new((
                name.clone(),
                res.gvr.group.clone(),
                res.kind.clone(),
            )));
            e.causes = errs
                .iter()
                .map(crate::field_error::FieldError::cause)
                .collect();
        }
        e
    };
    if !body.is_object() {
        return Err(ApiError::new(
            400,
            "BadRequest",
            "the body must be a JSON object",
        ));
    }
    // The URL names the kind; the body may not name another.
    for (field, want) in [
        ("apiVersion", res.gvr.api_version()),
        ("kind", res.kind.clone()),
    ] {
        if let Some(v) = body.get(field).and_then(Value::as_str)
            && !v.is_empty()
            && v != want
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!(
                    "the {field} of the provided object ({v}) does not match the {field} of the request ({want})"
                ),
            ));
        }
    }
    if shared
        .schemas
        .knows(&res.gvr.group, &res.gvr.version, &res.kind)
    {
        return shared
            .schemas
            .check(&res.gvr.group, &res.gvr.version, &res.kind, body, mode)
            .map_err(reject);
    }
    let Some((schema, _)) = shared.store().crd_schema(&res.gvr) else {
        return Ok(Vec::new());
    };
    let mut warnings = match body.get_mut("metadata") {
        Some(m) => shared.schemas.check_metadata(m, mode).map_err(&reject)?,
        None => Vec::new(),
    };
    warnings.extend(schema.check(body, mode).map_err(reject)?);
    Ok(warnings)
}

/// The list types server-side apply and field ownership use for `target`'s kind.
fn with_list_types<T>(
    shared: &Shared,
    target: &Target,
    f: impl FnOnce(&dyn crate::apply::ListTypes) -> T,
) -> T {
    let res = &target.res;
    if let Some(meta) = shared
        .schemas
        .patch_meta(&res.gvr.group, &res.gvr.version, &res.kind)
    {
        return f(&crate::schema::KindListTypes(meta));
    }
    match shared.store().crd_schema(&res.gvr) {
        Some((_, raw)) => f(&crate::schema::CrdListTypes(&raw)),
        None => f(&crate::apply::AllAtomic),
    }
}

fn write_options_kind(method: &Method) -> &'static str {
    match *method {
        Method::POST => "CreateOptions",
        Method::PUT => "UpdateOptions",
        _ => "PatchOptions",
    }
}

async fn resource_request(
    shared: &Arc<Shared>,
    user: &crate::rbac::User,
    group: &str,
    version: &str,
    rest: &[&str],
    watch_prefix: bool,
    req: Request<Incoming>,
) -> Response<Body> {
    let target = match resolve(shared, group, version, rest) {
        Ok(t) => t,
        Err(e) => return error(&e),
    };
    if let Some(sub) = &target.subresource
        && !target.res.has_subresource(sub)
    {
        return error(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let q = query(&req);
    // RBAC: the verb as the authorizer sees it.
    {
        let watching = watch_prefix
            || qbool(
                q.iter()
                    .find(|(k, _)| k == "watch")
                    .map(|(_, v)| v.as_str()),
            );
        let verb = match (req.method(), target.name.is_some()) {
            (&Method::GET, _) if watching => "watch",
            (&Method::GET, false) => "list",
            (&Method::GET, true) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, false) => "deletecollection",
            (&Method::DELETE, true) => "delete",
            _ => "unknown",
        };
        let attrs = crate::rbac::Attributes::new(
            verb,
            &target.res.gvr,
            target.subresource.as_deref(),
            target.namespace.as_deref(),
            target.name.as_deref(),
        );
        let decision = crate::rbac::authorize(&shared.store(), user, &attrs);
        if let Ok(mut a) = shared.audit.lock() {
            a.record(user, &attrs, &decision);
        }
        if let Err(message) = decision {
            let mut e = ApiError::new(403, "Forbidden", message);
            e.details = Some(Box::new((
                target.name.clone().unwrap_or_default(),
                target.res.gvr.group.clone(),
                target.res.gvr.resource.clone(),
            )));
            // Read the refused request's body (bounded) so that the connection stays usable
            // for the client's next request, as kube-apiserver's does.
            let _ = http_body_util::Limited::new(req.into_body(), MAX_BODY)
                .collect()
                .await;
            return error(&e);
        }
    }
    if let (Some("token"), Some(name)) = (target.subresource.as_deref(), target.name.as_deref()) {
        let name = name.to_owned();
        return match token_request(shared, &target, &name, req).await {
            Ok(v) => json_response(201, &v),
            Err(e) => error(&e),
        };
    }
    if let Some(a) = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        && a.contains("application/vnd.kubernetes.protobuf")
        && !a.contains("json")
        && !a.contains("*/*")
    {
        // Protobuf bodies are decoded, not produced: a client that accepts nothing else is
        // told so, as the apiserver tells a client asking for a media type it cannot serve.
        return error(&ApiError::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json, application/yaml, application/json;as=Table;v=v1;g=meta.k8s.io",
        ));
    }
    let accept = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let opts = match list_options(&q, &accept, watch_prefix, &target.res, req.method()) {
        Ok(o) => o,
        Err(e) => return error(&e),
    };
    let method = req.method().clone();
    let res = &target.res;
    let ns = target.namespace.as_deref();
    let status_sub = target.subresource.as_deref() == Some("status");
    let dry = opts.dry_run;
    let qget = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let sub = target.subresource.clone();
    let mode = match crate::schema::FieldValidation::parse(qget("fieldValidation").as_deref()) {
        Ok(m) => m,
        Err(fe) => return error(&options_invalid(write_options_kind(&method), &fe)),
    };
    let writer = Writer {
        field_manager: qget("fieldManager").filter(|m| !m.is_empty()),
        force: qbool(qget("force").as_deref()),
        user_agent: req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned),
        dry_run: dry,
        mode,
    };
    let mut warnings: Vec<String> = Vec::new();
    if let (Some(sub @ ("log" | "scale")), Some(name)) = (sub.as_deref(), target.name.as_deref()) {
        let r = if sub == "log" {
            pod_log(shared, &target, name, &method)
        } else {
            scale(shared, &target, name, &method, req, dry).await
        };
        return match r {
            Ok((code, v)) => json_response(code, &v),
            Err(e) => error(&e),
        };
    }
    let result = match (&method, &target.name) {
        (&Method::GET, None) if opts.watch => {
            return watch_response(Arc::clone(shared), target, opts).await;
        }
        (&Method::GET, None) => list(shared, res, ns, &opts).await,
        (&Method::GET, Some(name)) => shared
            .store()
            .get(res, ns, name)
            .map(|o| (200, (*o).clone())),
        (&Method::POST, None) => match read_body(req)
            .await
            .and_then(|(_, b)| parse_json(&b))
            .and_then(|mut body| {
                warnings = decode(shared, &target, &mut body, mode)?;
                Ok(body)
            }) {
            Ok(mut body) => {
                with_list_types(shared, &target, |t| {
                    crate::apply::record_update(None, &mut body, &writer.manager(), None, t);
                });
                shared
                    .store()
                    .create(res, ns, body, dry)
                    .map(|o| (201, (*o).clone()))
            }
            Err(e) => Err(e),
        },
        (&Method::PUT, Some(name)) => match read_body(req)
            .await
            .and_then(|(_, b)| parse_json(&b))
            .and_then(|mut body| {
                warnings = decode(shared, &target, &mut body, mode)?;
                Ok(body)
            }) {
            Ok(mut body) => {
                let old = shared.store().get(res, ns, name);
                match old {
                    Ok(old) => {
                        with_list_types(shared, &target, |t| {
                            crate::apply::record_update(
                                Some(&old),
                                &mut body,
                                &writer.manager(),
                                sub.as_deref(),
                                t,
                            );
                        });
                        shared
                            .store()
                            .update(res, ns, name, body, status_sub, dry)
                            .map(|o| (200, (*o).clone()))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        },
        (&Method::PATCH, Some(name)) => match read_body(req).await {
            Ok((ct, body)) => patch(
                shared,
                &target,
                name,
                ct.as_deref().unwrap_or(""),
                &body,
                &writer,
                &mut warnings,
            ),
            Err(e) => Err(e),
        },
        (&Method::DELETE, Some(name)) if !status_sub => {
            match read_body(req)
                .await
                .and_then(|(_, b)| delete_options(&q, &b, dry))
            {
                Ok(d) => shared
                    .store()
                    .delete(res, ns, name, &d)
                    .map(|outcome| deleted_response(res, outcome)),
                Err(e) => Err(e),
            }
        }
        (&Method::DELETE, None) => match read_body(req)
            .await
            .and_then(|(_, b)| delete_options(&q, &b, dry))
        {
            Ok(d) => delete_collection(shared, res, ns, &opts, &d),
            Err(e) => Err(e),
        },
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )),
    };
    match result {
        Ok((code, v)) if opts.table && code == 200 && method == Method::GET => {
            let rv = v
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null);
            let items: Vec<Value> = match v.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => vec![v.clone()],
            };
            let mut t = table(res, &target.crd, &items, opts.include_object);
            t["metadata"]["resourceVersion"] = rv;
            if let Some(c) = v.pointer("/metadata/continue") {
                t["metadata"]["continue"] = c.clone();
            }
            json_response(200, &t)
        }
        Ok((code, v)) => with_warnings(json_response(code, &v), &warnings),
        Err(e) => with_warnings(error(&e), &warnings),
    }
}

/// Adds a `Warning: 299 - "..."` header per warning, as the apiserver does.
fn with_warnings(mut r: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - {}", serde_json::Value::String(w.clone()));
        if let Ok(h) = HeaderValue::from_str(&text) {
            r.headers_mut().append(http::header::WARNING, h);
        }
    }
    r
}

/// A new bearer token that authenticates as ServiceAccount `namespace/name` until `expires`,
/// for `audiences`, bound to `bound`.
fn issue_token(
    shared: &Shared,
    namespace: &str,
    name: &str,
    expires: Option<std::time::SystemTime>,
    audiences: Vec<String>,
    bound: Option<crate::authn::Bound>,
) -> String {
    let token: String = (0..48)
        .map(|_| format!("{:x}", rand::random_range(0..16u8)))
        .collect();
    let id: String = (0..32)
        .map(|_| format!("{:x}", rand::random_range(0..16u8)))
        .collect();
    let uid = {
        let store = shared.store();
        store
            .registry
            .get(&crate::registry::Gvr {
                group: String::new(),
                version: "v1".into(),
                resource: "serviceaccounts".into(),
            })
            .cloned()
            .and_then(|res| store.get(&res, Some(namespace), name).ok())
            .and_then(|sa| {
                sa.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    if let Ok(mut t) = shared.tokens.lock() {
        t.insert(
            token.clone(),
            crate::authn::Token {
                user: crate::rbac::User::ServiceAccount {
                    namespace: namespace.into(),
                    name: name.into(),
                },
                uid,
                expires,
                audiences,
                bound,
                id,
            },
        );
    }
    token
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: authorized by RBAC (`create`
/// `tokenreviews`), the body decoded against the official schema, answered, not stored.
async fn token_review(
    shared: &Shared,
    user: &crate::rbac::User,
    req: Request<Incoming>,
) -> Result<Value, ApiError> {
    if req.method() != Method::POST {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let attrs =
        crate::rbac::Attributes::new("create", &crate::authn::tokenreviews(), None, None, None);
    let decision = crate::rbac::authorize(&shared.store(), user, &attrs);
    if let Ok(mut a) = shared.audit.lock() {
        a.record(user, &attrs, &decision);
    }
    if let Err(message) = decision {
        let mut e = ApiError::new(403, "Forbidden", message);
        e.details = Some(Box::new((
            String::new(),
            "authentication.k8s.io".into(),
            "tokenreviews".into(),
        )));
        return Err(e);
    }
    let mode = crate::schema::FieldValidation::parse(
        query(&req)
            .iter()
            .find(|(k, _)| k == "fieldValidation")
            .map(|(_, v)| v.as_str()),
    )
    .map_err(|fe| options_invalid("CreateOptions", &fe))?;
    let (_, body) = read_body(req).await?;
    let mut body = parse_json(&body)?;
    for (field, want) in [
        ("apiVersion", "authentication.k8s.io/v1"),
        ("kind", "TokenReview"),
    ] {
        if let Some(v) = body.get(field).and_then(Value::as_str)
            && !v.is_empty()
            && v != want
        {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!(
                    "the {field} of the provided object ({v}) does not match the {field} of the request ({want})"
                ),
            ));
        }
    }
    shared
        .schemas
        .check(
            "authentication.k8s.io",
            "v1",
            "TokenReview",
            &mut body,
            mode,
        )
        .map_err(|r| {
            let message = r.message("TokenReview.authentication.k8s.io", "v1", "");
            ApiError::new(r.code(), r.reason(), message)
        })?;
    let store = shared.store();
    let tokens = shared
        .tokens
        .lock()
        .map_err(|_| ApiError::new(500, "InternalError", "token table poisoned"))?;
    crate::authn::review(&store, &tokens, body)
}

/// A `422` about a request option (`<kind>.meta.k8s.io "" is invalid: <field error>`).
fn options_invalid(kind: &str, fe: &FieldError) -> ApiError {
    let mut e = ApiError::new(
        422,
        "Invalid",
        crate::field_error::invalid_message(
            &format!("{kind}.meta.k8s.io"),
            "",
            std::slice::from_ref(fe),
        ),
    );
    e.causes = vec![fe.cause()];
    e
}

/// `serviceaccounts/<name>/token` (the TokenRequest API): a bearer token that authenticates
/// as the ServiceAccount, for `spec.expirationSeconds` (default one hour, at least ten minutes).
async fn token_request(
    shared: &Shared,
    target: &Target,
    name: &str,
    req: Request<Incoming>,
) -> Result<Value, ApiError> {
    if req.method() != Method::POST {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ));
    }
    let ns = target.namespace.clone().unwrap_or_default();
    shared.store().get(&target.res, Some(&ns), name)?;
    let (_, body) = read_body(req).await?;
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(&body)?
    };
    let seconds = body
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if seconds > 1 << 32 {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io \"{name}\" is invalid: spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds"
            ),
        ));
    }
    if seconds < 600 {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io \"{name}\" is invalid: spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            ),
        ));
    }
    let expires = std::time::SystemTime::now() + Duration::from_secs(seconds.unsigned_abs());
    let audiences: Vec<String> = match body.pointer("/spec/audiences").and_then(Value::as_array) {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => vec![crate::authn::API_AUDIENCE.to_owned()],
    };
    let bound = match body.pointer("/spec/boundObjectRef") {
        Some(r) if r.is_object() => Some(crate::authn::bind(&shared.store(), &ns, name, r)?),
        _ => None,
    };
    let token = issue_token(shared, &ns, name, Some(expires), audiences.clone(), bound);
    let exp = time::OffsetDateTime::from(expires)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": Value::Null},
        "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": body.pointer("/spec/boundObjectRef").cloned().unwrap_or(Value::Null)},
        "status": {"token": token, "expirationTimestamp": exp},
    }))
}

/// `pods/<name>/log`: there is no kubelet, so the answer is what a cluster answers when it
/// cannot reach one, after the same checks (the pod exists, is bound, its node exists).
fn pod_log(
    shared: &Shared,
    target: &Target,
    name: &str,
    method: &Method,
) -> Result<(u16, Value), ApiError> {
    if *method != Method::GET {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        ));
    }
    let store = shared.store();
    let pod = store.get(&target.res, target.namespace.as_deref(), name)?;
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                400,
                "BadRequest",
                format!("pod {name} does not have a host assigned"),
            )
        })?;
    let nodes = store
        .registry
        .get(&crate::registry::Gvr {
            group: String::new(),
            version: "v1".into(),
            resource: "nodes".into(),
        })
        .cloned()
        .ok_or_else(|| ApiError::new(500, "InternalError", "nodes are not served"))?;
    store.get(&nodes, None, node)?;
    Err(ApiError::new(
        500,
        "InternalError",
        format!(
            "no kubelet answers on node {node}: the Kubernetes API test server runs no containers, so there are no logs"
        ),
    ))
}

/// The `autoscaling/v1` `Scale` of a workload.
fn scale_of(obj: &Value) -> Value {
    let selector = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let meta = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

/// `<workload>/<name>/scale`: read or change `spec.replicas` through a `Scale`.
async fn scale(
    shared: &Shared,
    target: &Target,
    name: &str,
    method: &Method,
    req: Request<Incoming>,
    dry_run: bool,
) -> Result<(u16, Value), ApiError> {
    let res = &target.res;
    let ns = target.namespace.as_deref();
    let current = shared.store().get(res, ns, name)?;
    let wanted = match *method {
        Method::GET => return Ok((200, scale_of(&current))),
        Method::PUT => {
            let (_, body) = read_body(req).await?;
            parse_json(&body)?
        }
        Method::PATCH => {
            let (ct, body) = read_body(req).await?;
            let mut s = scale_of(&current);
            crate::patch::apply(&mut s, ct.as_deref().unwrap_or(""), &body, None).map_err(|e| {
                match e {
                    crate::patch::Error::Failed(_) => ApiError::new(422, "Invalid", e.to_string()),
                    crate::patch::Error::Invalid(_) => {
                        ApiError::new(400, "BadRequest", e.to_string())
                    }
                    _ => ApiError::new(415, "UnsupportedMediaType", e.to_string()),
                }
            })?;
            s
        }
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!(
                    "the server does not allow this method on the requested resource: {method}"
                ),
            ));
        }
    };
    let replicas = wanted
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| ApiError::invalid(res, name, &[FieldError::required("spec.replicas")]))?;
    if replicas < 0 {
        return Err(ApiError::invalid(
            res,
            name,
            &[FieldError::invalid(
                "spec.replicas",
                json!(replicas),
                "must be greater than or equal to 0",
            )],
        ));
    }
    let mut next = (*current).clone();
    next["spec"]["replicas"] = json!(replicas);
    if let Some(rv) = wanted
        .pointer("/metadata/resourceVersion")
        .filter(|v| !v.is_null())
    {
        next["metadata"]["resourceVersion"] = rv.clone();
    }
    let stored = shared.store().update(res, ns, name, next, false, dry_run)?;
    Ok((200, scale_of(&stored)))
}

/// Who writes: the field manager of a write, and `force` for server-side apply.
struct Writer {
    field_manager: Option<String>,
    force: bool,
    user_agent: Option<String>,
    dry_run: bool,
    mode: crate::schema::FieldValidation,
}

impl Writer {
    fn manager(&self) -> String {
        self.field_manager
            .clone()
            .unwrap_or_else(|| crate::apply::manager_from_user_agent(self.user_agent.as_deref()))
    }
}

/// Server-side apply: create the object if absent, else merge the applied configuration,
/// with field ownership and conflicts.
fn server_side_apply(
    shared: &Shared,
    target: &Target,
    name: &str,
    body: &[u8],
    writer: &Writer,
    warnings: &mut Vec<String>,
) -> Result<(u16, Value), ApiError> {
    let (dry_run, mode) = (writer.dry_run, writer.mode);
    let res = &target.res;
    let ns = target.namespace.as_deref();
    let Some(manager) = &writer.field_manager else {
        return Err(ApiError::new(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    };
    let mut applied: Value = serde_yaml::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("error decoding YAML: {e}")))?;
    if !applied.is_object() {
        return Err(ApiError::new(
            400,
            "BadRequest",
            "the applied configuration must be an object",
        ));
    }
    for (field, want) in [
        ("apiVersion", res.gvr.api_version()),
        ("kind", res.kind.clone()),
    ] {
        match applied.get(field).and_then(Value::as_str) {
            Some(v) if v == want => {}
            Some(v) => {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!("{field} {v:?} of the applied configuration does not match {want:?}"),
                ));
            }
            None => {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!("invalid object type: {field} must be set"),
                ));
            }
        }
    }
    match applied.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if n == name => {}
        Some(n) => {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!("the name of the object ({n}) does not match the name on the URL ({name})"),
            ));
        }
        None => applied["metadata"]["name"] = json!(name),
    }
    *warnings = decode(shared, target, &mut applied, mode)?;
    // The applied configuration is defaulted before it is merged, so list keys that default
    // (a port's protocol) identify the same items as in the live object.
    crate::strategy::default(res, &mut applied);
    // On the main resource of a kind with a status subresource the status is not the
    // applier's (the apiserver keeps the live one): the defaulted status must not make an
    // apply that changes nothing look like a change.
    if target.subresource.is_none()
        && res.has_subresource("status")
        && let Some(o) = applied.as_object_mut()
    {
        o.remove("status");
    }
    let live = match shared.store().get(res, ns, name) {
        Ok(o) => Some(o),
        Err(e) if e.code == 404 => None,
        Err(e) => return Err(e),
    };
    let merged = with_list_types(shared, target, |types| {
        crate::apply::apply(
            live.as_deref(),
            &applied,
            manager,
            writer.force,
            target.subresource.as_deref(),
            types,
        )
    })
    .map_err(|c| {
        let mut e = ApiError::new(409, "Conflict", c.message());
        e.causes = c.causes();
        e
    })?;
    let mut store = shared.store();
    match live {
        None if target.subresource.is_none() => store
            .create(res, ns, merged, dry_run)
            .map(|o| (201, (*o).clone())),
        None => Err(ApiError::not_found_in(res, name)),
        Some(_) => store
            .update(
                res,
                ns,
                name,
                merged,
                target.subresource.as_deref() == Some("status"),
                dry_run,
            )
            .map(|o| (200, (*o).clone())),
    }
}

fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    ct: &str,
    body: &[u8],
    writer: &Writer,
    warnings: &mut Vec<String>,
) -> Result<(u16, Value), ApiError> {
    let res = &target.res;
    let ns = target.namespace.as_deref();
    let (dry_run, mode) = (writer.dry_run, writer.mode);
    if ct.starts_with("application/apply-patch+yaml") {
        return server_side_apply(shared, target, name, body, writer, warnings);
    }
    if writer.force {
        let fe = FieldError::forbidden("force", "may not be specified for non-apply patch");
        return Err(options_invalid("PatchOptions", &fe));
    }
    if shared.store().is_custom(res) && ct.starts_with("application/strategic-merge-patch+json") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        ));
    }
    let meta = shared
        .schemas
        .patch_meta(&res.gvr.group, &res.gvr.version, &res.kind);
    // As the apiserver: the patch is applied to the current object and retried if the object
    // changed meanwhile (a patch carries no resourceVersion unless the client put one in).
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = shared.store().get(res, ns, name)?;
        let mut obj = (*current).clone();
        crate::patch::apply(&mut obj, ct, body, meta.as_ref()).map_err(|e| match e {
            crate::patch::Error::Unsupported(_) | crate::patch::Error::NoStrategicMerge => {
                ApiError::new(415, "UnsupportedMediaType", e.to_string())
            }
            crate::patch::Error::Failed(_) => ApiError::new(422, "Invalid", e.to_string()),
            crate::patch::Error::Invalid(_) => ApiError::new(400, "BadRequest", e.to_string()),
        })?;
        let client_rv = obj.pointer("/metadata/resourceVersion")
            != current.pointer("/metadata/resourceVersion");
        *warnings = decode(shared, target, &mut obj, mode)?;
        with_list_types(shared, target, |t| {
            crate::apply::record_update(
                Some(&current),
                &mut obj,
                &writer.manager(),
                target.subresource.as_deref(),
                t,
            );
        });
        let result = shared.store().update(
            res,
            ns,
            name,
            obj,
            target.subresource.as_deref() == Some("status"),
            dry_run,
        );
        match result {
            Err(e) if e.code == 409 && !client_rv && attempts < 5 => continue,
            other => return other.map(|o| (200, (*o).clone())),
        }
    }
}

fn delete_collection(
    shared: &Shared,
    res: &Resource,
    ns: Option<&str>,
    opts: &ListOptions,
    delete: &DeleteOptions,
) -> Result<(u16, Value), ApiError> {
    let mut store = shared.store();
    let victims: Vec<String> = store
        .list(&res.gvr, ns, None)?
        .iter()
        .filter(|o| opts.label.matches(o) && opts.field.matches(o))
        .filter_map(|o| {
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    let mut items = Vec::new();
    for name in victims {
        let o = match store.delete(res, ns, &name, delete)? {
            Deleted::Gone(o) | Deleted::Pending(o) => o,
        };
        items.push((*o).clone());
    }
    Ok((
        200,
        json!({"kind": format!("{}List", res.kind), "apiVersion": res.gvr.api_version(), "metadata": {"resourceVersion": store.rv().to_string()}, "items": items}),
    ))
}

/// How long a request for a resourceVersion newer than the server's waits for it.
const FUTURE_RV_WAIT: Duration = Duration::from_secs(3);

/// Waits (up to [`FUTURE_RV_WAIT`]) until the store has reached `rv`; the apiserver's
/// `Too large resource version` (504) if it does not.
async fn wait_for_rv(shared: &Shared, rv: u64) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + FUTURE_RV_WAIT;
    let mut live = shared.store().subscribe();
    loop {
        let current = shared.store().rv();
        if current >= rv {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let mut e = ApiError::new(
                504,
                "Timeout",
                format!("Timeout: Too large resource version: {rv}, current: {current}"),
            );
            e.causes = vec![
                json!({"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}),
            ];
            e.retry_after = Some(1);
            return Err(e);
        }
        let _ = tokio::time::timeout(left, live.recv()).await;
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    after: String,
}

fn object_key(o: &Value) -> String {
    let ns = o
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = o
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{ns}/{name}")
}

async fn list(
    shared: &Shared,
    res: &Resource,
    ns: Option<&str>,
    opts: &ListOptions,
) -> Result<(u16, Value), ApiError> {
    let requested = match opts.rv.as_deref() {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            list_invalid(&[crate::field_error::FieldError::invalid(
                "resourceVersion",
                json!(v),
                "must be a non-negative integer",
            )])
        })?),
    };
    if let Some(rv) = requested.filter(|r| *r > 0)
        && opts.cont.is_none()
    {
        wait_for_rv(shared, rv).await?;
    }
    // An exact list (or, as the apiserver does, a paginated one from a given RV) is served
    // from that revision; otherwise from the newest state.
    let exact = opts.rv_match == Some(RvMatch::Exact)
        || (opts.rv_match.is_none() && opts.limit.is_some() && requested.is_some_and(|r| r > 0));
    let store = shared.store();
    let token = match &opts.cont {
        Some(c) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok())
                .ok_or_else(|| ApiError::new(400, "BadRequest", "continue key is not valid"))?;
            Some(raw)
        }
        None => None,
    };
    let at = match &token {
        Some(t) => Some(t.rv),
        None if exact => requested,
        None => None,
    };
    let rv = at.unwrap_or(store.rv());
    let all = store.list(&res.gvr, ns, at)?;
    let matching: Vec<Arc<Value>> = all
        .into_iter()
        .filter(|o| opts.label.matches(o) && opts.field.matches(o))
        .filter(|o| token.as_ref().is_none_or(|t| object_key(o) > t.after))
        .collect();
    let total = matching.len();
    let page: Vec<Value> = matching
        .iter()
        .take(opts.limit.unwrap_or(usize::MAX))
        .map(|o| (**o).clone())
        .collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if page.len() < total
        && let Some(last) = page.last()
    {
        let t = ContinueToken {
            rv,
            after: object_key(last),
        };
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&t).unwrap_or_default());
        meta["continue"] = json!(enc);
        meta["remainingItemCount"] = json!(total - page.len());
    }
    Ok((
        200,
        json!({"kind": format!("{}List", res.kind), "apiVersion": res.gvr.api_version(), "metadata": meta, "items": page}),
    ))
}

/// What a watcher with these options should see of `change`: `None`, or the event type.
fn classify(change: &Change, target: &Target, opts: &ListOptions) -> Option<&'static str> {
    if change.gvr != target.res.gvr
        || target
            .namespace
            .as_ref()
            .is_some_and(|n| *n != change.namespace)
    {
        return None;
    }
    let matches = |o: &Value| opts.label.matches(o) && opts.field.matches(o);
    let now = matches(&change.object);
    let before = change.prev.as_deref().is_some_and(matches);
    match change.kind {
        ChangeKind::Added => now.then_some("ADDED"),
        ChangeKind::Deleted => before.then_some("DELETED"),
        ChangeKind::Modified => match (before, now) {
            (true, true) => Some("MODIFIED"),
            (false, true) => Some("ADDED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        },
    }
}

fn event_line(
    kind: &str,
    object: &Value,
    table_mode: bool,
    target: &Target,
    opts: &ListOptions,
) -> Bytes {
    let object = if table_mode && kind != "BOOKMARK" && kind != "ERROR" {
        table(
            &target.res,
            &target.crd,
            std::slice::from_ref(object),
            opts.include_object,
        )
    } else {
        object.clone()
    };
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn watch_response(shared: Arc<Shared>, target: Target, opts: ListOptions) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let requested = match opts.rv.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(rv)) => Some(rv),
        Some(Err(_)) => {
            return error(&list_invalid(&[crate::field_error::FieldError::invalid(
                "resourceVersion",
                json!(opts.rv),
                "must be a non-negative integer",
            )]));
        }
    };
    // A watch from a revision the server has not reached waits for it, then fails.
    if let Some(rv) = requested.filter(|r| *r > 0)
        && let Err(e) = wait_for_rv(&shared, rv).await
    {
        let _ = tx.try_send(event_line("ERROR", &e.status(), false, &target, &opts));
        drop(tx);
        return stream_response(rx);
    }
    // Initial events: a watch without a resourceVersion (or "0") starts with the current
    // state, unless `sendInitialEvents=false`; `sendInitialEvents=true` always does, and ends
    // them with a bookmark.
    let initial_state = match opts.send_initial_events {
        Some(v) => v,
        None => matches!(requested, None | Some(0)),
    };
    let start = {
        let store = shared.store();
        if initial_state {
            match store.list(&target.res.gvr, target.namespace.as_deref(), None) {
                Ok(objs) => {
                    let initial: Vec<Bytes> = objs
                        .iter()
                        .filter(|o| opts.label.matches(o) && opts.field.matches(o))
                        .map(|o| event_line("ADDED", o, opts.table, &target, &opts))
                        .collect();
                    Ok((initial, Vec::new(), store.subscribe(), store.rv()))
                }
                Err(e) => Err(e),
            }
        } else {
            let from = requested.filter(|r| *r > 0).unwrap_or(store.rv());
            store
                .watch_from(from)
                .map(|(replay, live)| (Vec::new(), replay, live, from))
        }
    };
    let (initial, replay, mut live, from) = match start {
        Ok(s) => s,
        Err(e) if e.code == 410 => {
            let line = event_line("ERROR", &e.status(), false, &target, &opts);
            let _ = tx.try_send(line);
            drop(tx);
            return stream_response(rx);
        }
        Err(e) => return error(&e),
    };
    let mut closed = shared.close_watches.subscribe();
    let bookmark_every = shared.bookmark_interval;
    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    let initial_end = opts.send_initial_events == Some(true);
    tokio::spawn(async move {
        let bookmark = |rv: u64, end: bool| {
            let mut bm = json!({"kind": target.res.kind, "apiVersion": target.res.gvr.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
            if end {
                bm["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            event_line("BOOKMARK", &bm, false, &target, &opts)
        };
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if initial_end && tx.send(bookmark(from, true)).await.is_err() {
            return;
        }
        let mut last_sent = from;
        for c in replay {
            last_sent = c.rv;
            if let Some(kind) = classify(&c, &target, &opts)
                && tx
                    .send(event_line(kind, &c.object, opts.table, &target, &opts))
                    .await
                    .is_err()
            {
                return;
            }
        }
        let mut processed = last_sent;
        // As the watch cache: a bookmark about once a minute, and one shortly before the
        // watch's own timeout so the client can resume from it.
        let next_bookmark = |now: tokio::time::Instant| {
            let regular = now + bookmark_every;
            match deadline {
                Some(d)
                    if d.checked_sub(Duration::from_secs(2))
                        .is_some_and(|b| b > now && b < regular) =>
                {
                    d - Duration::from_secs(2)
                }
                _ => regular,
            }
        };
        let mut bookmark_at = next_bookmark(tokio::time::Instant::now());
        loop {
            let sleep_until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = live.recv() => match msg {
                    Ok(c) => {
                        if c.rv <= last_sent { continue; }
                        processed = processed.max(c.rv);
                        if let Some(kind) = classify(&c, &target, &opts)
                            && tx.send(event_line(kind, &c.object, opts.table, &target, &opts)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Too slow a client: end the watch; it resumes from its last RV.
                    Err(_) => return,
                },
                () = tokio::time::sleep_until(bookmark_at), if opts.bookmarks => {
                    bookmark_at = next_bookmark(tokio::time::Instant::now());
                    if tx.send(bookmark(processed, false)).await.is_err() {
                        return;
                    }
                }
                _ = closed.changed() => return,
                _ = sleep_until_deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
