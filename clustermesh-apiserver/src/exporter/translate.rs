//! Kubernetes objects → mesh objects. Pure: no I/O, no clock; the exporter feeds it what its
//! reflectors hold and writes what it returns.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node as K8sNode, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use model::annotations;
use model::service::{
    Backend, BackendConditions, BackendPort, GlobalService, Protocol, ServiceName, ServicePort,
};
use model::{ClusterName, Label, Labels, Node, NodeName};

/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a Service cannot be exported. Shown in a Warning Event, a log line and a metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// A mesh annotation has an invalid value.
    #[error(transparent)]
    Annotation(#[from] annotations::Error),
    /// The Service itself does not fit the model.
    #[error("service {service}: {reason}")]
    Invalid {
        /// `namespace/name`.
        service: String,
        /// What is wrong.
        reason: String,
    },
}

impl ServiceError {
    /// A short machine-readable reason for Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Annotation(_) => "InvalidGlobalServiceAnnotation",
            Self::Invalid { .. } => "InvalidGlobalService",
        }
    }
}

fn invalid(service: &ServiceName, reason: impl Into<String>) -> ServiceError {
    ServiceError::Invalid {
        service: service.to_string(),
        reason: reason.into(),
    }
}

fn protocol(service: &ServiceName, p: Option<&String>) -> Result<Protocol, ServiceError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(p) => p
            .parse()
            .map_err(|_| invalid(service, format!("unsupported protocol {p:?}"))),
    }
}

/// The global service `svc` exports, `None` if it is not global.
///
/// `namespace` is the Service's Namespace when known (its annotation can make every Service in
/// it global); `slices` are every EndpointSlice of the Service's namespace (those of other
/// Services are ignored).
pub fn service<'a>(
    cluster: &ClusterName,
    svc: &Service,
    namespace: Option<&Namespace>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Result<Option<GlobalService>, ServiceError> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let sn = ServiceName::new(ns, name).map_err(|e| ServiceError::Invalid {
        service: format!("{ns}/{name}"),
        reason: e.to_string(),
    })?;
    let empty = BTreeMap::new();
    let policy = annotations::parse(
        &sn,
        svc.metadata.annotations.as_ref().unwrap_or(&empty),
        namespace.map(|n| n.metadata.annotations.as_ref().unwrap_or(&empty)),
    )?;
    if !policy.global {
        return Ok(None);
    }
    let spec = svc.spec.clone().unwrap_or_default();
    let mut cluster_ips = Vec::new();
    for ip in spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
    {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| invalid(&sn, format!("cluster IP {ip:?} is not an address")))?;
        cluster_ips.push(ip);
    }
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(&sn, format!("port {} is out of range", p.port)))?;
        ports.push(ServicePort {
            name: p.name.unwrap_or_default(),
            port,
            protocol: protocol(&sn, p.protocol.as_ref())?,
        });
    }
    let mut backends: BTreeMap<IpAddr, Backend> = BTreeMap::new();
    // Not shared: the backends still go to etcd for this cluster's own node agents; the Mesh
    // API strips them for peers.
    for slice in slices {
        let of_service = slice.metadata.namespace.as_deref() == Some(ns)
            && slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|s| s == name);
        if !of_service || !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let mut slice_ports = Vec::new();
        for p in slice.ports.iter().flatten() {
            let Some(port) = p
                .port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
            else {
                continue;
            };
            slice_ports.push(BackendPort {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol: protocol(&sn, p.protocol.as_ref())?,
            });
        }
        for ep in &slice.endpoints {
            let c = ep.conditions.clone().unwrap_or_default();
            // Kubernetes: an unknown `ready` means ready; `serving` defaults to `ready`.
            let ready = c.ready.unwrap_or(true);
            let conditions = BackendConditions {
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
            };
            let node = ep
                .node_name
                .as_ref()
                .and_then(|n| NodeName::new(n.clone()).ok());
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let b = backends.entry(ip).or_insert_with(|| Backend {
                    ip,
                    ports: Vec::new(),
                    conditions,
                    node: node.clone(),
                    zone: ep.zone.clone(),
                });
                for p in &slice_ports {
                    if !b.ports.contains(p) {
                        b.ports.push(p.clone());
                    }
                }
            }
        }
    }
    let mut gs = GlobalService {
        cluster: cluster.clone(),
        name: sn.clone(),
        cluster_ips,
        ports,
        backends: backends.into_values().collect(),
        shared: policy.shared,
        affinity: policy.affinity,
        balancing: policy.balancing,
    };
    gs.normalize();
    gs.validate().map_err(|e| invalid(&sn, e.to_string()))?;
    Ok(Some(gs))
}

/// The label set of a pod's identity: its labels (source `k8s`), its namespace's labels
/// (source `k8s-ns`), and the mesh's own `cluster` and `namespace` labels.
pub fn pod_labels(
    cluster: &ClusterName,
    pod: &Pod,
    namespace: Option<&Namespace>,
) -> Result<Labels, model::identity::Error> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut labels = Labels::new()
        .with(Label::new(
            Label::SOURCE_MESH,
            Label::KEY_CLUSTER,
            cluster.as_str(),
        )?)
        .with(Label::new(Label::SOURCE_MESH, Label::KEY_NAMESPACE, ns)?);
    for (k, v) in pod.metadata.labels.iter().flatten() {
        // Labels that change with every rollout would give every pod its own identity.
        if k == "pod-template-hash" || k == "controller-revision-hash" {
            continue;
        }
        labels.insert(Label::new(Label::SOURCE_POD, k, v)?);
    }
    if let Some(n) = namespace {
        for (k, v) in n.metadata.labels.iter().flatten() {
            labels.insert(Label::new(Label::SOURCE_NAMESPACE, k, v)?);
        }
    }
    Ok(labels)
}

/// The addresses and node of a pod that should have endpoints: running on a node, not host
/// networked, not finished.
pub fn pod_addresses(pod: &Pod) -> Option<(NodeName, Vec<IpAddr>)> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let node = NodeName::new(spec.node_name.clone()?).ok()?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_ref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    (!ips.is_empty()).then_some((node, ips))
}

/// The mesh view of a Kubernetes Node: its internal addresses and pod CIDRs.
pub fn node(cluster: &ClusterName, n: &K8sNode) -> Option<Node> {
    let name = NodeName::new(n.metadata.name.clone()?).ok()?;
    let mut addresses: Vec<IpAddr> = n
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    let spec = n.spec.clone().unwrap_or_default();
    let mut pod_cidrs: Vec<ipnet::IpNet> = spec
        .pod_cidrs
        .or_else(|| spec.pod_cidr.map(|c| vec![c]))
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        // Canonical (no host bits), as the wire form carries them and importers compare them.
        .map(|c| c.trunc())
        .collect();
    pod_cidrs.sort();
    pod_cidrs.dedup();
    Some(Node {
        cluster: cluster.clone(),
        name,
        addresses,
        pod_cidrs,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use model::service::Affinity;
    use serde_json::json;

    fn cluster() -> ClusterName {
        ClusterName::new("east").unwrap()
    }

    fn svc(annotations: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, service: &str, eps: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps
        }))
        .unwrap()
    }

    #[test]
    fn global_service_with_backends_from_its_slices_only() {
        let s1 = slice(
            "web-a",
            "web",
            json!([
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "nodeName": "n1", "zone": "z1"},
                {"addresses": ["10.1.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "n2"}
            ]),
        );
        let other = slice("db-a", "db", json!([{"addresses": ["10.1.9.9"]}]));
        let gs = service(
            &cluster(),
            &svc(json!({
                "service.cilium.io/global": "true",
                "service.cilium.io/affinity": "local",
                "clustermesh.dev/overprovisioning-factor": "2",
                "clustermesh.dev/cluster-weights": "east=90,west=10"
            })),
            None,
            [&s1, &other],
        )
        .unwrap()
        .unwrap();
        assert_eq!(gs.affinity, Affinity::Local);
        assert_eq!(gs.balancing.overprovisioning_pct, 200);
        assert_eq!(gs.balancing.cluster_weights.len(), 2);
        assert!(gs.shared);
        assert_eq!(
            gs.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        let ips: Vec<String> = gs.backends.iter().map(|b| b.ip.to_string()).collect();
        assert_eq!(ips, ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(
            gs.backends[0].conditions,
            BackendConditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        assert_eq!(gs.backends[1].zone.as_deref(), Some("z1"));
        assert_eq!(gs.backends[1].ports[0].port, 8080);
    }

    #[test]
    fn not_global_unshared_and_namespace_default() {
        assert_eq!(
            service(&cluster(), &svc(json!({})), None, []).unwrap(),
            None
        );
        let s1 = slice("web-a", "web", json!([{"addresses": ["10.1.0.2"]}]));
        let gs = service(
            &cluster(),
            &svc(json!({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"})),
            None,
            [&s1],
        )
        .unwrap()
        .unwrap();
        assert!(
            !gs.shared && !gs.backends.is_empty(),
            "kept for local node agents"
        );
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop", "annotations": {annotations::NAMESPACE_GLOBAL: "true"}}})).unwrap();
        assert!(
            service(&cluster(), &svc(json!({})), Some(&ns), [])
                .unwrap()
                .is_some()
        );
        // A Service opts out of its namespace's default.
        assert!(
            service(
                &cluster(),
                &svc(json!({"service.cilium.io/global": "false"})),
                Some(&ns),
                []
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn malformed_annotations_are_errors_naming_the_service() {
        let e = service(&cluster(), &svc(json!({"service.cilium.io/global": "true", "service.cilium.io/affinity": "sideways"})), None, [])
            .unwrap_err();
        assert_eq!(e.reason(), "InvalidGlobalServiceAnnotation");
        let text = e.to_string();
        assert!(
            text.contains("shop/web") && text.contains("sideways"),
            "{text}"
        );
    }

    #[test]
    fn pods_labels_and_addresses() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "web", "pod-template-hash": "abc"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
        }))
        .unwrap();
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}))
                .unwrap();
        let labels = pod_labels(&cluster(), &pod, Some(&ns)).unwrap();
        assert_eq!(
            labels.canonical(),
            "k8s:app=web;k8s-ns:team=a;mesh:cluster=east;mesh:namespace=shop"
        );
        let (node, ips) = pod_addresses(&pod).unwrap();
        assert_eq!(node.as_str(), "n1");
        assert_eq!(ips.len(), 2);
        let mut done = pod.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(pod_addresses(&done).is_none());
        let mut host = pod;
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(pod_addresses(&host).is_none());
    }

    #[test]
    fn nodes() {
        let n: K8sNode = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDRs": ["10.1.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}, {"type": "Hostname", "address": "n1"}]}
        }))
        .unwrap();
        let node = node(&cluster(), &n).unwrap();
        assert_eq!(node.addresses.len(), 1);
        assert_eq!(node.pod_cidrs[0].to_string(), "10.1.1.0/24");
        // `podCIDR` alone (older clusters); host bits cleared; an unparsable entry dropped.
        let n: K8sNode = serde_json::from_value(json!({
            "metadata": {"name": "n2"},
            "spec": {"podCIDR": "10.1.2.9/24"},
        }))
        .unwrap();
        let cidrs = super::node(&cluster(), &n).unwrap().pod_cidrs;
        assert_eq!(cidrs, ["10.1.2.0/24".parse::<ipnet::IpNet>().unwrap()]);
        let n: K8sNode = serde_json::from_value(json!({
            "metadata": {"name": "n3"},
            "spec": {"podCIDRs": ["fd00:3::/64", "not-a-cidr", "10.1.3.0/24"]},
        }))
        .unwrap();
        let cidrs: Vec<String> = super::node(&cluster(), &n)
            .unwrap()
            .pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.1.3.0/24", "fd00:3::/64"]);
    }
}
