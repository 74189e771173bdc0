//! Each policy engine alone, on in-memory state: DLP scans (the reference's 2.1 KB test
//! string, 256 B and 2 KB payloads, all default rules), authorization, rate limiting, the
//! circuit breaker, and an audit append (hash over canonical JSON); then the whole admission
//! pipeline of a send as the broker runs it, on the embedded store.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;

use mas_core::admission::{Authorization, Batch};
use mas_core::envelope::{Envelope, Payload, parse_payload};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::payload::WirePayload;
use mas_core::policy::audit::{AuditRecord, Chain, Decision, payload_hash};
use mas_core::policy::authz::AuthzPolicy;
use mas_core::policy::circuit::{Circuit, CircuitConfig};
use mas_core::policy::dlp::{Dlp, DlpSettings};
use mas_core::policy::ratelimit::{Limits, RateState, admit};
use mas_core::store::{Admission, MemoryStore, MemoryStoreConfig, TargetGate};
use mas_core::time::{Instant, UnixMillis};

/// About 2.1 KB of prose with one email address and one SSN, like the reference's test.
fn reference_text() -> String {
    let filler = "The quarterly report covers operations, staffing and the roadmap for next year. ";
    let mut text = String::new();
    while text.len() < 1000 {
        text.push_str(filler);
    }
    text.push_str("Contact jane.doe@example.com about case 123-45-6789. ");
    while text.len() < 2100 {
        text.push_str(filler);
    }
    text
}

/// A realistic JSON object of about `bytes` bytes: nested fields, numbers, a list, no PII.
fn business_payload(bytes: usize) -> Payload {
    let mut items = Vec::new();
    let mut json = String::new();
    while json.len() < bytes {
        items.push(format!(
            r#"{{"sku":"SKU-{n:05}","qty":{n},"price":{p}.99,"note":"standard shipping to warehouse {n}"}}"#,
            n = items.len(),
            p = items.len() * 3
        ));
        json = format!(
            r#"{{"order_id":"ord-2024-000017","customer":{{"tier":"gold","region":"eu-west"}},"items":[{}]}}"#,
            items.join(",")
        );
    }
    parse_payload(&json).expect("fixture is an object")
}

fn dlp(c: &mut Criterion) {
    let scanner = Dlp::new(&DlpSettings::default()).expect("default rules compile");
    let mut group = c.benchmark_group("dlp_scan");
    let text = reference_text();
    let reference: Payload = [("text".to_string(), serde_json::Value::String(text.clone()))].into_iter().collect();
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("reference_2.1KB_string", |b| b.iter(|| scanner.scan(black_box(&reference))));
    for size in [256usize, 2048] {
        let payload = business_payload(size);
        group.throughput(Throughput::Bytes(serde_json::to_string(&payload).map_or(0, |s| s.len()) as u64));
        group.bench_with_input(BenchmarkId::new("payload", size), &payload, |b, p| {
            b.iter(|| scanner.scan(black_box(p)))
        });
    }
    group.finish();
}

fn engines(c: &mut Criterion) {
    let (alice, bob) = (AgentId::new("alice").expect("id"), AgentId::new("bob").expect("id"));
    let mut policy = AuthzPolicy::new(true);
    policy.set_role("workers", &["send:worker-*", "send:agent.*"]);
    policy.assign_role(&alice, "workers");
    policy.allow(&alice, &[AgentId::new("carol").expect("id")]);
    c.bench_function("authz/role_glob", |b| b.iter(|| policy.authorize(black_box(&alice), black_box(&bob), true)));

    let limits = Limits::default();
    let mut state = RateState::default();
    let mut now = Instant::from_nanos(1_000_000_000_000);
    c.bench_function("ratelimit/admit", |b| {
        b.iter(|| {
            now = now + Duration::from_secs(1);
            if let Ok(next) = admit(limits, state, black_box(now)) {
                state = next;
            }
        })
    });

    let config = CircuitConfig::default();
    let mut circuit = Circuit::default();
    c.bench_function("circuit/admit_and_success", |b| {
        b.iter(|| {
            let _ = circuit.admit(&config, black_box(now));
            circuit.record_success(&config, now);
        })
    });

    let payload = business_payload(2048);
    let mut chain = Chain::default();
    c.bench_function("audit/append_2KB", |b| {
        b.iter(|| {
            let record = AuditRecord {
                correlation_id: None,
                decision: Decision::Allowed,
                hash_version: 0,
                latency_ms: 0.02,
                message_id: "6f1c0e8e-1d4b-4c3a-9a57-6a0f6f1b2c3d".into(),
                message_type: Some("order".into()),
                payload_hash: payload_hash(black_box(&payload)),
                previous_hash: None,
                sender_id: "alice".into(),
                sender_instance_id: Some("a1".into()),
                target_id: "bob".into(),
                timestamp: 1_700_000_000.25,
                trace_id: None,
                violations: Vec::new(),
            };
            chain.append(record)
        })
    });
}

/// Messages per batch in the pipeline bench: what a `SendBatch` of a busy producer carries.
const PIPELINE_BATCH: usize = 64;

/// The whole admission pipeline on in-memory state, as the broker runs it for a batch of
/// sends, from each send's wire text: its payload parsed, authorization by policy, one gate read and one rate-limit step for the batch, the
/// decisions of `mas_core::admission` (circuit, DLP with all default rules), then per message
/// the audit record with the payload hash, the envelope JSON around the payload's canonical
/// text and the store's admission step
/// (circuit admission, queue insert, record linked into the target's hash chain), all on the
/// embedded memory store. Reported per message.
fn pipeline(c: &mut Criterion) {
    let scanner = Dlp::new(&DlpSettings::default()).expect("default rules compile");
    let (alice, bob) = (AgentId::new("alice").expect("id"), AgentId::new("bob").expect("id"));
    let a1 = InstanceId::new("a1").expect("id");
    let mut policy = AuthzPolicy::new(false);
    policy.allow(&alice, std::slice::from_ref(&bob));
    let limits = Limits { per_minute: u64::MAX / 4, per_hour: u64::MAX / 4 };
    let config = CircuitConfig::default();
    let fresh_store = || MemoryStore::new(MemoryStoreConfig { max_queue_len: usize::MAX, ..Default::default() });
    let mut group = c.benchmark_group("admission_pipeline");
    for size in [256usize, 2048] {
        let payload = business_payload(size);
        let mut store = fresh_store();
        let mut admitted = 0usize;
        let mut now = Instant::from_nanos(1_000_000_000_000);
        group.throughput(Throughput::Elements(PIPELINE_BATCH as u64));
        let wire = serde_json::to_string(&payload).expect("serialisable");
        group.bench_with_input(BenchmarkId::new("payload", size), &wire, |b, wire| {
            b.iter(|| {
                now = now + Duration::from_micros(1);
                // A fresh store every ~10 000 messages keeps memory flat; its drop is amortised
                // like the acks that free entries in a running broker.
                admitted += PIPELINE_BATCH;
                if admitted >= 10_000 {
                    admitted = 0;
                    store = fresh_store();
                }
                // The bench holds no sessions: bob's liveness is taken as given, the circuit read.
                let gate = TargetGate { live: true, ..store.gate(&bob, Some(&config), now) };
                let authorizations = (0..PIPELINE_BATCH)
                    .map(|_| match policy.authorize(&alice, &bob, true) {
                        Ok(_) => Authorization::Granted(gate),
                        Err(_) => Authorization::Denied,
                    })
                    .collect();
                let batch = Batch::new(authorizations);
                let grant = store.admit_rate(&alice, limits, now, batch.rate_demand());
                let payloads =
                    (0..PIPELINE_BATCH).map(|_| WirePayload::parse(black_box(wire)).expect("fixture parses")).collect();
                for verdict in batch.decide(grant, payloads, Some(&scanner)) {
                    assert!(verdict.routable());
                    let record = AuditRecord {
                        correlation_id: None,
                        decision: verdict.decision,
                        hash_version: 0,
                        latency_ms: 0.02,
                        message_id: "6f1c0e8e-1d4b-4c3a-9a57-6a0f6f1b2c3d".into(),
                        message_type: Some("order".into()),
                        payload_hash: verdict.payload.hash(),
                        previous_hash: None,
                        sender_id: alice.to_string(),
                        sender_instance_id: Some(a1.to_string()),
                        target_id: bob.to_string(),
                        timestamp: 1_700_000_000.25,
                        trace_id: None,
                        violations: verdict.violations,
                    };
                    let envelope = Envelope::new_send(
                        &alice,
                        &a1,
                        &bob,
                        "order".into(),
                        verdict.payload,
                        "6f1c0e8e-1d4b-4c3a-9a57-6a0f6f1b2c3d".into(),
                        UnixMillis(1_700_000_000_250),
                    );
                    let admission =
                        Admission { chain: bob.clone(), record, envelope: Some(Arc::from(envelope.to_json())) };
                    store.admit(admission, Some(&config), now).expect("admitted");
                }
            })
        });
    }
    group.finish();
}

/// The JSON work around the pipeline: parsing a request's payload (into `serde_json`'s map, and
/// as admission does, borrowing the wire text), its canonical JSON, and writing the envelope
/// (serialising the map, and as admission does, around the canonical text).
fn json(c: &mut Criterion) {
    let payload = business_payload(2048);
    let text = serde_json::to_string(&payload).expect("serialisable");
    c.bench_function("json/parse_payload_2KB", |b| b.iter(|| parse_payload(black_box(&text))));
    c.bench_function("json/wire_parse_2KB", |b| b.iter(|| WirePayload::parse(black_box(&text))));
    let wire = WirePayload::parse(&text).expect("fixture parses");
    c.bench_function("json/wire_canonical_2KB", |b| b.iter(|| black_box(&wire).canonical()));
    let canonical = wire.canonical();
    let (alice, bob) = (AgentId::new("alice").expect("id"), AgentId::new("bob").expect("id"));
    let a1 = InstanceId::new("a1").expect("id");
    let envelope =
        Envelope::new_send(&alice, &a1, &bob, "order".into(), payload, "m".into(), UnixMillis(1_700_000_000_250));
    c.bench_function("json/envelope_to_json_2KB", |b| b.iter(|| black_box(&envelope).to_json()));
    let written =
        Envelope::new_send(&alice, &a1, &bob, "order".into(), canonical, "m".into(), UnixMillis(1_700_000_000_250));
    c.bench_function("json/canonical_envelope_to_json_2KB", |b| b.iter(|| black_box(&written).to_json()));
}

criterion_group!(benches, dlp, engines, pipeline, json);
criterion_main!(benches);
