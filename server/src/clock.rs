//! The shell's clock: the only place the broker reads time. It converts tokio's monotonic
//! clock (virtual under madsim) into core [`Instant`]s against an epoch taken once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mas_core::time::{Instant, Now, UnixMillis};

/// Converts between tokio time and core time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: tokio::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock whose core epoch is now.
    pub fn new() -> Self {
        Clock { epoch: tokio::time::Instant::now() }
    }

    /// The current time, read once.
    pub fn now(&self) -> Now {
        let mono = Instant::from_nanos(u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX));
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Now { mono, wall: UnixMillis(u64::try_from(wall.as_millis()).unwrap_or(u64::MAX)) }
    }

    /// The tokio instant of a core instant, for sleeping until a deadline.
    pub fn to_tokio(&self, at: Instant) -> tokio::time::Instant {
        self.epoch + Duration::from_nanos(at.as_nanos())
    }
}
