//! The embedded backend: `mas_core::store::MemoryStore` behind a mutex, with wake-ups so
//! sessions wait for work instead of polling.
//!
//! Every step takes the lock for one synchronous call and never across an `.await`, so a
//! cancelled wait can never leave a half-done step behind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mas_core::delivery::{EntryId, QueuedMessage, StoreEffect};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::policy::audit::{AuditRecord, ChainSnapshot, Chained, Checkpoint, SecurityEvent};
use mas_core::policy::circuit::CircuitConfig;
use mas_core::policy::ratelimit::{Backlog, Grant, Limits};
use mas_core::store::{
    Admission, Admitted, Correlation, DeadLetter, MemoryStore, MemoryStoreConfig, PendingRequest, QueueGauges,
    QueueKey, Redrive, ReplyCommit, ReplyError, ReplyReceipt, SessionRef, StateError, StateSnapshot, StoreError,
    TargetGate,
};
use mas_core::time::Now;

use super::faults::{Answer, StoreFaults};
use super::requeue_delay;
use super::wake::{ClaimCursor, Claimed, Wake, claim_waiting};
use crate::clock::Clock;

#[derive(Debug, Default)]
struct Inner {
    store: MemoryStore,
    /// One wake-up per agent, woken whenever any of its queues gains ready work.
    wakers: BTreeMap<AgentId, Arc<Wake>>,
}

impl Inner {
    fn waker(&mut self, agent: &AgentId) -> Arc<Wake> {
        self.wakers.entry(agent.clone()).or_default().clone()
    }
}

/// The embedded store. Cheap to clone; clones share the data and the clock.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<Mutex<Inner>>,
    epoch: Arc<str>,
    /// The store's own clock: brokers sharing this store agree on deadlines through it.
    clock: Clock,
    /// Asked before every step when installed (simulation and tests only).
    faults: Option<Arc<dyn StoreFaults>>,
}

impl MemoryBackend {
    /// An empty store whose clock starts now.
    pub fn new(config: MemoryStoreConfig) -> Self {
        let inner = Inner { store: MemoryStore::new(config), wakers: BTreeMap::new() };
        MemoryBackend {
            inner: Arc::new(Mutex::new(inner)),
            epoch: super::fresh_epoch().into(),
            clock: Clock::new(),
            faults: None,
        }
    }

    /// This store with `faults` deciding the fate of every step (clones share it).
    pub fn with_faults(mut self, faults: Arc<dyn StoreFaults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Runs the installed fault hook for `op`, if any.
    pub(super) async fn fault(&self, op: &'static str) -> Result<Answer, StoreError> {
        match &self.faults {
            Some(faults) => super::faults::apply(faults.before(op), op).await,
            None => Ok(Answer::Keep),
        }
    }

    pub(super) fn epoch(&self) -> &str {
        &self.epoch
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each MemoryStore step validates before it mutates, so a panic elsewhere while the
        // lock was held cannot have left it half-updated: a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) async fn enqueue(&self, queue: &QueueKey, envelope: Arc<str>) -> Result<EntryId, StoreError> {
        let mut inner = self.lock();
        let entry = inner.store.enqueue(queue, envelope)?;
        inner.waker(queue.agent()).wake();
        Ok(entry)
    }

    pub(super) async fn claim(
        &self,
        session: &SessionRef,
        max: usize,
        max_wait: Duration,
        cursor: ClaimCursor,
    ) -> Result<Claimed, StoreError> {
        let waker = self.lock().waker(&session.agent);
        // Leases of other sessions may expire while we wait; look again at least every half
        // second so their work moves on promptly.
        claim_waiting(waker, None, cursor, max, max_wait, Duration::from_millis(500), || async {
            let mut inner = self.lock();
            let now = self.clock.now().mono;
            let batch = inner.store.claim(session, max, now);
            let next_ready = inner.store.next_ready_at(session).map(|at| at.saturating_duration_since(now));
            Ok((batch, next_ready))
        })
        .await
    }

    pub(super) async fn apply(
        &self,
        session: &SessionRef,
        effects: Vec<StoreEffect>,
        now: Now,
        circuit: Option<&CircuitConfig>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let store_now = self.clock.now().mono;
        let mut inner = self.lock();
        let mut wake = false;
        let results = effects
            .into_iter()
            .map(|mut effect| {
                let delay = requeue_delay(&effect, now);
                if let StoreEffect::Requeue { not_before, .. } = &mut effect {
                    *not_before = store_now + delay;
                    wake = true;
                }
                let outcome = effect.circuit_outcome();
                let applied = inner.store.apply(session, effect, store_now);
                // Fenced-off effects say nothing: another session owns the message now.
                if let (Ok(()), Some(outcome), Some(config)) = (&applied, outcome, circuit) {
                    inner.store.record_outcome(&session.agent, outcome, config, store_now);
                }
                applied
            })
            .collect();
        if wake {
            inner.waker(&session.agent).wake();
        }
        Ok(results)
    }

    pub(super) async fn release(&self, session: &SessionRef) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let released = inner.store.release(session, self.clock.now().mono);
        if released > 0 {
            inner.waker(&session.agent).wake();
        }
        Ok(released)
    }

    pub(super) async fn acquire_lease(&self, session: &SessionRef, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.lock().store.acquire_lease(session, ttl, self.clock.now().mono).is_ok())
    }

    pub(super) async fn renew_lease(&self, session: &SessionRef, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.lock().store.renew_lease(session, ttl, self.clock.now().mono))
    }

    pub(super) async fn release_lease(&self, session: &SessionRef) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.store.release_lease(session);
        // Its unsettled work is now reclaimable: let siblings look.
        inner.waker(&session.agent).wake();
        Ok(())
    }

    pub(super) async fn instance_live(
        &self,
        agent: &AgentId,
        instance: &mas_core::ids::InstanceId,
    ) -> Result<bool, StoreError> {
        Ok(self.lock().store.instance_is_live(agent, instance, self.clock.now().mono))
    }

    pub(super) async fn live_agents(&self, agents: &[AgentId]) -> Result<Vec<bool>, StoreError> {
        let now = self.clock.now().mono;
        let inner = self.lock();
        Ok(agents.iter().map(|a| inner.store.agent_is_live(a, now)).collect())
    }

    pub(super) async fn gate(
        &self,
        target: &AgentId,
        circuit: Option<&CircuitConfig>,
    ) -> Result<TargetGate, StoreError> {
        Ok(self.lock().store.gate(target, circuit, self.clock.now().mono))
    }

    pub(super) async fn admit(
        &self,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
    ) -> Result<Admitted, StoreError> {
        let chain = admission.chain.clone();
        let mut inner = self.lock();
        let admitted = inner.store.admit(admission, circuit, self.clock.now().mono)?;
        if admitted.entry.is_some() {
            inner.waker(&chain).wake();
        }
        Ok(admitted)
    }

    pub(super) async fn open_request(
        &self,
        correlation_id: &str,
        pending: PendingRequest,
        ttl: Duration,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
        _ahead: super::PendingAhead,
    ) -> Result<Admitted, StoreError> {
        let target = pending.target.clone();
        let mut inner = self.lock();
        let now = self.clock.now().mono;
        let admitted = inner.store.open_request(correlation_id, pending, ttl, admission, circuit, now)?;
        if admitted.entry.is_some() {
            inner.waker(&target).wake();
        }
        Ok(admitted)
    }

    pub(super) async fn correlation(
        &self,
        _requester: &AgentId,
        correlation_id: &str,
    ) -> Result<Correlation, StoreError> {
        Ok(self.lock().store.correlation(correlation_id, self.clock.now().mono))
    }

    pub(super) async fn commit_reply(
        &self,
        correlation_id: &str,
        expected: &PendingRequest,
        receipt: ReplyReceipt,
        envelope: Arc<str>,
        record: AuditRecord,
    ) -> Result<Result<(ReplyCommit, Option<AuditRecord>), ReplyError>, StoreError> {
        let mut inner = self.lock();
        let now = self.clock.now().mono;
        let result = inner.store.commit_reply(correlation_id, expected, receipt, envelope, record, now)?;
        if matches!(result, Ok((ReplyCommit::Queued { .. }, _))) {
            inner.waker(&expected.requester).wake();
        }
        Ok(result)
    }

    pub(super) async fn append_security(&self, event: SecurityEvent) -> Result<SecurityEvent, StoreError> {
        self.lock().store.append_security(event)
    }

    pub(super) async fn audit_chain(&self, chain: &AgentId) -> Result<ChainSnapshot<AuditRecord>, StoreError> {
        Ok(self.lock().store.audit_chain(chain))
    }

    pub(super) async fn security_chain(&self) -> Result<ChainSnapshot<SecurityEvent>, StoreError> {
        Ok(self.lock().store.security_chain())
    }

    pub(super) async fn audit_len(&self, chain: &AgentId) -> Result<usize, StoreError> {
        Ok(self.lock().store.audit_len(chain))
    }

    pub(super) async fn audit_oldest(
        &self,
        chain: &AgentId,
        limit: usize,
    ) -> Result<ChainSnapshot<AuditRecord>, StoreError> {
        Ok(self.lock().store.audit_oldest(chain, limit))
    }

    pub(super) async fn trim_audit(
        &self,
        chain: &AgentId,
        count: usize,
        last: &AuditRecord,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let last_hash = last.hash();
        Ok(self.lock().store.trim_audit(chain, count, &last_hash))
    }

    /// Edits a stored audit record in place (see `MemoryStore::tamper_with_audit`); for tests
    /// and tamper drills.
    pub fn tamper_with_audit(&self, chain: &AgentId, index: usize, edit: impl FnOnce(&mut AuditRecord)) -> bool {
        self.lock().store.tamper_with_audit(chain, index, edit)
    }

    pub(super) async fn admit_rate(&self, sender: &AgentId, limits: Limits, count: usize) -> Result<Grant, StoreError> {
        Ok(self.lock().store.admit_rate(sender, limits, self.clock.now().mono, count))
    }

    pub(super) async fn get_state(&self, agent: &AgentId) -> Result<StateSnapshot, StoreError> {
        Ok(self.lock().store.get_state(agent))
    }

    pub(super) async fn update_state(
        &self,
        agent: &AgentId,
        updates: BTreeMap<String, String>,
        expected_revision: Option<u64>,
        max_bytes: usize,
    ) -> Result<Result<u64, StateError>, StoreError> {
        Ok(self.lock().store.update_state(agent, updates, expected_revision, max_bytes))
    }

    pub(super) async fn reset_state(
        &self,
        agent: &AgentId,
        expected_revision: Option<u64>,
    ) -> Result<Result<u64, StateError>, StoreError> {
        Ok(self.lock().store.reset_state(agent, expected_revision))
    }

    pub(super) async fn own_pending(&self, session: &SessionRef, max: usize) -> Result<Vec<QueuedMessage>, StoreError> {
        Ok(self.lock().store.own_pending(session, max))
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    pub(super) async fn queue_gauges(&self, agent: &AgentId) -> Result<QueueGauges, StoreError> {
        Ok(self.lock().store.queue_gauges(agent, self.clock.now().mono))
    }

    pub(super) async fn queue_len(&self, queue: &QueueKey) -> Result<usize, StoreError> {
        Ok(self.lock().store.queue_len(queue))
    }

    pub(super) async fn dead_letters(&self, agent: &AgentId, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let now = self.clock.now().mono;
        Ok(self.lock().store.dead_letters(now).filter(|d| &d.agent == agent).take(limit).collect())
    }

    pub(super) async fn redrive_dead_letters(
        &self,
        agent: &AgentId,
        ids: &[String],
    ) -> Result<Vec<Redrive>, StoreError> {
        let mut inner = self.lock();
        let outcomes = inner.store.redrive_dead_letters(agent, ids);
        if outcomes.iter().any(|o| matches!(o, Redrive::Queued(_))) {
            inner.waker(agent).wake();
        }
        Ok(outcomes)
    }

    pub(super) async fn purge_dead_letters(&self, agent: &AgentId, ids: &[String]) -> Result<usize, StoreError> {
        Ok(self.lock().store.purge_dead_letters(agent, ids))
    }

    pub(super) async fn reset_circuit(&self, agent: &AgentId) -> Result<bool, StoreError> {
        Ok(self.lock().store.reset_circuit(agent))
    }

    pub(super) async fn reset_rate(&self, sender: &AgentId) -> Result<bool, StoreError> {
        Ok(self.lock().store.reset_rate(sender))
    }

    pub(super) async fn rate_backlog(&self, sender: &AgentId) -> Result<Backlog, StoreError> {
        let now = self.clock.now().mono;
        Ok(self.lock().store.rate_backlog(sender, now))
    }

    pub(super) async fn revoke_lease(&self, agent: &AgentId, instance: &InstanceId) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let revoked = inner.store.revoke_lease(agent, instance);
        inner.waker(agent).wake();
        Ok(revoked)
    }

    pub(super) async fn authz_overlay(&self, known: u64) -> Result<Option<(u64, Arc<str>)>, StoreError> {
        Ok(self.lock().store.authz_overlay(known))
    }

    pub(super) async fn put_authz_overlay(&self, expected: u64, doc: Arc<str>) -> Result<Result<u64, u64>, StoreError> {
        Ok(self.lock().store.put_authz_overlay(expected, doc))
    }
}
