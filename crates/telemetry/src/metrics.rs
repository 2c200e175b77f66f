//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint.
//!
//! Deliberately small: counters, gauges and histograms with label values, rendered in the
//! Prometheus text format. Metric names carry the `clustermesh_` prefix. Every daemon's
//! `/metrics` also carries the standard `process_*` metrics and `clustermesh_build_info`
//! ([`process`]).

mod process;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl Type {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct HistogramData {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Type,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    values: BTreeMap<Vec<String>, f64>,
    histograms: BTreeMap<Vec<String>, HistogramData>,
}

/// A set of metric families. Cheap to clone; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
}

/// Latency buckets in seconds, from 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<&'static str, Family>) -> R) -> R {
        let mut g = match self.families.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    fn declare(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Type,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) {
        self.with(|m| {
            m.entry(name).or_insert_with(|| Family {
                help,
                kind,
                labels,
                buckets,
                values: BTreeMap::new(),
                histograms: BTreeMap::new(),
            });
        });
    }

    /// Declares a counter (shows up as 0 series-free until first incremented).
    pub fn counter(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) {
        self.declare(name, help, Type::Counter, labels, &[]);
    }

    /// Declares a gauge.
    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &'static [&'static str]) {
        self.declare(name, help, Type::Gauge, labels, &[]);
    }

    /// Declares a histogram with `buckets` (upper bounds, ascending).
    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) {
        self.declare(name, help, Type::Histogram, labels, buckets);
    }

    fn key(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    /// Adds `by` to a counter (or gauge).
    pub fn add(&self, name: &'static str, labels: &[&str], by: f64) {
        self.with(|m| {
            if let Some(f) = m.get_mut(name) {
                *f.values.entry(Self::key(labels)).or_default() += by;
            }
        });
    }

    /// Increments a counter by one.
    pub fn inc(&self, name: &'static str, labels: &[&str]) {
        self.add(name, labels, 1.0);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, labels: &[&str], value: f64) {
        self.with(|m| {
            if let Some(f) = m.get_mut(name) {
                f.values.insert(Self::key(labels), value);
            }
        });
    }

    /// Removes a series (a peer that is gone), so that it is no longer exported.
    pub fn remove(&self, name: &'static str, labels: &[&str]) {
        self.with(|m| {
            if let Some(f) = m.get_mut(name) {
                let key = Self::key(labels);
                f.values.remove(&key);
                f.histograms.remove(&key);
            }
        });
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &'static str, labels: &[&str], value: f64) {
        self.with(|m| {
            if let Some(f) = m.get_mut(name) {
                let n = f.buckets.len();
                let h = f
                    .histograms
                    .entry(Self::key(labels))
                    .or_insert_with(|| HistogramData {
                        counts: vec![0; n],
                        ..Default::default()
                    });
                for (i, b) in f.buckets.iter().enumerate() {
                    if value <= *b {
                        h.counts[i] += 1;
                    }
                }
                h.sum += value;
                h.count += 1;
            }
        });
    }

    /// The current value of a counter or gauge series (0 if never set).
    pub fn value(&self, name: &'static str, labels: &[&str]) -> f64 {
        self.with(|m| {
            m.get(name)
                .and_then(|f| f.values.get(&Self::key(labels)).copied())
                .unwrap_or_default()
        })
    }

    /// How many observations a histogram series has.
    pub fn observations(&self, name: &'static str, labels: &[&str]) -> u64 {
        self.with(|m| {
            m.get(name)
                .and_then(|f| f.histograms.get(&Self::key(labels)).map(|h| h.count))
                .unwrap_or_default()
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        fn labels(names: &[&str], values: &[String], extra: Option<(&str, String)>) -> String {
            let mut parts: Vec<String> = names
                .iter()
                .zip(values)
                .map(|(n, v)| format!("{n}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            if let Some((n, v)) = extra {
                parts.push(format!("{n}=\"{v}\""));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", parts.join(","))
            }
        }
        self.with(|m| {
            let mut out = String::new();
            for (name, f) in m.iter() {
                let _ = writeln!(out, "# HELP {name} {}", f.help);
                let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
                for (lv, v) in &f.values {
                    let _ = writeln!(out, "{name}{} {v}", labels(f.labels, lv, None));
                }
                for (lv, h) in &f.histograms {
                    for (b, c) in f.buckets.iter().zip(&h.counts) {
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {c}",
                            labels(f.labels, lv, Some(("le", b.to_string())))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        labels(f.labels, lv, Some(("le", "+Inf".into()))),
                        h.count
                    );
                    let _ = writeln!(out, "{name}_sum{} {}", labels(f.labels, lv, None), h.sum);
                    let _ = writeln!(
                        out,
                        "{name}_count{} {}",
                        labels(f.labels, lv, None),
                        h.count
                    );
                }
            }
            out
        })
    }
}

/// What `/metrics` serves: the registry, the `process_*` metrics and the build info.
pub fn render_all(registry: &Registry) -> String {
    let mut text = registry.render();
    text.push_str(&process::render(&process::sample()));
    text
}

/// Extra routes: path → (status code, content type, body), or `None` for 404.
pub type Routes = Arc<dyn Fn(&str) -> Option<(u16, &'static str, String)> + Send + Sync>;

/// Serves `/metrics` (the registry), `/healthz` (200 while the process runs), `/readyz`
/// (200 once `ready` is true, 503 with the reason before) and `extra` on `listener` until
/// dropped. `extra` routes (`/state`, `/status`: backends, peers, errors) are answered only to
/// loopback callers; anyone else gets 403 (the authenticated paths are the node agent's mTLS
/// `/state` and the status ConfigMap).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    ready: watch::Receiver<Result<(), String>>,
    extra: Option<Routes>,
) {
    loop {
        let Ok((tcp, client)) = listener.accept().await else {
            continue;
        };
        let loopback = client.ip().is_loopback()
            || matches!(client.ip(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
        let registry = registry.clone();
        let ready = ready.clone();
        let extra = extra.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let mut ct = "text/plain; charset=utf-8";
                let (code, body) = match req.uri().path() {
                    "/metrics" => (StatusCode::OK, render_all(&registry)),
                    "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
                    "/readyz" => match &*ready.borrow() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    },
                    path => match extra.as_ref().and_then(|f| f(path)) {
                        Some(_) if !loopback => (
                            StatusCode::FORBIDDEN,
                            format!("{path} is served to loopback callers only\n"),
                        ),
                        Some((code, content_type, body)) => {
                            ct = content_type;
                            (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), body)
                        }
                        None => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    },
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = code;
                if let Ok(v) = hyper::header::HeaderValue::from_str(ct) {
                    r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                }
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds `addr` and spawns [`serve`]; returns the bound address (for port 0).
pub async fn spawn(
    addr: SocketAddr,
    registry: Registry,
    ready: watch::Receiver<Result<(), String>>,
    extra: Option<Routes>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, registry, ready, extra));
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::new();
        r.counter("clustermesh_x_total", "Xs.", &["kind"]);
        r.histogram("clustermesh_lat_seconds", "Latency.", &[], &[0.1, 1.0]);
        r.inc("clustermesh_x_total", &["services"]);
        r.add("clustermesh_x_total", &["services"], 2.0);
        r.observe("clustermesh_lat_seconds", &[], 0.5);
        let text = r.render();
        assert!(
            text.contains("clustermesh_x_total{kind=\"services\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("clustermesh_lat_seconds_bucket{le=\"0.1\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("clustermesh_lat_seconds_bucket{le=\"1\"} 1"),
            "{text}"
        );
        assert!(text.contains("clustermesh_lat_seconds_count 1"), "{text}");
        assert_eq!(r.value("clustermesh_x_total", &["services"]), 3.0);
    }
}
