//! Fault injection for the embedded store: a hook asked before every store step, so that the
//! simulation (and tests) can make the store fail, stall or slow down as Redis would during
//! an outage, reproducibly from a seed. Production never installs one.

use std::fmt::Debug;
use std::time::Duration;

use mas_core::store::StoreError;

/// What happens to one store step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The step runs normally.
    None,
    /// The step fails with `StoreError::Unavailable` and changes nothing.
    Fail,
    /// The step runs after this delay.
    Delay(Duration),
    /// The step runs, but its answer is lost: the caller gets `StoreError::Unavailable` for a
    /// step that did commit (a Redis reply lost to a timeout or a dropped connection).
    LoseAnswer,
}

/// Whether a step that ran keeps its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The caller gets what the step returned.
    Keep,
    /// The caller gets an error although the step ran.
    Lose,
}

/// Decides the fault of each store step (`op` is the step's name, e.g. `claim`).
pub trait StoreFaults: Send + Sync + Debug {
    /// The fault of the step about to run.
    fn before(&self, op: &'static str) -> Fault;
}

/// Applies `fault` before the step: waits, fails, or lets it run (and says whether its
/// answer will be kept).
pub(super) async fn apply(fault: Fault, op: &'static str) -> Result<Answer, StoreError> {
    match fault {
        Fault::None => Ok(Answer::Keep),
        Fault::Fail => Err(StoreError::Unavailable(format!("injected fault before {op}"))),
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            Ok(Answer::Keep)
        }
        Fault::LoseAnswer => Ok(Answer::Lose),
    }
}

/// The error a caller gets for a step whose answer was lost.
pub(super) fn lost_answer(op: &'static str) -> StoreError {
    StoreError::Unavailable(format!("injected fault: the answer of {op} was lost"))
}
