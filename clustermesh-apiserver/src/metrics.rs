//! The apiserver's metric names, declared once.

use telemetry::metrics::{LATENCY_BUCKETS, Registry};

/// Objects exported, by kind.
pub const EXPORTED: &str = "clustermesh_exported_objects";
/// etcd write latency of a batch, by kind.
pub const WRITE_SECONDS: &str = "clustermesh_etcd_write_seconds";
/// Keys written and deleted, by kind and op.
pub const KEYS_WRITTEN: &str = "clustermesh_etcd_keys_written_total";
/// Errors, by kind (`services`, `endpoints`, `identities`, `nodes`, `etcd`, `kubernetes`,
/// `leader-election`, `events`).
pub const ERRORS: &str = "clustermesh_errors_total";
/// Services that could not be exported, by reason.
pub const INVALID_SERVICES: &str = "clustermesh_invalid_services_total";
/// Pods skipped, by reason.
pub const SKIPPED_PODS: &str = "clustermesh_skipped_pods_total";
/// Identities released after their grace period.
pub const IDENTITIES_RELEASED: &str = "clustermesh_identities_released_total";
/// 1 while this replica leads.
pub const LEADER: &str = "clustermesh_leader";
/// Reconcile passes, by trigger.
pub const PASSES: &str = "clustermesh_reconcile_passes_total";

/// Mesh API requests refused by authorization.
pub const MESH_DENIED: &str = "clustermesh_mesh_api_denied_total";
/// Mesh API TLS handshakes refused or timed out.
pub const MESH_HANDSHAKE_FAILURES: &str = "clustermesh_mesh_api_handshake_failures_total";
/// Mesh API watches started.
pub const MESH_WATCHES: &str = "clustermesh_mesh_api_watches_total";
/// Mesh API clients too slow that got a fresh snapshot.
pub const MESH_RESYNCS: &str = "clustermesh_mesh_api_resyncs_total";
/// Change origin → local write, per peer.
pub const PEER_PROPAGATION_SECONDS: &str = "clustermesh_peer_propagation_seconds";
/// Reconnects, per peer.
pub const PEER_RECONNECTS: &str = "clustermesh_peer_reconnects_total";
/// Bytes received, per peer.
pub const PEER_BYTES: &str = "clustermesh_peer_received_bytes_total";
/// Objects refused, per peer.
pub const PEER_REJECTED: &str = "clustermesh_peer_rejected_objects_total";
/// 1 while a peer is `Ready` (connected and in sync), 0 otherwise, per configured peer.
pub const PEER_READY: &str = "clustermesh_peer_ready";
/// Network policies of this cluster, valid (served to node agents) and refused.
pub const POLICIES: &str = "clustermesh_network_policies";
/// Policies streams opened by node agents and admins.
pub const POLICY_STREAMS: &str = "clustermesh_mesh_api_policy_streams_total";

/// A registry with every apiserver metric declared.
pub fn registry() -> Registry {
    let r = Registry::new();
    r.gauge(
        POLICIES,
        "Network policies of this cluster: valid (served to its node agents) and refused (invalid, not enforced).",
        &["state"],
    );
    r.counter(
        POLICY_STREAMS,
        "Mesh API Policies streams opened (node agents and admins of this cluster).",
        &[],
    );
    r.gauge(
        EXPORTED,
        "Objects this cluster exports, by kind.",
        &["kind"],
    );
    r.histogram(
        WRITE_SECONDS,
        "etcd write latency of one batch, by kind.",
        &["kind"],
        LATENCY_BUCKETS,
    );
    r.counter(
        KEYS_WRITTEN,
        "Keys written (put) and removed (delete), by kind.",
        &["kind", "op"],
    );
    r.counter(ERRORS, "Errors, by kind.", &["kind"]);
    r.counter(
        INVALID_SERVICES,
        "Services not exported because of invalid input, by reason.",
        &["reason"],
    );
    r.counter(
        SKIPPED_PODS,
        "Pods without an endpoint because of invalid input, by reason.",
        &["reason"],
    );
    r.counter(
        IDENTITIES_RELEASED,
        "Identities released after their grace period.",
        &[],
    );
    r.gauge(LEADER, "1 while this replica is the exporting leader.", &[]);
    r.counter(PASSES, "Reconcile passes.", &[]);
    r.counter(
        MESH_DENIED,
        "Mesh API requests refused by authorization.",
        &[],
    );
    r.counter(
        MESH_HANDSHAKE_FAILURES,
        "Mesh API TLS handshakes refused or timed out.",
        &[],
    );
    r.counter(MESH_WATCHES, "Mesh API watches started.", &[]);
    r.counter(
        MESH_RESYNCS,
        "Mesh API clients that fell behind and got a fresh snapshot.",
        &[],
    );
    r.histogram(
        PEER_PROPAGATION_SECONDS,
        "From a change at the peer to its local write.",
        &["peer"],
        LATENCY_BUCKETS,
    );
    r.counter(PEER_RECONNECTS, "Peer connections lost.", &["peer"]);
    r.counter(
        PEER_BYTES,
        "Bytes received from a peer (decoded messages).",
        &["peer"],
    );
    r.counter(
        PEER_REJECTED,
        "Objects from a peer refused by validation.",
        &["peer"],
    );
    r.gauge(
        PEER_READY,
        "1 while the peer is connected and in sync (phase Ready), 0 otherwise.",
        &["peer"],
    );
    r.set(LEADER, &[], 0.0);
    crate::enroll::declare(&r);
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// What `/metrics` serves, with a series in each kind of family.
    fn exposition() -> String {
        let r = registry();
        r.set(PEER_READY, &["west"], 1.0);
        r.inc(PEER_RECONNECTS, &["west"]);
        r.observe(WRITE_SECONDS, &["services"], 0.003);
        telemetry::metrics::render_all(&r)
    }

    #[test]
    fn metrics_carry_build_info_process_figures_and_peer_readiness() {
        let text = exposition();
        for line in [
            "clustermesh_peer_ready{peer=\"west\"} 1",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_open_fds gauge",
            "# TYPE process_start_time_seconds gauge",
            &format!(
                "clustermesh_build_info{{version=\"{}\",commit=\"{}\"}} 1",
                telemetry::version::VERSION,
                telemetry::version::COMMIT
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
        }
    }

    /// `promtool check metrics` (Debian package `prometheus`, installed by scripts/setup.sh).
    #[test]
    fn the_exposition_passes_promtool() {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian prometheus): run scripts/setup.sh");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(exposition().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
