//! End-to-end delivery semantics over mTLS: handler failures are retried with backoff, bad
//! payloads are dead-lettered without running the handler, and stop hands back unacked work.

#![cfg(not(madsim))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mas_agent::{HandlerError, Message};
use mas_tests::scenarios::{self, fast_retries};
use mas_tests::{TestBroker, eventually, eventually_async};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Job {
    #[allow(dead_code)]
    n: u32,
}

#[tokio::test]
async fn failing_handler_is_retried_with_backoff_then_succeeds() {
    let tb = TestBroker::start_with(&[("alice", &["bob"]), ("bob", &[])], fast_retries()).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let bob = tb
        .agent("bob")
        .on("job", move |_, _msg: Message<Job>| {
            let attempt = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move { if attempt < 3 { Err::<(), HandlerError>("transient".into()) } else { Ok(()) } }
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let started = Instant::now();
    alice.send("bob", "job", &serde_json::json!({"n": 1})).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || calls.load(Ordering::SeqCst) == 3).await);
    // Two backoffs: at least 50 ms + 100 ms (the lower halves of 100 ms and 200 ms).
    assert!(started.elapsed() >= Duration::from_millis(150), "retries were not backed off: {:?}", started.elapsed());
    assert!(eventually_async(Duration::from_secs(2), || async { tb.queue_len("bob").await == 0 }).await);
    assert!(tb.dead_letters("bob").await.is_empty());
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn undecodable_payload_is_dead_lettered_without_running_the_handler() {
    let tb = TestBroker::start_with(&[("alice", &["bob"]), ("bob", &[])], fast_retries()).await;
    let (bob, calls) = tb.counting_agent::<Job>("bob", "job").await;
    let alice = tb.agent("alice").start().await.unwrap();
    alice.send("bob", "job", &serde_json::json!({"n": "not a number"})).await.unwrap();
    assert!(eventually_async(Duration::from_secs(5), || async { tb.dead_letters("bob").await.len() == 1 }).await);
    let letter = &tb.dead_letters("bob").await[0];
    assert!(letter.reason.starts_with("invalid_payload:"), "{}", letter.reason);
    assert_eq!(letter.attempts, 1, "non-retryable: no second attempt");
    assert!(letter.envelope.contains("not a number"), "the full envelope is kept");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn always_failing_handler_is_dead_lettered_after_the_attempt_limit() {
    let tb = TestBroker::start_with(&[("alice", &["bob"]), ("bob", &[])], fast_retries()).await;
    scenarios::always_failing_handler_is_dead_lettered(tb).await;
}

#[tokio::test]
async fn stopped_instance_hands_unacked_work_to_its_sibling() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[])]).await;
    // bob-1 takes a delivery and sits on it longer than its drain timeout allows.
    let mut slow = tb.agent_config("bob");
    slow.handler_drain_timeout = Duration::from_millis(200);
    let slow_calls = Arc::new(AtomicU32::new(0));
    let sc = slow_calls.clone();
    let bob1 = mas_agent::AgentBuilder::new(slow)
        .on("job", move |_, _msg: Message<Job>| {
            sc.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    alice.send("bob", "job", &serde_json::json!({"n": 1})).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || slow_calls.load(Ordering::SeqCst) == 1).await);
    bob1.stop().await;

    let (bob2, done) = tb.counting_agent::<Job>("bob", "job").await;
    // Handed back at once on disconnect, not after the 30 s ack deadline.
    assert!(eventually(Duration::from_secs(2), || done.load(Ordering::SeqCst) == 1).await);
    alice.stop().await;
    bob2.stop().await;
    tb.stop().await;
}
