//! Identity-based network policy: the policy API as users write it, and its resolution
//! against every identity an agent knows, local and imported.
//!
//! This crate owns parsing ([`parse()`]: a stored `CiliumNetworkPolicy`,
//! `CiliumClusterwideNetworkPolicy` or `NetworkPolicy` → [`Policy`]) and resolution
//! ([`resolve()`] in one pass, [`Resolver`] incrementally) into per-endpoint allow/deny
//! entries ([`EndpointPolicy`]). It must stay pure: no I/O, no clocks, no Kubernetes client, no
//! BPF. The apiserver feeds it stored objects; the node agent programs its output.
//!
//! # Identities and labels
//!
//! Selectors match identity labels as the exporter builds them: `k8s:<pod label>`,
//! `k8s-ns:<namespace label>`, `mesh:cluster=<cluster>`, `mesh:namespace=<namespace>`. Keys in
//! Cilium selectors are read as Cilium users write them:
//!
//! | written | matches |
//! |---|---|
//! | `app`, `k8s:app` | pod label `k8s:app` |
//! | `any:app` | `app` of any source |
//! | `io.kubernetes.pod.namespace` | `mesh:namespace` |
//! | `io.cilium.k8s.policy.cluster` | `mesh:cluster` |
//! | `io.cilium.k8s.namespace.labels.<k>` | `k8s-ns:<k>` |
//!
//! Reserved identities (HOST = 1, WORLD = 2, ...) carry no labels: selectors never match them,
//! identities with a reserved number given to [`resolve()`] or [`Resolver`] are ignored, and
//! only entities name them.
//!
//! # Semantics
//!
//! * **Endpoints.** Only local identities (of the cluster passed to [`resolve()`]) are ever
//!   subjects: policies are cluster-local. A `CiliumNetworkPolicy`'s or `NetworkPolicy`'s
//!   endpoint selector selects only pods of the policy's namespace (a namespace label in it can
//!   only narrow that to nothing); a `CiliumClusterwideNetworkPolicy`'s is not
//!   namespace-restricted.
//! * **Peer namespace.** In a `CiliumNetworkPolicy`, `fromEndpoints`/`toEndpoints` select only
//!   the policy's namespace unless the selector constrains `io.kubernetes.pod.namespace` itself
//!   (any operator, e.g. `Exists` for every namespace). Namespace-label keys do not lift the
//!   restriction, as in Cilium. Cluster-wide selectors are not namespace-restricted.
//! * **Peer cluster (Cilium 1.19 default).** A Cilium peer selector that does not constrain
//!   `io.cilium.k8s.policy.cluster` selects the policy's own cluster only;
//!   [`Options::peer_selectors_any_cluster`] restores the older any-cluster default. A selector
//!   that names the cluster key (any operator) reaches every cluster its requirements allow.
//! * **Entities.** `world` → WORLD, `host` → HOST, `cluster` → every identity of the local
//!   cluster and HOST, `mesh` → every identity of every connected cluster and HOST, `all` →
//!   [`Remote::Any`].
//! * **Rules.** A rule with peers and no `toPorts` allows every port; `toPorts` without peers
//!   applies to any peer ([`Remote::Any`]); a rule with neither (`ingress: [{}]`) allows nothing
//!   but makes the direction enforced. An explicitly empty peer list counts as absent.
//! * **Enforcement.** An endpoint's direction is enforced (default deny) when any rule that
//!   selects it has rules for that direction, deny rules included, unless the rule's
//!   `enableDefaultDeny` turns that off. A `NetworkPolicy` enforces the directions in
//!   `policyTypes`, defaulted as Kubernetes does (`Ingress`, plus `Egress` when there are egress
//!   rules); an enforced direction without rules denies everything; rules of a direction not in
//!   `policyTypes` are dropped. An endpoint no policy selects does not appear and is
//!   allow-all.
//! * **Verdicts.** Entries carry both `Allow` and `Deny`; this crate applies no precedence. The
//!   consumer does: a packet matching any `Deny` entry is denied; otherwise, in an enforced
//!   direction, it is allowed only if it matches an `Allow` entry; in a direction not enforced
//!   it is allowed.
//! * **NetworkPolicy peers.** Local cluster only. `podSelector` alone selects pods of the
//!   policy's namespace; `namespaceSelector` (namespace labels, `k8s-ns:`) alone selects all pods
//!   of matching namespaces; both together select matching pods in matching namespaces; a rule
//!   without `from`/`to` allows every peer, in or out of the mesh.
//!
//! # Deviations from Cilium and Kubernetes
//!
//! * The `mesh` entity is our extension: every identity of every connected cluster, and HOST.
//! * The `cluster` entity is this cluster's identities and HOST only; Cilium also includes
//!   `remote-node`, `health`, `init`, `unmanaged`, `kube-apiserver`, which this mesh does not
//!   allocate. Those entities, `ingress` and `world-ipv4`/`world-ipv6` are refused.
//! * Refused by name rather than ignored (so nothing is ever half-applied): CIDR, FQDN, service,
//!   group, node and `*Requires` peers; ICMP rules; L7 rules, listeners, TLS and server names
//!   in `toPorts`; `authentication`; `nodeSelector` (host policies); service-account and
//!   `reserved:` selector keys; label sources other than `k8s` and `any`; named ports; SCTP;
//!   `NetworkPolicy` `ipBlock` peers (a CIDR cannot be mapped onto identities faithfully: as
//!   WORLD it would over-allow or under-allow pod addresses).
//! * A `toPorts` entry with no `ports` is refused instead of meaning every port.
//! * Ports: Cilium requires `port` and reads `"0"` as every port of the protocol; Kubernetes
//!   ports must be 1–65535 and no `port` means every port of the protocol. An `endPort` of 0
//!   counts as absent.
//!
//! # Example
//!
//! ```
//! use model::{ClusterName, Label, Labels};
//! use policy::{IdentityInfo, Options, Remote, parse, resolve};
//!
//! let east = ClusterName::new("east").unwrap();
//! let west = ClusterName::new("west").unwrap();
//! let pod = |cluster: &ClusterName, name: &str| -> Labels {
//!     [
//!         Label::new("k8s", "name", name).unwrap(),
//!         Label::new("mesh", "cluster", cluster.as_str()).unwrap(),
//!         Label::new("mesh", "namespace", "default").unwrap(),
//!     ]
//!     .into_iter()
//!     .collect()
//! };
//! let cnp = serde_json::json!({
//!     "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
//!     "metadata": {"name": "x-wing-to-west", "namespace": "default"},
//!     "spec": {
//!         "endpointSelector": {"matchLabels": {"name": "x-wing"}},
//!         "egress": [{"toEndpoints": [{"matchLabels": {
//!             "name": "rebel-base", "io.cilium.k8s.policy.cluster": "west"}}]}]
//!     }
//! });
//! let policy = parse(&cnp).unwrap();
//! let ids = [
//!     IdentityInfo { id: 0x1_0001, cluster: east.clone(), labels: pod(&east, "x-wing") },
//!     IdentityInfo { id: 0x1_0002, cluster: east.clone(), labels: pod(&east, "rebel-base") },
//!     IdentityInfo { id: 0x2_0001, cluster: west.clone(), labels: pod(&west, "rebel-base") },
//! ];
//! let resolved = resolve(&[policy], &ids, &east, Options::default());
//! let x_wing = &resolved.endpoints[&0x1_0001];
//! assert!(x_wing.egress_enforced);
//! let remotes: Vec<_> = x_wing.entries.iter().map(|e| e.remote).collect();
//! assert_eq!(remotes, [Remote::Identity(0x2_0001)]);
//! ```

pub mod parse;
mod resolve;
mod resolver;
mod rule;
pub mod selector;

pub use parse::{Error, Result, parse};
pub use resolve::{EndpointPolicy, IdentityInfo, Options, PolicyEntry, Remote, Resolved, resolve};
pub use resolver::Resolver;
pub use rule::{
    Direction, Entity, L4, PeerRule, Peers, Policy, PolicyKind, PolicyRef, PortSpec, Rule, Verdict,
};

#[cfg(test)]
mod tests;
