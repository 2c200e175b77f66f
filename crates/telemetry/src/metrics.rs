//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint.
//!
//! Deliberately small: counters, gauges and histograms with label values, rendered in the
//! Prometheus text format. Metric names carry the `clustermesh_` prefix. Every daemon's
//! `/metrics` also carries the standard `process_*` metrics and `clustermesh_build_info`
//! ([`process`]).
//!
//! Misuse is refused, never a silent no-op ([`Error`]): an invalid declaration (a name or label
//! that Prometheus refuses, a name declared twice with another shape, unsorted buckets), a
//! series of a metric that was never declared (a typo in its name), label values that do not
//! match the declared labels in number, and an update of the wrong kind (`observe` on a
//! counter). In debug builds (every test) the call panics at once; in release builds it is
//! logged once, the update is dropped, and [`Registry::check`], which each daemon calls once
//! its metrics are declared, fails its start-up.

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

/// A use of the registry that it refuses (a programming error, see the module header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A metric name Prometheus refuses (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
    #[error("metric {name:?}: not a valid metric name")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A label name Prometheus refuses (`[a-zA-Z_][a-zA-Z0-9_]*`, not `__*`, not twice, not
    /// `le` on a histogram).
    #[error("metric {name}: label {label:?} is not a valid label name here")]
    InvalidLabel {
        /// The metric.
        name: String,
        /// The label.
        label: String,
    },
    /// Histogram buckets that are not finite and strictly ascending.
    #[error("metric {name}: buckets must be finite and strictly ascending")]
    InvalidBuckets {
        /// The metric.
        name: String,
    },
    /// A name declared twice with a different kind, labels or buckets.
    #[error("metric {name}: declared twice, differently")]
    Redeclared {
        /// The metric.
        name: String,
    },
    /// A series of a metric that was never declared (a typo in its name?).
    #[error("metric {name}: not declared")]
    Undeclared {
        /// The name used.
        name: String,
    },
    /// Label values that do not match the declared labels.
    #[error("metric {name}: {got} label values for the labels {labels:?}")]
    Arity {
        /// The metric.
        name: String,
        /// Its declared labels.
        labels: Vec<&'static str>,
        /// How many values were given.
        got: usize,
    },
    /// An update that the metric's kind does not have (`observe` on a counter, `set` on a
    /// histogram).
    #[error("metric {name}: a {kind} has no {op}")]
    WrongKind {
        /// The metric.
        name: String,
        /// Its kind.
        kind: &'static str,
        /// The refused update.
        op: &'static str,
    },
}

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

/// What a call does to a series, to check it against the family's kind.
#[derive(Debug, Clone, Copy)]
enum Op {
    Add,
    Set,
    Observe,
    Read,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Set => "set",
            Self::Observe => "observe",
            Self::Read => "read",
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
#[derive(Debug, Clone)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
    /// What was refused so far (release builds; debug builds panic instead).
    refused: Arc<Mutex<Vec<Error>>>,
    /// Whether a refusal panics (debug builds) or is logged and recorded.
    strict: bool,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_strictness(cfg!(debug_assertions))
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` (metric names) or, without `:`, label names.
fn valid_name(name: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// Latency buckets in seconds, from 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

impl Registry {
    /// An empty registry (refusals panic in debug builds, see the module header).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose refusals panic (`strict`) or are logged and recorded for
    /// [`Registry::check`].
    fn with_strictness(strict: bool) -> Self {
        Self {
            families: Arc::default(),
            refused: Arc::default(),
            strict,
        }
    }

    /// `Ok` unless a call was refused (only release builds get here: debug builds panic at the
    /// call). Daemons call it once their metrics are declared, and fail to start on `Err`.
    pub fn check(&self) -> Result<(), Error> {
        let refused = match self.refused.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        refused.first().map_or(Ok(()), |e| Err(e.clone()))
    }

    /// Refuses a call: panics when strict, else logs `e` the first time and records it.
    fn refuse(&self, e: Error) {
        if self.strict {
            panic!("metrics registry: {e}");
        }
        let mut refused = match self.refused.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !refused.contains(&e) {
            tracing::error!(error = %e, "metrics registry refused a call");
            refused.push(e);
        }
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
        let invalid = if !valid_name(name, true) {
            Some(Error::InvalidName { name: name.into() })
        } else if let Some((_, l)) = labels.iter().enumerate().find(|&(i, l)| {
            !valid_name(l, false)
                || l.starts_with("__")
                || labels[..i].contains(l)
                || (kind == Type::Histogram && *l == "le")
        }) {
            Some(Error::InvalidLabel {
                name: name.into(),
                label: (*l).into(),
            })
        } else if kind == Type::Histogram
            && (buckets.is_empty()
                || buckets.iter().any(|b| !b.is_finite())
                || buckets.windows(2).any(|w| w[0] >= w[1]))
        {
            Some(Error::InvalidBuckets { name: name.into() })
        } else {
            None
        };
        let refused = invalid.or_else(|| {
            self.with(|m| match m.get(name) {
                Some(f) if f.kind != kind || f.labels != labels || f.buckets != buckets => {
                    Some(Error::Redeclared { name: name.into() })
                }
                Some(_) => None,
                None => {
                    m.insert(
                        name,
                        Family {
                            help,
                            kind,
                            labels,
                            buckets,
                            values: BTreeMap::new(),
                            histograms: BTreeMap::new(),
                        },
                    );
                    None
                }
            })
        });
        if let Some(e) = refused {
            self.refuse(e);
        }
    }

    /// Runs `f` on the family `name` once `labels` are checked against it and `op` against its
    /// kind (`Err` refused, outside the lock).
    fn series<R>(
        &self,
        name: &'static str,
        labels: &[&str],
        op: Op,
        f: impl FnOnce(&mut Family) -> R,
    ) -> Option<R> {
        let r = self.with(|m| {
            let Some(family) = m.get_mut(name) else {
                return Err(Error::Undeclared { name: name.into() });
            };
            if labels.len() != family.labels.len() {
                return Err(Error::Arity {
                    name: name.into(),
                    labels: family.labels.to_vec(),
                    got: labels.len(),
                });
            }
            let fits = match op {
                Op::Add | Op::Set => family.kind != Type::Histogram,
                Op::Observe => family.kind == Type::Histogram,
                Op::Read => true,
            };
            if !fits {
                return Err(Error::WrongKind {
                    name: name.into(),
                    kind: family.kind.as_str(),
                    op: op.as_str(),
                });
            }
            Ok(f(family))
        });
        match r {
            Ok(r) => Some(r),
            Err(e) => {
                self.refuse(e);
                None
            }
        }
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
        self.series(name, labels, Op::Add, |f| {
            *f.values.entry(Self::key(labels)).or_default() += by;
        });
    }

    /// Increments a counter by one.
    pub fn inc(&self, name: &'static str, labels: &[&str]) {
        self.add(name, labels, 1.0);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, labels: &[&str], value: f64) {
        self.series(name, labels, Op::Set, |f| {
            f.values.insert(Self::key(labels), value);
        });
    }

    /// Removes a series (a peer that is gone), so that it is no longer exported.
    pub fn remove(&self, name: &'static str, labels: &[&str]) {
        self.series(name, labels, Op::Read, |f| {
            let key = Self::key(labels);
            f.values.remove(&key);
            f.histograms.remove(&key);
        });
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &'static str, labels: &[&str], value: f64) {
        self.series(name, labels, Op::Observe, |f| {
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
        });
    }

    /// The current value of a counter or gauge series (0 if never set).
    pub fn value(&self, name: &'static str, labels: &[&str]) -> f64 {
        self.series(name, labels, Op::Read, |f| {
            f.values.get(&Self::key(labels)).copied()
        })
        .flatten()
        .unwrap_or_default()
    }

    /// How many observations a histogram series has.
    pub fn observations(&self, name: &'static str, labels: &[&str]) -> u64 {
        self.series(name, labels, Op::Read, |f| {
            f.histograms.get(&Self::key(labels)).map(|h| h.count)
        })
        .flatten()
        .unwrap_or_default()
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

    /// A registry with one counter `clustermesh_x_total{kind}` whose refusals are recorded
    /// (as in release builds) instead of panicking.
    fn lenient() -> Registry {
        let r = Registry::with_strictness(false);
        r.counter("clustermesh_x_total", "Xs.", &["kind"]);
        r
    }

    #[test]
    #[should_panic(expected = "metric clustermesh_y_total: not declared")]
    fn a_typo_in_a_metric_name_panics_in_debug_builds() {
        let r = Registry::new();
        r.counter("clustermesh_x_total", "Xs.", &["kind"]);
        r.inc("clustermesh_y_total", &["services"]);
    }

    #[test]
    #[should_panic(
        expected = "metric clustermesh_x_total: 2 label values for the labels [\"kind\"]"
    )]
    fn a_wrong_number_of_label_values_panics_in_debug_builds() {
        let r = Registry::new();
        r.counter("clustermesh_x_total", "Xs.", &["kind"]);
        r.inc("clustermesh_x_total", &["services", "put"]);
    }

    #[test]
    fn a_typo_or_a_wrong_arity_is_refused_and_fails_the_start_up_check() {
        let r = lenient();
        r.inc("clustermesh_x_total", &["services"]);
        assert_eq!(r.check(), Ok(()));
        r.inc("clustermesh_x_totl", &["services"]);
        assert_eq!(
            r.check(),
            Err(Error::Undeclared {
                name: "clustermesh_x_totl".into()
            })
        );
        let r = lenient();
        r.set("clustermesh_x_total", &[], 1.0);
        r.inc("clustermesh_x_total", &["services", "put"]);
        assert_eq!(
            r.check(),
            Err(Error::Arity {
                name: "clustermesh_x_total".into(),
                labels: vec!["kind"],
                got: 0,
            })
        );
        // Nothing refused reached the exposition.
        assert_eq!(
            r.render(),
            "# HELP clustermesh_x_total Xs.\n# TYPE clustermesh_x_total counter\n"
        );
        let r = lenient();
        r.observe("clustermesh_x_total", &["services"], 1.0);
        assert!(
            matches!(r.check(), Err(Error::WrongKind { op: "observe", .. })),
            "{:?}",
            r.check()
        );
    }

    #[test]
    fn invalid_or_conflicting_declarations_are_refused() {
        let refused = |declare: &dyn Fn(&Registry)| {
            let r = Registry::with_strictness(false);
            declare(&r);
            r.check().err()
        };
        assert_eq!(
            refused(&|r| r.counter("clustermesh-x", "X.", &[])),
            Some(Error::InvalidName {
                name: "clustermesh-x".into()
            })
        );
        assert_eq!(
            refused(&|r| r.gauge("clustermesh_x", "X.", &["kind", "kind"])),
            Some(Error::InvalidLabel {
                name: "clustermesh_x".into(),
                label: "kind".into()
            })
        );
        assert!(matches!(
            refused(&|r| r.histogram("clustermesh_x", "X.", &["le"], &[1.0])),
            Some(Error::InvalidLabel { .. })
        ));
        assert!(matches!(
            refused(&|r| r.histogram("clustermesh_x", "X.", &[], &[1.0, 0.5])),
            Some(Error::InvalidBuckets { .. })
        ));
        assert!(matches!(
            refused(&|r| {
                r.counter("clustermesh_x", "X.", &["kind"]);
                r.counter("clustermesh_x", "X.", &["op"]);
            }),
            Some(Error::Redeclared { .. })
        ));
        // The same declaration twice is fine (a module declaring what another did).
        assert_eq!(
            refused(&|r| {
                r.counter("clustermesh_x", "X.", &["kind"]);
                r.counter("clustermesh_x", "X.", &["kind"]);
            }),
            None
        );
    }
}
