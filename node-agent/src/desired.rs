//! The mesh state a node sees → the services its datapath should have. Pure.
//!
//! A global service is programmed on this node when this cluster exports it (its cluster IPs
//! are the frontends). Its backends are this cluster's ready backends and the ready backends
//! of every other cluster that shares it (`shared: true`), matched to each frontend port by
//! port name. The local service's affinity orders them into tiers; its balancing annotations
//! set the spill-over between them, or, with cluster weights, one tier split by cluster
//! (ADR 0019).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use model::service::{Affinity, GlobalService, Protocol, ServiceName};
use model::{ClusterName, NumericIdentity};

use crate::maps::{Frontend, Proto};
use crate::program::{BackendSpec, Balancing, DesiredService};

/// What the node knows of the mesh.
#[derive(Debug, Default, Clone)]
pub struct MeshView {
    /// Global services by cluster and name.
    pub services: BTreeMap<(ClusterName, ServiceName), GlobalService>,
    /// The identity of each known endpoint address (its cluster ID is in it).
    pub identities: HashMap<IpAddr, NumericIdentity>,
    /// Every known identity's cluster and labels (for policy selectors).
    pub labels: BTreeMap<u32, (ClusterName, model::Labels)>,
    /// Pod endpoints: address → (node, pod UID, identity), for the local pods' cgroups.
    pub pods: HashMap<IpAddr, (String, String, u32)>,
    /// Every pod endpoint's names, by address (for flows).
    pub pod_names: HashMap<IpAddr, crate::flows::PodName>,
    /// Every known node's addresses, by (cluster, node name) (flows name them).
    pub nodes: HashMap<(String, String), Vec<IpAddr>>,
}

/// Zone names → small integers for the backends map.
#[derive(Debug, Default)]
pub struct Zones(HashMap<String, u16>);

impl Zones {
    fn index(&mut self, zone: Option<&str>) -> u16 {
        let Some(z) = zone else { return 0 };
        let next = u16::try_from(self.0.len() + 1).unwrap_or(u16::MAX);
        *self.0.entry(z.to_owned()).or_insert(next)
    }
}

fn proto(p: Protocol) -> Option<Proto> {
    match p {
        Protocol::Tcp => Some(Proto::Tcp),
        Protocol::Udp => Some(Proto::Udp),
        Protocol::Sctp => None,
    }
}

/// The services to program on a node of `own`.
pub fn services(own: &ClusterName, view: &MeshView, zones: &mut Zones) -> Vec<DesiredService> {
    let mut out = Vec::new();
    let mut by_name: BTreeMap<&ServiceName, Vec<&GlobalService>> = BTreeMap::new();
    for ((_, name), gs) in &view.services {
        by_name.entry(name).or_default().push(gs);
    }
    for (name, all) in by_name {
        let Some(local) = all.iter().find(|g| g.cluster == *own) else {
            continue;
        };
        for port in &local.ports {
            let Some(p) = proto(port.protocol) else {
                continue;
            };
            let mut local_backends = Vec::new();
            let mut remote_backends = Vec::new();
            // Per cluster, for a weighted service.
            let mut by_cluster: BTreeMap<&ClusterName, Vec<BackendSpec>> = BTreeMap::new();
            for gs in &all {
                let is_local = gs.cluster == *own;
                if !is_local && !gs.shared {
                    continue;
                }
                for b in &gs.backends {
                    if !b.conditions.ready {
                        continue;
                    }
                    let Some(bp) = b
                        .ports
                        .iter()
                        .find(|bp| bp.name == port.name && bp.protocol == port.protocol)
                    else {
                        continue;
                    };
                    let cluster_id = view
                        .identities
                        .get(&b.ip)
                        .and_then(|id| id.cluster())
                        .map_or(0, |c| c.get());
                    let spec = BackendSpec {
                        addr: SocketAddr::new(b.ip, bp.port),
                        cluster_id,
                        zone: zones.index(b.zone.as_deref()),
                    };
                    by_cluster.entry(&gs.cluster).or_default().push(spec);
                    if is_local {
                        local_backends.push(spec);
                    } else {
                        remote_backends.push(spec);
                    }
                }
            }
            local_backends.sort();
            local_backends.dedup();
            remote_backends.sort();
            remote_backends.dedup();
            let lb = &local.balancing;
            let mut balancing = Balancing {
                overprov_pct: u16::try_from(lb.overprovisioning_pct).unwrap_or(u16::MAX),
                min_healthy: u16::try_from(lb.min_healthy_local).unwrap_or(u16::MAX),
                groups: Vec::new(),
            };
            let tiers = if lb.cluster_weights.is_empty() {
                match local.affinity {
                    Affinity::Local => [local_backends, remote_backends],
                    Affinity::Remote => [remote_backends, local_backends],
                    Affinity::None => {
                        let mut all: Vec<BackendSpec> =
                            local_backends.into_iter().chain(remote_backends).collect();
                        all.sort();
                        [all, Vec::new()]
                    }
                }
            } else {
                // Weights replace the affinity's tiers: one tier, a group per weighted cluster
                // (in name order), then the clusters not named, with weight 0.
                let mut tier = Vec::new();
                let mut rest = Vec::new();
                for (cluster, list) in &mut by_cluster {
                    list.sort();
                    list.dedup();
                    match lb.cluster_weights.get(*cluster) {
                        Some(w) if !list.is_empty() => {
                            balancing
                                .groups
                                .push((list.len() as u16, u16::try_from(*w).unwrap_or(u16::MAX)));
                            tier.extend(list.iter().copied());
                        }
                        Some(_) => {}
                        None => rest.extend(list.iter().copied()),
                    }
                }
                if !rest.is_empty() {
                    balancing.groups.push((rest.len() as u16, 0));
                    tier.extend(rest);
                }
                [tier, Vec::new()]
            };
            for ip in &local.cluster_ips {
                out.push(DesiredService {
                    frontend: Frontend {
                        addr: SocketAddr::new(*ip, port.port),
                        proto: p,
                    },
                    service: Some(name.clone()),
                    tiers: tiers.clone(),
                    balancing: balancing.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use model::service::{Backend, BackendConditions, BackendPort, ServicePort};

    fn gs(
        cluster: &str,
        affinity: Affinity,
        shared: bool,
        ips: &[&str],
        ready: bool,
    ) -> GlobalService {
        GlobalService {
            cluster: ClusterName::new(cluster).unwrap(),
            name: ServiceName::new("shop", "web").unwrap(),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            backends: ips
                .iter()
                .map(|ip| Backend {
                    ip: ip.parse().unwrap(),
                    ports: vec![BackendPort {
                        name: "http".into(),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }],
                    conditions: BackendConditions {
                        ready,
                        serving: ready,
                        terminating: false,
                    },
                    node: None,
                    zone: Some("a".into()),
                })
                .collect(),
            shared,
            affinity,
            balancing: Default::default(),
        }
    }

    fn view(services: Vec<GlobalService>) -> MeshView {
        let mut v = MeshView::default();
        for s in services {
            v.services.insert((s.cluster.clone(), s.name.clone()), s);
        }
        v
    }

    fn addrs(list: &[BackendSpec]) -> Vec<String> {
        list.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn tiers_follow_the_local_affinity() {
        let east = ClusterName::new("east").unwrap();
        let mut z = Zones::default();
        for (affinity, first, second) in [
            (
                Affinity::Local,
                vec!["10.1.0.1:8080"],
                vec!["10.2.0.1:8080"],
            ),
            (
                Affinity::Remote,
                vec!["10.2.0.1:8080"],
                vec!["10.1.0.1:8080"],
            ),
            (
                Affinity::None,
                vec!["10.1.0.1:8080", "10.2.0.1:8080"],
                vec![],
            ),
        ] {
            let v = view(vec![
                gs("east", affinity, true, &["10.1.0.1"], true),
                gs("west", Affinity::None, true, &["10.2.0.1"], true),
            ]);
            let d = services(&east, &v, &mut z);
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].frontend.addr.to_string(), "10.96.0.10:80");
            assert_eq!(addrs(&d[0].tiers[0]), first, "{affinity:?}");
            assert_eq!(addrs(&d[0].tiers[1]), second, "{affinity:?}");
        }
    }

    #[test]
    fn balancing_follows_the_local_service_and_weights_make_one_grouped_tier() {
        let east = ClusterName::new("east").unwrap();
        let mut z = Zones::default();
        let mut local = gs(
            "east",
            Affinity::Local,
            true,
            &["10.1.0.2", "10.1.0.1"],
            true,
        );
        local.balancing.overprovisioning_pct = 200;
        local.balancing.min_healthy_local = 1;
        let mut west = gs("west", Affinity::None, true, &["10.2.0.1"], true);
        west.balancing.overprovisioning_pct = 1000;
        let south = gs("south", Affinity::None, true, &["10.3.0.1"], true);
        let d = services(
            &east,
            &view(vec![local.clone(), west.clone(), south.clone()]),
            &mut z,
        );
        assert_eq!(
            d[0].balancing.overprov_pct, 200,
            "the local service decides"
        );
        assert_eq!(d[0].balancing.min_healthy, 1);
        assert!(d[0].balancing.groups.is_empty());
        assert_eq!(
            addrs(&d[0].tiers[0]),
            vec!["10.1.0.1:8080", "10.1.0.2:8080"]
        );

        for (c, w) in [("west", 10), ("east", 90)] {
            local
                .balancing
                .cluster_weights
                .insert(ClusterName::new(c).unwrap(), w);
        }
        let d = services(&east, &view(vec![local, west, south]), &mut z);
        assert_eq!(
            addrs(&d[0].tiers[0]),
            vec![
                "10.1.0.1:8080",
                "10.1.0.2:8080",
                "10.2.0.1:8080",
                "10.3.0.1:8080"
            ],
            "one tier: weighted clusters in name order, then the rest"
        );
        assert!(
            d[0].tiers[1].is_empty(),
            "weights replace the affinity's tiers"
        );
        assert_eq!(d[0].balancing.groups, vec![(2, 90), (1, 10), (1, 0)]);
    }

    #[test]
    fn unshared_not_ready_and_remote_only_services() {
        let east = ClusterName::new("east").unwrap();
        let mut z = Zones::default();
        // A remote cluster that does not share: its backends are not used.
        let v = view(vec![
            gs("east", Affinity::Local, true, &["10.1.0.1"], true),
            gs("west", Affinity::None, false, &["10.2.0.1"], true),
        ]);
        let d = services(&east, &v, &mut z);
        assert!(d[0].tiers[1].is_empty());
        // Not-ready backends are left out.
        let v = view(vec![gs(
            "east",
            Affinity::Local,
            true,
            &["10.1.0.1"],
            false,
        )]);
        assert!(services(&east, &v, &mut z)[0].tiers[0].is_empty());
        // A service this cluster does not export has no frontend here.
        let v = view(vec![gs("west", Affinity::None, true, &["10.2.0.1"], true)]);
        assert!(services(&east, &v, &mut z).is_empty());
    }
}
