//! A Kubernetes API server stand-in, for tests and the local demo. **Test infrastructure**: it
//! exists because no real kube-apiserver can run on the machines this project is built and
//! tested on; it is never part of a production image.
//!
//! It speaks the real REST protocol, faithfully where clients depend on it: discovery for
//! kubectl, get/list (label and field selectors, `limit`/`continue` served from a consistent
//! snapshot)/watch (one monotonic resourceVersion, replay from an RV, `410 Gone` beyond the
//! retained window, bookmarks, `timeoutSeconds`)/create (`generateName`, 409 on conflicts)/
//! update (409 on a stale RV)/patch (merge, JSON and strategic merge)/delete, `Status` errors,
//! Table output for kubectl, HTTPS with bearer-token or client-certificate authentication, and
//! a kubeconfig with a named context. Storage is generic by group/version/resource, and CRDs
//! register new resources at runtime.
//!
//! For reliability tests a [`Handle`] injects faults: close every open watch, fail the next N
//! requests with 500 or 429, stall responses, compact the change log, and restart while keeping
//! state. What it does not do: admission, defaulting beyond Service cluster IPs and Namespace
//! phase, the apiserver's hand-written per-kind validation, finalizers, server-side apply,
//! authorization.
//!
//! [`schema`] validates objects against the official Kubernetes 1.32 schemas (from the PyPI
//! package `kubernetes-validate`, installed by `scripts/setup.sh`) and CRD structural schemas,
//! and drives strategic merge patch; [`openapi`] builds the `/openapi/v3` and `/openapi/v2`
//! documents from the same schemas.

pub mod apply;
pub mod field_error;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod store;
pub mod strategy;
pub mod tables;

pub use server::{Config, Handle, start};
