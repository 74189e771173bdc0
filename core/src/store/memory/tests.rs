use std::time::Duration;

use super::*;
use crate::delivery::{Outcome, RequeueReason};
use crate::policy::audit::{Chained, Decision};
use crate::store::DeadLetterSelector;

fn agent(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn session(a: &str, i: &str, owner: &str) -> SessionRef {
    SessionRef { agent: agent(a), instance: InstanceId::new(i).unwrap(), owner: OwnerToken::new(owner) }
}

fn work(a: &str) -> QueueKey {
    QueueKey::Work(agent(a))
}

fn at(ms: u64) -> Instant {
    Instant::from_nanos(ms * 1_000_000)
}

const TTL: Duration = Duration::from_secs(6);

fn record(target: &str, decision: Decision) -> AuditRecord {
    AuditRecord {
        correlation_id: None,
        decision,
        hash_version: 0,
        latency_ms: 0.0,
        message_id: "m".into(),
        message_type: Some("t".into()),
        payload_hash: String::new(),
        previous_hash: None,
        sender_id: "alice".into(),
        sender_instance_id: None,
        target_id: target.into(),
        timestamp: 0.0,
        trace_id: None,
        violations: Vec::new(),
    }
}

fn routed(target: &str, envelope: &str) -> Admission {
    Admission { chain: agent(target), record: record(target, Decision::Allowed), envelope: Some(Arc::from(envelope)) }
}

#[test]
fn claim_is_fifo_exclusive_and_replies_come_first() {
    let mut s = MemoryStore::default();
    let (b1, b2) = (session("bob", "b1", "o1"), session("bob", "b2", "o2"));
    s.acquire_lease(&b1, TTL, at(0)).unwrap();
    s.acquire_lease(&b2, TTL, at(0)).unwrap();
    for i in 0..3 {
        s.enqueue(&work("bob"), Arc::from(format!("w{i}"))).unwrap();
    }
    s.enqueue(&QueueKey::Replies(agent("bob"), InstanceId::new("b1").unwrap()), Arc::from("r")).unwrap();
    let got: Vec<_> = s.claim(&b1, 2, at(0)).into_iter().map(|m| m.envelope.to_string()).collect();
    assert_eq!(got, ["r", "w0"]);
    let got: Vec<_> = s.claim(&b2, 5, at(0)).into_iter().map(|m| m.envelope.to_string()).collect();
    assert_eq!(got, ["w1", "w2"], "b2 never sees b1's replies");
}

#[test]
fn settling_is_fenced_by_owner() {
    let mut s = MemoryStore::default();
    let (a, b) = (session("bob", "b1", "o1"), session("bob", "b2", "o2"));
    s.acquire_lease(&a, TTL, at(0)).unwrap();
    s.enqueue(&work("bob"), Arc::from("m")).unwrap();
    let m = s.claim(&a, 1, at(0)).remove(0);
    let ack = StoreEffect::Ack { entry: m.entry.clone() };
    assert_eq!(s.apply(&b, ack.clone(), at(0)), Err(StoreError::NotOwner));
    assert_eq!(s.apply(&a, ack.clone(), at(0)), Ok(()));
    assert_eq!(s.apply(&a, ack, at(0)), Err(StoreError::NotOwner), "settled twice");
    assert_eq!(s.queue_len(&work("bob")), 0);
}

/// Instance ids are rarely used again: a session's emptied replies queue ends with it, a queue
/// with replies waiting stays for the instance to come back, and a stale owner removes nothing.
#[test]
fn an_ended_sessions_empty_replies_queue_goes_and_one_with_replies_stays() {
    let mut s = MemoryStore::default();
    let replies = |i: &str| QueueKey::Replies(agent("bob"), InstanceId::new(i).unwrap());
    let (b1, b2) = (session("bob", "b1", "o1"), session("bob", "b2", "o2"));
    s.acquire_lease(&b1, TTL, at(0)).unwrap();
    s.acquire_lease(&b2, TTL, at(0)).unwrap();
    s.enqueue(&replies("b1"), Arc::from("r1")).unwrap();
    s.enqueue(&replies("b2"), Arc::from("r2")).unwrap();
    let m = s.claim(&b1, 1, at(0)).remove(0);
    s.apply(&b1, StoreEffect::Ack { entry: m.entry }, at(0)).unwrap();
    s.release_lease(&session("bob", "b1", "stale"));
    assert!(s.queues.contains_key(&replies("b1")), "a stale owner ends nothing");
    s.release_lease(&b1);
    s.release_lease(&b2);
    assert!(!s.queues.contains_key(&replies("b1")), "emptied and ended: gone");
    assert_eq!(s.queue_len(&replies("b2")), 1, "a reply still waits for b2");
    s.acquire_lease(&b2, TTL, at(1)).unwrap();
    let got: Vec<_> = s.claim(&b2, 5, at(1)).into_iter().map(|m| m.envelope.to_string()).collect();
    assert_eq!(got, ["r2"], "the instance back finds it");
}

#[test]
fn requeue_respects_not_before_and_keeps_attempt() {
    let mut s = MemoryStore::default();
    let a = session("bob", "b1", "o1");
    s.acquire_lease(&a, TTL, at(0)).unwrap();
    s.enqueue(&work("bob"), Arc::from("m")).unwrap();
    let m = s.claim(&a, 1, at(0)).remove(0);
    let effect = StoreEffect::Requeue {
        entry: m.entry,
        envelope: m.envelope,
        attempt: 2,
        not_before: at(2000),
        reason: RequeueReason::RetryableNack,
    };
    s.apply(&a, effect, at(0)).unwrap();
    assert!(s.claim(&a, 1, at(1999)).is_empty());
    assert_eq!(s.next_ready_at(&a), Some(at(2000)));
    assert_eq!(s.claim(&a, 1, at(2000))[0].attempt, 2);
}

#[test]
fn work_of_an_expired_lease_is_reclaimed_by_a_sibling() {
    let mut s = MemoryStore::default();
    let (dead, alive) = (session("bob", "b1", "o1"), session("bob", "b2", "o2"));
    s.acquire_lease(&dead, TTL, at(0)).unwrap();
    s.acquire_lease(&alive, Duration::from_secs(60), at(0)).unwrap();
    s.enqueue(&work("bob"), Arc::from("m")).unwrap();
    assert_eq!(s.claim(&dead, 1, at(0)).len(), 1);
    assert!(s.claim(&alive, 1, at(5_999)).is_empty(), "lease still live");
    let again = s.claim(&alive, 1, at(6_000));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 1);
    let ack = StoreEffect::Ack { entry: again[0].entry.clone() };
    assert_eq!(s.apply(&dead, ack.clone(), at(0)), Err(StoreError::NotOwner), "the dead owner is fenced off");
    assert_eq!(s.apply(&alive, ack, at(0)), Ok(()));
}

#[test]
fn leases_refuse_duplicates_until_expiry_and_fence_renewal() {
    let mut s = MemoryStore::default();
    let (first, second) = (session("bob", "b1", "o1"), session("bob", "b1", "o2"));
    s.acquire_lease(&first, TTL, at(0)).unwrap();
    assert_eq!(s.acquire_lease(&second, TTL, at(1000)), Err(LeaseError::Held));
    assert!(s.agent_is_live(&agent("bob"), at(1000)));
    assert!(s.renew_lease(&first, TTL, at(2000)));
    assert!(!s.agent_is_live(&agent("bob"), at(8000)));
    assert!(!s.renew_lease(&first, TTL, at(8000)), "an expired lease is never renewed");
    s.acquire_lease(&second, TTL, at(8000)).unwrap();
    s.release_lease(&first);
    assert!(s.instance_is_live(&agent("bob"), &InstanceId::new("b1").unwrap(), at(8001)), "stale release is a no-op");
}

/// The session of instance `b1` opened by `broker` in its `incarnation`.
fn broker_session(broker: &str, incarnation: u64, seq: u64) -> SessionRef {
    let (bob, b1) = (agent("bob"), InstanceId::new("b1").unwrap());
    let owner = OwnerToken::for_session(&crate::ids::BrokerId::new(broker).unwrap(), incarnation, &bob, &b1, seq);
    SessionRef { agent: bob, instance: b1, owner }
}

#[test]
fn a_restarted_broker_takes_over_its_dead_predecessors_leases_and_work() {
    let mut s = MemoryStore::default();
    let dead = broker_session("host-50051", 1, 0);
    s.acquire_lease(&dead, TTL, at(0)).unwrap();
    s.enqueue(&work("bob"), Arc::from("m")).unwrap();
    assert_eq!(s.claim(&dead, 1, at(0)).len(), 1, "the dead session held the message");

    let same_process = broker_session("host-50051", 1, 1);
    assert_eq!(s.acquire_lease(&same_process, TTL, at(10)), Err(LeaseError::Held), "not from a live incarnation");
    let other_broker = broker_session("host-50052", 2, 0);
    assert_eq!(s.acquire_lease(&other_broker, TTL, at(10)), Err(LeaseError::Held), "not from another broker");

    let restarted = broker_session("host-50051", 2, 0);
    assert_eq!(s.acquire_lease(&restarted, TTL, at(10)), Ok(()), "taken over at once, not after the TTL");
    let again = s.claim(&restarted, 1, at(10));
    assert_eq!(again.len(), 1, "the dead session's work is handed back at once");
    assert!(!s.renew_lease(&dead, TTL, at(20)), "the predecessor is fenced off");
}

#[test]
fn owner_tokens_name_their_broker_and_incarnation() {
    let restarted = broker_session("host-1", 0xab, 3).owner;
    assert_eq!(restarted.origin_prefixes(), Some(("host-1~", "host-1~00000000000000ab~")));
    assert!(restarted.supersedes(&broker_session("host-1", 0xaa, 9).owner));
    assert!(!restarted.supersedes(&broker_session("host-1", 0xab, 9).owner));
    assert!(!restarted.supersedes(&broker_session("host-10", 0xaa, 9).owner), "a prefix of another broker id");
    assert!(!OwnerToken::new("legacy").supersedes(&restarted));
    assert!(!restarted.supersedes(&OwnerToken::new("legacy")));
}

#[test]
fn reply_commit_is_idempotent_for_identical_replies_only() {
    let mut s = MemoryStore::default();
    let pending = PendingRequest {
        requester: agent("alice"),
        requester_instance: InstanceId::new("a1").unwrap(),
        target: agent("bob"),
    };
    s.open_request("c1", pending.clone(), Duration::from_secs(10), routed("bob", "req"), None, at(0)).unwrap();
    assert_eq!(s.correlation("c1", at(1)), Correlation::Pending(pending.clone()));
    let receipt =
        |fp: &str, id: &str| ReplyReceipt { sender: agent("bob"), fingerprint: fp.into(), message_id: id.into() };
    let mut reply = |fp: &str, id: &str, at| {
        let record = record("alice", Decision::Allowed);
        s.commit_reply("c1", &pending, receipt(fp, id), Arc::from("rep"), record, at)
            .unwrap()
            .map(|(c, r)| (c, r.is_some()))
    };
    assert_eq!(reply("f", "m1", at(2)), Ok((ReplyCommit::Queued { message_id: "m1".into() }, true)));
    assert_eq!(reply("f", "m2", at(3)), Ok((ReplyCommit::AlreadyQueued { message_id: "m1".into() }, false)));
    assert_eq!(reply("g", "m3", at(3)), Err(ReplyError::Completed));
    assert_eq!(s.audit_chain(&agent("alice")).records.len(), 1, "the reply is audited in the requester's chain");
    assert_eq!(s.queue_len(&QueueKey::Replies(agent("alice"), InstanceId::new("a1").unwrap())), 1);
    assert_eq!(s.correlation("c1", at(10_000)), Correlation::Unknown, "receipt lives until the deadline");
}

#[test]
fn answered_and_unanswered_correlations_are_forgotten_when_due() {
    let mut s = MemoryStore::default();
    let pending = PendingRequest {
        requester: agent("alice"),
        requester_instance: InstanceId::new("a1").unwrap(),
        target: agent("bob"),
    };
    let ttl = Duration::from_secs(1);
    for n in 0..1000 {
        let id = format!("c{n}");
        s.open_request(&id, pending.clone(), ttl, routed("bob", "req"), None, at(n)).unwrap();
        if n % 2 == 0 {
            let receipt = ReplyReceipt { sender: agent("bob"), fingerprint: "f".into(), message_id: id.clone() };
            let record = record("alice", Decision::Allowed);
            s.commit_reply(&id, &pending, receipt, Arc::from("rep"), record, at(n)).unwrap().unwrap();
        }
    }
    assert!(matches!(s.correlation("c998", at(1500)), Correlation::Answered(_)));
    assert_eq!(s.correlation("c999", at(1500)), Correlation::Pending(pending.clone()));
    assert_eq!(s.correlation("c0", at(1500)), Correlation::Unknown, "a receipt lives until the deadline");
    assert_eq!(s.correlation("c1", at(1500)), Correlation::Expired, "a request reads expired for the grace period");
    let after_grace = at(999) + ttl + REQUEST_EXPIRED_GRACE;
    assert_eq!(s.correlation("c999", after_grace), Correlation::Unknown);
    assert!(s.pending.is_empty() && s.receipts.is_empty(), "nothing due is kept");
    assert!(s.forget_at.is_empty(), "and no index entry either");
}

#[test]
fn expired_request_cannot_be_answered() {
    let mut s = MemoryStore::default();
    let pending = PendingRequest {
        requester: agent("alice"),
        requester_instance: InstanceId::new("a1").unwrap(),
        target: agent("bob"),
    };
    s.open_request("c1", pending, Duration::from_millis(100), routed("bob", "req"), None, at(0)).unwrap();
    assert_eq!(s.correlation("c1", at(100)), Correlation::Expired);
    assert_eq!(s.correlation("c1", at(60_099)), Correlation::Expired);
    assert_eq!(s.correlation("c1", at(60_100)), Correlation::Unknown);
}

#[test]
fn state_revisions_compare_and_set() {
    const MAX: usize = usize::MAX;
    let mut s = MemoryStore::default();
    let bob = agent("bob");
    let upd = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    assert_eq!(s.update_state(&bob, upd("a", "1"), Some(0), MAX), Ok(1));
    assert_eq!(s.update_state(&bob, upd("a", "2"), Some(0), MAX), Err(StateError::RevisionConflict { current: 1 }));
    assert_eq!(s.update_state(&bob, BTreeMap::new(), Some(1), MAX), Ok(1), "empty update does not bump");
    assert_eq!(s.update_state(&bob, upd("b", "3"), None, MAX), Ok(2), "no expected revision: unconditional");
    // "a"+"1" and "b"+"3" hold 4 bytes; "cc"+"45" would take the state to 8.
    assert_eq!(s.update_state(&bob, upd("cc", "45"), None, 7), Err(StateError::TooLarge { bytes: 8 }));
    assert_eq!(s.update_state(&bob, upd("a", "9"), None, 4), Ok(3), "overwriting keeps the size");
    assert_eq!(s.get_state(&bob).fields.len(), 2);
    assert_eq!(s.reset_state(&bob, Some(3)), Ok(4));
    assert!(s.get_state(&bob).fields.is_empty());
}

#[test]
fn dead_letters_keep_the_envelope_and_are_bounded() {
    let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 10, max_dead_letters: 1, ..Default::default() });
    dead_lettered(&mut s, &["r", "r"]);
    let kept: Vec<_> = s.dead_letters(at(0)).map(|d| d.envelope.to_string()).collect();
    assert_eq!(kept, ["m1"]);
    assert_eq!(s.dead_letters_dropped(), 1);
}

/// Dead-letters one message `m{i}` of bob's queue per reason, the i-th at `at(i s)`.
fn dead_lettered(s: &mut MemoryStore, reasons: &[&str]) -> SessionRef {
    let a = session("bob", "b1", "o1");
    s.acquire_lease(&a, TTL, at(0)).unwrap();
    for (i, reason) in reasons.iter().enumerate() {
        s.enqueue(&work("bob"), Arc::from(format!("m{i}"))).unwrap();
        let m = s.claim(&a, 1, at(0)).remove(0);
        let effect = StoreEffect::DeadLetter {
            entry: m.entry,
            envelope: m.envelope,
            attempts: 5,
            reason: reason.to_string(),
            nacked: true,
        };
        s.apply(&a, effect, at(i as u64 * 1_000)).unwrap();
    }
    a
}

#[test]
fn dead_letters_are_selected_by_id_reason_and_age_and_redriven_once() {
    let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 10, ..Default::default() });
    let a = dead_lettered(&mut s, &["poison", "expired", "poison"]);
    let letters: Vec<DeadLetter> = s.dead_letters(at(2_500)).collect();
    let ages: Vec<u128> = letters.iter().map(|d| d.age.as_millis()).collect();
    assert_eq!(ages, [2_500, 1_500, 500]);
    let select = |selector: DeadLetterSelector| -> Vec<String> {
        letters.iter().filter(|d| selector.matches(d)).map(|d| d.envelope.to_string()).collect()
    };
    assert_eq!(select(DeadLetterSelector::default()), Vec::<String>::new(), "an empty selector selects nothing");
    assert_eq!(select(DeadLetterSelector { all: true, ..Default::default() }), ["m0", "m1", "m2"]);
    let poison = DeadLetterSelector { reason: Some("poison".into()), ..Default::default() };
    assert_eq!(select(poison.clone()), ["m0", "m2"]);
    let old_poison = DeadLetterSelector { older_than: Some(Duration::from_secs(1)), ..poison };
    assert_eq!(select(old_poison), ["m0"]);
    assert_eq!(select(DeadLetterSelector { ids: vec![letters[1].id.clone()], ..Default::default() }), ["m1"]);

    let ids = vec![letters[0].id.clone(), letters[2].id.clone()];
    let outcomes = s.redrive_dead_letters(&agent("bob"), &ids);
    assert!(outcomes.iter().all(|o| matches!(o, Redrive::Queued(_))), "{outcomes:?}");
    assert_eq!(s.redrive_dead_letters(&agent("bob"), &ids), [Redrive::NotFound, Redrive::NotFound], "idempotent");
    assert_eq!(s.redrive_dead_letters(&agent("alice"), &[letters[1].id.clone()]), [Redrive::NotFound], "per agent");
    let redelivered: Vec<_> =
        s.claim(&a, 10, at(3_000)).into_iter().map(|m| (m.envelope.to_string(), m.attempt)).collect();
    assert_eq!(redelivered, [("m0".to_string(), 1), ("m2".to_string(), 1)], "fresh attempt counts, in order");
    assert_eq!(s.purge_dead_letters(&agent("bob"), &[letters[1].id.clone(), "nope".into()]), 1);
    assert_eq!(s.dead_letters(at(3_000)).count(), 0);
}

#[test]
fn a_redrive_into_a_full_queue_keeps_the_dead_letter() {
    let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 1, ..Default::default() });
    dead_lettered(&mut s, &["poison"]);
    s.enqueue(&work("bob"), Arc::from("filler")).unwrap();
    let letter = s.dead_letters(at(0)).next().unwrap();
    assert_eq!(s.redrive_dead_letters(&agent("bob"), std::slice::from_ref(&letter.id)), [Redrive::QueueFull]);
    assert_eq!(s.dead_letters(at(0)).count(), 1, "still a dead letter");
}

#[test]
fn queue_bound_refuses_without_change() {
    let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 1, max_dead_letters: 1, ..Default::default() });
    s.enqueue(&work("bob"), Arc::from("a")).unwrap();
    assert_eq!(s.enqueue(&work("bob"), Arc::from("b")), Err(StoreError::QueueFull));
    assert_eq!(s.queue_len(&work("bob")), 1);
}

#[test]
fn admission_audits_and_queues_as_one_step() {
    let mut s = MemoryStore::default();
    let first = s.admit(routed("bob", "e1"), None, at(0)).unwrap();
    assert!(first.entry.is_some());
    let denial = Admission { chain: agent("bob"), record: record("bob", Decision::DlpBlocked), envelope: None };
    assert_eq!(s.admit(denial, None, at(1)).unwrap().entry, None, "a denial is recorded, not queued");
    let not_routable =
        Admission { chain: agent("bob"), record: record("bob", Decision::RateLimited), envelope: Some(Arc::from("x")) };
    assert_eq!(s.admit(not_routable, None, at(1)).unwrap().entry, None, "only routable decisions queue");
    assert_eq!(s.queue_len(&work("bob")), 1);
    let chain = s.audit_chain(&agent("bob"));
    assert_eq!(chain.records.len(), 3);
    assert_eq!(chain.records[1].previous_hash.as_deref(), Some(first.record.hash().as_str()));
    assert_eq!(chain.verify(), Ok(()));
    assert_eq!(s.audit_chains(), vec![agent("bob")]);
}

#[test]
fn a_full_queue_is_recorded_as_queue_full_and_a_full_chain_refuses() {
    let mut s = MemoryStore::new(MemoryStoreConfig { max_queue_len: 1, max_audit_records: 3, ..Default::default() });
    assert!(s.admit(routed("bob", "e1"), None, at(0)).unwrap().entry.is_some());
    let full = s.admit(routed("bob", "e2"), None, at(0)).unwrap();
    assert_eq!((full.entry, full.record.decision), (None, Decision::QueueFull));
    assert_eq!(full.record.violations, vec!["queue_full".to_string()]);
    s.admit(routed("bob", "e3"), None, at(0)).unwrap();
    assert_eq!(s.admit(routed("bob", "e4"), None, at(0)), Err(StoreError::AuditFull));
    assert_eq!(s.audit_len(&agent("bob")), 3, "nothing recorded by the refused step");
    assert!(s.admit(routed("carol", "e5"), None, at(0)).is_ok(), "other chains are unaffected");
}

#[test]
fn circuit_gates_admission_and_half_open_takes_bounded_probes() {
    let config = CircuitConfig {
        failure_threshold: 2,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(5),
        success_threshold: 1,
        max_probes: 1,
    };
    let mut s = MemoryStore::default();
    let bob = agent("bob");
    assert!(s.gate(&bob, Some(&config), at(0)).circuit_admits);
    s.record_outcome(&bob, Outcome::Failure, &config, at(0));
    s.record_outcome(&bob, Outcome::Failure, &config, at(1));
    assert!(!s.gate(&bob, Some(&config), at(2)).circuit_admits);
    assert!(s.gate(&bob, None, at(2)).circuit_admits, "breakers off");
    let refused = s.admit(routed("bob", "e"), Some(&config), at(2)).unwrap();
    assert_eq!((refused.entry, refused.record.decision), (None, Decision::CircuitOpen));
    // Half-open after 5 s: one probe, then refusals until it answers.
    assert!(s.gate(&bob, Some(&config), at(1001 + 5000)).circuit_admits);
    assert!(s.admit(routed("bob", "p1"), Some(&config), at(6001)).unwrap().entry.is_some());
    assert!(!s.gate(&bob, Some(&config), at(6002)).circuit_admits);
    assert_eq!(s.admit(routed("bob", "p2"), Some(&config), at(6002)).unwrap().record.decision, Decision::CircuitOpen);
    s.record_outcome(&bob, Outcome::Success, &config, at(6003));
    assert!(matches!(s.circuit(&bob), Circuit::Closed { failures: 0, .. }));
    assert!(s.admit(routed("bob", "after"), Some(&config), at(6004)).unwrap().entry.is_some());
}

#[test]
fn security_events_form_their_own_chain_and_tampering_is_detectable() {
    let mut s = MemoryStore::default();
    for n in 0..3 {
        let event = SecurityEvent {
            details: serde_json::json!({ "n": n }),
            event_type: "authz_changed".into(),
            hash_version: 0,
            previous_hash: None,
            timestamp: f64::from(n),
        };
        s.append_security(event).unwrap();
    }
    assert_eq!(s.security_chain().verify(), Ok(()));
    for n in 0..3 {
        s.admit(routed("bob", &format!("e{n}")), None, at(n)).unwrap();
    }
    assert!(s.tamper_with_audit(&agent("bob"), 1, |r| r.decision = Decision::Alert));
    assert!(s.audit_chain(&agent("bob")).verify().is_err());
}

#[test]
fn archived_records_leave_a_checkpoint_the_live_part_continues_from() {
    let mut s = MemoryStore::new(MemoryStoreConfig { max_audit_records: 4, ..Default::default() });
    let bob = agent("bob");
    for n in 0..4 {
        s.admit(routed("bob", &format!("e{n}")), None, at(n)).unwrap();
    }
    assert_eq!(s.admit(routed("bob", "e4"), None, at(4)), Err(StoreError::AuditFull));
    let oldest = s.audit_oldest(&bob, 3);
    assert_eq!(oldest.records.len(), 3);
    let last = oldest.records[2].hash();
    assert_eq!(s.trim_audit(&bob, 3, "not the hash"), None, "a changed prefix is not trimmed");
    let checkpoint = s.trim_audit(&bob, 3, &last).expect("trimmed");
    assert_eq!((checkpoint.archived, checkpoint.base.as_deref()), (3, Some(last.as_str())));
    assert_eq!(s.trim_audit(&bob, 3, &last), None, "trimming twice removes nothing more");
    assert!(s.admit(routed("bob", "e4"), None, at(4)).unwrap().entry.is_some(), "room again");
    let live = s.audit_chain(&bob);
    assert_eq!((live.records.len(), live.checkpoint.archived), (2, 3));
    assert_eq!(live.verify(), Ok(()));
    // The archived part and the live part are one chain.
    let mut whole = oldest.records.clone();
    whole.extend(live.records.iter().cloned());
    assert_eq!(crate::policy::audit::verify(&whole, live.head.as_deref()), Ok(()));
}
