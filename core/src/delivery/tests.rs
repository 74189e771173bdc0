//! Scenario tests and property tests of the session delivery machine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::time::Now;

fn at(ms: u64) -> Now {
    Now::from_mono(Instant::from_nanos(ms * 1_000_000))
}

fn msg(seq: u64, attempt: u32) -> QueuedMessage {
    QueuedMessage { entry: EntryId::from_seq(seq), envelope: Arc::from(format!("{{\"n\":{seq}}}")), attempt }
}

fn drain(m: &mut SessionDelivery) -> Vec<Output> {
    std::iter::from_fn(|| m.poll_output()).collect()
}

fn delivered_id(out: &[Output]) -> DeliveryId {
    match out {
        [Output::Deliver(d)] => d.delivery_id.clone(),
        other => panic!("expected one delivery, got {other:?}"),
    }
}

fn small() -> DeliveryConfig {
    DeliveryConfig {
        max_in_flight: 2,
        ack_timeout: Duration::from_secs(10),
        max_delivery_attempts: 3,
        retry_backoff_initial: Duration::from_millis(100),
        retry_backoff_max: Duration::from_secs(1),
    }
}

#[test]
fn ack_settles_and_a_second_ack_is_stale() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 1));
    let id = delivered_id(&drain(&mut m));
    m.handle_ack(at(1), &id);
    assert_eq!(drain(&mut m), vec![Output::Store(StoreEffect::Ack { entry: EntryId::from_seq(1) })]);
    m.handle_ack(at(2), &id);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().stale_acks, 1);
    m.handle_nack(at(2), &DeliveryId::from_wire("nope"), "x", true);
    assert_eq!(m.stats().stale_nacks, 1);
    assert!(drain(&mut m).is_empty());
}

#[test]
fn a_recovered_message_already_in_flight_is_not_delivered_twice() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 1));
    let first = delivered_id(&drain(&mut m));
    m.handle_recovered(at(1), msg(1, 1));
    assert!(drain(&mut m).is_empty(), "entry 1 is in flight already");
    m.handle_recovered(at(1), msg(2, 1));
    assert_ne!(delivered_id(&drain(&mut m)), first, "an entry the session lost track of is delivered");
    assert_eq!(m.in_flight(), 2);
}

#[test]
fn window_full_hands_message_back_without_counting_an_attempt() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 1));
    m.handle_queued(at(0), msg(2, 1));
    assert_eq!(m.capacity(), 0);
    drain(&mut m);
    m.handle_queued(at(0), msg(3, 2));
    match drain(&mut m).as_slice() {
        [Output::Store(StoreEffect::Requeue { entry, attempt: 2, reason: RequeueReason::NotAccepted, .. })] => {
            assert_eq!(entry, &EntryId::from_seq(3))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn retryable_nack_backs_off_exponentially_then_dead_letters() {
    let mut m = SessionDelivery::new(small(), 9);
    let mut now = 0;
    let mut waits = Vec::new();
    let mut current = msg(1, 1);
    loop {
        m.handle_queued(at(now), current.clone());
        let id = delivered_id(&drain(&mut m));
        m.handle_nack(at(now), &id, "handler_error:Boom", true);
        match drain(&mut m).pop() {
            Some(Output::Store(StoreEffect::Requeue { attempt, not_before, envelope, entry, .. })) => {
                let wait = not_before.saturating_duration_since(at(now).mono);
                waits.push(wait);
                now += u64::try_from(wait.as_millis()).unwrap();
                current = QueuedMessage { entry, envelope, attempt };
            }
            Some(Output::Store(StoreEffect::DeadLetter { attempts, reason, .. })) => {
                assert_eq!(attempts, 3);
                assert_eq!(reason, "handler_error:Boom; retry_limit_exceeded");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(waits.len(), 2);
    // attempt 1 failed: wait in [50, 100] ms; attempt 2 failed: in [100, 200] ms.
    assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(100) && waits[1] <= Duration::from_millis(200), "{waits:?}");
}

#[test]
fn non_retryable_nack_dead_letters_at_once() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 1));
    let id = delivered_id(&drain(&mut m));
    m.handle_nack(at(0), &id, "invalid_payload", false);
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Output::Store(StoreEffect::DeadLetter { attempts: 1, reason, .. })] if reason == "invalid_payload"
    ));
}

#[test]
fn overdue_delivery_is_requeued_and_its_late_ack_is_stale() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 1));
    let id = delivered_id(&drain(&mut m));
    assert_eq!(m.poll_timeout(), Some((at(10_000).mono, TimerKind::AckDeadline)));
    m.handle_timeout(at(9_999));
    assert!(drain(&mut m).is_empty(), "a spurious wake-up does nothing");
    m.handle_timeout(at(10_000));
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Output::Store(StoreEffect::Requeue { attempt: 2, reason: RequeueReason::AckTimeout, .. })]
    ));
    m.handle_ack(at(10_001), &id);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.stats().stale_acks, 1);
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn invalid_attempt_is_dead_lettered() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 0));
    m.handle_queued(at(0), msg(2, 4));
    let reasons: Vec<_> = drain(&mut m)
        .into_iter()
        .map(|o| match o {
            Output::Store(StoreEffect::DeadLetter { reason, .. }) => reason,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(reasons, ["invalid_delivery_attempt", "invalid_delivery_attempt"]);
}

#[test]
fn drain_waits_for_acks_then_hands_back_the_rest() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 1));
    m.handle_queued(at(0), msg(2, 1));
    let out = drain(&mut m);
    let Output::Deliver(first) = &out[0] else { panic!() };
    m.handle_drain(at(1), at(500).mono);
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.capacity(), 0);
    m.handle_queued(at(2), msg(3, 1));
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Output::Store(StoreEffect::Requeue { reason: RequeueReason::NotAccepted, .. })]
    ));
    m.handle_ack(at(3), &first.delivery_id);
    assert_eq!(drain(&mut m).len(), 1);
    assert_eq!(m.poll_timeout(), Some((at(500).mono, TimerKind::DrainDeadline)));
    m.handle_timeout(at(500));
    let out = drain(&mut m);
    assert!(matches!(
        out.as_slice(),
        [Output::Store(StoreEffect::Requeue { attempt: 1, reason: RequeueReason::DrainDeadline, .. }), Output::Drained]
    ));
    assert_eq!(m.phase(), Phase::Closed);
}

#[test]
fn drain_with_nothing_in_flight_finishes_at_once() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_drain(at(0), at(100).mono);
    assert_eq!(drain(&mut m), vec![Output::Drained]);
}

#[test]
fn disconnect_hands_everything_back_and_closes() {
    let mut m = SessionDelivery::new(small(), 1);
    m.handle_queued(at(0), msg(1, 2));
    let id = delivered_id(&drain(&mut m));
    m.handle_disconnect(at(5));
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Output::Store(StoreEffect::Requeue { attempt: 2, reason: RequeueReason::Disconnected, .. })]
    ));
    m.handle_ack(at(6), &id);
    assert!(drain(&mut m).is_empty(), "a closed session settles nothing");
}

// ---- property tests -------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// The store offers the next new message.
    Offer,
    /// The store re-offers the oldest requeued message whose backoff has passed.
    Reoffer,
    /// The agent acks the i-th in-flight delivery (modulo), or a stale id.
    Ack(usize),
    Nack(usize, bool),
    StaleAck,
    Advance(u64),
    Drain(u64),
    Disconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Offer),
        2 => Just(Op::Reoffer),
        4 => (0usize..16).prop_map(Op::Ack),
        2 => ((0usize..16), any::<bool>()).prop_map(|(i, r)| Op::Nack(i, r)),
        1 => Just(Op::StaleAck),
        2 => (0u64..20_000).prop_map(Op::Advance),
        1 => (0u64..5_000).prop_map(Op::Drain),
        1 => Just(Op::Disconnect),
    ]
}

/// Where a message is, as seen by a store that faithfully applies the machine's effects.
#[derive(Debug, PartialEq)]
enum Place {
    InFlight(DeliveryId),
    Queued { attempt: u32, not_before: Instant },
    Acked,
    DeadLettered,
}

/// Drives one machine with `ops`, checking invariants after every step; returns the full
/// output log for determinism checks.
fn run(seed: u64, ops: &[Op]) -> Vec<String> {
    run_with(DeliveryConfig { max_in_flight: 4, ..small() }, seed, ops)
}

/// [`run`] under any configuration.
fn run_with(config: DeliveryConfig, seed: u64, ops: &[Op]) -> Vec<String> {
    let max_in_flight = config.max_in_flight;
    let mut m = SessionDelivery::new(config, seed);
    let mut now = 0u64;
    let mut next_seq = 0u64;
    let mut places: BTreeMap<u64, Place> = BTreeMap::new();
    let mut envelopes: BTreeMap<u64, Arc<str>> = BTreeMap::new();
    let mut log = Vec::new();
    for op in ops {
        match op {
            Op::Offer => {
                let q = msg(next_seq, 1);
                envelopes.insert(next_seq, q.envelope.clone());
                places.insert(next_seq, Place::Queued { attempt: 1, not_before: Instant::ZERO });
                next_seq += 1;
                m.handle_queued(at(now), q);
            }
            Op::Reoffer => {
                let ready = places.iter().find_map(|(seq, p)| match p {
                    Place::Queued { attempt, not_before } if *not_before <= at(now).mono && *seq < next_seq => {
                        Some((*seq, *attempt))
                    }
                    _ => None,
                });
                if let Some((seq, attempt)) = ready {
                    let q = QueuedMessage { entry: EntryId::from_seq(seq), envelope: envelopes[&seq].clone(), attempt };
                    m.handle_queued(at(now), q);
                }
            }
            Op::Ack(i) | Op::Nack(i, _) => {
                let flying: Vec<_> = places
                    .values()
                    .filter_map(|p| if let Place::InFlight(id) = p { Some(id.clone()) } else { None })
                    .collect();
                if let Some(id) = flying.get(i % flying.len().max(1)) {
                    match op {
                        Op::Ack(_) => m.handle_ack(at(now), id),
                        Op::Nack(_, retryable) => m.handle_nack(at(now), id, "err", *retryable),
                        _ => unreachable!(),
                    }
                }
            }
            Op::StaleAck => m.handle_ack(at(now), &DeliveryId::from_wire("stale")),
            Op::Advance(ms) => {
                now += ms;
                m.handle_timeout(at(now));
            }
            Op::Drain(ms) => m.handle_drain(at(now), at(now + ms).mono),
            Op::Disconnect => m.handle_disconnect(at(now)),
        }
        while let Some(out) = m.poll_output() {
            log.push(format!("{now} {out:?}"));
            apply(&mut places, out);
        }
        // Invariants after every step.
        let flying = places.values().filter(|p| matches!(p, Place::InFlight(_))).count();
        assert_eq!(flying, m.in_flight(), "model and machine disagree on what is in flight");
        assert!(m.in_flight() <= max_in_flight, "window bound");
        assert_eq!(places.len() as u64, next_seq, "a message vanished");
    }
    log
}

fn seq_of(entry: &EntryId) -> u64 {
    entry.0.parse().expect("test entries are numbers")
}

fn apply(places: &mut BTreeMap<u64, Place>, out: Output) {
    match out {
        Output::Deliver(d) => {
            let seq = seq_of(&d.entry);
            let place = places.get_mut(&seq).expect("delivered a message nobody offered");
            assert!(
                matches!(place, Place::Queued { .. }),
                "message {seq} delivered again while {place:?} (after ack or while in flight)"
            );
            *place = Place::InFlight(d.delivery_id);
        }
        Output::Store(effect) => {
            let seq = seq_of(effect.entry());
            let place = places.get_mut(&seq).expect("effect for unknown message");
            assert!(
                matches!(place, Place::InFlight(_) | Place::Queued { .. }),
                "message {seq} settled twice (was {place:?})"
            );
            *place = match effect {
                StoreEffect::Ack { .. } => Place::Acked,
                StoreEffect::Requeue { attempt, not_before, .. } => Place::Queued { attempt, not_before },
                StoreEffect::DeadLetter { .. } => Place::DeadLettered,
            };
        }
        Output::Drained => {
            assert!(!places.values().any(|p| matches!(p, Place::InFlight(_))), "drained with work in flight");
        }
    }
}

/// Durations from zero to `Duration::MAX`, with the edges weighted in.
fn extreme_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        Just(Duration::from_nanos(u64::MAX)),
        Just(Duration::from_millis(37_000_000_000_000)),
        any::<u64>().prop_map(Duration::from_millis),
        (0u64..10_000).prop_map(Duration::from_millis),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Never lost, never delivered after its ack, the window holds (checked inside `run`).
    #[test]
    fn nothing_lost_nothing_redelivered_after_ack(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..200)) {
        run(seed, &ops);
    }

    /// Settings at the edges of their types (zero, one, `u32::MAX` attempts, durations up to
    /// `Duration::MAX`) never panic or overflow and keep every invariant. A backoff of
    /// ~3.7e13 ms once made a retryable nack divide by zero.
    #[test]
    fn extreme_settings_keep_the_invariants(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..100),
        max_in_flight in prop_oneof![Just(1usize), 1usize..64],
        attempts in prop_oneof![Just(1u32), Just(u32::MAX), 1u32..10],
        ack_timeout in extreme_duration(),
        initial in extreme_duration(),
        max in extreme_duration(),
    ) {
        let config = DeliveryConfig {
            max_in_flight,
            ack_timeout,
            max_delivery_attempts: attempts,
            retry_backoff_initial: initial.min(max),
            retry_backoff_max: max,
        };
        run_with(config, seed, &ops);
    }

    /// The same inputs give the same outputs, byte for byte.
    #[test]
    fn deterministic(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..100)) {
        prop_assert_eq!(run(seed, &ops), run(seed, &ops));
    }
}
