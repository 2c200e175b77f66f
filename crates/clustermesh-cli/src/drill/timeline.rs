//! The drill's timeline as it happens: each event is printed the moment the drill knows it, as
//! `  +1234.5 ms  what` (time since the take-down started), and kept, so that the report lists
//! the very same events. The drill tells it what happened; it decides nothing but the first
//! failed connection among the attempts it is shown.
//!
//! The lines go to the writer the drill gives (stderr, whatever `-o` is): stdout holds only
//! the report, one JSON or YAML document with `-o json|yaml`.

use std::io::Write;

use serde::Serialize;

use super::{Attempt, Method};

/// One event of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Event {
    /// Milliseconds since the take-down started.
    pub at_ms: f64,
    /// What happened.
    pub what: String,
}

impl Event {
    /// `  +1234.5 ms  what`, live and in the report alike.
    pub(crate) fn line(&self) -> String {
        format!("  {:>+10.1} ms  {}", self.at_ms, self.what)
    }
}

/// When things happened, µs since the epoch, as the drill saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    /// The take-down started.
    pub t0: i64,
    /// The first failed connection after it, if any.
    pub first_failure: Option<i64>,
    /// The last connection before failover that failed or was still served locally.
    pub last_bad: Option<i64>,
    /// The first connection served remotely (every later one too, until the bring-up).
    pub first_remote: i64,
    /// The bring-up started.
    pub t1: i64,
    /// The first connection served locally again.
    pub back: i64,
}

/// The events so far, printed to `out` as they come.
pub(crate) struct Timeline<W: Write> {
    out: W,
    events: Vec<Event>,
    marks: Marks,
}

impl<W: Write> Timeline<W> {
    /// A timeline whose zero is `t0`, the start of the take-down.
    pub(crate) fn start(out: W, t0: i64) -> Self {
        Self {
            out,
            events: Vec::new(),
            marks: Marks {
                t0,
                ..Marks::default()
            },
        }
    }

    fn ms(&self, t: i64) -> f64 {
        (t - self.marks.t0) as f64 / 1000.0
    }

    /// Records an event at `t` (µs since the epoch) and prints it.
    fn push(&mut self, t: i64, what: String) {
        let e = Event {
            at_ms: self.ms(t),
            what,
        };
        // A closed stderr must not fail the drill: the report still says it all.
        let _ = writeln!(self.out, "{}", e.line()).and_then(|()| self.out.flush());
        self.events.push(e);
    }

    /// The take-down, which ended at `done`, took `endpoints` local endpoints down.
    pub(crate) fn taken_down(&mut self, method: Method, endpoints: usize, done: i64) {
        let took = self.ms(done);
        let what = match method {
            Method::NotReady => format!(
                "local backends marked not ready ({endpoints} endpoints, took {took:.1} ms)"
            ),
            Method::Command => format!("--down-cmd ran (took {took:.1} ms)"),
        };
        self.push(self.marks.t0, what);
    }

    /// An attempt of the client, seen while waiting for failover: the first one that fails
    /// after the take-down started is an event.
    pub(crate) fn saw(&mut self, a: &Attempt) {
        if a.ok || a.t < self.marks.t0 || self.marks.first_failure.is_some() {
            return;
        }
        self.marks.first_failure = Some(a.t);
        self.push(
            a.t,
            format!(
                "first failed connection: {}",
                a.error.clone().unwrap_or_default()
            ),
        );
    }

    /// Traffic failed over at `first_remote`; `last_bad` is the last attempt before it that
    /// failed or was still served locally.
    pub(crate) fn failed_over(&mut self, last_bad: Option<&Attempt>, first_remote: &Attempt) {
        if let Some(b) = last_bad {
            self.marks.last_bad = Some(b.t);
            self.push(
                b.t,
                if b.ok {
                    format!(
                        "last connection served locally ({})",
                        b.backend.clone().unwrap_or_default()
                    )
                } else {
                    "last failed connection".to_owned()
                },
            );
        }
        self.marks.first_remote = first_remote.t;
        self.push(
            first_remote.t,
            format!(
                "first connection served remotely ({}); every later one too",
                first_remote.backend.clone().unwrap_or_default()
            ),
        );
    }

    /// The local backends were brought back, starting at `t1`.
    pub(crate) fn brought_up(&mut self, method: Method, t1: i64) {
        self.marks.t1 = t1;
        self.push(
            t1,
            match method {
                Method::NotReady => "local endpoints restored".to_owned(),
                Method::Command => "--up-cmd ran".to_owned(),
            },
        );
    }

    /// The client is served locally again, from `back` on.
    pub(crate) fn back(&mut self, back: &Attempt) {
        self.marks.back = back.t;
        self.push(
            back.t,
            format!(
                "first connection served locally again ({})",
                back.backend.clone().unwrap_or_default()
            ),
        );
    }

    /// The events and when things happened, for the report.
    pub(crate) fn finish(self) -> (Vec<Event>, Marks) {
        (self.events, self.marks)
    }
}
