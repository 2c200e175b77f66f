//! A Kubernetes API server stand-in, for tests and the local demo. **Test infrastructure**: it
//! exists because no real kube-apiserver can run on the machines this project is built and
//! tested on; it is never part of a production image.
//!
//! It is strict where the real kube-apiserver 1.32 is strict, and works over time where the
//! real one does (README: what it does and, honestly, what it does not):
//!
//! * [`server`]: HTTPS, routing, verbs, watches (bookmarks, `sendInitialEvents`,
//!   `resourceVersionMatch`), `dryRun`, subresources (`status`, `scale`, `pods/log`), the
//!   OpenAPI documents, fault injection through [`Handle`];
//! * [`store`]: storage with one monotonic resourceVersion and MVCC history, and deletion as a
//!   cluster does it (finalizers, graceful Pods, namespace termination, garbage collection,
//!   preconditions), finished by [`store::Store::reconcile`];
//! * [`schema`]: decoding against the official schemas (PyPI `kubernetes-validate`, installed
//!   by `scripts/setup.sh`), CRD structural schemas, patch metadata; [`openapi`]: the
//!   `/openapi/v2` and `/openapi/v3` documents from them;
//! * [`strategy`]: per-kind defaulting, status handling and semantic validation;
//!   [`field_error`]: the apiserver's field errors;
//! * [`patch`]: merge, JSON and strategic merge patches; [`apply`]: server-side apply and
//!   `managedFields`;
//! * [`authn`]: ServiceAccount tokens (audiences, bound Pods and their nodes) and the
//!   TokenReview API;
//! * [`tables`]: kubectl's server-side printing; [`selectors`]: label and field selectors;
//!   [`protobuf`]: protobuf request bodies of every built-in kind; [`registry`]: the resources
//!   served (built-in and from CRDs).

pub mod apply;
pub mod authn;
pub mod field_error;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod rbac;
pub mod registry;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod store;
pub mod strategy;
pub mod tables;

pub use server::{Config, Handle, start};
