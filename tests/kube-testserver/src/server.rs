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
use crate::store::{ApiError, Change, ChangeKind, Store};

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
    /// How often a watch with `allowWatchBookmarks` gets a bookmark.
    pub bookmark_interval: Duration,
    /// Directory for the CA, certificates and kubeconfig; a temporary one if `None`.
    pub dir: Option<PathBuf>,
}

impl Config {
    /// Defaults for a cluster named `cluster`: a free loopback port, 10,000 retained changes,
    /// a bookmark every second, a temporary directory.
    pub fn new(cluster: ClusterName) -> Self {
        Self {
            cluster,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            retain: 10_000,
            bookmark_interval: Duration::from_secs(1),
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
    _tmp: Option<tempfile::TempDir>,
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
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
        .ips(["127.0.0.1".parse()?]),
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

    let shared = Arc::new(Shared {
        store: Mutex::new(Store::new(config.retain)),
        token,
        faults: Faults::default(),
        bookmark_interval: config.bookmark_interval,
        close_watches: watch::channel(0).0,
        addr,
    });
    let mut serving = JoinSet::new();
    serving.spawn(serve(listener, Arc::clone(&tls), Arc::clone(&shared)));
    Ok(Handle {
        shared,
        tls,
        serving,
        kubeconfig,
        ca_pem: ca.cert_pem().to_owned(),
        context,
        _tmp: tmp,
    })
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
    if e.code == 429 {
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
    Ok(Target {
        res,
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
    let token_ok = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|t| t == shared.token);
    if !token_ok && !cert_auth {
        return error(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
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
                "major": "1", "minor": "32", "gitVersion": "v1.32.0-clustermesh-testserver",
                "platform": "linux/amd64", "goVersion": "none", "compiler": "rustc"
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
        (&Method::GET, ["api"]) => {
            json_response(200, &shared.store().registry.core_versions(&server))
        }
        (&Method::GET, ["apis"]) => json_response(200, &shared.store().registry.group_list()),
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
            resource_request(&shared, "", "v1", rest, watch_prefix, req).await
        }
        (_, ["apis", g, v, rest @ ..]) => {
            let (g, v) = ((*g).to_owned(), (*v).to_owned());
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            let (watch_prefix, rest) = strip_watch(&rest);
            resource_request(&shared, &g, &v, rest, watch_prefix, req).await
        }
        _ => error(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
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

struct ListOptions {
    label: LabelSelector,
    field: FieldSelector,
    limit: Option<usize>,
    cont: Option<String>,
    watch: bool,
    rv: Option<String>,
    bookmarks: bool,
    timeout: Option<Duration>,
    table: bool,
}

fn list_options(
    q: &[(String, String)],
    accept: &str,
    watch_prefix: bool,
) -> Result<ListOptions, ApiError> {
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let bad = |e: crate::selectors::Error| ApiError::new(400, "BadRequest", e.to_string());
    Ok(ListOptions {
        label: LabelSelector::parse(get("labelSelector").unwrap_or("")).map_err(bad)?,
        field: FieldSelector::parse(get("fieldSelector").unwrap_or("")).map_err(bad)?,
        limit: get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0),
        cont: get("continue").filter(|c| !c.is_empty()).map(str::to_owned),
        watch: watch_prefix || matches!(get("watch"), Some("true" | "1")),
        rv: get("resourceVersion")
            .filter(|v| !v.is_empty())
            .map(str::to_owned),
        bookmarks: matches!(get("allowWatchBookmarks"), Some("true" | "1")),
        timeout: get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs),
        table: accept.contains("as=Table"),
    })
}

async fn resource_request(
    shared: &Arc<Shared>,
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
    let q = query(&req);
    let accept = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let opts = match list_options(&q, &accept, watch_prefix) {
        Ok(o) => o,
        Err(e) => return error(&e),
    };
    let method = req.method().clone();
    let res = &target.res;
    let ns = target.namespace.as_deref();
    let result = match (&method, &target.name) {
        (&Method::GET, None) if opts.watch => {
            return watch_response(Arc::clone(shared), target, opts);
        }
        (&Method::GET, None) => list(shared, res, ns, &opts),
        (&Method::GET, Some(name)) => shared
            .store()
            .get(res, ns, name)
            .map(|o| (200, (*o).clone())),
        (&Method::POST, None) => match read_body(req).await.and_then(|(_, b)| parse_json(&b)) {
            Ok(body) => shared
                .store()
                .create(res, ns, body)
                .map(|o| (201, (*o).clone())),
            Err(e) => Err(e),
        },
        (&Method::PUT, Some(name)) => {
            match read_body(req).await.and_then(|(_, b)| parse_json(&b)) {
                Ok(body) => update_keeping_status(shared, &target, name, body).map(|o| (200, o)),
                Err(e) => Err(e),
            }
        }
        (&Method::PATCH, Some(name)) => match read_body(req).await {
            Ok((ct, body)) => patch(shared, res, ns, name, ct.as_deref().unwrap_or(""), &body),
            Err(e) => Err(e),
        },
        (&Method::DELETE, Some(name)) => shared
            .store()
            .delete(res, ns, name)
            .map(|o| (200, (*o).clone())),
        (&Method::DELETE, None) => delete_collection(shared, res, ns, &opts),
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
            let mut t = table(&items);
            t["metadata"]["resourceVersion"] = rv;
            if let Some(c) = v.pointer("/metadata/continue") {
                t["metadata"]["continue"] = c.clone();
            }
            json_response(200, &t)
        }
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error(&e),
    }
}

fn update_keeping_status(
    shared: &Shared,
    target: &Target,
    name: &str,
    mut body: Value,
) -> Result<Value, ApiError> {
    let mut store = shared.store();
    let ns = target.namespace.as_deref();
    if target.subresource.as_deref() == Some("status") {
        // PUT .../status changes only the status.
        let mut current = (*store.get(&target.res, ns, name)?).clone();
        current["status"] = body.get("status").cloned().unwrap_or(Value::Null);
        if let Some(rv) = body.pointer("/metadata/resourceVersion") {
            current["metadata"]["resourceVersion"] = rv.clone();
        }
        body = current;
    }
    store
        .update(&target.res, ns, name, body)
        .map(|o| (*o).clone())
}

fn patch(
    shared: &Shared,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    ct: &str,
    body: &[u8],
) -> Result<(u16, Value), ApiError> {
    let mut store = shared.store();
    let current = store.get(res, ns, name)?;
    let mut obj = (*current).clone();
    let schemas = crate::schema::Schemas::shared()
        .map_err(|e| ApiError::new(500, "InternalError", format!("{e:#}")))?;
    let meta = schemas.patch_meta(&res.gvr.group, &res.gvr.version, &res.kind);
    crate::patch::apply(&mut obj, ct, body, meta.as_ref()).map_err(|e| match e {
        crate::patch::Error::Unsupported(_) | crate::patch::Error::NoStrategicMerge => {
            ApiError::new(415, "UnsupportedMediaType", e.to_string())
        }
        crate::patch::Error::Failed(_) => ApiError::new(422, "Invalid", e.to_string()),
        crate::patch::Error::Invalid(_) => ApiError::new(400, "BadRequest", e.to_string()),
    })?;
    store
        .update(res, ns, name, obj)
        .map(|o| (200, (*o).clone()))
}

fn delete_collection(
    shared: &Shared,
    res: &Resource,
    ns: Option<&str>,
    opts: &ListOptions,
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
        items.push((*store.delete(res, ns, &name)?).clone());
    }
    Ok((
        200,
        json!({"kind": format!("{}List", res.kind), "apiVersion": res.gvr.api_version(), "metadata": {"resourceVersion": store.rv().to_string()}, "items": items}),
    ))
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

fn list(
    shared: &Shared,
    res: &Resource,
    ns: Option<&str>,
    opts: &ListOptions,
) -> Result<(u16, Value), ApiError> {
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
    let rv = token.as_ref().map_or(store.rv(), |t| t.rv);
    let all = store.list(&res.gvr, ns, token.as_ref().map(|t| t.rv))?;
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

fn age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| {
        time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok()
    }) else {
        return "<unknown>".into();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn table(items: &[Value]) -> Value {
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let name = o.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
            let created = o.pointer("/metadata/creationTimestamp").and_then(Value::as_str);
            json!({
                "cells": [name, age(created)],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(Value::Null)}
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0},
            {"name": "Age", "type": "string", "format": "", "description": "Time since creation", "priority": 0}
        ],
        "rows": rows,
    })
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

fn event_line(kind: &str, object: &Value, table_mode: bool) -> Bytes {
    let object = if table_mode && kind != "BOOKMARK" && kind != "ERROR" {
        table(std::slice::from_ref(object))
    } else {
        object.clone()
    };
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(shared: Arc<Shared>, target: Target, opts: ListOptions) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let start = {
        let store = shared.store();
        match opts.rv.as_deref().map(str::parse::<u64>) {
            None | Some(Ok(0)) => {
                match store.list(&target.res.gvr, target.namespace.as_deref(), None) {
                    Ok(objs) => {
                        let initial: Vec<Bytes> = objs
                            .iter()
                            .filter(|o| opts.label.matches(o) && opts.field.matches(o))
                            .map(|o| event_line("ADDED", o, opts.table))
                            .collect();
                        Ok((initial, Vec::new(), store.subscribe(), store.rv()))
                    }
                    Err(e) => Err(e),
                }
            }
            Some(Ok(rv)) => store
                .watch_from(rv)
                .map(|(replay, live)| (Vec::new(), replay, live, rv.max(store.rv()))),
            Some(Err(_)) => Err(ApiError::new(
                400,
                "BadRequest",
                "resourceVersion is not a number",
            )),
        }
    };
    let (initial, replay, mut live, mut processed) = match start {
        Ok(s) => s,
        Err(e) if e.code == 410 => {
            let line = event_line("ERROR", &e.status(), false);
            let _ = tx.try_send(line);
            drop(tx);
            return stream_response(rx);
        }
        Err(e) => return error(&e),
    };
    let mut closed = shared.close_watches.subscribe();
    let bookmark_every = shared.bookmark_interval;
    let deadline = opts.timeout.map(|t| tokio::time::Instant::now() + t);
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let mut last_sent = 0;
        for c in replay {
            last_sent = c.rv;
            if let Some(kind) = classify(&c, &target, &opts)
                && tx
                    .send(event_line(kind, &c.object, opts.table))
                    .await
                    .is_err()
            {
                return;
            }
        }
        processed = processed.max(last_sent);
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
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
                            && tx.send(event_line(kind, &c.object, opts.table)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Too slow a client: end the watch; it resumes from its last RV.
                    Err(_) => return,
                },
                _ = tick.tick(), if opts.bookmarks => {
                    let bm = json!({"kind": target.res.kind, "apiVersion": target.res.gvr.api_version(), "metadata": {"resourceVersion": processed.to_string()}});
                    if tx.send(event_line("BOOKMARK", &bm, false)).await.is_err() {
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
