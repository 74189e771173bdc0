//! `SendBatch` over real mTLS: every message of a batch gets exactly what its own `Send`
//! would (status, detail, audit record, delivery), and the SDK gathers concurrent sends into
//! batches without changing what each caller sees.

#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mas_core::policy::audit::Decision;
use mas_net::client::RuntimeClient;
use mas_proto::runtime::{BatchedSend, ClientEvent, Hello, SendBatchRequest, SendRequest, ServerEvent, client_event};
use mas_server::service::MAX_SENDS_PER_BATCH;
use mas_tests::{TestBroker, eventually, id};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// Alice may message bob and carol (carol never connects); six messages per minute. On the
/// embedded store, or on the Redis server at `redis`.
async fn broker_on(redis: Option<&str>) -> TestBroker {
    TestBroker::start_custom(&[("alice", &["bob", "carol"]), ("bob", &[]), ("carol", &[])], |config| {
        config.gateway.rate_limit.per_minute = 6;
        config.redis = redis.map(mas_server::store::redis::RedisSettings::new);
    })
    .await
}

async fn broker() -> TestBroker {
    broker_on(None).await
}

/// Alice's raw client with an open session of instance `a1` (kept open while held).
async fn alice(tb: &TestBroker) -> (RuntimeClient, mpsc::Sender<ClientEvent>, Streaming<ServerEvent>) {
    let pair = tb.ca.agent_cert(&id("alice")).expect("cert");
    let mut client = tb.raw_client(Some(&pair)).await.expect("TLS handshake");
    let (tx, rx) = mpsc::channel(4);
    let hello = ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: "a1".into() })) };
    tx.send(hello).await.expect("queue hello");
    let mut events = client.transport(ReceiverStream::new(rx)).await.expect("session").into_inner();
    events.message().await.expect("welcome").expect("welcome");
    (client, tx, events)
}

/// One message of each kind of outcome, in an order that exercises every check, then more
/// than the rate limit leaves.
fn messages() -> Vec<BatchedSend> {
    let send = |target: &str, message_type: &str, data: &str| BatchedSend {
        target_id: target.into(),
        message_type: message_type.into(),
        data_json: data.into(),
    };
    vec![
        send("bob", "note", r#"{"n":1}"#),
        send("carol", "note", r#"{"n":2}"#),   // allowlisted, no live session
        send("mallory", "note", r#"{"n":3}"#), // not allowlisted
        send("bob", "note", "[1,2]"),          // not an object
        send("bob", "pay", r#"{"card":"4111 1111 1111 1111"}"#),
        send("bob", "hr", r#"{"ssn":"123-45-6789"}"#),
        send("bob", "note", r#"{"n":7}"#),
        send("bob", "note", r#"{"n":8}"#),
        send("bob", "note", r#"{"n":9}"#),
        send("bob", "note", r#"{"n":10}"#), // the 7th token: rate limited
        send("bob", "note", r#"{"n":11}"#),
    ]
}

/// What a client sees of one outcome: code and detail (message ids differ per run).
type Seen = (Code, String);

/// The messages one `Send` each, on a fresh broker, and what bob's chain recorded.
async fn one_by_one(redis: Option<&str>) -> (Vec<Seen>, Vec<Decision>, u32) {
    let tb = broker_on(redis).await;
    let (bob, runs) = tb.counting_agent::<serde_json::Value>("bob", "note").await;
    let (mut client, _tx, _events) = alice(&tb).await;
    let mut seen = Vec::new();
    for m in messages() {
        let request = SendRequest {
            target_id: m.target_id,
            message_type: m.message_type,
            data_json: m.data_json,
            instance_id: "a1".into(),
        };
        seen.push(match client.send(request).await {
            Ok(_) => (Code::Ok, String::new()),
            Err(status) => (status.code(), status.message().to_string()),
        });
    }
    let (decisions, delivered) = settle(&tb, &runs).await;
    bob.stop().await;
    tb.stop().await;
    (seen, decisions, delivered)
}

/// Waits for bob's handler to have run for every admitted note; returns his chain's
/// decisions (in order) and the handler runs.
async fn settle(tb: &TestBroker, runs: &Arc<std::sync::atomic::AtomicU32>) -> (Vec<Decision>, u32) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chain = tb.broker.store().audit_chain(&id("bob")).await.expect("chain");
    let notes = chain
        .records
        .iter()
        .filter(|r| r.decision == Decision::Allowed && r.message_type.as_deref() == Some("note"))
        .count();
    assert!(eventually(Duration::from_secs(5), || runs.load(Ordering::SeqCst) as usize == notes).await);
    (chain.records.iter().map(|r| r.decision).collect(), runs.load(Ordering::SeqCst))
}

#[tokio::test]
async fn each_message_of_a_batch_gets_what_its_own_send_would() {
    batch_versus_single_sends(None).await;
}

/// The same on Redis, where the batch's gate, rate-limit and admission steps are scripts.
#[tokio::test]
async fn each_message_of_a_batch_gets_what_its_own_send_would_on_redis() {
    let Some(single) = mas_tests::redis_server::RedisServer::start() else { return };
    let Some(batched) = mas_tests::redis_server::RedisServer::start() else { return };
    batch_versus_single_sends(Some((&single.url, &batched.url))).await;
}

/// Runs [`messages`] one `Send` each and as one `SendBatch` on fresh brokers (on two fresh
/// Redis servers when `redis` is given) and compares everything a client and an auditor see.
async fn batch_versus_single_sends(redis: Option<(&str, &str)>) {
    let (expected, expected_chain, expected_runs) = one_by_one(redis.map(|(single, _)| single)).await;

    let tb = broker_on(redis.map(|(_, batched)| batched)).await;
    let (bob, runs) = tb.counting_agent::<serde_json::Value>("bob", "note").await;
    let (mut client, _tx, _events) = alice(&tb).await;
    let response = client
        .send_batch(SendBatchRequest { instance_id: "a1".into(), sends: messages() })
        .await
        .expect("the call succeeds though some messages are refused")
        .into_inner();
    let seen: Vec<Seen> = response.outcomes.iter().map(|o| (Code::from(o.code), o.detail.clone())).collect();
    assert_eq!(seen, expected, "per message: the same status and detail as its own Send");
    let s = |code: Code, detail: &str| (code, detail.to_string());
    assert_eq!(
        seen,
        [
            s(Code::Ok, ""),
            s(Code::PermissionDenied, "not_authorized"),
            s(Code::PermissionDenied, "not_authorized"),
            s(Code::InvalidArgument, "payload_must_be_object"),
            s(Code::PermissionDenied, "dlp_blocked"),
            s(Code::Ok, ""),
            s(Code::Ok, ""),
            s(Code::Ok, ""),
            s(Code::Ok, ""),
            s(Code::ResourceExhausted, "rate_limited"),
            s(Code::ResourceExhausted, "rate_limited"),
        ]
    );
    let ids: Vec<&str> = response.outcomes.iter().filter(|o| o.code == 0).map(|o| o.message_id.as_str()).collect();
    assert_eq!(ids.len(), 5);
    assert!(ids.iter().all(|id| !id.is_empty()), "every admitted message has its id");
    assert!(response.outcomes.iter().filter(|o| o.code != 0).all(|o| o.message_id.is_empty()));

    let (chain, delivered) = settle(&tb, &runs).await;
    assert_eq!(chain, expected_chain, "bob's chain records the same decisions in the same order");
    assert_eq!(delivered, expected_runs);
    assert_eq!(delivered, 4, "four notes delivered (the redacted `hr` has no handler here)");
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn a_batch_needs_a_session_and_has_a_bound() {
    let tb = broker().await;
    let pair = tb.ca.agent_cert(&id("alice")).expect("cert");
    let mut client = tb.raw_client(Some(&pair)).await.expect("TLS handshake");
    let one = vec![BatchedSend { target_id: "bob".into(), message_type: "note".into(), data_json: "{}".into() }];
    let refused = client
        .send_batch(SendBatchRequest { instance_id: "a1".into(), sends: one.clone() })
        .await
        .expect_err("no session");
    assert_eq!((refused.code(), refused.message()), (Code::FailedPrecondition, "session_not_connected"));

    let (mut client, _tx, _events) = alice(&tb).await;
    let too_many = one.iter().cycle().take(MAX_SENDS_PER_BATCH + 1).cloned().collect();
    let refused =
        client.send_batch(SendBatchRequest { instance_id: "a1".into(), sends: too_many }).await.expect_err("bound");
    assert_eq!((refused.code(), refused.message()), (Code::InvalidArgument, "batch_too_large"));
    let empty = client.send_batch(SendBatchRequest { instance_id: "a1".into(), sends: Vec::new() }).await;
    assert!(empty.expect("an empty batch is answered").into_inner().outcomes.is_empty());
    assert_eq!(tb.queue_len("bob").await, 0, "nothing of a refused batch was queued");
    tb.stop().await;
}

/// Many concurrent sends of one SDK agent: the SDK carries them in `SendBatch` calls, and
/// every caller still gets its own message id, delivered exactly once.
#[tokio::test]
async fn concurrent_sdk_sends_share_calls_and_each_is_delivered_once() {
    const SENDS: usize = 2_000;
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |config| {
        config.gateway.rate_limit.per_minute = 1_000_000;
        config.gateway.rate_limit.per_hour = 1_000_000;
    })
    .await;
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
    let bob = tb
        .agent("bob")
        .on("note", {
            let seen = seen.clone();
            move |_, msg: mas_agent::Message<serde_json::Value>| {
                *seen.lock().unwrap().entry(msg.envelope.message_id.clone()).or_default() += 1;
                async { Ok::<(), mas_agent::HandlerError>(()) }
            }
        })
        .start()
        .await
        .expect("bob starts");
    let alice = tb.agent("alice").start().await.expect("alice starts");
    let sends = (0..SENDS).map(|n| {
        let alice = alice.clone();
        tokio::spawn(async move { alice.send("bob", "note", &serde_json::json!({ "n": n })).await })
    });
    let mut ids = Vec::new();
    for send in sends.collect::<Vec<_>>() {
        ids.push(send.await.expect("task").expect("sent"));
    }
    let refused = alice.send("mallory", "note", &serde_json::json!({})).await.expect_err("not allowlisted");
    assert_eq!(refused.status().map(|s| s.message()), Some("not_authorized"));

    assert!(eventually(Duration::from_secs(20), || seen.lock().unwrap().len() == SENDS).await);
    let seen = seen.lock().unwrap().clone();
    let mut sent = ids.clone();
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), SENDS, "every caller got its own message id");
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), sent, "exactly the sent messages were delivered");
    assert!(seen.values().all(|n| *n == 1));

    let metrics = tb.broker.metrics().encode();
    let batches = rpc_count(&metrics, "send_batch");
    let singles = rpc_count(&metrics, "send");
    assert!(batches > 0, "concurrent sends went out in batches:\n{metrics}");
    assert!(batches + singles < SENDS as u64 / 2, "{batches} batches + {singles} sends for {SENDS} messages");
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

/// `mas_rpcs_total{method, code="OK"}` from the broker's OpenMetrics text.
fn rpc_count(metrics: &str, method: &str) -> u64 {
    let wanted = format!("mas_rpcs_total{{method=\"{method}\",code=\"OK\"}} ");
    metrics.lines().find_map(|line| line.strip_prefix(&wanted)).map_or(0, |n| n.trim().parse().expect("a count"))
}
