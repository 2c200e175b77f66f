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

/// A registry with every apiserver metric declared.
pub fn registry() -> Registry {
    let r = Registry::new();
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
    r.set(LEADER, &[], 0.0);
    r
}
