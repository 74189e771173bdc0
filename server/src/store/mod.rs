//! The broker's store: the domain-level steps of `mas_core::store`, asynchronously, over the
//! embedded memory store or Redis.
//!
//! Both backends implement the same semantics; `tests/tests/store_contract.rs` runs the same
//! sequences against both and compares the results. Time-dependent steps use the store's own
//! clock, so every broker sharing a store agrees on lease and request deadlines.

pub mod faults;
mod memory;
#[cfg(not(madsim))]
pub mod redis;
mod wake;

pub use memory::MemoryBackend;
pub use wake::{ClaimCursor, Claimed};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mas_core::delivery::{EntryId, QueuedMessage, StoreEffect};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::policy::audit::{AuditRecord, ChainSnapshot, Checkpoint, SecurityEvent};
use mas_core::policy::circuit::CircuitConfig;
use mas_core::policy::ratelimit::{Grant, Limits};
use mas_core::store::{
    Admission, Admitted, Correlation, DeadLetter, PendingRequest, QueueGauges, QueueKey, Redrive, ReplyCommit,
    ReplyError, ReplyReceipt, SessionRef, StateError, StateSnapshot, StoreError, TargetGate,
};
use mas_core::time::Now;

use crate::metrics::StoreMetrics;

/// A store backend, chosen by configuration: the embedded memory store, or Redis.
#[derive(Clone)]
pub enum Backend {
    /// In-process; the default without a Redis URL, and the store under simulation.
    Memory(MemoryBackend),
    /// Redis (standalone or cluster-compatible key layout).
    #[cfg(not(madsim))]
    Redis(redis::RedisBackend),
}

/// The store of one or more brokers: a backend and the latency and error counts of its steps.
/// Clones share both.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.backend {
            Backend::Memory(_) => f.write_str("Store::Memory"),
            #[cfg(not(madsim))]
            Backend::Redis(_) => f.write_str("Store::Redis"),
        }
    }
}

impl From<MemoryBackend> for Store {
    fn from(backend: MemoryBackend) -> Self {
        Store { backend: Backend::Memory(backend), metrics: StoreMetrics::default() }
    }
}

#[cfg(not(madsim))]
impl From<redis::RedisBackend> for Store {
    fn from(backend: redis::RedisBackend) -> Self {
        Store { backend: Backend::Redis(backend), metrics: StoreMetrics::default() }
    }
}

macro_rules! dispatch {
    ($self:ident, $backend:ident => $call:expr) => {
        match &$self.backend {
            Backend::Memory($backend) => $call,
            #[cfg(not(madsim))]
            Backend::Redis($backend) => $call,
        }
    };
}

/// [`dispatch!`] for a store step named `$op`, timed and counted in the store's metrics. The
/// embedded store first asks its fault hook (if one is installed), so injected outages hit
/// every step the way a Redis outage would.
macro_rules! step {
    ($self:ident, $op:literal, $backend:ident => $call:expr) => {{
        $self
            .timed($op, async {
                match &$self.backend {
                    Backend::Memory($backend) => match $backend.fault($op).await? {
                        faults::Answer::Keep => $call,
                        faults::Answer::Lose => {
                            let _ = $call;
                            Err(faults::lost_answer($op))
                        }
                    },
                    #[cfg(not(madsim))]
                    Backend::Redis($backend) => $call,
                }
            })
            .await
    }};
}

impl Store {
    /// Runs the store step `op`, timed and counted in the store's metrics.
    async fn timed<T>(
        &self,
        op: &'static str,
        step: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let result = step.await;
        self.metrics.observe(op, started.elapsed(), result.is_err());
        result
    }

    /// The backend (tests reach into the embedded store through it).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Latency and error counts of this store's steps.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// Whether the store answers at all (Redis: `PING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        step!(self, "ping", b => b.ping().await)
    }

    /// Depth, head-of-queue admission time and circuit of `agent`'s work queue, and the length
    /// of its audit chain: one read-only step.
    pub async fn queue_gauges(&self, agent: &AgentId) -> Result<QueueGauges, StoreError> {
        step!(self, "queue_gauges", b => b.queue_gauges(agent).await)
    }

    /// Names this store's lifetime: fixed for a Redis database (kept in it), fresh for every
    /// embedded store. Archive segments live under it, so chains that begin anew never
    /// overwrite older segments.
    pub fn epoch(&self) -> &str {
        dispatch!(self, b => b.epoch())
    }

    /// Whether wake-ups reach waiting claims: always for the embedded store; for Redis, while
    /// its notification subscription is live (it is made again after it breaks, and claims
    /// poll in between).
    pub fn wakeups_live(&self) -> bool {
        match &self.backend {
            Backend::Memory(_) => true,
            #[cfg(not(madsim))]
            Backend::Redis(b) => b.wakeups_live(),
        }
    }

    /// Appends `envelope` to `queue` and wakes its consumers. Atomic. Unaudited: the message
    /// path uses [`Store::admit`]; this is for tests and tools that fill queues directly.
    pub async fn enqueue(&self, queue: &QueueKey, envelope: Arc<str>) -> Result<EntryId, StoreError> {
        step!(self, "enqueue", b => b.enqueue(queue, envelope).await)
    }

    /// Claims up to `max` ready messages for `session` (replies first), waiting up to
    /// `max_wait` for work. Work held by sessions whose lease expired is reclaimed first.
    /// Returns an empty batch on timeout. Cancel-safe.
    pub async fn claim(
        &self,
        session: &SessionRef,
        max: usize,
        max_wait: Duration,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        Ok(self.claim_next(session, max, max_wait, ClaimCursor::default()).await?.0)
    }

    /// [`Store::claim`] for a session that claims again and again: `cursor` is what its last
    /// claim returned. When that claim found the queues drained and no wake-up came since,
    /// this one waits for a wake-up before asking the store, instead of spending a round trip
    /// that finds nothing.
    pub async fn claim_next(
        &self,
        session: &SessionRef,
        max: usize,
        max_wait: Duration,
        cursor: ClaimCursor,
    ) -> Result<Claimed, StoreError> {
        step!(self, "claim", b => b.claim(session, max, max_wait, cursor).await)
    }

    /// What `session` holds claimed in the store (at most `max` entries): after a claim whose
    /// answer was lost, the session finds here what that claim gave it.
    pub async fn own_pending(&self, session: &SessionRef, max: usize) -> Result<Vec<QueuedMessage>, StoreError> {
        step!(self, "own_pending", b => b.own_pending(session, max).await)
    }

    /// Applies delivery effects, each fenced by `session` still holding the entry, and feeds
    /// the outcomes of the applied ones to the session agent's circuit (when `circuit` is set;
    /// see `StoreEffect::circuit_outcome`). A requeue's `not_before` is on the broker's clock
    /// (`now` is that clock's reading); it is turned into a delay here. Returns one result per
    /// effect, in order.
    pub async fn apply(
        &self,
        session: &SessionRef,
        effects: Vec<StoreEffect>,
        now: Now,
        circuit: Option<&CircuitConfig>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        step!(self, "apply", b => b.apply(session, effects, now, circuit).await)
    }

    /// Makes everything `session` still holds ready again (attempt unchanged).
    pub async fn release(&self, session: &SessionRef) -> Result<usize, StoreError> {
        step!(self, "release", b => b.release(session).await)
    }

    /// Takes the (agent, instance) lease for `session`; false if another owner holds it.
    pub async fn acquire_lease(&self, session: &SessionRef, ttl: Duration) -> Result<bool, StoreError> {
        step!(self, "acquire_lease", b => b.acquire_lease(session, ttl).await)
    }

    /// Extends the lease; false if `session` no longer holds it.
    pub async fn renew_lease(&self, session: &SessionRef, ttl: Duration) -> Result<bool, StoreError> {
        step!(self, "renew_lease", b => b.renew_lease(session, ttl).await)
    }

    /// Drops the lease if `session` still holds it.
    pub async fn release_lease(&self, session: &SessionRef) -> Result<(), StoreError> {
        step!(self, "release_lease", b => b.release_lease(session).await)
    }

    /// Whether (agent, instance) holds a live lease on any broker.
    pub async fn instance_live(
        &self,
        agent: &AgentId,
        instance: &mas_core::ids::InstanceId,
    ) -> Result<bool, StoreError> {
        step!(self, "instance_live", b => b.instance_live(agent, instance).await)
    }

    /// Which of `agents` hold a live lease on any broker.
    pub async fn live_agents(&self, agents: &[AgentId]) -> Result<Vec<bool>, StoreError> {
        step!(self, "live_agents", b => b.live_agents(agents).await)
    }

    /// Whether `target` has a live instance, and whether its circuit would admit a message
    /// now (no probe taken). One step on the target's keys.
    pub async fn gate(&self, target: &AgentId, circuit: Option<&CircuitConfig>) -> Result<TargetGate, StoreError> {
        step!(self, "gate", b => b.gate(target, circuit).await)
    }

    /// Records an admission decision in the chain of `admission.chain` and, for a routable
    /// one, queues the envelope to that agent's work queue: one atomic step, so nothing is
    /// delivered unaudited and nothing audited as allowed is lost. The circuit and the queue
    /// bound are checked in the same step; a refusal is recorded as `CIRCUIT_OPEN` or
    /// `QUEUE_FULL`. A full chain refuses the step (`StoreError::AuditFull`).
    pub async fn admit(&self, admission: Admission, circuit: Option<&CircuitConfig>) -> Result<Admitted, StoreError> {
        step!(self, "admit", b => b.admit(admission, circuit).await)
    }

    /// The first half of opening a request, made while its policies run: on Redis the pending
    /// record lives in the requester's slot, apart from the target's queue, so it is written
    /// here (a round trip shared with the sender's rate-limit step); the embedded store records
    /// it atomically with the admission instead and does nothing here. A request whose
    /// policies refuse it hands the answer to [`Store::abandon_request`]; one they pass hands
    /// it to [`Store::open_request`].
    #[cfg_attr(madsim, allow(unused_variables))]
    pub async fn begin_request(
        &self,
        correlation_id: &str,
        pending: &PendingRequest,
        ttl: Duration,
    ) -> Result<PendingAhead, StoreError> {
        match &self.backend {
            Backend::Memory(_) => Ok(PendingAhead::Deferred),
            #[cfg(not(madsim))]
            Backend::Redis(b) => self.timed("begin_request", b.begin_request(correlation_id, pending, ttl)).await,
        }
    }

    /// Forgets what [`Store::begin_request`] wrote for a request that was refused before its
    /// admission. Best effort: the record expires with the request's deadline anyway.
    #[cfg_attr(madsim, allow(unused_variables))]
    pub async fn abandon_request(&self, requester: &AgentId, correlation_id: &str, ahead: PendingAhead) {
        match &self.backend {
            Backend::Memory(_) => {}
            #[cfg(not(madsim))]
            Backend::Redis(b) => {
                if matches!(ahead, PendingAhead::Written { .. }) {
                    b.abandon_request(requester, correlation_id).await;
                }
            }
        }
    }

    /// Admits a request as [`Store::admit`] does and records it as pending exactly when it
    /// was queued (memory: one step; Redis: the pending record, written ahead by
    /// [`Store::begin_request`] or first thing here, is removed again if the request was
    /// refused where it is queued).
    pub async fn open_request(
        &self,
        correlation_id: &str,
        pending: PendingRequest,
        ttl: Duration,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
        ahead: PendingAhead,
    ) -> Result<Admitted, StoreError> {
        step!(self, "open_request", b => b.open_request(correlation_id, pending, ttl, admission, circuit, ahead).await)
    }

    /// What a correlation id refers to (`requester` is encoded in the correlation id).
    pub async fn correlation(&self, requester: &AgentId, correlation_id: &str) -> Result<Correlation, StoreError> {
        step!(self, "correlation", b => b.correlation(requester, correlation_id).await)
    }

    /// Commits a reply and its audit record (in the requester's chain) atomically; see
    /// [`mas_core::store::MemoryStore::commit_reply`]. Returns the linked record when the
    /// reply was queued now.
    pub async fn commit_reply(
        &self,
        correlation_id: &str,
        expected: &PendingRequest,
        receipt: ReplyReceipt,
        envelope: Arc<str>,
        record: AuditRecord,
    ) -> Result<Result<(ReplyCommit, Option<AuditRecord>), ReplyError>, StoreError> {
        step!(self, "commit_reply", b => b.commit_reply(correlation_id, expected, receipt, envelope, record).await)
    }

    /// Appends a security event to the security chain.
    pub async fn append_security(&self, event: SecurityEvent) -> Result<SecurityEvent, StoreError> {
        step!(self, "append_security", b => b.append_security(event).await)
    }

    /// The live records of `chain` (oldest first), its head and its checkpoint, as of one
    /// moment. For verification and queries.
    pub async fn audit_chain(&self, chain: &AgentId) -> Result<ChainSnapshot<AuditRecord>, StoreError> {
        step!(self, "audit_chain", b => b.audit_chain(chain).await)
    }

    /// The security chain (oldest first), its head and its checkpoint.
    pub async fn security_chain(&self) -> Result<ChainSnapshot<SecurityEvent>, StoreError> {
        step!(self, "security_chain", b => b.security_chain().await)
    }

    /// Live records in `chain`.
    pub async fn audit_len(&self, chain: &AgentId) -> Result<usize, StoreError> {
        step!(self, "audit_len", b => b.audit_len(chain).await)
    }

    /// The oldest `limit` live records of `chain` with its head and checkpoint: what an
    /// archiver moves out of the store next.
    pub async fn audit_oldest(&self, chain: &AgentId, limit: usize) -> Result<ChainSnapshot<AuditRecord>, StoreError> {
        step!(self, "audit_oldest", b => b.audit_oldest(chain, limit).await)
    }

    /// Removes the oldest `count` records of `chain` (archived by the caller) if the last of
    /// them is still `last`, and moves the checkpoint past them; `None` (nothing removed) if
    /// the chain changed or another archiver trimmed first. Atomic.
    pub async fn trim_audit(
        &self,
        chain: &AgentId,
        count: usize,
        last: &AuditRecord,
    ) -> Result<Option<Checkpoint>, StoreError> {
        step!(self, "trim_audit", b => b.trim_audit(chain, count, last).await)
    }

    /// Admits up to `count` messages of `sender` arriving together under `limits` (GCRA over
    /// the store's clock, one step): the first `admitted` of them pass, exactly as `count`
    /// single admissions at that instant would decide. A refusal consumes nothing.
    pub async fn admit_rate(&self, sender: &AgentId, limits: Limits, count: usize) -> Result<Grant, StoreError> {
        step!(self, "admit_rate", b => b.admit_rate(sender, limits, count).await)
    }

    /// The agent's state and revision, read atomically.
    pub async fn get_state(&self, agent: &AgentId) -> Result<StateSnapshot, StoreError> {
        step!(self, "get_state", b => b.get_state(agent).await)
    }

    /// Compare-and-set (or unconditional) state write; returns the new revision. Refused,
    /// changing nothing, if the merged state would exceed `max_bytes` (names plus values).
    pub async fn update_state(
        &self,
        agent: &AgentId,
        updates: BTreeMap<String, String>,
        expected_revision: Option<u64>,
        max_bytes: usize,
    ) -> Result<Result<u64, StateError>, StoreError> {
        step!(self, "update_state", b => b.update_state(agent, updates, expected_revision, max_bytes).await)
    }

    /// Clears the state and bumps the revision.
    pub async fn reset_state(
        &self,
        agent: &AgentId,
        expected_revision: Option<u64>,
    ) -> Result<Result<u64, StateError>, StoreError> {
        step!(self, "reset_state", b => b.reset_state(agent, expected_revision).await)
    }

    /// Entries in `queue` (ready, delayed and claimed). For tests and operators.
    pub async fn queue_len(&self, queue: &QueueKey) -> Result<usize, StoreError> {
        step!(self, "queue_len", b => b.queue_len(queue).await)
    }

    /// Dead letters of `agent`, oldest first (at most `limit`). For tests and operators.
    pub async fn dead_letters(&self, agent: &AgentId, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        step!(self, "dead_letters", b => b.dead_letters(agent, limit).await)
    }

    /// Puts `agent`'s dead letters `ids` back in its work queue (fresh attempt count), in
    /// order; one outcome per id. Idempotent: a letter already moved is `NotFound`.
    pub async fn redrive_dead_letters(&self, agent: &AgentId, ids: &[String]) -> Result<Vec<Redrive>, StoreError> {
        step!(self, "redrive_dead_letters", b => b.redrive_dead_letters(agent, ids).await)
    }

    /// Closes `agent`'s circuit and forgets its failures; returns whether it had any state.
    pub async fn reset_circuit(&self, agent: &AgentId) -> Result<bool, StoreError> {
        step!(self, "reset_circuit", b => b.reset_circuit(agent).await)
    }

    /// Forgets `sender`'s rate-limit state; returns whether it had any.
    pub async fn reset_rate(&self, sender: &AgentId) -> Result<bool, StoreError> {
        step!(self, "reset_rate", b => b.reset_rate(sender).await)
    }

    /// How much of each rate-limit window `sender` has used, by the store's clock.
    pub async fn rate_backlog(&self, sender: &AgentId) -> Result<mas_core::policy::ratelimit::Backlog, StoreError> {
        step!(self, "rate_backlog", b => b.rate_backlog(sender).await)
    }

    /// Ends (agent, instance)'s lease whoever holds it; its session ends at its next renewal.
    pub async fn revoke_lease(&self, agent: &AgentId, instance: &InstanceId) -> Result<bool, StoreError> {
        step!(self, "revoke_lease", b => b.revoke_lease(agent, instance).await)
    }

    /// The operators' authorization overlay (JSON) and its revision, unless the revision is
    /// still `known` (one cheap read when nothing changed, as every broker polls it).
    pub async fn authz_overlay(&self, known: u64) -> Result<Option<(u64, Arc<str>)>, StoreError> {
        step!(self, "authz_overlay", b => b.authz_overlay(known).await)
    }

    /// Replaces the overlay if its revision is still `expected`: `Ok(new revision)`, or
    /// `Err(current revision)` when another change came first.
    pub async fn put_authz_overlay(&self, expected: u64, doc: Arc<str>) -> Result<Result<u64, u64>, StoreError> {
        step!(self, "put_authz_overlay", b => b.put_authz_overlay(expected, doc).await)
    }

    /// Deletes `agent`'s dead letters `ids`; returns how many existed.
    pub async fn purge_dead_letters(&self, agent: &AgentId, ids: &[String]) -> Result<usize, StoreError> {
        step!(self, "purge_dead_letters", b => b.purge_dead_letters(agent, ids).await)
    }
}

/// What [`Store::begin_request`] did with a request's pending record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingAhead {
    /// Written: the record exists while the request's policies run. `at` was taken before it
    /// was written, so the request's deadline is no earlier than `at` + its timeout.
    Written {
        /// When the write was sent.
        at: tokio::time::Instant,
    },
    /// Left for [`Store::open_request`] to record with the admission.
    Deferred,
}

/// A new store epoch: the wall-clock time and process id as hex, and a per-process counter,
/// so two stores never share one, also across restarts.
pub(crate) fn fresh_epoch() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos:x}-{:x}-{seq}", std::process::id())
}

/// The delay a requeue asks for, measured on the broker's clock.
pub(crate) fn requeue_delay(effect: &StoreEffect, now: Now) -> Duration {
    match effect {
        StoreEffect::Requeue { not_before, .. } => not_before.saturating_duration_since(now.mono),
        StoreEffect::Ack { .. } | StoreEffect::DeadLetter { .. } => Duration::ZERO,
    }
}
