//! Hot paths of one message: payload validation, envelope encoding, the delivery machine's
//! queue → deliver → ack cycle, and the embedded store's enqueue → claim → ack.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mas_benches::{envelope, payload_json, queued};
use mas_core::delivery::{DeliveryConfig, Output, SessionDelivery};
use mas_core::envelope::parse_payload;
use mas_core::ids::{AgentId, InstanceId};
use mas_core::store::{MemoryStore, MemoryStoreConfig, OwnerToken, QueueKey, SessionRef};
use mas_core::time::{Instant, Now};

fn envelope_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope");
    for size in [256usize, 2048] {
        let json = payload_json(size);
        group.throughput(Throughput::Bytes(json.len() as u64));
        group.bench_with_input(BenchmarkId::new("parse_payload", size), &json, |b, json| {
            b.iter(|| parse_payload(black_box(json)))
        });
        let env = envelope(size);
        group.bench_with_input(BenchmarkId::new("to_json", size), &env, |b, env| b.iter(|| black_box(env).to_json()));
    }
    group.finish();
}

/// One full cycle per iteration through a machine that keeps a realistic window in flight.
fn delivery_cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("delivery_machine");
    group.throughput(Throughput::Elements(1));
    let env: Arc<str> = Arc::from(envelope(256).to_json());
    for window in [1usize, 200] {
        group.bench_function(BenchmarkId::new("queue_deliver_ack", window), |b| {
            let mut machine = SessionDelivery::new(DeliveryConfig::default(), 1);
            let now = Now::from_mono(Instant::from_nanos(1));
            let mut in_flight = std::collections::VecDeque::new();
            let mut seq = 0u64;
            b.iter(|| {
                while in_flight.len() < window {
                    machine.handle_queued(now, queued(seq, &env));
                    seq += 1;
                    while let Some(out) = machine.poll_output() {
                        if let Output::Deliver(d) = out {
                            in_flight.push_back(d.delivery_id);
                        }
                    }
                }
                let id = in_flight.pop_front().expect("window is full");
                machine.handle_ack(now, &id);
                while let Some(out) = machine.poll_output() {
                    black_box(out);
                }
            })
        });
    }
    group.finish();
}

fn memory_store_cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_store");
    group.throughput(Throughput::Elements(1));
    let env: Arc<str> = Arc::from(envelope(256).to_json());
    group.bench_function("enqueue_claim_ack", |b| {
        let mut store = MemoryStore::new(MemoryStoreConfig::default());
        let session = SessionRef {
            agent: AgentId::new("bob").expect("id"),
            instance: InstanceId::new("b1").expect("id"),
            owner: OwnerToken::new("s1"),
        };
        let queue = QueueKey::Work(session.agent.clone());
        store.acquire_lease(&session, std::time::Duration::from_secs(3600), Instant::ZERO).expect("free");
        b.iter(|| {
            store.enqueue(&queue, env.clone()).expect("room");
            let claimed = store.claim(&session, 1, Instant::ZERO);
            for m in claimed {
                let ack = mas_core::delivery::StoreEffect::Ack { entry: m.entry };
                store.apply(&session, ack, Instant::ZERO).expect("held");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, envelope_codec, delivery_cycle, memory_store_cycle);
criterion_main!(benches);
