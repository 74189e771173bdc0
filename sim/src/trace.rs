//! The run's event trace: what the checkers judge and what determinism is compared on.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// An append-only log of `virtual-time node event` lines, shared by every simulated node
/// (nodes are tasks in one process, so sharing memory is observation, not communication).
#[derive(Debug, Clone)]
pub struct Trace {
    epoch: tokio::time::Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}

impl Trace {
    /// A trace whose time zero is now (virtual).
    pub fn new() -> Self {
        Trace { epoch: tokio::time::Instant::now(), lines: Arc::default() }
    }

    fn lines(&self) -> MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `event` at `node`, stamped with virtual milliseconds since the trace began.
    pub fn record(&self, node: &str, event: impl std::fmt::Display) {
        let at = self.epoch.elapsed();
        let line = format!("{:>9.3}ms {node:<8} {event}", at.as_secs_f64() * 1000.0);
        self.lines().push(line);
    }

    /// Virtual milliseconds since the trace began.
    pub fn now_ms(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * 1000.0
    }

    /// A copy of every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.lines().clone()
    }

    /// Lines recorded so far.
    pub fn len(&self) -> usize {
        self.lines().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lines().is_empty()
    }
}
