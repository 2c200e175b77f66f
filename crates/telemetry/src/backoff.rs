//! The one retry backoff of the workspace: exponential with jitter (from `backon`), reset after
//! a healthy period, so that the tenth outage of a connection recovers as fast as the first.
//!
//! Every long-lived loop that reconnects (importer, node-agent follower, kvstore watch and
//! session) uses this type; none writes its own. Must not sleep by itself in a way tests cannot
//! control: it uses `tokio::time`, so tests drive it with `tokio::time::pause`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

/// A resetting exponential backoff.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
    reset_after: Duration,
    healthy_since: Option<Instant>,
}

impl Backoff {
    /// Delays from `min` doubling up to `max` (each with up to +100 % jitter, capped at
    /// `2 × max`); a connection that stayed healthy for `reset_after` starts again at `min`.
    pub fn new(min: Duration, max: Duration, reset_after: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            max,
            reset_after,
            healthy_since: None,
        }
    }

    /// The defaults for reconnecting to a server: 100 ms to 5 s, reset after 10 s healthy.
    pub fn reconnect() -> Self {
        Self::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
    }

    /// Records that the connection works from now on (a stream opened, a response arrived).
    /// Calling it again while healthy keeps the first time.
    pub fn healthy(&mut self) {
        if self.healthy_since.is_none() {
            self.healthy_since = Some(Instant::now());
        }
    }

    /// Starts again from the minimum delay at once.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
        self.healthy_since = None;
    }

    /// The delay before the next attempt, after a failure. If the connection had been healthy
    /// for at least the reset period, the sequence starts again from the minimum.
    pub fn next_delay(&mut self) -> Duration {
        if let Some(since) = self.healthy_since.take()
            && since.elapsed() >= self.reset_after
        {
            self.delays = self.builder.build();
        }
        self.delays
            .next()
            .unwrap_or(self.max)
            .min(self.max.saturating_mul(2))
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        let d = self.next_delay();
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_and_stay_bounded() {
        let mut b = backoff();
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(delays[19] >= Duration::from_secs(5), "reaches the cap");
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_period_resets_the_sequence() {
        let mut b = backoff();
        for _ in 0..10 {
            b.next_delay();
        }
        // Healthy for less than the reset period: the next outage keeps backing off.
        b.healthy();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.next_delay() >= Duration::from_secs(5));
        // Healthy for the whole period: the second and the third outage start from the minimum.
        for _ in 0..2 {
            b.healthy();
            tokio::time::advance(Duration::from_secs(11)).await;
            assert!(b.next_delay() <= Duration::from_millis(200));
            b.next_delay();
            b.next_delay();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reset_starts_from_the_minimum() {
        let mut b = backoff();
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }
}
