//! What the apiserver's benchmarks share: percentiles, memory, and the raw etcd baseline.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kvstore::watch::{Event, Watcher};

/// The `p` percentile of sorted `v`.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    test_support::percentile(sorted, p)
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A Markdown table row: name, samples, p50, p99 and max in milliseconds (`l` sorted).
pub fn row(name: &str, l: &[Duration]) -> String {
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |\n",
        l.len(),
        ms(pct(l, 0.5)),
        ms(pct(l, 0.99)),
        ms(pct(l, 1.0))
    )
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    test_support::rss_kib(pid).unwrap()
}

/// The baseline of every latency figure: raw etcd put → watch event on the same etcd, 1,000
/// sequential puts under `prefix`; sorted.
pub async fn etcd_baseline(kv: &kvstore::Client, prefix: &str) -> Vec<Duration> {
    let mut w = Watcher::new(kv, prefix);
    loop {
        if let Event::InitDone { .. } = w.next().await.unwrap() {
            break;
        }
    }
    let mut out = Vec::new();
    for i in 0..1000 {
        let key = format!("{prefix}{i}");
        let t0 = Instant::now();
        kv.put_raw(&key, vec![1; 64]).await.unwrap();
        loop {
            if let Event::Apply(got) = w.next().await.unwrap()
                && got.key == key
            {
                break;
            }
        }
        out.push(t0.elapsed());
    }
    out.sort();
    out
}
