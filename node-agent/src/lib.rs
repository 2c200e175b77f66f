//! node-agent: programs its node's eBPF socket load balancing for the mesh's global services.
//!
//! [`maps`] holds the byte layouts shared with `bpf/sock_lb.c`; [`datapath`] loads the
//! programs, pins maps and links under bpffs and attaches to the node's cgroup, reusing what an
//! earlier agent pinned; [`program`] turns desired services into map entries, writing only
//! differences in an order that never exposes a half-written service, and refusing alone (with a
//! reason) each service that cannot be programmed; [`health`] acts on the kernel's evidence of
//! dead backends and confirms it with bounded probes; [`enroll`] obtains and renews the node's
//! own certificate from its apiserver.
//!
//! Must not write to etcd (only the apiserver does) nor talk to peers.

pub mod agent;
pub mod batch;
pub mod datapath;
pub mod desired;
pub mod enforce;
pub mod enroll;
pub mod flows;
pub mod health;
pub mod ids;
pub mod maps;
pub mod observe_server;
pub mod pods;
pub mod policy;
pub mod program;
pub mod state_server;
