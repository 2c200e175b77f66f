//! `clustermesh drill`: a failover drill on a global service, measured from a client.
//!
//! A probe process connects to the service's ClusterIP every `--interval` from the client's
//! network namespace and cgroup (where the node agent attached socket load balancing) and
//! learns which backend each connection really reached from the kernel's socket table
//! (`/proc/net/tcp`: the socket LB rewrites the destination at connect(), so the socket's peer
//! is the backend). The drill takes the local backends down (marks their endpoints not ready,
//! or runs a command, e.g. one that kills them), waits until the client is served elsewhere,
//! holds, brings them back and waits until the client is served locally again.
//!
//! Whatever it takes down is recorded first ([`restore::Guard`]); SIGINT or SIGTERM at any
//! point stops the probe, restores exactly that and exits 130 / 143 ([`restore`]).
//!
//! Each event of the timeline is printed to stderr as it happens ([`timeline`]), with the
//! progress lines (`drill: ...`); stdout holds only the final report, so `-o json|yaml` stays
//! one clean document.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use crate::kctx::{Cluster, KubeArgs};
use crate::output::{self, Format};

mod restore;
mod timeline;

use restore::{Guard, Interrupt, Signals, run_shell};
use timeline::{Event, Timeline};

/// How the local backends are taken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Method {
    /// Mark every local endpoint of the service not ready (EndpointSlice conditions), restore
    /// them afterwards: exercises the control plane path.
    NotReady,
    /// Run --down-cmd and --up-cmd (e.g. kill the backends and start them again): exercises
    /// the node agents' health checks.
    Command,
}

#[derive(Debug, Args)]
pub(crate) struct DrillArgs {
    /// The cluster whose local backends go down (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// The global service, `namespace/name`.
    #[arg(long)]
    service: String,
    /// The service port (default: its first port).
    #[arg(long)]
    port: Option<u16>,
    /// How the local backends are taken down.
    #[arg(long, value_enum, default_value = "not-ready")]
    method: Method,
    /// Shell command that takes the local backends down (with --method command).
    #[arg(long)]
    down_cmd: Option<String>,
    /// Shell command that brings them back (with --method command).
    #[arg(long)]
    up_cmd: Option<String>,
    /// Network namespace the client runs in (a path such as /run/netns/NAME; default: ours).
    #[arg(long)]
    client_netns: Option<PathBuf>,
    /// cgroup (v2 directory) the client runs in; it must be under a node agent's cgroup
    /// (default: ours).
    #[arg(long)]
    client_cgroup: Option<PathBuf>,
    /// Time between the client's connections.
    #[arg(long, default_value = "20ms", value_parser = telemetry::duration::parse_positive)]
    interval: Duration,
    /// How long the backends stay down once traffic has failed over.
    #[arg(long, default_value = "2s", value_parser = telemetry::duration::parse_positive)]
    hold: Duration,
    /// Give up waiting for failover or recovery after this long.
    #[arg(long, default_value = "30s", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// SLO: first local failure (or the take-down) → first connection served remotely.
    #[arg(long, default_value = "1s", value_parser = telemetry::duration::parse_positive)]
    max_failover: Duration,
    /// SLO: bring-up → first connection served locally again.
    #[arg(long, default_value = "10s", value_parser = telemetry::duration::parse_positive)]
    max_recover: Duration,
    /// SLO: failed connections during the drill (unset: not checked).
    #[arg(long)]
    max_failures: Option<u64>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    /// `ip:port` to connect to.
    #[arg(long)]
    target: SocketAddr,
    /// Time between connections.
    #[arg(long, default_value = "20ms", value_parser = telemetry::duration::parse_positive)]
    interval: Duration,
    /// Connect timeout.
    #[arg(long, default_value = "500ms", value_parser = telemetry::duration::parse_positive)]
    timeout: Duration,
    /// Stop after this many connections (0: until stdout closes).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// One connection attempt, as the probe prints it (one JSON line each).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Attempt {
    /// Start, µs since the epoch.
    pub t: i64,
    /// Whether connect() succeeded.
    pub ok: bool,
    /// The backend the socket reached.
    pub backend: Option<String>,
    /// The error, when not ok.
    pub error: Option<String>,
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Finds the real peer of the socket with inode `inode` in this network namespace's socket
/// tables.
fn socket_peer(inode: u64) -> Option<SocketAddr> {
    for (file, v6) in [("/proc/self/net/tcp", false), ("/proc/self/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9].parse::<u64>().ok() != Some(inode) {
                continue;
            }
            let (addr, port) = f[2].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip: IpAddr = if v6 {
                let mut b = [0u8; 16];
                for i in 0..4 {
                    let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                    b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                let v6 = std::net::Ipv6Addr::from(b);
                v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
            } else {
                IpAddr::V4(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes().into())
            };
            return Some(SocketAddr::new(ip, port));
        }
    }
    None
}

fn inode_of(stream: &TcpStream) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", stream.as_raw_fd())).ok()?;
    let s = link.to_string_lossy();
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The probe: runs in the client's namespace and cgroup, prints one [`Attempt`] per line.
pub(crate) fn probe(args: ProbeArgs) -> Result<std::process::ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        let t = now_micros();
        let attempt = match TcpStream::connect_timeout(&args.target, args.timeout) {
            Ok(s) => {
                let backend = inode_of(&s).and_then(socket_peer).map(|a| a.to_string());
                Attempt {
                    t,
                    ok: true,
                    backend,
                    error: None,
                }
            }
            Err(e) => Attempt {
                t,
                ok: false,
                backend: None,
                error: Some(e.to_string()),
            },
        };
        let line = serde_json::to_string(&attempt)?;
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The drill closed our stdout: done.
            return Ok(std::process::ExitCode::SUCCESS);
        }
        n += 1;
        if args.count > 0 && n >= args.count {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let interval = args.interval;
        if let Some(rest) = interval.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// A running probe process and its attempts.
struct Prober {
    child: std::process::Child,
    rx: tokio::sync::mpsc::UnboundedReceiver<Attempt>,
    seen: Vec<Attempt>,
}

impl Prober {
    fn start(
        target: SocketAddr,
        interval: Duration,
        netns: Option<&PathBuf>,
        cgroup: Option<&PathBuf>,
    ) -> Result<Self> {
        let me = std::env::current_exe().context("find the clustermesh binary")?;
        let mut script = String::from("set -e\n");
        if let Some(cg) = cgroup {
            script.push_str(&format!("echo $$ > '{}/cgroup.procs'\n", cg.display()));
        }
        let probe = format!(
            "'{}' probe --target {target} --interval {}ms",
            me.display(),
            interval.as_millis().max(1)
        );
        match netns {
            Some(ns) => script.push_str(&format!(
                "exec nsenter --net='{}' -- {probe}\n",
                ns.display()
            )),
            None => script.push_str(&format!("exec {probe}\n")),
        }
        // A process group of its own: a Ctrl-C at the terminal reaches the drill only, which
        // stops the probe itself.
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("start the probe")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("probe stdout"))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(a) = serde_json::from_str::<Attempt>(&line)
                    && tx.send(a).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            rx,
            seen: Vec::new(),
        })
    }

    /// The next attempt, waiting up to `wait` for it.
    async fn next(&mut self, wait: Duration) -> Result<Option<Attempt>> {
        match tokio::time::timeout(wait, self.rx.recv()).await {
            Ok(Some(a)) => {
                self.seen.push(a.clone());
                Ok(Some(a))
            }
            Err(_) => Ok(None),
            Ok(None) => Err(self.stopped()),
        }
    }

    /// Takes the attempts that arrived so far.
    fn drain(&mut self) -> Result<()> {
        loop {
            match self.rx.try_recv() {
                Ok(a) => self.seen.push(a),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return Err(self.stopped());
                }
            }
        }
    }

    fn stopped(&mut self) -> anyhow::Error {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        anyhow!("the probe stopped: {}", err.trim())
    }

    /// Reads attempts until `done` holds for `streak` attempts in a row; returns the attempt
    /// that started the streak.
    async fn until(
        &mut self,
        streak: usize,
        deadline: Instant,
        mut done: impl FnMut(&Attempt) -> bool,
        what: &str,
    ) -> Result<Attempt> {
        let mut run: Vec<Attempt> = Vec::new();
        loop {
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what}");
            }
            if let Some(a) = self.next(Duration::from_millis(200)).await? {
                if done(&a) {
                    run.push(a);
                    if run.len() >= streak {
                        return Ok(run.swap_remove(0));
                    }
                } else {
                    run.clear();
                }
            }
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The drill's result.
#[derive(Debug, Serialize)]
struct Report {
    service: String,
    cluster: String,
    method: Method,
    frontend: String,
    local_backends: Vec<String>,
    timeline: Vec<Event>,
    attempts: usize,
    failures: usize,
    /// Failed connections per backend the drill took down (passive health: at most 1 per
    /// client node).
    failures_per_backend: f64,
    served_local: usize,
    served_remote: usize,
    detect_ms: f64,
    failover_ms: f64,
    recover_ms: f64,
    slo: Vec<Slo>,
    passed: bool,
}

#[derive(Debug, Serialize)]
struct Slo {
    name: String,
    value: f64,
    limit: f64,
    passed: bool,
}

/// What a drill runs on, once looked up.
struct Subject<'a> {
    args: &'a DrillArgs,
    /// The cluster whose backends go down.
    cluster: &'a str,
    /// The service's frontend the client connects to.
    target: SocketAddr,
    /// The addresses of its local endpoints.
    local: &'a BTreeSet<IpAddr>,
}

fn is_local(a: &Attempt, local: &BTreeSet<IpAddr>) -> bool {
    a.backend
        .as_ref()
        .and_then(|b| b.parse::<SocketAddr>().ok())
        .is_some_and(|b| local.contains(&b.ip()))
}

/// Marks every endpoint of `slice` not ready (and not serving).
async fn mark_not_ready(
    api: &Api<EndpointSlice>,
    slice: &EndpointSlice,
    timeout: Duration,
) -> Result<()> {
    let name = slice.metadata.name.clone().unwrap_or_default();
    let mut endpoints = slice.endpoints.clone();
    for e in &mut endpoints {
        let mut c = e.conditions.clone().unwrap_or_default();
        c.ready = Some(false);
        c.serving = Some(false);
        e.conditions = Some(c);
    }
    let patch = serde_json::json!({ "endpoints": endpoints });
    tokio::time::timeout(
        timeout,
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await
    .map_err(|_| anyhow!("no answer within {timeout:?}"))
    .and_then(|r| r.map_err(anyhow::Error::new))
    .with_context(|| format!("patch EndpointSlice {name}"))?;
    Ok(())
}

/// Takes the local backends down, recording each object in `guard` before it changes.
async fn take_down(
    args: &DrillArgs,
    guard: &mut Guard,
    api: &Api<EndpointSlice>,
    namespace: &str,
    slices: &[EndpointSlice],
    addresses: &[IpAddr],
) -> Result<()> {
    match args.method {
        Method::NotReady => {
            for s in slices {
                guard.record_slice(namespace, s);
                mark_not_ready(api, s, args.timeout).await?;
            }
        }
        Method::Command => {
            guard.record_backends(
                &args.service,
                addresses,
                args.up_cmd.as_deref().unwrap_or_default(),
            );
            run_shell(
                args.down_cmd.as_deref().unwrap_or_default(),
                "--down-cmd",
                Some(args.timeout),
            )
            .await?;
        }
    }
    Ok(())
}

/// How a wait ended.
enum Step<T> {
    Done(T),
    Interrupted(Interrupt),
}

/// `f`, unless a signal comes first.
async fn race<T>(signals: &mut Signals, f: impl Future<Output = T>) -> Step<T> {
    tokio::select! {
        biased;
        s = signals.recv() => Step::Interrupted(s),
        v = f => Step::Done(v),
    }
}

/// `f` to its end, and the first signal that came meanwhile (each one is acknowledged).
async fn despite_signals<T>(
    signals: &mut Signals,
    f: impl Future<Output = T>,
    what: &str,
) -> (T, Option<Interrupt>) {
    tokio::pin!(f);
    let mut first = None;
    loop {
        tokio::select! {
            v = &mut f => return (v, first),
            s = signals.recv() => {
                first.get_or_insert(s);
                eprintln!("{s}: letting {what} finish, then restoring");
            }
        }
    }
}

/// Why the drill stops early.
enum Cause {
    Signal(Interrupt),
    Error(anyhow::Error),
}

/// Stops the probe, restores what the drill took down (one `restored:` line each) and ends:
/// 130 / 143 after a signal, the error after an error; non-zero, with the commands that
/// restore by hand, when something could not be restored.
async fn abort(
    probe: Prober,
    mut guard: Guard,
    signals: &mut Signals,
    cause: Cause,
) -> Result<std::process::ExitCode> {
    drop(probe);
    match &cause {
        Cause::Signal(s) => {
            eprintln!("interrupted by {s}: probe stopped, restoring what the drill took down");
        }
        Cause::Error(_) => eprintln!("the drill failed: restoring what it took down"),
    }
    let done = guard.restore(signals, true).await;
    let unrestored = (done.failed > 0).then(|| {
        format!(
            "{} of {} objects could not be restored: restore them by hand with the commands above",
            done.failed,
            done.failed + done.restored
        )
    });
    match (cause, unrestored) {
        (Cause::Signal(s), None) => Ok(s.exit_code()),
        (Cause::Signal(s), Some(u)) => bail!("interrupted by {s}; {u}"),
        (Cause::Error(e), None) => Err(e),
        (Cause::Error(e), Some(u)) => Err(e.context(u)),
    }
}

pub(crate) async fn run(args: DrillArgs) -> Result<std::process::ExitCode> {
    let (ns, name) = args
        .service
        .split_once('/')
        .ok_or_else(|| anyhow!("--service: {:?} is not namespace/name", args.service))?;
    if args.method == Method::Command && (args.down_cmd.is_none() || args.up_cmd.is_none()) {
        bail!("--method command needs --down-cmd and --up-cmd");
    }
    let cluster = Cluster::open(&args.kube, args.context.as_deref()).await?;
    let (cluster_name, _) = cluster.identity().await?;
    let svc = Api::<Service>::namespaced(cluster.client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("context {}: Service {}", cluster.context, args.service))?;
    let spec = svc.spec.unwrap_or_default();
    let vip: IpAddr = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| anyhow!("Service {} has no ClusterIP", args.service))?;
    let ports = spec.ports.unwrap_or_default();
    let port = match args.port {
        Some(p) if ports.iter().any(|sp| sp.port == i32::from(p)) => p,
        Some(p) => bail!("Service {} has no port {p}", args.service),
        None => ports
            .first()
            .and_then(|p| u16::try_from(p.port).ok())
            .ok_or_else(|| anyhow!("Service {} has no ports", args.service))?,
    };
    let slices_api = Api::<EndpointSlice>::namespaced(cluster.client.clone(), ns);
    let slices = slices_api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await?
        .items;
    let local: BTreeSet<IpAddr> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect();
    if local.is_empty() {
        bail!(
            "Service {} has no local endpoints in {cluster_name}: nothing to take down",
            args.service
        );
    }
    let target = SocketAddr::new(vip, port);
    // From here on SIGINT and SIGTERM do not end the process: every wait below also waits for
    // them, and whatever was taken down is restored before exiting.
    let mut signals = Signals::install()?;
    let mut guard = Guard::new(
        cluster.client.clone(),
        &cluster.context,
        args.kube.kubeconfig.clone(),
    );
    let mut probe = Prober::start(
        target,
        args.interval,
        args.client_netns.as_ref(),
        args.client_cgroup.as_ref(),
    )?;
    let deadline = Instant::now() + args.timeout;
    match race(
        &mut signals,
        probe.until(5, deadline, |a| a.ok && is_local(a, &local), "the client to reach a local backend before the drill (is the service's affinity local, and is the client in a node agent's cgroup?)"),
    )
    .await
    {
        Step::Done(r) => {
            r.context("baseline")?;
        }
        Step::Interrupted(s) => {
            drop(probe);
            eprintln!("interrupted by {s} before anything was taken down: nothing to restore");
            return Ok(s.exit_code());
        }
    }

    // Down. A signal meanwhile does not cut it short (half a take-down is hard to undo): it is
    // acted upon as soon as the take-down is over.
    let addresses: Vec<IpAddr> = local.iter().copied().collect();
    eprintln!(
        "drill: taking the local backends of {} down ({}); Ctrl-C restores them",
        args.service,
        match args.method {
            Method::NotReady => "marking their endpoints not ready",
            Method::Command => "--down-cmd",
        }
    );
    let t0 = now_micros();
    let (down, signal) = despite_signals(
        &mut signals,
        take_down(&args, &mut guard, &slices_api, ns, &slices, &addresses),
        "the take-down",
    )
    .await;
    let t0_done = now_micros();
    if let Some(s) = signal {
        return abort(probe, guard, &mut signals, Cause::Signal(s)).await;
    }
    if let Err(e) = down {
        return abort(probe, guard, &mut signals, Cause::Error(e)).await;
    }
    let mut timeline = Timeline::start(std::io::stderr(), t0);
    timeline.taken_down(args.method, local.len(), t0_done);
    eprintln!("drill: local backends down; waiting for traffic to fail over");
    let held = race(&mut signals, async {
        let first_remote = probe
            .until(
                10,
                Instant::now() + args.timeout,
                |a| {
                    timeline.saw(a);
                    a.ok && !is_local(a, &local)
                },
                "traffic to fail over to remote backends",
            )
            .await?;
        let last_bad = probe
            .seen
            .iter()
            .filter(|a| a.t >= t0 && a.t < first_remote.t)
            .rev()
            .find(|a| !a.ok || is_local(a, &local));
        timeline.failed_over(last_bad, &first_remote);
        eprintln!("drill: failed over; holding {:?}", args.hold);
        tokio::time::sleep(args.hold).await;
        probe.drain()?;
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match held {
        Step::Done(Ok(())) => {}
        Step::Done(Err(e)) => return abort(probe, guard, &mut signals, Cause::Error(e)).await,
        Step::Interrupted(s) => return abort(probe, guard, &mut signals, Cause::Signal(s)).await,
    }

    // Up: what the guard recorded, as an interruption would.
    eprintln!("drill: bringing the local backends back");
    let t1 = now_micros();
    let up = guard.restore(&mut signals, false).await;
    if up.failed > 0 {
        drop(probe);
        bail!(
            "could not bring the local backends back: restore them by hand with the commands above"
        );
    }
    if let Some(s) = up.signal {
        drop(probe);
        eprintln!("interrupted by {s}: the local backends are back");
        return Ok(s.exit_code());
    }
    timeline.brought_up(args.method, t1);
    let back = match race(
        &mut signals,
        probe.until(
            5,
            Instant::now() + args.timeout,
            |a| a.ok && is_local(a, &local),
            "traffic to return to local backends",
        ),
    )
    .await
    {
        Step::Done(r) => r?,
        Step::Interrupted(s) => {
            drop(probe);
            eprintln!(
                "interrupted by {s} after the local backends were brought back: nothing to restore"
            );
            return Ok(s.exit_code());
        }
    };
    timeline.back(&back);
    let attempts: Vec<Attempt> = std::mem::take(&mut probe.seen)
        .into_iter()
        .filter(|a| a.t >= t0)
        .collect();
    drop(probe);
    let subject = Subject {
        args: &args,
        cluster: cluster_name.as_str(),
        target,
        local: &local,
    };
    let report = analyse(&subject, &attempts, timeline);
    if !output::structured(args.output, &report)? {
        print!("{}", report_text(&report));
    }
    Ok(if report.passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// The report of a drill on `s` whose client made `attempts` (from the take-down on), with the
/// events and marks of its `timeline`.
fn analyse<W: Write>(s: &Subject<'_>, attempts: &[Attempt], timeline: Timeline<W>) -> Report {
    let (timeline, m) = timeline.finish();
    let (args, local) = (s.args, s.local);
    let ms = |t: i64| (t - m.t0) as f64 / 1000.0;
    let detect_ms = m.last_bad.map_or(0.0, ms);
    let failover_from = m.first_failure.unwrap_or(m.t0);
    let failover_ms = (m.first_remote - failover_from) as f64 / 1000.0;
    let recover_ms = (m.back - m.t1) as f64 / 1000.0;
    let failures = attempts.iter().filter(|a| !a.ok).count();
    let served_local = attempts
        .iter()
        .filter(|a| a.ok && is_local(a, local))
        .count();
    let served_remote = attempts
        .iter()
        .filter(|a| a.ok && !is_local(a, local))
        .count();
    let mut slo = vec![
        Slo {
            name: "failover".into(),
            value: failover_ms,
            limit: args.max_failover.as_secs_f64() * 1000.0,
            passed: failover_ms <= args.max_failover.as_secs_f64() * 1000.0,
        },
        Slo {
            name: "recover".into(),
            value: recover_ms,
            limit: args.max_recover.as_secs_f64() * 1000.0,
            passed: recover_ms <= args.max_recover.as_secs_f64() * 1000.0,
        },
    ];
    if let Some(max) = args.max_failures {
        slo.push(Slo {
            name: "failed connections".into(),
            value: failures as f64,
            limit: max as f64,
            passed: failures as u64 <= max,
        });
    }
    let passed = slo.iter().all(|s| s.passed);
    Report {
        service: args.service.clone(),
        cluster: s.cluster.to_owned(),
        method: args.method,
        frontend: s.target.to_string(),
        local_backends: local.iter().map(ToString::to_string).collect(),
        timeline,
        attempts: attempts.len(),
        failures,
        failures_per_backend: failures as f64 / local.len().max(1) as f64,
        served_local,
        served_remote,
        detect_ms,
        failover_ms,
        recover_ms,
        slo,
        passed,
    }
}

/// The report as a table: the same timeline lines as were printed live, then the figures.
fn report_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Failover drill: {} in {} (frontend {}, method {}, local backends {})",
        r.service,
        r.cluster,
        r.frontend,
        serde_json::to_value(r.method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        r.local_backends.join(", ")
    );
    let _ = writeln!(out);
    for e in &r.timeline {
        let _ = writeln!(out, "{}", e.line());
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "  connections: {} ({} local, {} remote, {} failed: {:.1} per backend taken down)",
        r.attempts, r.served_local, r.served_remote, r.failures, r.failures_per_backend
    );
    let _ = writeln!(
        out,
        "  detect {:.1} ms · failover {:.1} ms · recover {:.1} ms",
        r.detect_ms, r.failover_ms, r.recover_ms
    );
    for s in &r.slo {
        let unit = if s.name == "failed connections" {
            ""
        } else {
            " ms"
        };
        let _ = writeln!(
            out,
            "  SLO {:<18} {:>9.1}{unit} ≤ {:.1}{unit}  {}",
            s.name,
            s.value,
            s.limit,
            if s.passed { "PASS" } else { "FAIL" }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "{}", if r.passed { "PASSED" } else { "FAILED" });
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_probe_finds_where_a_socket_really_went() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = TcpStream::connect(addr).unwrap();
        let inode = inode_of(&s).unwrap();
        assert_eq!(socket_peer(inode), Some(addr));
        let l6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let a6 = l6.local_addr().unwrap();
        let s6 = TcpStream::connect(a6).unwrap();
        assert_eq!(socket_peer(inode_of(&s6).unwrap()), Some(a6));
        assert_eq!(socket_peer(u64::MAX), None);
    }

    #[test]
    fn attempts_are_local_by_backend_address() {
        let local: BTreeSet<IpAddr> = ["10.1.0.1".parse().unwrap()].into();
        let a = |b: Option<&str>| Attempt {
            t: 0,
            ok: b.is_some(),
            backend: b.map(str::to_owned),
            error: None,
        };
        assert!(is_local(&a(Some("10.1.0.1:8080")), &local));
        assert!(!is_local(&a(Some("10.2.0.1:8080")), &local));
        assert!(!is_local(&a(None), &local));
    }

    fn not_ready_args() -> DrillArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            drill: DrillArgs,
        }
        Cli::parse_from(["drill", "--service", "demo/echo"]).drill
    }

    /// A writer the test reads while the timeline writes to it (stderr in the drill).
    #[derive(Clone, Default)]
    struct Live(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Live {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Live {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// A drill played from a fake clock: each event is printed the moment it is known, before
    /// anything later happens, and the report lists the very same lines.
    #[test]
    fn the_timeline_is_printed_as_it_happens_and_the_report_repeats_it() {
        const T0: i64 = 1_800_000_000_000_000;
        let local: BTreeSet<IpAddr> = ["10.1.0.1".parse().unwrap()].into();
        let at = |ms: i64, backend: Option<&str>| Attempt {
            t: T0 + ms * 1000,
            ok: backend.is_some(),
            backend: backend.map(str::to_owned),
            error: backend.is_none().then(|| "connection refused".to_owned()),
        };
        let (here, there) = (Some("10.1.0.1:8080"), Some("10.2.0.1:8080"));
        let live = Live::default();
        let mut timeline = Timeline::start(live.clone(), T0);
        timeline.taken_down(Method::NotReady, 1, T0 + 2_500);
        assert_eq!(
            live.lines(),
            ["        +0.0 ms  local backends marked not ready (1 endpoints, took 2.5 ms)"]
        );
        // The client, as the drill sees it while waiting for failover.
        let before = at(-20, here);
        let waiting = [
            at(0, here),
            at(20, here),
            at(40, None),
            at(60, None),
            at(80, there),
        ];
        timeline.saw(&before);
        timeline.saw(&waiting[0]);
        timeline.saw(&waiting[1]);
        assert_eq!(live.lines().len(), 1, "nothing happened yet");
        timeline.saw(&waiting[2]);
        assert_eq!(
            live.lines()[1..],
            ["       +40.0 ms  first failed connection: connection refused"],
            "printed when seen"
        );
        timeline.saw(&waiting[3]);
        timeline.saw(&waiting[4]);
        assert_eq!(live.lines().len(), 2, "one first failure");
        timeline.failed_over(Some(&waiting[3]), &waiting[4]);
        assert_eq!(
            live.lines()[2..],
            [
                "       +60.0 ms  last failed connection",
                "       +80.0 ms  first connection served remotely (10.2.0.1:8080); every later one too",
            ]
        );
        timeline.brought_up(Method::NotReady, T0 + 1_000_000);
        assert_eq!(
            live.lines()[4..],
            ["     +1000.0 ms  local endpoints restored"]
        );
        let back = at(1_250, here);
        timeline.back(&back);
        assert_eq!(
            live.lines()[5..],
            ["     +1250.0 ms  first connection served locally again (10.1.0.1:8080)"]
        );
        let printed = live.lines();

        let args = not_ready_args();
        let subject = Subject {
            args: &args,
            cluster: "east",
            target: "10.96.0.10:80".parse().unwrap(),
            local: &local,
        };
        let attempts: Vec<Attempt> = waiting.iter().cloned().chain([back]).collect();
        let report = analyse(&subject, &attempts, timeline);
        assert_eq!(live.lines(), printed, "the report is not printed live");
        assert_eq!(
            report.timeline.iter().map(Event::line).collect::<Vec<_>>(),
            printed
        );
        assert_eq!(
            (report.detect_ms, report.failover_ms, report.recover_ms),
            (60.0, 40.0, 250.0)
        );
        assert_eq!(
            (report.failures, report.served_local, report.served_remote),
            (2, 3, 1)
        );
        let text = report_text(&report);
        let table: Vec<&str> = text.lines().skip(2).take(printed.len()).collect();
        assert_eq!(table, printed, "{text}");
        assert!(text.ends_with("\nPASSED\n"), "{text}");
    }

    mod interrupted {
        //! The restore guard against the Kubernetes API test server: what the take-down
        //! changed is put back exactly, through transient errors; what cannot be is named with
        //! a command that really restores it.

        use k8s_openapi::api::core::v1::Namespace;
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
        use kube::api::PostParams;

        use super::*;

        fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
            Endpoint {
                addresses: vec![ip.to_owned()],
                conditions: ready.map(|r| EndpointConditions {
                    ready: Some(r),
                    serving: Some(r),
                    terminating: Some(false),
                }),
                ..Default::default()
            }
        }

        /// A test server with EndpointSlice `demo/echo-abc` (one endpoint ready, one without
        /// conditions), its client, and the slice as created.
        async fn server() -> (kube_testserver::Handle, kube::Client, EndpointSlice) {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let h = kube_testserver::start(kube_testserver::Config::new(
                model::ClusterName::new("east").unwrap(),
            ))
            .await
            .unwrap();
            let client = h.client().await.unwrap();
            let ns = Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some("demo".into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &ns)
                .await
                .unwrap();
            let slice = EndpointSlice {
                metadata: kube::api::ObjectMeta {
                    name: Some("echo-abc".into()),
                    namespace: Some("demo".into()),
                    labels: Some([("kubernetes.io/service-name".into(), "echo".into())].into()),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: vec![endpoint("10.1.0.1", Some(true)), endpoint("10.1.0.2", None)],
                ports: None,
            };
            let slice = Api::<EndpointSlice>::namespaced(client.clone(), "demo")
                .create(&PostParams::default(), &slice)
                .await
                .unwrap();
            (h, client, slice)
        }

        #[tokio::test]
        async fn restore_puts_the_endpoints_back_as_they_were_through_errors() {
            let (h, client, before) = server().await;
            let api = Api::<EndpointSlice>::namespaced(client.clone(), "demo");
            let mut guard = Guard::new(client.clone(), h.context(), None);
            take_down(
                &not_ready_args(),
                &mut guard,
                &api,
                "demo",
                std::slice::from_ref(&before),
                &[],
            )
            .await
            .unwrap();
            let down = api.get("echo-abc").await.unwrap();
            assert!(down.endpoints.iter().all(|e| {
                let c = e.conditions.clone().unwrap();
                c.ready == Some(false) && c.serving == Some(false)
            }));
            h.fail_next(2, 500);
            let done = guard.restore(&mut Signals::none(), false).await;
            assert_eq!((done.restored, done.failed), (1, 0), "{:?}", done.by_hand);
            assert_eq!(
                api.get("echo-abc").await.unwrap().endpoints,
                before.endpoints
            );
        }

        #[tokio::test]
        async fn a_second_signal_does_not_stop_a_restore_under_way() {
            let (h, client, before) = server().await;
            let api = Api::<EndpointSlice>::namespaced(client.clone(), "demo");
            let mut guard = Guard::new(client.clone(), h.context(), None);
            take_down(
                &not_ready_args(),
                &mut guard,
                &api,
                "demo",
                std::slice::from_ref(&before),
                &[],
            )
            .await
            .unwrap();
            // The API answers slowly; Ctrl-C twice while the restore waits for it.
            h.stall(Some(Duration::from_millis(500)));
            let (mut signals, tx) = Signals::fake();
            tx.send(Interrupt::Int).unwrap();
            tx.send(Interrupt::Int).unwrap();
            let done = guard.restore(&mut signals, false).await;
            h.stall(None);
            assert_eq!(done.signal, Some(Interrupt::Int));
            assert_eq!((done.restored, done.failed), (1, 0));
            assert_eq!(
                api.get("echo-abc").await.unwrap().endpoints,
                before.endpoints
            );
        }

        #[tokio::test]
        async fn a_failed_restore_prints_a_command_that_restores_by_hand() {
            let (h, client, before) = server().await;
            let api = Api::<EndpointSlice>::namespaced(client.clone(), "demo");
            let kubeconfig = h.kubeconfig().display().to_string();
            let mut guard = Guard::new(client.clone(), h.context(), Some(kubeconfig));
            take_down(
                &not_ready_args(),
                &mut guard,
                &api,
                "demo",
                std::slice::from_ref(&before),
                &[],
            )
            .await
            .unwrap();
            h.fail_next(100, 500);
            let done = guard.restore(&mut Signals::none(), true).await;
            h.fail_next(0, 500);
            assert_eq!((done.restored, done.failed), (0, 1));
            assert_ne!(
                api.get("echo-abc").await.unwrap().endpoints,
                before.endpoints
            );
            // The printed command, run as printed, is the restore.
            let home = tempfile::tempdir().unwrap();
            let out = tokio::process::Command::new("sh")
                .args(["-c", &done.by_hand[0]])
                .env("HOME", home.path())
                .output()
                .await
                .expect("kubectl must be installed (it is on the project's machines)");
            assert!(
                out.status.success(),
                "{}: {}",
                done.by_hand[0],
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                api.get("echo-abc").await.unwrap().endpoints,
                before.endpoints
            );
        }

        #[tokio::test]
        async fn backends_come_back_by_the_up_command_or_it_is_named() {
            let client =
                kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                    .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mark = dir.path().join("up");
            let up = format!("touch '{}'", mark.display());
            let ip: IpAddr = "10.1.0.1".parse().unwrap();
            let mut guard = Guard::new(client.clone(), "east", None);
            guard.record_backends("demo/echo", &[ip], &up);
            let done = guard.restore(&mut Signals::none(), false).await;
            assert_eq!((done.restored, done.failed), (1, 0));
            assert!(mark.exists());
            let mut guard = Guard::new(client, "east", None);
            guard.record_backends("demo/echo", &[ip], "exit 3");
            let done = guard.restore(&mut Signals::none(), false).await;
            assert_eq!((done.restored, done.failed), (0, 1));
            assert_eq!(done.by_hand, ["exit 3"]);
        }
    }
}
