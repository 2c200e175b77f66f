//! Round trips and refusals of the encoding.

use super::*;

pub(crate) fn sample_service() -> GlobalService {
    let mut s = GlobalService {
        cluster: ClusterName::new("east").unwrap(),
        name: ServiceName::new("shop", "cart").unwrap(),
        cluster_ips: vec![
            "10.96.0.10".parse().unwrap(),
            "fd00:96::10".parse().unwrap(),
        ],
        ports: vec![
            ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            ServicePort {
                name: "dns".into(),
                port: 53,
                protocol: Protocol::Udp,
            },
        ],
        backends: (1..=3)
            .map(|i| Backend {
                ip: format!("10.1.0.{i}").parse().unwrap(),
                ports: vec![BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                conditions: BackendConditions {
                    ready: i != 2,
                    serving: true,
                    terminating: i == 2,
                },
                node: Some(NodeName::new(format!("node-{i}")).unwrap()),
                zone: (i == 1).then(|| "zone-a".to_owned()),
            })
            .collect(),
        shared: true,
        affinity: Affinity::Local,
        balancing: Default::default(),
    };
    s.normalize();
    s
}

#[test]
fn every_kind_round_trips() {
    let svc = sample_service();
    assert_eq!(GlobalService::decode(&svc.encode()).unwrap(), svc);
    let mut weighted = sample_service();
    weighted.balancing.overprovisioning_pct = 200;
    weighted.balancing.min_healthy_local = 2;
    weighted
        .balancing
        .cluster_weights
        .insert(ClusterName::new("west").unwrap(), 10);
    assert_eq!(GlobalService::decode(&weighted.encode()).unwrap(), weighted);
    // A message from a sender that knows nothing of balancing: the defaults.
    let mut m = svc.to_message();
    m.overprovisioning_pct = 0;
    assert_eq!(
        GlobalService::from_message(m).unwrap().balancing,
        model::service::Balancing::default()
    );
    let mut m = weighted.to_message();
    m.cluster_weights.insert("NotACluster".into(), 1);
    assert!(GlobalService::from_message(m).is_err());
    let mut m = weighted.to_message();
    m.overprovisioning_pct = 50;
    let e = GlobalService::from_message(m).unwrap_err().to_string();
    assert!(e.contains("balancing"), "{e}");

    let ep = Endpoint {
        cluster: ClusterName::new("west").unwrap(),
        ip: "fd00::5".parse().unwrap(),
        identity: NumericIdentity::new(0x0002_0010).unwrap(),
        node: NodeName::new("node-a").unwrap(),
        pod: Some(PodRef {
            namespace: "shop".into(),
            name: "cart-1".into(),
            uid: "8d0b8a9e-2f7c-4a53-9b1e-3c5d6e7f8a90".into(),
        }),
    };
    assert_eq!(Endpoint::decode(&ep.encode()).unwrap(), ep);
    let host = Endpoint {
        pod: None,
        identity: NumericIdentity::HOST,
        ..ep
    };
    assert_eq!(Endpoint::decode(&host.encode()).unwrap(), host);

    let id = Identity {
        cluster: ClusterName::new("west").unwrap(),
        id: NumericIdentity::new(0x0002_0010).unwrap(),
        labels: [
            Label::new("k8s", "app", "cart").unwrap(),
            Label::new("mesh", "cluster", "west").unwrap(),
        ]
        .into_iter()
        .collect(),
    };
    assert_eq!(Identity::decode(&id.encode()).unwrap(), id);

    let node = Node {
        cluster: ClusterName::new("west").unwrap(),
        name: NodeName::new("node-a").unwrap(),
        addresses: vec!["192.168.1.10".parse().unwrap()],
        pod_cidrs: vec![
            "10.2.0.0/24".parse().unwrap(),
            "fd00:2::/64".parse().unwrap(),
        ],
    };
    assert_eq!(Node::decode(&node.encode()).unwrap(), node);

    let cfg = ClusterConfig {
        name: ClusterName::new("west").unwrap(),
        id: model::ClusterId::new(2).unwrap(),
        capabilities: vec!["services".into()],
    };
    assert_eq!(ClusterConfig::decode(&cfg.encode()).unwrap(), cfg);
}

#[test]
fn garbage_and_invalid_fields_are_refused_with_the_field_named() {
    assert!(matches!(
        GlobalService::decode(&[0xff, 0xff, 0xff]),
        Err(Error::Decode { .. })
    ));

    let mut m = sample_service().to_message();
    m.backends[0].ip = vec![1, 2, 3];
    let e = GlobalService::from_message(m).unwrap_err().to_string();
    assert!(e.contains("Backend.ip"), "{e}");

    let mut m = sample_service().to_message();
    m.affinity = 0;
    let e = GlobalService::from_message(m).unwrap_err().to_string();
    assert!(e.contains("affinity"), "{e}");

    let mut m = sample_service().to_message();
    m.ports[0].port = 70_000;
    assert!(GlobalService::from_message(m).is_err());

    let mut m = sample_service().to_message();
    m.ports[0].protocol = 9;
    assert!(GlobalService::from_message(m).is_err());

    let mut m = sample_service().to_message();
    m.cluster = "Not A Cluster".into();
    let e = GlobalService::from_message(m).unwrap_err().to_string();
    assert!(e.contains("GlobalService.cluster"), "{e}");

    // An unshared service carries its backends in its own cluster (for its node agents);
    // the Mesh API strips them for peers, and importers refuse them (validate_from_peer).
    let mut m = sample_service().to_message();
    m.shared = false;
    let s = GlobalService::from_message(m).unwrap();
    assert!(s.validate_from_peer().is_err());

    let id = pb::Identity {
        cluster: "west".into(),
        id: 0x1000_0001,
        labels: vec![],
    };
    assert!(Identity::from_message(id).is_err());
    let dup = pb::Label {
        source: "k8s".into(),
        key: "a".into(),
        value: "1".into(),
    };
    let id = pb::Identity {
        cluster: "west".into(),
        id: 0x0002_0001,
        labels: vec![dup.clone(), dup],
    };
    assert!(Identity::from_message(id).is_err());

    let node = pb::Node {
        cluster: "west".into(),
        name: "n".into(),
        addresses: vec![],
        pod_cidrs: vec![pb::Cidr {
            addr: vec![10, 2, 0, 1],
            prefix_len: 24,
        }],
    };
    assert!(Node::from_message(node).is_err(), "host bits set");
}

#[test]
fn decoding_normalizes_backend_order() {
    let svc = sample_service();
    let mut m = svc.to_message();
    m.backends.reverse();
    assert_eq!(GlobalService::from_message(m).unwrap(), svc);
}
