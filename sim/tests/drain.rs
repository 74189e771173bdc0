//! Graceful shutdown under simulation, on the real broker and agent code: a broker told to
//! stop while deliveries are in flight waits for their acks up to `delivery.drain_timeout_ms`,
//! hands the rest back to the queue, and reports which happened (`Broker::drain_outcome`, the
//! `mas serve` exit code 0 or 3). Nothing accepted is lost either way, and the broker's
//! Prometheus counters agree with what the agents saw.

#![cfg(madsim)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use madsim::rand::{Rng, thread_rng};
use madsim::runtime::Handle;
use mas_agent::{AgentBuilder, HandlerError, Message};
use mas_core::store::QueueKey;
use mas_server::Broker;
use mas_server::config::DeliverySettings;
use sim::seeds::{run_each, simulate};
use sim::trace::Trace;
use sim::world::{
    BROKER_ADDR, agent_config, broker_config, id, memory_store, send_with_retry, spawn_node, start_agent,
};
use tokio::sync::Notify;

const MESSAGES: u32 = 20;
const DRAIN: Duration = Duration::from_millis(1_000);

#[derive(Debug, serde::Deserialize)]
struct Job {
    #[allow(dead_code)]
    n: u32,
}

/// What one run saw.
struct Drained {
    handed_back: u64,
    sessions_overran: bool,
    /// Handler runs that finished (their acks may or may not have reached the broker).
    finished: u32,
    /// Entries left in bob's queue after the drain.
    left: usize,
    /// `mas_acks_total{agent="bob"}` at the end.
    acks_metric: u64,
    /// `mas_in_flight{agent="bob"}` when the stop was asked for.
    in_flight_at_stop: u64,
    stop_took: Duration,
}

/// bob's handler takes `work` per message; the broker is told to stop once all messages are
/// in; `stuck` makes the handler never finish.
fn drain(seed: u64, stuck: bool) -> Drained {
    simulate(seed, madsim::Config::default(), || async move {
        let handle = Handle::current();
        let trace = Trace::new();
        let store = memory_store();
        let delivery = DeliverySettings { drain_timeout_ms: DRAIN.as_millis() as u64, ..Default::default() };
        let config = broker_config(&[("alice", &["bob"]), ("bob", &[])], seed, delivery);
        let broker = Broker::with_store(config, store.clone()).expect("valid config");
        let stop = Arc::new(Notify::new());
        let stopped = Arc::new(Notify::new());
        {
            let (broker, stop, stopped) = (broker.clone(), stop.clone(), stopped.clone());
            handle.create_node().name("broker").ip("10.0.0.1".parse().expect("ip")).build().spawn(async move {
                let listen = BROKER_ADDR.parse().expect("addr");
                mas_server::serve::serve_sim(broker, listen, async move { stop.notified().await })
                    .await
                    .expect("broker serves");
                stopped.notify_one();
            });
        }
        let work =
            if stuck { Duration::from_secs(3_600) } else { Duration::from_millis(thread_rng().gen_range(10..300)) };
        let finished = Arc::new(AtomicU32::new(0));
        {
            let (trace, finished) = (trace.clone(), finished.clone());
            spawn_node(&handle, "bob", "10.0.0.3", async move {
                let bob = start_agent(&trace, "bob", || {
                    let finished = finished.clone();
                    AgentBuilder::new(agent_config("bob", "b0")).on("job", move |_, _msg: Message<Job>| {
                        let finished = finished.clone();
                        async move {
                            tokio::time::sleep(work).await;
                            finished.fetch_add(1, Ordering::SeqCst);
                            Ok::<(), HandlerError>(())
                        }
                    })
                })
                .await;
                std::future::pending::<()>().await;
                drop(bob);
            });
        }
        let all_sent = Arc::new(Notify::new());
        {
            let (trace, all_sent) = (trace.clone(), all_sent.clone());
            spawn_node(&handle, "alice", "10.0.0.2", async move {
                let alice = start_agent(&trace, "alice", || AgentBuilder::new(agent_config("alice", "a0"))).await;
                for n in 0..MESSAGES {
                    send_with_retry(&trace, "alice", &alice, "bob", "job", &serde_json::json!({ "n": n })).await;
                }
                all_sent.notify_one();
                std::future::pending::<()>().await;
            });
        }
        all_sent.notified().await;
        // Let a seed-chosen part of the work start before the stop.
        tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(0..200))).await;
        let in_flight_at_stop = counter(&broker.metrics().encode(), "mas_in_flight{agent=\"bob\"}");
        let asked = tokio::time::Instant::now();
        stop.notify_one();
        stopped.notified().await;
        let stop_took = asked.elapsed();
        let outcome = broker.drain_outcome();
        let left = store.queue_len(&QueueKey::Work(id("bob"))).await.expect("memory store");
        Drained {
            handed_back: outcome.handed_back,
            sessions_overran: outcome.sessions_overran,
            finished: finished.load(Ordering::SeqCst),
            left,
            acks_metric: counter(&broker.metrics().encode(), "mas_acks_total{agent=\"bob\"}"),
            in_flight_at_stop,
            stop_took,
        }
    })
}

/// A sample's value in the OpenMetrics text.
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from the metrics"))
}

#[test]
fn a_drain_with_quick_handlers_is_clean_and_loses_nothing() {
    let mut drained_work = 0;
    run_each("a_drain_with_quick_handlers_is_clean_and_loses_nothing", |seed| {
        let d = drain(seed, false);
        drained_work += d.in_flight_at_stop;
        // 20 messages of at most 300 ms each, up to 200 (the window) at once: done within the
        // 1 s drain, so every delivery was acked and nothing handed back.
        assert_eq!((d.handed_back, d.sessions_overran), (0, false), "seed {seed}: the drain was clean");
        assert_eq!(d.left + d.acks_metric as usize, MESSAGES as usize, "seed {seed}: acked or still queued");
        assert_eq!(d.acks_metric, u64::from(d.finished), "seed {seed}: every finished handler's ack counted");
        assert!(d.stop_took <= DRAIN, "seed {seed}: stopped in {:?}", d.stop_took);
    });
    assert!(drained_work > 0, "the stops came while deliveries were in flight");
}

#[test]
fn a_drain_cut_short_hands_back_what_was_in_flight() {
    run_each("a_drain_cut_short_hands_back_what_was_in_flight", |seed| {
        let d = drain(seed, true);
        assert_eq!(d.finished, 0);
        assert_eq!(d.acks_metric, 0);
        assert_eq!(d.left, MESSAGES as usize, "seed {seed}: nothing lost, all back in the queue");
        assert!(d.handed_back > 0, "seed {seed}: the cut-short drain is reported");
        assert_eq!(d.handed_back, d.in_flight_at_stop, "seed {seed}: exactly what was in flight is handed back");
        assert!(
            d.stop_took >= DRAIN && d.stop_took <= DRAIN + Duration::from_secs(3),
            "seed {seed}: waited for the drain deadline, then stopped ({:?})",
            d.stop_took
        );
    });
}
