//! What this cluster holds of one peer (a mirror of `cache/<peer>/`), and which addresses of
//! an endpoint or service may be held: inside the peer's advertised space, outside ours;
//! what does not fit is held back and judged again when a space changes. Must not write etcd
//! itself: it queues the writes for the session.

use std::collections::{BTreeMap, BTreeSet};

use model::ClusterName;
use model::keys::{self, Kind, Scope};
use model::node::AddressSpace;
use wire::Codec;

use super::Context;
use crate::metrics as m;

/// An endpoint or service held back, wholly or in part, for its addresses.
#[derive(Debug)]
pub(super) struct Withheld {
    /// The value as the peer sent it, judged again when an address space changes.
    sent: Vec<u8>,
    /// Why, one entry per refused address.
    refused: Vec<String>,
    /// The entries of `refused` already logged, counted and shown.
    reported: BTreeSet<String>,
}

/// What this cluster holds of one peer.
pub(super) struct Mirror {
    /// The peer.
    pub(super) peer: ClusterName,
    /// (kind, name) → value, as written under `cache/<peer>/`.
    pub(super) held: BTreeMap<(Kind, String), Vec<u8>>,
    /// The peer revision caught up with (0: none; the next watch takes a snapshot).
    pub(super) revision: i64,
    /// The peer's advertised address space: its nodes in `held`.
    pub(super) space: AddressSpace,
    /// Endpoints and services held back for their addresses, by (kind, name).
    pub(super) withheld: BTreeMap<(Kind, String), Withheld>,
    /// Some refusal in `withheld` is not reported yet.
    pub(super) unreported: bool,
}

pub(super) async fn load_mirror(ctx: &Context, peer: &ClusterName) -> Mirror {
    let mut held = BTreeMap::new();
    for kind in Kind::ALL {
        let prefix = keys::kind_prefix(Scope::Cache, peer, kind);
        if let Ok((kvs, _)) = ctx.kv.list_raw(&prefix).await {
            for kv in kvs {
                held.insert((kind, kv.key[prefix.len()..].to_owned()), kv.value);
            }
        }
    }
    let mut mirror = Mirror {
        peer: peer.clone(),
        held,
        revision: 0,
        space: AddressSpace::default(),
        withheld: BTreeMap::new(),
        unreported: false,
    };
    mirror.space = mirror.peer_space();
    mirror
}

/// Whether objects of `kind` carry addresses judged against the address spaces.
pub(super) fn claims_addresses(kind: Kind) -> bool {
    matches!(kind, Kind::Endpoints | Kind::Services)
}

/// What may be held of an endpoint or service a peer sent.
#[derive(Debug, PartialEq, Eq)]
struct Admission {
    /// The value to hold (`sent`, or a service without its refused backends); `None`: nothing.
    hold: Option<Vec<u8>>,
    /// One entry per refused address.
    refused: Vec<String>,
}

/// Judges the addresses of `sent` (an endpoint or a service that already passed [`validate`](super::validate::validate)):
/// each must lie outside this cluster's `own` space and, unless `space` is `None` (an object
/// admitted before, judged again because our own space changed), inside the peer's `space`.
fn admission(
    peer: &ClusterName,
    kind: Kind,
    name: &str,
    sent: &[u8],
    space: Option<&AddressSpace>,
    own: &AddressSpace,
) -> Admission {
    let misplaced = |ip: std::net::IpAddr| {
        if own.contains(ip) {
            Some("inside this cluster's own address space")
        } else if space.is_some_and(|s| !s.contains(ip)) {
            Some("outside the peer's advertised address space")
        } else {
            None
        }
    };
    const SPACE: &str = "(nodes' addresses and pod CIDRs)";
    match kind {
        Kind::Endpoints => match model::Endpoint::decode(sent) {
            Ok(e) => match misplaced(e.ip) {
                None => Admission {
                    hold: Some(sent.to_vec()),
                    refused: Vec::new(),
                },
                Some(why) => Admission {
                    hold: None,
                    refused: vec![format!(
                        "peer {peer} sent endpoint {}, which lies {why} {SPACE}: refused",
                        e.ip
                    )],
                },
            },
            Err(e) => Admission {
                hold: None,
                refused: vec![format!(
                    "peer {peer} sent an invalid endpoint {name:?}: {}",
                    telemetry::chain(&e)
                )],
            },
        },
        Kind::Services => match model::GlobalService::decode(sent) {
            Ok(mut svc) => {
                let mut refused = Vec::new();
                svc.backends.retain(|b| match misplaced(b.ip) {
                    None => true,
                    Some(why) => {
                        refused.push(format!(
                            "peer {peer} sent service {name} with backend {}, which lies {why} {SPACE}: backend refused",
                            b.ip
                        ));
                        false
                    }
                });
                let hold = if refused.is_empty() {
                    sent.to_vec()
                } else {
                    svc.encode()
                };
                Admission {
                    hold: Some(hold),
                    refused,
                }
            }
            Err(e) => Admission {
                hold: None,
                refused: vec![format!(
                    "peer {peer} sent an invalid service {name:?}: {}",
                    telemetry::chain(&e)
                )],
            },
        },
        Kind::Identities | Kind::Nodes => Admission {
            hold: Some(sent.to_vec()),
            refused: Vec::new(),
        },
    }
}

impl Mirror {
    /// The peer's advertised address space, from the nodes held.
    pub(super) fn peer_space(&self) -> AddressSpace {
        let nodes: Vec<model::Node> = self
            .held
            .range((Kind::Nodes, String::new())..)
            .take_while(|((k, _), _)| *k == Kind::Nodes)
            .filter_map(|(_, v)| model::Node::decode(v).ok())
            .collect();
        AddressSpace::of(&nodes)
    }

    /// Holds what [`admission`] allows of `sent` (against the peer's space too when
    /// `arrived`), queueing the writes in `pending`, and keeps what it refuses to judge again.
    pub(super) fn admit(
        &mut self,
        kind: Kind,
        name: String,
        sent: Vec<u8>,
        arrived: bool,
        own: &AddressSpace,
        pending: &mut BTreeMap<String, Option<Vec<u8>>>,
    ) {
        let space = arrived.then_some(&self.space);
        let a = admission(&self.peer, kind, &name, &sent, space, own);
        let key = keys::object_key(Scope::Cache, &self.peer, kind, &name);
        let k = (kind, name);
        match a.hold {
            Some(v) => {
                if self.held.get(&k) != Some(&v) {
                    pending.insert(key, Some(v.clone()));
                    self.held.insert(k.clone(), v);
                }
            }
            None => {
                if self.held.remove(&k).is_some() {
                    pending.insert(key, None);
                }
            }
        }
        if a.refused.is_empty() {
            self.withheld.remove(&k);
            return;
        }
        let w = self.withheld.entry(k).or_insert_with(|| Withheld {
            sent: Vec::new(),
            refused: Vec::new(),
            reported: BTreeSet::new(),
        });
        w.sent = sent;
        w.reported.retain(|r| a.refused.contains(r));
        self.unreported |= a.refused.iter().any(|r| !w.reported.contains(r));
        w.refused = a.refused;
    }

    /// Judges again what is held back, as if it arrived now (the peer's space changed); with
    /// `held_too` (our own space changed), also every endpoint and service held, against our
    /// own space only: the peer's space shrinking (a node going, its pods not yet) withdraws
    /// nothing that was admitted.
    pub(super) fn readmit(
        &mut self,
        own: &AddressSpace,
        held_too: bool,
        pending: &mut BTreeMap<String, Option<Vec<u8>>>,
    ) {
        // A held-back object's value is the one the peer sent, not the part that is held.
        let mut judge: BTreeMap<(Kind, String), (Vec<u8>, bool)> = self
            .withheld
            .iter()
            .map(|(k, w)| (k.clone(), (w.sent.clone(), true)))
            .collect();
        if held_too {
            for kind in [Kind::Endpoints, Kind::Services] {
                for (k, v) in self
                    .held
                    .range((kind, String::new())..)
                    .take_while(|((k, _), _)| *k == kind)
                {
                    judge.entry(k.clone()).or_insert_with(|| (v.clone(), false));
                }
            }
        }
        for ((kind, name), (sent, arrived)) in judge {
            self.admit(kind, name, sent, arrived, own, pending);
        }
    }

    /// Logs, counts and shows every refusal not reported yet, once each.
    pub(super) fn report(&mut self, ctx: &Context) {
        if !std::mem::take(&mut self.unreported) {
            return;
        }
        for ((kind, name), w) in &mut self.withheld {
            for r in &w.refused {
                if w.reported.insert(r.clone()) {
                    ctx.metrics.inc(m::PEER_REJECTED, &[self.peer.as_str()]);
                    tracing::warn!(peer = %self.peer, object = %format_args!("{kind}/{name}"), error = %r, "object refused");
                    ctx.board.error(&self.peer, r);
                }
            }
        }
    }
}

impl Mirror {
    /// Objects of the peer refused at the moment.
    pub(super) fn refused(&self) -> usize {
        self.withheld
            .values()
            .filter(|w| !w.refused.is_empty())
            .count()
    }

    /// Objects held per kind.
    pub(super) fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            Kind::ALL.iter().map(|k| (k.to_string(), 0)).collect();
        for kind in Kind::ALL {
            let n = self
                .held
                .range((kind, String::new())..)
                .take_while(|((k, _), _)| *k == kind)
                .count();
            counts.insert(kind.to_string(), n);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use model::ClusterId;

    fn node(cluster: &str, name: &str, address: &str, pod_cidr: &str) -> model::Node {
        model::Node {
            cluster: ClusterName::new(cluster).unwrap(),
            name: model::NodeName::new(name).unwrap(),
            addresses: vec![address.parse().unwrap()],
            pod_cidrs: vec![pod_cidr.parse().unwrap()],
        }
    }

    fn endpoint(ip: &str) -> Vec<u8> {
        model::Endpoint {
            cluster: ClusterName::new("west").unwrap(),
            ip: ip.parse().unwrap(),
            identity: model::NumericIdentity::scoped(ClusterId::new(2).unwrap(), 7).unwrap(),
            node: model::NodeName::new("w1").unwrap(),
            pod: None,
        }
        .encode()
    }

    fn service(backends: &[&str]) -> Vec<u8> {
        let mut svc = model::GlobalService {
            cluster: ClusterName::new("west").unwrap(),
            name: model::service::ServiceName::new("default", "web").unwrap(),
            cluster_ips: vec![],
            ports: vec![],
            backends: backends
                .iter()
                .map(|ip| model::service::Backend {
                    ip: ip.parse().unwrap(),
                    ports: vec![],
                    conditions: model::service::BackendConditions::default(),
                    node: None,
                    zone: None,
                })
                .collect(),
            shared: true,
            affinity: model::service::Affinity::None,
            balancing: Default::default(),
        };
        svc.normalize();
        svc.encode()
    }

    fn backends(v: &[u8]) -> Vec<String> {
        model::GlobalService::decode(v)
            .unwrap()
            .backends
            .iter()
            .map(|b| b.ip.to_string())
            .collect()
    }

    /// Issue 12, item 6: an endpoint or backend lies inside the peer's space and outside ours.
    #[test]
    fn addresses_are_admitted_only_inside_the_peers_space_and_outside_ours() {
        let west = ClusterName::new("west").unwrap();
        let space = AddressSpace::of(&[node("west", "w1", "192.168.2.1", "10.2.1.0/24")]);
        let own = AddressSpace::of(&[node("east", "e1", "192.168.1.1", "10.1.1.0/24")]);
        let judge = |kind, v: &[u8]| admission(&west, kind, "x", v, Some(&space), &own);
        for ip in ["10.2.1.5", "192.168.2.1"] {
            let a = judge(Kind::Endpoints, &endpoint(ip));
            assert_eq!(a.hold, Some(endpoint(ip)), "{ip} is the peer's");
            assert!(a.refused.is_empty());
        }
        for (ip, why) in [
            ("10.1.1.5", "inside this cluster's own"),
            ("192.168.1.1", "inside this cluster's own"),
            ("10.9.0.1", "outside the peer's advertised"),
        ] {
            let a = judge(Kind::Endpoints, &endpoint(ip));
            assert_eq!(a.hold, None, "{ip}");
            assert!(
                a.refused.len() == 1 && a.refused[0].contains(why),
                "{ip}: {a:?}"
            );
            assert!(a.refused[0].contains(ip));
        }
        // Ours wins where both claim an address.
        let greedy = AddressSpace::of(&[node("west", "w1", "192.168.2.1", "10.0.0.0/8")]);
        let a = admission(
            &west,
            Kind::Endpoints,
            "x",
            &endpoint("10.1.1.5"),
            Some(&greedy),
            &own,
        );
        assert!(a.hold.is_none() && a.refused[0].contains("own"));
        // Admitted before, judged again against our own space only.
        let a = admission(
            &west,
            Kind::Endpoints,
            "x",
            &endpoint("10.9.0.1"),
            None,
            &own,
        );
        assert!(a.hold.is_some() && a.refused.is_empty());

        // A service keeps its good backends and loses the others, each refusal named.
        let sent = service(&["10.2.1.5", "10.1.1.5", "10.9.0.1"]);
        let a = judge(Kind::Services, &sent);
        assert_eq!(backends(&a.hold.unwrap()), ["10.2.1.5"]);
        assert_eq!(a.refused.len(), 2);
        assert!(a.refused.iter().any(|r| r.contains("10.1.1.5")));
        assert!(a.refused.iter().any(|r| r.contains("10.9.0.1")));
        let clean = service(&["10.2.1.5"]);
        assert_eq!(
            judge(Kind::Services, &clean).hold,
            Some(clean),
            "held as sent"
        );
    }

    /// A snapshot comes in key order (endpoints before nodes); the space of the moment decides,
    /// and a change of either space judges everything again.
    #[test]
    fn held_back_objects_are_judged_again_when_a_space_changes() {
        let west = ClusterName::new("west").unwrap();
        let mut mirror = Mirror {
            peer: west.clone(),
            held: BTreeMap::new(),
            revision: 0,
            space: AddressSpace::default(),
            withheld: BTreeMap::new(),
            unreported: false,
        };
        let own = AddressSpace::of(&[node("east", "e1", "192.168.1.1", "10.1.1.0/24")]);
        let mut pending = BTreeMap::new();
        let ep = (Kind::Endpoints, "10.2.1.5".to_owned());
        let svc = (Kind::Services, "default/web".to_owned());
        mirror.admit(
            ep.0,
            ep.1.clone(),
            endpoint("10.2.1.5"),
            true,
            &own,
            &mut pending,
        );
        let web = service(&["10.2.1.5"]);
        mirror.admit(svc.0, svc.1.clone(), web, true, &own, &mut pending);
        assert!(!mirror.held.contains_key(&ep) && mirror.withheld.contains_key(&ep));
        assert!(backends(&mirror.held[&svc]).is_empty());
        assert!(mirror.unreported);

        // The peer's node arrives: both fit now, as sent.
        mirror.held.insert(
            (Kind::Nodes, "w1".into()),
            node("west", "w1", "192.168.2.1", "10.2.1.0/24").encode(),
        );
        mirror.space = mirror.peer_space();
        mirror.readmit(&own, false, &mut pending);
        assert_eq!(mirror.held.get(&ep), Some(&endpoint("10.2.1.5")));
        assert_eq!(backends(&mirror.held[&svc]), ["10.2.1.5"]);
        assert!(mirror.withheld.is_empty());
        let key = keys::object_key(Scope::Cache, &west, Kind::Endpoints, &ep.1);
        assert_eq!(pending.get(&key), Some(&Some(endpoint("10.2.1.5"))));

        // The peer's node goes (its pods not yet): what was admitted stays.
        mirror.held.remove(&(Kind::Nodes, "w1".into()));
        mirror.space = mirror.peer_space();
        mirror.readmit(&own, false, &mut pending);
        assert!(mirror.held.contains_key(&ep) && mirror.withheld.is_empty());

        // Our own space grows over the address: withdrawn, and the backend dropped.
        let own = AddressSpace::of(&[
            node("east", "e1", "192.168.1.1", "10.1.1.0/24"),
            node("east", "e2", "192.168.1.2", "10.2.1.0/28"),
        ]);
        mirror.readmit(&own, true, &mut pending);
        assert!(!mirror.held.contains_key(&ep));
        assert_eq!(pending.get(&key), Some(&None));
        assert!(backends(&mirror.held[&svc]).is_empty());
        assert_eq!(mirror.withheld.len(), 2);
    }
}
