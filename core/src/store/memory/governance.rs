//! The governance steps of the memory store: the target gate (liveness and circuit), audited
//! admission (audit record and enqueue as one step), circuit outcomes and security events.

use std::collections::VecDeque;

use super::MemoryStore;
use crate::delivery::Outcome;
use crate::ids::AgentId;
use crate::policy::audit::{AuditRecord, Chain, ChainSnapshot, Chained, Checkpoint, Decision, SecurityEvent};
use crate::policy::circuit::{Circuit, CircuitConfig};
use crate::store::{Admission, Admitted, QueueKey, StoreError, TargetGate};
use crate::time::Instant;

/// One hash chain kept in memory: its live records (oldest first), its head, and the
/// checkpoint of what was archived out of it.
#[derive(Debug)]
pub(super) struct AuditLog<T> {
    records: VecDeque<T>,
    chain: Chain,
    checkpoint: Checkpoint,
}

impl<T> Default for AuditLog<T> {
    fn default() -> Self {
        AuditLog { records: VecDeque::new(), chain: Chain::default(), checkpoint: Checkpoint::default() }
    }
}

impl<T: Chained + Clone> AuditLog<T> {
    fn has_room(&self, max: usize) -> bool {
        self.records.len() < max
    }

    fn append(&mut self, record: T) -> T {
        let linked = self.chain.append(record);
        self.records.push_back(linked.clone());
        linked
    }

    /// The oldest `limit` live records (all of them for `usize::MAX`).
    fn snapshot(&self, limit: usize) -> ChainSnapshot<T> {
        ChainSnapshot {
            records: self.records.iter().take(limit).cloned().collect(),
            head: self.chain.head().map(str::to_string),
            checkpoint: self.checkpoint.clone(),
        }
    }

    /// Drops the oldest `count` records if the last of them still hashes to `last_hash`.
    fn trim(&mut self, count: usize, last_hash: &str) -> Option<Checkpoint> {
        let last = self.records.get(count.checked_sub(1)?)?;
        if last.hash() != last_hash {
            return None;
        }
        self.records.drain(..count);
        self.checkpoint =
            Checkpoint { archived: self.checkpoint.archived + count as u64, base: Some(last_hash.into()) };
        Some(self.checkpoint.clone())
    }
}

impl MemoryStore {
    /// Whether `target` has a live instance and whether its circuit (when breakers are on)
    /// would admit a message now. Reads only: no probe is taken.
    pub fn gate(&self, target: &AgentId, circuit: Option<&CircuitConfig>, now: Instant) -> TargetGate {
        let circuit_admits = match circuit {
            Some(config) => self.circuits.get(target).is_none_or(|c| c.would_admit(config, now)),
            None => true,
        };
        TargetGate { live: self.agent_is_live(target, now), circuit_admits }
    }

    /// Records an admission decision in its chain and, for a routable one, queues the message
    /// to the chain agent's work queue — one step. A routable message the target's circuit
    /// refuses (a half-open circuit whose probes are all out) or whose queue is full is
    /// recorded as `CIRCUIT_OPEN` / `QUEUE_FULL` and not queued. A full chain refuses the
    /// whole step with [`StoreError::AuditFull`].
    pub fn admit(
        &mut self,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
        now: Instant,
    ) -> Result<Admitted, StoreError> {
        let Admission { chain, mut record, envelope } = admission;
        if !self.audit_has_room(&chain) {
            return Err(StoreError::AuditFull);
        }
        let queue = QueueKey::Work(chain.clone());
        let envelope = envelope.filter(|_| record.decision.is_routable());
        let envelope = match envelope {
            Some(_) if self.queue_len(&queue) >= self.config.max_queue_len => {
                record.refuse(Decision::QueueFull, "queue_full");
                None
            }
            Some(envelope) => match circuit {
                Some(config) if self.circuits.entry(chain.clone()).or_default().admit(config, now).is_err() => {
                    record.refuse(Decision::CircuitOpen, "circuit_open");
                    None
                }
                _ => Some(envelope),
            },
            None => None,
        };
        let entry = match envelope {
            Some(envelope) => Some(self.enqueue(&queue, envelope)?),
            None => None,
        };
        let record = self.append_audit(&chain, record);
        Ok(Admitted { record, entry })
    }

    /// Whether `chain` can take one more record.
    pub(super) fn audit_has_room(&self, chain: &AgentId) -> bool {
        self.audit.get(chain).is_none_or(|log| log.has_room(self.config.max_audit_records))
    }

    /// Appends a decided record to `chain`; the caller checked room.
    pub(super) fn append_audit(&mut self, chain: &AgentId, record: AuditRecord) -> AuditRecord {
        self.audit.entry(chain.clone()).or_default().append(record)
    }

    /// Feeds a delivery outcome of `agent` to its circuit.
    pub fn record_outcome(&mut self, agent: &AgentId, outcome: Outcome, config: &CircuitConfig, now: Instant) {
        self.circuits.entry(agent.clone()).or_default().record(config, outcome, now);
    }

    /// Closes `agent`'s circuit and forgets its failures (an operator's reset); returns
    /// whether it had any state.
    pub fn reset_circuit(&mut self, agent: &AgentId) -> bool {
        self.circuits.remove(agent).is_some()
    }

    /// `agent`'s circuit as stored (closed when never touched).
    pub fn circuit(&self, agent: &AgentId) -> Circuit {
        self.circuits.get(agent).copied().unwrap_or_default()
    }

    /// Appends a security event to the security chain.
    pub fn append_security(&mut self, event: SecurityEvent) -> Result<SecurityEvent, StoreError> {
        if !self.security.has_room(self.config.max_audit_records) {
            return Err(StoreError::AuditFull);
        }
        Ok(self.security.append(event))
    }

    /// The agents that have an audit chain.
    pub fn audit_chains(&self) -> Vec<AgentId> {
        self.audit.keys().cloned().collect()
    }

    /// `chain`'s live records (oldest first), head and checkpoint.
    pub fn audit_chain(&self, chain: &AgentId) -> ChainSnapshot<AuditRecord> {
        self.audit_oldest(chain, usize::MAX)
    }

    /// The oldest `limit` live records of `chain`, with its head and checkpoint: what an
    /// archiver moves out of the store next.
    pub fn audit_oldest(&self, chain: &AgentId, limit: usize) -> ChainSnapshot<AuditRecord> {
        self.audit.get(chain).map(|log| log.snapshot(limit)).unwrap_or_default()
    }

    /// Live records in `chain`.
    pub fn audit_len(&self, chain: &AgentId) -> usize {
        self.audit.get(chain).map_or(0, |log| log.records.len())
    }

    /// Removes the oldest `count` records of `chain` once they are archived, if the last of
    /// them is still the record hashed `last_hash` (else another archiver got there first, or
    /// the chain changed: nothing is removed, `None`). Moves the checkpoint past them.
    pub fn trim_audit(&mut self, chain: &AgentId, count: usize, last_hash: &str) -> Option<Checkpoint> {
        self.audit.get_mut(chain)?.trim(count, last_hash)
    }

    /// The security chain's events (oldest first), head and checkpoint.
    pub fn security_chain(&self) -> ChainSnapshot<SecurityEvent> {
        self.security.snapshot(usize::MAX)
    }

    /// Test and drill hook: replaces record `index` of `chain` in place without relinking,
    /// which is what an attacker with write access to the store could do. Verification must
    /// then fail.
    pub fn tamper_with_audit(&mut self, chain: &AgentId, index: usize, edit: impl FnOnce(&mut AuditRecord)) -> bool {
        match self.audit.get_mut(chain).and_then(|log| log.records.get_mut(index)) {
            Some(record) => {
                edit(record);
                true
            }
            None => false,
        }
    }
}
