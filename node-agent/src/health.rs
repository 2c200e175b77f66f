//! Backend health: the kernel's evidence first, bounded probes to confirm it (ADR 0018).
//!
//! The sock_ops program marks a backend *suspect* the moment a translated connection to it is
//! refused or its SYN times out; the connect hook skips it from the very next `connect()`. The
//! kernel reports each new suspicion in a ring buffer. This module:
//!
//! - reads those events and probes the suspect at once: a success clears the suspicion, `fall`
//!   failures in a row mark it *down* (skipped until `rise` successes in a row);
//! - re-probes suspect and down backends every `interval`;
//! - sweeps the backends that carry no evidence at a bounded rate (`sweep_rate` per second,
//!   jittered, round robin), so that a backend nobody connects to is still found dead, without
//!   the probe load growing with the mesh: a failed sweep probe makes the backend suspect;
//! - caps probes in flight; a probe that cannot run (no file descriptor, no memory, no local
//!   port) is no verdict on the backend.
//!
//! Every result is O(1): a hash map lookup and at most one map write.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telemetry::metrics::Registry;
use tokio::sync::{mpsc, watch};

use crate::maps::{self, HealthEvent, HealthReason};
use crate::program::Programmer;

/// Metric names.
pub mod m {
    /// Probes run, by why (suspect, down, sweep) and result (ok, fail, inconclusive).
    pub const PROBES: &str = "clustermesh_health_probes_total";
    /// Kernel health events received, by reason.
    pub const EVENTS: &str = "clustermesh_health_kernel_events_total";
    /// Backends by health state (up, suspect, down).
    pub const STATE: &str = "clustermesh_health_backends";
    /// The datapath programs' own counters ([`crate::maps::STAT_NAMES`]).
    pub const KERNEL: &str = "clustermesh_datapath_kernel_total";
}

/// Declares this module's metrics.
pub fn register(r: &Registry) {
    r.counter(
        m::PROBES,
        "Health probes run, by why they ran and their result.",
        &["why", "result"],
    );
    r.counter(
        m::EVENTS,
        "Health events from the kernel's sock_ops program, by reason.",
        &["reason"],
    );
    r.gauge(m::STATE, "Backends by health state.", &["state"]);
    r.gauge(
        m::KERNEL,
        "Counters of the datapath programs (suspects marked, events lost, ...).",
        &["counter"],
    );
}

/// Health settings.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Time between probes of a suspect or down backend.
    pub interval: Duration,
    /// Connect timeout of one probe.
    pub timeout: Duration,
    /// Failed probes in a row that mark a backend down.
    pub fall: u32,
    /// Successful probes in a row that bring a down backend back.
    pub rise: u32,
    /// Background probes per second over all backends that carry no evidence (0: none).
    pub sweep_rate: u32,
    /// Re-probes of suspect and down backends per second at most, all together: a mass
    /// failure does not turn into a probe storm (the kernel keeps skipping them meanwhile).
    pub retry_rate: u32,
    /// Probes in flight at most.
    pub max_in_flight: usize,
    /// How long the kernel skips a suspect backend when the agent says nothing.
    pub quarantine: Duration,
    /// Initial SYN retransmission timeout of translated connects (`None`: the kernel's, 1 s).
    pub syn_timeout: Option<Duration>,
}

impl HealthConfig {
    /// Writes the kernel-side health settings into `c` (its other settings stay).
    pub fn apply_to(&self, c: &mut maps::Config) {
        c.quarantine_ns = u64::try_from(self.quarantine.as_nanos()).unwrap_or(u64::MAX);
        c.syn_rto_jiffies = self.syn_timeout.map_or(0, syn_rto_jiffies);
    }
}

/// The running kernel's tick rate: `CONFIG_HZ` from `/proc/config.gz`, else from
/// `/boot/config-<release>`; `None` when neither can be read.
pub fn kernel_hz() -> Option<u64> {
    use std::io::Read;
    let from = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("CONFIG_HZ="))
            .and_then(|v| v.trim().parse().ok())
    };
    let proc_config = std::fs::File::open("/proc/config.gz").ok().and_then(|f| {
        let mut text = String::new();
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .ok()?;
        from(&text)
    });
    proc_config.or_else(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        from(&std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?)
    })
}

/// The tick rate assumed when the kernel's config cannot be read (the common distribution
/// setting of x86-64 servers).
const ASSUMED_HZ: u64 = 250;

/// A duration in kernel jiffies (at least 1), for `syn_rto_jiffies`.
pub fn syn_rto_jiffies(d: Duration) -> u32 {
    let hz = kernel_hz().unwrap_or_else(|| {
        tracing::warn!(
            assumed = ASSUMED_HZ,
            "cannot read the kernel's CONFIG_HZ (/proc/config.gz, /boot/config-*); the SYN timeout assumes it"
        );
        ASSUMED_HZ
    });
    let j = d.as_millis() as u64 * hz / 1000;
    u32::try_from(j.max(1)).unwrap_or(u32::MAX)
}

/// What the agent believes of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Serving; probed only by the sweep.
    Up,
    /// The kernel or a probe saw it fail; skipped by the kernel while quarantined.
    Suspect,
    /// Confirmed down by `fall` probes; skipped until `rise` probes succeed.
    Down,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Suspect => "suspect",
            Self::Down => "down",
        }
    }
}

/// Why a probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Suspect,
    Down,
    Sweep,
}

impl Why {
    fn label(self) -> &'static str {
        match self {
            Self::Suspect => "suspect",
            Self::Down => "down",
            Self::Sweep => "sweep",
        }
    }
}

/// A probe's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected.
    Ok,
    /// Refused, unreachable or timed out.
    Fail,
    /// Could not run (no fd, memory, port): no verdict.
    Inconclusive,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Fail => "fail",
            Self::Inconclusive => "inconclusive",
        }
    }
}

/// Classifies a failed connect: resource exhaustion on our side is no verdict.
pub fn classify(e: &std::io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(
            libc::EMFILE
            | libc::ENFILE
            | libc::ENOMEM
            | libc::ENOBUFS
            | libc::EADDRNOTAVAIL
            | libc::EAGAIN,
        ) => Outcome::Inconclusive,
        _ => Outcome::Fail,
    }
}

async fn probe(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(e)) => classify(&e),
        Err(_) => Outcome::Fail,
    }
}

#[derive(Debug, Clone, Copy)]
struct Backend {
    state: State,
    fails: u32,
    oks: u32,
    /// Bumped on every state change: a queued re-probe of an older generation is dropped.
    generation: u64,
    in_flight: bool,
    /// Position in the sweep list while Up.
    sweep_index: Option<usize>,
}

/// What the health loop decided about a backend, for the caller to apply to the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Clear the kernel's suspicion and mark it healthy.
    Restore,
    /// Make the kernel skip it for the quarantine.
    Suspect,
    /// Mark it down in the datapath.
    MarkDown,
    /// The kernel already skips it: count it as unhealthy (spill-over and weights follow).
    Noted,
}

/// The health bookkeeping, free of I/O so that it can be tested on its own.
#[derive(Debug)]
pub struct Tracker {
    cfg: HealthConfig,
    backends: HashMap<SocketAddr, Backend>,
    /// Re-probes of suspect and down backends, earliest first.
    due: BinaryHeap<std::cmp::Reverse<(Instant, SocketAddr, u64)>>,
    /// Backends the sweep visits, round robin.
    sweep: Vec<SocketAddr>,
    cursor: usize,
    tokens: f64,
    retry_tokens: f64,
    last_refill: Instant,
    in_flight: usize,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(cfg: HealthConfig, now: Instant) -> Self {
        Self {
            cfg,
            backends: HashMap::new(),
            due: BinaryHeap::new(),
            sweep: Vec::new(),
            cursor: 0,
            tokens: 0.0,
            retry_tokens: f64::from(cfg.retry_rate.max(1)),
            last_refill: now,
            in_flight: 0,
        }
    }

    fn sweep_add(&mut self, addr: SocketAddr) {
        if let Some(b) = self.backends.get_mut(&addr)
            && b.sweep_index.is_none()
        {
            b.sweep_index = Some(self.sweep.len());
            self.sweep.push(addr);
        }
    }

    fn sweep_remove(&mut self, addr: SocketAddr) {
        let Some(i) = self
            .backends
            .get_mut(&addr)
            .and_then(|b| b.sweep_index.take())
        else {
            return;
        };
        self.sweep.swap_remove(i);
        if let Some(moved) = self.sweep.get(i).copied()
            && let Some(b) = self.backends.get_mut(&moved)
        {
            b.sweep_index = Some(i);
        }
    }

    /// Makes the tracked set equal to `targets` (with what the datapath says of each: healthy
    /// or down); new backends start as the datapath has them.
    pub fn set_targets(&mut self, targets: &[(SocketAddr, bool)], now: Instant) {
        let wanted: HashMap<SocketAddr, bool> = targets.iter().copied().collect();
        let gone: Vec<SocketAddr> = self
            .backends
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for a in gone {
            self.sweep_remove(a);
            if self.backends.remove(&a).is_some_and(|b| b.in_flight) {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
        }
        for (addr, healthy) in wanted {
            if self.backends.contains_key(&addr) {
                continue;
            }
            let state = if healthy { State::Up } else { State::Down };
            self.backends.insert(
                addr,
                Backend {
                    state,
                    fails: 0,
                    oks: 0,
                    generation: 0,
                    in_flight: false,
                    sweep_index: None,
                },
            );
            if healthy {
                self.sweep_add(addr);
            } else {
                self.due.push(std::cmp::Reverse((now, addr, 0)));
            }
        }
        if self.cursor >= self.sweep.len() {
            self.cursor = 0;
        }
    }

    /// Moves `addr` to `state`; a suspect or down backend is next probed at `probe_at`.
    fn change(&mut self, addr: SocketAddr, state: State, probe_at: Instant) {
        let Some(b) = self.backends.get_mut(&addr) else {
            return;
        };
        b.state = state;
        b.fails = 0;
        b.oks = 0;
        b.generation += 1;
        let generation = b.generation;
        if state == State::Up {
            self.sweep_add(addr);
        } else {
            self.sweep_remove(addr);
            self.due
                .push(std::cmp::Reverse((probe_at, addr, generation)));
        }
    }

    fn requeue(&mut self, addr: SocketAddr, generation: u64, at: Instant) {
        self.due.push(std::cmp::Reverse((at, addr, generation)));
    }

    /// The kernel reported `ev`. Returns what to do to the maps, if anything.
    pub fn on_event(
        &mut self,
        addr: SocketAddr,
        reason: HealthReason,
        now: Instant,
    ) -> Option<Action> {
        let state = self.backends.get(&addr)?.state;
        match (reason, state) {
            // The kernel already skips it: probe it now to confirm or clear.
            (HealthReason::Refused | HealthReason::SynTimeout, State::Up) => {
                self.change(addr, State::Suspect, now);
                Some(Action::Noted)
            }
            // A real connection got through: the kernel cleared its suspicion.
            (HealthReason::Established, State::Suspect) => {
                self.change(addr, State::Up, now);
                Some(Action::Restore)
            }
            _ => None,
        }
    }

    /// The probes to start now, at most what the in-flight cap allows: due re-probes of
    /// suspect and down backends first (as far as the retry rate allows), then the sweep as
    /// far as its rate allows.
    pub fn due(&mut self, now: Instant) -> Vec<(SocketAddr, &'static str)> {
        let mut out = Vec::new();
        let elapsed = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.last_refill = now;
        let rate = f64::from(self.cfg.sweep_rate);
        // At most one second's worth saved up, so a pause never turns into a burst.
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        let retry = f64::from(self.cfg.retry_rate.max(1));
        self.retry_tokens = (self.retry_tokens + elapsed * retry).min(retry);
        while self.in_flight < self.cfg.max_in_flight && self.retry_tokens >= 1.0 {
            let Some(std::cmp::Reverse((at, addr, generation))) = self.due.peek().copied() else {
                break;
            };
            if at > now {
                break;
            }
            self.due.pop();
            let Some(b) = self.backends.get_mut(&addr) else {
                continue;
            };
            if b.generation != generation || b.in_flight || b.state == State::Up {
                continue;
            }
            b.in_flight = true;
            self.in_flight += 1;
            self.retry_tokens -= 1.0;
            let why = if b.state == State::Down {
                Why::Down
            } else {
                Why::Suspect
            };
            out.push((addr, why.label()));
        }
        let mut visited = 0;
        while self.tokens >= 1.0
            && self.in_flight < self.cfg.max_in_flight
            && visited < self.sweep.len()
        {
            if self.cursor >= self.sweep.len() {
                self.cursor = 0;
            }
            let addr = self.sweep[self.cursor];
            self.cursor += 1;
            visited += 1;
            let Some(b) = self.backends.get_mut(&addr) else {
                continue;
            };
            if b.in_flight {
                continue;
            }
            b.in_flight = true;
            self.in_flight += 1;
            self.tokens -= 1.0;
            out.push((addr, Why::Sweep.label()));
        }
        out
    }

    /// When the next re-probe is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|std::cmp::Reverse((at, _, _))| *at)
    }

    /// A probe of `addr` ended. Returns what to do to the maps, if anything.
    pub fn on_result(
        &mut self,
        addr: SocketAddr,
        outcome: Outcome,
        now: Instant,
    ) -> Option<Action> {
        let (fall, rise) = (self.cfg.fall.max(1), self.cfg.rise.max(1));
        let later = now + self.cfg.interval;
        let b = self.backends.get_mut(&addr)?;
        if !b.in_flight {
            return None;
        }
        b.in_flight = false;
        self.in_flight = self.in_flight.saturating_sub(1);
        let (state, generation) = (b.state, b.generation);
        match (state, outcome) {
            (State::Up, Outcome::Ok | Outcome::Inconclusive) => None,
            (_, Outcome::Inconclusive) => {
                self.requeue(addr, generation, later);
                None
            }
            (State::Up, Outcome::Fail) => {
                self.change(addr, State::Suspect, later);
                // This failure counts toward `fall`.
                if let Some(b) = self.backends.get_mut(&addr) {
                    b.fails = 1;
                }
                Some(Action::Suspect)
            }
            (State::Suspect, Outcome::Ok) => {
                self.change(addr, State::Up, now);
                Some(Action::Restore)
            }
            (State::Suspect, Outcome::Fail) => {
                b.fails += 1;
                if b.fails >= fall {
                    self.change(addr, State::Down, later);
                    Some(Action::MarkDown)
                } else {
                    self.requeue(addr, generation, later);
                    // Keeps the kernel's quarantine going while unconfirmed.
                    Some(Action::Suspect)
                }
            }
            (State::Down, Outcome::Ok) => {
                b.oks += 1;
                if b.oks >= rise {
                    self.change(addr, State::Up, now);
                    Some(Action::Restore)
                } else {
                    self.requeue(addr, generation, later);
                    None
                }
            }
            (State::Down, Outcome::Fail) => {
                b.oks = 0;
                self.requeue(addr, generation, later);
                None
            }
        }
    }

    /// Backends per state.
    pub fn counts(&self) -> [(State, usize); 3] {
        let mut c = [(State::Up, 0), (State::Suspect, 0), (State::Down, 0)];
        for b in self.backends.values() {
            match b.state {
                State::Up => c[0].1 += 1,
                State::Suspect => c[1].1 += 1,
                State::Down => c[2].1 += 1,
            }
        }
        c
    }

    /// The state of `addr`.
    pub fn state(&self, addr: SocketAddr) -> Option<State> {
        self.backends.get(&addr).map(|b| b.state)
    }
}

fn lock<T>(p: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match p.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// Applies an action to the maps, logging and counting it.
fn act(
    programmer: &Mutex<Programmer>,
    cfg: &HealthConfig,
    addr: SocketAddr,
    action: Action,
    metrics: &Registry,
) {
    let mut p = lock(programmer);
    let r = match action {
        Action::Restore => p
            .set_suspect(addr, 0)
            .and_then(|_| p.set_health(addr, true))
            .map(|changed| {
                if changed {
                    metrics.inc(crate::agent::m::RECOVERIES, &[]);
                    tracing::info!(backend = %addr, "backend healthy again");
                }
            }),
        Action::Suspect => {
            let until = maps::monotonic_ns()
                + u64::try_from(cfg.quarantine.as_nanos()).unwrap_or(u64::MAX / 2);
            p.set_suspect(addr, until).map(|_| {
                tracing::info!(backend = %addr, "backend suspect (probe failed); skipped by new connections");
            })
        }
        Action::Noted => p.note_suspect(addr, true),
        Action::MarkDown => p.set_health(addr, false).map(|changed| {
            if changed {
                metrics.inc(crate::agent::m::FAILOVERS, &[]);
                tracing::warn!(backend = %addr, "backend down; skipped by new connections until it answers again");
            }
        }),
    };
    if let Err(e) = r {
        tracing::error!(backend = %addr, error = %e, "could not update backend health");
    }
}

/// Reads the kernel's health events and hands them on, on a thread of its own (poll(2) on
/// the ring's fd), until the receiver goes away.
fn read_events(mut ring: aya::maps::RingBuf<aya::maps::MapData>, tx: mpsc::Sender<HealthEvent>) {
    loop {
        while let Some(item) = ring.next() {
            if let Some(ev) = maps::parse_health_event(&item) {
                // A full queue drops the event: the quarantine and the sweep cover it.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(ev) {
                    return;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        if let Err(e) = crate::datapath::wait_ring(&ring, std::time::Duration::from_millis(100)) {
            tracing::error!(error = %e, "cannot poll the health event ring; relying on probes");
            return;
        }
    }
}

/// A small xorshift generator for jitter (no cryptographic use).
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self((t ^ u64::from(std::process::id()).rotate_left(32)) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Makes the tracker follow the current targets, with what the datapath says of each.
fn follow_targets(
    targets: &mut watch::Receiver<Vec<SocketAddr>>,
    programmer: &Mutex<Programmer>,
    tracker: &mut Tracker,
) {
    let list = targets.borrow_and_update().clone();
    let p = lock(programmer);
    let with_health: Vec<(SocketAddr, bool)> = list
        .iter()
        .map(|a| (*a, p.is_healthy(*a).unwrap_or(true)))
        .collect();
    drop(p);
    tracker.set_targets(&with_health, Instant::now());
}

/// Runs health for the programmed TCP backends in `targets` until the task is dropped.
pub async fn run(
    cfg: HealthConfig,
    mut targets: watch::Receiver<Vec<SocketAddr>>,
    programmer: Arc<Mutex<Programmer>>,
    metrics: Registry,
) {
    {
        let mut p = lock(&programmer);
        if let Err(e) = p.datapath_mut().update_config(|c| cfg.apply_to(c)) {
            tracing::error!(error = %e, "cannot write the datapath's health settings; the kernel uses its defaults");
        }
    }
    let (ev_tx, mut ev_rx) = mpsc::channel::<HealthEvent>(4096);
    let ring = lock(&programmer).datapath_mut().events.take();
    if let Some(ring) = ring {
        // Ends by itself within 100 ms of this loop's end (the channel closes).
        let spawned = std::thread::Builder::new()
            .name("health-events".into())
            .spawn(move || read_events(ring, ev_tx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the health event reader; relying on probes");
        }
    }
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<(SocketAddr, Outcome, &'static str)>();
    let mut tracker = Tracker::new(cfg, Instant::now());
    // What is programmed already, then every change.
    follow_targets(&mut targets, &programmer, &mut tracker);
    let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
    // The sweep's pace: often enough to spread its budget, rarely enough to cost nothing;
    // jittered (15..25 ms) so that the nodes of a cluster do not probe in step.
    let mut jitter = Jitter::seeded();
    loop {
        let step = Duration::from_micros(15_000 + jitter.below(10_000));
        let now = Instant::now();
        let wake = tracker
            .next_due()
            .map_or(now + step, |d| d.min(now + step))
            .max(now);
        tokio::select! {
            changed = targets.changed() => {
                if changed.is_err() {
                    return;
                }
                follow_targets(&mut targets, &programmer, &mut tracker);
            }
            Some(ev) = ev_rx.recv() => {
                metrics.inc(m::EVENTS, &[ev.reason.as_str()]);
                let addr = lock(&programmer).event_backend(ev.backend_id, ev.addr);
                if let Some(addr) = addr {
                    if ev.reason != HealthReason::Established {
                        tracing::info!(backend = %addr, reason = ev.reason.as_str(), "kernel marked backend suspect; probing it");
                    }
                    if let Some(action) = tracker.on_event(addr, ev.reason, Instant::now()) {
                        act(&programmer, &cfg, addr, action, &metrics);
                    }
                }
            }
            Some((addr, outcome, why)) = res_rx.recv() => {
                metrics.inc(m::PROBES, &[why, outcome.label()]);
                if outcome == Outcome::Inconclusive {
                    tracing::debug!(backend = %addr, "probe could not run; no verdict");
                }
                if let Some(action) = tracker.on_result(addr, outcome, Instant::now()) {
                    act(&programmer, &cfg, addr, action, &metrics);
                }
            }
            _ = stats_tick.tick() => {
                let counts = tracker.counts();
                for (state, n) in counts {
                    metrics.set(m::STATE, &[state.label()], n as f64);
                }
                let (healthy, down) = (counts[0].1 + counts[1].1, counts[2].1);
                metrics.set(crate::agent::m::BACKEND_HEALTH, &["healthy"], healthy as f64);
                metrics.set(crate::agent::m::BACKEND_HEALTH, &["unhealthy"], down as f64);
                if let Ok(stats) = lock(&programmer).datapath().stats() {
                    for (name, n) in stats {
                        metrics.set(m::KERNEL, &[name], n as f64);
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        for (addr, why) in tracker.due(Instant::now()) {
            let tx = res_tx.clone();
            let timeout = cfg.timeout;
            tokio::spawn(async move {
                let outcome = probe(addr, timeout).await;
                let _ = tx.send((addr, outcome, why));
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(sweep_rate: u32) -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            fall: 2,
            rise: 2,
            sweep_rate,
            retry_rate: 1000,
            max_in_flight: 8,
            quarantine: Duration::from_secs(5),
            syn_timeout: None,
        }
    }

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80))
    }

    #[test]
    fn a_kernel_suspect_is_probed_at_once_then_restored_or_marked_down() {
        let t0 = Instant::now();
        let mut t = Tracker::new(cfg(0), t0);
        t.set_targets(&[(addr(1), true), (addr(2), true)], t0);
        assert!(t.due(t0).is_empty(), "no sweep, no evidence: no probe");
        assert_eq!(
            t.on_event(addr(1), HealthReason::Refused, t0),
            Some(Action::Noted)
        );
        assert_eq!(t.state(addr(1)), Some(State::Suspect));
        assert_eq!(t.due(t0), vec![(addr(1), "suspect")]);
        assert!(t.due(t0).is_empty(), "one probe in flight per backend");
        // First failure: still suspect (kernel keeps skipping), re-probed after the interval.
        assert_eq!(
            t.on_result(addr(1), Outcome::Fail, t0),
            Some(Action::Suspect)
        );
        assert!(t.due(t0).is_empty());
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(t.due(t1), vec![(addr(1), "suspect")]);
        assert_eq!(
            t.on_result(addr(1), Outcome::Fail, t1),
            Some(Action::MarkDown)
        );
        assert_eq!(t.state(addr(1)), Some(State::Down));
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!(t.due(t2), vec![(addr(1), "down")]);
        assert_eq!(t.on_result(addr(1), Outcome::Ok, t2), None, "rise is 2");
        let t3 = t2 + Duration::from_millis(100);
        assert_eq!(t.due(t3), vec![(addr(1), "down")]);
        assert_eq!(t.on_result(addr(1), Outcome::Ok, t3), Some(Action::Restore));
        assert_eq!(t.state(addr(1)), Some(State::Up));
        // A false alarm: one good probe clears a suspect.
        t.on_event(addr(2), HealthReason::SynTimeout, t3);
        assert_eq!(t.due(t3), vec![(addr(2), "suspect")]);
        assert_eq!(t.on_result(addr(2), Outcome::Ok, t3), Some(Action::Restore));
    }

    #[test]
    fn a_probe_that_cannot_run_is_no_verdict() {
        let t0 = Instant::now();
        let mut t = Tracker::new(cfg(1000), t0);
        t.set_targets(&[(addr(1), true)], t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(t.due(t1), vec![(addr(1), "sweep")]);
        assert_eq!(t.on_result(addr(1), Outcome::Inconclusive, t1), None);
        assert_eq!(t.state(addr(1)), Some(State::Up));
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(classify(&emfile), Outcome::Inconclusive);
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(classify(&refused), Outcome::Fail);
    }

    #[test]
    fn the_sweep_stays_within_its_rate_whatever_the_number_of_backends() {
        let t0 = Instant::now();
        let mut c = cfg(100);
        c.max_in_flight = 100_000;
        let mut t = Tracker::new(c, t0);
        let targets: Vec<(SocketAddr, bool)> = (0..10_000).map(|i| (addr(i), true)).collect();
        t.set_targets(&targets, t0);
        let mut probes = 0;
        let mut seen = std::collections::HashSet::new();
        // 10 s in 20 ms steps; every probe answers at once.
        for step in 1..=500 {
            let now = t0 + Duration::from_millis(20 * step);
            for (a, why) in t.due(now) {
                assert_eq!(why, "sweep");
                probes += 1;
                seen.insert(a);
                t.on_result(a, Outcome::Ok, now);
            }
        }
        assert!(
            (990..=1000).contains(&probes),
            "{probes} probes in 10 s at 100/s"
        );
        assert_eq!(
            seen.len(),
            probes,
            "round robin: no backend twice before all once"
        );
        // A failing sweep probe makes the backend suspect at once.
        let now = t0 + Duration::from_secs(11);
        let (a, _) = t.due(now)[0];
        assert_eq!(t.on_result(a, Outcome::Fail, now), Some(Action::Suspect));
        assert_eq!(
            t.on_result(a, Outcome::Fail, now),
            None,
            "not in flight any more"
        );
        // Removing targets keeps the sweep list consistent.
        t.set_targets(&targets[..10], now);
        assert_eq!(t.counts()[0].1 + t.counts()[1].1, 10);
        let later = now + Duration::from_secs(1);
        for (a, _) in t.due(later) {
            assert!(targets[..10].iter().any(|(x, _)| *x == a));
        }
    }

    #[test]
    fn re_probes_stay_within_the_retry_rate_in_a_mass_failure() {
        let t0 = Instant::now();
        let mut c = cfg(0);
        c.retry_rate = 100;
        c.max_in_flight = 100_000;
        let mut t = Tracker::new(c, t0);
        let targets: Vec<(SocketAddr, bool)> = (0..10_000).map(|i| (addr(i), false)).collect();
        t.set_targets(&targets, t0);
        let mut probes = 0;
        for step in 0..=500 {
            let now = t0 + Duration::from_millis(20 * step);
            for (a, why) in t.due(now) {
                assert_eq!(why, "down");
                probes += 1;
                t.on_result(a, Outcome::Fail, now);
            }
        }
        // One second's burst, then 100/s for 10 s.
        assert!(
            (1000..=1110).contains(&probes),
            "{probes} re-probes in 10 s"
        );
    }

    #[test]
    fn backends_down_in_the_datapath_start_down_and_are_reprobed() {
        let t0 = Instant::now();
        let mut t = Tracker::new(cfg(0), t0);
        t.set_targets(&[(addr(1), false)], t0);
        assert_eq!(t.state(addr(1)), Some(State::Down));
        assert_eq!(t.due(t0), vec![(addr(1), "down")]);
    }

    #[test]
    fn jiffies_follow_the_kernel_tick() {
        // The kernel's own config, read another way (zcat), where the machine exposes it.
        let zcat = std::process::Command::new("sh")
            .arg("-c")
            .arg("zcat /proc/config.gz | sed -n 's/^CONFIG_HZ=//p'")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<u64>().ok());
        if let Some(hz) = zcat {
            assert_eq!(kernel_hz(), Some(hz));
        }
        let hz = kernel_hz().unwrap_or(ASSUMED_HZ);
        assert_eq!(u64::from(syn_rto_jiffies(Duration::from_secs(1))), hz);
        assert_eq!(
            u64::from(syn_rto_jiffies(Duration::from_millis(100))),
            hz / 10
        );
        assert_eq!(syn_rto_jiffies(Duration::from_micros(1)), 1);
    }
}
