//! The chaos soak on the emulated lab ([`multicluster::chaos`]): seeded random kills of etcd,
//! apiservers, node agents and backends, apiserver↔etcd cuts, partitions between the
//! apiservers and scale changes, while a client pod in east connects to `demo/echo` every
//! 100 ms. Afterwards every node's programmed state must equal the truth computed from the
//! Kubernetes objects, and no connection may have failed except during a backend's death
//! (before health checks notice). Run as root, after `cargo build --workspace --bins`.
//!
//! * `CLUSTERMESH_CHAOS_SEED` (default 13): the fault sequence; printed, to replay a run.
//! * `CLUSTERMESH_CHAOS_SECONDS` (default 110, the CI form: about 2 minutes; at most 600): the
//!   soak's length, bring-up included (a fault starts only if it can be held before the end;
//!   the last recovery comes on top). Longer soaks hold faults longer (up to 40 s, beyond the
//!   exporter's 30 s lease TTL).
//!
//! The report (per fault kind: applied, connections failed, longest recovery) is printed and
//! written to `chaos-report.txt`/`.json` in the lab's directory and in `target/tmp/`. The lab's
//! directory (logs) is under `target/tmp/` and is removed on success, kept on failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use multicluster::TestDir;
use multicluster::chaos::{self, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_keeps_connections_and_converges_to_the_truth() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::from_env().unwrap();
    eprintln!(
        "chaos: seed {} ({}), a {} s soak ({})",
        config.seed,
        chaos::SEED_ENV,
        config.seconds,
        chaos::SECONDS_ENV
    );
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = TestDir::new(&tmp, "chaos-").unwrap();
    let report = match chaos::run(dir.path(), config).await {
        Ok(r) => r,
        Err(e) => panic!("chaos soak (seed {}): {e:#}", config.seed),
    };
    let text = report.text();
    eprintln!("{text}");
    let _ = report.write(&tmp);
    let violations = report.violations();
    assert!(
        violations.is_empty(),
        "chaos soak (seed {}): {}\n\n{text}",
        config.seed,
        violations.join("; ")
    );
}
