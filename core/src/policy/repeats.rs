//! Aggregating repeated events, so that a peer repeating a refused call cannot fill the
//! security chain or the log: per key (a denial's reason and claimed identity), the first
//! event of each window is recorded and carries how many identical events were suppressed
//! since the previous recorded one.
//!
//! The table of keys is bounded: when it is full, keys whose window has passed are forgotten,
//! and if none has, further new keys share one overflow key.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::time::Instant;

/// The key all new keys share while the table is full of live ones.
pub const OVERFLOW_KEY: &str = "*";

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Record it, noting that `suppressed` identical events were dropped since the last one.
    Record {
        /// Events of this key dropped since the last recorded one.
        suppressed: u64,
    },
    /// Drop it (counted towards the next recorded one).
    Suppress,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    recorded_at: Instant,
    suppressed: u64,
}

/// Per-key windows of repeated events.
#[derive(Debug, Clone)]
pub struct Repeats {
    window: Duration,
    max_keys: usize,
    keys: BTreeMap<String, Seen>,
}

impl Repeats {
    /// At most one recorded event per key per `window`, over at most `max_keys` keys.
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Repeats { window, max_keys: max_keys.max(1), keys: BTreeMap::new() }
    }

    /// Decides about one event of `key` at `now`.
    pub fn note(&mut self, key: &str, now: Instant) -> Verdict {
        let key = if self.keys.contains_key(key) || self.has_room(now) { key } else { OVERFLOW_KEY };
        match self.keys.get_mut(key) {
            Some(seen) if now.saturating_duration_since(seen.recorded_at) < self.window => {
                seen.suppressed += 1;
                Verdict::Suppress
            }
            Some(seen) => {
                let suppressed = std::mem::take(&mut seen.suppressed);
                seen.recorded_at = now;
                Verdict::Record { suppressed }
            }
            None => {
                self.keys.insert(key.to_string(), Seen { recorded_at: now, suppressed: 0 });
                Verdict::Record { suppressed: 0 }
            }
        }
    }

    /// Keys tracked now (bounded by `max_keys` plus the overflow key).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Room for one more key, forgetting keys whose window has passed with nothing
    /// suppressed (nothing of theirs is lost) when the table is full.
    fn has_room(&mut self, now: Instant) -> bool {
        if self.keys.len() < self.max_keys {
            return true;
        }
        let window = self.window;
        self.keys.retain(|key, seen| {
            key == OVERFLOW_KEY || seen.suppressed > 0 || now.saturating_duration_since(seen.recorded_at) < window
        });
        self.keys.len() < self.max_keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn one_record_per_window_carrying_the_suppressed_count() {
        let mut r = Repeats::new(Duration::from_secs(10), 8);
        assert_eq!(r.note("a", at(0)), Verdict::Record { suppressed: 0 });
        for t in 1..=5 {
            assert_eq!(r.note("a", at(t * 1000)), Verdict::Suppress);
        }
        assert_eq!(r.note("b", at(6_000)), Verdict::Record { suppressed: 0 }, "keys are independent");
        assert_eq!(r.note("a", at(10_000)), Verdict::Record { suppressed: 5 });
        assert_eq!(r.note("a", at(30_000)), Verdict::Record { suppressed: 0 });
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_distinct_keys() {
        let mut r = Repeats::new(Duration::from_secs(10), 4);
        let recorded = (0..10_000).filter(|i| r.note(&format!("k{i}"), at(0)) != Verdict::Suppress).count();
        assert!(r.len() <= 5, "{} keys", r.len());
        assert_eq!(recorded, 5, "four keys and the overflow key record once each");
        // Once the window passes, quiet keys are forgotten and new keys get their own entry.
        assert_eq!(r.note("fresh", at(20_000)), Verdict::Record { suppressed: 0 });
        assert!(r.len() <= 5);
    }
}
