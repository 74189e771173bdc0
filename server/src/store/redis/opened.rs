//! Requests this broker opened and has not seen answered, so that a reply to one of them skips
//! reading its pending record: one Redis round trip fewer on the reply path, where the
//! correlation read, the rate-limit step and the commit were three in a row.
//!
//! The commit script checks everything again atomically (the record is unchanged, no reply won
//! before, the deadline has not passed) and refuses with the same status the read would have
//! led to, so what a client can tell apart is narrow:
//! - A request is trusted from memory only until [`MARGIN`] before its deadline, counted from
//!   before the pending record was written (so never past the deadline Redis holds); later
//!   replies read the record, and one past the deadline is refused `correlation_id_expired`
//!   before its policies run, as before.
//! - Any commit through this broker, whatever its outcome, forgets the request: a retry of a
//!   committed reply reads the receipt, as before.
//! - Left over is a reply through this broker to a request that a reply through *another*
//!   broker sharing the store has answered meanwhile: its policies run before the commit
//!   refuses it (or, for an identical retry, answers with the first reply's id), so it takes
//!   a rate-limit token and a DLP violation is reported as such rather than as completed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mas_core::store::PendingRequest;
use tokio::time::Instant;

/// How long before its deadline a request is read from the store again.
pub(super) const MARGIN: Duration = Duration::from_millis(250);

/// At most this many requests are remembered; beyond, replies read their records.
const MAX_REMEMBERED: usize = 100_000;

/// Pending requests by correlation id, each with the instant it stops being trusted.
#[derive(Debug, Default)]
pub(super) struct OpenedRequests {
    inner: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    by_id: HashMap<String, (PendingRequest, Instant)>,
    /// (trusted until, correlation id), to forget requests once they are not trusted.
    until: BTreeSet<(Instant, String)>,
}

impl OpenedRequests {
    /// Remembers a request that was queued; `ttl` is its deadline counted from `written`, an
    /// instant taken before its pending record was written (requests untrusted by then are
    /// dropped first).
    pub(super) fn note(&self, correlation_id: &str, pending: PendingRequest, written: Instant, ttl: Duration) {
        let Some(until) = (written + ttl).checked_sub(MARGIN) else { return };
        let mut remembered = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        remembered.forget_untrusted(written);
        if remembered.by_id.len() >= MAX_REMEMBERED {
            return;
        }
        if let Some((_, old)) = remembered.by_id.insert(correlation_id.to_string(), (pending, until)) {
            remembered.until.remove(&(old, correlation_id.to_string()));
        }
        remembered.until.insert((until, correlation_id.to_string()));
    }

    /// The pending request of `correlation_id`, if this broker opened it, has not seen it
    /// answered, and it is still trusted at `now`.
    pub(super) fn pending(&self, correlation_id: &str, now: Instant) -> Option<PendingRequest> {
        let remembered = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (pending, until) = remembered.by_id.get(correlation_id)?;
        (now < *until).then(|| pending.clone())
    }

    /// Forgets a request: a reply to it was committed or refused by the store.
    pub(super) fn forget(&self, correlation_id: &str) {
        let mut remembered = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, until)) = remembered.by_id.remove(correlation_id) {
            remembered.until.remove(&(until, correlation_id.to_string()));
        }
    }
}

impl Remembered {
    fn forget_untrusted(&mut self, now: Instant) {
        while let Some((until, _)) = self.until.first()
            && *until <= now
        {
            if let Some((_, id)) = self.until.pop_first() {
                self.by_id.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mas_core::ids::{AgentId, InstanceId};

    use super::*;

    fn pending() -> PendingRequest {
        PendingRequest {
            requester: AgentId::new("alice").unwrap(),
            requester_instance: InstanceId::new("a1").unwrap(),
            target: AgentId::new("bob").unwrap(),
        }
    }

    #[test]
    fn a_noted_request_is_trusted_until_the_margin_before_its_deadline() {
        let opened = OpenedRequests::default();
        let written = Instant::now();
        opened.note("1.alice", pending(), written, Duration::from_secs(10));
        assert_eq!(opened.pending("1.alice", written), Some(pending()));
        let untrusted = written + Duration::from_secs(10) - MARGIN;
        assert_eq!(opened.pending("1.alice", untrusted - Duration::from_millis(1)), Some(pending()));
        assert_eq!(opened.pending("1.alice", untrusted), None);
        assert_eq!(opened.pending("2.alice", written), None);
    }

    #[test]
    fn a_request_shorter_than_the_margin_is_never_trusted() {
        let opened = OpenedRequests::default();
        let written = Instant::now();
        opened.note("1.alice", pending(), written, MARGIN / 2);
        assert_eq!(opened.pending("1.alice", written), None);
    }

    #[test]
    fn a_forgotten_request_is_read_again_and_untrusted_ones_are_dropped() {
        let opened = OpenedRequests::default();
        let t0 = Instant::now();
        opened.note("1.alice", pending(), t0, Duration::from_secs(10));
        opened.forget("1.alice");
        assert_eq!(opened.pending("1.alice", t0), None);
        opened.note("2.alice", pending(), t0, Duration::from_secs(1));
        opened.note("3.alice", pending(), t0 + Duration::from_secs(2), Duration::from_secs(10));
        let remembered = opened.inner.lock().unwrap();
        let ids: Vec<&str> = remembered.until.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(ids, ["3.alice"]);
        assert_eq!(remembered.by_id.len(), 1);
    }
}
