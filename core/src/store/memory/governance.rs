//! The governance steps of the memory store: the target gate (liveness and circuit), audited
//! admission (audit record and enqueue as one step), circuit outcomes and security events.

use super::MemoryStore;
use crate::delivery::Outcome;
use crate::ids::AgentId;
use crate::policy::audit::{AuditRecord, Chain, Chained, Decision, SecurityEvent};
use crate::policy::circuit::{Circuit, CircuitConfig};
use crate::store::{Admission, Admitted, QueueKey, StoreError, TargetGate};
use crate::time::Instant;

/// One hash chain kept in memory: its records (oldest first) and its head.
#[derive(Debug)]
pub(super) struct AuditLog<T> {
    records: Vec<T>,
    chain: Chain,
}

impl<T> Default for AuditLog<T> {
    fn default() -> Self {
        AuditLog { records: Vec::new(), chain: Chain::default() }
    }
}

impl<T: Chained + Clone> AuditLog<T> {
    fn has_room(&self, max: usize) -> bool {
        self.records.len() < max
    }

    fn append(&mut self, record: T) -> T {
        let linked = self.chain.append(record);
        self.records.push(linked.clone());
        linked
    }

    fn snapshot(&self) -> (Vec<T>, Option<String>) {
        (self.records.clone(), self.chain.head().map(str::to_string))
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
        if !self.audit.get(&chain).is_none_or(|log| log.has_room(self.config.max_audit_records)) {
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
        let record = self.audit.entry(chain).or_default().append(record);
        Ok(Admitted { record, entry })
    }

    /// Whether `chain` can take one more record.
    pub(super) fn audit_has_room(&self, chain: &AgentId) -> bool {
        self.audit.get(chain).is_none_or(|log| log.has_room(self.config.max_audit_records))
    }

    /// Appends an already-decided record (a reply) to `chain`; the caller checked room.
    pub(super) fn append_audit(&mut self, chain: &AgentId, record: AuditRecord) -> AuditRecord {
        self.audit.entry(chain.clone()).or_default().append(record)
    }

    /// Feeds a delivery outcome of `agent` to its circuit.
    pub fn record_outcome(&mut self, agent: &AgentId, outcome: Outcome, config: &CircuitConfig, now: Instant) {
        self.circuits.entry(agent.clone()).or_default().record(config, outcome, now);
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

    /// `chain`'s records (oldest first) and its head.
    pub fn audit_chain(&self, chain: &AgentId) -> (Vec<AuditRecord>, Option<String>) {
        self.audit.get(chain).map(AuditLog::snapshot).unwrap_or_default()
    }

    /// The security chain's events (oldest first) and its head.
    pub fn security_chain(&self) -> (Vec<SecurityEvent>, Option<String>) {
        self.security.snapshot()
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
