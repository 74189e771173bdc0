//! A seed-chosen fault plan for the embedded store: random step failures, random latency,
//! and windows in which the store is down (every step fails) or stalled (every step waits
//! for the window to end, as Redis does under SIGSTOP). Drawn from madsim's seeded RNG, so a
//! seed replays the same outage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use madsim::rand::{Rng, thread_rng};
use mas_server::store::faults::{Fault, StoreFaults};
use tokio::time::Instant;

/// How a window breaks the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Every step fails at once (connection refused).
    Down,
    /// Every step waits for the window to end (a frozen server).
    Stall,
}

/// One window of the plan, relative to the plan's start.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// When it begins.
    pub from: Duration,
    /// How long it lasts.
    pub length: Duration,
    /// What it does.
    pub outage: Outage,
}

/// The plan: drawn once, consulted before every store step.
#[derive(Debug)]
pub struct FaultPlan {
    start: Instant,
    /// Probability that a step outside the windows fails.
    pub error_rate: f64,
    /// Probability that a step outside the windows runs but its answer is lost.
    pub lost_answer_rate: f64,
    /// Upper bound of the latency added to a step outside the windows.
    pub max_latency: Duration,
    /// The outage windows.
    pub windows: Vec<Window>,
    injected: AtomicU64,
}

impl FaultPlan {
    /// Draws one or two windows, each at most `longest`, the first beginning within `within`,
    /// the second at least `gap` after the first ends (so no outage is longer than `longest`).
    pub fn draw(within: Duration, longest: Duration, gap: Duration) -> Self {
        let mut rng = thread_rng();
        let mut windows = Vec::new();
        let mut earliest = Duration::from_millis(100);
        for _ in 0..rng.gen_range(1..=2) {
            let from = earliest + Duration::from_millis(rng.gen_range(0..within.as_millis() as u64));
            let length = Duration::from_millis(rng.gen_range(100..=longest.as_millis() as u64));
            let outage = if rng.gen_bool(0.5) { Outage::Down } else { Outage::Stall };
            windows.push(Window { from, length, outage });
            earliest = from + length + gap;
        }
        FaultPlan {
            start: Instant::now(),
            error_rate: rng.gen_range(0.0..0.03),
            lost_answer_rate: rng.gen_range(0.0..0.01),
            max_latency: Duration::from_millis(rng.gen_range(0..20)),
            windows,
            injected: AtomicU64::new(0),
        }
    }

    /// One line per window, for the trace.
    pub fn describe(&self) -> String {
        let windows: Vec<String> =
            self.windows.iter().map(|w| format!("{:?} at {:?} for {:?}", w.outage, w.from, w.length)).collect();
        format!(
            "store faults: error rate {:.3}, lost answers {:.3}, latency up to {:?}, windows: {}",
            self.error_rate,
            self.lost_answer_rate,
            self.max_latency,
            windows.join(", ")
        )
    }

    /// Steps that met a fault so far (any kind).
    pub fn faults_injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

impl StoreFaults for FaultPlan {
    fn before(&self, _op: &'static str) -> Fault {
        let elapsed = self.start.elapsed();
        let count = || self.injected.fetch_add(1, Ordering::Relaxed);
        for w in &self.windows {
            if elapsed >= w.from && elapsed < w.from + w.length {
                count();
                return match w.outage {
                    Outage::Down => Fault::Fail,
                    Outage::Stall => Fault::Delay(w.from + w.length - elapsed),
                };
            }
        }
        let mut rng = thread_rng();
        if rng.gen_bool(self.error_rate) {
            count();
            return Fault::Fail;
        }
        if rng.gen_bool(self.lost_answer_rate) {
            count();
            return Fault::LoseAnswer;
        }
        match self.max_latency.as_millis() as u64 {
            0 => Fault::None,
            max => Fault::Delay(Duration::from_micros(rng.gen_range(0..max * 1000))),
        }
    }
}
