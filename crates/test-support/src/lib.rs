//! Test harness pieces. Test infrastructure only: never linked into a production binary.
//!
//! * [`etcd::Etcd`]: a real etcd (Debian `etcd-server` 3.4) on free loopback ports, with a
//!   temporary data dir and mTLS certificates from the `certs` crate; stopped and cleaned up on
//!   drop, also when a test panics, and killed by the kernel if the test process dies
//!   (`setpriv --pdeathsig`);
//! * [`proxy::Proxy`]: a TCP proxy whose connections a test can cut, to simulate a network
//!   failure between a client and a server;
//! * [`eventually`]: wait for a condition with a deadline instead of sleeping.

pub mod etcd;
pub mod proxy;

use std::future::Future;
use std::time::Duration;

pub use etcd::Etcd;
pub use proxy::Proxy;

/// Polls `check` until it returns `Some`, every 20 ms, for at most `timeout`. Panics with
/// `what` when the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name that no other test (or earlier run) uses: `prefix` plus the process ID and a counter.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
