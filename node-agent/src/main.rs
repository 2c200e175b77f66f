//! The `node-agent` binary: one per node. It programs the eBPF socket load balancing of its
//! node from the local apiserver's Mesh API stream and health-checks the backends.
//!
//! `--check` only validates the configuration and the node's prerequisites (bpffs mounted, the
//! node's cgroup on cgroup v2). On exit the programs stay attached and the maps pinned, so a
//! restarted agent takes over without interrupting connections.
//!
//! Must not write to etcd (only the apiserver does) nor talk to peers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use model::{ClusterId, ClusterName, NodeName};
use telemetry::env;

/// Programs this node's socket load-balancing for the mesh's global services.
#[derive(Debug, Parser)]
#[command(
    name = "node-agent",
    version = telemetry::version::LONG,
    long_about = "Programs this node's socket load-balancing for the mesh's global services.\n\n\
        Every flag can also be set through the environment variable shown with it. Durations \
        take a unit: 200ms, 1s, 1m30s.",
    after_help = "Example:\n  \
        node-agent --cluster-name east --cluster-id 1 --node-name east-node-1 \\\n    \
        --cgroup /sys/fs/cgroup/pods --apiserver 10.0.0.5:4240 --tls-dir /tls \\\n    \
        --enroll 10.0.0.5:4241 --enroll-token-file /var/run/secrets/clustermesh/token \\\n    \
        --health-interval 200ms --health-timeout 150ms --syn-timeout 200ms \\\n    \
        --probe-sweep-rate 50 --max-services 131072"
)]
struct Args {
    /// This node's cluster.
    #[arg(long, env = env::CLUSTER_NAME)]
    cluster_name: String,
    /// This node's cluster ID, 1..=4095.
    #[arg(long, env = env::CLUSTER_ID)]
    cluster_id: String,
    /// This node's name (the Kubernetes Node name).
    #[arg(long, env = env::NODE_NAME)]
    node_name: String,
    /// The cgroup (v2) whose processes get socket load balancing: the node's pods. `auto`
    /// finds the kubelet's pods cgroup under /sys/fs/cgroup (`kubepods.slice` with the systemd
    /// cgroup driver, `kubepods` with cgroupfs).
    #[arg(long, env = env::CGROUP, default_value = "auto")]
    cgroup: PathBuf,
    /// Where bpffs is mounted; maps and links are pinned below it.
    #[arg(long, env = env::BPFFS, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The local apiserver's Mesh API, comma-separated `host:port`.
    #[arg(long, env = env::APISERVER, value_delimiter = ',')]
    apiserver: Vec<String>,
    /// Directory with this node agent's client certificate (`tls.crt`, `tls.key`) and the
    /// cluster CA (`ca.crt`).
    #[arg(long, env = env::TLS_DIR)]
    tls_dir: Option<PathBuf>,
    /// The local apiserver's node-agent enrollment endpoint(s), comma-separated `host:port`.
    /// Set: the agent obtains its own certificate there (a new key, a certificate signing
    /// request, its projected ServiceAccount token from `--enroll-token-file`) when `--tls-dir`
    /// holds none of this node or one past two thirds of its lifetime, writes it into
    /// `--tls-dir`, and renews it before it expires.
    #[arg(long, env = env::ENROLL, value_delimiter = ',')]
    enroll: Vec<String>,
    /// The projected ServiceAccount token (audience `clustermesh`) enrollment authenticates
    /// with; read at every attempt.
    #[arg(long, env = env::ENROLL_TOKEN_FILE, default_value = "/var/run/secrets/clustermesh/token")]
    enroll_token_file: PathBuf,
    /// The cluster CA that enrollment verifies the apiserver with (before the agent holds a
    /// certificate and trust bundle of its own).
    #[arg(long, env = env::ENROLL_CA_FILE, default_value = "/var/run/secrets/clustermesh/ca.crt")]
    enroll_ca_file: PathBuf,
    /// Time between probes of a suspect or down backend, 10ms..=1m (e.g. `200ms`, `1s`).
    /// Healthy backends are not probed on this interval: the kernel reports failed
    /// connections at once, and the background sweep (`--probe-sweep-rate`) covers the rest.
    #[arg(long, env = env::HEALTH_INTERVAL, default_value = "200ms", value_parser = telemetry::duration::parse)]
    health_interval: Duration,
    /// How long a probe's connect may take, 10ms..=1m.
    #[arg(long, env = env::HEALTH_TIMEOUT, default_value = "150ms", value_parser = telemetry::duration::parse)]
    health_timeout: Duration,
    /// Failed probes in a row that confirm a suspect backend down.
    #[arg(long, env = env::FALL, default_value_t = 2)]
    fall: u32,
    /// Successful probes in a row that bring a down backend back.
    #[arg(long, env = env::RISE, default_value_t = 2)]
    rise: u32,
    /// Background probes per second, over all backends that carry no evidence, round robin
    /// (0: none). The node's probe load stays at this rate whatever the mesh's size.
    #[arg(long, env = env::PROBE_SWEEP_RATE, default_value_t = 50)]
    probe_sweep_rate: u32,
    /// Re-probes of suspect and down backends per second at most, all together (a mass failure
    /// never becomes a probe storm; the kernel keeps skipping them meanwhile).
    #[arg(long, env = env::PROBE_RETRY_RATE, default_value_t = 200)]
    probe_retry_rate: u32,
    /// Probes in flight at most.
    #[arg(long, env = env::PROBE_MAX_IN_FLIGHT, default_value_t = 256)]
    probe_max_in_flight: usize,
    /// How long the kernel skips a backend it saw fail when the agent says nothing (the agent
    /// confirms or clears it within a probe), 100ms..=10m.
    #[arg(long, env = env::QUARANTINE, default_value = "10s", value_parser = telemetry::duration::parse)]
    quarantine: Duration,
    /// Initial SYN retransmission timeout of connections to global services (`0s`: the
    /// kernel's 1s). A backend whose SYN is not answered within it is skipped by the next
    /// connect(); e.g. `200ms` when backends answer within a few milliseconds.
    #[arg(long, env = env::SYN_TIMEOUT, default_value = "0s", value_parser = telemetry::duration::parse)]
    syn_timeout: Duration,
    /// Services the datapath's maps hold, 1024..=1048576. Sizes them at load time: backends
    /// 4 and slots 8 per service, cluster weights on one service in 4 (at most 49,152). The
    /// backends and cluster groups are preallocated arrays (180 bytes per service: 11.25 MiB
    /// at the default); the other maps the agent writes allocate per entry. All the datapath's maps: 78 MiB of
    /// kernel memory at the default with nothing programmed, +3.7 MiB for 10,000 services
    /// (measured; see docs/benchmarks.md). Changing it on a node whose maps are pinned needs a
    /// drain (the pins removed first).
    #[arg(long, env = env::MAX_SERVICES, default_value_t = 65_536)]
    max_services: u32,
    /// Whether `getpeername()` on a TCP socket connected to a global service shows the
    /// service's address (`true`, as a kube-proxy DNAT would) or the backend's (`false`). The
    /// former keeps per-socket state in the kernel, about 0.7 µs per translated connect; the
    /// latter makes a translated connect about 0.3 µs of kernel time in all.
    #[arg(long, env = env::TCP_PEER_REWRITE, default_value_t = true, action = clap::ArgAction::Set)]
    tcp_peer_rewrite: bool,
    /// Network policy: a peer selector (`fromEndpoints`/`toEndpoints`) without the
    /// `io.cilium.k8s.policy.cluster` label selects endpoints of every cluster, as before Cilium
    /// 1.19. Off (the default): it selects the policy's own cluster only.
    #[arg(long, env = env::POLICY_SELECTORS_ANY_CLUSTER)]
    policy_selectors_any_cluster: bool,
    /// Address of the `/metrics`, `/healthz`, `/readyz` server.
    #[arg(long, env = env::HEALTH_BIND, default_value = "0.0.0.0:9881")]
    health_bind: String,
    /// Address of `/state` over mutual TLS (needs `--tls-dir`): readable by admins and
    /// apiservers of this cluster only (`clustermesh services --node` uses it).
    #[arg(long, env = env::STATE_BIND, default_value = "0.0.0.0:9882")]
    state_bind: String,
    /// Record flows: the datapath reports each new connection and first datagram (with
    /// identities, service, backend and verdict) and the agent keeps and serves them. A full
    /// event ring drops events (counted), never delays a connect.
    #[arg(long, env = env::FLOWS, default_value_t = true, action = clap::ArgAction::Set)]
    flows: bool,
    /// How many flows the agent keeps in memory for `clustermesh observe` (about 0.5 KiB each).
    #[arg(long, env = env::FLOW_BUFFER, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    flow_buffer: u32,
    /// Address of the `Observer` gRPC server over mutual TLS (needs `--tls-dir`): this node's
    /// flows, for admins and apiservers of this cluster only (the apiserver relays them to
    /// `clustermesh observe`).
    #[arg(long, env = env::OBSERVE_BIND, default_value = "0.0.0.0:9883")]
    observe_bind: String,
    /// Only check the configuration and the node's prerequisites, print the result, and exit.
    #[arg(long, env = env::CHECK)]
    check: bool,
    #[command(flatten)]
    log: telemetry::LogArgs,
}

/// The kubelet's cgroup for pods below the cgroup v2 mount `root`: `kubepods.slice` (systemd
/// cgroup driver) or `kubepods` (cgroupfs driver), whichever exists.
fn find_pods_cgroup(root: &Path) -> Result<PathBuf, String> {
    let candidates = [root.join("kubepods.slice"), root.join("kubepods")];
    candidates
        .iter()
        .find(|c| c.is_dir())
        .cloned()
        .ok_or_else(|| {
            let list: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
            format!(
                "no kubelet pods cgroup found (looked for {}); pass the pods' cgroup with --cgroup",
                list.join(" and ")
            )
        })
}

/// Filesystem types the agent needs, as /proc/self/mountinfo names them.
const BPFFS_TYPE: &str = "bpf";
const CGROUP2_FS: &str = "cgroup2";

/// The filesystem type mounted at or above `path`, from /proc/self/mountinfo.
fn fs_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let path = path.canonicalize().ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = Path::new(fields.get(4)?);
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            path.starts_with(mount_point)
                .then(|| (mount_point.as_os_str().len(), (*fstype).to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, t)| t)
}

fn validate(args: &mut Args) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = ClusterName::new(args.cluster_name.clone()) {
        problems.push(format!("--cluster-name: {e}"));
    }
    if let Err(e) = args.cluster_id.parse::<ClusterId>() {
        problems.push(format!("--cluster-id: {e}"));
    }
    if let Err(e) = NodeName::new(args.node_name.clone()) {
        problems.push(format!("--node-name: {e}"));
    }
    match fs_type(&args.bpffs) {
        Some(t) if t == BPFFS_TYPE => {}
        Some(t) => problems.push(format!(
            "--bpffs: {} is on {t}, not bpffs (mount it: mount -t bpf bpf {})",
            args.bpffs.display(),
            args.bpffs.display()
        )),
        None => problems.push(format!("--bpffs: {} does not exist", args.bpffs.display())),
    }
    if args.cgroup == Path::new("auto") {
        match find_pods_cgroup(Path::new("/sys/fs/cgroup")) {
            Ok(found) => args.cgroup = found,
            Err(e) => problems.push(format!("--cgroup=auto: {e}")),
        }
    }
    match fs_type(&args.cgroup) {
        Some(t) if t == CGROUP2_FS => {
            if args.cgroup.parent().and_then(fs_type).as_deref() != Some(CGROUP2_FS) {
                problems.push(format!(
                    "--cgroup: {} is a cgroup v2 root; attach to a child cgroup so that only the node's pods are load-balanced",
                    args.cgroup.display()
                ));
            }
        }
        Some(t) => problems.push(format!(
            "--cgroup: {} is on {t}, not cgroup v2",
            args.cgroup.display()
        )),
        None => problems.push(format!(
            "--cgroup: {} does not exist",
            args.cgroup.display()
        )),
    }
    if !args.check {
        if args.apiserver.is_empty() {
            problems.push(
                "--apiserver: at least one host:port of the local apiserver's Mesh API is required"
                    .into(),
            );
        }
        match &args.tls_dir {
            None => problems
                .push("--tls-dir: the node agent's certificate directory is required".into()),
            Some(_) if !args.enroll.is_empty() => {
                for (flag, f) in [
                    ("--enroll-token-file", &args.enroll_token_file),
                    ("--enroll-ca-file", &args.enroll_ca_file),
                ] {
                    if !f.is_file() {
                        problems.push(format!("{flag}: {} does not exist", f.display()));
                    }
                }
            }
            Some(d) => {
                for f in ["tls.crt", "tls.key", "ca.crt"] {
                    if !d.join(f).is_file() {
                        problems.push(format!("--tls-dir: {} does not exist", d.join(f).display()));
                    }
                }
            }
        }
        let (min, max) = (Duration::from_millis(10), Duration::from_secs(60));
        for (flag, d) in [
            ("--health-interval", args.health_interval),
            ("--health-timeout", args.health_timeout),
        ] {
            if !(min..=max).contains(&d) {
                problems.push(format!(
                    "{flag}: {} is out of range {}..={}",
                    telemetry::duration::format(d),
                    telemetry::duration::format(min),
                    telemetry::duration::format(max)
                ));
            }
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&args.quarantine) {
            problems.push(format!(
                "--quarantine: {} is out of range 100ms..=10m",
                telemetry::duration::format(args.quarantine)
            ));
        }
        if args.syn_timeout > Duration::from_secs(60) {
            problems.push("--syn-timeout: at most 1m".into());
        }
        if !(1024..=node_agent::maps::Sizes::MAX).contains(&args.max_services) {
            problems.push(format!(
                "--max-services: {} is out of range 1024..={}",
                args.max_services,
                node_agent::maps::Sizes::MAX
            ));
        }
        if args.probe_max_in_flight == 0 {
            problems.push("--probe-max-in-flight must be at least 1".into());
        }
        if !(1..=100).contains(&args.fall) || !(1..=100).contains(&args.rise) {
            problems.push("--fall and --rise must be 1..=100".into());
        }
        if args.health_bind.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "--health-bind: {:?} is not an address:port",
                args.health_bind
            ));
        }
        if args.state_bind.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "--state-bind: {:?} is not an address:port",
                args.state_bind
            ));
        }
    }
    problems
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let format = args.log.log_format;
    if let Err(e) = telemetry::init(&args.log) {
        telemetry::fatal(format, "invalid logging flags", &e);
        return ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let open_files = telemetry::raise_fd_limit();
    tracing::debug!(open_files = ?open_files, "open-files limit");
    let problems = validate(&mut args);
    if !problems.is_empty() {
        let text = format!("invalid configuration:\n  - {}", problems.join("\n  - "));
        telemetry::fatal(format, "invalid configuration", &text);
        return ExitCode::from(2);
    }
    println!(
        "node {} of cluster {}: configuration and prerequisites ok (bpffs {}, cgroup {})",
        args.node_name,
        args.cluster_name,
        args.bpffs.display(),
        args.cgroup.display()
    );
    if args.check {
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            telemetry::fatal(format, "cannot start the runtime", &e);
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            telemetry::fatal(format, "node-agent failed", &telemetry::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    use node_agent::agent::{self, Agent, HealthConfig, Settings};
    let cluster = ClusterName::new(args.cluster_name.clone())?;
    let node = NodeName::new(args.node_name.clone())?;
    let tls_dir = args.tls_dir.clone().unwrap_or_default();
    let settings = Settings {
        cluster: cluster.clone(),
        apiserver: args.apiserver.clone(),
        tls: certs::TlsFiles::in_dir(&tls_dir),
        pin_dir: args.bpffs.join(format!("clustermesh-{cluster}-{node}")),
        cgroup: args.cgroup.clone(),
        sizes: node_agent::maps::Sizes {
            services: args.max_services,
        },
        tcp_peer_rewrite: args.tcp_peer_rewrite,
        node: node.clone(),
        policy_any_cluster: args.policy_selectors_any_cluster,
        flows: args.flows.then_some(args.flow_buffer as usize),
        health: HealthConfig {
            interval: args.health_interval,
            timeout: args.health_timeout,
            fall: args.fall,
            rise: args.rise,
            sweep_rate: args.probe_sweep_rate,
            retry_rate: args.probe_retry_rate,
            max_in_flight: args.probe_max_in_flight,
            quarantine: args.quarantine,
            syn_timeout: (!args.syn_timeout.is_zero()).then_some(args.syn_timeout),
        },
    };
    if !args.enroll.is_empty() {
        let enroller = node_agent::enroll::Enroller::new(node_agent::enroll::Config {
            endpoints: args.enroll.clone(),
            cluster: cluster.clone(),
            cluster_id: args.cluster_id.parse()?,
            node: node.clone(),
            token_file: args.enroll_token_file.clone(),
            ca_file: args.enroll_ca_file.clone(),
            tls_dir: tls_dir.clone(),
        });
        let renew_at = enroll_until_done(&enroller).await;
        // Renews for as long as the process lives.
        tokio::spawn(enroller.run(renew_at));
    }
    let metrics = agent::registry();
    anyhow::Context::context(metrics.check(), "declare the metrics")?;
    let (ready_tx, ready) = tokio::sync::watch::channel(Err("starting".to_owned()));
    let bind: std::net::SocketAddr = args.health_bind.parse()?;
    let agent = Agent::start(settings.clone(), metrics.clone(), ready_tx)?;
    let state = agent.state_fn();
    let routes: telemetry::metrics::Routes = std::sync::Arc::new(move |path: &str| {
        (path == "/state").then(|| match state() {
            Ok(s) => (
                200,
                "application/json",
                serde_json::to_string_pretty(&s).unwrap_or_default(),
            ),
            Err(e) => (500, "text/plain", e),
        })
    });
    let addr = telemetry::metrics::spawn(bind, metrics, ready, Some(routes)).await?;
    if let Some(dir) = &args.tls_dir {
        let tls = certs::Reloader::load(certs::TlsFiles::in_dir(dir))?;
        // Picks up rotated files; the task lives as long as the process.
        tls.spawn_watch(std::time::Duration::from_secs(5));
        let state_bind: std::net::SocketAddr = args.state_bind.parse()?;
        let state = agent.state_fn();
        if let Some(store) = agent.flow_store() {
            let observe_bind: std::net::SocketAddr = args.observe_bind.parse()?;
            let bound = node_agent::observe_server::spawn(
                observe_bind,
                std::sync::Arc::clone(&tls),
                node_agent::observe_server::ObserveService::new(
                    settings.cluster.clone(),
                    args.cluster_id.parse()?,
                    node.to_string(),
                    store,
                ),
            )
            .await?;
            tracing::info!(observe = %bound, "flows served over mutual TLS");
        }
        let bound = node_agent::state_server::spawn(
            state_bind,
            node_agent::state_server::Config {
                cluster: settings.cluster.clone(),
                cluster_id: args.cluster_id.parse()?,
                tls,
                state: std::sync::Arc::new(state),
                policy: Some(std::sync::Arc::new(agent.policy_fn())),
            },
        )
        .await?;
        tracing::info!(state = %bound, "/state served over mutual TLS");
    }
    tracing::info!(node = %node, cgroup = %settings.cgroup.display(), pins = %settings.pin_dir.display(), health = %addr, "node agent running");
    telemetry::shutdown_signal().await;
    tracing::info!("stopping; programs stay attached and maps pinned for the next agent");
    Ok(())
}

/// Enrolls (or keeps the certificate held) before the agent starts, retrying with backoff:
/// the apiserver may not be up yet, or the Node not registered.
async fn enroll_until_done(enroller: &node_agent::enroll::Enroller) -> std::time::SystemTime {
    let mut backoff = telemetry::backoff::Backoff::reconnect();
    loop {
        match enroller.ensure().await {
            Ok(outcome) => return outcome.renew_at(),
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %telemetry::chain(&e), "enrollment refused; retrying (the Node may not be registered yet)");
            }
            Err(e) => {
                tracing::warn!(error = %telemetry::chain(&e), "enrollment failed; retrying");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_cgroup_is_found_under_either_cgroup_driver() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(
            find_pods_cgroup(root.path())
                .unwrap_err()
                .contains("--cgroup")
        );
        std::fs::create_dir(root.path().join("kubepods")).expect("mkdir");
        assert_eq!(
            find_pods_cgroup(root.path()).expect("cgroupfs driver"),
            root.path().join("kubepods")
        );
        std::fs::create_dir(root.path().join("kubepods.slice")).expect("mkdir");
        assert_eq!(
            find_pods_cgroup(root.path()).expect("systemd driver"),
            root.path().join("kubepods.slice")
        );
    }

    #[test]
    fn every_flag_has_its_environment_variable() {
        use clap::CommandFactory;
        assert_eq!(
            telemetry::env::missing(&Args::command()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn health_durations_take_units_and_a_bare_number_is_refused() {
        let base = [
            "node-agent",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--node-name",
            "n1",
            "--cgroup",
            "/sys/fs/cgroup/x",
        ];
        let args = Args::try_parse_from(base.iter().copied().chain([
            "--health-interval",
            "1s",
            "--health-timeout",
            "250ms",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.health_interval, Duration::from_secs(1));
        assert_eq!(args.health_timeout, Duration::from_millis(250));
        let defaults = Args::try_parse_from(base).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defaults.health_interval, Duration::from_millis(200));
        assert_eq!(defaults.health_timeout, Duration::from_millis(150));
        let Err(e) = Args::try_parse_from(base.iter().copied().chain(["--health-interval", "200"]))
        else {
            panic!("a bare number was accepted");
        };
        assert!(
            e.to_string()
                .contains("invalid duration \"200\": add a unit (200s, 200ms, 1m30s)"),
            "{e}"
        );
    }
}
