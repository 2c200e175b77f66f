//! Encoded size (and encode/decode cost) of endpoints and service backends in our protobuf
//! wire format, against the same data as JSON. Run: `cargo bench -p wire --bench encoding`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use model::{
    Affinity, Backend, BackendConditions, BackendPort, ClusterName, Endpoint, GlobalService,
    NodeName, NumericIdentity, PodRef, Protocol, ServiceName, ServicePort,
};
use wire::Codec;

fn endpoint(i: u32) -> Endpoint {
    Endpoint {
        cluster: ClusterName::new("us-east-1").unwrap_or_else(|_| unreachable!()),
        ip: std::net::Ipv4Addr::from(0x0a01_0000 + i).into(),
        identity: NumericIdentity::new(0x0003_0000 + (i % 500) + 1)
            .unwrap_or_else(|_| unreachable!()),
        node: NodeName::new(format!("ip-10-0-{}-{}.ec2.internal", i / 250, i % 250))
            .unwrap_or_else(|_| unreachable!()),
        pod: Some(PodRef {
            namespace: "shop".into(),
            name: format!("cart-7d9f8b6c5-{i:05}"),
            uid: format!("4f1c2d3e-0000-4000-8000-{i:012}"),
        }),
    }
}

fn service(backends: u32) -> GlobalService {
    GlobalService {
        cluster: ClusterName::new("us-east-1").unwrap_or_else(|_| unreachable!()),
        name: ServiceName::new("shop", "cart").unwrap_or_else(|_| unreachable!()),
        cluster_ips: vec!["10.96.12.34".parse().unwrap_or_else(|_| unreachable!())],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
        backends: (0..backends)
            .map(|i| Backend {
                ip: std::net::Ipv4Addr::from(0x0a01_0000 + i).into(),
                ports: vec![BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                conditions: BackendConditions {
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                node: Some(
                    NodeName::new(format!("ip-10-0-{}-{}.ec2.internal", i / 250, i % 250))
                        .unwrap_or_else(|_| unreachable!()),
                ),
                zone: Some("us-east-1a".into()),
            })
            .collect(),
        shared: true,
        affinity: Affinity::Local,
        balancing: Default::default(),
    }
}

fn per_op_ns(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let n = 10_000u32;
    let eps: Vec<Endpoint> = (0..n).map(endpoint).collect();
    let pb: usize = eps.iter().map(|e| e.encode().len()).sum();
    let js: usize = eps
        .iter()
        .map(|e| serde_json::to_vec(e).map(|v| v.len()).unwrap_or(0))
        .sum();
    let (pb_ep, js_ep) = (pb as f64 / f64::from(n), js as f64 / f64::from(n));

    let empty = service(0);
    let full = service(1000);
    let pb_be = (full.encode().len() - empty.encode().len()) as f64 / 1000.0;
    let js_be = (serde_json::to_vec(&full).map(|v| v.len()).unwrap_or(0)
        - serde_json::to_vec(&empty).map(|v| v.len()).unwrap_or(0)) as f64
        / 1000.0;

    let enc_ns = per_op_ns(n, |i| {
        black_box(eps[i as usize].encode());
    });
    let bytes: Vec<Vec<u8>> = eps.iter().map(Codec::encode).collect();
    let dec_ns = per_op_ns(n, |i| {
        black_box(Endpoint::decode(&bytes[i as usize]).ok());
    });
    let json_enc_ns = per_op_ns(n, |i| {
        black_box(serde_json::to_vec(&eps[i as usize]).ok());
    });

    let report = format!(
        "# wire encoding (n = {n})\n\n\
         | what | protobuf | JSON | ratio |\n|---|---|---|---|\n\
         | bytes per endpoint | {pb_ep:.1} | {js_ep:.1} | {:.2} |\n\
         | bytes per service backend | {pb_be:.1} | {js_be:.1} | {:.2} |\n\
         | encode ns per endpoint | {enc_ns:.0} | {json_enc_ns:.0} | {:.2} |\n\
         | decode+validate ns per endpoint | {dec_ns:.0} | | |\n",
        pb_ep / js_ep,
        pb_be / js_be,
        enc_ns / json_enc_ns,
    );
    print!("{report}");
    write_report("encoding", &report);
}

fn write_report(name: &str, text: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{name}.md")), text);
    }
}
