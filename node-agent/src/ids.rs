//! IDs that index array maps (`CM_BACKENDS`, `CM_GROUPS`), handed out lowest-first and reused
//! only after a grace period.
//!
//! A connect program may read an ID from a slot an instant before the agent rewrites that slot
//! and frees the ID; it then reads the array entry under that ID. Programs run to completion
//! within microseconds (under RCU, never sleeping), so an ID that rests for [`GRACE`] after it
//! is freed can never lead such a program to another backend written under the same ID.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a freed ID rests before it is handed out again.
pub const GRACE: Duration = Duration::from_secs(1);

/// A pool of the IDs `first..=last`.
#[derive(Debug)]
pub struct IdPool {
    /// The lowest ID.
    first: u32,
    /// The lowest ID never handed out.
    next: u32,
    last: u32,
    /// Freed IDs, oldest first, with when they were freed.
    resting: VecDeque<(u32, Instant)>,
    grace: Duration,
}

impl IdPool {
    /// A pool of `first..=last` of which `used` are taken; the others below the highest
    /// taken one count as freed at `now` (an agent taking over maps another agent wrote just
    /// before it stopped: they rest the grace period too).
    pub fn new(
        first: u32,
        last: u32,
        grace: Duration,
        used: impl IntoIterator<Item = u32>,
        now: Instant,
    ) -> Self {
        let used: BTreeSet<u32> = used
            .into_iter()
            .filter(|id| (first..=last).contains(id))
            .collect();
        let next = used.last().map_or(first, |m| m + 1);
        let resting = (first..next)
            .filter(|id| !used.contains(id))
            .map(|id| (id, now))
            .collect();
        Self {
            first,
            next,
            last,
            resting,
            grace,
        }
    }

    /// An ID: a rested one, else one never handed out, else the one that rested longest
    /// once its grace period is over (`wait` is told how long that is). `None` when every ID
    /// is taken.
    pub fn take(&mut self, now: Instant, wait: impl FnOnce(Duration)) -> Option<u32> {
        if let Some((id, freed)) = self.resting.front().copied()
            && now.saturating_duration_since(freed) >= self.grace
        {
            self.resting.pop_front();
            return Some(id);
        }
        if self.next <= self.last {
            let id = self.next;
            self.next += 1;
            return Some(id);
        }
        let (id, freed) = self.resting.pop_front()?;
        wait(
            self.grace
                .saturating_sub(now.saturating_duration_since(freed)),
        );
        Some(id)
    }

    /// Gives `id` back at `now` (an ID the pool never hands out is ignored).
    pub fn give(&mut self, id: u32, now: Instant) {
        if id >= self.first && id < self.next {
            self.resting.push_back((id, now));
        }
    }

    /// IDs resting.
    pub fn resting(&self) -> usize {
        self.resting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_WAIT: fn(Duration) = |d| panic!("waited {d:?}");

    #[test]
    fn a_freed_id_is_reused_only_after_the_grace_period() {
        let t0 = Instant::now();
        let mut p = IdPool::new(1, 3, GRACE, [], t0);
        assert_eq!(p.take(t0, NO_WAIT), Some(1));
        assert_eq!(p.take(t0, NO_WAIT), Some(2));
        p.give(1, t0);
        // Not rested: a fresh ID instead.
        assert_eq!(p.take(t0 + GRACE / 2, NO_WAIT), Some(3));
        p.give(2, t0 + GRACE / 2);
        // Rested: reused, oldest first.
        assert_eq!(p.take(t0 + GRACE, NO_WAIT), Some(1));
        // Only a resting one left: handed out after waiting out its grace period.
        let mut waited = None;
        assert_eq!(p.take(t0 + GRACE, |d| waited = Some(d)), Some(2));
        assert_eq!(waited, Some(GRACE / 2));
        assert_eq!(p.take(t0 + 3 * GRACE, NO_WAIT), None, "all taken");
        // An ID it never handed out is not taken back.
        p.give(0, t0);
        p.give(4, t0);
        assert_eq!(p.resting(), 0);
    }

    #[test]
    fn an_agent_taking_over_keeps_the_ids_in_use_and_rests_the_gaps() {
        let t0 = Instant::now();
        let mut p = IdPool::new(1, 10, GRACE, [2, 5, 99], t0);
        assert_eq!(p.resting(), 3, "1, 3 and 4");
        assert_eq!(
            p.take(t0, NO_WAIT),
            Some(6),
            "gaps rest: maybe freed just now"
        );
        assert_eq!(p.take(t0 + GRACE, NO_WAIT), Some(1));
        let empty = IdPool::new(0, 7, GRACE, [], t0);
        assert_eq!((empty.next, empty.resting()), (0, 0));
    }
}
