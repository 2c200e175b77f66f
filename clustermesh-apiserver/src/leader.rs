//! Leader election through a Kubernetes `coordination.k8s.io/v1` Lease, as client-go does it:
//! the holder renews `renewTime` every `duration / 3`; a replica takes over a Lease whose
//! `renewTime + leaseDurationSeconds` has passed; every write is a compare-and-swap on the
//! Lease's resourceVersion, so two replicas can never both win one round.
//!
//! A leader that cannot renew within `duration * 2 / 3` (the renew deadline) steps down at
//! once, before any other replica may take over at `duration`: the two never write together.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::metrics::{self as m};

/// Who leads, as seen by one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// This replica leads.
    Leader,
    /// Another replica (named, if known) leads, or nobody does yet.
    Follower(Option<String>),
}

/// One replica's side of the election.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    lease_name: String,
    identity: String,
    duration: Duration,
    metrics: telemetry::metrics::Registry,
}

fn now() -> Timestamp {
    Timestamp::now()
}

impl Elector {
    /// An elector for the Lease `lease_name` in `api`'s namespace.
    pub fn new(
        api: Api<Lease>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
        metrics: telemetry::metrics::Registry,
    ) -> Self {
        Self {
            api,
            lease_name: lease_name.into(),
            identity: identity.into(),
            duration,
            metrics,
        }
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let t = MicroTime(now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquire.unwrap_or_else(|| t.clone())),
            renew_time: Some(t),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: create, renew or take over the Lease. `Ok(true)` if this replica holds it
    /// afterwards.
    async fn try_acquire_or_renew(&self) -> Result<(bool, Option<String>), kube::Error> {
        let current = self.api.get_opt(&self.lease_name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok((true, Some(self.identity.clone()))),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok((false, None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder.as_deref() == Some(self.identity.as_str()) {
            self.spec(spec.acquire_time.clone(), transitions)
        } else {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let expired = match &spec.renew_time {
                Some(MicroTime(t)) => now() > t.saturating_add(duration).unwrap_or(*t),
                None => true,
            };
            if holder.is_some() && !expired {
                return Ok((false, holder));
            }
            self.spec(None, transitions + 1)
        };
        lease.spec = Some(new_spec);
        // The resourceVersion in `lease` makes this a compare-and-swap.
        match self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok((true, Some(self.identity.clone()))),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok((false, holder)),
            Err(e) => Err(e),
        }
    }

    /// Runs the election until dropped, publishing leadership changes on `tx`.
    pub async fn run(self, tx: watch::Sender<Leadership>) {
        let retry = (self.duration / 3).max(Duration::from_millis(100));
        let renew_deadline = self.duration * 2 / 3;
        let mut last_renew: Option<tokio::time::Instant> = None;
        loop {
            let round = tokio::time::timeout(retry, self.try_acquire_or_renew()).await;
            let state = match round {
                Ok(Ok((true, _))) => {
                    last_renew = Some(tokio::time::Instant::now());
                    Leadership::Leader
                }
                Ok(Ok((false, holder))) => {
                    last_renew = None;
                    Leadership::Follower(holder)
                }
                Ok(Err(e)) => {
                    self.metrics.inc(m::ERRORS, &["leader-election"]);
                    tracing::warn!(error = %e, "leader election round failed");
                    self.keep_or_step_down(&tx, last_renew, renew_deadline)
                }
                Err(_) => {
                    self.metrics.inc(m::ERRORS, &["leader-election"]);
                    tracing::warn!("leader election round timed out");
                    self.keep_or_step_down(&tx, last_renew, renew_deadline)
                }
            };
            if *tx.borrow() != state {
                match &state {
                    Leadership::Leader => {
                        tracing::info!(replica = %self.identity, "became the leader")
                    }
                    Leadership::Follower(h) => {
                        tracing::info!(replica = %self.identity, leader = ?h, "following")
                    }
                }
                self.metrics.set(
                    m::LEADER,
                    &[],
                    if state == Leadership::Leader {
                        1.0
                    } else {
                        0.0
                    },
                );
                tx.send_replace(state);
            }
            tokio::time::sleep(retry).await;
        }
    }

    fn keep_or_step_down(
        &self,
        tx: &watch::Sender<Leadership>,
        last_renew: Option<tokio::time::Instant>,
        renew_deadline: Duration,
    ) -> Leadership {
        match (&*tx.borrow(), last_renew) {
            (Leadership::Leader, Some(t)) if t.elapsed() < renew_deadline => Leadership::Leader,
            (Leadership::Leader, _) => {
                tracing::warn!("could not renew the leader lease in time; stepping down");
                Leadership::Follower(None)
            }
            (other, _) => other.clone(),
        }
    }

    /// Gives the Lease up (on shutdown) so that another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.lease_name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "could not release the leader lease");
        }
    }
}
