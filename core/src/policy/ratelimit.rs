//! Rate limiting per sender with GCRA (the generic cell rate algorithm), one "theoretical
//! arrival time" per window: O(1) memory per sender whatever the limit, where the reference
//! keeps one sorted-set member per admitted message.
//!
//! With limit `L` per period `T` the emission interval is `I = T / L`; a message at `now` is
//! admitted if `max(tat, now) + I − now ≤ T`, and then `tat` becomes `max(tat, now) + I`. So
//! a quiet sender may burst `L` messages at once, and after that gets one every `I`: between
//! any two admissions `Δ` apart there are at most `L + Δ/I`. (An exact "at most `L` in every
//! sliding window" needs a log of timestamps — the reference's O(L) memory.) Both windows
//! (minute, hour) must admit; a denial consumes nothing. A limit of 0 always denies.

use std::time::Duration;

use crate::time::Instant;

/// Limits of one sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Messages per minute (0 = always deny).
    pub per_minute: u64,
    /// Messages per hour (0 = always deny).
    pub per_hour: u64,
}

impl Default for Limits {
    /// The reference defaults: 100 per minute, 1 000 per hour.
    fn default() -> Self {
        Limits { per_minute: 100, per_hour: 1_000 }
    }
}

/// Which window refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The per-minute limit.
    Minute,
    /// The per-hour limit.
    Hour,
}

impl Window {
    fn period(self) -> Duration {
        match self {
            Window::Minute => Duration::from_secs(60),
            Window::Hour => Duration::from_secs(3600),
        }
    }
}

/// One sender's limiter state: the theoretical arrival time of each window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateState {
    /// Minute window.
    pub minute_tat: Instant,
    /// Hour window.
    pub hour_tat: Instant,
}

/// How far each window's theoretical arrival time is ahead of now: the part of the window
/// a sender has used. Read by operators; admission never needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Minute window.
    pub minute: Duration,
    /// Hour window.
    pub hour: Duration,
}

impl Backlog {
    /// The backlog of `state` at `now`.
    pub fn of(state: RateState, now: Instant) -> Backlog {
        Backlog {
            minute: state.minute_tat.saturating_duration_since(now),
            hour: state.hour_tat.saturating_duration_since(now),
        }
    }

    /// Messages counted in each window under `limits`: (minute, hour). A limit of 0 counts
    /// nothing (it refuses everything anyway).
    pub fn usage(self, limits: Limits) -> (u64, u64) {
        let used = |ahead: Duration, limit: u64, window: Window| {
            if limit == 0 {
                return 0;
            }
            let interval = window.period().as_nanos() / u128::from(limit);
            u64::try_from(ahead.as_nanos().div_ceil(interval.max(1))).unwrap_or(u64::MAX)
        };
        (used(self.minute, limits.per_minute, Window::Minute), used(self.hour, limits.per_hour, Window::Hour))
    }
}

/// A refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The window that refused (the minute window is checked first).
    pub window: Window,
    /// When a message would be admitted again; `None` for a limit of 0.
    pub retry_after: Option<Duration>,
}

/// Admits one message of a sender in `state` at `now`: the new state, or why not (the state is
/// then unchanged).
pub fn admit(limits: Limits, state: RateState, now: Instant) -> Result<RateState, Limited> {
    let minute_tat = step(limits.per_minute, state.minute_tat, now, Window::Minute)?;
    let hour_tat = step(limits.per_hour, state.hour_tat, now, Window::Hour)?;
    Ok(RateState { minute_tat, hour_tat })
}

/// What a sender's limiter granted to `count` messages arriving together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// How many of them, from the first, are admitted.
    pub admitted: usize,
    /// Why the next one was refused; `None` when all were admitted.
    pub refused: Option<Limited>,
}

impl Grant {
    /// Shares a grant made for several batches at once (for the sum of their `demands`, in
    /// this order) among them: exactly what each would have been granted asking one after the
    /// other at the same instant. The admitted messages are a prefix, so the batches before
    /// the first refusal get all they asked for, the one it falls in gets the rest, and those
    /// after it none, refused for the same reason. A shell that gathers concurrent callers'
    /// demands into one store step hands each its share.
    pub fn share(self, demands: &[usize]) -> Vec<Grant> {
        let mut left = self.admitted;
        demands
            .iter()
            .map(|&demand| {
                let admitted = demand.min(left);
                left -= admitted;
                Grant { admitted, refused: if admitted < demand { self.refused } else { None } }
            })
            .collect()
    }
}

/// Admits up to `count` messages of a sender arriving together at `now`, in order: exactly
/// what `count` calls of [`admit`] at `now` would decide. Since a refusal consumes nothing and
/// time does not move within the batch, every message after the first refused one is refused
/// too, so the admitted ones are a prefix. Returns the new state and the grant.
pub fn admit_many(limits: Limits, mut state: RateState, now: Instant, count: usize) -> (RateState, Grant) {
    for admitted in 0..count {
        match admit(limits, state, now) {
            Ok(next) => state = next,
            Err(limited) => return (state, Grant { admitted, refused: Some(limited) }),
        }
    }
    (state, Grant { admitted: count, refused: None })
}

fn step(limit: u64, tat: Instant, now: Instant, window: Window) -> Result<Instant, Limited> {
    if limit == 0 {
        return Err(Limited { window, retry_after: None });
    }
    let period = window.period();
    let interval = Duration::from_nanos(u64::try_from(period.as_nanos() / u128::from(limit)).unwrap_or(u64::MAX));
    let new_tat = tat.max(now) + interval;
    let ahead = new_tat.saturating_duration_since(now);
    if ahead > period {
        return Err(Limited { window, retry_after: Some(ahead - period) });
    }
    Ok(new_tat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at_ms(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn usage_counts_the_messages_a_window_still_holds() {
        let limits = Limits { per_minute: 60, per_hour: 3600 };
        let t0 = at_ms(1_000_000);
        let mut s = RateState::default();
        for _ in 0..10 {
            s = admit(limits, s, t0).unwrap();
        }
        assert_eq!(Backlog::of(s, t0).usage(limits), (10, 10));
        assert_eq!(Backlog::of(s, t0 + Duration::from_millis(4_500)).usage(limits), (6, 6), "one per second drains");
        assert_eq!(Backlog::of(s, t0 + Duration::from_secs(60)).usage(limits), (0, 0));
        assert_eq!(Backlog::of(s, t0).usage(Limits { per_minute: 0, per_hour: 0 }), (0, 0));
    }

    #[test]
    fn one_per_minute_pins_the_boundary() {
        let limits = Limits { per_minute: 1, per_hour: 1000 };
        let t0 = at_ms(1_000_000);
        let s = admit(limits, RateState::default(), t0).unwrap();
        let denied = admit(limits, s, t0 + Duration::from_millis(59_999)).unwrap_err();
        assert_eq!(denied, Limited { window: Window::Minute, retry_after: Some(Duration::from_millis(1)) });
        assert!(admit(limits, s, t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn burst_up_to_the_limit_then_refused() {
        let limits = Limits { per_minute: 100, per_hour: 1000 };
        let now = at_ms(5_000_000);
        let mut s = RateState::default();
        for i in 0..100 {
            s = admit(limits, s, now).unwrap_or_else(|e| panic!("message {i} refused: {e:?}"));
        }
        assert_eq!(admit(limits, s, now).unwrap_err().window, Window::Minute);
    }

    #[test]
    fn hour_limit_refuses_without_consuming_minute_quota() {
        let limits = Limits { per_minute: 10, per_hour: 2 };
        let now = at_ms(10_000_000);
        let s = admit(limits, RateState::default(), now).unwrap();
        let s = admit(limits, s, now).unwrap();
        let refused = admit(limits, s, now).unwrap_err();
        assert_eq!(refused.window, Window::Hour);
    }

    #[test]
    fn zero_always_denies() {
        let limits = Limits { per_minute: 0, per_hour: 1000 };
        assert_eq!(
            admit(limits, RateState::default(), at_ms(1)).unwrap_err(),
            Limited { window: Window::Minute, retry_after: None }
        );
    }

    proptest! {
        /// A batch decides what the messages one by one at the same instant would.
        #[test]
        fn a_batch_grants_what_single_admissions_would(
            per_minute in 0u64..12, per_hour in 0u64..20, count in 0usize..30, earlier in 0usize..15, gap_ms in 0u64..5_000,
        ) {
            let limits = Limits { per_minute, per_hour };
            let t0 = at_ms(50_000_000);
            let (start, _) = admit_many(limits, RateState::default(), t0, earlier);
            let now = t0 + Duration::from_millis(gap_ms);
            let (batched, grant) = admit_many(limits, start, now, count);
            let (mut single, mut admitted, mut refused) = (start, 0, None);
            for _ in 0..count {
                match admit(limits, single, now) {
                    Ok(next) if refused.is_none() => { single = next; admitted += 1; }
                    Ok(_) => prop_assert!(false, "admitted after a refusal at the same instant"),
                    Err(limited) => { refused.get_or_insert(limited); }
                }
            }
            prop_assert_eq!(batched, single);
            prop_assert_eq!(grant, Grant { admitted, refused });
        }

        /// One grant for several batches' demands together, shared out, gives each batch what
        /// it would have got asking on its own, one after the other, at the same instant.
        #[test]
        fn a_shared_grant_is_what_each_batch_would_get_alone(
            per_minute in 0u64..12, per_hour in 0u64..20, earlier in 0usize..15,
            demands in prop::collection::vec(0usize..8, 0..8),
        ) {
            let limits = Limits { per_minute, per_hour };
            let now = at_ms(50_000_000);
            let (start, _) = admit_many(limits, RateState::default(), now, earlier);
            let (together, grant) = admit_many(limits, start, now, demands.iter().sum());
            let mut alone = start;
            let each: Vec<Grant> = demands
                .iter()
                .map(|&demand| {
                    let (next, grant) = admit_many(limits, alone, now, demand);
                    alone = next;
                    grant
                })
                .collect();
            prop_assert_eq!(together, alone);
            prop_assert_eq!(grant.share(&demands), each);
        }

        /// GCRA's guarantee: between any two admissions `t_i ≤ t_k`, at most
        /// `L + (t_k − t_i) / I` messages were admitted (a burst of `L`, then the rate).
        #[test]
        fn admissions_never_exceed_burst_plus_rate(limit in 1u64..20, gaps in prop::collection::vec(0u64..10_000, 1..200)) {
            let limits = Limits { per_minute: limit, per_hour: 1_000_000 };
            let interval_ns = 60_000_000_000u128 / u128::from(limit);
            let mut s = RateState::default();
            let mut now = at_ms(100_000_000);
            let mut admitted = Vec::new();
            for gap in gaps {
                now = now + Duration::from_millis(gap);
                if let Ok(next) = admit(limits, s, now) {
                    s = next;
                    admitted.push(now);
                }
            }
            for i in 0..admitted.len() {
                for k in i..admitted.len() {
                    let span = u128::from(admitted[k].as_nanos() - admitted[i].as_nanos());
                    let allowed = u128::from(limit) + span / interval_ns;
                    prop_assert!((k - i + 1) as u128 <= allowed, "{} admitted in {} ns", k - i + 1, span);
                }
            }
        }
    }
}
