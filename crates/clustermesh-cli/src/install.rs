//! `clustermesh install` and `uninstall` (like `cilium clustermesh enable` / `disable`).
//!
//! Install makes a cluster CA, an etcd CA and every component's certificate into Secrets (the
//! CAs only in memory: the cluster CA's key goes into Secret `clustermesh-ca`, which `connect`
//! reads; the etcd CA's key nowhere, unless `--keep-ca` asks for both on disk), renders
//! `deploy/base` with the cluster's parameters ([`render`]), applies every object with
//! server-side apply, removes what an earlier install applied and this one no longer renders,
//! and waits for etcd, the apiserver and the node agents to be ready ([`wait`]) when it changed
//! anything. It is idempotent: Secrets that exist are kept, and an object applied again
//! unchanged is not written. An install over a cluster installed with another name or ID is
//! refused.
//!
//! Uninstall deletes what install created, found by its label, and nothing else: peer and grant
//! Secrets (`connect`), what the apiserver wrote (status ConfigMap, Lease) and etcd's volume are
//! named and left.
//!
//! Must not keep a CA key on disk unless asked; must not touch objects without its label.

mod render;
mod wait;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use certs::{Ca, LeafSpec, MeshIdentity, Role};
use clap::Args;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use model::objects::CA_SECRET;
use model::{ClusterId, ClusterName};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use crate::cluster::{Cluster, KubeArgs};
use render::{CLUSTER_LABEL, KINDS, MANAGED_BY, NAMESPACE, Params, ServiceType};

/// The field manager of install's server-side applies.
const FIELD_MANAGER: &str = "clustermesh-install";
/// The cluster CA's certificate alone, for node agents (a ConfigMap: no key a node could read).
const CA_BUNDLE_CONFIGMAP: &str = "clustermesh-ca-bundle";
/// The apiserver's Mesh API certificate.
const APISERVER_TLS: &str = "clustermesh-apiserver-tls";
/// The node-agent issuer (ADR 0022).
const ISSUER_SECRET: &str = "clustermesh-node-agent-issuer";
/// etcd's server certificate.
const ETCD_SERVER: &str = "clustermesh-etcd-server";
/// The apiserver's etcd client certificate.
const ETCD_CLIENT: &str = "clustermesh-etcd-client";
/// How long the node-agent issuer is valid.
const ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    /// The cluster's kubeconfig context (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// The cluster's name in the mesh: a DNS-1123 label of at most 32 characters.
    #[arg(long)]
    cluster_name: String,
    /// The cluster's ID, 1..=4095, unique in the mesh.
    #[arg(long)]
    cluster_id: String,
    /// Where peers reach this cluster's Mesh API (`host:port`; its host also goes into the
    /// apiserver's certificate). Default: the load balancer's address once it has one.
    #[arg(long)]
    mesh_endpoint: Option<String>,
    /// How the Mesh API Service is exposed.
    #[arg(long, value_enum, default_value = "load-balancer")]
    service_type: ServiceType,
    /// The image with the three binaries (`name:tag` or `name@sha256:...`).
    #[arg(long, default_value = concat!("clustermesh:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Also write the cluster CA and the etcd CA (certificates and keys) into this directory
    /// (`ca/`, `etcd-ca/`) when install creates them; without it no CA key reaches the disk
    /// (the cluster CA's key is kept in Secret `clustermesh-ca`, the etcd CA's nowhere).
    #[arg(long, value_name = "DIR")]
    keep_ca: Option<PathBuf>,
    /// Wait for etcd, the apiserver and the node agents to be ready when something changed.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wait: bool,
    /// How long to wait for readiness.
    #[arg(long, default_value = "5m", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// Print the manifests that would be applied and change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    kube: KubeArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UninstallArgs {
    /// The cluster's kubeconfig context (default: the current context).
    #[arg(long)]
    context: Option<String>,
    #[command(flatten)]
    kube: KubeArgs,
}

/// What applying one object did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Created,
    Configured,
    Unchanged,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
        }
    }
}

fn labels(cluster: &ClusterName) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (CLUSTER_LABEL.to_owned(), cluster.to_string()),
    ])
}

fn selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

/// The cluster an earlier install set up, from its objects: the apiserver's certificate, else
/// the configuration ConfigMap. `None` when there is none.
async fn installed(cluster: &Cluster) -> Result<Option<(ClusterName, ClusterId, String)>> {
    let ctx = &cluster.context;
    if let Some(s) = cluster
        .api::<Secret>()
        .get_opt(APISERVER_TLS)
        .await
        .with_context(|| format!("context {ctx}: read Secret {NAMESPACE}/{APISERVER_TLS}"))?
    {
        let pem = s
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .map(|b| b.0.clone())
            .unwrap_or_default();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem)
            .map_err(|e| anyhow!("context {ctx}: Secret {APISERVER_TLS}: tls.crt: {e}"))?;
        let id = MeshIdentity::from_cert_der(der.as_ref())
            .with_context(|| format!("context {ctx}: Secret {APISERVER_TLS}: tls.crt"))?;
        return Ok(Some((
            id.cluster,
            id.cluster_id,
            format!("Secret {NAMESPACE}/{APISERVER_TLS}"),
        )));
    }
    let cms = cluster
        .api::<ConfigMap>()
        .list(&ListParams::default().labels(&selector()))
        .await
        .with_context(|| format!("context {ctx}: list ConfigMaps in {NAMESPACE}"))?;
    for cm in cms.items {
        let data = cm.data.unwrap_or_default();
        if let (Some(n), Some(i)) = (data.get("CLUSTER_NAME"), data.get("CLUSTER_ID")) {
            let name = cm.metadata.name.unwrap_or_default();
            let n = ClusterName::new(n.clone())
                .with_context(|| format!("context {ctx}: ConfigMap {name}: CLUSTER_NAME"))?;
            let i = i
                .parse::<ClusterId>()
                .with_context(|| format!("context {ctx}: ConfigMap {name}: CLUSTER_ID"))?;
            return Ok(Some((n, i, format!("ConfigMap {NAMESPACE}/{name}"))));
        }
    }
    Ok(None)
}

fn secret_data(entries: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// Creates Secret `name` with `data` (and the install labels) unless it exists.
async fn ensure_secret(
    cluster: &Cluster,
    name: &str,
    labels: &BTreeMap<String, String>,
    data: BTreeMap<String, ByteString>,
) -> Result<()> {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    cluster
        .api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| {
            format!(
                "context {}: create Secret {NAMESPACE}/{name}",
                cluster.context
            )
        })?;
    println!("secret/{name} created");
    Ok(())
}

/// Every Secret the manifests mount, and the CA bundle: those that exist are kept, missing
/// ones are issued (with the cluster CA from `clustermesh-ca`, or a new one). Returns whether
/// anything was created.
async fn ensure_pki(cluster: &Cluster, params: &Params, keep_ca: Option<&PathBuf>) -> Result<bool> {
    let ctx = &cluster.context;
    let secrets = cluster.api::<Secret>();
    let mut exists = BTreeMap::new();
    for name in [
        CA_SECRET,
        APISERVER_TLS,
        ISSUER_SECRET,
        ETCD_SERVER,
        ETCD_CLIENT,
    ] {
        let found = secrets
            .get_opt(name)
            .await
            .with_context(|| format!("context {ctx}: read Secret {NAMESPACE}/{name}"))?;
        exists.insert(name, found.is_some());
    }
    let labels = labels(&params.cluster);
    let (name, id) = (&params.cluster, params.cluster_id);
    let mut created = false;
    let ca = if exists[CA_SECRET] {
        cluster.ca().await?
    } else {
        let signed: Vec<&str> = [APISERVER_TLS, ISSUER_SECRET]
            .into_iter()
            .filter(|s| exists[s])
            .collect();
        if !signed.is_empty() {
            bail!(
                "context {ctx}: Secret {NAMESPACE}/{CA_SECRET} is missing but {} (signed by it) exist: a new CA would not match them; run `clustermesh uninstall --context {ctx}` first",
                signed.join(", ")
            );
        }
        let ca = Ca::generate(name, certs::issue::DEFAULT_CA_VALIDITY)?;
        if let Some(dir) = keep_ca {
            keep(&dir.join("ca"), &ca)?;
        }
        ensure_secret(
            cluster,
            CA_SECRET,
            &labels,
            secret_data(&[("ca.crt", ca.cert_pem()), ("ca.key", ca.key_pem())]),
        )
        .await?;
        created = true;
        ca
    };
    // The CA certificate for node agents, kept equal to the Secret's.
    let bundle = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(CA_BUNDLE_CONFIGMAP.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "ca.crt".to_owned(),
            ca.cert_pem().to_owned(),
        )])),
        ..Default::default()
    };
    let change = apply(
        cluster,
        render::kind("ConfigMap"),
        &serde_json::to_value(&bundle)?,
    )
    .await?;
    println!("configmap/{CA_BUNDLE_CONFIGMAP} {}", change.as_str());
    created |= change != Change::Unchanged;
    if !exists[APISERVER_TLS] {
        let mut spec = LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Apiserver)).dns([
            format!("clustermesh-apiserver.{NAMESPACE}.svc"),
            format!("clustermesh-apiserver.{NAMESPACE}.svc.cluster.local"),
        ]);
        if let Some(host) = params.mesh_endpoint.as_deref().map(endpoint_host) {
            spec = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => spec.ips([ip]),
                Err(_) => spec.dns([host.to_owned()]),
            };
        }
        let leaf = ca.issue(&spec)?;
        ensure_secret(
            cluster,
            APISERVER_TLS,
            &labels,
            secret_data(&[
                ("tls.crt", &leaf.cert_pem),
                ("tls.key", &leaf.key_pem),
                ("ca.crt", ca.cert_pem()),
            ]),
        )
        .await?;
        created = true;
    }
    if !exists[ISSUER_SECRET] {
        let issuer = ca.issue_node_agent_issuer(name, id, ISSUER_VALIDITY)?;
        ensure_secret(
            cluster,
            ISSUER_SECRET,
            &labels,
            secret_data(&[
                ("tls.crt", issuer.cert_pem()),
                ("tls.key", issuer.key_pem()),
                ("ca.crt", ca.cert_pem()),
            ]),
        )
        .await?;
        created = true;
    }
    if !(exists[ETCD_SERVER] && exists[ETCD_CLIENT]) {
        // etcd's CA signs exactly these two; its key is dropped (or kept with --keep-ca), so
        // both are issued together, replacing a lone survivor.
        let etcd_ca = Ca::generate_etcd(name, certs::issue::DEFAULT_CA_VALIDITY)?;
        if let Some(dir) = keep_ca {
            keep(&dir.join("etcd-ca"), &etcd_ca)?;
        }
        let server = etcd_ca.issue(
            &LeafSpec::new(MeshIdentity::new(name.clone(), id, Role::Etcd)).dns([
                format!("clustermesh-etcd-0.clustermesh-etcd.{NAMESPACE}.svc"),
                "localhost".to_owned(),
            ]),
        )?;
        let client = etcd_ca.issue(&LeafSpec::new(MeshIdentity::new(
            name.clone(),
            id,
            Role::Apiserver,
        )))?;
        for (secret, leaf) in [(ETCD_SERVER, &server), (ETCD_CLIENT, &client)] {
            if exists[secret] {
                secrets
                    .delete(secret, &DeleteParams::default())
                    .await
                    .with_context(|| {
                        format!("context {ctx}: replace Secret {NAMESPACE}/{secret}")
                    })?;
            }
            ensure_secret(
                cluster,
                secret,
                &labels,
                secret_data(&[
                    ("tls.crt", &leaf.cert_pem),
                    ("tls.key", &leaf.key_pem),
                    ("ca.crt", etcd_ca.cert_pem()),
                ]),
            )
            .await?;
        }
        created = true;
    }
    for (name, was) in exists {
        if was {
            println!("secret/{name} unchanged");
        }
    }
    Ok(created)
}

fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn keep(dir: &std::path::Path, ca: &Ca) -> Result<()> {
    crate::certs_cmd::write_atomic(&dir.join("ca.key"), ca.key_pem(), 0o600)?;
    crate::certs_cmd::write_atomic(&dir.join("ca.crt"), ca.cert_pem(), 0o644)?;
    eprintln!("kept the CA in {} (--keep-ca)", dir.display());
    Ok(())
}

/// Server-side applies `obj`; says whether it was created, changed or left as it was.
async fn apply(cluster: &Cluster, kind: &render::Kind, obj: &Value) -> Result<Change> {
    let name = render::name_of(obj).to_owned();
    let ar = kind.api_resource();
    let api: kube::Api<DynamicObject> = if kind.namespaced {
        kube::Api::namespaced_with(cluster.client.clone(), NAMESPACE, &ar)
    } else {
        kube::Api::all_with(cluster.client.clone(), &ar)
    };
    let what = || format!("context {}: apply {}/{name}", cluster.context, kind.lower());
    let before = api.get_opt(&name).await.with_context(what)?;
    let after = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .with_context(what)?;
    Ok(match before {
        None => Change::Created,
        Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
            Change::Unchanged
        }
        Some(_) => Change::Configured,
    })
}

/// Deletes every object of `kind` that carries install's label and is not in `keep`.
async fn prune(
    cluster: &Cluster,
    kind: &render::Kind,
    keep: &[String],
    verb: &str,
) -> Result<Vec<String>> {
    let ar = kind.api_resource();
    let api: kube::Api<DynamicObject> = if kind.namespaced {
        kube::Api::namespaced_with(cluster.client.clone(), &cluster.namespace, &ar)
    } else {
        kube::Api::all_with(cluster.client.clone(), &ar)
    };
    let list = api
        .list(&ListParams::default().labels(&selector()))
        .await
        .with_context(|| {
            format!(
                "context {}: list {} labelled {}",
                cluster.context,
                kind.plural,
                selector()
            )
        })?;
    let mut gone = Vec::new();
    for o in list.items {
        let name = o.metadata.name.clone().unwrap_or_default();
        if keep.contains(&name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => {
                return Err(anyhow!(e)).with_context(|| {
                    format!(
                        "context {}: delete {}/{name}",
                        cluster.context,
                        kind.lower()
                    )
                });
            }
        }
        println!("{}/{name} {verb}", kind.lower());
        gone.push(name);
    }
    Ok(gone)
}

pub(crate) async fn install(a: InstallArgs) -> Result<ExitCode> {
    let mut problems = Vec::new();
    let cluster_name = ClusterName::new(a.cluster_name.clone())
        .map_err(|e| problems.push(format!("--cluster-name: {e}")))
        .ok();
    let cluster_id = a
        .cluster_id
        .parse::<ClusterId>()
        .map_err(|e| problems.push(format!("--cluster-id: {e}")))
        .ok();
    if let Some(ep) = &a.mesh_endpoint
        && ep
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        problems.push(format!("--mesh-endpoint: {ep:?} is not host:port"));
    }
    if a.kube.mesh_namespace != NAMESPACE {
        problems.push(format!(
            "--mesh-namespace: install puts the mesh in {NAMESPACE} (the manifests' service addresses name it), not {}",
            a.kube.mesh_namespace
        ));
    }
    let (Some(cluster_name), Some(cluster_id)) = (cluster_name, cluster_id) else {
        bail!("invalid arguments:\n  - {}", problems.join("\n  - "));
    };
    if !problems.is_empty() {
        bail!("invalid arguments:\n  - {}", problems.join("\n  - "));
    }
    let params = Params {
        cluster: cluster_name.clone(),
        cluster_id,
        mesh_endpoint: a.mesh_endpoint.clone(),
        image: a.image.clone(),
        service_type: a.service_type,
    };
    let objects = render::render(&params)?;
    if a.dry_run {
        for o in &objects {
            print!("---\n{}", serde_saphyr::to_string(o)?);
        }
        eprintln!(
            "dry run: {} objects rendered, plus Secrets {CA_SECRET}, {APISERVER_TLS}, {ISSUER_SECRET}, {ETCD_SERVER}, {ETCD_CLIENT} and ConfigMap {CA_BUNDLE_CONFIGMAP}; nothing applied",
            objects.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let cluster = Cluster::open(&a.kube, a.context.as_deref()).await?;
    let ctx = cluster.context.clone();
    if let Some((name, id, source)) = installed(&cluster).await?
        && (name != cluster_name || id != cluster_id)
    {
        bail!(
            "context {ctx} already holds cluster {name} (ID {id}) (from {source}); installing cluster {cluster_name} (ID {cluster_id}) over it is refused: its peers know it by that name and ID. To reinstall: clustermesh uninstall --context {ctx}, then install again"
        );
    }
    let mut changed = ensure_pki(&cluster, &params, a.keep_ca.as_ref()).await?;
    let mut applied: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut workloads = Vec::new();
    for o in &objects {
        let kind = render::kind_of(o)?;
        let change = apply(&cluster, &kind, o).await?;
        println!(
            "{}/{} {}",
            kind.lower(),
            render::name_of(o),
            change.as_str()
        );
        changed |= change != Change::Unchanged;
        applied
            .entry(kind.kind)
            .or_default()
            .push(render::name_of(o).to_owned());
        if matches!(kind.kind, "StatefulSet" | "Deployment" | "DaemonSet") {
            workloads.push((kind, render::name_of(o).to_owned()));
        }
    }
    // What an earlier install applied and this one does not render any more (a ConfigMap of
    // other parameters): pruned. Secrets and the CA bundle are install's own, kept.
    for kind in KINDS.iter().filter(|k| k.kind != "Secret") {
        let mut keep = applied.get(kind.kind).cloned().unwrap_or_default();
        if kind.kind == "ConfigMap" {
            keep.push(CA_BUNDLE_CONFIGMAP.to_owned());
        }
        changed |= !prune(&cluster, kind, &keep, "pruned").await?.is_empty();
    }
    if !changed {
        println!(
            "cluster {cluster_name} (ID {cluster_id}) is already installed in context {ctx}: nothing changed"
        );
        return Ok(ExitCode::SUCCESS);
    }
    if a.wait {
        wait::until_ready(&cluster.client, NAMESPACE, &workloads, a.timeout)
            .await
            .with_context(|| format!("context {ctx}: waiting for the mesh to be ready"))?;
    }
    println!(
        "cluster {cluster_name} (ID {cluster_id}) installed in context {ctx}{}",
        if a.wait { " and ready" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn uninstall(a: UninstallArgs) -> Result<ExitCode> {
    let cluster = Cluster::open(&a.kube, a.context.as_deref()).await?;
    let ctx = cluster.context.clone();
    let mut deleted = 0;
    for kind in &KINDS {
        deleted += prune(&cluster, kind, &[], "deleted").await?.len();
    }
    // What install did not create, named so the user can decide.
    let mut left = Vec::new();
    let secrets = cluster
        .api::<Secret>()
        .list(&ListParams::default())
        .await
        .with_context(|| format!("context {ctx}: list Secrets in {}", cluster.namespace))?;
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(cluster.client.clone());
    let ours = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    if let Ok(list) = crds.list(&ListParams::default().labels(&ours)).await {
        for c in list.items {
            left.push(format!(
                "customresourcedefinition/{} (the network policies written with it stay; kubectl delete it to drop them)",
                c.metadata.name.unwrap_or_default()
            ));
        }
    }
    for s in secrets.items {
        let labels = s.metadata.labels.unwrap_or_default();
        if labels.contains_key(model::objects::PEER_LABEL)
            || labels.contains_key(model::objects::GRANT_LABEL)
        {
            left.push(format!(
                "secret/{} (written by clustermesh connect; clustermesh disconnect removes it)",
                s.metadata.name.unwrap_or_default()
            ));
        }
    }
    if cluster
        .api::<ConfigMap>()
        .get_opt(model::objects::STATUS_CONFIGMAP)
        .await
        .with_context(|| {
            format!(
                "context {ctx}: read ConfigMap {}",
                model::objects::STATUS_CONFIGMAP
            )
        })?
        .is_some()
    {
        left.push(format!(
            "configmap/{} (the apiserver's status)",
            model::objects::STATUS_CONFIGMAP
        ));
    }
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = cluster.api();
    if leases
        .get_opt("clustermesh-apiserver")
        .await
        .with_context(|| format!("context {ctx}: read Lease clustermesh-apiserver"))?
        .is_some()
    {
        left.push("lease/clustermesh-apiserver (the apiserver's leader election)".into());
    }
    let pvcs: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = cluster.api();
    let list = match pvcs
        .list(&ListParams::default().labels("app=clustermesh-etcd"))
        .await
    {
        Ok(l) => l.items,
        // The API serves no PersistentVolumeClaims at all (a test server): there are none.
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => {
            return Err(anyhow!(e))
                .with_context(|| format!("context {ctx}: list PersistentVolumeClaims"));
        }
    };
    for p in list {
        left.push(format!(
            "persistentvolumeclaim/{} (etcd's data, with the identity allocations; kubectl delete it to drop them)",
            p.metadata.name.unwrap_or_default()
        ));
    }
    if deleted == 0 {
        println!("nothing installed by clustermesh install in context {ctx}");
    } else {
        println!("clustermesh uninstalled from context {ctx} ({deleted} objects deleted)");
    }
    for l in &left {
        println!("left in place: {l}");
    }
    Ok(ExitCode::SUCCESS)
}
