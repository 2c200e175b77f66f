//! The lab kubelet's second part (issue #15): runs one resolved container
//! ([`kubelet::ProcessSpec`](crate::kubelet::ProcessSpec)) as a real process the way a kubelet
//! and a container runtime would, and keeps it running.
//!
//! - **Its own root filesystem**: a private mount namespace whose root is a fresh tmpfs with
//!   the host's userland (`/usr`, `/etc`, ... — the lab's "image") bound read-only, `/proc`,
//!   `/sys`, `/dev`, an empty `/tmp`, the built binary's directory, each volume at its
//!   `mountPath` (read-only when the mount says so) and the pod's `/etc/hosts` (the cluster's
//!   Service and pod names) and `/etc/resolv.conf` (no cluster DNS in the lab: a server that
//!   is not there, so lookups of other names fail at once). Nothing is created on the host's own filesystem outside the pod's
//!   lab directory. `readOnlyRootFilesystem` remounts that root read-only.
//! - **Its user**: `runAsUser`/`runAsGroup`, `fsGroup` as a supplementary group, volumes' files
//!   owned by root and the `fsGroup` with group read (and write for writable volumes), as the
//!   kubelet's volume ownership does; capabilities: the bounding, inheritable and ambient sets
//!   limited to what `securityContext.capabilities` adds after dropping `ALL`.
//! - **Its network and cgroup**: the pod's network namespace (or the node's for
//!   `hostNetwork`) and the pod's cgroup.
//! - **Probes and restarts**: the readiness probe (`httpGet`; run every `periodSeconds`, at most
//!   every second: the lab is in a hurry where a cluster is not) decides `ready`; a container that
//!   exits is started again after a back-off (1 s, doubling, at most 10 s in the lab) and its
//!   restart count grows; [`Supervisor::pod_status`] is the Pod `status` to write.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Container;

use crate::kubelet::{ProcessSpec, Source};

/// Where and as whom a pod's containers run.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The pod's name (its hostname in `/etc/hosts`).
    pub pod: String,
    /// The pod's network namespace under `/run/netns` (`None`: the caller's, for
    /// `hostNetwork` pods started from the node's namespace).
    pub netns: Option<String>,
    /// The pod's address (readiness probes go there).
    pub ip: IpAddr,
    /// The pod's cgroup (created by the caller).
    pub cgroup: PathBuf,
    /// The pod's lab directory: volumes, `hosts`, the root mount point, logs.
    pub dir: PathBuf,
    /// Claims (PersistentVolumeClaims) live here, one directory each, across restarts.
    pub claims: PathBuf,
    /// Extra `/etc/hosts` lines: address → names.
    pub hosts: Vec<(IpAddr, Vec<String>)>,
    /// `runAsUser`, `runAsGroup`.
    pub user: Option<(u32, u32)>,
    /// `fsGroup`.
    pub fs_group: Option<u32>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// The lab node's own view of host paths: a `hostPath` volume under the first path is
    /// the second (a lab node's `/sys/fs/bpf` is its pin directory, its `/sys/fs/cgroup` its
    /// cgroup).
    pub host_paths: Vec<(PathBuf, PathBuf)>,
}

/// A readiness probe (`httpGet` only: what `deploy/` uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    /// Path and query.
    pub path: String,
    /// Port.
    pub port: u16,
    /// `periodSeconds`.
    pub period: Duration,
}

impl HttpProbe {
    /// The readiness probe of `c`, its named port resolved; `None` when it has none.
    pub fn readiness(c: &Container) -> Result<Option<Self>> {
        let Some(p) = c.readiness_probe.as_ref() else {
            return Ok(None);
        };
        let Some(get) = p.http_get.as_ref() else {
            bail!("container {}: readiness probe: only httpGet is run", c.name);
        };
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let port = match &get.port {
            IntOrString::Int(n) => u16::try_from(*n)?,
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .with_context(|| format!("container {}: no port named {name}", c.name))?,
        };
        Ok(Some(Self {
            path: get.path.clone().unwrap_or_else(|| "/".into()),
            port,
            period: Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64),
        }))
    }
}

/// Writes the container's volumes under the pod's directory; returns (host path, mount path,
/// read-only) per mount. `token(audience, seconds)` mints projected ServiceAccount tokens.
pub fn materialize(
    sandbox: &Sandbox,
    spec: &ProcessSpec,
    token: &dyn Fn(&str, i64) -> Result<String>,
) -> Result<Vec<(PathBuf, String, bool)>> {
    let own = |path: &Path, mode: u32, writable: bool| own(path, mode, writable, sandbox.fs_group);
    let mut out = Vec::new();
    for m in &spec.mounts {
        let host = match &m.source {
            Source::HostPath(p) => sandbox
                .host_paths
                .iter()
                .find_map(|(from, to)| p.strip_prefix(from).ok().map(|rest| to.join(rest)))
                .unwrap_or_else(|| p.clone()),
            Source::EmptyDir { .. } => {
                let d = sandbox.dir.join("volumes").join(&m.volume);
                std::fs::create_dir_all(&d)?;
                own(&d, 0o777, true)?;
                d
            }
            Source::Claim(c) => {
                let d = sandbox.claims.join(c);
                std::fs::create_dir_all(&d)?;
                own(&d, 0o770, true)?;
                d
            }
            Source::Files { files, tokens } => {
                let d = sandbox.dir.join("volumes").join(&m.volume);
                let _ = std::fs::remove_dir_all(&d);
                std::fs::create_dir_all(&d)?;
                own(&d, 0o755, false)?;
                let group = sandbox.fs_group;
                for (rel, (content, mode)) in files {
                    replace_file(&d.join(rel), content, *mode, group)?;
                }
                for (rel, (audience, seconds, mode)) in tokens {
                    replace_file(
                        &d.join(rel),
                        token(audience, *seconds)?.as_bytes(),
                        *mode,
                        group,
                    )?;
                }
                d
            }
        };
        out.push((host, m.path.clone(), m.read_only));
    }
    Ok(out)
}

/// Gives `path` `mode`, owned by root and the pod's `fsGroup` when it has one (the group may
/// read what the owner may read; write too on writable volumes).
fn own(path: &Path, mode: u32, writable: bool, group: Option<u32>) -> Result<()> {
    let mut mode = mode;
    if let Some(g) = group {
        chown(path, Some(0), Some(g))?;
        mode |= (mode & 0o500) >> 3;
        if writable {
            mode |= (mode & 0o200) >> 3;
        }
        if path.is_dir() {
            mode |= 0o2000; // new files keep the group
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// What the kubelet does when a Secret or ConfigMap a running pod mounts changes: the files
/// of every such volume whose content in `new` differs from `old` are replaced, each whole
/// (written beside, then renamed over), so the container sees the new content without a
/// restart. Projected tokens are left as they are. Returns the volumes updated.
pub fn refresh_files(
    sandbox: &Sandbox,
    old: &ProcessSpec,
    new: &ProcessSpec,
) -> Result<Vec<String>> {
    let mut updated = Vec::new();
    for m in &new.mounts {
        let Source::Files { files, .. } = &m.source else {
            continue;
        };
        let before = old.mounts.iter().find(|o| o.volume == m.volume);
        let same =
            matches!(before.map(|b| &b.source), Some(Source::Files { files: f, .. }) if f == files);
        if same || before.is_none() {
            continue;
        }
        let d = sandbox.dir.join("volumes").join(&m.volume);
        for (rel, (content, mode)) in files {
            replace_file(&d.join(rel), content, *mode, sandbox.fs_group)?;
        }
        updated.push(m.volume.clone());
    }
    Ok(updated)
}

/// Writes `path` whole with `content` and `mode` (written beside, then renamed over: a reader
/// sees the old file or the new one), its directory made when missing.
fn replace_file(path: &Path, content: &[u8], mode: u32, group: Option<u32>) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("lab-new");
    std::fs::write(&tmp, content)?;
    own(&tmp, mode, false, group)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Replaces the projected token files of `spec`'s volumes with new tokens from `token`, each
/// whole (written beside, then renamed over).
pub fn rewrite_tokens(
    sandbox: &Sandbox,
    spec: &ProcessSpec,
    token: &dyn Fn(&str, i64) -> Result<String>,
) -> Result<()> {
    for m in &spec.mounts {
        let Source::Files { tokens, .. } = &m.source else {
            continue;
        };
        let d = sandbox.dir.join("volumes").join(&m.volume);
        for (rel, (audience, seconds, mode)) in tokens {
            replace_file(
                &d.join(rel),
                token(audience, *seconds)?.as_bytes(),
                *mode,
                sandbox.fs_group,
            )?;
        }
    }
    Ok(())
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The shell script that builds the root and executes the container in it (run by
/// `unshare --mount --propagation private`).
pub fn script(sandbox: &Sandbox, spec: &ProcessSpec, mounts: &[(PathBuf, String, bool)]) -> String {
    let root = sandbox.dir.join("root");
    let r = quote(&root.display().to_string());
    let mut s = String::from("set -eu\n");
    s.push_str(&format!(
        "echo $$ > {}\n",
        quote(&sandbox.cgroup.join("cgroup.procs").display().to_string())
    ));
    s.push_str(&format!(
        "mkdir -p {r}\nmount -t tmpfs -o mode=755 cmroot {r}\n"
    ));
    // The "image": the host's userland, read-only; merged-/usr symlinks kept as links.
    s.push_str(&format!(
        "for d in bin sbin lib lib32 lib64 libx32 usr etc opt; do\n\
         \x20 if [ -L /$d ]; then ln -s \"$(readlink /$d)\" {r}/$d\n\
         \x20 elif [ -d /$d ]; then mkdir {r}/$d; mount --bind /$d {r}/$d; mount -o remount,bind,ro {r}/$d; fi\n\
         done\n"
    ));
    s.push_str(&format!(
        "mkdir -p {r}/proc {r}/sys {r}/dev {r}/tmp {r}/run {r}/var\n\
         mount --rbind /proc {r}/proc\nmount --rbind /sys {r}/sys\nmount --rbind /dev {r}/dev\n\
         mount -t tmpfs -o mode=1777 cmtmp {r}/tmp\n"
    ));
    // The built binary's directory, where the lab keeps it.
    if let Some(bin_dir) = Path::new(&spec.argv[0]).parent() {
        let b = quote(&bin_dir.display().to_string());
        let rb = quote(
            &root
                .join(bin_dir.strip_prefix("/").unwrap_or(bin_dir))
                .display()
                .to_string(),
        );
        s.push_str(&format!(
            "if [ ! -d {rb} ]; then mkdir -p {rb}; mount --bind {b} {rb}; mount -o remount,bind,ro {rb}; fi\n"
        ));
    }
    for (host, path, ro) in mounts {
        let target = quote(
            &root
                .join(path.trim_start_matches('/'))
                .display()
                .to_string(),
        );
        let src = quote(&host.display().to_string());
        s.push_str(&format!(
            "mkdir -p {target}\nmount --rbind {src} {target}\n"
        ));
        if *ro {
            s.push_str(&format!("mount -o remount,bind,ro {target}\n"));
        }
    }
    s.push_str(&format!(
        "mount --bind {} {r}/etc/hosts\n",
        quote(&sandbox.dir.join("hosts").display().to_string())
    ));
    // The kubelet writes the pod's resolv.conf; the lab has no cluster DNS (names are in
    // /etc/hosts), so it names a server that answers at once that it is not there, instead of
    // the host's, which a pod's namespace cannot reach (each query would time out).
    s.push_str(&format!(
        "if [ -f {r}/etc/resolv.conf ] && [ ! -L {r}/etc/resolv.conf ]; then mount --bind {} {r}/etc/resolv.conf; fi\n",
        quote(&sandbox.dir.join("resolv.conf").display().to_string())
    ));
    if sandbox.read_only_root {
        s.push_str(&format!("mount -o remount,ro {r}\n"));
    }
    // Who it runs as, with which capabilities.
    let mut priv_args: Vec<String> = Vec::new();
    if let Some((u, g)) = sandbox.user {
        priv_args.push(format!("--reuid={u}"));
        priv_args.push(format!("--regid={g}"));
        match sandbox.fs_group {
            Some(f) => priv_args.push(format!("--groups={f}")),
            None => priv_args.push("--clear-groups".into()),
        }
    }
    if let Some(add) = &spec.capabilities {
        let caps: String = std::iter::once("-all".to_owned())
            .chain(
                add.iter()
                    .map(|c| format!("+{}", c.to_lowercase().trim_start_matches("cap_"))),
            )
            .collect::<Vec<_>>()
            .join(",");
        priv_args.push(format!("--bounding-set={caps}"));
        priv_args.push(format!("--inh-caps={caps}"));
        priv_args.push(format!("--ambient-caps={caps}"));
    }
    priv_args.push("--no-new-privs".into());
    let env: Vec<String> = spec
        .env
        .iter()
        .map(|(k, v)| quote(&format!("{k}={v}")))
        .chain(std::iter::once(quote(
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )))
        .chain(std::iter::once(quote(&format!("HOSTNAME={}", sandbox.pod))))
        .collect();
    s.push_str(&format!(
        "cd {r}\nexec /usr/sbin/chroot {r} /usr/bin/setpriv {} /usr/bin/env -i {} {}\n",
        priv_args.join(" "),
        env.join(" "),
        spec.argv
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    s
}

/// A container's state, as the kubelet reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Its process runs.
    pub running: bool,
    /// The last readiness probe passed (no probe: running).
    pub ready: bool,
    /// Times it was started again after exiting.
    pub restarts: u32,
    /// The running process.
    pub pid: Option<u32>,
}

/// Runs one container and keeps it running until dropped (its process killed, its root
/// unmounted with its mount namespace).
#[derive(Debug)]
pub struct Supervisor {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    terminating: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    name: String,
    ip: IpAddr,
}

impl Supervisor {
    /// Starts container `name` of the pod in `sandbox`: writes its volumes and hosts file,
    /// starts it, probes it and restarts it when it exits. Its output goes to
    /// `<dir>/<name>.log`.
    pub fn start(
        sandbox: &Sandbox,
        name: &str,
        spec: &ProcessSpec,
        probe: Option<HttpProbe>,
        token: &dyn Fn(&str, i64) -> Result<String>,
    ) -> Result<Self> {
        std::fs::create_dir_all(&sandbox.dir)?;
        let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n");
        hosts.push_str(&format!("{}\t{}\n", sandbox.ip, sandbox.pod));
        for (ip, names) in &sandbox.hosts {
            hosts.push_str(&format!("{ip}\t{}\n", names.join(" ")));
        }
        std::fs::write(sandbox.dir.join("hosts"), hosts)?;
        std::fs::write(
            sandbox.dir.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )?;
        std::fs::set_permissions(
            sandbox.dir.join("resolv.conf"),
            std::fs::Permissions::from_mode(0o644),
        )?;
        std::fs::set_permissions(
            sandbox.dir.join("hosts"),
            std::fs::Permissions::from_mode(0o644),
        )?;
        let mounts = materialize(sandbox, spec, token)?;
        let script = script(sandbox, spec, &mounts);
        std::fs::write(sandbox.dir.join(format!("{name}.sh")), &script)?;
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &sandbox.netns {
            argv.push("nsenter".into());
            argv.push(format!("--net=/run/netns/{ns}"));
            argv.push("--".into());
        }
        argv.extend(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c"].map(String::from),
        );
        argv.push(script);
        let log = sandbox.dir.join(format!("{name}.log"));
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let terminating = Arc::new(AtomicBool::new(false));
        let (st, sp, term, ip) = (state.clone(), stop.clone(), terminating.clone(), sandbox.ip);
        let first = spawn(&argv, &log)?;
        set(&st, |s| {
            s.running = true;
            s.pid = Some(first.id());
            s.ready = probe.is_none();
        });
        let thread =
            std::thread::spawn(move || supervise(first, &argv, &log, probe, ip, &st, &sp, &term));
        Ok(Self {
            state,
            stop,
            terminating,
            thread: Some(thread),
            name: name.to_owned(),
            ip,
        })
    }

    /// Stops the container as the kubelet does when its pod is deleted: `SIGTERM`, then
    /// `SIGKILL` after `grace`; it is not started again. Returns whether it exited within
    /// `grace`.
    pub fn terminate(&self, grace: Duration) -> bool {
        self.terminating.store(true, Ordering::SeqCst);
        if let Some(pid) = self.state().pid {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + grace;
        while self.state().running {
            if Instant::now() >= deadline {
                self.stop.store(true, Ordering::SeqCst);
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The container's state now.
    pub fn state(&self) -> State {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The Pod `status` the kubelet would write for a pod of this one container.
    pub fn pod_status(&self) -> serde_json::Value {
        let s = self.state();
        let ready = if s.ready { "True" } else { "False" };
        serde_json::json!({
            "phase": "Running",
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
            ],
            "containerStatuses": [{
                "name": self.name,
                "ready": s.ready,
                "started": s.running,
                "restartCount": s.restarts,
                "image": "",
                "imageID": "",
                "state": if s.running {
                    serde_json::json!({"running": {}})
                } else {
                    serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}})
                },
            }],
        })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set(state: &Mutex<State>, f: impl FnOnce(&mut State)) {
    if let Ok(mut s) = state.lock() {
        f(&mut s);
    }
}

fn spawn(argv: &[String], log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))
}

/// HTTP GET `path` at `addr`: a 2xx or 3xx within a second.
fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok()
        && (head.starts_with(b"HTTP/1.1 2")
            || head.starts_with(b"HTTP/1.0 2")
            || head.starts_with(b"HTTP/1.1 3")
            || head.starts_with(b"HTTP/1.0 3"))
}

/// Kills the container: nsenter, unshare, the shell, chroot, setpriv and env each exec the
/// next, so the program is our child itself.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    mut child: Child,
    argv: &[String],
    log: &Path,
    probe: Option<HttpProbe>,
    ip: IpAddr,
    state: &Mutex<State>,
    stop: &AtomicBool,
    terminating: &AtomicBool,
) {
    let mut backoff = Duration::from_secs(1);
    let mut next_probe = Instant::now();
    let mut started = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            kill(&mut child);
            return;
        }
        match child.try_wait() {
            Ok(None) => {
                if let Some(p) = &probe
                    && Instant::now() >= next_probe
                {
                    let ok = http_ok(SocketAddr::new(ip, p.port), &p.path);
                    set(state, |s| s.ready = ok);
                    next_probe = Instant::now() + p.period.min(Duration::from_secs(1));
                }
                // Ten minutes up resets the back-off, as the kubelet does.
                if started.elapsed() > Duration::from_secs(600) {
                    backoff = Duration::from_secs(1);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = child.wait();
                set(state, |s| {
                    s.running = false;
                    s.ready = false;
                    s.pid = None;
                });
                if terminating.load(Ordering::SeqCst) {
                    return;
                }
                let until = Instant::now() + backoff;
                while Instant::now() < until {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match spawn(argv, log) {
                    Ok(c) => {
                        child = c;
                        started = Instant::now();
                        set(state, |s| {
                            s.running = true;
                            s.restarts += 1;
                            s.pid = Some(child.id());
                            s.ready = probe.is_none();
                        });
                        next_probe = Instant::now();
                    }
                    Err(_) => return,
                }
            }
        }
    }
}

/// The lab's kube-proxy for one Service in one network namespace: connections from it to
/// `vip` on `ports` go to one of `endpoints` (the same port), chosen at random per connection,
/// as kube-proxy's nftables mode does; a connection already made keeps its endpoint
/// (conntrack). Rewritten whole in one nftables transaction (no moment without a rule); the
/// table goes with the namespace. `gateway` gives the namespace a default route, so a
/// connection to the virtual address is routed before it is translated.
pub fn route_service(
    netns: &str,
    gateway: IpAddr,
    vip: IpAddr,
    ports: &[u16],
    endpoints: &[IpAddr],
) -> Result<()> {
    let table = format!("cmsvc_{}", vip.to_string().replace(['.', ':'], "_"));
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let rule = if endpoints.is_empty() {
        // No endpoint: refused at once, as kube-proxy does.
        format!(
            "ip daddr {vip} tcp dport {{ {} }} reject with tcp reset",
            ports.join(", ")
        )
    } else {
        let map: Vec<String> = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : {e}"))
            .collect();
        format!(
            "ip daddr {vip} tcp dport {{ {} }} dnat to numgen random mod {} map {{ {} }}",
            ports.join(", "),
            endpoints.len(),
            map.join(", ")
        )
    };
    let (hook, priority) = if endpoints.is_empty() {
        ("filter", "0")
    } else {
        ("nat", "-100")
    };
    // A table of the other kind (nat ↔ filter) is replaced: delete, then add, in one go.
    let script = format!(
        "table ip {table} {{}}\ndelete table ip {table}\n\
         table ip {table} {{\n  chain out {{\n    type {hook} hook output priority {priority}; policy accept;\n    {rule}\n  }}\n}}\n"
    );
    let _ = Command::new("ip")
        .args([
            "-n",
            netns,
            "route",
            "replace",
            "default",
            "via",
            &gateway.to_string(),
        ])
        .status();
    nft_in(netns, &script)
}

/// Runs the nftables `script` in network namespace `netns`, as one transaction.
pub fn nft_in(netns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("nft")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("nft in {netns}: {script}");
    }
    Ok(())
}
