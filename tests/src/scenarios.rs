//! Scenarios that must behave the same on every store; each test file runs them on its own
//! broker (embedded store or Redis).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mas_agent::{HandlerError, Message};
use mas_server::config::DeliverySettings;

use crate::{TestBroker, eventually_async};

/// Delivery settings with 3 attempts and 100 ms initial backoff, to keep retry tests short.
pub fn fast_retries() -> DeliverySettings {
    DeliverySettings {
        max_delivery_attempts: 3,
        retry_backoff_initial_ms: 100,
        retry_backoff_max_ms: 1_000,
        ..DeliverySettings::default()
    }
}

/// A handler that always fails: the message is tried exactly `max_delivery_attempts` (3) times,
/// then dead-lettered with the full envelope, and the queue is left empty. `tb` must allow
/// alice → bob and use [`fast_retries`].
pub async fn always_failing_handler_is_dead_lettered(tb: TestBroker) {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let bob = tb
        .agent("bob")
        .on("job", move |_, _msg: Message<serde_json::Value>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), HandlerError>("boom".into()) }
        })
        .start()
        .await
        .expect("bob starts");
    let alice = tb.agent("alice").start().await.expect("alice starts");
    alice.send("bob", "job", &serde_json::json!({"n": 1})).await.expect("accepted");
    assert!(eventually_async(Duration::from_secs(5), || async { tb.dead_letters("bob").await.len() == 1 }).await);
    let letter = &tb.dead_letters("bob").await[0];
    assert_eq!((letter.reason.as_str(), letter.attempts), ("handler_error:boom; retry_limit_exceeded", 3));
    assert!(letter.envelope.contains("\"n\":1"), "the full envelope is kept");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(eventually_async(Duration::from_secs(2), || async { tb.queue_len("bob").await == 0 }).await);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}
