//! What the broker's Prometheus instruments cost per message: every metric call one send
//! makes on its way through the broker (its RPC, its admission decision, the store steps of
//! admission, claim and settle, its delivery and its ack), on one thread. Compare with the
//! admission pipeline bench (`policy.rs`, `pipeline/*`) for the share of a message's work.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mas_core::delivery::{EntryId, StoreEffect};
use mas_core::ids::AgentId;
use mas_core::policy::audit::Decision;
use mas_server::metrics::{Method, Metrics, Settled, StoreMetrics};

fn per_message(c: &mut Criterion) {
    let agents: Vec<AgentId> = ["alice", "bob"].iter().map(|a| AgentId::new(a).expect("id")).collect();
    let store = StoreMetrics::default();
    let metrics = Metrics::new(agents.iter(), &store);
    let bob = &agents[1];
    let ack = StoreEffect::Ack { entry: EntryId::from_seq(1) };
    let step = Duration::from_micros(40);
    c.bench_function("metrics/one_send_delivered_and_acked", |b| {
        b.iter(|| {
            metrics.rpc(Method::send, tonic::Code::Ok, black_box(step));
            for op in ["gate", "admit_rate", "admit", "claim", "apply"] {
                store.observe(op, black_box(step), false);
            }
            metrics.admitted(Decision::Allowed, "alice");
            metrics.delivered(bob, 1);
            metrics.in_flight_changed(bob, 1);
            metrics.settled(bob, [Settled::of(black_box(&ack))]);
            metrics.in_flight_changed(bob, -1);
        })
    });
    c.bench_function("metrics/encode_scrape", |b| b.iter(|| black_box(metrics.encode())));
}

criterion_group!(benches, per_message);
criterion_main!(benches);
