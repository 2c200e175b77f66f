//! `clustermesh policy --pod ns/name`: a pod's network policy as its node's kernel holds it —
//! whether ingress and egress are enforced, and which peers (identity, cluster, labels) are
//! allowed or denied on which ports by which policy — read back from the eBPF maps by the
//! node agent (`/policy?pod=<uid>`, mutual TLS with a short-lived admin certificate).

use anyhow::{Context, Result, anyhow};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use meshapi::node_state::PodPolicy;
use model::node_state::NODE_AGENT_STATE_PORT;

use crate::kctx::{Cluster, KubeArgs};
use crate::output::{self, Format};
use crate::services::agent_access;

#[derive(Debug, Args)]
pub(crate) struct PolicyArgs {
    /// The cluster the pod runs in (default: the current context).
    #[arg(long)]
    context: Option<String>,
    /// The pod, `namespace/name`.
    #[arg(long)]
    pod: String,
    /// Port of the node agent's `/state` server (mutual TLS).
    #[arg(long, default_value_t = NODE_AGENT_STATE_PORT)]
    agent_port: u16,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    #[command(flatten)]
    kube: KubeArgs,
}

/// The table lines of `p` (without the header).
pub(crate) fn rows(p: &PodPolicy) -> Vec<Vec<String>> {
    p.entries
        .iter()
        .map(|e| {
            let peer = match e.peer {
                None => "any".to_owned(),
                Some(id) => {
                    let mut s = id.to_string();
                    if let Some(c) = &e.peer_cluster {
                        s.push_str(&format!(" ({c})"));
                    }
                    s
                }
            };
            let labels: Vec<&str> = e
                .peer_labels
                .iter()
                .map(String::as_str)
                .filter(|l| !l.starts_with("mesh:cluster="))
                .collect();
            let ports = if e.ports == (0, 65_535) {
                "any".to_owned()
            } else if e.ports.0 == e.ports.1 {
                e.ports.0.to_string()
            } else {
                format!("{}-{}", e.ports.0, e.ports.1)
            };
            vec![
                e.direction.clone(),
                e.verdict.clone(),
                peer,
                if labels.is_empty() {
                    "-".to_owned()
                } else {
                    labels.join(",")
                },
                format!("{}/{ports}", e.proto),
                e.policy.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect()
}

pub(crate) async fn run(args: PolicyArgs) -> Result<std::process::ExitCode> {
    let (ns, name) = args
        .pod
        .split_once('/')
        .ok_or_else(|| anyhow!("--pod {:?}: expected namespace/name", args.pod))?;
    let cluster = Cluster::open(&args.kube, args.context.as_deref()).await?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(cluster.client.clone(), ns);
    let pod = pods
        .get(name)
        .await
        .with_context(|| format!("context {}: pod {ns}/{name}", cluster.context))?;
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| anyhow!("pod {ns}/{name} is not scheduled on a node yet"))?;
    let uid = pod
        .metadata
        .uid
        .clone()
        .ok_or_else(|| anyhow!("pod {ns}/{name} has no UID"))?;
    let a = agent_access(&cluster, &node, args.agent_port).await?;
    let p = meshapi::node_state::fetch_policy(
        &a.addr,
        &a.cluster,
        a.cluster_id,
        &a.node,
        &uid,
        &a.ca_pem,
        &a.cert_pem,
        &a.key_pem,
        a.timeout,
    )
    .await?;
    if output::structured(args.output, &p)? {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let Some(id) = p.identity else {
        println!(
            "pod {ns}/{name}: node {node} does not know it yet (its endpoint has not reached the node)"
        );
        return Ok(std::process::ExitCode::from(1));
    };
    let enforced = |on: bool| if on { "default deny" } else { "not enforced" };
    println!(
        "pod {ns}/{name} on {node}: identity {id}, {} cgroup(s) in the kernel; ingress {}, egress {}",
        p.cgroups,
        enforced(p.ingress_enforced),
        enforced(p.egress_enforced)
    );
    if p.entries.is_empty() {
        println!("no policy entries");
    } else {
        print!(
            "{}",
            output::table(
                &["DIRECTION", "VERDICT", "PEER", "LABELS", "PORTS", "POLICY"],
                &rows(&p)
            )
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshapi::node_state::PolicyLine;

    #[test]
    fn entries_render_as_rows() {
        let p = PodPolicy {
            pod_uid: "u".into(),
            identity: Some(65_793),
            cgroups: 1,
            ingress_enforced: false,
            egress_enforced: true,
            entries: vec![
                PolicyLine {
                    direction: "egress".into(),
                    verdict: "allow".into(),
                    peer: Some(131_331),
                    peer_cluster: Some("west".into()),
                    peer_labels: vec!["k8s:app=rebel-base".into(), "mesh:cluster=west".into()],
                    proto: "TCP".into(),
                    ports: (0, 65_535),
                    policy: Some("CiliumNetworkPolicy rebel/x-wing".into()),
                },
                PolicyLine {
                    direction: "egress".into(),
                    verdict: "deny".into(),
                    peer: None,
                    peer_cluster: None,
                    peer_labels: vec![],
                    proto: "UDP".into(),
                    ports: (8000, 8080),
                    policy: None,
                },
            ],
        };
        assert_eq!(
            rows(&p),
            vec![
                vec![
                    "egress",
                    "allow",
                    "131331 (west)",
                    "k8s:app=rebel-base",
                    "TCP/any",
                    "CiliumNetworkPolicy rebel/x-wing"
                ],
                vec!["egress", "deny", "any", "-", "UDP/8000-8080", "-"],
            ]
        );
    }
}
