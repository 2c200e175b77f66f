//! Parsing of the annotations that put a Service into the mesh.
//!
//! * `service.cilium.io/global: "true" | "false"` on a Service: export it as a global service.
//! * `service.cilium.io/shared: "true" | "false"`: offer this cluster's backends (default
//!   `true`); `false` means "consume remote backends, offer none".
//! * `service.cilium.io/affinity: "local" | "remote" | "none"` (default `none`).
//! * `clustermesh.dev/global-services: "true" | "false"` on a Namespace: every Service in it
//!   is global unless the Service says `service.cilium.io/global: "false"`.
//! * `clustermesh.dev/overprovisioning-factor: "1.4"` (1.0..=10.0, default 1.4): the first
//!   tier keeps `min(1, healthy fraction × factor)` of new connections; the rest spills over.
//! * `clustermesh.dev/min-healthy-local: "2"` (0..=256, default 0): below this many healthy
//!   backends the first tier is skipped.
//! * `clustermesh.dev/cluster-weights: "east=90,west=10"`: split new connections between
//!   clusters by weight (0..=10000 each, at most 8 clusters); replaces the affinity's tiers.
//!
//! Values are matched exactly (`true`, not `True` or ` true`): a value that does not match is an
//! error naming the object, the annotation and the value, never a silent default. All problems of
//! one object are reported together. Must not touch the objects themselves.

use std::collections::BTreeMap;
use std::fmt;

use crate::ClusterName;
use crate::service::{
    Affinity, Balancing, MAX_MIN_HEALTHY, MAX_WEIGHT, MAX_WEIGHTED_CLUSTERS, ServiceName,
};

/// Service annotation: export as a global service.
pub const GLOBAL: &str = "service.cilium.io/global";
/// Service annotation: offer local backends to the mesh.
pub const SHARED: &str = "service.cilium.io/shared";
/// Service annotation: backend preference.
pub const AFFINITY: &str = "service.cilium.io/affinity";
/// Namespace annotation: every Service in the namespace is global unless it opts out.
pub const NAMESPACE_GLOBAL: &str = "clustermesh.dev/global-services";
/// Service annotation: overprovisioning factor of the first tier.
pub const OVERPROVISIONING: &str = "clustermesh.dev/overprovisioning-factor";
/// Service annotation: minimum of healthy backends in the first tier.
pub const MIN_HEALTHY_LOCAL: &str = "clustermesh.dev/min-healthy-local";
/// Service annotation: per-cluster weights.
pub const CLUSTER_WEIGHTS: &str = "clustermesh.dev/cluster-weights";

/// One annotation with a value we do not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The annotation key.
    pub annotation: &'static str,
    /// The value found.
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {:?} is not valid (expected {})",
            self.annotation, self.value, self.expected
        )
    }
}

/// The annotations of an object could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A Service carries invalid values.
    #[error("service {service}: {}", join(problems))]
    Service {
        /// The Service.
        service: ServiceName,
        /// Every invalid annotation on it.
        problems: Vec<Problem>,
    },
    /// The Service's Namespace carries an invalid value.
    #[error("namespace {namespace} (of service {service}): {problem}")]
    Namespace {
        /// The Namespace.
        namespace: String,
        /// The Service being evaluated.
        service: ServiceName,
        /// The invalid annotation.
        problem: Box<Problem>,
    },
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the annotations say about a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPolicy {
    /// Export as a global service.
    pub global: bool,
    /// Offer local backends (only meaningful when `global`).
    pub shared: bool,
    /// Backend preference (only meaningful when `global`).
    pub affinity: Affinity,
    /// Spill-over and weights (only meaningful when `global`).
    pub balancing: Balancing,
}

const BOOL: &str = "\"true\" or \"false\"";
const AFFINITIES: &str = "\"local\", \"remote\" or \"none\"";
const FACTOR: &str = "a decimal from 1.0 to 10.0 with at most two decimals, like \"1.4\"";
const MIN_HEALTHY: &str = "an integer from 0 to 256";
const WEIGHTS: &str = "comma-separated cluster=weight pairs, like \"east=90,west=10\": valid \
                       cluster names, each once, at most 8, integer weights from 0 to 10000, not all 0";

/// `"1.4"` → 140.
fn parse_factor(v: &str) -> Option<u32> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 2 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u32 = int.parse().ok()?;
    let frac: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<2}").parse().ok()?
    };
    let pct = int.checked_mul(100)?.checked_add(frac)?;
    crate::service::OVERPROVISIONING_PCT
        .contains(&pct)
        .then_some(pct)
}

/// `"east=90,west=10"` → weights.
fn parse_weights(v: &str) -> Option<BTreeMap<ClusterName, u32>> {
    let mut out = BTreeMap::new();
    for pair in v.split(',') {
        let (name, weight) = pair.trim().split_once('=')?;
        let name = ClusterName::new(name.trim()).ok()?;
        let weight = weight.trim();
        if weight.is_empty() || !weight.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let weight: u32 = weight.parse().ok()?;
        if weight > MAX_WEIGHT || out.insert(name, weight).is_some() {
            return None;
        }
    }
    (out.len() <= MAX_WEIGHTED_CLUSTERS && out.values().any(|w| *w > 0)).then_some(out)
}

fn parse_with<T>(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    expected: &'static str,
    parse: impl Fn(&str) -> Option<T>,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let v = annotations.get(key)?;
    let parsed = parse(v);
    if parsed.is_none() {
        problems.push(Problem {
            annotation: key,
            value: v.clone(),
            expected,
        });
    }
    parsed
}

fn parse_bool(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
) -> Result<Option<bool>, Problem> {
    match annotations.get(key).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(Problem {
            annotation: key,
            value: other.to_owned(),
            expected: BOOL,
        }),
    }
}

/// Parses the mesh annotations of `service` (and of its Namespace, when known).
pub fn parse(
    service: &ServiceName,
    service_annotations: &BTreeMap<String, String>,
    namespace_annotations: Option<&BTreeMap<String, String>>,
) -> Result<ExportPolicy> {
    let mut problems = Vec::new();
    let global = parse_bool(service_annotations, GLOBAL).unwrap_or_else(|p| {
        problems.push(p);
        None
    });
    let shared = parse_bool(service_annotations, SHARED).unwrap_or_else(|p| {
        problems.push(p);
        None
    });
    let affinity = match service_annotations.get(AFFINITY) {
        None => None,
        Some(v) => match v.parse::<Affinity>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(Problem {
                    annotation: AFFINITY,
                    value: v.clone(),
                    expected: AFFINITIES,
                });
                None
            }
        },
    };
    let factor = parse_with(
        service_annotations,
        OVERPROVISIONING,
        FACTOR,
        parse_factor,
        &mut problems,
    );
    let min_healthy = parse_with(
        service_annotations,
        MIN_HEALTHY_LOCAL,
        MIN_HEALTHY,
        |v| {
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse::<u32>().ok())
                .flatten()
                .filter(|n| *n <= MAX_MIN_HEALTHY)
        },
        &mut problems,
    );
    let weights = parse_with(
        service_annotations,
        CLUSTER_WEIGHTS,
        WEIGHTS,
        parse_weights,
        &mut problems,
    );
    if !problems.is_empty() {
        return Err(Error::Service {
            service: service.clone(),
            problems,
        });
    }
    let global = match global {
        Some(g) => g,
        None => match namespace_annotations.map(|a| parse_bool(a, NAMESPACE_GLOBAL)) {
            None | Some(Ok(None)) => false,
            Some(Ok(Some(g))) => g,
            Some(Err(problem)) => {
                return Err(Error::Namespace {
                    namespace: service.namespace().to_owned(),
                    service: service.clone(),
                    problem: Box::new(problem),
                });
            }
        },
    };
    Ok(ExportPolicy {
        global,
        shared: shared.unwrap_or(true),
        affinity: affinity.unwrap_or_default(),
        balancing: Balancing {
            overprovisioning_pct: factor.unwrap_or(crate::service::DEFAULT_OVERPROVISIONING_PCT),
            min_healthy_local: min_healthy.unwrap_or(0),
            cluster_weights: weights.unwrap_or_default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn name() -> ServiceName {
        ServiceName::new("shop", "cart").unwrap()
    }

    #[test]
    fn every_valid_and_invalid_value_is_classified() {
        // (annotation, value, Some(expected policy field check) | None = error)
        let valid_global = [("true", true), ("false", false)];
        for (v, want) in valid_global {
            let p = parse(&name(), &map(&[(GLOBAL, v)]), None).unwrap();
            assert_eq!(p.global, want, "global {v:?}");
        }
        let valid_shared = [("true", true), ("false", false)];
        for (v, want) in valid_shared {
            let p = parse(&name(), &map(&[(GLOBAL, "true"), (SHARED, v)]), None).unwrap();
            assert_eq!(p.shared, want, "shared {v:?}");
        }
        let valid_affinity = [
            ("local", Affinity::Local),
            ("remote", Affinity::Remote),
            ("none", Affinity::None),
        ];
        for (v, want) in valid_affinity {
            let p = parse(&name(), &map(&[(GLOBAL, "true"), (AFFINITY, v)]), None).unwrap();
            assert_eq!(p.affinity, want, "affinity {v:?}");
        }
        let invalid_bools = [
            "yes please",
            "True",
            "TRUE",
            "yes",
            "1",
            "0",
            "",
            " true",
            "true ",
            "on",
        ];
        for key in [GLOBAL, SHARED] {
            for v in invalid_bools {
                let e = parse(&name(), &map(&[(key, v)]), None).unwrap_err();
                let text = e.to_string();
                assert!(
                    text.contains("shop/cart")
                        && text.contains(key)
                        && text.contains(&format!("{v:?}")),
                    "{key}={v:?}: {text}"
                );
            }
        }
        for v in [
            "sideways",
            "Local",
            "LOCAL",
            "",
            "local ",
            "remote,local",
            "preferred",
        ] {
            let e = parse(&name(), &map(&[(GLOBAL, "true"), (AFFINITY, v)]), None).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("shop/cart")
                    && text.contains(AFFINITY)
                    && text.contains(&format!("{v:?}")),
                "affinity={v:?}: {text}"
            );
        }
    }

    #[test]
    fn balancing_annotations_parse_strictly() {
        let ok = |pairs: &[(&str, &str)]| parse(&name(), &map(pairs), None).unwrap().balancing;
        assert_eq!(ok(&[]).overprovisioning_pct, 140, "Envoy's 1.4 by default");
        for (v, pct) in [
            ("1.4", 140),
            ("1", 100),
            ("1.0", 100),
            ("2.05", 205),
            ("10", 1000),
        ] {
            assert_eq!(
                ok(&[(OVERPROVISIONING, v)]).overprovisioning_pct,
                pct,
                "{v}"
            );
        }
        assert_eq!(ok(&[(MIN_HEALTHY_LOCAL, "3")]).min_healthy_local, 3);
        let w = ok(&[(CLUSTER_WEIGHTS, "east=90, west=10")]).cluster_weights;
        assert_eq!(w.len(), 2);
        assert_eq!(w[&ClusterName::new("east").unwrap()], 90);
        assert_eq!(
            ok(&[(CLUSTER_WEIGHTS, "east=0,west=1")])
                .cluster_weights
                .len(),
            2
        );
        for (key, v) in [
            (OVERPROVISIONING, "0.9"),
            (OVERPROVISIONING, "10.01"),
            (OVERPROVISIONING, "1.444"),
            (OVERPROVISIONING, "-1"),
            (OVERPROVISIONING, "1,4"),
            (OVERPROVISIONING, ""),
            (OVERPROVISIONING, ".5"),
            (MIN_HEALTHY_LOCAL, "257"),
            (MIN_HEALTHY_LOCAL, "-1"),
            (MIN_HEALTHY_LOCAL, "two"),
            (CLUSTER_WEIGHTS, ""),
            (CLUSTER_WEIGHTS, "east"),
            (CLUSTER_WEIGHTS, "east=90,east=10"),
            (CLUSTER_WEIGHTS, "east=0,west=0"),
            (CLUSTER_WEIGHTS, "East=1"),
            (CLUSTER_WEIGHTS, "east=10001"),
            (CLUSTER_WEIGHTS, "east=-1"),
            (CLUSTER_WEIGHTS, "east=1.5"),
            (CLUSTER_WEIGHTS, "a=1,b=1,c=1,d=1,e=1,f=1,g=1,h=1,i=1"),
        ] {
            let e = parse(&name(), &map(&[(GLOBAL, "true"), (key, v)]), None).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("shop/cart")
                    && text.contains(key)
                    && text.contains(&format!("{v:?}")),
                "{key}={v:?}: {text}"
            );
        }
    }

    #[test]
    fn defaults_apply_only_to_absent_annotations() {
        let p = parse(&name(), &map(&[]), None).unwrap();
        assert_eq!(
            p,
            ExportPolicy {
                global: false,
                shared: true,
                affinity: Affinity::None,
                balancing: Balancing::default(),
            }
        );
        let p = parse(&name(), &map(&[(GLOBAL, "true")]), None).unwrap();
        assert!(p.global && p.shared && p.affinity == Affinity::None);
    }

    #[test]
    fn all_problems_of_a_service_are_reported_together() {
        let e = parse(
            &name(),
            &map(&[
                (GLOBAL, "yes please"),
                (SHARED, "nope"),
                (AFFINITY, "sideways"),
            ]),
            None,
        )
        .unwrap_err();
        match &e {
            Error::Service { problems, .. } => assert_eq!(problems.len(), 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn namespace_annotation_makes_services_global_unless_they_opt_out() {
        let ns = map(&[(NAMESPACE_GLOBAL, "true")]);
        assert!(parse(&name(), &map(&[]), Some(&ns)).unwrap().global);
        assert!(
            !parse(&name(), &map(&[(GLOBAL, "false")]), Some(&ns))
                .unwrap()
                .global
        );
        let ns_off = map(&[(NAMESPACE_GLOBAL, "false")]);
        assert!(!parse(&name(), &map(&[]), Some(&ns_off)).unwrap().global);
        assert!(
            parse(&name(), &map(&[(GLOBAL, "true")]), Some(&ns_off))
                .unwrap()
                .global
        );
    }

    #[test]
    fn an_invalid_namespace_annotation_names_the_namespace() {
        let ns = map(&[(NAMESPACE_GLOBAL, "maybe")]);
        let e = parse(&name(), &map(&[]), Some(&ns))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("namespace shop") && e.contains("\"maybe\""),
            "{e}"
        );
        // An explicit service annotation does not depend on the namespace's.
        assert!(
            parse(&name(), &map(&[(GLOBAL, "true")]), Some(&ns))
                .unwrap()
                .global
        );
    }
}
