//! Policy changes racing with traffic (issue 4): a grant is revoked or a block added while a
//! producer sends as fast as it can. No message may be admitted after the change took effect,
//! and every send after it must be refused.

#![cfg(madsim)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use madsim::rand::{Rng, thread_rng};
use madsim::runtime::Handle;
use mas_agent::AgentBuilder;
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
        Run { changed_at, sends, admitted, trace: trace.snapshot() }
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
        before += run.admitted.len();
        refused += run.sends.iter().filter(|(_, ok)| !ok).count();
    });
    eprintln!("policy race: {before} messages admitted before the changes, {refused} sends refused after them");
}
