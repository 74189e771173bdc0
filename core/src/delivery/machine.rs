use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::{
    Delivery, DeliveryConfig, DeliveryStats, Output, Phase, QueuedMessage, RequeueReason, StoreEffect, TimerKind,
};
use crate::ids::DeliveryId;
use crate::time::{Instant, Now};

/// A delivery awaiting its ack.
#[derive(Debug)]
struct InFlight {
    message: QueuedMessage,
    deadline: Instant,
}

/// At-least-once delivery for one agent instance; see the [module docs](super).
#[derive(Debug)]
pub struct SessionDelivery {
    config: DeliveryConfig,
    rng: ChaCha8Rng,
    phase: Phase,
    in_flight: BTreeMap<DeliveryId, InFlight>,
    /// Ack deadlines, ordered, so the next one is found in O(log n).
    deadlines: BTreeSet<(Instant, DeliveryId)>,
    /// Bounded by `max_in_flight` plus one batch of hand-backs: every handle call drains it.
    outputs: VecDeque<Output>,
    stats: DeliveryStats,
}

impl SessionDelivery {
    /// A machine for a new session. `seed` drives delivery ids and retry jitter, so the same
    /// seed and inputs give the same outputs.
    pub fn new(config: DeliveryConfig, seed: u64) -> Self {
        assert!(config.max_in_flight > 0, "max_in_flight must be positive");
        assert!(config.max_delivery_attempts > 0, "max_delivery_attempts must be positive");
        SessionDelivery {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
            phase: Phase::Open,
            in_flight: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            outputs: VecDeque::new(),
            stats: DeliveryStats::default(),
        }
    }

    /// The configuration this machine runs with.
    pub fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    /// How many more messages the shell may claim from the store now: zero while the window is
    /// full, draining or closed.
    pub fn capacity(&self) -> usize {
        match self.phase {
            Phase::Open => self.config.max_in_flight.saturating_sub(self.in_flight.len()),
            Phase::Draining { .. } | Phase::Closed => 0,
        }
    }

    /// Deliveries awaiting an ack.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The session's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Counters since the session began.
    pub fn stats(&self) -> DeliveryStats {
        self.stats
    }

    /// A message claimed from the store. Delivered if the window has room and the session is
    /// open; otherwise handed straight back (same attempt), so the shell never has to hold it.
    pub fn handle_queued(&mut self, now: Now, message: QueuedMessage) {
        if message.attempt == 0 || message.attempt > self.config.max_delivery_attempts {
            let attempts = message.attempt;
            self.dead_letter(message, attempts, "invalid_delivery_attempt".to_string(), false);
            return;
        }
        if self.capacity() == 0 {
            self.requeue(message, now.mono, RequeueReason::NotAccepted);
            return;
        }
        let delivery_id = DeliveryId::random(&mut self.rng);
        let deadline = now.mono + self.config.ack_timeout;
        self.deadlines.insert((deadline, delivery_id.clone()));
        self.outputs.push_back(Output::Deliver(Delivery {
            delivery_id: delivery_id.clone(),
            entry: message.entry.clone(),
            envelope: message.envelope.clone(),
            attempt: message.attempt,
        }));
        self.in_flight.insert(delivery_id, InFlight { message, deadline });
        self.stats.delivered += 1;
    }

    /// A message the store says this session holds, offered again after a claim whose answer
    /// was lost (the store claimed it, the session never heard). Delivered unless it is
    /// already in flight here; O(window), so only for this recovery, never the common path.
    pub fn handle_recovered(&mut self, now: Now, message: QueuedMessage) {
        if self.in_flight.values().any(|f| f.message.entry == message.entry) {
            return;
        }
        self.handle_queued(now, message);
    }

    /// The agent acknowledged `delivery_id`.
    pub fn handle_ack(&mut self, _now: Now, delivery_id: &DeliveryId) {
        let Some(done) = self.take(delivery_id) else {
            self.stats.stale_acks += 1;
            return;
        };
        self.stats.acked += 1;
        self.outputs.push_back(Output::Store(StoreEffect::Ack { entry: done.message.entry }));
        self.finish_drain_if_idle();
    }

    /// The agent refused `delivery_id`. A retryable nack is retried after an exponential,
    /// jittered backoff until the attempt limit; anything else is dead-lettered with `reason`.
    pub fn handle_nack(&mut self, now: Now, delivery_id: &DeliveryId, reason: &str, retryable: bool) {
        let Some(done) = self.take(delivery_id) else {
            self.stats.stale_nacks += 1;
            return;
        };
        self.stats.nacked += 1;
        let attempt = done.message.attempt;
        if !retryable {
            self.dead_letter(done.message, attempt, reason.to_string(), true);
        } else if attempt >= self.config.max_delivery_attempts {
            self.dead_letter(done.message, attempt, format!("{reason}; retry_limit_exceeded"), true);
        } else {
            let not_before = now.mono + self.retry_backoff(attempt);
            self.requeue(done.message, not_before, RequeueReason::RetryableNack);
        }
        self.finish_drain_if_idle();
    }

    /// The session ended (stream closed, peer gone). Everything in flight goes back to the
    /// queue at once for another instance; the attempt is not counted, since the message
    /// itself did nothing wrong.
    pub fn handle_disconnect(&mut self, now: Now) {
        if self.phase == Phase::Closed {
            return;
        }
        self.hand_back_all(now.mono, RequeueReason::Disconnected);
        self.phase = Phase::Closed;
    }

    /// Stop taking new work and wait for in-flight acks until `deadline`; then hand the rest
    /// back. Emits [`Output::Drained`] once nothing is in flight. A second drain request can
    /// only bring the deadline forward.
    pub fn handle_drain(&mut self, now: Now, deadline: Instant) {
        match self.phase {
            Phase::Closed => return,
            Phase::Draining { deadline: current } if current <= deadline => {}
            Phase::Open | Phase::Draining { .. } => self.phase = Phase::Draining { deadline },
        }
        if deadline <= now.mono {
            self.handle_timeout(now);
        } else {
            self.finish_drain_if_idle();
        }
    }

    /// Fires every deadline at or before `now`. A call with nothing due does nothing.
    pub fn handle_timeout(&mut self, now: Now) {
        while let Some((deadline, id)) = self.deadlines.first().cloned() {
            if deadline > now.mono {
                break;
            }
            self.deadlines.pop_first();
            let Some(done) = self.in_flight.remove(&id) else { continue };
            self.stats.ack_timeouts += 1;
            let attempt = done.message.attempt;
            if attempt >= self.config.max_delivery_attempts {
                self.dead_letter(done.message, attempt, "ack_timeout; retry_limit_exceeded".into(), false);
            } else {
                self.requeue(done.message, now.mono, RequeueReason::AckTimeout);
            }
        }
        if let Phase::Draining { deadline } = self.phase
            && deadline <= now.mono
        {
            self.hand_back_all(now.mono, RequeueReason::DrainDeadline);
        }
        self.finish_drain_if_idle();
    }

    /// The next output to act on. Call after every `handle_*` until it returns `None`.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `handle_timeout` must next be called, and why. Re-read after every `handle_*`.
    pub fn poll_timeout(&self) -> Option<(Instant, TimerKind)> {
        let ack = self.deadlines.first().map(|(at, _)| (*at, TimerKind::AckDeadline));
        let drain = match self.phase {
            Phase::Draining { deadline } => Some((deadline, TimerKind::DrainDeadline)),
            Phase::Open | Phase::Closed => None,
        };
        match (ack, drain) {
            (Some(a), Some(d)) => Some(if a.0 <= d.0 { a } else { d }),
            (a, d) => a.or(d),
        }
    }

    /// Backoff before retrying a message whose `attempt` just failed: `initial · 2^(attempt-1)`
    /// capped at the maximum, then drawn uniformly from its upper half so that a burst of
    /// failures does not retry in lockstep.
    fn retry_backoff(&mut self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        let full = self
            .config
            .retry_backoff_initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.config.retry_backoff_max);
        let half = full / 2;
        let span_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        // No draw for an empty span (the draw sequence is part of a seed's trajectory); a span
        // of `u64::MAX` ns takes any draw (`span + 1` would wrap to a zero divisor).
        let jitter = match span_nanos {
            0 => 0,
            u64::MAX => self.rng.next_u64(),
            span => self.rng.next_u64() % (span + 1),
        };
        half + Duration::from_nanos(jitter)
    }

    fn take(&mut self, delivery_id: &DeliveryId) -> Option<InFlight> {
        if self.phase == Phase::Closed {
            return None;
        }
        let done = self.in_flight.remove(delivery_id)?;
        self.deadlines.remove(&(done.deadline, delivery_id.clone()));
        Some(done)
    }

    fn hand_back_all(&mut self, at: Instant, reason: RequeueReason) {
        self.deadlines.clear();
        for (_, done) in std::mem::take(&mut self.in_flight) {
            self.requeue(done.message, at, reason);
        }
    }

    fn requeue(&mut self, message: QueuedMessage, not_before: Instant, reason: RequeueReason) {
        let attempt = message.attempt + u32::from(reason.counts_as_attempt());
        self.stats.requeued += 1;
        self.outputs.push_back(Output::Store(StoreEffect::Requeue {
            entry: message.entry,
            envelope: message.envelope,
            attempt,
            not_before,
            reason,
        }));
    }

    fn dead_letter(&mut self, message: QueuedMessage, attempts: u32, reason: String, nacked: bool) {
        self.stats.dead_lettered += 1;
        self.outputs.push_back(Output::Store(StoreEffect::DeadLetter {
            entry: message.entry,
            envelope: message.envelope,
            attempts,
            reason,
            nacked,
        }));
    }

    fn finish_drain_if_idle(&mut self) {
        if matches!(self.phase, Phase::Draining { .. }) && self.in_flight.is_empty() {
            self.phase = Phase::Closed;
            self.outputs.push_back(Output::Drained);
        }
    }
}
