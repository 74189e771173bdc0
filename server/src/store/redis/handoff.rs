//! Hand-offs: the store step that queues work for an agent also claims it for a session of
//! this broker that is waiting for exactly that, so the session does not spend a round trip
//! of its own after the wake-up. On a request/reply at one in flight that is two of the
//! round trips in a row (the request's delivery, the reply's).
//!
//! Each session has one seat. A claim sits in it while it runs; while the claim waits (its
//! own store step is not out) the seat is offered: an admission to the agent, or a reply
//! commit to the session's instance, may take it, name the session's keys in its script, and
//! claim for it — the same claim, fenced by the same lease, up to the same room. Its answer
//! is left in the seat, and the claim (this one, or the session's next, if this one ended
//! meanwhile) takes it instead of asking the store. A claim never asks the store while a
//! hand-off for it is out, so the two never claim past the session's window together. Of an
//! agent's waiting sessions, the one with the most room gets the work (equals take turns), so
//! its instances share it as they did when every waiting claim raced for it.
//!
//! Nothing is lost when a session ends with a hand-off out or unread: what a hand-off claimed
//! is in the session's pending entries, which its end hands back (`release`); one that lands
//! after that is held by an owner whose lease is gone, and the next sweep hands it back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mas_core::delivery::QueuedMessage;
use mas_core::ids::{AgentId, InstanceId};
use mas_core::store::{SessionRef, StoreError};
use tokio::sync::Notify;

/// What a claim answers: the messages, and when the earliest delayed entry is due.
pub(super) type ClaimAnswer = Result<(Vec<QueuedMessage>, Option<Duration>), StoreError>;

/// The seats of this broker's sessions, by agent.
#[derive(Debug, Default)]
pub(super) struct Seats {
    inner: Mutex<SeatsInner>,
    /// The most room any claim has offered: a seat offering it cannot be beaten, so looking
    /// for the roomiest seat stops there instead of visiting every session of the agent.
    most_room: AtomicUsize,
}

#[derive(Debug, Default)]
struct SeatsInner {
    /// Each agent's seats, the one served longest ago first.
    by_agent: HashMap<AgentId, Vec<Arc<Seat>>>,
    /// Every seat by its session's owner token: a claim finds its seat without visiting the
    /// agent's others (an idle claim a second per session, thousands of sessions per agent).
    by_owner: HashMap<String, Arc<Seat>>,
}

/// One session's seat.
#[derive(Debug)]
pub(super) struct Seat {
    session: SessionRef,
    state: Mutex<SeatState>,
    /// Signalled when a hand-off leaves its answer.
    handed: Notify,
}

#[derive(Debug)]
struct SeatState {
    /// The room of the claim sitting in the seat, if one is.
    claim: Option<usize>,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Nothing is out: offered while a claim sits here.
    Idle,
    /// The sitting claim's own store step is out.
    Claiming,
    /// A hand-off is out.
    Handing,
    /// A hand-off's answer, for the next claim to take.
    Handed(ClaimAnswer),
}

/// What a claim does before it asks the store.
pub(super) enum Before {
    /// Ask the store (the seat is withdrawn meanwhile).
    Ask,
    /// Take what a hand-off claimed instead.
    Handed(ClaimAnswer),
}

impl Seats {
    /// Seats a claim of `session` for up to `room` messages; it leaves the seat when the
    /// returned guard drops.
    pub(super) fn sit(&self, session: &SessionRef, room: usize) -> Sitting {
        let seat = self.seat_of(session);
        self.most_room.fetch_max(room, Ordering::Relaxed);
        seat.lock().claim = Some(room);
        Sitting { seat }
    }

    /// The offered seat of a session of `agent` waiting for its work queue, taken for a
    /// hand-off.
    pub(super) fn take_for_work(&self, agent: &AgentId) -> Option<HandOff> {
        self.take(agent, |_| true)
    }

    /// The offered seat of `agent`'s session on `instance`, which waits for its replies.
    pub(super) fn take_for_replies(&self, agent: &AgentId, instance: &InstanceId) -> Option<HandOff> {
        self.take(agent, |seat| seat.session.instance == *instance)
    }

    /// Forgets a session's seat: its lease ended.
    pub(super) fn leave(&self, session: &SessionRef) {
        let mut inner = self.lock();
        if inner.by_owner.remove(session.owner.as_str()).is_none() {
            return;
        }
        if let Some(seats) = inner.by_agent.get_mut(&session.agent) {
            seats.retain(|seat| seat.session.owner != session.owner);
            if seats.is_empty() {
                inner.by_agent.remove(&session.agent);
            }
        }
    }

    fn seat_of(&self, session: &SessionRef) -> Arc<Seat> {
        let mut inner = self.lock();
        if let Some(seat) = inner.by_owner.get(session.owner.as_str()) {
            return seat.clone();
        }
        let seat = Arc::new(Seat {
            session: session.clone(),
            state: Mutex::new(SeatState { claim: None, phase: Phase::Idle }),
            handed: Notify::new(),
        });
        inner.by_owner.insert(session.owner.to_string(), seat.clone());
        inner.by_agent.entry(session.agent.clone()).or_default().push(seat.clone());
        seat
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeatsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the offered seat among those that `fit` whose claim has the most room: the
    /// session with the fewest deliveries out gets the work, and among equals the one served
    /// longest ago (a taken seat moves to the back). The agent's instances share its work as
    /// they did when every waiting claim raced for it.
    fn take(&self, agent: &AgentId, fits: impl Fn(&Seat) -> bool) -> Option<HandOff> {
        let mut inner = self.lock();
        let seats = inner.by_agent.get_mut(agent)?;
        let mut passed_over = Vec::new();
        loop {
            let candidates =
                seats.iter().enumerate().filter(|(index, seat)| fits(seat) && !passed_over.contains(index));
            let unbeatable = self.most_room.load(Ordering::Relaxed);
            let mut best: Option<(usize, usize)> = None;
            for (index, seat) in candidates {
                if let Some(room) = seat.lock().offered()
                    && best.is_none_or(|(_, most)| room > most)
                {
                    best = Some((index, room));
                    if room >= unbeatable {
                        break;
                    }
                }
            }
            let (index, _) = best?;
            let seat = seats[index].clone();
            // Its claim may have begun its own step since: then look again without it.
            let Some(room) = seat.lock().take_for_hand_off() else {
                passed_over.push(index);
                continue;
            };
            seats.remove(index);
            seats.push(seat.clone());
            return Some(HandOff { seat, room, handed: false });
        }
    }
}

impl SeatState {
    /// The room a waiting claim offers, if one sits here and nothing is out.
    fn offered(&self) -> Option<usize> {
        match (self.claim, &self.phase) {
            (Some(room), Phase::Idle) if room > 0 => Some(room),
            _ => None,
        }
    }

    /// Takes the seat for a hand-off if it is still offered.
    fn take_for_hand_off(&mut self) -> Option<usize> {
        let room = self.offered()?;
        self.phase = Phase::Handing;
        Some(room)
    }
}

impl Seat {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeatState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A claim sitting in its session's seat.
#[derive(Debug)]
pub(super) struct Sitting {
    seat: Arc<Seat>,
}

impl Sitting {
    /// Called before each store step of the claim: waits out a hand-off that is out, then
    /// takes its answer or withdraws the seat for the claim's own step.
    pub(super) async fn before_asking(&self) -> Before {
        loop {
            let handed = self.seat.handed.notified();
            {
                let mut state = self.seat.lock();
                match std::mem::replace(&mut state.phase, Phase::Claiming) {
                    Phase::Idle | Phase::Claiming => return Before::Ask,
                    Phase::Handed(answer) => return Before::Handed(answer),
                    Phase::Handing => state.phase = Phase::Handing,
                }
            }
            handed.await;
        }
    }

    /// The claim's own step found nothing: the seat is offered again while it waits.
    pub(super) fn found_nothing(&self) {
        let mut state = self.seat.lock();
        if matches!(state.phase, Phase::Claiming) {
            state.phase = Phase::Idle;
        }
    }

    /// The session this claim is for.
    pub(super) fn session(&self) -> &SessionRef {
        &self.seat.session
    }

    /// Signalled when a hand-off leaves its answer in the seat: a claim waiting here wakes on
    /// it (see `claim_waiting`'s `own`).
    pub(super) fn handed(&self) -> &Notify {
        &self.seat.handed
    }
}

impl Drop for Sitting {
    fn drop(&mut self) {
        let mut state = self.seat.lock();
        state.claim = None;
        if matches!(state.phase, Phase::Claiming) {
            state.phase = Phase::Idle;
        }
        // A hand-off out or answered stays: the session's next claim takes its answer.
    }
}

/// A seat taken for a hand-off. Dropped without [`HandOff::hand`] (the step did not get to
/// claim), the seat is offered again.
#[derive(Debug)]
pub(super) struct HandOff {
    seat: Arc<Seat>,
    /// The room the sitting claim offered: the most the hand-off may claim.
    room: usize,
    handed: bool,
}

impl HandOff {
    /// The session the hand-off claims for.
    pub(super) fn session(&self) -> &SessionRef {
        &self.seat.session
    }

    /// The most the hand-off may claim.
    pub(super) fn room(&self) -> usize {
        self.room
    }

    /// Leaves what the hand-off claimed (or why it could not) for the session's claim, and
    /// wakes that claim alone.
    pub(super) fn hand(mut self, answer: ClaimAnswer) {
        self.handed = true;
        self.seat.lock().phase = Phase::Handed(answer);
        self.seat.handed.notify_one();
    }
}

impl Drop for HandOff {
    fn drop(&mut self) {
        if self.handed {
            return;
        }
        let mut state = self.seat.lock();
        if matches!(state.phase, Phase::Handing) {
            state.phase = Phase::Idle;
        }
        drop(state);
        self.seat.handed.notify_one();
    }
}

/// [`HandOff::hand`] when a step took a seat; `answer` is only worked out then.
pub(super) fn hand(hand_off: Option<HandOff>, answer: impl FnOnce() -> ClaimAnswer) {
    if let Some(hand_off) = hand_off {
        hand_off.hand(answer());
    }
}

#[cfg(test)]
mod tests {
    use mas_core::store::OwnerToken;

    use super::*;

    fn session(instance: &str, owner: &str) -> SessionRef {
        SessionRef {
            agent: AgentId::new("bob").unwrap(),
            instance: InstanceId::new(instance).unwrap(),
            owner: OwnerToken::new(owner),
        }
    }

    fn bob() -> AgentId {
        AgentId::new("bob").unwrap()
    }

    #[tokio::test]
    async fn a_waiting_claim_is_offered_once_and_takes_what_the_hand_off_claimed() {
        let seats = Seats::default();
        assert!(seats.take_for_work(&bob()).is_none(), "no claim, no seat");
        let sitting = seats.sit(&session("b1", "o1"), 7);
        let hand_off = seats.take_for_work(&bob()).expect("offered");
        assert_eq!(hand_off.room(), 7);
        assert!(seats.take_for_work(&bob()).is_none(), "taken by one hand-off at a time");
        hand_off.hand(Ok((Vec::new(), Some(Duration::from_millis(3)))));
        match sitting.before_asking().await {
            Before::Handed(Ok((messages, next))) => {
                assert!(messages.is_empty());
                assert_eq!(next, Some(Duration::from_millis(3)));
            }
            _ => panic!("the hand-off's answer is taken"),
        }
        assert!(seats.take_for_work(&bob()).is_none(), "not offered while the claim works");
        sitting.found_nothing();
        assert!(seats.take_for_work(&bob()).is_some(), "offered again while it waits");
    }

    #[tokio::test]
    async fn a_claim_waits_out_a_hand_off_and_asks_itself_when_it_gave_up() {
        let seats = Seats::default();
        let sitting = seats.sit(&session("b1", "o1"), 2);
        let hand_off = seats.take_for_work(&bob()).expect("offered");
        let asking = tokio::spawn(async move { matches!(sitting.before_asking().await, Before::Ask) });
        tokio::task::yield_now().await;
        assert!(!asking.is_finished(), "no own step while a hand-off is out");
        drop(hand_off);
        assert!(asking.await.unwrap(), "the step did not claim: the claim asks itself");
    }

    #[tokio::test]
    async fn an_answer_that_lands_after_its_claim_ended_goes_to_the_next_claim() {
        let seats = Seats::default();
        let first = seats.sit(&session("b1", "o1"), 2);
        let hand_off = seats.take_for_work(&bob()).expect("offered");
        drop(first);
        hand_off.hand(Err(StoreError::NotOwner));
        let next = seats.sit(&session("b1", "o1"), 2);
        assert!(matches!(next.before_asking().await, Before::Handed(Err(StoreError::NotOwner))));
    }

    #[test]
    fn the_seat_with_the_most_room_is_taken_and_equals_take_turns() {
        let seats = Seats::default();
        let _b1 = seats.sit(&session("b1", "o1"), 3);
        let _b2 = seats.sit(&session("b2", "o2"), 5);
        let owner = |taken: &Option<HandOff>| taken.as_ref().map(|h| h.session().owner.as_str().to_string());
        let first = seats.take_for_work(&bob());
        assert_eq!(owner(&first), Some("o2".into()), "the least busy session first");
        let second = seats.take_for_work(&bob());
        assert_eq!(owner(&second), Some("o1".into()));
        drop((first, second));

        let seats = Seats::default();
        let _b1 = seats.sit(&session("b1", "o1"), 4);
        let _b2 = seats.sit(&session("b2", "o2"), 4);
        let mut served = Vec::new();
        for _ in 0..4 {
            let taken = seats.take_for_work(&bob());
            served.push(owner(&taken).unwrap_or_default());
            drop(taken); // given back, offered again
        }
        assert_eq!(served, ["o1", "o2", "o1", "o2"], "equals take turns");
    }

    #[test]
    fn replies_go_to_the_seat_of_their_instance_and_an_ended_lease_leaves() {
        let seats = Seats::default();
        let _b1 = seats.sit(&session("b1", "o1"), 1);
        let _b2 = seats.sit(&session("b2", "o2"), 1);
        let b2 = InstanceId::new("b2").unwrap();
        let hand_off = seats.take_for_replies(&bob(), &b2).expect("b2 waits");
        assert_eq!(hand_off.session().owner.as_str(), "o2");
        seats.leave(&session("b1", "o1"));
        assert!(seats.take_for_work(&bob()).is_none(), "b1 left and b2's seat is taken");
    }
}
