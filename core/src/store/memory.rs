use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::{OwnerToken, StoreError};
use crate::delivery::{EntryId, QueuedMessage, StoreEffect};
use crate::ids::AgentId;
use crate::time::Instant;

/// Bounds of the in-memory store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStoreConfig {
    /// Most entries (ready, delayed or claimed) one agent's queue may hold.
    pub max_queue_len: usize,
    /// Most dead letters kept; the oldest are dropped past it (and counted).
    pub max_dead_letters: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        MemoryStoreConfig { max_queue_len: 100_000, max_dead_letters: 10_000 }
    }
}

/// A message that could not be delivered, kept whole with the reason and attempts made.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The agent whose queue it came from.
    pub agent: AgentId,
    /// The full envelope JSON.
    pub envelope: Arc<str>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Delivery attempts made.
    pub attempts: u32,
}

#[derive(Debug)]
struct Entry {
    envelope: Arc<str>,
    attempt: u32,
    not_before: Instant,
    claimed_by: Option<OwnerToken>,
}

/// One agent's work queue, shared by all its instances.
#[derive(Debug, Default)]
struct AgentQueue {
    entries: BTreeMap<u64, Entry>,
    /// Unclaimed entries by (earliest delivery, sequence): FIFO among those that are ready.
    ready: BTreeSet<(Instant, u64)>,
}

/// The reference store: deterministic, in-process, every step atomic because it is one method
/// call on `&mut self`. The embedded default store and the store under simulation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    config: MemoryStoreConfig,
    queues: BTreeMap<AgentId, AgentQueue>,
    next_seq: u64,
    dead_letters: VecDeque<DeadLetter>,
    dead_letters_dropped: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(config: MemoryStoreConfig) -> Self {
        MemoryStore { config, ..MemoryStore::default() }
    }

    /// Appends `envelope` to `agent`'s queue, ready at once. Atomic: the entry exists, or
    /// nothing changed and the error says why.
    pub fn enqueue(&mut self, agent: &AgentId, envelope: Arc<str>) -> Result<EntryId, StoreError> {
        let seq = self.next_seq;
        let queue = self.queues.entry(agent.clone()).or_default();
        if queue.entries.len() >= self.config.max_queue_len {
            return Err(StoreError::QueueFull);
        }
        self.next_seq += 1;
        queue.entries.insert(seq, Entry { envelope, attempt: 1, not_before: Instant::ZERO, claimed_by: None });
        queue.ready.insert((Instant::ZERO, seq));
        Ok(EntryId::from_seq(seq))
    }

    /// Claims up to `max` ready entries of `agent` for `owner`, oldest first. Claimed entries
    /// are invisible to other owners until settled or released.
    pub fn claim(&mut self, agent: &AgentId, owner: &OwnerToken, max: usize, now: Instant) -> Vec<QueuedMessage> {
        let Some(queue) = self.queues.get_mut(agent) else { return Vec::new() };
        let mut claimed = Vec::new();
        while claimed.len() < max {
            let Some(&(not_before, seq)) = queue.ready.first() else { break };
            if not_before > now {
                break;
            }
            queue.ready.pop_first();
            let Some(entry) = queue.entries.get_mut(&seq) else { continue };
            entry.claimed_by = Some(owner.clone());
            claimed.push(QueuedMessage {
                entry: EntryId::from_seq(seq),
                envelope: entry.envelope.clone(),
                attempt: entry.attempt,
            });
        }
        claimed
    }

    /// The earliest time a currently delayed entry of `agent` becomes ready, if any.
    pub fn next_ready_at(&self, agent: &AgentId) -> Option<Instant> {
        self.queues.get(agent)?.ready.first().map(|(at, _)| *at)
    }

    /// Applies a delivery machine's effect, fenced: only if `owner` still holds the entry.
    /// Atomic: on error nothing changed.
    pub fn apply(&mut self, agent: &AgentId, owner: &OwnerToken, effect: StoreEffect) -> Result<(), StoreError> {
        let queue = self.queues.get_mut(agent).ok_or(StoreError::NotOwner)?;
        let seq = parse_seq(effect.entry()).ok_or(StoreError::NotOwner)?;
        let held = queue.entries.get(&seq).is_some_and(|e| e.claimed_by.as_ref() == Some(owner));
        if !held {
            return Err(StoreError::NotOwner);
        }
        match effect {
            StoreEffect::Ack { .. } => {
                queue.entries.remove(&seq);
            }
            StoreEffect::Requeue { attempt, not_before, .. } => {
                if let Some(entry) = queue.entries.get_mut(&seq) {
                    entry.claimed_by = None;
                    entry.attempt = attempt;
                    entry.not_before = not_before;
                    queue.ready.insert((not_before, seq));
                }
            }
            StoreEffect::DeadLetter { envelope, attempts, reason, .. } => {
                queue.entries.remove(&seq);
                self.push_dead_letter(DeadLetter { agent: agent.clone(), envelope, reason, attempts });
            }
        }
        Ok(())
    }

    /// Makes every entry `owner` holds in `agent`'s queue ready again with its attempt
    /// unchanged: for a session that ended without settling its work. Returns how many.
    pub fn release_owner(&mut self, agent: &AgentId, owner: &OwnerToken, now: Instant) -> usize {
        let Some(queue) = self.queues.get_mut(agent) else { return 0 };
        let mut released = 0;
        for (seq, entry) in &mut queue.entries {
            if entry.claimed_by.as_ref() == Some(owner) {
                entry.claimed_by = None;
                entry.not_before = now;
                queue.ready.insert((now, *seq));
                released += 1;
            }
        }
        released
    }

    /// Entries in `agent`'s queue: ready, delayed and claimed.
    pub fn queue_len(&self, agent: &AgentId) -> usize {
        self.queues.get(agent).map_or(0, |q| q.entries.len())
    }

    /// The dead letters kept, oldest first.
    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetter> {
        self.dead_letters.iter()
    }

    /// Dead letters dropped because the bound was reached.
    pub fn dead_letters_dropped(&self) -> u64 {
        self.dead_letters_dropped
    }

    fn push_dead_letter(&mut self, letter: DeadLetter) {
        if self.dead_letters.len() >= self.config.max_dead_letters {
            self.dead_letters.pop_front();
            self.dead_letters_dropped += 1;
        }
        self.dead_letters.push_back(letter);
    }
}

fn parse_seq(entry: &EntryId) -> Option<u64> {
    entry.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn agent(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    fn owner(s: &str) -> OwnerToken {
        OwnerToken::new(s)
    }

    #[test]
    fn claim_is_fifo_and_exclusive() {
        let mut s = MemoryStore::default();
        let bob = agent("bob");
        for i in 0..3 {
            s.enqueue(&bob, Arc::from(format!("m{i}"))).unwrap();
        }
        let a = s.claim(&bob, &owner("a"), 2, Instant::ZERO);
        let b = s.claim(&bob, &owner("b"), 5, Instant::ZERO);
        assert_eq!(a.iter().map(|m| &*m.envelope).collect::<Vec<_>>(), ["m0", "m1"]);
        assert_eq!(b.iter().map(|m| &*m.envelope).collect::<Vec<_>>(), ["m2"]);
    }

    #[test]
    fn settling_is_fenced_by_owner() {
        let mut s = MemoryStore::default();
        let bob = agent("bob");
        s.enqueue(&bob, Arc::from("m")).unwrap();
        let m = s.claim(&bob, &owner("a"), 1, Instant::ZERO).remove(0);
        let ack = StoreEffect::Ack { entry: m.entry.clone() };
        assert_eq!(s.apply(&bob, &owner("b"), ack.clone()), Err(StoreError::NotOwner));
        assert_eq!(s.apply(&bob, &owner("a"), ack.clone()), Ok(()));
        assert_eq!(s.apply(&bob, &owner("a"), ack), Err(StoreError::NotOwner), "settled twice");
        assert_eq!(s.queue_len(&bob), 0);
    }

    #[test]
    fn requeue_respects_not_before_and_keeps_attempt() {
        let mut s = MemoryStore::default();
        let bob = agent("bob");
        s.enqueue(&bob, Arc::from("m")).unwrap();
        let m = s.claim(&bob, &owner("a"), 1, Instant::ZERO).remove(0);
        let later = Instant::ZERO + Duration::from_secs(2);
        let effect = StoreEffect::Requeue {
            entry: m.entry,
            envelope: m.envelope,
            attempt: 2,
            not_before: later,
            reason: crate::delivery::RequeueReason::RetryableNack,
        };
        s.apply(&bob, &owner("a"), effect).unwrap();
        assert!(s.claim(&bob, &owner("a"), 1, Instant::ZERO).is_empty());
        assert_eq!(s.next_ready_at(&bob), Some(later));
        let again = s.claim(&bob, &owner("b"), 1, later);
        assert_eq!(again[0].attempt, 2);
    }

    #[test]
    fn dead_letters_keep_the_envelope_and_are_bounded() {
        let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 10, max_dead_letters: 1 });
        let bob = agent("bob");
        for i in 0..2 {
            s.enqueue(&bob, Arc::from(format!("m{i}"))).unwrap();
            let m = s.claim(&bob, &owner("a"), 1, Instant::ZERO).remove(0);
            let effect =
                StoreEffect::DeadLetter { entry: m.entry, envelope: m.envelope, attempts: 5, reason: "r".into() };
            s.apply(&bob, &owner("a"), effect).unwrap();
        }
        let kept: Vec<_> = s.dead_letters().map(|d| &*d.envelope).collect();
        assert_eq!(kept, ["m1"]);
        assert_eq!(s.dead_letters_dropped(), 1);
    }

    #[test]
    fn queue_bound_refuses_without_change() {
        let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 1, max_dead_letters: 1 });
        let bob = agent("bob");
        s.enqueue(&bob, Arc::from("a")).unwrap();
        assert_eq!(s.enqueue(&bob, Arc::from("b")), Err(StoreError::QueueFull));
        assert_eq!(s.queue_len(&bob), 1);
    }

    #[test]
    fn release_owner_makes_claimed_work_ready_again() {
        let mut s = MemoryStore::default();
        let bob = agent("bob");
        s.enqueue(&bob, Arc::from("m")).unwrap();
        s.claim(&bob, &owner("a"), 1, Instant::ZERO);
        assert_eq!(s.release_owner(&bob, &owner("a"), Instant::ZERO), 1);
        assert_eq!(s.claim(&bob, &owner("b"), 1, Instant::ZERO)[0].attempt, 1);
    }
}
