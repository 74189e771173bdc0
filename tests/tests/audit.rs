//! Audit and circuit breakers in the message path, end to end over mTLS: every decision is
//! recorded, `verify` passes on a real run and fails after one record is edited (in the store
//! and in the JSONL file), security events are chained, and a failing target trips its circuit
//! and recovers through half-open.

#![cfg(not(madsim))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use mas_agent::HandlerError;
use mas_core::policy::audit::{AuditFilter, Decision, verify_lines};
use mas_server::config::DeliverySettings;
use mas_server::store::Backend;
use mas_tests::redis_server::rewrite_audit_stream;
use mas_tests::{TestBroker, eventually_async, id, scratch_dir};
use tonic::Code;

fn status_of(err: &mas_agent::AgentError) -> (Code, String) {
    let status = err.status().expect("a status from the broker");
    (status.code(), status.message().to_string())
}

async fn records(tb: &TestBroker, filter: AuditFilter) -> Vec<mas_core::policy::audit::AuditRecord> {
    tb.broker.query_audit(&filter, 1000).await.expect("query")
}

#[tokio::test]
async fn every_decision_is_audited_and_an_email_alert_names_email() {
    let tb = TestBroker::start(&[("alice", &["bob"]), ("bob", &[]), ("carol", &[])]).await;
    let (bob, handled) = tb.counting_agent::<serde_json::Value>("bob", "note").await;
    let alice = tb.agent("alice").start().await.unwrap();

    let err = alice.send("bob", "note", &serde_json::json!({"card": "4111 1111 1111 1111"})).await.unwrap_err();
    assert_eq!(status_of(&err), (Code::PermissionDenied, "dlp_blocked".into()));
    alice.send("bob", "note", &serde_json::json!({"ssn": "123-45-6789"})).await.unwrap();
    alice.send("bob", "note", &serde_json::json!({"email": "jane.doe@example.com"})).await.unwrap();
    alice.send("bob", "note", &serde_json::json!({"text": "hello"})).await.unwrap();
    let err = alice.send("carol", "note", &serde_json::json!({})).await.unwrap_err();
    assert_eq!(status_of(&err), (Code::PermissionDenied, "not_authorized".into()));
    let err = alice.send("nobody", "note", &serde_json::json!({})).await.unwrap_err();
    assert_eq!(status_of(&err), (Code::PermissionDenied, "not_authorized".into()));
    assert!(eventually_async(Duration::from_secs(5), || async { handled.load(Ordering::SeqCst) == 3 }).await);

    let to_bob = records(&tb, AuditFilter { target: Some("bob".into()), ..Default::default() }).await;
    let decisions: Vec<Decision> = to_bob.iter().map(|r| r.decision).collect();
    assert_eq!(decisions, [Decision::DlpBlocked, Decision::DlpRedacted, Decision::Alert, Decision::Allowed]);
    assert!(to_bob[0].violations.contains(&"credit_card".to_string()), "{:?}", to_bob[0].violations);
    assert_eq!(to_bob[1].violations, ["ssn"]);
    assert_eq!(to_bob[2].violations, ["email"], "the ALERT record names email");
    assert!(to_bob.iter().all(|r| r.sender_id == "alice" && r.sender_instance_id.is_some() && r.latency_ms >= 0.0));
    let denied = records(&tb, AuditFilter { decision: Some(Decision::AuthzDenied), ..Default::default() }).await;
    // (Both may carry the same millisecond: records of different chains are ordered by time only.)
    let mut targets: Vec<&str> = denied.iter().map(|r| r.target_id.as_str()).collect();
    targets.sort_unstable();
    assert_eq!(targets, ["carol", "nobody"]);
    let alices = tb.broker.store().audit_chain(&id("alice")).await.unwrap().records;
    assert_eq!(alices.len(), 1, "a denial to an unknown target is recorded in the sender's chain");
    assert_eq!(alices[0].target_id, "nobody");

    let report = tb.broker.verify_audit().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.records(), 6);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn verify_passes_on_a_real_run_and_fails_after_one_record_is_edited() {
    let dir = scratch_dir();
    let file = dir.join("audit.jsonl");
    let path = file.clone();
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &["alice"])], |c| {
        c.gateway.audit.file_path = Some(path);
    })
    .await;
    let (bob, handled) = tb.counting_agent::<serde_json::Value>("bob", "n").await;
    let alice = tb.agent("alice").start().await.unwrap();
    for n in 0..20 {
        alice.send("bob", "n", &serde_json::json!({ "n": n })).await.unwrap();
    }
    tb.broker.change_authz("revoke alice → bob", |p| p.revoke(&id("alice"), &id("bob")));
    assert!(alice.send("bob", "n", &serde_json::json!({})).await.is_err());
    assert!(eventually_async(Duration::from_secs(5), || async { handled.load(Ordering::SeqCst) == 20 }).await);

    // The store: every chain verifies, the security chain holds the management change.
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            let report = tb.broker.verify_audit().await.unwrap();
            report.is_intact() && report.chains.iter().any(|c| c.chain == "security" && c.records == 1)
        })
        .await
    );
    let Backend::Memory(memory) = tb.broker.store().backend() else { panic!("embedded store expected") };
    assert!(memory.tamper_with_audit(&id("bob"), 7, |r| r.decision = Decision::DlpBlocked));
    let report = tb.broker.verify_audit().await.unwrap();
    assert!(!report.is_intact(), "an edited record must fail verification");
    let bad: Vec<_> = report.chains.iter().filter(|c| c.result.is_err()).map(|c| c.chain.as_str()).collect();
    assert_eq!(bad, ["agent:bob"]);

    // The JSONL file: intact as written, broken after one line is edited.
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            std::fs::read_to_string(&file).map(|t| t.lines().count() == 22).unwrap_or(false)
        })
        .await
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let report = verify_lines(text.lines().enumerate());
    assert!(report.is_intact(), "{:?}", report.errors);
    assert_eq!(report.chains["agent:bob"].records, 21);
    let edited = text.replacen("\"ALLOWED\"", "\"ALERT\"", 1);
    let report = verify_lines(edited.lines().enumerate());
    assert!(!report.is_intact());
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn authentication_denials_are_security_events() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let err = mas_agent::AgentBuilder::new(tb.agent_config("mallory")).start().await.expect_err("refused");
    assert_eq!(status_of(&err).1, "agent_not_allowlisted");
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            let events = tb.broker.store().security_chain().await.unwrap().records;
            events.iter().any(|e| e.event_type == "authentication_denied" && e.details["agent"] == "mallory")
        })
        .await
    );
    assert!(tb.broker.verify_audit().await.unwrap().is_intact());
    tb.stop().await;
}

/// A CA-signed but not allowlisted certificate hammering the broker: each refusal still
/// answers `agent_not_allowlisted`, but the security chain records one event per window.
#[tokio::test]
async fn a_flood_of_denied_calls_is_recorded_once_per_window_with_its_count() {
    let tb = TestBroker::start(&[("alice", &[])]).await;
    let mallory = tb.ca.agent_cert(&mas_tests::id("mallory")).unwrap();
    let mut client = tb.raw_client(Some(&mallory)).await.unwrap();
    for _ in 0..500 {
        let req = mas_proto::runtime::SendRequest { instance_id: "i1".into(), ..Default::default() };
        let refused = client.send(req).await.expect_err("refused");
        assert_eq!(refused.message(), "agent_not_allowlisted");
    }
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            !tb.broker.store().security_chain().await.unwrap().records.is_empty()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = tb.broker.store().security_chain().await.unwrap().records;
    let denials: Vec<_> = events.iter().filter(|e| e.event_type == "authentication_denied").collect();
    assert!(denials.len() <= 2, "500 denials within seconds gave {} records", denials.len());
    assert_eq!(denials[0].details["agent"], "mallory");
    assert_eq!(denials[0].details["suppressed_repeats"], 0);
    tb.stop().await;
}

#[tokio::test]
async fn a_failing_target_trips_its_circuit_and_recovers_through_half_open() {
    // Retries far in the future, so only new messages reach bob during the test.
    let delivery =
        DeliverySettings { retry_backoff_initial_ms: 600_000, retry_backoff_max_ms: 600_000, ..Default::default() };
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        c.delivery = delivery;
        let cb = &mut c.gateway.circuit_breaker;
        (cb.failure_threshold, cb.timeout_seconds, cb.success_threshold, cb.max_probes) = (3, 1.0, 1, 1);
    })
    .await;
    let healthy = Arc::new(AtomicBool::new(false));
    let (failures, successes) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let bob = {
        let (healthy, failures, successes) = (healthy.clone(), failures.clone(), successes.clone());
        tb.agent("bob")
            .fallback(move |_, _| {
                let (healthy, failures, successes) = (healthy.clone(), failures.clone(), successes.clone());
                async move {
                    if !healthy.load(Ordering::SeqCst) {
                        failures.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::from("backend down"));
                    }
                    // A slow probe: the circuit stays half-open with its one probe out meanwhile.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    successes.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .start()
            .await
            .unwrap()
    };
    let alice = tb.agent("alice").start().await.unwrap();
    let send = |n: u32| {
        let alice = alice.clone();
        async move { alice.send("bob", "job", &serde_json::json!({ "n": n })).await }
    };
    for n in 0..3 {
        send(n).await.unwrap();
    }
    // Each failed message is one failure; the third opens the circuit.
    let mut n = 3;
    let opened =
        eventually_async(Duration::from_secs(5), || {
            n += 1;
            let attempt = send(n);
            async move {
                matches!(attempt.await, Err(e) if status_of(&e) == (Code::FailedPrecondition, "circuit_open".into()))
            }
        })
        .await;
    assert!(opened, "the circuit must open after 3 failed messages");

    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(100).await.expect("half-open admits a probe");
    let err = send(101).await.expect_err("only one probe while it is out");
    assert_eq!(status_of(&err), (Code::FailedPrecondition, "circuit_open".into()));
    assert!(eventually_async(Duration::from_secs(5), || async { successes.load(Ordering::SeqCst) == 1 }).await);
    assert!(
        eventually_async(Duration::from_secs(5), || async { send(102).await.is_ok() }).await,
        "a successful probe closes the circuit"
    );
    let open = records(&tb, AuditFilter { decision: Some(Decision::CircuitOpen), ..Default::default() }).await;
    assert!(open.len() >= 2 && open.iter().all(|r| r.violations == ["circuit_open"]), "{open:?}");
    assert!(tb.broker.verify_audit().await.unwrap().is_intact());
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn on_redis_replies_are_audited_and_an_edited_record_fails_verification() {
    let Some(redis) = mas_tests::redis_server::RedisServer::start() else { return };
    let tb = TestBroker::start_on_redis(&[("alice", &["bob"]), ("bob", &[])], &redis.url).await;
    let bob = tb
        .agent("bob")
        .on("ping", |agent, msg: mas_agent::Message<serde_json::Value>| async move {
            agent.reply(&msg.envelope, "pong", &serde_json::json!({"ok": true})).await?;
            Ok::<(), HandlerError>(())
        })
        .start()
        .await
        .unwrap();
    let alice = tb.agent("alice").start().await.unwrap();
    for n in 0..5 {
        let reply = alice.request("bob", "ping", &serde_json::json!({ "n": n }), Duration::from_secs(5)).await.unwrap();
        assert_eq!(reply.data["ok"], true);
    }
    // Concurrent sends to one chain are committed in shared batches; the chain stays linear.
    let sends: Vec<_> = (0..50)
        .map(|n| {
            let a = alice.clone();
            tokio::spawn(async move { a.send("bob", "ping", &serde_json::json!({ "n": n })).await })
        })
        .collect();
    for send in sends {
        send.await.expect("send task").unwrap();
    }
    let report = tb.broker.verify_audit().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    let count = |chain: &str| report.chains.iter().find(|c| c.chain == chain).map_or(0, |c| c.records);
    assert_eq!(count("agent:bob"), 55, "requests and sends are recorded in bob's chain");
    assert_eq!(count("agent:alice"), 5, "replies are recorded in the requester's chain");

    let edit = |n: usize, r: &str| if n == 3 { r.replace("\"ALLOWED\"", "\"ALERT\"") } else { r.to_string() };
    rewrite_audit_stream(&redis.url, "mas:{bob}:audit", edit).await;
    let report = tb.broker.verify_audit().await.unwrap();
    let bad: Vec<_> = report.chains.iter().filter(|c| c.result.is_err()).map(|c| c.chain.as_str()).collect();
    assert_eq!(bad, ["agent:bob"]);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

/// Sends `n` messages alice → bob, retrying while bob's chain is full (refused until archived).
/// Returns how many sends were refused with `audit_capacity_exceeded` on the way.
async fn send_through_archiving(alice: &mas_agent::Agent, n: u32) -> u32 {
    let mut refused = 0;
    for i in 0..n {
        loop {
            match alice.send("bob", "n", &serde_json::json!({ "i": i })).await {
                Ok(_) => break,
                Err(err) if status_of(&err) == (Code::ResourceExhausted, "audit_capacity_exceeded".into()) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("send {i}: {err}"),
            }
        }
    }
    refused
}

async fn archiving_keeps_chains_open_and_verifiable(redis: Option<&str>) {
    let dir = scratch_dir();
    let archive = dir.clone();
    let redis = redis.map(mas_server::store::redis::RedisSettings::new);
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        c.redis = redis;
        c.gateway.rate_limit = mas_server::config::RateLimitSettings::unlimited();
        (c.gateway.audit.max_records_per_chain, c.gateway.audit.archive_batch) = (40, 10);
        // Archiving is the default; segments go under the data directory.
        c.data_dir = archive;
    })
    .await;
    let (bob, handled) = tb.counting_agent::<serde_json::Value>("bob", "n").await;
    let alice = tb.agent("alice").start().await.unwrap();
    let refused = send_through_archiving(&alice, 150).await;
    assert!(eventually_async(Duration::from_secs(10), || async { handled.load(Ordering::SeqCst) == 150 }).await);
    eprintln!("150 messages through a 40-record chain: {refused} sends had to wait for the archiver");

    let report = tb.broker.verify_audit().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    let bob_chain = report.chains.iter().find(|c| c.chain == "agent:bob").unwrap();
    assert!(bob_chain.archive_checked && bob_chain.archived >= 110, "{bob_chain:?}");
    assert_eq!(bob_chain.archived + bob_chain.records as u64, 150, "every accepted send, none of the refused");
    let epoch_dir = tb.broker.audit().archive_dir().unwrap().to_path_buf();
    assert!(epoch_dir.starts_with(dir.join("audit-archive")), "{}", epoch_dir.display());
    let segments = mas_server::audit::archive::verify_segments(&epoch_dir.join("bob")).unwrap();
    assert!(segments.errors.is_empty() && segments.records == bob_chain.archived, "{segments:?}");

    // An edited archived record is found, and so is a missing newest segment.
    let mut files: Vec<_> = std::fs::read_dir(epoch_dir.join("bob")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let original = std::fs::read_to_string(&files[1]).unwrap();
    std::fs::write(&files[1], original.replacen("\"ALLOWED\"", "\"ALERT\"", 1)).unwrap();
    assert!(!tb.broker.verify_audit().await.unwrap().is_intact(), "edited segment");
    std::fs::write(&files[1], &original).unwrap();
    assert!(tb.broker.verify_audit().await.unwrap().is_intact());
    let newest = files.last().unwrap();
    let kept = std::fs::read_to_string(newest).unwrap();
    std::fs::remove_file(newest).unwrap();
    assert!(!tb.broker.verify_audit().await.unwrap().is_intact(), "missing newest segment");
    std::fs::write(newest, kept).unwrap();
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Strict mode keeps every record in the store: a full chain refuses what it would record,
/// and nothing is archived.
#[tokio::test]
async fn strict_mode_refuses_messages_a_full_chain_would_record() {
    let tb = TestBroker::start_custom(&[("alice", &["bob"]), ("bob", &[])], |c| {
        c.gateway.rate_limit = mas_server::config::RateLimitSettings::unlimited();
        (c.gateway.audit.max_records_per_chain, c.gateway.audit.archive_batch) = (6, 3);
        c.gateway.audit.on_full = mas_server::config::OnFullChain::Refuse;
    })
    .await;
    assert!(tb.broker.audit().archive_dir().is_none());
    let (bob, handled) = tb.counting_agent::<serde_json::Value>("bob", "n").await;
    let alice = tb.agent("alice").start().await.unwrap();
    for i in 0..6 {
        alice.send("bob", "n", &serde_json::json!({ "i": i })).await.unwrap();
    }
    let refused = alice.send("bob", "n", &serde_json::json!({ "i": 6 })).await.unwrap_err();
    assert_eq!(status_of(&refused), (Code::ResourceExhausted, "audit_capacity_exceeded".into()));
    assert!(eventually_async(Duration::from_secs(5), || async { handled.load(Ordering::SeqCst) == 6 }).await);
    alice.stop().await;
    bob.stop().await;
    tb.stop().await;
}

#[tokio::test]
async fn archiving_keeps_a_full_chain_open_and_verifiable() {
    archiving_keeps_chains_open_and_verifiable(None).await;
}

#[tokio::test]
async fn archiving_on_redis_keeps_a_full_chain_open_and_verifiable() {
    let Some(redis) = mas_tests::redis_server::RedisServer::start() else { return };
    archiving_keeps_chains_open_and_verifiable(Some(&redis.url)).await;
}
