//! Issue 12, case 3, on real processes: east's apiserver runs out of file descriptors for 10 s
//! (its soft limit lowered to what it has open plus four with `prlimit`, and unauthenticated
//! TCP connections to its Mesh API take the rest), so its scans of the peer directory fail
//! ([`multicluster::chaos::fd_exhaustion`] on the chaos soak's lab, a client pod in east
//! connecting to the global `demo/echo` every 100 ms).
//!
//! Must hold: the scans did fail (the fault reached the importer); no peer was drained; no
//! node agent of either cluster deleted a map entry or lost a programmed backend; no connection
//! failed; the mesh is whole again afterwards. About 40 s; root, after
//! `cargo build --workspace --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use multicluster::TestDir;
use multicluster::chaos;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_out_of_file_descriptors_drains_no_peer() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = TestDir::new(&tmp, "fd-exhaustion-").unwrap();
    let report = match chaos::fd_exhaustion(dir.path(), "east", Duration::from_secs(10)).await {
        Ok(r) => r,
        Err(e) => panic!("fd exhaustion: {e:#}"),
    };
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    let violations = report.violations();
    assert!(
        violations.is_empty(),
        "fd exhaustion: {}",
        violations.join("; ")
    );
}
