//! Test harness pieces. Test infrastructure only: never linked into a production binary.
//!
//! * [`etcd::Etcd`]: a real etcd (Debian `etcd-server` 3.4) on free loopback ports, with a
//!   temporary data dir and mTLS certificates from the `certs` crate; stopped and cleaned up on
//!   drop, also when a test panics, and killed by the kernel if the test process dies
//!   (`setpriv --pdeathsig`);
//! * [`proxy::Proxy`]: a TCP proxy whose connections a test can cut, to simulate a network
//!   failure between a client and a server;
//! * [`eventually`]: wait for a condition with a deadline instead of sleeping;
//! * [`kube::create_with_status`]: create an object the way a client of a real apiserver must
//!   when it also reports a status (a Pod's IP and phase).

pub mod etcd;
pub mod kube;
pub mod proxy;

use std::future::Future;
use std::time::Duration;

pub use etcd::Etcd;
pub use proxy::Proxy;

/// Polls `check` until it returns `Some`, every 20 ms, for at most `timeout`. Panics with
/// `what` when the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match within(what, timeout, check).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`eventually`] for code that reports instead of panicking (the lab's commands): the value,
/// or an error naming `what` when the deadline passes.
pub async fn within<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for: {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name that no other test (or earlier run) uses: `prefix` plus the process ID and a counter.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `leaf` and its CA as `tls.crt`, `tls.key`, `ca.crt` in `dir` (the layout of a
/// Kubernetes TLS Secret) and returns the files.
pub fn write_tls(
    dir: &std::path::Path,
    ca: &certs::Ca,
    leaf: &certs::Leaf,
) -> std::io::Result<certs::TlsFiles> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(dir.join("tls.crt"), &leaf.cert_pem)?;
    write_secret(&dir.join("tls.key"), &leaf.key_pem)?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    Ok(certs::TlsFiles::in_dir(dir))
}

/// Writes a private key (or anything secret) readable by its owner only (0600), also when
/// the file existed with wider permissions.
pub fn write_secret(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET path` over plain HTTP/1.1; the whole response (status line, headers, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The `p` quantile (0..=1) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no VmRSS"))
}

/// For benchmarks that need a network namespace of their own: the first call re-executes the
/// current binary (same arguments) inside a fresh namespace `<prefix><pid>` with its loopback
/// up, through `nsenter --net` so that bpffs and cgroupfs stay visible, deletes the namespace
/// when it ends and exits with its status. Inside, it returns the namespace's name.
pub fn reexec_in_private_netns(prefix: &str) -> String {
    const VAR: &str = "CLUSTERMESH_BENCH_NETNS";
    if let Ok(name) = std::env::var(VAR) {
        return name;
    }
    let name = format!("{prefix}{}", std::process::id());
    let run = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        run(&["netns", "add", &name]) && run(&["-n", &name, "link", "set", "lo", "up"]),
        "cannot create network namespace {name} (root needed)"
    );
    let status = std::env::current_exe().and_then(|exe| {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{name}"))
            .arg(exe)
            .args(std::env::args().skip(1))
            .env(VAR, &name)
            .status()
    });
    let _ = run(&["netns", "del", &name]);
    std::process::exit(status.ok().and_then(|s| s.code()).unwrap_or(1));
}
