//! Store contract: the same operation sequences against the embedded memory store and a real
//! `redis-server` (started here on a free port) must give the same results.
//!
//! Each sequence returns a log of outcomes with backend-specific details (entry ids) replaced
//! by stable labels; the logs of both backends must be equal.

#![cfg(not(madsim))]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mas_core::delivery::{EntryId, QueuedMessage, RequeueReason, StoreEffect};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::policy::audit::{AuditRecord, Decision, SecurityEvent};
use mas_core::policy::circuit::CircuitConfig;
use mas_core::store::{
    Admission, Admitted, Correlation, MemoryStoreConfig, OwnerToken, PendingRequest, QueueKey, ReplyCommit, ReplyError,
    ReplyReceipt, SessionRef, StoreError,
};
use mas_core::time::Now;
use mas_server::store::redis::{RedisBackend, RedisSettings};
use mas_server::store::{ClaimCursor, Claimed, MemoryBackend, PendingAhead, Store};
use mas_tests::redis_server::{RedisServer, rewrite_audit_stream};

const NO_WAIT: Duration = Duration::ZERO;
const LEASE: Duration = Duration::from_secs(30);

fn agent(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn session(a: &str, i: &str, owner: &str) -> SessionRef {
    SessionRef { agent: agent(a), instance: InstanceId::new(i).unwrap(), owner: OwnerToken::new(owner) }
}

fn work(a: &str) -> QueueKey {
    QueueKey::Work(agent(a))
}

fn show(batch: &[QueuedMessage]) -> String {
    let items: Vec<String> = batch.iter().map(|m| format!("{}@{}", m.envelope, m.attempt)).collect();
    format!("[{}]", items.join(","))
}

fn ack(m: &QueuedMessage) -> StoreEffect {
    StoreEffect::Ack { entry: m.entry.clone() }
}

/// A handler's refusal of `m` after `attempts` attempts.
fn dead_letter(m: &QueuedMessage, attempts: u32, reason: &str) -> StoreEffect {
    StoreEffect::DeadLetter {
        entry: m.entry.clone(),
        envelope: m.envelope.clone(),
        attempts,
        reason: reason.into(),
        nacked: true,
    }
}

fn requeue(m: &QueuedMessage, attempt: u32, delay: Duration, now: Now) -> StoreEffect {
    StoreEffect::Requeue {
        entry: m.entry.clone(),
        envelope: m.envelope.clone(),
        attempt,
        not_before: now.mono + delay,
        reason: RequeueReason::RetryableNack,
    }
}

/// Runs `sequence` on a memory store and on a fresh Redis, and compares the logs.
async fn contract<F, Fut>(sequence: F)
where
    F: Fn(Store) -> Fut,
    Fut: Future<Output = Vec<String>>,
{
    let memory = sequence(Store::from(MemoryBackend::new(MemoryStoreConfig {
        max_queue_len: 3,
        max_dead_letters: 3,
        max_audit_records: 6,
        max_pending_requests: 2,
    })))
    .await;
    let Some(redis) = RedisServer::start() else { return };
    let mut settings = RedisSettings::new(&redis.url);
    settings.max_queue_len = 3;
    settings.max_dead_letters = 3;
    let backend = RedisBackend::connect(&settings)
        .await
        .expect("connect to the test redis-server")
        .with_max_audit_records(6)
        .with_max_pending_requests(2);
    let on_redis = sequence(Store::from(backend)).await;
    if std::env::var_os("CONTRACT_LOG").is_some() {
        eprintln!("{}", memory.join("\n"));
    }
    assert_eq!(memory, on_redis, "memory (left) and Redis (right) disagree");
    assert!(!memory.is_empty());
}

fn record(target: &str, decision: Decision) -> AuditRecord {
    AuditRecord {
        correlation_id: None,
        decision,
        hash_version: 0,
        latency_ms: 0.5,
        message_id: format!("m-{target}"),
        message_type: Some("t".into()),
        payload_hash: "00".into(),
        previous_hash: None,
        sender_id: "alice".into(),
        sender_instance_id: Some("a1".into()),
        target_id: target.into(),
        timestamp: 1_700_000_000.125,
        trace_id: None,
        violations: Vec::new(),
    }
}

fn routed(target: &str, envelope: &str) -> Admission {
    Admission { chain: agent(target), record: record(target, Decision::Allowed), envelope: Some(Arc::from(envelope)) }
}

fn denied(chain: &str, decision: Decision) -> Admission {
    Admission { chain: agent(chain), record: record(chain, decision), envelope: None }
}

fn admitted(result: Result<Admitted, StoreError>) -> String {
    match result {
        Ok(a) => format!("{} queued={}", a.record.decision.as_str(), a.entry.is_some()),
        Err(err) => format!("{err:?}"),
    }
}

/// A chain's decisions, and whether it verifies against its head.
async fn chain(store: &Store, agent_id: &str) -> String {
    let chain = store.audit_chain(&agent(agent_id)).await.unwrap();
    let decisions: Vec<&str> = chain.records.iter().map(|r| r.decision.as_str()).collect();
    let head = chain.head.clone().unwrap_or_default();
    format!("{decisions:?} verify={:?} head={head} checkpoint={:?}", chain.verify(), chain.checkpoint)
}

/// Two sessions of bob (instances b1, b2), each holding its lease.
async fn two_bobs(store: &Store) -> (SessionRef, SessionRef) {
    let (b1, b2) = (session("bob", "b1", "o1"), session("bob", "b2", "o2"));
    store.acquire_lease(&b1, LEASE).await.unwrap();
    store.acquire_lease(&b2, LEASE).await.unwrap();
    (b1, b2)
}

fn now() -> Now {
    // Only differences matter: delays are measured on this clock and converted by the store.
    Now::default()
}

#[tokio::test]
async fn queue_claim_settle_and_dead_letters() {
    contract(|store| async move {
        let mut log = Vec::new();
        let b1 = session("bob", "b1", "o1");
        log.push(format!("lease {:?}", store.acquire_lease(&b1, LEASE).await));
        for m in ["m0", "m1", "m2"] {
            log.push(format!("enqueue {m} ok={}", store.enqueue(&work("bob"), Arc::from(m)).await.is_ok()));
        }
        log.push(format!("enqueue m3 {:?}", store.enqueue(&work("bob"), Arc::from("m3")).await.err()));
        let first = store.claim(&b1, 2, NO_WAIT).await.unwrap();
        log.push(format!("claim {}", show(&first)));
        let rest = store.claim(&b1, 5, NO_WAIT).await.unwrap();
        log.push(format!("claim {}", show(&rest)));
        let effects = vec![
            ack(&first[0]),
            requeue(&first[1], 2, Duration::ZERO, now()),
            StoreEffect::DeadLetter {
                entry: rest[0].entry.clone(),
                envelope: rest[0].envelope.clone(),
                attempts: 5,
                reason: "boom".into(),
                nacked: true,
            },
        ];
        log.push(format!("apply {:?}", store.apply(&b1, effects, now(), None).await));
        log.push(format!("again {:?}", store.apply(&b1, vec![ack(&first[0])], now(), None).await));
        let retried = store.claim(&b1, 5, NO_WAIT).await.unwrap();
        log.push(format!("claim {}", show(&retried)));
        log.push(format!("apply {:?}", store.apply(&b1, vec![ack(&retried[0])], now(), None).await));
        log.push(format!("len {:?}", store.queue_len(&work("bob")).await));
        let dead = store.dead_letters(&agent("bob"), 10).await.unwrap();
        log.push(format!(
            "dead {:?}",
            dead.iter().map(|d| (d.envelope.to_string(), d.reason.clone(), d.attempts)).collect::<Vec<_>>()
        ));
        log
    })
    .await;
}

#[tokio::test]
async fn settling_is_fenced_and_released_work_moves_to_a_sibling() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (b1, b2) = two_bobs(&store).await;
        store.enqueue(&work("bob"), Arc::from("m")).await.unwrap();
        let held = store.claim(&b1, 1, NO_WAIT).await.unwrap();
        log.push(format!("b1 {}", show(&held)));
        log.push(format!("b2 acks b1's {:?}", store.apply(&b2, vec![ack(&held[0])], now(), None).await));
        log.push(format!("b2 claim {}", show(&store.claim(&b2, 1, NO_WAIT).await.unwrap())));
        log.push(format!("release {:?}", store.release(&b1).await));
        let moved = store.claim(&b2, 1, NO_WAIT).await.unwrap();
        log.push(format!("b2 claim {}", show(&moved)));
        log.push(format!("b1 late ack {:?}", store.apply(&b1, vec![ack(&moved[0])], now(), None).await));
        log.push(format!("b2 ack {:?}", store.apply(&b2, vec![ack(&moved[0])], now(), None).await));
        log
    })
    .await;
}

/// One settle carries many effects over both of a session's queues. Each is fenced on its own:
/// a second effect for the same entry, an entry another session holds and an id that names no
/// entry are refused (`NotOwner`) without stopping the rest.
#[tokio::test]
async fn a_batch_of_effects_is_fenced_effect_by_effect() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (b1, b2) = two_bobs(&store).await;
        let replies = QueueKey::Replies(agent("bob"), InstanceId::new("b1").unwrap());
        for m in ["w1", "w2"] {
            store.enqueue(&work("bob"), Arc::from(m)).await.unwrap();
        }
        for m in ["r1", "r2"] {
            store.enqueue(&replies, Arc::from(m)).await.unwrap();
        }
        let held = store.claim(&b1, 4, NO_WAIT).await.unwrap();
        log.push(format!("b1 claimed {}", show(&held)));
        store.enqueue(&work("bob"), Arc::from("w3")).await.unwrap();
        let other = store.claim(&b2, 1, NO_WAIT).await.unwrap();
        log.push(format!("b2 claimed {}", show(&other)));
        let by_envelope = |e: &str| held.iter().find(|m| &*m.envelope == e).unwrap();
        let effects = vec![
            ack(by_envelope("w1")),
            ack(by_envelope("r1")),
            ack(by_envelope("w1")),
            ack(&other[0]),
            StoreEffect::Ack { entry: EntryId::new("w:not-an-entry".to_string()) },
            requeue(by_envelope("w2"), 2, Duration::ZERO, now()),
            dead_letter(by_envelope("r2"), 3, "refused"),
        ];
        log.push(format!("apply {:?}", store.apply(&b1, effects, now(), None).await));
        log.push(format!("b1 holds {}", show(&store.own_pending(&b1, 10).await.unwrap())));
        log.push(format!("b2 holds {}", show(&store.own_pending(&b2, 10).await.unwrap())));
        log.push(format!("b1 claims {}", show(&store.claim(&b1, 4, NO_WAIT).await.unwrap())));
        log.push(format!(
            "work {:?} replies {:?}",
            store.queue_len(&work("bob")).await,
            store.queue_len(&replies).await
        ));
        let dead = store.dead_letters(&agent("bob"), 10).await.unwrap();
        log.push(format!("dead {:?}", dead.iter().map(|d| d.envelope.to_string()).collect::<Vec<_>>()));
        log
    })
    .await;
}

/// Both stores keep the newest `max_dead_letters` dead letters and drop the oldest.
#[tokio::test]
async fn dead_letters_are_bounded_keeping_the_newest() {
    contract(|store| async move {
        let b1 = session("bob", "b1", "o1");
        store.acquire_lease(&b1, LEASE).await.unwrap();
        for round in 0..2 {
            for m in 0..3 {
                store.enqueue(&work("bob"), Arc::from(format!("d{}", round * 3 + m))).await.unwrap();
            }
            let batch = store.claim(&b1, 3, NO_WAIT).await.unwrap();
            let dead = batch.iter().map(|m| dead_letter(m, 5, "boom")).collect();
            store.apply(&b1, dead, now(), None).await.unwrap();
        }
        let kept = store.dead_letters(&agent("bob"), 10).await.unwrap();
        vec![format!("kept {:?}", kept.iter().map(|d| d.envelope.to_string()).collect::<Vec<_>>())]
    })
    .await;
}

/// Redrive moves a dead letter back to the work queue once, with a fresh attempt count, and
/// only while the queue has room; purge deletes; both ignore ids that are gone.
#[tokio::test]
async fn dead_letters_are_redriven_once_with_a_fresh_attempt_and_purged() {
    contract(|store| async move {
        let mut log = Vec::new();
        let b1 = session("bob", "b1", "o1");
        store.acquire_lease(&b1, LEASE).await.unwrap();
        for m in ["p0", "p1", "p2"] {
            store.enqueue(&work("bob"), Arc::from(m)).await.unwrap();
        }
        let batch = store.claim(&b1, 3, NO_WAIT).await.unwrap();
        let dead = batch.iter().map(|m| dead_letter(m, 4, "poison")).collect();
        store.apply(&b1, dead, now(), None).await.unwrap();
        let letters = store.dead_letters(&agent("bob"), 10).await.unwrap();
        let ids: Vec<String> = letters.iter().map(|d| d.id.clone()).collect();
        let summary: Vec<String> =
            letters.iter().map(|d| format!("{}:{}:{}", d.envelope, d.reason, d.attempts)).collect();
        log.push(format!("dead {summary:?}, young {}", letters.iter().all(|d| d.age < Duration::from_secs(5))));
        let show_redrive = |outcomes: Vec<mas_core::store::Redrive>| -> Vec<String> {
            outcomes
                .into_iter()
                .map(|o| match o {
                    mas_core::store::Redrive::Queued(_) => "queued".to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let first = store.redrive_dead_letters(&agent("bob"), &ids[..2]).await.unwrap();
        log.push(format!("redrive 0,1 {:?}", show_redrive(first)));
        let again = store.redrive_dead_letters(&agent("bob"), &ids[..2]).await.unwrap();
        log.push(format!("again {:?}", show_redrive(again)));
        store.enqueue(&work("bob"), Arc::from("filler")).await.unwrap();
        let full = store.redrive_dead_letters(&agent("bob"), &ids[2..]).await.unwrap();
        log.push(format!("into a full queue {:?}", show_redrive(full)));
        log.push(format!("redelivered {}", show(&store.claim(&b1, 3, NO_WAIT).await.unwrap())));
        let purged = store.purge_dead_letters(&agent("bob"), &ids).await.unwrap();
        log.push(format!("purged {purged}, left {}", store.dead_letters(&agent("bob"), 10).await.unwrap().len()));
        log
    })
    .await;
}

/// The authorization overlay is read only when its revision moved, and replaced only by a
/// writer that saw the current revision.
#[tokio::test]
async fn the_authz_overlay_is_compare_and_set_and_read_when_it_moved() {
    contract(|store| async move {
        let mut log = Vec::new();
        log.push(format!("never written {:?}", store.authz_overlay(0).await.unwrap()));
        log.push(format!("first {:?}", store.put_authz_overlay(0, Arc::from("{\"a\":1}")).await.unwrap()));
        log.push(format!("stale writer {:?}", store.put_authz_overlay(0, Arc::from("{}")).await.unwrap()));
        log.push(format!("read from 0 {:?}", store.authz_overlay(0).await.unwrap()));
        log.push(format!("unchanged {:?}", store.authz_overlay(1).await.unwrap()));
        log.push(format!("second {:?}", store.put_authz_overlay(1, Arc::from("{\"a\":2}")).await.unwrap()));
        log.push(format!("read from 1 {:?}", store.authz_overlay(1).await.unwrap()));
        log
    })
    .await;
}

/// An operator's resets and kicks: a reset circuit admits again, a reset sender starts a
/// fresh window, and a revoked lease fails its holder's renewal and frees the instance.
#[tokio::test]
async fn operators_reset_circuits_and_rates_and_revoke_leases() {
    contract(|store| async move {
        let mut log = Vec::new();
        let circuit = CircuitConfig { failure_threshold: 1, ..CircuitConfig::default() };
        let b1 = session("bob", "b1", "o1");
        store.acquire_lease(&b1, LEASE).await.unwrap();
        store.enqueue(&work("bob"), Arc::from("boom")).await.unwrap();
        let m = store.claim(&b1, 1, NO_WAIT).await.unwrap().remove(0);
        let dead = dead_letter(&m, 1, "r");
        store.apply(&b1, vec![dead], now(), Some(&circuit)).await.unwrap();
        log.push(format!("opened: admits {}", store.gate(&agent("bob"), Some(&circuit)).await.unwrap().circuit_admits));
        log.push(format!("reset {}", store.reset_circuit(&agent("bob")).await.unwrap()));
        log.push(format!(
            "after reset: admits {}",
            store.gate(&agent("bob"), Some(&circuit)).await.unwrap().circuit_admits
        ));
        log.push(format!("reset again {}", store.reset_circuit(&agent("bob")).await.unwrap()));

        let limits = mas_core::policy::ratelimit::Limits { per_minute: 60, per_hour: 3600 };
        store.admit_rate(&agent("alice"), limits, 3).await.unwrap();
        let (minute, hour) = store.rate_backlog(&agent("alice")).await.unwrap().usage(limits);
        log.push(format!("used {minute}/{hour}"));
        log.push(format!("rate reset {}", store.reset_rate(&agent("alice")).await.unwrap()));
        log.push(format!("used after reset {:?}", store.rate_backlog(&agent("alice")).await.unwrap().usage(limits)));

        log.push(format!("revoked {}", store.revoke_lease(&agent("bob"), &b1.instance).await.unwrap()));
        log.push(format!("holder renews {}", store.renew_lease(&b1, LEASE).await.unwrap()));
        let b2 = session("bob", "b1", "o2");
        log.push(format!("another takes it {}", store.acquire_lease(&b2, LEASE).await.unwrap()));
        log.push(format!(
            "revoke unknown {}",
            store.revoke_lease(&agent("bob"), &InstanceId::new("zz").unwrap()).await.unwrap()
        ));
        log
    })
    .await;
}

/// What a session holds is listed for it alone (a claim whose answer it lost is found here),
/// and an acked entry is no longer held.
#[tokio::test]
async fn own_pending_lists_exactly_what_a_session_holds() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (b1, b2) = two_bobs(&store).await;
        log.push(format!("nothing yet {}", show(&store.own_pending(&b1, 10).await.unwrap())));
        for m in ["m1", "m2", "m3"] {
            store.enqueue(&work("bob"), Arc::from(m)).await.unwrap();
        }
        let held = store.claim(&b1, 2, NO_WAIT).await.unwrap();
        let other = store.claim(&b2, 1, NO_WAIT).await.unwrap();
        log.push(format!("b1 claimed {} b2 claimed {}", show(&held), show(&other)));
        log.push(format!("b1 holds {}", show(&store.own_pending(&b1, 10).await.unwrap())));
        log.push(format!("b1 holds, at most 1 {}", show(&store.own_pending(&b1, 1).await.unwrap())));
        store.apply(&b1, vec![ack(&held[0])], now(), None).await.unwrap();
        log.push(format!("after an ack b1 holds {}", show(&store.own_pending(&b1, 10).await.unwrap())));
        log.push(format!("b2 holds {}", show(&store.own_pending(&b2, 10).await.unwrap())));
        log
    })
    .await;
}

/// A session's claims carry a cursor: after one that found the queues drained, the next waits
/// for a wake-up before asking the store. Every change that makes work claimable must wake
/// it — a delayed requeue included, or the retry would wait for the claim's whole `max_wait`.
/// A claim of up to 4 messages by `session` from `cursor`, waiting up to 20 s in its own task.
fn waiting_claim(
    store: &Store,
    session: &SessionRef,
    cursor: ClaimCursor,
) -> tokio::task::JoinHandle<Result<Claimed, StoreError>> {
    let (store, session) = (store.clone(), session.clone());
    tokio::spawn(async move { store.claim_next(&session, 4, Duration::from_secs(20), cursor).await })
}

#[tokio::test]
async fn a_claim_after_a_drained_one_is_woken_by_new_work_and_by_a_delayed_requeue() {
    contract(|store| async move {
        let mut log = Vec::new();
        let b1 = session("bob", "b1", "o1");
        store.acquire_lease(&b1, LEASE).await.unwrap();
        store.enqueue(&work("bob"), Arc::from("m")).await.unwrap();
        let (m, cursor) = store.claim_next(&b1, 4, NO_WAIT, ClaimCursor::default()).await.unwrap();
        log.push(format!("first {}", show(&m)));

        // Drained: the next claim waits, and a new message wakes it.
        let next = waiting_claim(&store, &b1, cursor);
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.enqueue(&work("bob"), Arc::from("n")).await.unwrap();
        let (n, cursor) = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("new work woke the claim")
            .unwrap()
            .unwrap();
        log.push(format!("woken by new work {}", show(&n)));

        // A retry 300 ms out, while the next claim waits on the drained cursor.
        let effects = vec![requeue(&m[0], 2, Duration::from_millis(300), now()), ack(&n[0])];
        let next = waiting_claim(&store, &b1, cursor);
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.apply(&b1, effects, now(), None).await.unwrap();
        let (retried, _) = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the requeue woke the claim")
            .unwrap()
            .unwrap();
        log.push(format!("retried {}", show(&retried)));
        log
    })
    .await;
}

#[tokio::test]
async fn delayed_requeue_waits_for_its_backoff() {
    contract(|store| async move {
        let mut log = Vec::new();
        let b1 = session("bob", "b1", "o1");
        store.acquire_lease(&b1, LEASE).await.unwrap();
        store.enqueue(&work("bob"), Arc::from("m")).await.unwrap();
        let m = store.claim(&b1, 1, NO_WAIT).await.unwrap();
        store.apply(&b1, vec![requeue(&m[0], 2, Duration::from_millis(300), now())], now(), None).await.unwrap();
        log.push(format!("at once {}", show(&store.claim(&b1, 1, NO_WAIT).await.unwrap())));
        log.push(format!("len {:?}", store.queue_len(&work("bob")).await));
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.push(format!("later {}", show(&store.claim(&b1, 1, Duration::from_millis(500)).await.unwrap())));
        log
    })
    .await;
}

#[tokio::test]
async fn leases_are_exclusive_expire_and_hand_work_on() {
    contract(|store| async move {
        let mut log = Vec::new();
        let short = Duration::from_millis(200);
        let (first, dup, sibling) =
            (session("bob", "b1", "o1"), session("bob", "b1", "o2"), session("bob", "b2", "o3"));
        log.push(format!("first {:?}", store.acquire_lease(&first, short).await));
        log.push(format!("duplicate {:?}", store.acquire_lease(&dup, short).await));
        log.push(format!("renew {:?}", store.renew_lease(&first, short).await));
        log.push(format!("live {:?}", store.live_agents(&[agent("bob"), agent("carol")]).await));
        store.acquire_lease(&sibling, LEASE).await.unwrap();
        store.enqueue(&work("bob"), Arc::from("m")).await.unwrap();
        log.push(format!("first claims {}", show(&store.claim(&first, 1, NO_WAIT).await.unwrap())));
        log.push(format!("sibling sees {}", show(&store.claim(&sibling, 1, NO_WAIT).await.unwrap())));
        tokio::time::sleep(Duration::from_millis(300)).await;
        log.push(format!(
            "instance live {:?}",
            store.instance_live(&agent("bob"), &InstanceId::new("b1").unwrap()).await
        ));
        log.push(format!("late renew {:?}", store.renew_lease(&first, short).await));
        // The sibling may need a reclaim pass: allow one wait period.
        log.push(format!(
            "sibling reclaims {}",
            show(&store.claim(&sibling, 1, Duration::from_millis(1500)).await.unwrap())
        ));
        log.push(format!("successor {:?}", store.acquire_lease(&dup, short).await));
        store.release_lease(&first).await.unwrap();
        log.push(format!(
            "stale release kept successor {:?}",
            store.instance_live(&agent("bob"), &InstanceId::new("b1").unwrap()).await
        ));
        log
    })
    .await;
}

/// The session of instance `b1` opened by `broker` in its `incarnation`.
fn broker_session(broker: &str, incarnation: u64) -> SessionRef {
    let (bob, b1) = (agent("bob"), InstanceId::new("b1").unwrap());
    let owner = OwnerToken::for_session(&mas_core::ids::BrokerId::new(broker).unwrap(), incarnation, &bob, &b1, 0);
    SessionRef { agent: bob, instance: b1, owner }
}

#[tokio::test]
async fn a_restarted_broker_takes_over_the_leases_and_work_of_its_previous_process() {
    contract(|store| async move {
        let mut log = Vec::new();
        let dead = broker_session("host-1", 1);
        store.acquire_lease(&dead, LEASE).await.unwrap();
        store.enqueue(&work("bob"), Arc::from("m")).await.unwrap();
        log.push(format!("dead claims {}", show(&store.claim(&dead, 1, NO_WAIT).await.unwrap())));
        log.push(format!("other broker {:?}", store.acquire_lease(&broker_session("host-2", 2), LEASE).await));
        let restarted = broker_session("host-1", 2);
        log.push(format!("restarted {:?}", store.acquire_lease(&restarted, LEASE).await));
        log.push(format!("restarted claims {}", show(&store.claim(&restarted, 1, NO_WAIT).await.unwrap())));
        log.push(format!("dead renews {:?}", store.renew_lease(&dead, LEASE).await));
        log
    })
    .await;
}

/// Alice's instance `a1` with a live lease, and the pending-request record of a request from
/// it to bob.
async fn alice_asking_bob(store: &Store) -> (SessionRef, PendingRequest) {
    let a1 = session("alice", "a1", "oa1");
    store.acquire_lease(&a1, LEASE).await.unwrap();
    let pending =
        PendingRequest { requester: agent("alice"), requester_instance: a1.instance.clone(), target: agent("bob") };
    (a1, pending)
}

/// Opens a request (deadline in 10 s) as one store step, the pending record written with it.
async fn open(store: &Store, cid: &str, pending: PendingRequest, admission: Admission) -> Result<Admitted, StoreError> {
    store.open_request(cid, pending, Duration::from_secs(10), admission, None, PendingAhead::Deferred).await
}

/// A requester's pending requests are bounded; an answered one frees its place, and a
/// refused request writes nothing (no queue entry, no audit record).
#[tokio::test]
async fn pending_requests_are_bounded_per_requester() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (_a1, pending) = alice_asking_bob(&store).await;
        for cid in ["1.alice", "2.alice", "3.alice"] {
            let opened = open(&store, cid, pending.clone(), routed("bob", cid)).await;
            log.push(format!("open {cid} {:?}", opened.map(|a| a.entry.is_some())));
        }
        log.push(format!("bob queue {:?}", store.queue_len(&work("bob")).await));
        log.push(format!("bob's chain {}", chain(&store, "bob").await));
        let receipt = ReplyReceipt { sender: agent("bob"), fingerprint: "f".into(), message_id: "r1".into() };
        let record = record("alice", Decision::Allowed);
        let committed = store.commit_reply("1.alice", &pending, receipt, Arc::from("rep"), record).await;
        log.push(format!("answered {:?}", committed.map(|c| c.map(|(commit, _)| commit))));
        let opened = open(&store, "4.alice", pending.clone(), routed("bob", "4")).await;
        log.push(format!("open 4.alice {:?}", opened.map(|a| a.entry.is_some())));
        let other = PendingRequest { requester: agent("carol"), ..pending.clone() };
        let opened = open(&store, "1.carol", other, routed("dave", "c")).await;
        log.push(format!("carol is not bounded by alice {:?}", opened.map(|a| a.entry.is_some())));
        log
    })
    .await;
}

/// A request opened as the service opens one: its pending record begun while its policies
/// run, then abandoned (the policies refused it) or opened with the admission.
async fn open_as_the_service_does(store: &Store, cid: &str, pending: &PendingRequest, policies_pass: bool) -> String {
    let ttl = Duration::from_secs(10);
    let ahead = store.begin_request(cid, pending, ttl).await;
    if !policies_pass {
        if let Ok(ahead) = ahead {
            store.abandon_request(&pending.requester, cid, ahead).await;
        }
        return format!("{cid} refused by policy");
    }
    match ahead {
        Ok(ahead) => {
            let opened = store.open_request(cid, pending.clone(), ttl, routed("bob", cid), None, ahead).await;
            format!("{cid} {}", admitted(opened))
        }
        Err(err) => format!("{cid} {err:?}"),
    }
}

/// Whether the pending record is begun ahead (Redis) or with the admission (memory), a request
/// is pending exactly when it was queued, and counts once against the requester's bound.
#[tokio::test]
async fn a_request_begun_ahead_is_pending_exactly_when_it_was_queued() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (_a1, pending) = alice_asking_bob(&store).await;
        log.push(open_as_the_service_does(&store, "1.alice", &pending, false).await);
        log.push(open_as_the_service_does(&store, "2.alice", &pending, true).await);
        log.push(open_as_the_service_does(&store, "3.alice", &pending, true).await);
        log.push(open_as_the_service_does(&store, "4.alice", &pending, true).await);
        log.push(open_as_the_service_does(&store, "5.alice", &pending, false).await);
        let receipt = ReplyReceipt { sender: agent("bob"), fingerprint: "f".into(), message_id: "r2".into() };
        let committed = store
            .commit_reply("2.alice", &pending, receipt, Arc::from("rep"), record("alice", Decision::Allowed))
            .await;
        log.push(format!("answered 2.alice {:?}", committed.map(|c| c.map(|(commit, _)| commit))));
        // With bob's queue full (2.alice, 3.alice, filler), a request is refused where it is
        // queued, after its policies passed.
        store.enqueue(&work("bob"), Arc::from("filler")).await.unwrap();
        log.push(open_as_the_service_does(&store, "6.alice", &pending, true).await);
        for cid in ["1.alice", "3.alice", "4.alice", "5.alice", "6.alice"] {
            log.push(format!("{cid}: {:?}", store.correlation(&agent("alice"), cid).await));
        }
        log.push(format!("bob queue {:?}", store.queue_len(&work("bob")).await));
        log
    })
    .await;
}

#[tokio::test]
async fn request_reply_commit_is_idempotent_and_goes_to_the_asking_instance() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (a1, a2) = (session("alice", "a1", "oa1"), session("alice", "a2", "oa2"));
        store.acquire_lease(&a1, LEASE).await.unwrap();
        store.acquire_lease(&a2, LEASE).await.unwrap();
        let pending =
            PendingRequest { requester: agent("alice"), requester_instance: a1.instance.clone(), target: agent("bob") };
        let cid = "0123.alice";
        log.push(format!("open ok={}", open(&store, cid, pending.clone(), routed("bob", "req")).await.is_ok()));
        log.push(format!("bob queue {:?}", store.queue_len(&work("bob")).await));
        log.push(format!("lookup {:?}", store.correlation(&agent("alice"), cid).await));
        let receipt =
            |fp: &str, id: &str| ReplyReceipt { sender: agent("bob"), fingerprint: fp.into(), message_id: id.into() };
        let reply = |fp: &'static str, id: &'static str, envelope: &'static str| {
            let (store, pending) = (store.clone(), pending.clone());
            async move {
                let record = record("alice", Decision::Allowed);
                store.commit_reply(cid, &pending, receipt(fp, id), Arc::from(envelope), record).await
            }
        };
        log.push(format!("commit {:?}", reply("f", "m1", "rep").await));
        log.push(format!("retry {:?}", reply("f", "m2", "rep").await));
        log.push(format!("other {:?}", reply("g", "m3", "x").await));
        log.push(format!("alice's chain {}", chain(&store, "alice").await));
        log.push(format!("lookup {:?}", store.correlation(&agent("alice"), cid).await));
        log.push(format!("a2 gets {}", show(&store.claim(&a2, 5, NO_WAIT).await.unwrap())));
        log.push(format!("a1 gets {}", show(&store.claim(&a1, 5, NO_WAIT).await.unwrap())));
        log.push(format!("unknown {:?}", store.correlation(&agent("alice"), "9999.alice").await));
        let short =
            PendingRequest { requester: agent("alice"), requester_instance: a1.instance.clone(), target: agent("bob") };
        store
            .open_request(
                "7777.alice",
                short.clone(),
                Duration::from_millis(100),
                routed("bob", "req2"),
                None,
                PendingAhead::Deferred,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        log.push(format!("expired lookup {:?}", store.correlation(&agent("alice"), "7777.alice").await));
        log.push(format!(
            "expired commit {:?}",
            store
                .commit_reply(
                    "7777.alice",
                    &short,
                    receipt("f", "m9"),
                    Arc::from("late"),
                    record("alice", Decision::Allowed)
                )
                .await
        ));
        log
    })
    .await;
}

/// Replies to one requester arriving together (Redis commits them as one batch): each gets
/// what it would alone — the first of two different replies wins, an identical retry gets the
/// winner's id, a reply to an unknown request is refused — and the chain links them all.
#[tokio::test]
async fn concurrent_replies_to_one_requester_each_get_their_own_outcome() {
    contract(|store| async move {
        let mut log = Vec::new();
        let (a1, pending) = alice_asking_bob(&store).await;
        for cid in ["10.alice", "11.alice"] {
            open(&store, cid, pending.clone(), routed("bob", cid)).await.unwrap();
        }
        let reply = |cid: &'static str, fp: &'static str, id: &'static str| {
            let (store, pending) = (store.clone(), pending.clone());
            async move {
                let receipt = ReplyReceipt { sender: agent("bob"), fingerprint: fp.into(), message_id: id.into() };
                let committed =
                    store.commit_reply(cid, &pending, receipt, Arc::from(id), record("alice", Decision::Allowed)).await;
                format!("{cid} {fp}: {:?}", committed.map(|c| c.map(|(commit, linked)| (commit, linked.is_some()))))
            }
        };
        let outcomes = futures_util::future::join_all([
            reply("10.alice", "f", "m1"),
            reply("10.alice", "g", "m2"),
            reply("10.alice", "f", "m3"),
            reply("11.alice", "h", "m4"),
            reply("12.alice", "k", "m5"),
        ])
        .await;
        log.extend(outcomes);
        log.push(format!("alice's chain {}", chain(&store, "alice").await));
        log.push(format!("a1 gets {}", show(&store.claim(&a1, 5, NO_WAIT).await.unwrap())));
        log
    })
    .await;
}

#[tokio::test]
async fn state_compare_and_set() {
    contract(|store| async move {
        let mut log = Vec::new();
        let bob = agent("bob");
        let upd = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        log.push(format!("{:?}", store.get_state(&bob).await));
        const MAX: usize = 1024;
        log.push(format!("{:?}", store.update_state(&bob, upd("a", "1"), Some(0), MAX).await));
        log.push(format!("{:?}", store.update_state(&bob, upd("a", "2"), Some(0), MAX).await));
        log.push(format!("{:?}", store.update_state(&bob, BTreeMap::new(), Some(1), MAX).await));
        log.push(format!("{:?}", store.update_state(&bob, upd("b", "\"x\""), None, MAX).await));
        // 2 + 4 bytes stored: a 6-byte bound refuses a seventh byte, and changes nothing.
        log.push(format!("{:?}", store.update_state(&bob, upd("c", ""), None, 6).await));
        log.push(format!("{:?}", store.update_state(&bob, upd("a", "12"), None, 6).await));
        log.push(format!("{:?}", store.get_state(&bob).await));
        log.push(format!("{:?}", store.reset_state(&bob, Some(1)).await));
        log.push(format!("{:?}", store.reset_state(&bob, Some(2)).await));
        log.push(format!("{:?}", store.get_state(&bob).await));
        log
    })
    .await;
}

#[tokio::test]
async fn rate_limits_admit_a_burst_then_refuse_without_consuming() {
    use mas_core::policy::ratelimit::Limits;
    contract(|store| async move {
        let mut log = Vec::new();
        let two_per_minute = Limits { per_minute: 2, per_hour: 100 };
        for _ in 0..3 {
            let r = store.admit_rate(&agent("alice"), two_per_minute, 1).await.unwrap();
            log.push(format!("{} {:?}", r.admitted, r.refused.map(|l| l.window)));
        }
        let one_per_hour = Limits { per_minute: 100, per_hour: 1 };
        for _ in 0..2 {
            let r = store.admit_rate(&agent("bob"), one_per_hour, 1).await.unwrap();
            log.push(format!("{} {:?}", r.admitted, r.refused.map(|l| l.window)));
        }
        let never = store.admit_rate(&agent("carol"), Limits { per_minute: 0, per_hour: 100 }, 1).await.unwrap();
        log.push(format!("{never:?}"));
        log
    })
    .await;
}

/// A batch is granted the prefix that single admissions would get: 5 of 7 under a burst of
/// 5, nothing for the next batch, and an empty batch touches nothing.
#[tokio::test]
async fn rate_limits_grant_a_batch_its_admissible_prefix() {
    use mas_core::policy::ratelimit::Limits;
    contract(|store| async move {
        let mut log = Vec::new();
        let five_per_minute = Limits { per_minute: 5, per_hour: 100 };
        for count in [0, 3, 4, 2] {
            let r = store.admit_rate(&agent("dave"), five_per_minute, count).await.unwrap();
            log.push(format!("{count}: {} {:?}", r.admitted, r.refused.map(|l| l.window)));
        }
        let hourly = Limits { per_minute: 100, per_hour: 3 };
        let r = store.admit_rate(&agent("erin"), hourly, 10).await.unwrap();
        log.push(format!("{} {:?}", r.admitted, r.refused.map(|l| l.window)));
        assert_eq!(log[1..4], ["3: 3 None", "4: 2 Some(Minute)", "2: 0 Some(Minute)"], "{log:?}");
        log
    })
    .await;
}

#[tokio::test]
async fn audited_admission_records_every_decision_and_queues_only_routable_ones() {
    contract(|store| async move {
        let mut log = Vec::new();
        for n in 0..3 {
            log.push(format!("route {n}: {}", admitted(store.admit(routed("bob", &format!("m{n}")), None).await)));
        }
        log.push(format!("queue full: {}", admitted(store.admit(routed("bob", "m3"), None).await)));
        log.push(format!("denial: {}", admitted(store.admit(denied("bob", Decision::DlpBlocked), None).await)));
        log.push(format!("queue {:?}", store.queue_len(&work("bob")).await));
        log.push(format!("chain {}", chain(&store, "bob").await));
        log.push(format!("sixth: {}", admitted(store.admit(denied("bob", Decision::RateLimited), None).await)));
        log.push(format!("chain full: {}", admitted(store.admit(denied("bob", Decision::RateLimited), None).await)));
        log.push(format!("other chain: {}", admitted(store.admit(denied("carol", Decision::AuthzDenied), None).await)));
        log.push(format!("chain {}", chain(&store, "bob").await));
        for n in 0..2 {
            let event = SecurityEvent {
                details: serde_json::json!({ "n": n }),
                event_type: "authz_changed".into(),
                hash_version: 0,
                previous_hash: None,
                timestamp: 1.0,
            };
            log.push(format!("security {:?}", store.append_security(event).await.map(|e| e.previous_hash.is_some())));
        }
        let events = store.security_chain().await.unwrap();
        log.push(format!("security chain {} verify={:?}", events.records.len(), events.verify()));
        log
    })
    .await;
}

#[tokio::test]
async fn circuit_opens_on_failed_messages_and_recovers_through_bounded_probes() {
    let config = CircuitConfig {
        failure_threshold: 2,
        window: Duration::from_secs(60),
        open_for: Duration::from_millis(300),
        success_threshold: 1,
        max_probes: 1,
    };
    contract(move |store| async move {
        let mut log = Vec::new();
        let circuit = Some(&config);
        let b1 = session("bob", "b1", "o1");
        store.acquire_lease(&b1, LEASE).await.unwrap();
        let gate = |label: &'static str| {
            let store = store.clone();
            async move {
                let gate = store.gate(&agent("bob"), Some(&config)).await;
                // What operators see (metrics): depth, head-of-queue admission time, phase.
                let gauges = store.queue_gauges(&agent("bob")).await;
                format!("{label} {gate:?} {gauges:?}")
            }
        };
        log.push(gate("fresh").await);
        for n in 0..3 {
            store.admit(routed("bob", &format!("m{n}")), circuit).await.unwrap();
        }
        let claimed = store.claim(&b1, 3, NO_WAIT).await.unwrap();
        // A message failing its first attempt counts; one failing a later attempt does not.
        let fail = |m: &QueuedMessage, attempts| StoreEffect::DeadLetter {
            entry: m.entry.clone(),
            envelope: m.envelope.clone(),
            attempts,
            reason: "handler_error".into(),
            nacked: true,
        };
        let effects = vec![fail(&claimed[0], 1), fail(&claimed[1], 3)];
        log.push(format!("settle {:?}", store.apply(&b1, effects, now(), circuit).await));
        log.push(gate("one failed message").await);
        log.push(format!("settle {:?}", store.apply(&b1, vec![fail(&claimed[2], 1)], now(), circuit).await));
        log.push(gate("two failed messages").await);
        log.push(format!("while open: {}", admitted(store.admit(routed("bob", "x"), circuit).await)));
        tokio::time::sleep(Duration::from_millis(400)).await;
        log.push(gate("after open_for").await);
        log.push(format!("probe: {}", admitted(store.admit(routed("bob", "p1"), circuit).await)));
        log.push(gate("probe out").await);
        log.push(format!("second probe: {}", admitted(store.admit(routed("bob", "p2"), circuit).await)));
        let probe = store.claim(&b1, 1, NO_WAIT).await.unwrap();
        log.push(format!("probe acked {:?}", store.apply(&b1, vec![ack(&probe[0])], now(), circuit).await));
        log.push(gate("closed again").await);
        log.push(format!("chain {}", chain(&store, "bob").await));
        log
    })
    .await;
}

#[tokio::test]
async fn archiving_trims_the_oldest_records_behind_a_checkpoint() {
    contract(|store| async move {
        let mut log = Vec::new();
        for n in 0..5 {
            store
                .admit(denied("bob", if n == 2 { Decision::Alert } else { Decision::RateLimited }), None)
                .await
                .unwrap();
        }
        let oldest = store.audit_oldest(&agent("bob"), 3).await.unwrap();
        let decisions: Vec<&str> = oldest.records.iter().map(|r| r.decision.as_str()).collect();
        log.push(format!(
            "oldest {decisions:?} checkpoint={:?} len={:?}",
            oldest.checkpoint,
            store.audit_len(&agent("bob")).await
        ));
        let last = oldest.records.last().unwrap();
        log.push(format!("wrong record {:?}", store.trim_audit(&agent("bob"), 3, &oldest.records[0]).await));
        log.push(format!("trim {:?}", store.trim_audit(&agent("bob"), 3, last).await));
        log.push(format!("again {:?}", store.trim_audit(&agent("bob"), 3, last).await));
        log.push(format!("len {:?}", store.audit_len(&agent("bob")).await));
        log.push(format!("chain {}", chain(&store, "bob").await));
        for _ in 0..4 {
            log.push(format!("room again: {}", admitted(store.admit(denied("bob", Decision::DlpBlocked), None).await)));
        }
        log.push(format!("chain {}", chain(&store, "bob").await));
        log
    })
    .await;
}

/// A plain connection to the test's Redis, for what the store API does not show.
async fn raw_redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Archiving on Redis finds the records to trim by their 0-n entry ids; a chain an earlier
/// version wrote with time-based ids is appended to and archived all the same (by reading).
#[tokio::test]
async fn on_redis_a_chain_with_time_based_ids_is_appended_to_and_archived() {
    let Some(redis) = RedisServer::start() else { return };
    let backend = RedisBackend::connect(&RedisSettings::new(&redis.url)).await.unwrap().with_max_audit_records(100);
    let store = Store::from(backend);
    let mut logs = Vec::new();
    for (chain, legacy) in [("fresh", false), ("legacy", true)] {
        let mut log = Vec::new();
        for _ in 0..4 {
            store.admit(denied(chain, Decision::RateLimited), None).await.unwrap();
        }
        if legacy {
            let stream = format!("mas:{{{chain}}}:audit");
            let ids = rewrite_audit_stream(&redis.url, &stream, |_, record| record.to_string()).await;
            assert!(ids.iter().all(|id| id.starts_with("0-")), "appends number their entries: {ids:?}");
        }
        for _ in 0..2 {
            log.push(admitted(store.admit(denied(chain, Decision::Alert), None).await));
        }
        for take in [3, 2] {
            let oldest = store.audit_oldest(&agent(chain), take).await.unwrap();
            let last = oldest.records.last().unwrap();
            log.push(format!("wrong record {:?}", store.trim_audit(&agent(chain), take, &oldest.records[0]).await));
            log.push(format!(
                "trim {:?}",
                store.trim_audit(&agent(chain), take, last).await.map(|c| c.map(|c| c.archived))
            ));
            log.push(format!("again {:?}", store.trim_audit(&agent(chain), take, last).await));
        }
        log.push(format!("len {:?}", store.audit_len(&agent(chain)).await));
        let snapshot = store.audit_chain(&agent(chain)).await.unwrap();
        log.push(format!("verify {:?} archived {}", snapshot.verify(), snapshot.checkpoint.archived));
        logs.push(log);
    }
    assert_eq!(logs[0], logs[1], "fresh (left) and time-based ids (right) disagree");
    assert!(logs[0].contains(&"trim Ok(Some(5))".to_string()), "{:?}", logs[0]);
}

/// Script calls Redis has run since its statistics were last reset (a call refused with
/// NOSCRIPT, before the client loads the script, does not count).
async fn script_calls(url: &str) -> u64 {
    let mut con = raw_redis(url).await;
    let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut con).await.unwrap();
    let line = stats.lines().find_map(|l| l.strip_prefix("cmdstat_evalsha:")).unwrap_or("");
    let field = |name: &str| -> u64 {
        let value = line.split(',').find_map(|f| f.split_once('=').filter(|(k, _)| *k == name));
        value.and_then(|(_, v)| v.parse().ok()).unwrap_or(0)
    };
    field("calls") - field("failed_calls")
}

async fn reset_stats(url: &str) {
    let mut con = raw_redis(url).await;
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut con).await.unwrap();
}

/// An all-clear gate answer is used again for a moment (one round trip fewer per send), but
/// never past a session ending through this broker.
#[tokio::test]
async fn on_redis_an_all_clear_gate_is_read_once_and_forgotten_when_the_session_ends() {
    let Some(redis) = RedisServer::start() else { return };
    let store = Store::from(RedisBackend::connect(&RedisSettings::new(&redis.url)).await.unwrap());
    let b1 = session("bob", "b1", "o1");
    store.acquire_lease(&b1, LEASE).await.unwrap();
    reset_stats(&redis.url).await;
    let first = store.gate(&agent("bob"), None).await.unwrap();
    let second = store.gate(&agent("bob"), None).await.unwrap();
    assert!(first.live && second.live && second.circuit_admits);
    assert_eq!(script_calls(&redis.url).await, 1, "the second read used the first's answer");
    store.release_lease(&b1).await.unwrap();
    let after = store.gate(&agent("bob"), None).await.unwrap();
    assert!(!after.live, "the ended session is seen at once");
    assert_eq!(script_calls(&redis.url).await, 3, "release, then a fresh read");
    store.gate(&agent("bob"), None).await.unwrap();
    assert_eq!(script_calls(&redis.url).await, 4, "'no live session' is read again every time");
}

/// Milliseconds until `key` expires: -1 without an expiry, -2 when it does not exist.
async fn pttl(url: &str, key: &str) -> i64 {
    let mut con = raw_redis(url).await;
    redis::cmd("PTTL").arg(key).query_async(&mut con).await.unwrap()
}

/// An instance's replies queue must not outlive it by more than the retention: sessions come
/// and go with fresh instance ids, and each would otherwise leave a stream behind for good.
#[tokio::test]
async fn on_redis_a_replies_queue_expires_after_its_session_and_goes_when_it_ends_empty() {
    let Some(redis) = RedisServer::start() else { return };
    let store = Store::from(RedisBackend::connect(&RedisSettings::new(&redis.url)).await.unwrap());
    const RETENTION_MS: i64 = 3_600_000;
    let lease_ms = LEASE.as_millis() as i64;
    let keeps = |ttl: i64| ttl > lease_ms + RETENTION_MS - 5_000 && ttl <= lease_ms + RETENTION_MS;
    let (a1, pending) = alice_asking_bob(&store).await;
    let a1_replies = "mas:{alice}:replies:a1";
    assert!(keeps(pttl(&redis.url, a1_replies).await), "set when the lease is taken");
    assert!(store.renew_lease(&a1, LEASE).await.unwrap());
    assert!(keeps(pttl(&redis.url, a1_replies).await), "pushed on by every renewal");

    let cid = "0123.alice";
    open(&store, cid, pending.clone(), routed("bob", "req")).await.unwrap();
    store.release_lease(&a1).await.unwrap();
    assert_eq!(pttl(&redis.url, a1_replies).await, -2, "an empty queue goes with its session");
    // The reply arrives after the asking instance left: it waits, but not for ever.
    let receipt = ReplyReceipt { sender: agent("bob"), fingerprint: "f".into(), message_id: "m1".into() };
    store
        .commit_reply(cid, &pending, receipt, Arc::from("rep"), record("alice", Decision::Allowed))
        .await
        .unwrap()
        .expect("the reply is committed");
    let orphan = pttl(&redis.url, a1_replies).await;
    assert!(orphan > RETENTION_MS - 5_000 && orphan <= RETENTION_MS, "a reply for nobody expires: {orphan}");

    store.acquire_lease(&a1, LEASE).await.unwrap();
    assert!(keeps(pttl(&redis.url, a1_replies).await), "the instance back owns the queue again");
    assert_eq!(show(&store.claim(&a1, 5, NO_WAIT).await.unwrap()), "[rep@1]", "and finds its reply");
    store.release_lease(&a1).await.unwrap();
    assert!(pttl(&redis.url, a1_replies).await > 0, "a queue with a reply held is kept, expiring");
}

/// A reply to a request this broker opened skips reading the pending record (one round trip
/// fewer), and the commit still decides: a record gone behind the broker's back refuses the
/// reply as the read would have. Once committed, the request is read again.
#[tokio::test]
async fn on_redis_a_reply_to_a_request_opened_here_skips_the_read_and_the_commit_still_decides() {
    let Some(redis) = RedisServer::start() else { return };
    let store = Store::from(RedisBackend::connect(&RedisSettings::new(&redis.url)).await.unwrap());
    let (_a1, pending) = alice_asking_bob(&store).await;
    let ttl = Duration::from_secs(10);
    for cid in ["1.alice", "2.alice"] {
        let ahead = store.begin_request(cid, &pending, ttl).await.unwrap();
        store.open_request(cid, pending.clone(), ttl, routed("bob", cid), None, ahead).await.unwrap();
    }
    reset_stats(&redis.url).await;
    let looked_up = store.correlation(&agent("alice"), "1.alice").await.unwrap();
    assert_eq!(looked_up, Correlation::Pending(pending.clone()));
    assert_eq!(script_calls(&redis.url).await, 0, "answered from what the broker noted");

    let receipt = |id: &str| ReplyReceipt { sender: agent("bob"), fingerprint: "f".into(), message_id: id.into() };
    let commit = |cid: &'static str, id: &'static str| {
        let (store, pending, receipt) = (store.clone(), pending.clone(), receipt(id));
        async move {
            let record = record("alice", Decision::Allowed);
            store.commit_reply(cid, &pending, receipt, Arc::from("rep"), record).await.unwrap().map(|(c, _)| c)
        }
    };
    assert_eq!(commit("1.alice", "r1").await, Ok(ReplyCommit::Queued { message_id: "r1".into() }));
    let answered = store.correlation(&agent("alice"), "1.alice").await.unwrap();
    assert!(matches!(answered, Correlation::Answered(_)), "read again once committed: {answered:?}");

    let mut con = raw_redis(&redis.url).await;
    let _: () = redis::cmd("DEL").arg("mas:{alice}:pending:2.alice").query_async(&mut con).await.unwrap();
    let noted = store.correlation(&agent("alice"), "2.alice").await.unwrap();
    assert_eq!(noted, Correlation::Pending(pending.clone()), "the broker does not know yet");
    assert_eq!(commit("2.alice", "r2").await, Err(ReplyError::Unknown), "the commit refuses it");
    assert_eq!(store.correlation(&agent("alice"), "2.alice").await.unwrap(), Correlation::Unknown);
}

/// What a claim started by [`waiting_claim`] got, once it had time to find the queues empty
/// and wait, and `step` ran.
async fn claimed_after<Fut: Future>(claim: tokio::task::JoinHandle<Result<Claimed, StoreError>>, step: Fut) -> String {
    tokio::time::sleep(Duration::from_millis(100)).await;
    step.await;
    match tokio::time::timeout(Duration::from_secs(5), claim).await.expect("the claim returned").unwrap() {
        Ok((batch, _)) => show(&batch),
        Err(err) => format!("{err:?}"),
    }
}

/// A session of this broker waiting for work gets what an admission or a reply commit queues
/// claimed for it by that very step: no claim of its own, no wake-up through the store, and no
/// other session of the agent woken for nothing. What it gets is held by it as a claim's would
/// be, and a lost lease is a claim's error.
#[tokio::test]
async fn on_redis_a_waiting_claim_is_handed_what_the_step_that_queued_it_claimed() {
    let Some(redis) = RedisServer::start() else { return };
    let store = Store::from(RedisBackend::connect(&RedisSettings::new(&redis.url)).await.unwrap());
    let b1 = session("bob", "b1", "ob1");
    store.acquire_lease(&b1, LEASE).await.unwrap();
    let (a1, pending) = alice_asking_bob(&store).await;
    // Refusals recorded in both chains, so the broker knows their heads (a first commit to a
    // chain learns it in a call of its own).
    store.admit(denied("bob", Decision::AuthzDenied), None).await.unwrap();
    store.admit(denied("alice", Decision::AuthzDenied), None).await.unwrap();

    // Another session of bob waits too: the hand-off goes to one of them and wakes only it.
    let b2 = session("bob", "b2", "ob2");
    store.acquire_lease(&b2, LEASE).await.unwrap();
    let claim = waiting_claim(&store, &b1, ClaimCursor::default());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = waiting_claim(&store, &b2, ClaimCursor::default());
    let cid = "1.alice";
    let request = async {
        reset_stats(&redis.url).await;
        let ahead = store.begin_request(cid, &pending, LEASE).await.unwrap();
        store.open_request(cid, pending.clone(), LEASE, routed("bob", "req"), None, ahead).await.unwrap();
    };
    assert_eq!(claimed_after(claim, request).await, "[req@1]");
    assert_eq!(script_calls(&redis.url).await, 2, "the pending record and the admission; b2 did not claim");
    assert!(!other.is_finished(), "b2 still waits");
    other.abort();
    let held = store.own_pending(&b1, 5).await.unwrap();
    assert_eq!(show(&held), "[req@1]", "held by the session it was handed to");

    let claim = waiting_claim(&store, &a1, ClaimCursor::default());
    let reply = async {
        reset_stats(&redis.url).await;
        let receipt = ReplyReceipt { sender: agent("bob"), fingerprint: "f".into(), message_id: "r1".into() };
        let record = record("alice", Decision::Allowed);
        let committed = store.commit_reply(cid, &pending, receipt, Arc::from("rep"), record).await;
        assert!(matches!(committed, Ok(Ok(_))), "{committed:?}");
    };
    assert_eq!(claimed_after(claim, reply).await, "[rep@1]");
    assert_eq!(script_calls(&redis.url).await, 1, "the reply commit alone");
    assert_eq!(store.apply(&b1, vec![ack(&held[0])], Now::default(), None).await.unwrap(), vec![Ok(())]);

    let claim = waiting_claim(&store, &b1, ClaimCursor::default());
    let revoked = async {
        assert!(store.revoke_lease(&agent("bob"), &b1.instance).await.unwrap());
        store.admit(routed("bob", "late"), None).await.unwrap();
    };
    assert_eq!(claimed_after(claim, revoked).await, "NotOwner", "the hand-off is fenced by the lease, as a claim is");
}
