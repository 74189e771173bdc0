//! Requests awaiting replies, and replies that arrived before their request was registered.
//!
//! A reply is accepted only from the request's target; anything else is dropped and the
//! request keeps waiting for the legitimate replier.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mas_core::envelope::Envelope;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Replies kept for requests not registered yet (the Request RPC's answer and the reply race).
const EARLY_MAX_ENTRIES: usize = 1024;
/// How long an early reply waits for its request.
const EARLY_TTL: Duration = Duration::from_secs(30);

struct Pending {
    target: String,
    reply: oneshot::Sender<Envelope>,
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<String, Pending>,
    early: VecDeque<(String, Envelope, Instant)>,
    closed: bool,
}

/// What happened to an incoming reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyRoute {
    /// Handed to the waiting request.
    Resolved,
    /// Kept until its request registers (or it expires).
    Buffered,
    /// From someone other than the request's target: dropped.
    Rejected,
}

/// The agent stopped; no request can wait any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// The correlation table of one agent.
#[derive(Default)]
pub(crate) struct Correlations {
    inner: Mutex<Inner>,
}

impl Correlations {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the reply to `correlation_id` from `target`. An early reply from the target
    /// is claimed at once, whatever its age.
    pub(crate) fn register(&self, correlation_id: &str, target: &str) -> Result<oneshot::Receiver<Envelope>, Closed> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Closed);
        }
        let (tx, rx) = oneshot::channel();
        let early = inner.early.iter().position(|(cid, env, _)| cid == correlation_id && env.sender_id == target);
        if let Some(i) = early.and_then(|i| inner.early.remove(i)) {
            let _ = tx.send(i.1);
            return Ok(rx);
        }
        inner.pending.insert(correlation_id.to_string(), Pending { target: target.to_string(), reply: tx });
        Ok(rx)
    }

    /// Stops waiting for `correlation_id` (timeout, cancellation or success).
    pub(crate) fn unregister(&self, correlation_id: &str) {
        self.lock().pending.remove(correlation_id);
    }

    /// Routes an incoming reply envelope.
    pub(crate) fn deliver(&self, correlation_id: &str, reply: Envelope) -> ReplyRoute {
        let mut inner = self.lock();
        match inner.pending.get(correlation_id) {
            Some(p) if p.target != reply.sender_id => {
                tracing::warn!(sender = %reply.sender_id, expected = %p.target, "rejected reply with unexpected sender");
                ReplyRoute::Rejected
            }
            Some(_) => {
                if let Some(p) = inner.pending.remove(correlation_id) {
                    let _ = p.reply.send(reply);
                }
                ReplyRoute::Resolved
            }
            None => {
                let now = Instant::now();
                inner.early.retain(|(_, _, at)| now.duration_since(*at) < EARLY_TTL);
                if inner.early.len() >= EARLY_MAX_ENTRIES {
                    inner.early.pop_front();
                }
                inner.early.push_back((correlation_id.to_string(), reply, now));
                ReplyRoute::Buffered
            }
        }
    }

    /// Fails every waiting request and refuses new ones (the agent is stopping).
    pub(crate) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.pending.clear();
        inner.early.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(from: &str) -> Envelope {
        Envelope::from_json(&format!(
            r#"{{"sender_id":"{from}","target_id":"a","message_type":"r","data":{{}},"timestamp":0,"message_id":"m"}}"#
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn resolves_only_from_the_target() {
        let c = Correlations::default();
        let rx = c.register("c1", "bob").unwrap();
        assert_eq!(c.deliver("c1", reply("mallory")), ReplyRoute::Rejected);
        assert_eq!(c.deliver("c1", reply("bob")), ReplyRoute::Resolved);
        assert_eq!(rx.await.unwrap().sender_id, "bob");
    }

    #[tokio::test]
    async fn early_reply_is_claimed_only_by_its_target() {
        let c = Correlations::default();
        assert_eq!(c.deliver("c1", reply("mallory")), ReplyRoute::Buffered);
        assert_eq!(c.deliver("c1", reply("bob")), ReplyRoute::Buffered);
        let rx = c.register("c1", "bob").unwrap();
        assert_eq!(rx.await.unwrap().sender_id, "bob");
        let mut rx2 = c.register("c2", "bob").unwrap();
        assert!(rx2.try_recv().is_err(), "nothing buffered for c2");
    }

    #[tokio::test]
    async fn close_fails_waiters_and_refuses_new_ones() {
        let c = Correlations::default();
        let rx = c.register("c1", "bob").unwrap();
        c.close();
        assert!(rx.await.is_err());
        assert_eq!(c.register("c2", "bob").err(), Some(Closed));
    }

    #[tokio::test]
    async fn early_buffer_is_bounded() {
        let c = Correlations::default();
        for i in 0..(EARLY_MAX_ENTRIES + 10) {
            c.deliver(&format!("c{i}"), reply("bob"));
        }
        assert_eq!(c.lock().early.len(), EARLY_MAX_ENTRIES);
    }
}
