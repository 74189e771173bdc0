//! Circuit breaker per target agent.
//!
//! ```text
//!  closed ──failure_threshold failures within window──► open ──open_for──► half-open
//!    ▲                                                   ▲                   │ admits at most
//!    └──────────── success_threshold successes ──────────┼── any failure ────┘ max_probes messages
//! ```
//!
//! Unlike the reference, half-open admits a bounded number of probes, not all traffic. What
//! counts as a failure is the caller's choice; the broker counts *messages* (a message's first
//! failed attempt), so one poison message retried to its attempt limit is one failure, not five.

use std::time::Duration;

use crate::time::Instant;

/// Breaker settings (the reference defaults, plus the probe bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Failures inside `window` that open the circuit (default 5).
    pub failure_threshold: u32,
    /// Window in which failures are counted (default 300 s).
    pub window: Duration,
    /// How long the circuit stays open (default 60 s).
    pub open_for: Duration,
    /// Successes in half-open that close it (default 2).
    pub success_threshold: u32,
    /// Messages admitted while half-open (default: `success_threshold`).
    pub max_probes: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failure_threshold: 5,
            window: Duration::from_secs(300),
            open_for: Duration::from_secs(60),
            success_threshold: 2,
            max_probes: 2,
        }
    }
}

/// A target's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Traffic flows; `failures` counted since `window_start`.
    Closed {
        /// Failures in the current window.
        failures: u32,
        /// When the current window began.
        window_start: Instant,
    },
    /// Traffic refused until `until`.
    Open {
        /// When half-open begins.
        until: Instant,
    },
    /// Probing: at most `max_probes` admitted; `probes_until` bounds how long unanswered
    /// probes are waited for before new ones are admitted.
    HalfOpen {
        /// Probes admitted so far.
        probes: u32,
        /// Successes so far.
        successes: u32,
        /// When to allow a fresh set of probes if the admitted ones never answered.
        probes_until: Instant,
    },
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit::Closed { failures: 0, window_start: Instant::ZERO }
    }
}

/// The circuit is open (or half-open with all probes out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen;

/// What a delivery said about the target's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target acknowledged a message.
    Success,
    /// The target failed a message.
    Failure,
}

/// Where a circuit is, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitPhase {
    /// Traffic flows.
    Closed,
    /// Probing after an open period.
    HalfOpen,
    /// Traffic refused.
    Open,
}

impl Circuit {
    /// The phase at `now`: an open circuit whose open period has passed is half-open (it
    /// moves there on its next admission).
    pub fn phase(&self, now: Instant) -> CircuitPhase {
        match *self {
            Circuit::Closed { .. } => CircuitPhase::Closed,
            Circuit::Open { until } if now < until => CircuitPhase::Open,
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => CircuitPhase::HalfOpen,
        }
    }

    /// Whether [`Circuit::admit`] would admit a message at `now`, without taking a probe.
    /// Used where the pipeline must know the circuit's verdict before it decides to route.
    pub fn would_admit(&self, config: &CircuitConfig, now: Instant) -> bool {
        let mut copy = *self;
        copy.admit(config, now).is_ok()
    }

    /// Records one outcome.
    pub fn record(&mut self, config: &CircuitConfig, outcome: Outcome, now: Instant) {
        match outcome {
            Outcome::Success => self.record_success(config, now),
            Outcome::Failure => self.record_failure(config, now),
        }
    }

    /// Admission of one message at `now`; may move open → half-open.
    pub fn admit(&mut self, config: &CircuitConfig, now: Instant) -> Result<(), CircuitOpen> {
        if let Circuit::Open { until } = *self {
            if now < until {
                return Err(CircuitOpen);
            }
            *self = Circuit::HalfOpen { probes: 0, successes: 0, probes_until: now + config.open_for };
        }
        if let Circuit::HalfOpen { probes, probes_until, .. } = self {
            if now >= *probes_until {
                *probes = 0;
                *probes_until = now + config.open_for;
            }
            if *probes >= config.max_probes {
                return Err(CircuitOpen);
            }
            *probes += 1;
        }
        Ok(())
    }

    /// A delivery to the target succeeded.
    pub fn record_success(&mut self, config: &CircuitConfig, now: Instant) {
        match self {
            Circuit::HalfOpen { successes, .. } => {
                *successes += 1;
                if *successes >= config.success_threshold {
                    *self = Circuit::Closed { failures: 0, window_start: now };
                }
            }
            Circuit::Closed { failures, .. } => *failures = 0,
            Circuit::Open { .. } => {}
        }
    }

    /// A message to the target failed.
    pub fn record_failure(&mut self, config: &CircuitConfig, now: Instant) {
        match self {
            Circuit::Closed { failures, window_start } => {
                if *failures == 0 || now.saturating_duration_since(*window_start) > config.window {
                    *failures = 0;
                    *window_start = now;
                }
                *failures += 1;
                if *failures >= config.failure_threshold {
                    *self = Circuit::Open { until: now + config.open_for };
                }
            }
            Circuit::HalfOpen { .. } => *self = Circuit::Open { until: now + config.open_for },
            Circuit::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Instant {
        Instant::from_nanos(s * 1_000_000_000)
    }

    #[test]
    fn opens_after_threshold_then_probes_then_closes() {
        let c = CircuitConfig::default();
        let mut circuit = Circuit::default();
        for t in 0..4 {
            circuit.record_failure(&c, at(10 + t));
            assert!(circuit.admit(&c, at(10 + t)).is_ok());
        }
        circuit.record_failure(&c, at(20));
        assert_eq!(circuit.admit(&c, at(79)), Err(CircuitOpen));
        assert!(circuit.admit(&c, at(80)).is_ok(), "first probe");
        assert!(circuit.admit(&c, at(80)).is_ok(), "second probe");
        assert_eq!(circuit.admit(&c, at(80)), Err(CircuitOpen), "half-open admits only the probes");
        circuit.record_success(&c, at(81));
        circuit.record_success(&c, at(81));
        assert!(matches!(circuit, Circuit::Closed { failures: 0, .. }));
        assert!(circuit.admit(&c, at(81)).is_ok());
    }

    #[test]
    fn failures_outside_the_window_start_over() {
        let c = CircuitConfig::default();
        let mut circuit = Circuit::default();
        for t in [0, 100, 200, 300] {
            circuit.record_failure(&c, at(t));
        }
        circuit.record_failure(&c, at(700));
        assert!(matches!(circuit, Circuit::Closed { failures: 1, .. }));
    }

    #[test]
    fn a_failed_probe_reopens() {
        let c = CircuitConfig { failure_threshold: 1, ..CircuitConfig::default() };
        let mut circuit = Circuit::default();
        circuit.record_failure(&c, at(0));
        assert!(circuit.admit(&c, at(60)).is_ok());
        circuit.record_failure(&c, at(61));
        assert_eq!(circuit.admit(&c, at(62)), Err(CircuitOpen));
        assert!(circuit.admit(&c, at(121)).is_ok());
    }

    #[test]
    fn would_admit_takes_no_probe() {
        let c = CircuitConfig { failure_threshold: 1, max_probes: 1, ..CircuitConfig::default() };
        let mut circuit = Circuit::default();
        assert!(circuit.would_admit(&c, at(0)));
        circuit.record(&c, Outcome::Failure, at(0));
        assert!(!circuit.would_admit(&c, at(59)));
        assert!(circuit.would_admit(&c, at(60)));
        assert!(circuit.would_admit(&c, at(60)), "peeking twice takes nothing");
        assert!(circuit.admit(&c, at(60)).is_ok());
        assert!(!circuit.would_admit(&c, at(60)), "the one probe is out");
        circuit.record(&c, Outcome::Success, at(61));
        circuit.record(&c, Outcome::Success, at(61));
        assert!(matches!(circuit, Circuit::Closed { .. }));
    }

    #[test]
    fn unanswered_probes_are_replaced_after_open_for() {
        let c = CircuitConfig { failure_threshold: 1, max_probes: 1, ..CircuitConfig::default() };
        let mut circuit = Circuit::default();
        circuit.record_failure(&c, at(0));
        assert!(circuit.admit(&c, at(60)).is_ok());
        assert_eq!(circuit.admit(&c, at(100)), Err(CircuitOpen));
        assert!(circuit.admit(&c, at(120)).is_ok(), "a lost probe does not wedge the circuit");
    }
}
