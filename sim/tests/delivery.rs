//! Delivery under faults, on the real broker and agent code:
//! (a) the consumer's node crashes with deliveries in flight and restarts;
//! (b) packet loss plus a partition between the consumer and the broker, then heal;
//! (c) the same seed gives a byte-identical trace, another seed a different one.

#![cfg(madsim)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::{Rng, thread_rng};
use madsim::runtime::Handle;
use mas_agent::{HandlerError, Message};
use mas_core::store::MemoryStoreConfig;
use mas_core::store::QueueKey;
use mas_server::config::DeliverySettings;
use mas_server::store::{MemoryBackend, Store};
use serde::Deserialize;
use sim::seeds::{run_each, simulate};
use sim::trace::Trace;
use sim::world::{agent_config, broker_config, id, send_with_retry, spawn_node, start_agent, start_broker, wait_until};

/// Messages the producer sends per run.
const MESSAGES: u32 = 40;
/// How long, after the faults heal, every accepted message has to be handled (virtual time).
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize)]
struct Job {
    seq: u32,
}

/// One completed handler run on the consumer.
#[derive(Debug, Clone)]
struct Handled {
    message_id: String,
    seq: u32,
    instance: String,
    at_ms: f64,
}

type HandledLog = Arc<Mutex<Vec<Handled>>>;

/// What a scenario run leaves for the checkers.
struct Run {
    trace: Vec<String>,
    accepted: BTreeMap<String, u32>,
    handled: Vec<Handled>,
    /// Virtual time of the crash and the crashed instance, if the scenario crashed the consumer.
    crash: Option<(f64, String)>,
    queue_left: usize,
    dead_letters: usize,
}

/// Starts the consumer "bob" on its own node; each (re)start is a new instance `b0`, `b1`, …
/// Its handler takes 10–150 ms, so a crash usually catches deliveries in flight.
fn start_consumer(handle: &Handle, trace: &Trace, handled: &HandledLog) -> madsim::runtime::NodeHandle {
    let starts = Arc::new(AtomicU32::new(0));
    let (trace, handled) = (trace.clone(), handled.clone());
    handle
        .create_node()
        .name("bob")
        .ip("10.0.0.3".parse().expect("ip"))
        .init(move || {
            let instance = format!("b{}", starts.fetch_add(1, Ordering::Relaxed));
            let (trace, handled) = (trace.clone(), handled.clone());
            async move {
                let make = || {
                    let (trace, handled, instance) = (trace.clone(), handled.clone(), instance.clone());
                    mas_agent::AgentBuilder::new(agent_config("bob", &instance)).on(
                        "job",
                        move |_, msg: Message<Job>| {
                            let (trace, handled, instance) = (trace.clone(), handled.clone(), instance.clone());
                            async move {
                                let work = Duration::from_millis(thread_rng().gen_range(10..150));
                                tokio::time::sleep(work).await;
                                let at_ms = trace.now_ms();
                                trace.record(
                                    "bob",
                                    format_args!(
                                        "{instance} handled seq={} id={}",
                                        msg.payload.seq, msg.envelope.message_id
                                    ),
                                );
                                handled.lock().unwrap().push(Handled {
                                    message_id: msg.envelope.message_id.clone(),
                                    seq: msg.payload.seq,
                                    instance,
                                    at_ms,
                                });
                                Ok::<(), HandlerError>(())
                            }
                        },
                    )
                };
                let _agent = start_agent(&trace, "bob", make).await;
                std::future::pending::<()>().await;
            }
        })
        .build()
}

/// Starts the producer "alice", which sends `MESSAGES` jobs with retries and records each
/// accepted message id.
fn start_producer(handle: &Handle, trace: &Trace, accepted: &Arc<Mutex<BTreeMap<String, u32>>>) {
    let (trace, accepted) = (trace.clone(), accepted.clone());
    spawn_node(handle, "alice", "10.0.0.2", async move {
        let alice = start_agent(&trace, "alice", || mas_agent::AgentBuilder::new(agent_config("alice", "a0"))).await;
        for seq in 0..MESSAGES {
            let id = send_with_retry(&trace, "alice", &alice, "bob", "job", &serde_json::json!({ "seq": seq })).await;
            trace.record("alice", format_args!("accepted seq={seq} id={id}"));
            accepted.lock().unwrap().insert(id, seq);
            tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(5..40))).await;
        }
    });
}

fn grants() -> [(&'static str, &'static [&'static str]); 2] {
    [("alice", &["bob"]), ("bob", &[])]
}

/// Scenario (a): bob crashes at a seed-chosen moment while work is in flight, stays down for
/// a seed-chosen time, and restarts as a new instance.
fn crash_and_restart(seed: u64) -> Run {
    simulate(seed, madsim::Config::default(), || async move {
        let handle = Handle::current();
        let trace = Trace::new();
        let store = Store::Memory(MemoryBackend::new(MemoryStoreConfig::default()));
        start_broker(&handle, store.clone(), broker_config(&grants(), seed, DeliverySettings::default()));
        let handled = HandledLog::default();
        let accepted = Arc::new(Mutex::new(BTreeMap::new()));
        let bob = start_consumer(&handle, &trace, &handled);
        start_producer(&handle, &trace, &accepted);

        let (kill_after, down_for) = {
            let mut rng = thread_rng();
            (Duration::from_millis(rng.gen_range(200..1200)), Duration::from_millis(rng.gen_range(100..3000)))
        };
        tokio::time::sleep(kill_after).await;
        let crash_ms = trace.now_ms();
        trace.record("nemesis", "kill bob");
        handle.kill(bob.id());
        tokio::time::sleep(down_for).await;
        trace.record("nemesis", "restart bob");
        handle.restart(bob.id());

        settle(&trace, &accepted, &handled).await;
        finish(trace, accepted, handled, Some((crash_ms, "b0".to_string())), &store).await
    })
}

/// Scenario (b): seed-chosen packet loss on every link, plus a partition between bob and the
/// broker that heals after a seed-chosen time.
fn loss_and_partition(seed: u64) -> Run {
    simulate(seed, madsim::Config::default(), || async move {
        let handle = Handle::current();
        let trace = Trace::new();
        let net = madsim::net::NetSim::current();
        let (loss, cut_after, cut_for) = {
            let mut rng = thread_rng();
            (
                rng.gen_range(0.01..0.15),
                Duration::from_millis(rng.gen_range(100..1500)),
                Duration::from_millis(rng.gen_range(500..5000)),
            )
        };
        net.update_config(|c| c.packet_loss_rate = loss);
        trace.record("nemesis", format_args!("packet loss {loss:.3}"));
        let store = Store::Memory(MemoryBackend::new(MemoryStoreConfig::default()));
        let broker = start_broker(&handle, store.clone(), broker_config(&grants(), seed, DeliverySettings::default()));
        let handled = HandledLog::default();
        let accepted = Arc::new(Mutex::new(BTreeMap::new()));
        let bob = start_consumer(&handle, &trace, &handled);
        start_producer(&handle, &trace, &accepted);

        tokio::time::sleep(cut_after).await;
        trace.record("nemesis", "partition bob <-> broker");
        net.clog_link(bob.id(), broker.id());
        net.clog_link(broker.id(), bob.id());
        tokio::time::sleep(cut_for).await;
        net.unclog_link(bob.id(), broker.id());
        net.unclog_link(broker.id(), bob.id());
        trace.record("nemesis", "heal partition");
        net.update_config(|c| c.packet_loss_rate = 0.0);
        trace.record("nemesis", "loss off");

        settle(&trace, &accepted, &handled).await;
        finish(trace, accepted, handled, None, &store).await
    })
}

/// Waits until the producer is done and every accepted message was handled, or the limit.
async fn settle(trace: &Trace, accepted: &Arc<Mutex<BTreeMap<String, u32>>>, handled: &HandledLog) {
    let all_handled = || {
        let accepted = accepted.lock().unwrap();
        let handled: BTreeSet<String> = handled.lock().unwrap().iter().map(|h| h.message_id.clone()).collect();
        accepted.len() as u32 >= MESSAGES && accepted.keys().all(|id| handled.contains(id))
    };
    if !wait_until(SETTLE_LIMIT, all_handled).await {
        trace.record("checker", "settle limit reached");
    }
    // Let the last acks reach the store.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn finish(
    trace: Trace,
    accepted: Arc<Mutex<BTreeMap<String, u32>>>,
    handled: HandledLog,
    crash: Option<(f64, String)>,
    store: &Store,
) -> Run {
    let accepted = accepted.lock().unwrap().clone();
    let handled = handled.lock().unwrap().clone();
    Run {
        trace: trace.snapshot(),
        accepted,
        handled,
        crash,
        queue_left: store.queue_len(&QueueKey::Work(id("bob"))).await.expect("memory store"),
        dead_letters: store.dead_letters(&id("bob"), 1000).await.expect("memory store").len(),
    }
}

/// Nothing accepted is lost; every sequence number got through; the queue drained.
fn check_nothing_lost(seed: u64, run: &Run) {
    let handled_ids: BTreeSet<&str> = run.handled.iter().map(|h| h.message_id.as_str()).collect();
    let lost: Vec<_> = run.accepted.iter().filter(|(id, _)| !handled_ids.contains(id.as_str())).collect();
    assert!(lost.is_empty(), "seed {seed}: accepted but never handled: {lost:?}\n{}", run.trace.join("\n"));
    let seqs: BTreeSet<u32> = run.handled.iter().map(|h| h.seq).collect();
    assert_eq!(seqs.len() as u32, MESSAGES, "seed {seed}: some sequence numbers never handled");
    assert_eq!(run.queue_left, 0, "seed {seed}: entries left in bob's queue (unacked)\n{}", run.trace.join("\n"));
    assert_eq!(run.dead_letters, 0, "seed {seed}: unexpected dead letters");
}

/// A message is handled more than once only if a crashed instance had it in flight: at most
/// once per instance, and every extra handling happened on the crashed instance before the crash.
fn check_duplicates_only_from_crash(seed: u64, run: &Run) {
    let mut by_id: BTreeMap<&str, Vec<&Handled>> = BTreeMap::new();
    for h in &run.handled {
        by_id.entry(&h.message_id).or_default().push(h);
    }
    for (id, runs) in by_id.iter().filter(|(_, r)| r.len() > 1) {
        let instances: BTreeSet<&str> = runs.iter().map(|h| h.instance.as_str()).collect();
        assert_eq!(instances.len(), runs.len(), "seed {seed}: {id} handled twice by one instance: {runs:?}");
        let Some((crash_ms, crashed)) = &run.crash else {
            panic!("seed {seed}: {id} handled {} times without any crash: {runs:?}", runs.len());
        };
        let before_crash = runs.iter().filter(|h| &h.instance == crashed && h.at_ms <= *crash_ms).count();
        assert_eq!(before_crash, runs.len() - 1, "seed {seed}: duplicate of {id} not explained by the crash: {runs:?}");
    }
}

/// `SIM_TRACE=1` prints every run's trace (use with `SIM_SEED`).
fn print_trace_if_asked(run: &Run) {
    if std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("{}", run.trace.join("\n"));
    }
}

#[test]
fn consumer_crash_with_deliveries_in_flight_loses_nothing() {
    let mut duplicates = 0;
    run_each("consumer_crash_with_deliveries_in_flight_loses_nothing", |seed| {
        let run = crash_and_restart(seed);
        print_trace_if_asked(&run);
        check_nothing_lost(seed, &run);
        check_duplicates_only_from_crash(seed, &run);
        duplicates += run.handled.len() - run.handled.iter().map(|h| &h.message_id).collect::<BTreeSet<_>>().len();
    });
    eprintln!("redeliveries after crashes across all seeds: {duplicates}");
}

#[test]
fn loss_and_partition_then_heal_delivers_everything() {
    run_each("loss_and_partition_then_heal_delivers_everything", |seed| {
        let run = loss_and_partition(seed);
        print_trace_if_asked(&run);
        check_nothing_lost(seed, &run);
        // No crash and the partition is shorter than the ack deadline: exactly once per message.
        check_duplicates_only_from_crash(seed, &run);
    });
}

#[test]
fn same_seed_same_trace_other_seed_other_trace() {
    run_each("same_seed_same_trace_other_seed_other_trace", |seed| {
        let first = crash_and_restart(seed).trace;
        let again = crash_and_restart(seed).trace;
        if let Some(i) = (0..first.len().max(again.len())).find(|&i| first.get(i) != again.get(i)) {
            panic!("seed {seed}: traces diverge at line {i}:\n  {:?}\n  {:?}", first.get(i), again.get(i));
        }
        let other = crash_and_restart(seed.wrapping_add(1_000_000)).trace;
        assert_ne!(first, other, "seed {seed}: a different seed gave the same trace");
    });
}
