//! Gathering concurrent calls of one step for one agent into one script call.
//!
//! While a call for a key is out, the calls that arrive for that key wait and go out together
//! in the next one. Nothing ever waits for company: a call with no other out goes out at once,
//! so concurrency 1 pays nothing, while at concurrency 32 the admission path's per-message
//! steps (each target's gate, each sender's rate limit) cost one round trip per batch instead
//! of one per message. Every call waits for a step that *starts after it arrived*, so it never
//! gets an answer older than itself.
//!
//! The steps run in a task of their own (one per key at a time, as the audit committers do),
//! so a caller that goes away never cuts a batch of other callers' answers short.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::audit::keep_committing;

/// Most calls one step carries.
const MAX_BATCH: usize = 256;

type Waiting<T, R> = Vec<(T, oneshot::Sender<R>)>;

/// One key's calls waiting for the next step, and whether a task is running its steps.
struct Lane<T, R> {
    waiting: Mutex<Waiting<T, R>>,
    running: AtomicBool,
}

impl<T, R> Lane<T, R> {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting<T, R>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The lanes of one kind of step, one per key ever called (bounded by the allowlist).
pub(super) struct Gather<T, R> {
    lanes: Mutex<BTreeMap<String, Arc<Lane<T, R>>>>,
}

impl<T, R> Default for Gather<T, R> {
    fn default() -> Self {
        Gather { lanes: Mutex::new(BTreeMap::new()) }
    }
}

impl<T: Send + 'static, R: Send + 'static> Gather<T, R> {
    /// Makes `item`'s call for `key` through `step`, together with whatever other calls for
    /// `key` are waiting when the step starts. `step` gets the items in arrival order and
    /// returns one answer each, in the same order. `None` when the step gave no answer for
    /// this item (it returned too few, or its task ended abnormally).
    pub(super) async fn call<F, Fut>(&self, key: &str, item: T, step: F) -> Option<R>
    where
        F: Fn(Vec<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let lane = self.lane(key);
        let (done, answer) = oneshot::channel();
        lane.waiting().push((item, done));
        if !lane.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(lane, step));
        }
        answer.await.ok()
    }

    fn lane(&self, key: &str) -> Arc<Lane<T, R>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lane) = lanes.get(key) {
            return lane.clone();
        }
        let lane = Arc::new(Lane { waiting: Mutex::new(Vec::new()), running: AtomicBool::new(false) });
        lanes.insert(key.to_string(), lane.clone());
        lane
    }
}

/// Runs one lane's steps until nothing waits, then stands down (see [`keep_committing`] for
/// why nothing queued just then is stranded).
async fn run<T, R, F, Fut>(lane: Arc<Lane<T, R>>, step: F)
where
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<R>>,
{
    let guard = StandDownOnPanic(&lane.running);
    loop {
        let batch: Waiting<T, R> = {
            let mut waiting = lane.waiting();
            let take = waiting.len().min(MAX_BATCH);
            waiting.drain(..take).collect()
        };
        if batch.is_empty() {
            if keep_committing(&lane.running, || lane.waiting().is_empty()) {
                continue;
            }
            break;
        }
        let (items, callers): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
        let answers = step(items).await;
        for (caller, answer) in callers.into_iter().zip(answers) {
            // A caller that went away does not want its answer.
            let _ = caller.send(answer);
        }
    }
    std::mem::forget(guard);
}

/// Clears a lane's running flag if its task unwinds, so that the next call starts a new one
/// instead of waiting forever (callers of the batch in hand get `None`).
struct StandDownOnPanic<'a>(&'a AtomicBool);

impl Drop for StandDownOnPanic<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn calls_arriving_while_one_is_out_go_together_in_the_next_step() {
        let gather = Arc::new(Gather::<u32, u32>::default());
        let steps = Arc::new(Mutex::new(Vec::new()));
        let step = {
            let steps = steps.clone();
            move |items: Vec<u32>| {
                steps.lock().unwrap().push(items.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    items.into_iter().map(|n| n * 10).collect()
                }
            }
        };
        let first = tokio::spawn({
            let (gather, step) = (gather.clone(), step.clone());
            async move { gather.call("bob", 1, step).await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest: Vec<_> = (2..=4)
            .map(|n| {
                let (gather, step) = (gather.clone(), step.clone());
                tokio::spawn(async move { gather.call("bob", n, step).await })
            })
            .collect();
        assert_eq!(first.await.unwrap(), Some(10));
        for (n, call) in (2..=4).zip(rest) {
            assert_eq!(call.await.unwrap(), Some(n * 10));
        }
        assert_eq!(*steps.lock().unwrap(), vec![vec![1], vec![2, 3, 4]]);
    }

    #[tokio::test]
    async fn keys_do_not_wait_for_each_other_and_a_lone_call_goes_at_once() {
        let gather = Gather::<&'static str, &'static str>::default();
        let steps = Arc::new(AtomicUsize::new(0));
        let step = {
            let steps = steps.clone();
            move |items: Vec<&'static str>| {
                steps.fetch_add(1, Ordering::SeqCst);
                async move { items }
            }
        };
        assert_eq!(gather.call("alice", "a", step.clone()).await, Some("a"));
        assert_eq!(gather.call("bob", "b", step.clone()).await, Some("b"));
        assert_eq!(gather.call("alice", "c", step).await, Some("c"));
        assert_eq!(steps.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_step_that_answers_too_few_leaves_the_rest_without_an_answer_and_the_lane_usable() {
        let gather = Gather::<u32, u32>::default();
        assert_eq!(gather.call("bob", 1, |_items: Vec<u32>| async { Vec::new() }).await, None);
        assert_eq!(gather.call("bob", 2, |items: Vec<u32>| async move { items }).await, Some(2));
    }

    #[tokio::test]
    async fn a_step_that_panics_does_not_wedge_its_lane() {
        let gather = Gather::<u32, u32>::default();
        let panicking = |_items: Vec<u32>| async { panic!("step failed") };
        assert_eq!(gather.call("bob", 1, panicking).await, None);
        assert_eq!(gather.call("bob", 2, |items: Vec<u32>| async move { items }).await, Some(2));
    }
}
