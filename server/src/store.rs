//! The broker's store: domain-level steps over the embedded [`MemoryStore`], plus wake-ups so
//! sessions wait for work instead of polling.
//!
//! Every step takes the lock for one synchronous call and never across an `.await`, so a
//! cancelled wait can never leave a half-done step behind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mas_core::delivery::{EntryId, QueuedMessage, StoreEffect};
use mas_core::ids::AgentId;
use mas_core::store::{DeadLetter, MemoryStore, MemoryStoreConfig, OwnerToken, StoreError};
use tokio::sync::Notify;

use crate::clock::Clock;

#[derive(Debug, Default)]
struct Inner {
    store: MemoryStore,
    /// One wake-up per agent queue, woken on every enqueue and requeue.
    wakers: BTreeMap<AgentId, Arc<Notify>>,
}

impl Inner {
    fn waker(&mut self, agent: &AgentId) -> Arc<Notify> {
        self.wakers.entry(agent.clone()).or_default().clone()
    }
}

/// The embedded, in-process store. Cheap to clone; clones share the data.
#[derive(Debug, Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
}

impl Store {
    /// An empty store.
    pub fn new(config: MemoryStoreConfig) -> Self {
        let inner = Inner { store: MemoryStore::new(config), wakers: BTreeMap::new() };
        Store { inner: Arc::new(Mutex::new(inner)) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave MemoryStore half-updated: each of its
        // steps validates before it mutates. So a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an envelope to `agent`'s queue and wakes its waiting sessions.
    pub fn enqueue(&self, agent: &AgentId, envelope: Arc<str>) -> Result<EntryId, StoreError> {
        let mut inner = self.lock();
        let entry = inner.store.enqueue(agent, envelope)?;
        inner.waker(agent).notify_waiters();
        Ok(entry)
    }

    /// Claims up to `max` ready messages for `owner`, waiting up to `max_wait` for some to
    /// arrive or for a delayed one to become ready. Returns an empty batch on timeout.
    /// Cancel-safe: a claim happens inside one lock scope with no await in between.
    pub async fn claim(
        &self,
        clock: &Clock,
        agent: &AgentId,
        owner: &OwnerToken,
        max: usize,
        max_wait: Duration,
    ) -> Vec<QueuedMessage> {
        let give_up = tokio::time::Instant::now() + max_wait;
        loop {
            let (waker, wake_at) = {
                let mut inner = self.lock();
                let now = clock.now().mono;
                let batch = inner.store.claim(agent, owner, max, now);
                if !batch.is_empty() {
                    return batch;
                }
                let wake_at = inner.store.next_ready_at(agent).map(|at| clock.to_tokio(at));
                (inner.waker(agent), wake_at)
            };
            // Register interest before re-checking: an enqueue between our claim and this
            // point would otherwise be missed until the next one.
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .lock()
                .store
                .next_ready_at(agent)
                .is_some_and(|at| clock.to_tokio(at) <= tokio::time::Instant::now())
            {
                continue;
            }
            let until = wake_at.map_or(give_up, |at| at.min(give_up));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
            if tokio::time::Instant::now() >= give_up {
                return Vec::new();
            }
        }
    }

    /// Applies a delivery machine's effect if `owner` still holds the entry (fenced).
    pub fn apply(&self, agent: &AgentId, owner: &OwnerToken, effect: StoreEffect) -> Result<(), StoreError> {
        let requeue = matches!(effect, StoreEffect::Requeue { .. });
        let mut inner = self.lock();
        inner.store.apply(agent, owner, effect)?;
        if requeue {
            inner.waker(agent).notify_waiters();
        }
        Ok(())
    }

    /// Makes everything `owner` still holds ready again; a safety net for sessions that end
    /// without settling (their machine normally hands everything back first).
    pub fn release_owner(&self, clock: &Clock, agent: &AgentId, owner: &OwnerToken) -> usize {
        let mut inner = self.lock();
        let released = inner.store.release_owner(agent, owner, clock.now().mono);
        if released > 0 {
            inner.waker(agent).notify_waiters();
        }
        released
    }

    /// Entries in `agent`'s queue (ready, delayed and claimed).
    pub fn queue_len(&self, agent: &AgentId) -> usize {
        self.lock().store.queue_len(agent)
    }

    /// A copy of the dead letters kept, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().store.dead_letters().cloned().collect()
    }
}
