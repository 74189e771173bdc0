//! End-to-end over mTLS against a real `redis-server` (started per test on a free port):
//! request/reply, reply spoofing, late replies, state compare-and-set, load sharing with
//! per-instance replies, redelivery from a dead consumer, dead-lettering.

#![cfg(not(madsim))]

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mas_agent::{AgentError, HandlerError, Message, TypedState};
use mas_core::envelope::Envelope;
use mas_proto::runtime::{ClientEvent, Hello, client_event, server_event};
use mas_server::config::DeliverySettings;
use mas_tests::redis_server::RedisServer;
use mas_tests::{TestBroker, eventually, eventually_async};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

async fn broker(redis: &RedisServer, grants: mas_tests::Grants<'_>) -> TestBroker {
    TestBroker::start_on_redis(grants, &redis.url).await
}

/// bob answers `add` requests with the sum.
async fn adder(tb: &TestBroker, instance: &str) -> mas_agent::Agent {
    let mut config = tb.agent_config("bob");
    config.instance_id = Some(instance.parse().unwrap());
    mas_agent::AgentBuilder::new(config)
        .on("add", |agent, msg: Message<Add>| async move {
            agent
                .reply(
                    &msg.envelope,
                    "sum",
                    &serde_json::json!({"sum": msg.payload.a + msg.payload.b, "by": agent.instance_id().to_string()}),
                )
                .await?;
            Ok::<(), HandlerError>(())
        })
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn request_reply_round_trip() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = broker(&redis, &[("alice", &["bob"]), ("bob", &[])]).await;
    let bob = adder(&tb, "b1").await;
    let alice = tb.agent("alice").start().await.unwrap();
    let reply = alice.request("bob", "add", &Add { a: 2, b: 3 }, Duration::from_secs(5)).await.unwrap();
    assert_eq!(reply.data["sum"], 5);
    assert_eq!(reply.sender_id, "bob");
    assert!(reply.meta.is_reply);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn spoofed_reply_is_refused_and_the_real_reply_still_accepted() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = broker(&redis, &[("alice", &["bob"]), ("bob", &[]), ("carol", &[])]).await;
    // bob parks the request so that carol can try to answer it first.
    let parked: Arc<Mutex<Option<Envelope>>> = Arc::default();
    let p = parked.clone();
    let bob = tb
        .agent("bob")
        .on("add", move |_, msg: Message<Add>| {
            *p.lock().unwrap() = Some(msg.envelope);
            async { Ok::<(), HandlerError>(()) }
        })
        .start()
        .await
        .unwrap();
    let carol = tb.agent("carol").start().await.unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let waiting = tokio::spawn({
        let alice = alice.clone();
        async move { alice.request("bob", "add", &Add { a: 1, b: 1 }, Duration::from_secs(10)).await }
    });
    assert!(eventually(Duration::from_secs(5), || parked.lock().unwrap().is_some()).await);
    let request = parked.lock().unwrap().clone().unwrap();
    let spoof = carol.reply(&request, "sum", &serde_json::json!({"sum": 666})).await.expect_err("spoof refused");
    let status = spoof.status().unwrap();
    assert_eq!((status.code(), status.message()), (Code::PermissionDenied, "reply_sender_mismatch"));
    let id = bob.reply(&request, "sum", &serde_json::json!({"sum": 2})).await.unwrap();
    let again = bob.reply(&request, "sum", &serde_json::json!({"sum": 2})).await.unwrap();
    assert_eq!(id, again, "an identical retried reply returns the original id");
    let different = bob.reply(&request, "sum", &serde_json::json!({"sum": 3})).await.expect_err("second answer");
    assert_eq!(different.status().map(|s| s.message()), Some("unknown_or_completed_correlation_id"));
    let reply = waiting.await.unwrap().unwrap();
    assert_eq!(reply.data["sum"], 2);
    assert_eq!(reply.message_id, id);
    for a in [alice, bob, carol] {
        a.stop().await;
    }
    tb.stop().await;
}

#[tokio::test]
async fn late_reply_is_refused_as_expired() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = broker(&redis, &[("alice", &["bob"]), ("bob", &[])]).await;
    type Outcome = Result<String, (Code, String)>;
    let late: Arc<Mutex<Option<Outcome>>> = Arc::default();
    let l = late.clone();
    let bob = tb
        .agent("bob")
        .on("add", move |agent, msg: Message<Add>| {
            let l = l.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                let r = agent.reply(&msg.envelope, "sum", &serde_json::json!({"sum": 0})).await;
                *l.lock().unwrap() = Some(r.map_err(|e| {
                    e.status().map(|s| (s.code(), s.message().to_string())).unwrap_or((Code::Unknown, e.to_string()))
                }));
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    let started = Instant::now();
    let err = alice.request("bob", "add", &Add { a: 1, b: 1 }, Duration::from_millis(300)).await.expect_err("timeout");
    assert!(matches!(err, AgentError::RequestTimeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_millis(1000), "the whole request is bounded by its timeout");
    assert!(eventually(Duration::from_secs(5), || late.lock().unwrap().is_some()).await);
    let outcome = late.lock().unwrap().clone().unwrap();
    assert_eq!(outcome, Err((Code::FailedPrecondition, "correlation_id_expired".to_string())));
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Counter {
    count: u64,
    label: String,
}

#[tokio::test]
async fn state_compare_and_set_conflict_leaves_local_state_unchanged() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = broker(&redis, &[("bob", &[])]).await;
    let b1 = tb.agent("bob").start().await.unwrap();
    let b2 = tb.agent("bob").start().await.unwrap();
    let mut s1 = TypedState::<Counter>::load(&b1).await.unwrap();
    let mut s2 = TypedState::<Counter>::load(&b2).await.unwrap();
    assert_eq!((s1.get().clone(), s1.revision()), (Counter::default(), 0));
    let bad = s1.update(serde_json::json!({"count": "not a number"}).as_object().unwrap().clone()).await;
    assert!(matches!(bad, Err(AgentError::State(_))), "out-of-type update rejected before sending");
    let unknown = s1.update(serde_json::json!({"colour": 1}).as_object().unwrap().clone()).await;
    assert!(matches!(unknown, Err(AgentError::State(_))));
    assert_eq!(s1.update(serde_json::json!({"count": 1}).as_object().unwrap().clone()).await.unwrap(), 1);
    let conflict = s2.update(serde_json::json!({"label": "x"}).as_object().unwrap().clone()).await.expect_err("stale");
    assert_eq!(conflict.status().map(|s| (s.code(), s.message())), Some((Code::Aborted, "state_revision_conflict")));
    assert_eq!((s2.get().clone(), s2.revision()), (Counter::default(), 0), "local copy unchanged");
    s2.refresh().await.unwrap();
    assert_eq!(s2.get().count, 1);
    assert_eq!(s2.update(serde_json::json!({"label": "x"}).as_object().unwrap().clone()).await.unwrap(), 2);
    s1.refresh().await.unwrap();
    assert_eq!(s1.get(), &Counter { count: 1, label: "x".into() });
    assert_eq!(s1.reset().await.unwrap(), 3);
    s2.refresh().await.unwrap();
    assert_eq!(s2.get(), &Counter::default());
    b1.stop().await;
    b2.stop().await;
    tb.stop().await;
}

/// bob's instances b1 and b2: each takes `delay` over an `add`, records which instance
/// handled it, and answers a request with the sum (a send's envelope asks for no reply).
async fn recording_adders(tb: &TestBroker, delay: Duration) -> (Vec<mas_agent::Agent>, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut bobs = Vec::new();
    for instance in ["b1", "b2"] {
        let seen = seen.clone();
        let mut config = tb.agent_config("bob");
        config.instance_id = Some(instance.parse().unwrap());
        let bob = mas_agent::AgentBuilder::new(config)
            .on("add", move |agent, msg: Message<Add>| {
                let seen = seen.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    seen.lock().unwrap().push(agent.instance_id().to_string());
                    if msg.envelope.meta.expects_reply {
                        let sum = serde_json::json!({"sum": msg.payload.a + msg.payload.b});
                        agent.reply(&msg.envelope, "sum", &sum).await?;
                    }
                    Ok::<(), HandlerError>(())
                }
            })
            .start()
            .await
            .unwrap();
        bobs.push(bob);
    }
    (bobs, seen)
}

/// Messages arriving one at a time, each handed to a waiting session by the admission that
/// queues it, go to the instance with the fewest deliveries out: with a roomy window and a slow
/// handler, one instance must not take them all while the other idles.
#[tokio::test]
async fn one_at_a_time_messages_are_spread_over_the_waiting_instances() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = broker(&redis, &[("alice", &["bob"]), ("bob", &[])]).await;
    let (bobs, seen) = recording_adders(&tb, Duration::from_millis(300)).await;
    let alice = tb.agent("alice").start().await.unwrap();
    // Both sessions are waiting before the first message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..10 {
        alice.send("bob", "add", &Add { a: n, b: 0 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(eventually(Duration::from_secs(10), || seen.lock().unwrap().len() == 10).await, "all handled");
    let seen = seen.lock().unwrap().clone();
    let b1 = seen.iter().filter(|by| *by == "b1").count();
    assert!((3..=7).contains(&b1), "spread over both instances: {seen:?}");
    alice.stop().await;
    for bob in bobs {
        bob.stop().await;
    }
    tb.stop().await;
}

#[tokio::test]
async fn instances_share_work_and_each_requester_instance_gets_its_own_replies() {
    let Some(redis) = RedisServer::start() else { return };
    let small_window = DeliverySettings { max_in_flight: 2, ..DeliverySettings::default() };
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        c.redis = Some(mas_server::store::redis::RedisSettings::new(&redis.url));
        c.delivery = small_window;
    })
    .await;
    let (bobs, seen) = recording_adders(&tb, Duration::from_millis(20)).await;
    let mut alices = Vec::new();
    for instance in ["a1", "a2"] {
        let mut config = tb.agent_config("alice");
        config.instance_id = Some(instance.parse().unwrap());
        alices.push(mas_agent::AgentBuilder::new(config).start().await.unwrap());
    }
    let mut calls = Vec::new();
    for i in 0..20i64 {
        for (k, alice) in alices.iter().enumerate() {
            let alice = alice.clone();
            let a = i * 10 + k as i64;
            calls.push(tokio::spawn(async move {
                let reply = alice.request("bob", "add", &Add { a, b: 1 }, Duration::from_secs(10)).await.unwrap();
                (reply.meta.reply_to_instance_id.clone(), alice.instance_id().to_string(), reply.data["sum"].clone(), a)
            }));
        }
    }
    for call in calls {
        let (reply_to, asker, sum, a) = call.await.unwrap();
        assert_eq!(reply_to.as_deref(), Some(asker.as_str()), "the reply reached the instance that asked");
        assert_eq!(sum, a + 1, "the reply answers this request");
    }
    let by: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(by, BTreeSet::from(["b1".to_string(), "b2".to_string()]), "both instances took work");
    for a in alices.into_iter().chain(bobs) {
        a.stop().await;
    }
    tb.stop().await;
}

#[tokio::test]
async fn deliveries_held_by_a_dead_consumer_go_to_its_sibling_within_two_seconds() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = broker(&redis, &[("alice", &["bob"]), ("bob", &[])]).await;
    // A raw consumer takes deliveries and dies without acking.
    let cert = tb.ca.agent_cert(&mas_tests::id("bob")).unwrap();
    let mut raw = tb.raw_client(Some(&cert)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: "doomed".into() })) })
        .await
        .unwrap();
    let mut events = raw.transport(ReceiverStream::new(rx)).await.unwrap().into_inner();
    events.message().await.unwrap().expect("welcome");
    let alice = tb.agent("alice").start().await.unwrap();
    for n in 0..5 {
        alice.send("bob", "add", &Add { a: n, b: 0 }).await.unwrap();
    }
    let mut held = 0;
    while held < 5 {
        if let Some(mas_proto::runtime::ServerEvent { event: Some(server_event::Event::Delivery(_)) }) =
            events.message().await.unwrap()
        {
            held += 1;
        }
    }
    drop(events);
    drop(tx);
    drop(raw);
    let died = Instant::now();
    let (sibling, handled) = tb.counting_agent::<Add>("bob", "add").await;
    assert!(eventually(Duration::from_secs(2), || handled.load(Ordering::SeqCst) == 5).await);
    eprintln!("redelivered to the sibling {:?} after the consumer died", died.elapsed());
    assert!(eventually_async(Duration::from_secs(2), || async { tb.queue_len("bob").await == 0 }).await);
    alice.stop().await;
    sibling.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn always_failing_handler_is_dead_lettered_after_the_attempt_limit() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        c.redis = Some(mas_server::store::redis::RedisSettings::new(&redis.url));
        c.delivery = mas_tests::scenarios::fast_retries();
    })
    .await;
    mas_tests::scenarios::always_failing_handler_is_dead_lettered(tb).await;
}

#[tokio::test]
async fn broker_refuses_to_start_without_redis() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut config = mas_server::BrokerConfig::new("127.0.0.1:0".parse().unwrap(), Default::default());
    let mut settings = mas_server::store::redis::RedisSettings::new(format!("redis://127.0.0.1:{closed}"));
    settings.connect_timeout_ms = 500;
    config.redis = Some(settings);
    let err = mas_server::Broker::connect(config).await.expect_err("no Redis there");
    let text = err.to_string();
    assert!(text.starts_with("cannot reach the store: storage_unavailable"), "{text}");
}

#[tokio::test]
async fn redis_failure_during_rpcs_is_storage_unavailable_and_loses_nothing_accepted() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        let mut settings = mas_server::store::redis::RedisSettings::new(&redis.url);
        settings.response_timeout_ms = 300;
        c.redis = Some(settings);
    })
    .await;
    // bob works slowly, one message at a time, so most of what alice sends is still queued in
    // Redis when Redis stops answering.
    let handled: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let h = handled.clone();
    let mut slow = tb.agent_config("bob");
    slow.max_concurrent_handlers = 1;
    let bob = mas_agent::AgentBuilder::new(slow)
        .on("add", move |_, msg: Message<Add>| {
            let h = h.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                h.lock().unwrap().insert(msg.payload.a);
                Ok::<(), HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    for n in 0..5 {
        alice.send("bob", "add", &Add { a: n, b: 0 }).await.unwrap();
    }
    redis.freeze();
    let err = alice.send("bob", "add", &Add { a: 99, b: 0 }).await.expect_err("Redis is frozen");
    let status = err.status().expect("a status");
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "storage_unavailable"),
        "backend text never leaks"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.thaw();
    // Every message accepted before the failure is handled (bob's session may have broken
    // and reconnected meanwhile). The sixth may or may not have been written: an uncertain
    // commit the client was told failed.
    let all = || (0..5).all(|a| handled.lock().unwrap().contains(&a));
    assert!(eventually(Duration::from_secs(15), all).await, "handled: {:?}", handled.lock().unwrap());
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let dir = std::env::temp_dir().join(format!("mas-rediss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = mas_net::pki::DevCa::new("redis CA").unwrap();
    let server = ca.server_cert().unwrap();
    let (ca_path, cert_path, key_path) = (dir.join("ca.pem"), dir.join("redis.pem"), dir.join("redis.key"));
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    std::fs::write(&cert_path, &server.cert).unwrap();
    std::fs::write(&key_path, &server.key).unwrap();
    let Some(redis) = RedisServer::start_tls(&cert_path, &key_path, &ca_path) else { return };
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        let mut settings = mas_server::store::redis::RedisSettings::new(&redis.url);
        settings.tls_ca_path = Some(ca_path.clone());
        c.redis = Some(settings);
    })
    .await;
    let bob = adder(&tb, "b1").await;
    let alice = tb.agent("alice").start().await.unwrap();
    let reply = alice.request("bob", "add", &Add { a: 40, b: 2 }, Duration::from_secs(5)).await.unwrap();
    assert_eq!(reply.data["sum"], 42);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn discover_lists_live_permitted_agents_by_capability_sorted() {
    let Some(redis) = RedisServer::start() else { return };
    let tb = TestBroker::start_custom(&[("alice", &["*"]), ("bob", &[]), ("carol", &[]), ("dave", &[])], |c| {
        c.redis = Some(mas_server::store::redis::RedisSettings::new(&redis.url));
        for (agent, caps) in [("bob", vec!["math"]), ("carol", vec!["math", "text"]), ("dave", vec!["math"])] {
            let def = c.agents.get_mut(&mas_tests::id(agent)).unwrap();
            def.capabilities = caps.into_iter().map(String::from).collect();
            def.metadata = serde_json::json!({"owner": agent}).as_object().unwrap().clone();
        }
    })
    .await;
    let carol = tb.agent("carol").start().await.unwrap();
    let bob = tb.agent("bob").start().await.unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    // dave is allowlisted but not connected: not listed. alice itself is not a math agent.
    let math: Vec<String> = alice.discover(&["math"]).await.unwrap().into_iter().map(|a| a.agent_id).collect();
    assert_eq!(math, ["bob", "carol"]);
    let text = alice.discover(&["text"]).await.unwrap();
    assert_eq!(text.len(), 1);
    assert_eq!((text[0].agent_id.as_str(), text[0].status.as_str()), ("carol", "ACTIVE"));
    assert_eq!(text[0].metadata["owner"], "carol");
    // bob may message nobody, so he discovers nobody.
    assert!(bob.discover(&[]).await.unwrap().is_empty());
    carol.stop().await;
    assert!(
        eventually_async(Duration::from_secs(3), || async {
            alice.discover(&["text"]).await.map(|v| v.is_empty()).unwrap_or(false)
        })
        .await,
        "a stopped agent leaves discovery"
    );
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}
