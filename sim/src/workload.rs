//! The standard workload and its checkers: a producer sends numbered jobs with retries, a
//! consumer handles them (10–150 ms each), and the checkers judge the whole run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::rand::{Rng, thread_rng};
use madsim::runtime::{Handle, NodeHandle};
use mas_agent::{AgentBuilder, HandlerError, Message};
use mas_core::store::QueueKey;
use mas_server::store::Store;
use serde::Deserialize;

use crate::trace::Trace;
use crate::world::{agent_config_for, id, send_with_retry, spawn_node, start_agent, wait_until};

/// How long, after the faults heal, every accepted message has to be handled (virtual time).
pub const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// How long the checker waits for acks still in transit after everything was handled: longer
/// than madsim's longest retry gap for a held-back packet (10 s), shorter than the default ack
/// deadline (30 s), so a lost ack still shows as a redelivery.
pub const ACK_SETTLE_LIMIT: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
struct Job {
    seq: u32,
}

/// One completed handler run on a consumer.
#[derive(Debug, Clone)]
pub struct Handled {
    /// The message.
    pub message_id: String,
    /// Its job number.
    pub seq: u32,
    /// The consumer instance that ran it.
    pub instance: String,
    /// Virtual time of completion.
    pub at_ms: f64,
    /// The envelope's timestamp: wall-clock seconds (virtual) when the broker admitted it.
    pub admitted_at: f64,
}

/// Every handler run, in order.
pub type HandledLog = Arc<Mutex<Vec<Handled>>>;
/// Message ids the broker accepted, with their job numbers.
pub type Accepted = Arc<Mutex<BTreeMap<String, u32>>>;

/// Where a consumer runs.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerSpec<'a> {
    /// Node name (also the trace label).
    pub node: &'a str,
    /// Node address.
    pub ip: &'a str,
    /// Brokers to use, preferred first.
    pub brokers: &'a [&'a str],
    /// Instance ids are this prefix plus the start count (`b0`, `b1` after a restart, …).
    pub instance_prefix: &'a str,
}

/// Starts a "bob" consumer node; each (re)start is a new instance.
pub fn start_consumer(handle: &Handle, trace: &Trace, handled: &HandledLog, spec: ConsumerSpec<'_>) -> NodeHandle {
    let starts = Arc::new(AtomicU32::new(0));
    let (trace, handled) = (trace.clone(), handled.clone());
    let brokers: Vec<String> = spec.brokers.iter().map(|b| b.to_string()).collect();
    let (node, prefix) = (spec.node.to_string(), spec.instance_prefix.to_string());
    handle
        .create_node()
        .name(spec.node)
        .ip(spec.ip.parse().expect("ip"))
        .init(move || {
            let instance = format!("{prefix}{}", starts.fetch_add(1, Ordering::Relaxed));
            let (trace, handled, brokers, node) = (trace.clone(), handled.clone(), brokers.clone(), node.clone());
            async move {
                let brokers: Vec<&str> = brokers.iter().map(String::as_str).collect();
                let make = || {
                    let (trace, handled, instance, node) =
                        (trace.clone(), handled.clone(), instance.clone(), node.clone());
                    AgentBuilder::new(agent_config_for("bob", &instance, &brokers)).on(
                        "job",
                        move |_, msg: Message<Job>| {
                            let (trace, handled, instance, node) =
                                (trace.clone(), handled.clone(), instance.clone(), node.clone());
                            async move {
                                tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(10..150))).await;
                                let at_ms = trace.now_ms();
                                trace.record(
                                    &node,
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
                                    admitted_at: msg.envelope.timestamp,
                                });
                                Ok::<(), HandlerError>(())
                            }
                        },
                    )
                };
                let _agent = start_agent(&trace, &node, make).await;
                std::future::pending::<()>().await;
            }
        })
        .build()
}

/// Starts the producer "alice", which sends `messages` jobs to bob with retries and records
/// each accepted message id.
pub fn start_producer(handle: &Handle, trace: &Trace, accepted: &Accepted, brokers: &[&str], messages: u32) {
    let (trace, accepted) = (trace.clone(), accepted.clone());
    let brokers: Vec<String> = brokers.iter().map(|b| b.to_string()).collect();
    spawn_node(handle, "alice", "10.0.0.2", async move {
        let brokers: Vec<&str> = brokers.iter().map(String::as_str).collect();
        let alice = start_agent(&trace, "alice", || AgentBuilder::new(agent_config_for("alice", "a0", &brokers))).await;
        for seq in 0..messages {
            let id = send_with_retry(&trace, "alice", &alice, "bob", "job", &serde_json::json!({ "seq": seq })).await;
            trace.record("alice", format_args!("accepted seq={seq} id={id}"));
            accepted.lock().unwrap().insert(id, seq);
            tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(5..40))).await;
        }
    });
}

/// What a run leaves for the checkers.
pub struct Outcome {
    /// The trace.
    pub trace: Vec<String>,
    /// Accepted message ids.
    pub accepted: BTreeMap<String, u32>,
    /// Handler runs.
    pub handled: Vec<Handled>,
    /// Virtual time of a consumer crash and the crashed instance, if any.
    pub crash: Option<(f64, String)>,
    /// Entries left in bob's work queue.
    pub queue_left: usize,
    /// Dead letters of bob.
    pub dead_letters: usize,
}

/// Waits until `messages` were accepted and all of them handled (or the settle limit), lets
/// the last acks land, then collects the outcome.
pub async fn settle(
    trace: Trace,
    accepted: &Accepted,
    handled: &HandledLog,
    messages: u32,
    crash: Option<(f64, String)>,
    store: &Store,
) -> Outcome {
    let all_handled = || {
        let accepted = accepted.lock().unwrap();
        let handled: BTreeSet<String> = handled.lock().unwrap().iter().map(|h| h.message_id.clone()).collect();
        accepted.len() as u32 >= messages && accepted.keys().all(|id| handled.contains(id))
    };
    if !wait_until(SETTLE_LIMIT, all_handled).await {
        trace.record("checker", "settle limit reached");
    }
    // The last acks may still be on their way: madsim's links retry a packet held back by a
    // partition with exponential backoff (up to 10 s between tries) and keep a connection's
    // packets in order, so acks sent during a cut can arrive seconds after the heal, well
    // before the 30 s ack deadline would redeliver anything. Wait for them, bounded.
    let acks_due = tokio::time::Instant::now() + ACK_SETTLE_LIMIT;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut queue_left = store.queue_len(&QueueKey::Work(id("bob"))).await.expect("memory store");
    while queue_left > 0 && tokio::time::Instant::now() < acks_due {
        tokio::time::sleep(Duration::from_millis(100)).await;
        queue_left = store.queue_len(&QueueKey::Work(id("bob"))).await.expect("memory store");
    }
    let dead_letters = store.dead_letters(&id("bob"), 1000).await.expect("memory store").len();
    let accepted = accepted.lock().unwrap().clone();
    let handled = handled.lock().unwrap().clone();
    Outcome { trace: trace.snapshot(), accepted, handled, crash, queue_left, dead_letters }
}

impl Outcome {
    /// `SIM_TRACE=1` prints the trace (use with `SIM_SEED`).
    pub fn print_trace_if_asked(&self) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("{}", self.trace.join("\n"));
        }
    }

    /// Redeliveries: handler runs beyond one per message.
    pub fn redeliveries(&self) -> usize {
        self.handled.len() - self.handled.iter().map(|h| &h.message_id).collect::<BTreeSet<_>>().len()
    }

    /// Nothing accepted is lost; every job number got through; the queue drained; no dead letters.
    pub fn check_nothing_lost(&self, seed: u64, messages: u32) {
        let handled_ids: BTreeSet<&str> = self.handled.iter().map(|h| h.message_id.as_str()).collect();
        let lost: Vec<_> = self.accepted.iter().filter(|(id, _)| !handled_ids.contains(id.as_str())).collect();
        assert!(lost.is_empty(), "seed {seed}: accepted but never handled: {lost:?}\n{}", self.trace.join("\n"));
        let seqs: BTreeSet<u32> = self.handled.iter().map(|h| h.seq).collect();
        assert_eq!(seqs.len() as u32, messages, "seed {seed}: some job numbers never handled");
        assert_eq!(self.queue_left, 0, "seed {seed}: entries left in bob's queue (unacked)\n{}", self.trace.join("\n"));
        assert_eq!(self.dead_letters, 0, "seed {seed}: unexpected dead letters");
    }

    /// A message is handled more than once only if a crashed instance had it in flight: at
    /// most once per instance, and every extra run happened on the crashed instance before
    /// the crash.
    pub fn check_duplicates_only_from_crash(&self, seed: u64) {
        let mut by_id: BTreeMap<&str, Vec<&Handled>> = BTreeMap::new();
        for h in &self.handled {
            by_id.entry(&h.message_id).or_default().push(h);
        }
        for (id, runs) in by_id.iter().filter(|(_, r)| r.len() > 1) {
            let instances: BTreeSet<&str> = runs.iter().map(|h| h.instance.as_str()).collect();
            assert_eq!(instances.len(), runs.len(), "seed {seed}: {id} handled twice by one instance: {runs:?}");
            let Some((crash_ms, crashed)) = &self.crash else {
                panic!("seed {seed}: {id} handled {} times without any crash: {runs:?}", runs.len());
            };
            let before = runs.iter().filter(|h| &h.instance == crashed && h.at_ms <= *crash_ms).count();
            assert_eq!(before, runs.len() - 1, "seed {seed}: duplicate of {id} not explained by the crash: {runs:?}");
        }
    }
}
