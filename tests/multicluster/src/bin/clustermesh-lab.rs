//! `clustermesh-lab`: bring the emulated multi-cluster lab up and down from a shell, and the
//! small programs that run inside it (a backend that names itself, a client that counts who
//! answered). Test infrastructure for the demo and the scenarios; run as root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use multicluster::lab::Lab;

/// The emulated multi-cluster lab (network namespaces, cgroups, real processes).
#[derive(Debug, Parser)]
#[command(name = "clustermesh-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring up clusters as a user installs them: per cluster the Kubernetes API test server,
    /// `clustermesh install` (deploy/'s manifests, certificates in Secrets) and the lab
    /// kubelet running the pods they ask for (etcd, clustermesh-apiserver, a node agent per
    /// node). The lab keeps running after this command returns.
    ///
    /// Example: clustermesh-lab up --dir /tmp/lab --clusters east:1,west:2 --nodes 2
    Up {
        /// The lab's directory (state, certificates, logs, kubeconfig).
        #[arg(long)]
        dir: PathBuf,
        /// Clusters as name:id, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "east:1,west:2")]
        clusters: Vec<String>,
        /// Nodes per cluster.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
    },
    /// The lab kubelet of one cluster (started by `up`): runs the pods that the cluster's
    /// StatefulSets, Deployments and DaemonSets in kube-system ask for, until killed.
    Kubelet {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster.
        #[arg(long)]
        cluster: String,
    },
    /// Add a cluster to a running lab.
    AddCluster {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// name:id.
        #[arg(long)]
        cluster: String,
        /// Nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
    },
    /// Tear everything down: processes, namespaces, bridge, cgroups, BPF pins.
    Down {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Deploy a service with backend pods (and its EndpointSlice) in one cluster.
    Deploy {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// namespace/name.
        #[arg(long)]
        service: String,
        /// Backend pods.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// Service annotations, key=value (repeatable).
        #[arg(long)]
        annotate: Vec<String>,
    },
    /// Kill (stop) or restart (start) the backend processes of a service in one cluster.
    Backends {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// namespace/name.
        #[arg(long)]
        service: String,
        /// stop or start.
        action: String,
    },
    /// Add a pod without a server (e.g. a client) on a node.
    Pod {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// The node.
        #[arg(long)]
        node: String,
        /// namespace/name.
        #[arg(long)]
        pod: String,
    },
    /// Print the drill flags that make `clustermesh drill` run its client as this pod.
    DrillFlags {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// The pod's name.
        #[arg(long)]
        pod: String,
    },
    /// Connect N times from a pod to an address and count who answered (JSON).
    Connect {
        /// The lab's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster.
        #[arg(long)]
        cluster: String,
        /// The pod's name.
        #[arg(long)]
        pod: String,
        /// ip:port.
        #[arg(long)]
        target: SocketAddr,
        /// Connections.
        #[arg(long, default_value_t = 20)]
        count: u32,
    },
    /// (Runs in a pod.) Serve TCP: send NAME and a newline to every connection.
    Serve {
        /// What to answer.
        #[arg(long)]
        name: String,
        /// Port.
        #[arg(long)]
        port: u16,
    },
    /// (Runs in a pod.) Connect COUNT times, print {"answer": count, "failed": n} as JSON.
    Client {
        /// ip:port.
        #[arg(long)]
        target: SocketAddr,
        /// Connections.
        #[arg(long, default_value_t = 20)]
        count: u32,
        /// UDP: one datagram per attempt from a fresh unconnected socket, the answer awaited.
        #[arg(long)]
        udp: bool,
    },
}

fn serve(name: &str, port: u16) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind port {port}"))?;
    let answer = format!("{name}\n");
    // The same answer over UDP, to each datagram's sender.
    let udp = std::net::UdpSocket::bind(("0.0.0.0", port))
        .with_context(|| format!("bind UDP port {port}"))?;
    let reply = answer.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(reply.as_bytes(), from);
        }
    });
    loop {
        match l.accept() {
            Ok((mut c, _)) => {
                let _ = c.write_all(answer.as_bytes());
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn client(target: SocketAddr, count: u32, udp: bool) -> Result<()> {
    let mut tally: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..count {
        let answer = if udp {
            let bind: SocketAddr = if target.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            std::net::UdpSocket::bind(bind).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.send_to(b"hi", target)?;
                let mut buf = [0u8; 64];
                let (n, _) = s.recv_from(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
            })
        } else {
            TcpStream::connect_timeout(&target, Duration::from_secs(2)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut buf = String::new();
                s.read_to_string(&mut buf)?;
                Ok(buf.trim().to_owned())
            })
        };
        let key = match answer {
            Ok(a) if !a.is_empty() => a,
            _ => "failed".to_owned(),
        };
        *tally.entry(key).or_insert(0) += 1;
    }
    println!("{}", serde_json::to_string(&tally)?);
    Ok(())
}

fn parse_cluster(s: &str) -> Result<(String, u16)> {
    let (n, id) = s
        .split_once(':')
        .ok_or_else(|| anyhow!("{s:?}: clusters are name:id"))?;
    Ok((
        n.to_owned(),
        id.parse().with_context(|| format!("{s:?}: cluster ID"))?,
    ))
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Kubelet { dir, cluster } => {
            let lab = Lab::load(&dir)?;
            let cfg = lab.kubelet_config(&cluster)?;
            multicluster::lab_kubelet::run(cfg).await
        }
        Cmd::Up {
            dir,
            clusters,
            nodes,
        } => {
            let parsed: Vec<(String, u16)> = clusters
                .iter()
                .map(|c| parse_cluster(c))
                .collect::<Result<_>>()?;
            if dir.join("lab.json").exists() {
                return Err(anyhow!(
                    "a lab is already up in {} (clustermesh-lab down --dir {} first)",
                    dir.display(),
                    dir.display()
                ));
            }
            // Owned until it is completely up: a failure tears down what was started.
            let mut lab = Lab::create(&dir, true)?;
            for (name, id) in &parsed {
                eprintln!("starting cluster {name} (ID {id}, {nodes} nodes)");
                lab.install_cluster(name, *id, nodes).await?;
            }
            lab.keep();
            println!(
                "lab up in {}: kubeconfig {}",
                dir.display(),
                lab.kubeconfig().display()
            );
            Ok(())
        }
        Cmd::AddCluster {
            dir,
            cluster,
            nodes,
        } => {
            let (name, id) = parse_cluster(&cluster)?;
            let mut lab = Lab::load(&dir)?;
            lab.install_cluster(&name, id, nodes).await
        }
        Cmd::Down { dir } => {
            let mut lab = Lab::load(&dir)?;
            lab.teardown();
            println!("lab in {} torn down", dir.display());
            Ok(())
        }
        Cmd::Deploy {
            dir,
            cluster,
            service,
            replicas,
            annotate,
        } => {
            let mut annotations = BTreeMap::new();
            for a in &annotate {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--annotate {a:?}: key=value"))?;
                annotations.insert(k.to_owned(), v.to_owned());
            }
            let mut lab = Lab::load(&dir)?;
            let vip = lab
                .deploy(&cluster, &service, replicas, &annotations)
                .await?;
            println!("{service} in {cluster}: ClusterIP {vip}, {replicas} backends");
            Ok(())
        }
        Cmd::Backends {
            dir,
            cluster,
            service,
            action,
        } => {
            let mut lab = Lab::load(&dir)?;
            let running = match action.as_str() {
                "start" => true,
                "stop" => false,
                other => return Err(anyhow!("{other:?}: expected start or stop")),
            };
            lab.set_backends(&cluster, &service, running).await
        }
        Cmd::Pod {
            dir,
            cluster,
            node,
            pod,
        } => {
            let (ns, name) = pod
                .split_once('/')
                .ok_or_else(|| anyhow!("--pod {pod:?}: namespace/name"))?;
            let mut lab = Lab::load(&dir)?;
            let p = lab
                .add_pod(&cluster, ns, name, &node, &BTreeMap::new())
                .await?;
            println!(
                "pod {pod} on {node}: {} (netns /run/netns/{}, cgroup {})",
                p.ip,
                p.netns,
                p.cgroup.display()
            );
            Ok(())
        }
        Cmd::Connect {
            dir,
            cluster,
            pod,
            target,
            count,
        } => {
            let lab = Lab::load(&dir)?;
            let tally = lab.connect_from(&cluster, &pod, target, count)?;
            println!("{}", serde_json::to_string(&tally)?);
            Ok(())
        }
        Cmd::DrillFlags { dir, cluster, pod } => {
            let lab = Lab::load(&dir)?;
            let p = lab
                .cluster(&cluster)?
                .pods
                .iter()
                .find(|p| p.name == pod)
                .ok_or_else(|| anyhow!("no pod {pod} in {cluster}"))?;
            println!(
                "--client-netns /run/netns/{} --client-cgroup {}",
                p.netns,
                p.cgroup.display()
            );
            Ok(())
        }
        Cmd::Serve { name, port } => serve(&name, port),
        Cmd::Client { target, count, udp } => client(target, count, udp),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The lab kubelet proxies the Mesh API's load balancer while it runs commands: two
    // workers, so neither waits for the other.
    let built = if matches!(cli.command, Cmd::Kubelet { .. }) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
