//! Targets whose gate read "live, circuit admits" moments ago, so that the next admissions to
//! them within [`FRESH_FOR`] skip the read: one Redis round trip fewer on the send path, where
//! it is one of three in a row (gate, rate, admit) that bound a producer's throughput.
//!
//! What a client can and cannot tell apart:
//! - Only the all-clear answer is kept: a live session and a closed circuit. "No live
//!   session", an open or half-open circuit are read again every time, so a target that comes
//!   online, or a circuit that closes, is seen at once.
//! - The circuit is decided again, atomically, by the admission script itself; the gate's
//!   answer only lets a batch be refused before DLP. A settle through this broker that carries
//!   a failure forgets the target, so a circuit this broker opens is seen at once.
//! - Liveness is a lease, which outlives a crashed session by up to its TTL (seconds); a
//!   graceful end or an operator's revocation through this broker forgets the target at once
//!   ([`FreshGates::forget`]).
//! - Left over, for at most [`FRESH_FOR`], is what *another* broker sharing the store does: a
//!   session there ends gracefully (a message to it is queued, as one sent that much earlier
//!   would have been, and delivered when the agent is back), or its settle opens the circuit
//!   (a message that DLP also blocks is recorded `DLP_BLOCKED` rather than `CIRCUIT_OPEN`;
//!   every other one is refused `circuit_open` by the admission script as before).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mas_core::ids::AgentId;
use tokio::time::Instant;

/// How long an all-clear gate answer is used without reading it again.
pub(super) const FRESH_FOR: Duration = Duration::from_millis(20);

/// Above this many remembered targets, stale ones are dropped before another is added.
const PRUNE_ABOVE: usize = 4096;

/// When each target's gate last read all clear.
#[derive(Debug, Default)]
pub(super) struct FreshGates {
    inner: Mutex<Answers>,
}

#[derive(Debug, Default)]
struct Answers {
    read_at: HashMap<AgentId, Instant>,
    /// Answers forgotten so far (a session ended, a failure settled): a read that started
    /// before one of them may have seen the state it replaced.
    forgotten: u64,
}

/// Where a gate read started, for [`FreshGates::note`].
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadStart(u64);

impl FreshGates {
    /// Whether `target`'s gate read all clear less than [`FRESH_FOR`] before `now`.
    pub(super) fn is_fresh(&self, target: &AgentId, now: Instant) -> bool {
        let answers = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        answers.read_at.get(target).is_some_and(|at| now.saturating_duration_since(*at) < FRESH_FOR)
    }

    /// Taken before a gate read starts.
    pub(super) fn read_start(&self) -> ReadStart {
        ReadStart(self.inner.lock().unwrap_or_else(PoisonError::into_inner).forgotten)
    }

    /// Notes that a read of `target`'s gate begun at `start` has read all clear by `now` —
    /// unless a session ended meanwhile, when the read may predate the end.
    pub(super) fn note(&self, target: &AgentId, start: ReadStart, now: Instant) {
        let mut answers = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if answers.forgotten != start.0 {
            return;
        }
        if answers.read_at.len() >= PRUNE_ABOVE {
            answers.read_at.retain(|_, at| now.saturating_duration_since(*at) < FRESH_FOR);
        }
        answers.read_at.insert(target.clone(), now);
    }

    /// Forgets `agent`'s answer: one of its sessions ends through this broker, or a failure of
    /// one of its messages was settled (its circuit may have opened).
    pub(super) fn forget(&self, agent: &AgentId) {
        let mut answers = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        answers.read_at.remove(agent);
        answers.forgotten += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bob() -> AgentId {
        AgentId::new("bob").unwrap()
    }

    #[test]
    fn an_answer_is_fresh_for_its_period_and_forgotten_on_request() {
        let (gates, t0) = (FreshGates::default(), Instant::now());
        assert!(!gates.is_fresh(&bob(), t0), "never read");
        gates.note(&bob(), gates.read_start(), t0);
        assert!(gates.is_fresh(&bob(), t0));
        assert!(gates.is_fresh(&bob(), t0 + FRESH_FOR - Duration::from_millis(1)));
        assert!(!gates.is_fresh(&bob(), t0 + FRESH_FOR), "stale after FRESH_FOR");
        gates.forget(&bob());
        assert!(!gates.is_fresh(&bob(), t0), "forgotten");
    }

    #[test]
    fn a_read_that_began_before_a_session_ended_is_not_kept() {
        let (gates, t0) = (FreshGates::default(), Instant::now());
        let start = gates.read_start();
        gates.forget(&AgentId::new("carol").unwrap());
        gates.note(&bob(), start, t0);
        assert!(!gates.is_fresh(&bob(), t0), "the read may have seen the ended session");
        gates.note(&bob(), gates.read_start(), t0);
        assert!(gates.is_fresh(&bob(), t0));
    }

    #[test]
    fn stale_answers_are_pruned_so_memory_stays_bounded() {
        let (gates, t0) = (FreshGates::default(), Instant::now());
        for n in 0..PRUNE_ABOVE {
            gates.note(&AgentId::new(&format!("a{n}")).unwrap(), gates.read_start(), t0);
        }
        gates.note(&bob(), gates.read_start(), t0 + FRESH_FOR);
        let remembered = gates.inner.lock().unwrap().read_at.len();
        assert_eq!(remembered, 1, "only the fresh answer is kept");
    }
}
