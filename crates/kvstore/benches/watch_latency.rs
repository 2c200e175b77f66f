//! Put → watch-event latency through our store (session write → `Watcher`), against raw
//! etcd-client put → watch in the same run, on the same etcd with mTLS. Both attach every key
//! to a lease, so the ratio is the cost of our code, not of etcd's lessor.
//! Run: `cargo bench -p kvstore --bench watch_latency`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{EventType, GetOptions, WatchOptions};
use kvstore::watch::{Event, Watcher};

const N: usize = 2000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn raw(etcd: &test_support::Etcd) -> Result<Vec<Duration>> {
    let files = etcd.client_files();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(
            &files.ca,
        )?))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&files.cert)?,
            std::fs::read(&files.key)?,
        ));
    let mut c = etcd_client::Client::connect(
        [etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await?;
    let prefix = "/bench/raw/";
    let rev = c
        .get(prefix, Some(GetOptions::new().with_count_only()))
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    let mut stream = c
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await?;
    // Same work for etcd as our path: every key is attached to a lease.
    let lease = c.lease_grant(30, None).await?.id();
    let mut out = Vec::with_capacity(N);
    for i in 0..N {
        let key = format!("{prefix}{i}");
        let t0 = Instant::now();
        c.put(
            key.as_str(),
            vec![1u8; 64],
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await?;
        'wait: loop {
            let resp = stream.message().await?.context("raw watch ended")?;
            for ev in resp.events() {
                if ev.event_type() == EventType::Put
                    && ev.kv().map(|kv| kv.key()) == Some(key.as_bytes())
                {
                    break 'wait;
                }
            }
        }
        out.push(t0.elapsed());
    }
    Ok(out)
}

async fn ours(etcd: &test_support::Etcd) -> Result<Vec<Duration>> {
    let client = etcd.client().await?;
    let session = kvstore::Session::start(&client, Duration::from_secs(30)).await?;
    let prefix = "/clustermesh/v1/state/bench/endpoints/";
    let mut w = Watcher::new(&client, prefix);
    while !matches!(w.next().await?, Event::InitDone { .. }) {}
    let mut out = Vec::with_capacity(N);
    for i in 0..N {
        let key = format!("{prefix}10.0.{}.{}", i / 250, i % 250);
        let t0 = Instant::now();
        session.put(key.clone(), vec![1u8; 64]).await?;
        loop {
            if let Event::Apply(kv) = w.next().await?
                && kv.key == key
            {
                break;
            }
        }
        out.push(t0.elapsed());
    }
    Ok(out)
}

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let etcd = test_support::Etcd::start().await?;
    // Warm up both paths, then measure each twice, interleaved, and keep the better run of each
    // so that a background hiccup does not decide the ratio.
    raw(&etcd).await?;
    let (r1, o1, r2, o2) = (
        raw(&etcd).await?,
        ours(&etcd).await?,
        raw(&etcd).await?,
        ours(&etcd).await?,
    );
    let best = |a: Vec<Duration>, b: Vec<Duration>| {
        let (sa, sb) = (summary(a), summary(b));
        if sa.0 <= sb.0 { sa } else { sb }
    };
    let (r50, r99) = best(r1, r2);
    let (o50, o99) = best(o1, o2);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = format!(
        "# put → watch event latency (n = {N} sequential puts, etcd 3.4 over mTLS on loopback)\n\n\
         | path | p50 ms | p99 ms |\n|---|---|---|\n\
         | raw etcd-client put → watch | {:.3} | {:.3} |\n\
         | kvstore Session::put → Watcher | {:.3} | {:.3} |\n\
         | overhead ratio (ours / raw) | {:.2} | {:.2} |\n",
        ms(r50),
        ms(r99),
        ms(o50),
        ms(o99),
        ms(o50) / ms(r50),
        ms(o99) / ms(r99),
    );
    print!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-reports");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("watch_latency.md"), &report);
    }
    Ok(())
}
