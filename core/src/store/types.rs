use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::delivery::EntryId;
use crate::ids::{AgentId, BrokerId, InstanceId};
use crate::policy::audit::AuditRecord;

/// Identifies who holds claimed entries: one per session, never reused, so a session that
/// lost ownership can never settle a successor's work (fencing). Also the lease's token.
///
/// A session's token is `{broker}~{incarnation}~{agent}~{instance}~{seq}` (see
/// [`OwnerToken::for_session`]): which broker opened it, in which of its process starts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerToken(pub Arc<str>);

/// Separates the parts of a session's owner token; never part of an id.
const TOKEN_SEPARATOR: char = '~';

impl OwnerToken {
    /// Wraps a token.
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        OwnerToken(token.into())
    }

    /// The token of a session opened by `broker` in its `incarnation` (drawn afresh at every
    /// process start), the `seq`-th session of that incarnation.
    pub fn for_session(broker: &BrokerId, incarnation: u64, agent: &AgentId, instance: &InstanceId, seq: u64) -> Self {
        OwnerToken::new(format!("{broker}~{incarnation:016x}~{agent}~{instance}~{seq}"))
    }

    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `({broker}~, {broker}~{incarnation}~)`: the prefixes [`OwnerToken::supersedes`] compares,
    /// for store scripts that apply the same rule atomically. `None` for a token not made by
    /// [`OwnerToken::for_session`].
    pub fn origin_prefixes(&self) -> Option<(&str, &str)> {
        let mut ends = self.0.match_indices(TOKEN_SEPARATOR).map(|(i, _)| i + 1);
        let broker_end = ends.next()?;
        let incarnation_end = ends.next()?;
        Some((&self.0[..broker_end], &self.0[..incarnation_end]))
    }

    /// Whether this session may take over a lease that `held` still holds: only if `held` was
    /// issued by an *earlier incarnation of the same broker*. Broker ids are unique among live
    /// brokers and an incarnation ends with its process, so that session is dead: its broker
    /// was killed and restarted. Without this, a restarted broker refuses the reconnecting
    /// instance (`instance_already_connected`) until the dead lease runs out.
    pub fn supersedes(&self, held: &OwnerToken) -> bool {
        match self.origin_prefixes() {
            Some((broker, incarnation)) => held.0.starts_with(broker) && !held.0.starts_with(incarnation),
            None => false,
        }
    }
}

impl fmt::Display for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A queue in the store: an agent's shared work queue, or one instance's reply queue.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QueueKey {
    /// Work for any instance of the agent (load sharing).
    Work(AgentId),
    /// Replies for one instance (the one that asked).
    Replies(AgentId, InstanceId),
}

impl QueueKey {
    /// The agent the queue belongs to.
    pub fn agent(&self) -> &AgentId {
        match self {
            QueueKey::Work(agent) | QueueKey::Replies(agent, _) => agent,
        }
    }
}

/// One connected session as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// The agent.
    pub agent: AgentId,
    /// The instance.
    pub instance: InstanceId,
    /// Its lease and claim token.
    pub owner: OwnerToken,
}

impl SessionRef {
    /// The queues this session consumes, replies first (a waiting requester is latency-bound).
    pub fn queues(&self) -> [QueueKey; 2] {
        [QueueKey::Replies(self.agent.clone(), self.instance.clone()), QueueKey::Work(self.agent.clone())]
    }
}

/// A message that could not be delivered, kept whole with the reason and attempts made.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its id in the agent's dead-letter queue (opaque; stable until it is redriven or purged).
    pub id: String,
    /// The agent whose queue it came from.
    pub agent: AgentId,
    /// The full envelope JSON.
    pub envelope: Arc<str>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// How long ago it was dead-lettered, by the store's clock when it was read.
    pub age: std::time::Duration,
}

/// Which dead letters of one agent an operator means: every condition given must hold, and a
/// selector with none selects nothing unless `all` is set, so a forgotten filter never
/// redrives or purges a whole queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterSelector {
    /// Only these ids (empty: any id).
    pub ids: Vec<String>,
    /// Only letters with exactly this reason.
    pub reason: Option<String>,
    /// Only letters at least this old.
    pub older_than: Option<std::time::Duration>,
    /// Select every letter when no condition is given.
    pub all: bool,
}

impl DeadLetterSelector {
    /// Whether the selector names any letter at all (a condition, or `all`).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.reason.is_none() && self.older_than.is_none() && !self.all
    }

    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        !self.is_empty()
            && (self.ids.is_empty() || self.ids.contains(&letter.id))
            && self.reason.as_ref().is_none_or(|reason| &letter.reason == reason)
            && self.older_than.is_none_or(|age| letter.age >= age)
    }
}

/// What redriving one dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// Back in the agent's work queue as a new entry with a fresh attempt count.
    Queued(crate::delivery::EntryId),
    /// No such letter (already redriven or purged, or never there): redriving is idempotent.
    NotFound,
    /// The work queue is full; the letter stays in the dead-letter queue.
    QueueFull,
}

/// How long after its deadline a request still answers `correlation_id_expired` rather than
/// `unknown_correlation_id`, so a late replier learns what happened.
pub const REQUEST_EXPIRED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// A request awaiting its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRequest {
    /// Who asked.
    pub requester: AgentId,
    /// Which instance asked; the reply goes to its reply queue.
    pub requester_instance: InstanceId,
    /// Who must answer; nobody else may.
    pub target: AgentId,
}

/// Proof that a reply was committed, so an identical retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyReceipt {
    /// The replier.
    pub sender: AgentId,
    /// Hash of (sender, message type, payload): "identical" means equal fingerprints.
    pub fingerprint: String,
    /// The reply's message id.
    pub message_id: String,
}

/// What a correlation id currently refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Correlation {
    /// A request still waiting.
    Pending(PendingRequest),
    /// Already answered.
    Answered(ReplyReceipt),
    /// Its deadline passed (the record is gone).
    Expired,
    /// Never existed, or expired long ago.
    Unknown,
}

/// Outcome of committing a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyCommit {
    /// Queued for the requester now.
    Queued {
        /// The reply's message id.
        message_id: String,
    },
    /// An identical reply was committed before; nothing queued again.
    AlreadyQueued {
        /// The original reply's message id.
        message_id: String,
    },
}

/// Why a reply could not be committed. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The request is unknown (or its record is gone).
    #[error("unknown_correlation_id")]
    Unknown,
    /// The request's deadline passed.
    #[error("correlation_id_expired")]
    Expired,
    /// A different reply won, or the request changed under us.
    #[error("unknown_or_completed_correlation_id")]
    Completed,
}

/// An agent's state and its revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateSnapshot {
    /// Field → JSON-encoded value.
    pub fields: BTreeMap<String, String>,
    /// Bumped by every non-empty update and every reset; 0 for a never-written state.
    pub revision: u64,
}

/// Why a state write was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// `expected_revision` is not the current revision.
    #[error("state_revision_conflict")]
    RevisionConflict {
        /// The revision actually stored.
        current: u64,
    },
    /// The state after the write would be larger than the agent's bound.
    #[error("state_too_large")]
    TooLarge {
        /// Bytes (field names plus values) the state would have held.
        bytes: usize,
    },
}

/// Why a lease could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Another owner (on any broker) holds the instance.
    #[error("instance_already_connected")]
    Held,
}

/// One admission decision to record, and for a routable one the message to queue, as one
/// store step ("append to the agent's audit chain and its queue, or neither").
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Whose chain records the decision: the agent that receives the message. A message to a
    /// target that is not an allowlisted agent is recorded in the sender's chain.
    pub chain: AgentId,
    /// The decision as the policy engines made it, not yet linked.
    pub record: AuditRecord,
    /// For a routable decision: the envelope for `chain`'s work queue. Queued only if
    /// `chain`'s circuit admits it and its queue has room; otherwise the decision recorded
    /// becomes `CIRCUIT_OPEN` or `QUEUE_FULL` and nothing is queued.
    pub envelope: Option<Arc<str>>,
}

/// What an admission step recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// The record as linked into its chain, with the final decision.
    pub record: AuditRecord,
    /// The queue entry, when the message was queued.
    pub entry: Option<EntryId>,
}

/// What the pipeline must know about a target before it decides: whether any instance holds a
/// live session, and whether its circuit would admit a message now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetGate {
    /// Some instance of the target holds a live lease.
    pub live: bool,
    /// The target's circuit would admit a message (closed, or half-open with a probe free).
    pub circuit_admits: bool,
}

/// What the store holds for one agent, read for gauges and operators (not atomic with the
/// message path; a snapshot of one moment per agent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueGauges {
    /// Entries in the agent's work queue: ready, delayed and in flight.
    pub depth: usize,
    /// The `timestamp` (seconds since the Unix epoch) of the envelope at the head of the work
    /// queue, if any: its admission time.
    pub oldest_timestamp: Option<f64>,
    /// The agent's circuit.
    pub circuit: crate::policy::circuit::CircuitPhase,
    /// Live records in the agent's audit chain.
    pub audit_len: usize,
    /// Dead letters kept for the agent.
    pub dead_letters: usize,
    /// Dead letters dropped at the bound, oldest first (in the embedded store, whose bound
    /// covers every agent together, the store-wide count).
    pub dead_letters_dropped: u64,
}

/// The admission time an envelope carries (its `timestamp`), if it can be read.
pub fn envelope_timestamp(envelope: &str) -> Option<f64> {
    #[derive(serde::Deserialize)]
    struct Stamped {
        timestamp: f64,
    }
    serde_json::from_str::<Stamped>(envelope).ok().map(|s| s.timestamp)
}

/// Why a store step was refused. Nothing changes when a step fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The queue is at its configured bound; the message was not accepted.
    #[error("queue_full")]
    QueueFull,
    /// The entry is not held by this owner (settled already, or reclaimed by another session).
    #[error("not_owner")]
    NotOwner,
    /// The audit chain that must record this decision is at its configured bound; nothing was
    /// recorded or queued. Operators must archive (or raise the bound) before it takes more.
    #[error("audit_capacity_exceeded")]
    AuditFull,
    /// The requester has its configured number of requests awaiting replies; nothing was
    /// recorded or queued.
    #[error("too_many_pending_requests")]
    TooManyPending,
    /// The backend could not be reached or failed; the step may or may not have happened.
    #[error("storage_unavailable: {0}")]
    Unavailable(String),
}
