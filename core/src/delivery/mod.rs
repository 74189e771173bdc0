//! The session delivery machine: at-least-once delivery to one connected agent instance.
//!
//! ```text
//!   store ──handle_queued──► [ in flight (≤ max_in_flight) ] ──Deliver──► agent
//!                                 │ ack            → Store(Ack)
//!                                 │ nack retryable → Store(Requeue attempt+1, not before now+backoff)
//!                                 │ nack final / attempts used up → Store(DeadLetter reason)
//!                                 │ ack deadline passes → Store(Requeue attempt+1) / DeadLetter
//!                                 │ disconnect     → Store(Requeue same attempt, now)
//!                                 └ drain: wait for acks until the drain deadline, then hand back
//! ```
//!
//! Every message handed in leaves the machine through exactly one store effect, so nothing is
//! lost while the shell applies the effects it is given. Each delivery attempt gets a fresh
//! [`DeliveryId`]; an ack or nack naming an unknown, already settled or earlier attempt's id
//! changes nothing and is counted in [`DeliveryStats`].
//!
//! Driving contract: after every `handle_*` call drain [`SessionDelivery::poll_output`] until
//! `None`, then re-read [`SessionDelivery::poll_timeout`] and call `handle_timeout` when it
//! passes. The machine never reads a clock; time only comes in as [`Now`](crate::time::Now).

mod machine;

pub use machine::SessionDelivery;

use std::sync::Arc;
use std::time::Duration;

use crate::ids::DeliveryId;
pub use crate::policy::circuit::Outcome;
use crate::time::Instant;

/// Limits and timings of one session's delivery. Defaults follow the reference where it has
/// one (window 200, 5 attempts) and our issues where it has none (per-delivery ack deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Most deliveries awaiting an ack at once.
    pub max_in_flight: usize,
    /// How long a delivery may wait for its ack before it is taken back and requeued.
    pub ack_timeout: Duration,
    /// Attempts before a message is dead-lettered.
    pub max_delivery_attempts: u32,
    /// Backoff before the second attempt after a retryable nack; doubles per attempt.
    pub retry_backoff_initial: Duration,
    /// Upper bound of the retry backoff.
    pub retry_backoff_max: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_in_flight: 200,
            ack_timeout: Duration::from_secs(30),
            max_delivery_attempts: 5,
            retry_backoff_initial: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(30),
        }
    }
}

/// Identifies a message's entry in the store's queue (a stream id in Redis, a sequence number
/// in memory). Opaque to the machine.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(pub Arc<str>);

impl EntryId {
    /// Wraps a store's entry id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        EntryId(id.into())
    }

    /// An entry id from a sequence number (the memory store's ids).
    pub fn from_seq(seq: u64) -> Self {
        EntryId::new(seq.to_string())
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message the store handed to this session for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    /// Where it sits in the store.
    pub entry: EntryId,
    /// The envelope JSON, delivered verbatim.
    pub envelope: Arc<str>,
    /// 1-based attempt number of the delivery about to be made.
    pub attempt: u32,
}

/// One delivery attempt to send to the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Fresh for this attempt; the agent acks or nacks with it.
    pub delivery_id: DeliveryId,
    /// The message's store entry.
    pub entry: EntryId,
    /// The envelope JSON.
    pub envelope: Arc<str>,
    /// 1-based attempt number.
    pub attempt: u32,
}

/// Why a message goes back to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueReason {
    /// The agent nacked it as retryable.
    RetryableNack,
    /// Its ack deadline passed.
    AckTimeout,
    /// The session ended with it in flight.
    Disconnected,
    /// A drain reached its deadline with it in flight.
    DrainDeadline,
    /// It arrived while the window was full or the session was draining; never delivered here.
    NotAccepted,
}

impl RequeueReason {
    /// The reason's name in metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            RequeueReason::RetryableNack => "retryable_nack",
            RequeueReason::AckTimeout => "ack_timeout",
            RequeueReason::Disconnected => "disconnected",
            RequeueReason::DrainDeadline => "drain_deadline",
            RequeueReason::NotAccepted => "not_accepted",
        }
    }

    /// Whether this requeue consumed a delivery attempt.
    pub fn counts_as_attempt(self) -> bool {
        matches!(self, RequeueReason::RetryableNack | RequeueReason::AckTimeout)
    }
}

/// A change the shell must apply to the store, fenced by this session's ownership.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEffect {
    /// The agent acknowledged: remove the entry.
    Ack {
        /// The entry.
        entry: EntryId,
    },
    /// Put the message back in its queue, not to be delivered before `not_before`.
    Requeue {
        /// The entry.
        entry: EntryId,
        /// The envelope JSON.
        envelope: Arc<str>,
        /// The attempt number its next delivery will carry.
        attempt: u32,
        /// Earliest time of the next delivery (backoff).
        not_before: Instant,
        /// Why.
        reason: RequeueReason,
    },
    /// Move the message to the dead-letter queue.
    DeadLetter {
        /// The entry.
        entry: EntryId,
        /// The envelope JSON.
        envelope: Arc<str>,
        /// Attempts made.
        attempts: u32,
        /// Why, e.g. `handler_error:Timeout; retry_limit_exceeded`.
        reason: String,
        /// The agent refused it (a NACK), as opposed to never answering.
        nacked: bool,
    },
}

impl StoreEffect {
    /// What this effect says about the health of the agent that consumed the message, for its
    /// circuit breaker. An ack is a success. A *message* counts as one failure when its first
    /// delivery attempt is NACKed: later attempts of the same message do not count again, so
    /// one poison message retried to its limit is one failure, not five. Ack timeouts and
    /// hand-backs are not failures (as in the reference): they say nothing about the handler.
    pub fn circuit_outcome(&self) -> Option<Outcome> {
        match self {
            StoreEffect::Ack { .. } => Some(Outcome::Success),
            StoreEffect::Requeue { reason: RequeueReason::RetryableNack, attempt: 2, .. }
            | StoreEffect::DeadLetter { nacked: true, attempts: 1, .. } => Some(Outcome::Failure),
            StoreEffect::Requeue { .. } | StoreEffect::DeadLetter { .. } => None,
        }
    }

    /// The entry this effect settles.
    pub fn entry(&self) -> &EntryId {
        match self {
            StoreEffect::Ack { entry } | StoreEffect::Requeue { entry, .. } | StoreEffect::DeadLetter { entry, .. } => {
                entry
            }
        }
    }
}

/// What the machine asks of its shell.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this delivery to the agent.
    Deliver(Delivery),
    /// Apply this effect to the store.
    Store(StoreEffect),
    /// The drain finished: nothing is in flight any more and the session may end.
    Drained,
}

/// Why [`SessionDelivery::poll_timeout`] wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// The earliest in-flight delivery's ack deadline.
    AckDeadline,
    /// The drain deadline.
    DrainDeadline,
}

/// Counters, for metrics and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Deliveries emitted.
    pub delivered: u64,
    /// Acks that settled a delivery.
    pub acked: u64,
    /// Nacks that settled a delivery.
    pub nacked: u64,
    /// Messages put back in their queue (any reason).
    pub requeued: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Deliveries whose ack deadline passed.
    pub ack_timeouts: u64,
    /// Acks naming no in-flight delivery (unknown, settled, or an earlier attempt's id).
    pub stale_acks: u64,
    /// Nacks naming no in-flight delivery.
    pub stale_nacks: u64,
}

/// Where the session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Taking new work.
    Open,
    /// Taking no new work; waiting for acks until the deadline.
    Draining {
        /// When the remaining deliveries are handed back.
        deadline: Instant,
    },
    /// Finished; every input is ignored.
    Closed,
}

#[cfg(test)]
mod tests;
