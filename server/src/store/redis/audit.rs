//! Governance steps of the Redis backend: the target gate, audited admission with group
//! commit per chain (replies have their own committer in `replies.rs`, under the same head
//! lock), the security chain, and reading chains back for verification.
//!
//! A chain's hash links are computed here (Redis Lua has no SHA-256), so every append is a
//! compare-and-append: the script writes only if the chain's stored head is the one the
//! records were linked to, and otherwise returns the actual head for a re-link. Within one
//! broker, appends to a chain go through its [`ChainWriter`]: whoever takes the chain's commit
//! lock commits every decision queued for that chain so far in one script (group commit), so
//! concurrent messages to one agent cost one round trip together, and a broker never races
//! itself. Brokers sharing the store race only at the head check, and the loser re-links.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mas_core::delivery::EntryId;
use mas_core::ids::AgentId;
use mas_core::policy::audit::{AuditRecord, Chain, ChainSnapshot, Chained, Checkpoint, Decision, SecurityEvent};
use mas_core::policy::circuit::CircuitConfig;
use mas_core::store::{Admission, Admitted, StoreError, TargetGate};
use redis::Value;
use tokio::sync::{Mutex as AsyncMutex, oneshot};

use super::{RedisBackend, channel, claim_answer, handoff, key, text, unavailable};

/// Most decisions one admission script carries.
pub(super) const MAX_BATCH: usize = 256;
/// Re-links after which a commit gives up (each one means another broker appended first, or
/// the batch had refusals to record).
pub(super) const MAX_RELINKS: usize = 16;
/// Records per `XRANGE` when a chain is read: small enough that no read holds Redis long.
const READ_PAGE: usize = 1000;

/// The head this broker believes a chain has: `None` until first learned from Redis.
pub(super) type KnownHead = Option<Option<String>>;

/// The expected-head argument of the scripts: `?` (never a stored head) when unknown.
pub(super) fn expected_arg(head: &KnownHead) -> String {
    match head {
        None => "?".to_string(),
        Some(None) => String::new(),
        Some(Some(hash)) => hash.clone(),
    }
}

/// The stored head as the scripts return it (`''` for an empty chain).
pub(super) fn stored_head(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

struct Waiting {
    admission: Admission,
    done: oneshot::Sender<Result<Admitted, StoreError>>,
}

/// Per chain: decisions waiting to be committed, and the commit lock guarding the known head.
#[derive(Default)]
pub(super) struct ChainWriter {
    waiting: Mutex<Vec<Waiting>>,
    /// A committer task is running (or about to) for this chain: at most one at a time.
    committing: AtomicBool,
    /// The commit lock, guarding the head this broker believes the chain has.
    pub(super) head: AsyncMutex<KnownHead>,
    /// Replies to this chain's agent waiting to be committed (see `replies.rs`).
    pub(super) replies: Mutex<Vec<super::replies::WaitingReply>>,
    /// A reply committer is running (or about to) for this chain.
    pub(super) committing_replies: AtomicBool,
}

/// The chain writers of one backend, one per chain ever written (bounded by the allowlist).
#[derive(Default)]
pub(super) struct ChainWriters {
    by_chain: Mutex<BTreeMap<AgentId, Arc<ChainWriter>>>,
    security: AsyncMutex<KnownHead>,
}

impl ChainWriters {
    fn get(&self, chain: &AgentId) -> Arc<ChainWriter> {
        let mut map = self.by_chain.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(chain.clone()).or_default().clone()
    }
}

/// Whether a committer that found its queue empty must go on. It clears `running`, then
/// looks again: an item queued just as it stands down is never stranded, since either its
/// caller sees the flag cleared and starts a committer, or this one sees the item and takes
/// the flag back.
pub(super) fn keep_committing(running: &AtomicBool, queue_empty: impl FnOnce() -> bool) -> bool {
    running.store(false, Ordering::Release);
    !queue_empty() && !running.swap(true, Ordering::AcqRel)
}

pub(super) fn circuit_args(circuit: Option<&CircuitConfig>) -> [String; 6] {
    let c = circuit.copied().unwrap_or_default();
    [
        if circuit.is_some() { "1" } else { "0" }.to_string(),
        c.failure_threshold.to_string(),
        c.window.as_millis().to_string(),
        c.open_for.as_millis().to_string(),
        c.success_threshold.to_string(),
        c.max_probes.to_string(),
    ]
}

/// Whether a gate read found the target's circuit closed (or off): only then is its answer
/// used again (a half-open circuit's probes are counted by every admission).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitRead {
    Closed,
    NotClosed,
}

impl RedisBackend {
    /// The target's liveness and circuit. Reads of one target by concurrent RPCs share one
    /// round trip (each waits for a read that starts after it asked; see `gather.rs`), and an
    /// all-clear answer is used again for a few milliseconds (see `fresh_gates.rs`).
    pub(in crate::store) async fn gate(
        &self,
        target: &AgentId,
        circuit: Option<&CircuitConfig>,
    ) -> Result<TargetGate, StoreError> {
        if self.fresh_gates.is_fresh(target, tokio::time::Instant::now()) {
            return Ok(TargetGate { live: true, circuit_admits: true });
        }
        let backend = self.clone();
        let (of, circuit) = (target.clone(), circuit.copied());
        let step = move |asks: Vec<()>| {
            let (backend, target) = (backend.clone(), of.clone());
            async move {
                let start = backend.fresh_gates.read_start();
                let read = backend.gate_once(&target, circuit.as_ref()).await;
                if let Ok((TargetGate { live: true, .. }, CircuitRead::Closed)) = read {
                    backend.fresh_gates.note(&target, start, tokio::time::Instant::now());
                }
                vec![read.map(|(gate, _)| gate); asks.len()]
            }
        };
        self.gates
            .call(target.as_str(), (), step)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("gate read abandoned".into())))
    }

    async fn gate_once(
        &self,
        target: &AgentId,
        circuit: Option<&CircuitConfig>,
    ) -> Result<(TargetGate, CircuitRead), StoreError> {
        let mut invocation = self.scripts.gate.prepare_invoke();
        invocation.key(key(target, "owners")).key(key(target, "circuit"));
        for arg in circuit_args(circuit) {
            invocation.arg(arg);
        }
        let (live, admits, closed): (i64, i64, i64) =
            invocation.invoke_async(&mut self.con()).await.map_err(unavailable)?;
        let circuit = if closed == 1 { CircuitRead::Closed } else { CircuitRead::NotClosed };
        Ok((TargetGate { live: live > 0, circuit_admits: admits == 1 }, circuit))
    }

    /// Queues `admission` for its chain and makes sure one committer task runs for the chain:
    /// it commits everything queued, in batches, until none is left, so a decision never waits
    /// for more than the batches ahead of it. The committer is its own task, so a caller that
    /// goes away (a cancelled RPC) neither strands its queued decision nor cuts a batch of
    /// other callers' decisions in half.
    ///
    /// One committer per chain, not one task per decision: tasks that each waited for the
    /// commit lock piled up faster than the one-per-round-trip rate at which they could take
    /// it (about 1 KB each: 1.36 GiB after 1.1 M messages under load).
    pub(in crate::store) async fn admit(
        &self,
        admission: Admission,
        circuit: Option<&CircuitConfig>,
    ) -> Result<Admitted, StoreError> {
        let writer = self.writers.get(&admission.chain);
        let chain = admission.chain.clone();
        let (done, outcome) = oneshot::channel();
        writer.waiting.lock().unwrap_or_else(PoisonError::into_inner).push(Waiting { admission, done });
        if !writer.committing.swap(true, Ordering::AcqRel) {
            let backend = self.clone();
            let circuit = circuit.copied();
            tokio::spawn(async move { backend.commit_queued(&chain, &writer, circuit.as_ref()).await });
        }
        outcome.await.unwrap_or_else(|_| Err(StoreError::Unavailable("audit commit abandoned".into())))
    }

    /// The committer of one chain: commits what is queued until nothing is, then stands down.
    /// A decision queued just as it stands down is not stranded: either its caller sees the
    /// flag cleared and starts a new committer, or this one sees the decision and goes on.
    async fn commit_queued(&self, chain: &AgentId, writer: &ChainWriter, circuit: Option<&CircuitConfig>) {
        let mut head = writer.head.lock().await;
        loop {
            let batch: Vec<Waiting> = {
                let mut waiting = writer.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                let take = waiting.len().min(MAX_BATCH);
                waiting.drain(..take).collect()
            };
            if batch.is_empty() {
                let empty = || writer.waiting.lock().unwrap_or_else(PoisonError::into_inner).is_empty();
                if keep_committing(&writer.committing, empty) {
                    continue;
                }
                return;
            }
            self.commit_batch(chain, &mut head, batch, circuit).await;
        }
    }

    async fn commit_batch(
        &self,
        chain: &AgentId,
        head: &mut KnownHead,
        batch: Vec<Waiting>,
        circuit: Option<&CircuitConfig>,
    ) {
        let (mut items, senders): (Vec<Admission>, Vec<_>) = batch.into_iter().map(|w| (w.admission, w.done)).unzip();
        for item in &mut items {
            if !item.record.decision.is_routable() {
                item.envelope = None;
            }
        }
        let result = self.commit_admissions(chain, head, &mut items, circuit).await;
        if result.is_err() {
            // The script may or may not have run: learn the head afresh next time.
            *head = None;
        }
        match result {
            Ok(results) => {
                for (sender, admitted) in senders.into_iter().zip(results) {
                    let _ = sender.send(Ok(admitted));
                }
            }
            Err(err) => {
                if err == StoreError::AuditFull {
                    tracing::error!(%chain, "audit chain full: messages recorded in it are refused until it is archived");
                }
                for sender in senders {
                    let _ = sender.send(Err(err.clone()));
                }
            }
        }
    }

    async fn commit_admissions(
        &self,
        chain: &AgentId,
        head: &mut KnownHead,
        items: &mut [Admission],
        circuit: Option<&CircuitConfig>,
    ) -> Result<Vec<Admitted>, StoreError> {
        // A session of this broker waiting for the chain's agent's work gets what is queued
        // here claimed for it in the same step.
        let routes = items.iter().any(|item| item.envelope.is_some());
        let hand_off = if routes { self.seats.take_for_work(chain) } else { None };
        for _ in 0..MAX_RELINKS {
            let mut links = Chain::resume(head.clone().flatten());
            let (linked, texts): (Vec<AuditRecord>, Vec<String>) =
                items.iter().map(|i| links.append_json(i.record.clone())).unzip();
            let new_head = links.head().unwrap_or_default().to_string();
            let mut invocation = self.scripts.admit.prepare_invoke();
            invocation
                .key(key(chain, "audit"))
                .key(key(chain, "audit:head"))
                .key(key(chain, "circuit"))
                .key(key(chain, "work"))
                .key(key(chain, "work:delayed"));
            invocation.arg(expected_arg(head)).arg(self.max_queue_len).arg(self.max_audit_records).arg(channel(chain));
            for arg in circuit_args(circuit) {
                invocation.arg(arg);
            }
            invocation.arg(&new_head);
            self.add_hand_off(&mut invocation, hand_off.as_ref());
            for (item, json) in items.iter().zip(texts) {
                let envelope = item.envelope.as_deref().unwrap_or("");
                invocation.arg(if item.envelope.is_some() { "1" } else { "0" }).arg(json).arg(envelope);
            }
            let reply: Vec<Value> = match invocation.invoke_async(&mut self.con()).await {
                Ok(reply) => reply,
                Err(err) => {
                    let err = unavailable(err);
                    handoff::hand(hand_off, || Err(err.clone()));
                    return Err(err);
                }
            };
            let mut reply = reply.into_iter();
            match reply.next().map(text).as_deref() {
                Some("ok") => {
                    *head = Some(Some(new_head));
                    let admitted = linked
                        .into_iter()
                        .zip(reply.by_ref().map(text))
                        .map(|(record, id)| Admitted {
                            record,
                            entry: (!id.is_empty()).then(|| EntryId::new(format!("w:{id}"))),
                        })
                        .collect();
                    handoff::hand(hand_off, || claim_answer(reply.collect()));
                    return Ok(admitted);
                }
                Some("head") => *head = Some(stored_head(reply.next().map(text).unwrap_or_default())),
                Some("full") => return Err(StoreError::AuditFull),
                Some("refused") => {
                    let rest: Vec<String> = reply.map(text).collect();
                    for pair in rest.chunks_exact(2) {
                        let Some(item) = pair[0].parse::<usize>().ok().and_then(|i| items.get_mut(i.wrapping_sub(1)))
                        else {
                            continue;
                        };
                        let decision =
                            if pair[1] == "queue_full" { Decision::QueueFull } else { Decision::CircuitOpen };
                        item.record.refuse(decision, &pair[1]);
                        item.envelope = None;
                    }
                }
                _ => return Err(StoreError::Unavailable("malformed admission reply".into())),
            }
        }
        Err(StoreError::Unavailable("audit chain kept moving; commit abandoned".into()))
    }

    /// Runs `attempt` (a compare-and-append against `head`) until the head it linked to is
    /// the stored one; returns what the successful attempt returned.
    pub(super) async fn with_chain_head<T, F, Fut>(
        chain: &AsyncMutex<KnownHead>,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(KnownHead) -> Fut,
        Fut: std::future::Future<Output = Result<Linked<T>, StoreError>>,
    {
        let mut head = chain.lock().await;
        for _ in 0..MAX_RELINKS {
            match attempt(head.clone()).await {
                Ok(Linked::Done { value, new_head }) => {
                    if let Some(new_head) = new_head {
                        *head = Some(Some(new_head));
                    }
                    return Ok(value);
                }
                Ok(Linked::Moved(actual)) => *head = Some(actual),
                Err(err) => {
                    *head = None;
                    return Err(err);
                }
            }
        }
        Err(StoreError::Unavailable("audit chain kept moving; commit abandoned".into()))
    }

    pub(in crate::store) async fn append_security(&self, event: SecurityEvent) -> Result<SecurityEvent, StoreError> {
        let keys = ChainKeys::security();
        Self::with_chain_head(&self.writers.security, |head| {
            let mut links = Chain::resume(head.clone().flatten());
            let (linked, json) = links.append_json(event.clone());
            let new_head = links.head().unwrap_or_default().to_string();
            let (stream, head_key) = (keys.stream.clone(), keys.head.clone());
            async move {
                let reply: Vec<String> = self
                    .scripts
                    .audit_append
                    .key(stream)
                    .key(head_key)
                    .arg(expected_arg(&head))
                    .arg(json)
                    .arg(&new_head)
                    .arg(self.max_audit_records)
                    .invoke_async(&mut self.con())
                    .await
                    .map_err(unavailable)?;
                match reply.first().map(String::as_str) {
                    Some("ok") => Ok(Linked::Done { value: linked, new_head: Some(new_head) }),
                    Some("head") => Ok(Linked::Moved(stored_head(reply.get(1).cloned().unwrap_or_default()))),
                    Some("full") => Err(StoreError::AuditFull),
                    _ => Err(StoreError::Unavailable("malformed audit reply".into())),
                }
            }
        })
        .await
    }

    /// The chain writer of `chain`: its admission queue, its reply queue (`replies.rs`) and
    /// the head lock both committers take.
    pub(super) fn chain_writer(&self, chain: &AgentId) -> Arc<ChainWriter> {
        self.writers.get(chain)
    }

    pub(in crate::store) async fn audit_chain(
        &self,
        chain: &AgentId,
    ) -> Result<ChainSnapshot<AuditRecord>, StoreError> {
        self.read_chain(&ChainKeys::of(chain), usize::MAX).await
    }

    pub(in crate::store) async fn security_chain(&self) -> Result<ChainSnapshot<SecurityEvent>, StoreError> {
        self.read_chain(&ChainKeys::security(), usize::MAX).await
    }

    pub(in crate::store) async fn audit_len(&self, chain: &AgentId) -> Result<usize, StoreError> {
        redis::cmd("XLEN").arg(key(chain, "audit")).query_async(&mut self.con()).await.map_err(unavailable)
    }

    /// Read in pages of plain `XRANGE`s, like a whole chain: one script returning an
    /// archive batch (10 000 records, ~5 MB) held Redis for ~24 ms, stalling every other
    /// client meanwhile.
    pub(in crate::store) async fn audit_oldest(
        &self,
        chain: &AgentId,
        limit: usize,
    ) -> Result<ChainSnapshot<AuditRecord>, StoreError> {
        self.read_chain(&ChainKeys::of(chain), limit).await
    }

    pub(in crate::store) async fn trim_audit(
        &self,
        chain: &AgentId,
        count: usize,
        last: &AuditRecord,
    ) -> Result<Option<Checkpoint>, StoreError> {
        let keys = ChainKeys::of(chain);
        let (json, hash) = last.canonical();
        let reply: Vec<String> = self
            .scripts
            .audit_trim
            .key(&keys.stream)
            .key(&keys.checkpoint)
            .arg(count)
            .arg(json)
            .arg(hash)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let mut items = reply.into_iter();
        let archived = items.next();
        Ok(archived.map(|archived| checkpoint(Some(archived), items.next())))
    }

    /// Reads a chain up to a consistent point (its head, last entry and checkpoint, taken
    /// together), in pages. If an archiver moved the checkpoint meanwhile the read starts
    /// over, so the records always continue from the checkpoint returned. A record that does
    /// not parse is an error: verification must not skip it.
    async fn read_chain<T: serde::de::DeserializeOwned>(
        &self,
        keys: &ChainKeys,
        limit: usize,
    ) -> Result<ChainSnapshot<T>, StoreError> {
        for _ in 0..MAX_RELINKS {
            let (snapshot, last) = self.chain_tail(keys).await?;
            let records = self.read_records(&keys.stream, &last, limit).await?;
            let (again, _) = self.chain_tail::<T>(keys).await?;
            if again.checkpoint == snapshot.checkpoint {
                return Ok(ChainSnapshot { records, ..snapshot });
            }
        }
        Err(StoreError::Unavailable("audit chain kept being archived during the read".into()))
    }

    /// The head and checkpoint of a chain, and the id of its newest live entry.
    async fn chain_tail<T>(&self, keys: &ChainKeys) -> Result<(ChainSnapshot<T>, String), StoreError> {
        let tail: Vec<String> = self
            .scripts
            .audit_tail
            .key(&keys.stream)
            .key(&keys.head)
            .key(&keys.checkpoint)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let mut items = tail.into_iter();
        let head = stored_head(items.next().unwrap_or_default());
        let last = items.next().unwrap_or_default();
        let checkpoint = checkpoint(items.next(), items.next());
        Ok((ChainSnapshot { records: Vec::new(), head, checkpoint }, last))
    }

    /// The oldest `limit` records of `stream` up to and including entry `last`, oldest first.
    async fn read_records<T: serde::de::DeserializeOwned>(
        &self,
        stream: &str,
        last: &str,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        let mut records = Vec::new();
        if last.is_empty() {
            return Ok(records);
        }
        let mut from = "-".to_string();
        while records.len() < limit {
            let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(stream)
                .arg(&from)
                .arg(last)
                .arg("COUNT")
                .arg(READ_PAGE.min(limit - records.len()))
                .query_async(&mut self.con())
                .await
                .map_err(unavailable)?;
            let Some((last_id, _)) = page.last() else { break };
            from = format!("({last_id}");
            let done = last_id == last;
            for (_, fields) in page {
                let json = fields.into_iter().find(|(k, _)| k == "r").map(|(_, v)| v).unwrap_or_default();
                records.push(parse_record(stream, &json)?);
            }
            if done {
                break;
            }
        }
        Ok(records)
    }
}

fn parse_record<T: serde::de::DeserializeOwned>(stream: &str, json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Unavailable(format!("an audit entry of {stream} is unreadable: {e}")))
}

fn checkpoint(archived: Option<String>, base: Option<String>) -> Checkpoint {
    Checkpoint { archived: archived.and_then(|a| a.parse().ok()).unwrap_or(0), base: base.filter(|b| !b.is_empty()) }
}

/// The keys of one chain.
struct ChainKeys {
    stream: String,
    head: String,
    checkpoint: String,
}

impl ChainKeys {
    fn of(chain: &AgentId) -> Self {
        ChainKeys {
            stream: key(chain, "audit"),
            head: key(chain, "audit:head"),
            checkpoint: key(chain, "audit:checkpoint"),
        }
    }

    /// The security chain. `#` cannot appear in an agent id, so no agent's keys collide.
    fn security() -> Self {
        let base = "mas:{#security}:audit";
        ChainKeys { stream: base.into(), head: format!("{base}:head"), checkpoint: format!("{base}:checkpoint") }
    }
}

/// What one compare-and-append attempt found.
pub(super) enum Linked<T> {
    /// Appended; the chain's head is now `new_head` (`None`: the step appended nothing).
    Done {
        /// The step's result.
        value: T,
        /// The new head.
        new_head: Option<String>,
    },
    /// The chain's head was not the expected one; it is this.
    Moved(Option<String>),
}
