//! Waiting for work: the claim loop both backends share, and the wake-ups it waits on.
//!
//! A session claims again as soon as it has room in its window. Most of the time the claim
//! before it emptied the agent's queues, so asking the store straight away finds nothing: on
//! Redis that was one script call in two on a request/reply path. A [`ClaimCursor`] carries
//! from one claim to the next whether the last one found the queues drained and how many
//! wake-ups had happened by then; the next claim then waits for a wake-up before asking.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mas_core::delivery::QueuedMessage;
use mas_core::store::StoreError;
use tokio::sync::Notify;

/// The wake-ups of one agent's waiting claims, counted: every change that may have made work
/// claimable (a message queued, handed back, requeued, a lease given up) wakes them.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    count: AtomicU64,
    notify: Notify,
}

impl Wake {
    /// Wakes every waiting claim of the agent.
    pub(crate) fn wake(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

/// What one claim of a session tells the next: that it found every queue of the session
/// drained, and how many wake-ups of `wake` had happened before it asked. Opaque; a fresh
/// cursor (the default) says nothing, so its claim asks the store at once.
#[derive(Debug, Default)]
pub struct ClaimCursor {
    drained: Option<(Arc<Wake>, u64)>,
}

impl ClaimCursor {
    /// The wake-up count at which the last claim found the queues drained, if it was taken
    /// on this very `wake` (a cursor from another counter says nothing about this one).
    fn drained_at(&self, wake: &Arc<Wake>) -> Option<u64> {
        match &self.drained {
            Some((seen_on, count)) if Arc::ptr_eq(seen_on, wake) => Some(*count),
            _ => None,
        }
    }
}

/// A claim's outcome: what it claimed, and the cursor for the session's next claim.
pub type Claimed = (Vec<QueuedMessage>, ClaimCursor);

/// The claim loop: returns the first non-empty batch `attempt` gives, or an empty one once
/// `max_wait` has passed (after at least one attempt).
///
/// - When `cursor` says the last claim drained the queues and no wake-up came since, it first
///   waits for one (or for `poll`, or `max_wait`) before asking the store.
/// - Between empty attempts it sleeps until a wake-up, the earliest delayed entry
///   (`attempt`'s hint), `poll` or `max_wait`, whichever comes first.
///
/// The wake-up count is read before each attempt, so work queued after the store answered
/// always moves the count past what the cursor holds: no wake-up can be missed. A wake-up
/// for work the attempt did already see costs one empty attempt, nothing more. `own` also
/// ends a wait: the claim's own signal (Redis: a hand-off left work in its seat), which
/// wakes it alone rather than every claim of the agent.
/// Cancel-safe as long as `attempt` is (each backend's attempt is one atomic step).
pub(crate) async fn claim_waiting<F, Fut>(
    wake: Arc<Wake>,
    own: Option<&Notify>,
    cursor: ClaimCursor,
    max: usize,
    max_wait: Duration,
    poll: Duration,
    mut attempt: F,
) -> Result<Claimed, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<QueuedMessage>, Option<Duration>), StoreError>>,
{
    let give_up = tokio::time::Instant::now() + max_wait;
    if let Some(seen) = cursor.drained_at(&wake) {
        let notified = wake.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if wake.count() == seen {
            woken_or(notified, own, (tokio::time::Instant::now() + poll).min(give_up)).await;
        }
    }
    loop {
        let notified = wake.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let seen = wake.count();
        let (batch, next_ready) = attempt().await?;
        let now = tokio::time::Instant::now();
        if !batch.is_empty() || now >= give_up {
            // Fewer than asked for and nothing delayed: every queue was empty when the store
            // answered. A delayed entry keeps the next claim asking at once, to learn when.
            let drained = batch.len() < max && next_ready.is_none();
            let cursor = ClaimCursor { drained: drained.then(|| (wake.clone(), seen)) };
            return Ok((batch, cursor));
        }
        let mut until = (now + poll).min(give_up);
        if let Some(delay) = next_ready {
            until = until.min(now + delay);
        }
        woken_or(notified, own, until).await;
    }
}

/// Waits for `notified` (enabled beforehand, so a wake-up in between is not missed), for
/// `own` (a permit it stored counts), or for `until`, whichever comes first.
async fn woken_or(
    notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    own: Option<&Notify>,
    until: tokio::time::Instant,
) {
    let own = async {
        match own {
            Some(own) => own.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = notified => {}
        _ = own => {}
        _ = tokio::time::sleep_until(until) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use mas_core::delivery::EntryId;

    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    fn message(seq: u64) -> QueuedMessage {
        QueuedMessage { entry: EntryId::from_seq(seq), envelope: Arc::from("{}"), attempt: 1 }
    }

    /// A queue the attempts take from, counting how often they ask.
    #[derive(Default)]
    struct Queue {
        ready: Mutex<Vec<QueuedMessage>>,
        asked: AtomicUsize,
    }

    impl Queue {
        fn put(&self, n: u64) {
            self.ready.lock().unwrap().extend((0..n).map(message));
        }

        fn asked(&self) -> usize {
            self.asked.load(Ordering::SeqCst)
        }

        async fn claim(&self, wake: &Arc<Wake>, cursor: ClaimCursor, max: usize, max_wait: Duration) -> Claimed {
            claim_waiting(wake.clone(), None, cursor, max, max_wait, LONG, || async {
                self.asked.fetch_add(1, Ordering::SeqCst);
                let mut ready = self.ready.lock().unwrap();
                let n = ready.len().min(max);
                Ok((ready.drain(..n).collect(), None))
            })
            .await
            .unwrap()
        }
    }

    /// Gives other tasks time to run (a waiting claim must not have asked in the meantime).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_fresh_cursor_asks_the_store_at_once() {
        let (queue, wake) = (Queue::default(), Arc::new(Wake::default()));
        queue.put(1);
        let (batch, _) = queue.claim(&wake, ClaimCursor::default(), 4, LONG).await;
        assert_eq!((batch.len(), queue.asked()), (1, 1));
    }

    #[tokio::test]
    async fn after_a_drained_claim_the_next_waits_for_a_wake_up_before_asking() {
        let queue = Arc::new(Queue::default());
        let wake = Arc::new(Wake::default());
        queue.put(1);
        let (_, cursor) = queue.claim(&wake, ClaimCursor::default(), 4, LONG).await;
        assert_eq!(queue.asked(), 1);
        let next = tokio::spawn({
            let (queue, wake) = (queue.clone(), wake.clone());
            async move { queue.claim(&wake, cursor, 4, LONG).await.0.len() }
        });
        settle().await;
        assert_eq!(queue.asked(), 1, "no wake-up yet: the store is not asked");
        queue.put(2);
        wake.wake();
        assert_eq!(next.await.unwrap(), 2);
        assert_eq!(queue.asked(), 2);
    }

    #[tokio::test]
    async fn a_wake_up_between_claims_makes_the_next_ask_at_once() {
        let (queue, wake) = (Queue::default(), Arc::new(Wake::default()));
        let (_, cursor) = queue.claim(&wake, ClaimCursor::default(), 4, Duration::ZERO).await;
        queue.put(1);
        wake.wake();
        let (batch, _) = queue.claim(&wake, cursor, 4, LONG).await;
        assert_eq!((batch.len(), queue.asked()), (1, 2));
    }

    #[tokio::test]
    async fn a_wake_up_while_the_store_answers_is_not_missed() {
        // The work arrives (and wakes) after the store looked but before the claim returned.
        let (queue, wake) = (Arc::new(Queue::default()), Arc::new(Wake::default()));
        let (_, cursor) =
            claim_waiting(wake.clone(), None, ClaimCursor::default(), 4, Duration::ZERO, LONG, || async {
                queue.put(1);
                wake.wake();
                Ok((Vec::new(), None))
            })
            .await
            .unwrap();
        let (batch, _) = queue.claim(&wake, cursor, 4, LONG).await;
        assert_eq!(batch.len(), 1);
    }

    #[tokio::test]
    async fn a_full_batch_or_a_delayed_entry_keeps_the_next_claim_asking_at_once() {
        let (queue, wake) = (Queue::default(), Arc::new(Wake::default()));
        queue.put(3);
        let (batch, cursor) = queue.claim(&wake, ClaimCursor::default(), 2, LONG).await;
        assert_eq!(batch.len(), 2, "a full batch: more may be waiting");
        let (batch, _) = queue.claim(&wake, cursor, 2, LONG).await;
        assert_eq!((batch.len(), queue.asked()), (1, 2));

        let (_, cursor) =
            claim_waiting(wake.clone(), None, ClaimCursor::default(), 2, Duration::ZERO, LONG, || async {
                Ok((Vec::new(), Some(Duration::from_millis(5))))
            })
            .await
            .unwrap();
        assert_eq!(cursor.drained_at(&wake), None, "a delayed entry: the next claim must learn when it is due");
    }

    #[tokio::test]
    async fn a_cursor_from_another_agent_says_nothing() {
        let (queue, wake, other) = (Queue::default(), Arc::new(Wake::default()), Arc::new(Wake::default()));
        let (_, cursor) = queue.claim(&other, ClaimCursor::default(), 4, Duration::ZERO).await;
        assert!(cursor.drained_at(&other).is_some());
        queue.put(1);
        let (batch, _) = queue.claim(&wake, cursor, 4, LONG).await;
        assert_eq!(batch.len(), 1);
    }

    #[tokio::test]
    async fn an_idle_claim_asks_once_when_it_gives_up() {
        let (queue, wake) = (Queue::default(), Arc::new(Wake::default()));
        let (_, cursor) = queue.claim(&wake, ClaimCursor::default(), 4, Duration::ZERO).await;
        let (batch, cursor) = queue.claim(&wake, cursor, 4, Duration::from_millis(30)).await;
        assert!(batch.is_empty());
        assert_eq!(queue.asked(), 2, "one ask at the end of the wait, none before it");
        assert!(cursor.drained_at(&wake).is_some());
    }
}
