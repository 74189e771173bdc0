//! Core time types. There is deliberately no `now()` anywhere in this crate: the shell reads
//! its clock once per step and hands the value in, so the simulator and the tests control time.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on a monotonic clock, in nanoseconds since an epoch the shell chose.
///
/// Only differences between two `Instant`s from the same shell mean anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The shell's epoch.
    pub const ZERO: Instant = Instant(0);

    /// An instant `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    /// Saturates at the end of time rather than wrapping: a huge configured timeout means "never".
    fn add(self, rhs: Duration) -> Instant {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;

    fn sub(self, rhs: Duration) -> Instant {
        let nanos = u64::try_from(rhs.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_sub(nanos))
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}s", self.0 / 1_000_000_000, self.0 % 1_000_000_000)
    }
}

/// Wall-clock time as milliseconds since the Unix epoch. Carried as data (envelope
/// timestamps); never used for deadlines, which use [`Instant`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Seconds since the Unix epoch as a float, the envelope's `timestamp` format.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }
}

/// The time of one step, read once by the shell: monotonic for deadlines, wall for data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time; all deadlines are computed from this.
    pub mono: Instant,
    /// Wall-clock time; only stamped into data, never compared for deadlines.
    pub wall: UnixMillis,
}

impl Now {
    /// A `Now` whose wall clock is derived from the monotonic one; for tests and simulation.
    pub fn from_mono(mono: Instant) -> Self {
        Now { mono, wall: UnixMillis(mono.as_nanos() / 1_000_000) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_saturates_instead_of_wrapping() {
        let late = Instant::from_nanos(u64::MAX - 5);
        assert_eq!(late + Duration::from_secs(1), Instant::from_nanos(u64::MAX));
        assert_eq!(Instant::ZERO - Duration::from_secs(1), Instant::ZERO);
    }

    #[test]
    fn display_is_seconds_with_nanos() {
        assert_eq!(Instant::from_nanos(1_500_000_000).to_string(), "1.500000000s");
    }
}
