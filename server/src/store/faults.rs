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
}

/// Decides the fault of each store step (`op` is the step's name, e.g. `claim`).
pub trait StoreFaults: Send + Sync + Debug {
    /// The fault of the step about to run.
    fn before(&self, op: &'static str) -> Fault;
}

/// Applies `fault`: waits, fails, or lets the step run.
pub(super) async fn apply(fault: Fault, op: &'static str) -> Result<(), StoreError> {
    match fault {
        Fault::None => Ok(()),
        Fault::Fail => Err(StoreError::Unavailable(format!("injected fault before {op}"))),
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            Ok(())
        }
    }
}
