use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::{
    Admission, Admitted, Correlation, DeadLetter, LeaseError, OwnerToken, PendingRequest, QueueGauges, QueueKey,
    REQUEST_EXPIRED_GRACE, Redrive, ReplyCommit, ReplyError, ReplyReceipt, SessionRef, StateError, StateSnapshot,
    StoreError, envelope_timestamp,
};
use crate::delivery::{EntryId, QueuedMessage, StoreEffect};
use crate::ids::{AgentId, InstanceId};
use crate::policy::audit::{AuditRecord, SecurityEvent};
use crate::policy::circuit::{Circuit, CircuitConfig};
use crate::policy::ratelimit::{self, Grant, Limits, RateState};
use crate::time::Instant;

/// Bounds of the in-memory store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStoreConfig {
    /// Most entries (ready, delayed or claimed) one queue may hold.
    pub max_queue_len: usize,
    /// Most dead letters kept; the oldest are dropped past it (and counted).
    pub max_dead_letters: usize,
    /// Most records one audit chain holds; beyond it admissions recorded in that chain are
    /// refused ([`StoreError::AuditFull`]) rather than silently unaudited.
    pub max_audit_records: usize,
    /// Most requests of one requester awaiting replies (each counts until it is answered or
    /// forgotten after its deadline); beyond it requests are refused
    /// ([`StoreError::TooManyPending`]).
    pub max_pending_requests: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        MemoryStoreConfig {
            max_queue_len: 100_000,
            max_dead_letters: 10_000,
            max_audit_records: 100_000,
            max_pending_requests: 10_000,
        }
    }
}

#[derive(Debug)]
struct Entry {
    queue: QueueKey,
    envelope: Arc<str>,
    attempt: u32,
    not_before: Instant,
    claimed_by: Option<OwnerToken>,
}

/// Per-queue indexes into the entry table.
#[derive(Debug, Default)]
struct Queue {
    len: usize,
    /// Unclaimed entries by (earliest delivery, sequence): FIFO among the ready ones.
    ready: BTreeSet<(Instant, u64)>,
    /// Claimed entries and their holders, scanned to reclaim work of dead sessions.
    claimed: BTreeMap<u64, OwnerToken>,
}

#[derive(Debug)]
struct Lease {
    owner: OwnerToken,
    expires_at: Instant,
}

#[derive(Debug)]
struct Expiring<T> {
    value: T,
    expires_at: Instant,
}

/// The reference store: deterministic, in-process, every step atomic because it is one method
/// call on `&mut self`. The embedded default store and the store under simulation.
///
/// Time: every method that depends on time takes `now` from the store owner's single clock.
#[derive(Debug, Default)]
pub struct MemoryStore {
    config: MemoryStoreConfig,
    entries: BTreeMap<u64, Entry>,
    queues: BTreeMap<QueueKey, Queue>,
    next_seq: u64,
    leases: BTreeMap<(AgentId, InstanceId), Lease>,
    /// Live lease owners and their expiry, for fencing and reclaiming.
    owners: BTreeMap<OwnerToken, Instant>,
    pending: BTreeMap<String, Expiring<PendingRequest>>,
    /// Entries of `pending` per requester, for the bound.
    pending_per_requester: BTreeMap<AgentId, usize>,
    receipts: BTreeMap<String, Expiring<ReplyReceipt>>,
    states: BTreeMap<AgentId, StateSnapshot>,
    rates: BTreeMap<AgentId, RateState>,
    circuits: BTreeMap<AgentId, Circuit>,
    /// One audit chain per agent that receives messages.
    audit: BTreeMap<AgentId, governance::AuditLog<AuditRecord>>,
    security: governance::AuditLog<SecurityEvent>,
    /// Oldest first, each with the instant it died (its age is read against `now`).
    dead_letters: VecDeque<(Instant, DeadLetter)>,
    dead_letters_dropped: u64,
    next_dead_letter: u64,
    /// The operators' authorization overlay (JSON) and its revision (0: never written).
    authz_overlay: (u64, Arc<str>),
    /// Correlation ids by the instant their pending request or receipt may be forgotten,
    /// soonest first, so pruning touches only what is due: a full sweep on every lookup made
    /// each reply cost O(requests of the last timeout) under the store lock (55 µs at 600
    /// req/s, growing with load). An entry may be stale (the id moved on or is gone); stale
    /// entries are dropped when they come due.
    forget_at: BTreeSet<(Instant, String)>,
}

mod governance;

impl MemoryStore {
    /// An empty store.
    pub fn new(config: MemoryStoreConfig) -> Self {
        MemoryStore { config, ..MemoryStore::default() }
    }

    // ---- queues ---------------------------------------------------------------------------

    /// Appends `envelope` to `queue`, ready at once. Atomic: the entry exists, or nothing
    /// changed and the error says why.
    pub fn enqueue(&mut self, queue: &QueueKey, envelope: Arc<str>) -> Result<EntryId, StoreError> {
        self.insert(queue, envelope, 1, Instant::ZERO)
    }

    fn insert(
        &mut self,
        queue: &QueueKey,
        envelope: Arc<str>,
        attempt: u32,
        at: Instant,
    ) -> Result<EntryId, StoreError> {
        let q = self.queues.entry(queue.clone()).or_default();
        if q.len >= self.config.max_queue_len {
            return Err(StoreError::QueueFull);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        q.len += 1;
        q.ready.insert((at, seq));
        self.entries.insert(seq, Entry { queue: queue.clone(), envelope, attempt, not_before: at, claimed_by: None });
        Ok(EntryId::from_seq(seq))
    }

    /// Claims up to `max` ready messages for `session`, replies first, oldest first. Entries
    /// held by sessions whose lease has expired become ready again first, so a dead session's
    /// work moves on as soon as its lease runs out.
    pub fn claim(&mut self, session: &SessionRef, max: usize, now: Instant) -> Vec<QueuedMessage> {
        let mut claimed = Vec::new();
        for key in session.queues() {
            self.reclaim_dead(&key, &session.owner, now);
            let Some(queue) = self.queues.get_mut(&key) else { continue };
            while claimed.len() < max {
                let Some(&(not_before, seq)) = queue.ready.first() else { break };
                if not_before > now {
                    break;
                }
                queue.ready.pop_first();
                let Some(entry) = self.entries.get_mut(&seq) else { continue };
                entry.claimed_by = Some(session.owner.clone());
                queue.claimed.insert(seq, session.owner.clone());
                claimed.push(QueuedMessage {
                    entry: EntryId::from_seq(seq),
                    envelope: entry.envelope.clone(),
                    attempt: entry.attempt,
                });
            }
        }
        claimed
    }

    /// Entries of `session`'s queues claimed by `session` (at most `max`): what it holds in
    /// flight, plus whatever a claim whose answer it never read gave it.
    pub fn own_pending(&self, session: &SessionRef, max: usize) -> Vec<QueuedMessage> {
        let mut held = Vec::new();
        for key in session.queues() {
            let Some(queue) = self.queues.get(&key) else { continue };
            for (seq, owner) in &queue.claimed {
                if held.len() >= max {
                    return held;
                }
                if *owner == session.owner
                    && let Some(entry) = self.entries.get(seq)
                {
                    let (envelope, attempt) = (entry.envelope.clone(), entry.attempt);
                    held.push(QueuedMessage { entry: EntryId::from_seq(*seq), envelope, attempt });
                }
            }
        }
        held
    }

    fn owner_is_live(&self, owner: &OwnerToken, now: Instant) -> bool {
        self.owners.get(owner).is_some_and(|expires| *expires > now)
    }

    fn reclaim_dead(&mut self, key: &QueueKey, claimer: &OwnerToken, now: Instant) {
        let Some(queue) = self.queues.get(key) else { return };
        // Never the claimer's own entries: they are in flight in its session, and handing them
        // to it a second time would deliver them twice at once. Redis's claim skips them alike.
        let dead: Vec<u64> = queue
            .claimed
            .iter()
            .filter(|(_, owner)| *owner != claimer && !self.owner_is_live(owner, now))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in dead {
            self.make_ready(seq, now);
        }
    }

    fn make_ready(&mut self, seq: u64, at: Instant) {
        let Some(entry) = self.entries.get_mut(&seq) else { return };
        entry.claimed_by = None;
        entry.not_before = at;
        if let Some(queue) = self.queues.get_mut(&entry.queue) {
            queue.claimed.remove(&seq);
            queue.ready.insert((at, seq));
        }
    }

    /// The earliest time a delayed entry in `session`'s queues becomes ready, if any.
    pub fn next_ready_at(&self, session: &SessionRef) -> Option<Instant> {
        session.queues().iter().filter_map(|k| self.queues.get(k)?.ready.first().map(|(at, _)| *at)).min()
    }

    /// Applies a delivery machine's effect, fenced: only if `session` still holds the entry.
    /// A requeue's `not_before` is in this store's clock, as is `now` (when a dead letter
    /// died). Atomic: on error nothing changed.
    pub fn apply(&mut self, session: &SessionRef, effect: StoreEffect, now: Instant) -> Result<(), StoreError> {
        let seq = effect.entry().0.parse::<u64>().map_err(|_| StoreError::NotOwner)?;
        let held = self.entries.get(&seq).is_some_and(|e| e.claimed_by.as_ref() == Some(&session.owner));
        if !held {
            return Err(StoreError::NotOwner);
        }
        match effect {
            StoreEffect::Ack { .. } => {
                self.remove(seq);
            }
            StoreEffect::Requeue { attempt, not_before, .. } => {
                if let Some(entry) = self.entries.get_mut(&seq) {
                    entry.attempt = attempt;
                }
                self.make_ready(seq, not_before);
            }
            StoreEffect::DeadLetter { envelope, attempts, reason, .. } => {
                if let Some(entry) = self.remove(seq) {
                    let agent = entry.queue.agent().clone();
                    self.push_dead_letter(agent, envelope, reason, attempts, now);
                }
            }
        }
        Ok(())
    }

    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        if let Some(queue) = self.queues.get_mut(&entry.queue) {
            queue.len -= 1;
            queue.claimed.remove(&seq);
            queue.ready.remove(&(entry.not_before, seq));
        }
        Some(entry)
    }

    /// Makes every entry `session` still holds ready again with its attempt unchanged: for a
    /// session that ended without settling its work. Returns how many.
    pub fn release(&mut self, session: &SessionRef, now: Instant) -> usize {
        let mut held = Vec::new();
        for key in session.queues() {
            if let Some(queue) = self.queues.get(&key) {
                held.extend(queue.claimed.iter().filter(|(_, o)| **o == session.owner).map(|(s, _)| *s));
            }
        }
        for &seq in &held {
            self.make_ready(seq, now);
        }
        held.len()
    }

    /// Entries in `queue`: ready, delayed and claimed.
    pub fn queue_len(&self, queue: &QueueKey) -> usize {
        self.queues.get(queue).map_or(0, |q| q.len)
    }

    /// Depth, head-of-queue age and circuit of `agent`'s work queue.
    pub fn queue_gauges(&self, agent: &AgentId, now: Instant) -> QueueGauges {
        let queue = QueueKey::Work(agent.clone());
        let head = self.queues.get(&queue).and_then(|q| {
            let ready = q.ready.iter().map(|&(_, seq)| seq).min();
            let claimed = q.claimed.keys().next().copied();
            ready.into_iter().chain(claimed).min()
        });
        QueueGauges {
            depth: self.queue_len(&queue),
            oldest_timestamp: head.and_then(|seq| self.entries.get(&seq)).and_then(|e| envelope_timestamp(&e.envelope)),
            circuit: self.circuit(agent).phase(now),
            audit_len: self.audit_len(agent),
            dead_letters: self.dead_letters.iter().filter(|(_, letter)| &letter.agent == agent).count(),
            dead_letters_dropped: self.dead_letters_dropped,
        }
    }

    /// The dead letters kept, oldest first, with their ages at `now`.
    pub fn dead_letters(&self, now: Instant) -> impl Iterator<Item = DeadLetter> + '_ {
        self.dead_letters
            .iter()
            .map(move |(died, letter)| DeadLetter { age: now.saturating_duration_since(*died), ..letter.clone() })
    }

    /// Dead letters dropped because the bound was reached.
    pub fn dead_letters_dropped(&self) -> u64 {
        self.dead_letters_dropped
    }

    fn push_dead_letter(&mut self, agent: AgentId, envelope: Arc<str>, reason: String, attempts: u32, now: Instant) {
        if self.dead_letters.len() >= self.config.max_dead_letters {
            self.dead_letters.pop_front();
            self.dead_letters_dropped += 1;
        }
        let id = self.next_dead_letter.to_string();
        self.next_dead_letter += 1;
        let letter = DeadLetter { id, agent, envelope, reason, attempts, age: Duration::ZERO };
        self.dead_letters.push_back((now, letter));
    }

    /// Puts each of `agent`'s dead letters named in `ids` back in its work queue, ready at
    /// once with a fresh attempt count, in the order given. Atomic per letter: one that does
    /// not fit stays a dead letter.
    pub fn redrive_dead_letters(&mut self, agent: &AgentId, ids: &[String]) -> Vec<Redrive> {
        ids.iter()
            .map(|id| {
                let Some(at) = self.dead_letter_position(agent, id) else { return Redrive::NotFound };
                let envelope = self.dead_letters[at].1.envelope.clone();
                match self.enqueue(&QueueKey::Work(agent.clone()), envelope) {
                    Ok(entry) => {
                        self.dead_letters.remove(at);
                        Redrive::Queued(entry)
                    }
                    Err(_) => Redrive::QueueFull,
                }
            })
            .collect()
    }

    /// Deletes each of `agent`'s dead letters named in `ids`; returns how many were there.
    pub fn purge_dead_letters(&mut self, agent: &AgentId, ids: &[String]) -> usize {
        ids.iter()
            .filter(|id| match self.dead_letter_position(agent, id) {
                Some(at) => self.dead_letters.remove(at).is_some(),
                None => false,
            })
            .count()
    }

    // ---- operators' authorization overlay --------------------------------------------------

    /// The overlay document and its revision, unless its revision is still `known`.
    pub fn authz_overlay(&self, known: u64) -> Option<(u64, Arc<str>)> {
        let (revision, doc) = &self.authz_overlay;
        (*revision != known).then(|| (*revision, doc.clone()))
    }

    /// Replaces the overlay if its revision is still `expected`: the new revision, or the
    /// current one on a conflict.
    pub fn put_authz_overlay(&mut self, expected: u64, doc: Arc<str>) -> Result<u64, u64> {
        let current = self.authz_overlay.0;
        if current != expected {
            return Err(current);
        }
        self.authz_overlay = (current + 1, doc);
        Ok(current + 1)
    }

    fn dead_letter_position(&self, agent: &AgentId, id: &str) -> Option<usize> {
        self.dead_letters.iter().position(|(_, letter)| &letter.agent == agent && letter.id == id)
    }

    // ---- leases ---------------------------------------------------------------------------

    /// Takes the lease of (agent, instance) for `owner` unless someone else holds a live one.
    pub fn acquire_lease(&mut self, session: &SessionRef, ttl: Duration, now: Instant) -> Result<(), LeaseError> {
        let key = (session.agent.clone(), session.instance.clone());
        if let Some(lease) = self.leases.get(&key)
            && lease.expires_at > now
            && lease.owner != session.owner
            && !session.owner.supersedes(&lease.owner)
        {
            return Err(LeaseError::Held);
        }
        if let Some(old) = self.leases.insert(key, Lease { owner: session.owner.clone(), expires_at: now + ttl }) {
            self.owners.remove(&old.owner);
        }
        self.owners.insert(session.owner.clone(), now + ttl);
        Ok(())
    }

    /// Extends the lease if `owner` still holds it and it has not expired; false otherwise
    /// (the session must end: its work may already be someone else's).
    pub fn renew_lease(&mut self, session: &SessionRef, ttl: Duration, now: Instant) -> bool {
        let key = (session.agent.clone(), session.instance.clone());
        match self.leases.get_mut(&key) {
            Some(lease) if lease.owner == session.owner && lease.expires_at > now => {
                lease.expires_at = now + ttl;
                self.owners.insert(session.owner.clone(), now + ttl);
                true
            }
            _ => false,
        }
    }

    /// Drops the lease if `owner` still holds it; a stale owner can never drop a successor's.
    /// The session's replies queue goes with it when it is empty: instance ids are rarely used
    /// again, and an emptied queue would otherwise stay for the life of the store.
    pub fn release_lease(&mut self, session: &SessionRef) {
        let key = (session.agent.clone(), session.instance.clone());
        if self.leases.get(&key).is_some_and(|l| l.owner == session.owner) {
            self.leases.remove(&key);
            let replies = QueueKey::Replies(session.agent.clone(), session.instance.clone());
            if self.queues.get(&replies).is_some_and(|queue| queue.len == 0) {
                self.queues.remove(&replies);
            }
        }
        self.owners.remove(&session.owner);
    }

    /// Ends (agent, instance)'s lease whoever holds it (an operator's kick): the holder's next
    /// renewal fails, so its session ends, and what it had claimed is reclaimable at once.
    /// Returns whether there was a lease.
    pub fn revoke_lease(&mut self, agent: &AgentId, instance: &InstanceId) -> bool {
        match self.leases.remove(&(agent.clone(), instance.clone())) {
            Some(lease) => {
                self.owners.remove(&lease.owner);
                true
            }
            None => false,
        }
    }

    /// Whether (agent, instance) holds a live lease.
    pub fn instance_is_live(&self, agent: &AgentId, instance: &InstanceId, now: Instant) -> bool {
        self.leases.get(&(agent.clone(), instance.clone())).is_some_and(|l| l.expires_at > now)
    }

    /// Whether any instance of `agent` holds a live lease.
    pub fn agent_is_live(&self, agent: &AgentId, now: Instant) -> bool {
        let from = (agent.clone(), smallest_instance());
        self.leases.range(from..).take_while(|((a, _), _)| a == agent).any(|(_, l)| l.expires_at > now)
    }

    // ---- request / reply ------------------------------------------------------------------

    /// Admits a request (see [`MemoryStore::admit`]) and, if its envelope was queued, records
    /// the pending request (deadline `now + ttl`) in the same step: a request is pending
    /// exactly when it was queued.
    pub fn open_request(
        &mut self,
        correlation_id: &str,
        pending: PendingRequest,
        ttl: Duration,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
        now: Instant,
    ) -> Result<Admitted, StoreError> {
        self.forget_expired_correlations(now);
        let held = self.pending_per_requester.get(&pending.requester).copied().unwrap_or(0);
        if held >= self.config.max_pending_requests {
            return Err(StoreError::TooManyPending);
        }
        let admitted = self.admit(admission, circuit, now)?;
        if admitted.entry.is_some() {
            let expires_at = now + ttl;
            self.forget_at.insert((expires_at + REQUEST_EXPIRED_GRACE, correlation_id.to_string()));
            *self.pending_per_requester.entry(pending.requester.clone()).or_default() += 1;
            let replaced = self.pending.insert(correlation_id.to_string(), Expiring { value: pending, expires_at });
            if let Some(old) = replaced {
                self.uncount_pending(&old.value.requester);
            }
        }
        Ok(admitted)
    }

    /// Removes a pending request, keeping the per-requester count.
    fn remove_pending(&mut self, correlation_id: &str) -> Option<Expiring<PendingRequest>> {
        let removed = self.pending.remove(correlation_id)?;
        self.uncount_pending(&removed.value.requester);
        Some(removed)
    }

    fn uncount_pending(&mut self, requester: &AgentId) {
        if let Some(n) = self.pending_per_requester.get_mut(requester) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_per_requester.remove(requester);
            }
        }
    }

    /// What `correlation_id` refers to now. A request past its deadline reads as
    /// [`Correlation::Expired`] for [`REQUEST_EXPIRED_GRACE`] afterwards, then as unknown.
    pub fn correlation(&mut self, correlation_id: &str, now: Instant) -> Correlation {
        self.forget_expired_correlations(now);
        if let Some(receipt) = self.receipts.get(correlation_id) {
            return Correlation::Answered(receipt.value.clone());
        }
        match self.pending.get(correlation_id) {
            Some(p) if p.expires_at > now => Correlation::Pending(p.value.clone()),
            Some(_) => Correlation::Expired,
            None => Correlation::Unknown,
        }
    }

    /// Drops receipts past their request's deadline and requests past their grace period, so
    /// unanswered requests cannot accumulate.
    fn forget_expired_correlations(&mut self, now: Instant) {
        while let Some(entry) = self.forget_at.first()
            && entry.0 <= now
        {
            let Some((_, id)) = self.forget_at.pop_first() else { break };
            if self.receipts.get(&id).is_some_and(|r| r.expires_at <= now) {
                self.receipts.remove(&id);
            }
            if self.pending.get(&id).is_some_and(|p| p.expires_at + REQUEST_EXPIRED_GRACE <= now) {
                self.remove_pending(&id);
            }
        }
    }

    /// Commits a reply as one step: if an identical reply was committed, returns its id and
    /// queues nothing; else, if the request is still pending exactly as `expected` and not
    /// expired, queues `envelope` to the requester instance's reply queue, records `record`
    /// in the requester's audit chain, keeps a receipt until the request's deadline, and
    /// removes the pending request. Returns the linked record when it queued the reply.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_reply(
        &mut self,
        correlation_id: &str,
        expected: &PendingRequest,
        receipt: ReplyReceipt,
        envelope: Arc<str>,
        record: AuditRecord,
        now: Instant,
    ) -> Result<Result<(ReplyCommit, Option<AuditRecord>), ReplyError>, StoreError> {
        Ok(match self.correlation(correlation_id, now) {
            Correlation::Answered(prior)
                if prior.sender == receipt.sender && prior.fingerprint == receipt.fingerprint =>
            {
                Ok((ReplyCommit::AlreadyQueued { message_id: prior.message_id }, None))
            }
            Correlation::Answered(_) => Err(ReplyError::Completed),
            Correlation::Expired => Err(ReplyError::Expired),
            Correlation::Unknown => Err(ReplyError::Unknown),
            Correlation::Pending(current) if current != *expected => Err(ReplyError::Completed),
            Correlation::Pending(current) => {
                if !self.audit_has_room(&current.requester) {
                    return Err(StoreError::AuditFull);
                }
                let queue = QueueKey::Replies(current.requester.clone(), current.requester_instance.clone());
                if self.insert(&queue, envelope, 1, Instant::ZERO).is_err() {
                    return Ok(Err(ReplyError::Completed));
                }
                let record = self.append_audit(&current.requester, record);
                let expires_at = self.remove_pending(correlation_id).map_or(now, |p| p.expires_at);
                let message_id = receipt.message_id.clone();
                self.forget_at.insert((expires_at, correlation_id.to_string()));
                self.receipts.insert(correlation_id.to_string(), Expiring { value: receipt, expires_at });
                Ok((ReplyCommit::Queued { message_id }, Some(record)))
            }
        })
    }

    // ---- rate limits ----------------------------------------------------------------------

    /// How far ahead of `now` `sender`'s minute and hour windows are (their backlog).
    pub fn rate_backlog(&self, sender: &AgentId, now: Instant) -> ratelimit::Backlog {
        ratelimit::Backlog::of(self.rates.get(sender).copied().unwrap_or_default(), now)
    }

    /// Forgets `sender`'s rate-limit state (an operator's reset); returns whether it had any.
    pub fn reset_rate(&mut self, sender: &AgentId) -> bool {
        self.rates.remove(sender).is_some()
    }

    /// Admits up to `count` messages of `sender` arriving together under `limits` (GCRA, both
    /// windows; see [`ratelimit::admit_many`]); a refusal consumes nothing.
    pub fn admit_rate(&mut self, sender: &AgentId, limits: Limits, now: Instant, count: usize) -> Grant {
        let state = self.rates.get(sender).copied().unwrap_or_default();
        let (next, grant) = ratelimit::admit_many(limits, state, now, count);
        if grant.admitted > 0 {
            self.rates.insert(sender.clone(), next);
        }
        grant
    }

    // ---- state ----------------------------------------------------------------------------

    /// The agent's state and revision.
    pub fn get_state(&self, agent: &AgentId) -> StateSnapshot {
        self.states.get(agent).cloned().unwrap_or_default()
    }

    /// Writes `updates`; with `expected_revision`, only if it is current. An empty update
    /// writes nothing and does not bump the revision. Returns the new revision.
    pub fn update_state(
        &mut self,
        agent: &AgentId,
        updates: BTreeMap<String, String>,
        expected_revision: Option<u64>,
        max_bytes: usize,
    ) -> Result<u64, StateError> {
        let state = self.states.entry(agent.clone()).or_default();
        check_revision(state, expected_revision)?;
        let bytes = crate::limits::merged_state_bytes(
            state.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            updates.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if bytes > max_bytes {
            return Err(StateError::TooLarge { bytes });
        }
        if !updates.is_empty() {
            state.fields.extend(updates);
            state.revision += 1;
        }
        Ok(state.revision)
    }

    /// Clears the state and bumps the revision (so writers that read before the reset are
    /// fenced off); with `expected_revision`, only if it is current.
    pub fn reset_state(&mut self, agent: &AgentId, expected_revision: Option<u64>) -> Result<u64, StateError> {
        let state = self.states.entry(agent.clone()).or_default();
        check_revision(state, expected_revision)?;
        state.fields.clear();
        state.revision += 1;
        Ok(state.revision)
    }
}

fn check_revision(state: &StateSnapshot, expected: Option<u64>) -> Result<(), StateError> {
    match expected {
        Some(expected) if expected != state.revision => Err(StateError::RevisionConflict { current: state.revision }),
        _ => Ok(()),
    }
}

fn smallest_instance() -> InstanceId {
    // "-" sorts before every other id character, so ranges from it cover all instances.
    InstanceId::new("-").unwrap_or_else(|_| unreachable!("'-' is a valid instance id"))
}

#[cfg(test)]
mod tests;
