//! Replies of the Redis backend, group-committed per requester: whoever finds no committer
//! running for the requester's chain starts one, and it commits every reply queued so far in
//! one script call (`--@commit_replies`), under the chain's head lock that admissions to the
//! same chain take too. Concurrent replies to one requester — a client with many requests in
//! flight — cost one round trip together instead of one each behind the lock.
//!
//! A reply the script refuses (answered already, expired, unknown, queue full) is answered
//! with that outcome and the rest of the batch is re-linked and retried, as admissions are.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use mas_core::ids::AgentId;
use mas_core::policy::audit::{AuditRecord, Chain};
use mas_core::store::{PendingRequest, QueueKey, ReplyCommit, ReplyError, ReplyReceipt, StoreError};
use redis::Value;
use tokio::sync::oneshot;

use super::audit::{ChainWriter, KnownHead, MAX_BATCH, MAX_RELINKS, expected_arg, keep_committing, stored_head};
use super::{RedisBackend, channel, claim_answer, handoff, key, text, unavailable};

/// What a reply's committer answers its caller.
pub(super) type ReplyOutcome = Result<Result<(ReplyCommit, Option<AuditRecord>), ReplyError>, StoreError>;

/// A reply to commit: the pending request it answers and what it commits.
pub(super) struct ReplyToCommit {
    pub correlation_id: String,
    pub expected: PendingRequest,
    pub receipt: ReplyReceipt,
    pub envelope: Arc<str>,
    pub record: AuditRecord,
}

/// A reply waiting for its chain's committer.
pub(super) struct WaitingReply {
    reply: ReplyToCommit,
    done: oneshot::Sender<ReplyOutcome>,
}

impl RedisBackend {
    /// Queues a reply for its requester's committer and waits for the outcome.
    pub(super) async fn commit_reply_grouped(&self, reply: ReplyToCommit) -> ReplyOutcome {
        let requester = reply.expected.requester.clone();
        let writer = self.chain_writer(&requester);
        let (done, outcome) = oneshot::channel();
        writer.replies.lock().unwrap_or_else(PoisonError::into_inner).push(WaitingReply { reply, done });
        if !writer.committing_replies.swap(true, Ordering::AcqRel) {
            let backend = self.clone();
            tokio::spawn(async move { backend.commit_queued_replies(&requester, &writer).await });
        }
        outcome.await.unwrap_or_else(|_| Err(StoreError::Unavailable("reply commit abandoned".into())))
    }

    /// The reply committer of one chain: commits what is queued until nothing is (see
    /// [`keep_committing`] for how it stands down).
    async fn commit_queued_replies(&self, requester: &AgentId, writer: &ChainWriter) {
        loop {
            let batch = take_batch(writer);
            if batch.is_empty() {
                let empty = || writer.replies.lock().unwrap_or_else(PoisonError::into_inner).is_empty();
                if keep_committing(&writer.committing_replies, empty) {
                    continue;
                }
                return;
            }
            let mut head = writer.head.lock().await;
            let result = self.commit_replies(requester, &mut head, batch).await;
            if let Err((err, batch)) = result {
                // The script may or may not have run: learn the head afresh next time.
                *head = None;
                for waiting in batch {
                    let _ = waiting.done.send(Err(err.clone()));
                }
            }
        }
    }

    /// Commits `batch`, answering each reply; on a store failure hands the unanswered ones
    /// back with the error.
    async fn commit_replies(
        &self,
        requester: &AgentId,
        head: &mut KnownHead,
        mut batch: Vec<WaitingReply>,
    ) -> Result<(), (StoreError, Vec<WaitingReply>)> {
        // The requester's session that asked first, if it waits, gets its reply claimed for
        // it in the same step.
        let asking = batch.first().map(|waiting| waiting.reply.expected.requester_instance.clone());
        let hand_off = asking.and_then(|instance| self.seats.take_for_replies(requester, &instance));
        for _ in 0..MAX_RELINKS {
            if batch.is_empty() {
                return Ok(());
            }
            let mut links = Chain::resume(head.clone().flatten());
            let (linked, texts): (Vec<AuditRecord>, Vec<String>) =
                batch.iter().map(|w| links.append_json(w.reply.record.clone())).unzip();
            let new_head = links.head().unwrap_or_default().to_string();
            let mut invocation = self.scripts.commit_replies.prepare_invoke();
            invocation
                .key(key(requester, "audit"))
                .key(key(requester, "audit:head"))
                .key(key(requester, "pending_index"));
            for WaitingReply { reply, .. } in &batch {
                let (replies, delayed) =
                    Self::queue_keys(&QueueKey::Replies(requester.clone(), reply.expected.requester_instance.clone()));
                invocation
                    .key(key(requester, &format!("pending:{}", reply.correlation_id)))
                    .key(key(requester, &format!("receipt:{}", reply.correlation_id)))
                    .key(replies)
                    .key(delayed);
            }
            invocation
                .arg(requester.as_str())
                .arg(expected_arg(head))
                .arg(&new_head)
                .arg(self.max_audit_records)
                .arg(self.max_queue_len)
                .arg(channel(requester));
            self.add_hand_off(&mut invocation, hand_off.as_ref());
            for (WaitingReply { reply, .. }, json) in batch.iter().zip(texts) {
                invocation
                    .arg(reply.expected.requester_instance.as_str())
                    .arg(reply.expected.target.as_str())
                    .arg(reply.receipt.sender.as_str())
                    .arg(&reply.receipt.fingerprint)
                    .arg(&reply.receipt.message_id)
                    .arg(&*reply.envelope)
                    .arg(json)
                    .arg(&reply.correlation_id);
            }
            let answer: Vec<Value> = match invocation.invoke_async(&mut self.con()).await {
                Ok(answer) => answer,
                Err(err) => {
                    let err = unavailable(err);
                    handoff::hand(hand_off, || Err(err.clone()));
                    return Err((err, batch));
                }
            };
            let mut answer = answer.into_iter();
            match answer.next().map(text).as_deref() {
                Some("ok") => {
                    *head = Some(Some(new_head));
                    handoff::hand(hand_off, || claim_answer(answer.collect()));
                    for (waiting, record) in batch.into_iter().zip(linked) {
                        let commit = ReplyCommit::Queued { message_id: waiting.reply.receipt.message_id.clone() };
                        let _ = waiting.done.send(Ok(Ok((commit, Some(record)))));
                    }
                    return Ok(());
                }
                Some("head") => *head = Some(stored_head(answer.next().map(text).unwrap_or_default())),
                Some("full") => return Err((StoreError::AuditFull, batch)),
                Some("refused") => batch = answer_refused(batch, answer.map(text).collect()),
                _ => return Err((StoreError::Unavailable("malformed reply commit answer".into()), batch)),
            }
        }
        Err((StoreError::Unavailable("audit chain kept moving; commit abandoned".into()), batch))
    }
}

/// Up to [`MAX_BATCH`] waiting replies, at most one per correlation id (a second reply to the
/// same request waits for the next batch, so it sees the first one's receipt).
fn take_batch(writer: &ChainWriter) -> Vec<WaitingReply> {
    let mut waiting = writer.replies.lock().unwrap_or_else(PoisonError::into_inner);
    let mut seen = BTreeSet::new();
    let mut batch = Vec::new();
    let mut later = Vec::new();
    for item in waiting.drain(..) {
        if batch.len() < MAX_BATCH && seen.insert(item.reply.correlation_id.clone()) {
            batch.push(item);
        } else {
            later.push(item);
        }
    }
    *waiting = later;
    batch
}

/// Answers the replies the script refused (`refused` is its triples: 1-based index, outcome,
/// message id) and returns the rest, in order, for the retry.
fn answer_refused(batch: Vec<WaitingReply>, refused: Vec<String>) -> Vec<WaitingReply> {
    let mut outcomes = std::collections::BTreeMap::new();
    for triple in refused.chunks_exact(3) {
        if let Ok(index) = triple[0].parse::<usize>() {
            outcomes.insert(index.wrapping_sub(1), (triple[1].clone(), triple[2].clone()));
        }
    }
    let mut rest = Vec::new();
    for (index, waiting) in batch.into_iter().enumerate() {
        let Some((outcome, message_id)) = outcomes.remove(&index) else {
            rest.push(waiting);
            continue;
        };
        let answer = match outcome.as_str() {
            "already" => Ok((ReplyCommit::AlreadyQueued { message_id }, None)),
            "expired" => Err(ReplyError::Expired),
            "unknown" => Err(ReplyError::Unknown),
            _ => Err(ReplyError::Completed),
        };
        let _ = waiting.done.send(Ok(answer));
    }
    rest
}
