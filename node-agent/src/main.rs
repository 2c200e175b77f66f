//! The `node-agent` binary: one per node. It will program the eBPF socket load-balancing maps
//! of its node from the local apiserver's Mesh API stream.
//!
//! This build validates its configuration and checks the node's prerequisites for the datapath
//! (bpffs mounted, the node's cgroup on cgroup v2); the datapath itself is not part of it yet,
//! so after a successful check it says so and exits non-zero rather than pretend to run.
//!
//! Must not write to etcd (only the apiserver does) nor talk to peers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use model::{ClusterId, ClusterName, NodeName};
use telemetry::env;

/// Programs this node's socket load-balancing for the mesh's global services.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version)]
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
    /// The cgroup (v2) whose processes get socket load balancing: the node's pods.
    #[arg(long, env = env::CGROUP)]
    cgroup: PathBuf,
    /// Where bpffs is mounted; maps and links are pinned below it.
    #[arg(long, env = env::BPFFS, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Only check the configuration and the node's prerequisites, print the result, and exit.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    log: telemetry::LogArgs,
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

fn validate(args: &Args) -> Vec<String> {
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
    problems
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(&args.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let problems = validate(&args);
    if !problems.is_empty() {
        eprintln!(
            "error: invalid configuration:\n  - {}",
            problems.join("\n  - ")
        );
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
    eprintln!("error: this build of node-agent has no datapath yet; only --check is supported");
    ExitCode::FAILURE
}
