//! `clustermesh certs`: a cluster CA, leaf certificates that carry mesh identities, rotation,
//! and a status view that says what expires when.
//!
//! Files use the Kubernetes TLS Secret layout: `tls.crt`, `tls.key`, `ca.crt` (and `ca.key`
//! in a CA directory). Files are replaced atomically (write, then rename), so components that
//! hot-reload never read half a file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use certs::identity::CertInfo;
use certs::{Ca, LeafSpec, MeshIdentity, Role, TlsFiles};
use clap::{Args, Subcommand, ValueEnum};

use crate::output::{self, Format};
use model::{ClusterId, ClusterName, NodeName};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, Subcommand)]
pub(crate) enum Certs {
    /// Create a new cluster CA in DIR (ca.crt, ca.key). Refuses to overwrite an existing one.
    Init {
        /// The cluster the CA belongs to.
        #[arg(long)]
        cluster_name: String,
        /// Where to write ca.crt and ca.key.
        #[arg(long)]
        out: PathBuf,
        /// Validity, e.g. `3650d`, `8760h`.
        #[arg(long, default_value = "3650d", value_parser = telemetry::duration::parse_positive)]
        valid_for: Duration,
        /// Create the cluster's etcd CA instead: a separate trust domain that signs only etcd's
        /// server certificate (`--role etcd`) and the apiserver's etcd client certificate
        /// (`--role apiserver`), so that no mesh certificate opens etcd. Keep its key offline.
        #[arg(long)]
        etcd: bool,
    },
    /// Issue a leaf certificate carrying a mesh identity into DIR (tls.crt, tls.key, ca.crt).
    Issue(IssueArgs),
    /// Re-issue the certificate in DIR with the same identity and SANs and a fresh validity.
    Rotate {
        /// Directory with ca.crt and ca.key of the issuing CA.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory with the tls.crt / tls.key to replace.
        #[arg(long)]
        dir: PathBuf,
        /// Validity of the new certificate.
        #[arg(long, default_value = "365d", value_parser = telemetry::duration::parse_positive)]
        valid_for: Duration,
    },
    /// Show identity and expiry of certificate files; exits 1 if any is expired or expires
    /// within --warn, or if a file holds no certificate.
    #[command(after_help = "Examples:\n  \
        clustermesh certs status ./east-tls                 # tls.crt and ca.crt in a directory\n  \
        clustermesh certs status ca.crt --warn 90d -o yaml")]
    Status {
        /// Certificate files (PEM), or directories holding tls.crt / ca.crt.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Warn (and exit 1) if a certificate expires within this time (e.g. `30d`, `72h`).
        #[arg(long, default_value = "30d", value_parser = telemetry::duration::parse_positive)]
        warn: Duration,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Debug, Args)]
pub(crate) struct IssueArgs {
    /// Directory with ca.crt and ca.key of the issuing CA.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Who the certificate is for.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Cluster the holder acts for (for `peer`: the remote cluster that will connect).
    #[arg(long)]
    cluster_name: String,
    /// That cluster's ID.
    #[arg(long)]
    cluster_id: String,
    /// Node name (required for, and only for, `node-agent`).
    #[arg(long)]
    node: Option<String>,
    /// DNS SANs (servers: the names clients connect to).
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// IP SANs (servers: the addresses clients connect to).
    #[arg(long = "ip")]
    ips: Vec<IpAddr>,
    /// Validity.
    #[arg(long, default_value = "365d", value_parser = telemetry::duration::parse_positive)]
    valid_for: Duration,
    /// Where to write tls.crt, tls.key and ca.crt.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Apiserver,
    Peer,
    NodeAgent,
    Admin,
    Etcd,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Apiserver => Role::Apiserver,
            RoleArg::Peer => Role::Peer,
            RoleArg::NodeAgent => Role::NodeAgent,
            RoleArg::Admin => Role::Admin,
            RoleArg::Etcd => Role::Etcd,
        }
    }
}

/// Writes `contents` to `path` atomically, with `mode` permissions.
pub(crate) fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("path has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))?;
    Ok(())
}

fn load_ca(dir: &Path) -> Result<Ca> {
    let cert = std::fs::read_to_string(dir.join("ca.crt"))
        .with_context(|| format!("read {}", dir.join("ca.crt").display()))?;
    let key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("read {}", dir.join("ca.key").display()))?;
    Ca::from_pem(&cert, &key).context("load CA")
}

fn write_leaf(out: &Path, leaf: &certs::Leaf, ca: &Ca) -> Result<()> {
    let files = TlsFiles::in_dir(out);
    // Key first: a reloader that sees the new certificate must find its key.
    write_atomic(&files.key, &leaf.key_pem, 0o600)?;
    write_atomic(&files.cert, &leaf.cert_pem, 0o644)?;
    write_atomic(&files.ca, ca.cert_pem(), 0o644)?;
    Ok(())
}

pub(crate) fn run(cmd: Certs) -> Result<ExitCode> {
    match cmd {
        Certs::Init {
            cluster_name,
            out,
            valid_for,
            etcd,
        } => {
            let name = ClusterName::new(cluster_name).context("--cluster-name")?;
            if out.join("ca.key").exists() {
                bail!(
                    "{} already holds a CA; refusing to overwrite it (every certificate it signed would stop working)",
                    out.display()
                );
            }
            let ca = if etcd {
                Ca::generate_etcd(&name, valid_for)?
            } else {
                Ca::generate(&name, valid_for)?
            };
            write_atomic(&out.join("ca.key"), ca.key_pem(), 0o600)?;
            write_atomic(&out.join("ca.crt"), ca.cert_pem(), 0o644)?;
            let what = if etcd { "etcd CA" } else { "CA" };
            println!("created {what} for cluster {name} in {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Certs::Issue(a) => {
            let mut problems = Vec::new();
            let name = ClusterName::new(a.cluster_name.clone())
                .map_err(|e| problems.push(format!("--cluster-name: {e}")))
                .ok();
            let id = a
                .cluster_id
                .parse::<ClusterId>()
                .map_err(|e| problems.push(format!("--cluster-id: {e}")))
                .ok();
            let role = Role::from(a.role);
            let node = match (&a.node, role) {
                (Some(n), Role::NodeAgent) => NodeName::new(n.clone())
                    .map_err(|e| problems.push(format!("--node: {e}")))
                    .ok(),
                (None, Role::NodeAgent) => {
                    problems.push("--node is required for --role node-agent".into());
                    None
                }
                (Some(_), _) => {
                    problems.push(format!("--node is only for --role node-agent, not {role}"));
                    None
                }
                (None, _) => None,
            };
            // Node agents serve too, but are verified by their identity, not by a name.
            if matches!(role, Role::Apiserver | Role::Etcd) && a.dns.is_empty() && a.ips.is_empty()
            {
                problems.push(format!(
                    "--role {role} serves TLS: give the names clients use with --dns and/or --ip"
                ));
            }
            let (Some(name), Some(id), true) = (name, id, problems.is_empty()) else {
                bail!("invalid arguments:\n  - {}", problems.join("\n  - "));
            };
            let ca = load_ca(&a.ca_dir)?;
            let identity = MeshIdentity {
                cluster: name,
                cluster_id: id,
                role,
                node,
            };
            let mut spec = LeafSpec::new(identity.clone()).dns(a.dns).ips(a.ips);
            spec.valid_for = a.valid_for;
            let leaf = ca.issue(&spec)?;
            write_leaf(&a.out, &leaf, &ca)?;
            println!("issued {identity} into {}", a.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Certs::Rotate {
            ca_dir,
            dir,
            valid_for,
        } => {
            let ca = load_ca(&ca_dir)?;
            let files = TlsFiles::in_dir(&dir);
            let der = CertificateDer::from_pem_file(&files.cert)
                .with_context(|| format!("read {}", files.cert.display()))?;
            let identity = MeshIdentity::from_cert_der(&der)
                .with_context(|| format!("{} carries no mesh identity", files.cert.display()))?;
            let info = CertInfo::from_der(&der)?;
            let mut spec = LeafSpec::new(identity.clone())
                .dns(info.dns_names)
                .ips(info.ips);
            spec.valid_for = valid_for;
            let leaf = ca.issue(&spec)?;
            write_leaf(&dir, &leaf, &ca)?;
            println!("rotated {identity} in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Certs::Status {
            paths,
            warn,
            output,
        } => status(&paths, warn, output),
    }
}

#[derive(Debug, serde::Serialize)]
struct Row {
    path: String,
    identity: Option<String>,
    subject: String,
    is_ca: bool,
    not_after_unix: Option<i64>,
    expires_in_days: Option<i64>,
    /// `ok`, `expiring`, `expired`, or `no-certificate` (a file without one).
    state: &'static str,
    fingerprint: Option<String>,
}

fn status(paths: &[PathBuf], warn: Duration, format: Format) -> Result<ExitCode> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let mut rows = Vec::new();
    for p in paths {
        let files: Vec<PathBuf> = if p.is_dir() {
            ["tls.crt", "ca.crt"]
                .iter()
                .map(|f| p.join(f))
                .filter(|f| f.is_file())
                .collect()
        } else {
            vec![p.clone()]
        };
        if files.is_empty() {
            bail!("{}: no tls.crt or ca.crt in this directory", p.display());
        }
        for f in files {
            let before = rows.len();
            for der in CertificateDer::pem_file_iter(&f)
                .with_context(|| format!("read {}", f.display()))?
            {
                let der = der.with_context(|| format!("parse {}", f.display()))?;
                let info = CertInfo::from_der(&der)?;
                let left = info.not_after_unix - now;
                let state = if left <= 0 {
                    "expired"
                } else if left < warn.as_secs() as i64 {
                    "expiring"
                } else {
                    "ok"
                };
                rows.push(Row {
                    path: f.display().to_string(),
                    identity: MeshIdentity::from_cert_der(&der)
                        .ok()
                        .map(|i| i.to_string()),
                    subject: info.subject,
                    is_ca: info.is_ca,
                    not_after_unix: Some(info.not_after_unix),
                    expires_in_days: Some(left / 86400),
                    state,
                    fingerprint: Some(info.fingerprint),
                });
            }
            // A file that holds no certificate (empty, a key, not PEM) is a problem, never an
            // empty answer.
            if rows.len() == before {
                rows.push(Row {
                    path: f.display().to_string(),
                    identity: None,
                    subject: String::new(),
                    is_ca: false,
                    not_after_unix: None,
                    expires_in_days: None,
                    state: "no-certificate",
                    fingerprint: None,
                });
            }
        }
    }
    if !output::structured(format, &rows)? {
        println!("{:<14} {:>6}  {:<45} PATH", "STATE", "DAYS", "IDENTITY");
        for r in &rows {
            let who = r.identity.clone().unwrap_or_else(|| {
                if r.is_ca {
                    format!("CA: {}", r.subject)
                } else if r.subject.is_empty() {
                    "-".to_owned()
                } else {
                    r.subject.clone()
                }
            });
            let days = r
                .expires_in_days
                .map_or_else(|| "-".to_owned(), |d| d.to_string());
            println!("{:<14} {days:>6}  {who:<45} {}", r.state, r.path);
        }
    }
    Ok(if rows.iter().all(|r| r.state == "ok") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
