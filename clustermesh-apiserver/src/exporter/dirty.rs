//! Dirty tracking: which kinds the next reconcile pass must recompute, which pods changed
//! one by one, and the wake-up of the reconcile loop. Must not read the reflectors or etcd.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio::sync::Notify;

pub(super) const DIRTY_SERVICES: u8 = 1;
/// Every pod: a full recompute of endpoints (relist, namespace labels changed).
pub(super) const DIRTY_PODS: u8 = 2;
pub(super) const DIRTY_NODES: u8 = 4;
/// Only the pods in [`Dirty::pods`].
pub(super) const DIRTY_POD_SET: u8 = 8;
/// Identity garbage collection.
pub(super) const DIRTY_GC: u8 = 16;

/// Which kinds need a recompute, and a wake-up for the loop.
#[derive(Debug, Default)]
pub(super) struct Dirty {
    bits: AtomicU8,
    pub(super) notify: Notify,
    pods: std::sync::Mutex<HashSet<ObjectRef<Pod>>>,
}

impl Dirty {
    pub(super) fn mark(&self, bits: u8) {
        self.bits.fetch_or(bits, Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub(super) fn pod(&self, pod: &Pod) {
        match self.pods.lock() {
            Ok(mut g) => g.insert(ObjectRef::from_obj(pod)),
            Err(p) => p.into_inner().insert(ObjectRef::from_obj(pod)),
        };
        self.mark(DIRTY_POD_SET);
    }

    pub(super) fn take_pods(&self) -> HashSet<ObjectRef<Pod>> {
        match self.pods.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }

    pub(super) fn take(&self) -> u8 {
        self.bits.swap(0, Ordering::SeqCst)
    }
}

/// Marks `bits` dirty on every change after the initial listing.
pub(super) fn on_change<K>(
    dirty: &Arc<Dirty>,
    bits: u8,
) -> impl Fn(&watcher::Event<K>) + Send + 'static {
    let dirty = Arc::clone(dirty);
    move |ev| {
        if !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
            dirty.mark(bits);
        }
    }
}
