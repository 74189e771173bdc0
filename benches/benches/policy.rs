//! Each policy engine alone, on in-memory state: DLP scans (the reference's 2.1 KB test
//! string, 256 B and 2 KB payloads, all default rules), authorization, rate limiting, the
//! circuit breaker, and an audit append (hash over canonical JSON); then all of them in a row.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mas_core::envelope::{Payload, parse_payload};
use mas_core::ids::AgentId;
use mas_core::policy::audit::{AuditRecord, Chain, Decision, payload_hash};
use mas_core::policy::authz::AuthzPolicy;
use mas_core::policy::circuit::{Circuit, CircuitConfig};
use mas_core::policy::dlp::{Dlp, DlpSettings};
use mas_core::policy::ratelimit::{Limits, RateState, admit};
use mas_core::time::Instant;

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
                message_id: "6f1c0e8e-1d4b-4c3a-9a57-6a0f6f1b2c3d".into(),
                timestamp: 1_700_000_000.25,
                sender_id: "alice".into(),
                sender_instance_id: Some("a1".into()),
                target_id: "bob".into(),
                message_type: Some("order".into()),
                correlation_id: None,
                decision: Decision::Allowed,
                latency_ms: 0.02,
                payload_hash: payload_hash(black_box(&payload)),
                violations: Vec::new(),
                previous_hash: None,
                hash_version: 0,
            };
            chain.append(record)
        })
    });
}

/// The whole admission pipeline on in-memory state, in the issue's order: authorization → rate
/// limit → circuit breaker → DLP (all default rules) → audit record appended to its chain.
fn pipeline(c: &mut Criterion) {
    let scanner = Dlp::new(&DlpSettings::default()).expect("default rules compile");
    let (alice, bob) = (AgentId::new("alice").expect("id"), AgentId::new("bob").expect("id"));
    let mut policy = AuthzPolicy::new(false);
    policy.allow(&alice, std::slice::from_ref(&bob));
    let limits = Limits { per_minute: u64::MAX / 4, per_hour: u64::MAX / 4 };
    let config = CircuitConfig::default();
    let mut group = c.benchmark_group("admission_pipeline");
    for size in [256usize, 2048] {
        let payload = business_payload(size);
        let mut rate = RateState::default();
        let mut circuit = Circuit::default();
        let mut chain = Chain::default();
        let mut now = Instant::from_nanos(1_000_000_000_000);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("payload", size), &payload, |b, payload| {
            b.iter(|| {
                now = now + Duration::from_micros(1);
                policy.authorize(&alice, &bob, true).expect("granted");
                rate = admit(limits, rate, now).expect("within limits");
                circuit.admit(&config, now).expect("closed");
                let scan = scanner.scan(black_box(payload));
                let delivered = scan.redacted.as_ref().unwrap_or(payload);
                chain.append(AuditRecord {
                    message_id: "6f1c0e8e-1d4b-4c3a-9a57-6a0f6f1b2c3d".into(),
                    timestamp: 1_700_000_000.25,
                    sender_id: alice.to_string(),
                    sender_instance_id: Some("a1".into()),
                    target_id: bob.to_string(),
                    message_type: Some("order".into()),
                    correlation_id: None,
                    decision: Decision::Allowed,
                    latency_ms: 0.02,
                    payload_hash: payload_hash(delivered),
                    violations: scan.kinds(),
                    previous_hash: None,
                    hash_version: 0,
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, dlp, engines, pipeline);
criterion_main!(benches);
