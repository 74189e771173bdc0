//! Governance under concurrency and faults (issue 4).
//!
//! * Policy changes racing with traffic: a grant is revoked or a block added while a producer
//!   sends as fast as it can. No message may be admitted after the change took effect, every
//!   send after it must be refused, and the audit chains must say exactly that.
//! * A target that fails for a while (seed-chosen) behind its circuit breaker: the circuit
//!   opens, recovers once the target heals, every decision is audited exactly once, the chains
//!   verify, and nothing accepted is lost.

#![cfg(madsim)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use madsim::rand::{Rng, thread_rng};
use madsim::runtime::Handle;
use mas_agent::{AgentBuilder, HandlerError};
use mas_core::policy::audit::{AuditFilter, AuditRecord, Decision};
use mas_server::audit::AuditReport;
use mas_server::config::{DeliverySettings, RateLimitSettings};
use sim::seeds::{run_each, simulate};
use sim::trace::Trace;
use sim::workload::{ConsumerSpec, HandledLog, start_consumer};
use sim::world::{
    BROKER_ADDR, Brokers, agent_config, broker_config, id, memory_store, spawn_node, start_agent,
    start_observed_broker, wait_until,
};

/// What the producer saw for one send: virtual wall-clock seconds when it was issued, and
/// whether the broker accepted it.
type Sends = Arc<Mutex<Vec<(f64, bool)>>>;

fn wall_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

struct Run {
    changed_at: f64,
    sends: Vec<(f64, bool)>,
    admitted: Vec<f64>,
    audit: Vec<AuditRecord>,
    report: AuditReport,
    trace: Vec<String>,
}

fn policy_change_under_load(seed: u64) -> Run {
    simulate(seed, madsim::Config::default(), || async move {
        let handle = Handle::current();
        let trace = Trace::new();
        let store = memory_store();
        let brokers = Brokers::default();
        let mut config = broker_config(&[("alice", &["bob"]), ("bob", &[])], seed, DeliverySettings::default());
        config.gateway.rate_limit = RateLimitSettings::unlimited();
        start_observed_broker(&handle, "broker", BROKER_ADDR, store, config, &brokers);
        let handled = HandledLog::default();
        let bob = ConsumerSpec { node: "bob", ip: "10.0.0.3", brokers: &[BROKER_ADDR], instance_prefix: "b" };
        start_consumer(&handle, &trace, &handled, bob);
        let sends = Sends::default();
        let (t, s) = (trace.clone(), sends.clone());
        spawn_node(&handle, "alice", "10.0.0.2", async move {
            let alice = start_agent(&t, "alice", || AgentBuilder::new(agent_config("alice", "a0"))).await;
            // Wait until bob is live, then send without pause.
            while alice.discover(&[]).await.map(|v| v.is_empty()).unwrap_or(true) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for seq in 0..200u32 {
                let issued = wall_secs();
                let ok = alice.send("bob", "job", &serde_json::json!({ "seq": seq })).await.is_ok();
                s.lock().unwrap().push((issued, ok));
                tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(0..5))).await;
            }
        });
        let (change_after, block) = {
            let mut rng = thread_rng();
            (Duration::from_millis(rng.gen_range(100..400)), rng.gen_bool(0.5))
        };
        tokio::time::sleep(change_after).await;
        let broker = brokers.lock().unwrap()[0].clone();
        let changed_at = wall_secs();
        if block {
            trace.record("nemesis", "block alice -> bob");
            broker.change_authz("block alice → bob", |p| p.block(&id("alice"), &id("bob")));
        } else {
            trace.record("nemesis", "revoke alice -> bob");
            broker.change_authz("revoke alice → bob", |p| p.revoke(&id("alice"), &id("bob")));
        }
        let done = wait_until(Duration::from_secs(60), || sends.lock().unwrap().len() == 200).await;
        assert!(done, "seed {seed}: the producer did not finish");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let admitted = handled.lock().unwrap().iter().map(|h| h.admitted_at).collect();
        let sends = sends.lock().unwrap().clone();
        let audit = broker.query_audit(&AuditFilter::default(), usize::MAX).await.expect("audit query");
        let report = broker.verify_audit().await.expect("audit verify");
        Run { changed_at, sends, admitted, audit, report, trace: trace.snapshot() }
    })
}

#[test]
fn no_message_is_admitted_after_a_grant_is_revoked_or_a_block_added() {
    let (mut before, mut refused) = (0, 0);
    run_each("no_message_is_admitted_after_a_grant_is_revoked_or_a_block_added", |seed| {
        let run = policy_change_under_load(seed);
        let late: Vec<f64> = run.admitted.iter().copied().filter(|at| *at > run.changed_at).collect();
        assert!(
            late.is_empty(),
            "seed {seed}: admitted after the change at {}: {late:?}\n{}",
            run.changed_at,
            run.trace.join("\n")
        );
        let accepted_after = run.sends.iter().filter(|(issued, ok)| *issued > run.changed_at && *ok).count();
        assert_eq!(accepted_after, 0, "seed {seed}: a send issued after the change was accepted");
        assert!(run.sends.iter().any(|(_, ok)| *ok), "seed {seed}: nothing was sent before the change");
        // The audit trail tells the same story: intact chains, one record per send, every
        // routable decision before the change and every one after it a denial.
        assert!(run.report.is_intact(), "seed {seed}: {:?}", run.report);
        assert!(
            run.report.chains.iter().any(|c| c.chain == "security" && c.records == 1),
            "seed {seed}: change unrecorded"
        );
        let routable: Vec<&AuditRecord> = run.audit.iter().filter(|r| r.decision.is_routable()).collect();
        assert_eq!(routable.len(), run.sends.iter().filter(|(_, ok)| *ok).count(), "seed {seed}: routable records");
        assert!(routable.iter().all(|r| r.timestamp <= run.changed_at), "seed {seed}: allowed after the change");
        let denied = run.audit.iter().filter(|r| r.decision == Decision::AuthzDenied).count();
        assert_eq!(denied, run.sends.iter().filter(|(_, ok)| !ok).count(), "seed {seed}: every refusal audited");
        before += run.admitted.len();
        refused += run.sends.iter().filter(|(_, ok)| !ok).count();
    });
    eprintln!("policy race: {before} messages admitted before the changes, {refused} sends refused after them");
}

/// What the circuit scenario saw.
struct CircuitRun {
    /// Per send: accepted message id, or the refusal's detail.
    sends: Vec<Result<String, String>>,
    handled: Vec<String>,
    dead_lettered: Vec<String>,
    audit: Vec<AuditRecord>,
    report: AuditReport,
    trace: Vec<String>,
}

fn failing_target_behind_its_circuit(seed: u64) -> CircuitRun {
    simulate(seed, madsim::Config::default(), || async move {
        let handle = Handle::current();
        let trace = Trace::new();
        let store = memory_store();
        let brokers = Brokers::default();
        let delivery =
            DeliverySettings { retry_backoff_initial_ms: 200, retry_backoff_max_ms: 2_000, ..Default::default() };
        let mut config = broker_config(&[("alice", &["bob"]), ("bob", &[])], seed, delivery);
        config.gateway.rate_limit = RateLimitSettings::unlimited();
        let cb = &mut config.gateway.circuit_breaker;
        (cb.failure_threshold, cb.timeout_seconds, cb.success_threshold, cb.max_probes) = (3, 1.0, 2, 2);
        start_observed_broker(&handle, "broker", BROKER_ADDR, store.clone(), config, &brokers);

        // bob fails every message until `heal_at` (seed-chosen), then handles them all.
        let heal_after = Duration::from_millis(thread_rng().gen_range(800..2_500));
        let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handled: Arc<Mutex<Vec<String>>> = Arc::default();
        let (t, h, ok) = (trace.clone(), handled.clone(), healed.clone());
        spawn_node(&handle, "bob", "10.0.0.3", async move {
            let make = || {
                let (t, h, ok) = (t.clone(), h.clone(), ok.clone());
                AgentBuilder::new(agent_config("bob", "b0")).fallback(move |_, envelope| {
                    let (t, h, ok) = (t.clone(), h.clone(), ok.clone());
                    async move {
                        tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(1..20))).await;
                        if !ok.load(std::sync::atomic::Ordering::SeqCst) {
                            t.record("bob", format_args!("failed {}", envelope.message_id));
                            return Err(HandlerError::from("backend down"));
                        }
                        t.record("bob", format_args!("handled {}", envelope.message_id));
                        h.lock().unwrap().push(envelope.message_id);
                        Ok(())
                    }
                })
            };
            let _bob = start_agent(&t, "bob", make).await;
            std::future::pending::<()>().await;
        });
        let sends: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
        let (t, s) = (trace.clone(), sends.clone());
        spawn_node(&handle, "alice", "10.0.0.2", async move {
            let alice = start_agent(&t, "alice", || AgentBuilder::new(agent_config("alice", "a0"))).await;
            while alice.discover(&[]).await.map(|v| v.is_empty()).unwrap_or(true) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for seq in 0..300u32 {
                let outcome = alice.send("bob", "job", &serde_json::json!({ "seq": seq })).await;
                let outcome =
                    outcome.map_err(|e| e.status().map_or_else(|| e.to_string(), |s| s.message().to_string()));
                t.record("alice", format_args!("send {seq}: {outcome:?}"));
                s.lock().unwrap().push(outcome);
                tokio::time::sleep(Duration::from_millis(thread_rng().gen_range(5..40))).await;
            }
        });
        tokio::time::sleep(heal_after).await;
        trace.record("nemesis", "bob heals");
        healed.store(true, std::sync::atomic::Ordering::SeqCst);
        let done = wait_until(Duration::from_secs(60), || sends.lock().unwrap().len() == 300).await;
        assert!(done, "seed {seed}: the producer did not finish");
        // Retries of the messages that failed are at most 2 s apart; 5 attempts each.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let broker = brokers.lock().unwrap()[0].clone();
        let dead = broker.store().dead_letters(&id("bob"), 10_000).await.expect("dead letters");
        let dead_lettered = dead
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(&d.envelope).ok())
            .filter_map(|e| e["message_id"].as_str().map(str::to_string))
            .collect();
        let audit = broker.query_audit(&AuditFilter::default(), usize::MAX).await.expect("audit query");
        let report = broker.verify_audit().await.expect("audit verify");
        let sends = sends.lock().unwrap().clone();
        let handled = handled.lock().unwrap().clone();
        CircuitRun { sends, handled, dead_lettered, audit, report, trace: trace.snapshot() }
    })
}

#[test]
fn a_failing_target_trips_its_circuit_recovers_and_every_decision_is_audited() {
    let (mut opened, mut refused, mut dead) = (0, 0, 0);
    run_each("a_failing_target_trips_its_circuit_recovers_and_every_decision_is_audited", |seed| {
        let run = failing_target_behind_its_circuit(seed);
        let context = || run.trace.join("\n");
        assert!(run.report.is_intact(), "seed {seed}: {:?}", run.report);
        // One record per send, with the outcome the sender saw.
        assert_eq!(run.audit.len(), run.sends.len(), "seed {seed}: records vs sends\n{}", context());
        for (record, sent) in run.audit.iter().zip(&run.sends) {
            match sent {
                Ok(id) => assert!(record.decision.is_routable() && record.message_id == *id, "seed {seed}: {record:?}"),
                Err(detail) => {
                    assert_eq!(detail, "circuit_open", "seed {seed}: unexpected refusal\n{}", context());
                    assert_eq!(record.decision, Decision::CircuitOpen, "seed {seed}: {record:?}");
                }
            }
        }
        let circuit_refusals = run.sends.iter().filter(|s| s.is_err()).count();
        assert!(circuit_refusals > 0, "seed {seed}: the circuit never opened\n{}", context());
        assert!(
            run.sends.iter().rev().take(10).all(Result::is_ok),
            "seed {seed}: it never closed again\n{}",
            context()
        );
        // Nothing accepted is lost: handled once healed, or dead-lettered after its attempts.
        for id in run.sends.iter().filter_map(|s| s.as_ref().ok()) {
            assert!(
                run.handled.contains(id) || run.dead_lettered.contains(id),
                "seed {seed}: accepted {id} was neither handled nor dead-lettered\n{}",
                context()
            );
        }
        opened += 1;
        refused += circuit_refusals;
        dead += run.dead_lettered.len();
    });
    eprintln!("circuit: opened in {opened} runs, {refused} sends refused circuit_open, {dead} dead-lettered");
}
