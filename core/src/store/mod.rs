//! Domain-level store operations and the in-memory reference store.
//!
//! The broker never speaks storage verbs; it asks for domain steps ("append to the target's
//! queue", "ack this entry if this owner still holds it"). [`MemoryStore`] defines their
//! semantics; other backends must behave identically (the contract tests compare them).

mod memory;

pub use memory::{DeadLetter, MemoryStore, MemoryStoreConfig};

use std::fmt;
use std::sync::Arc;

/// Identifies who holds claimed entries: one per session, never reused, so a session that
/// lost ownership can never settle a successor's work (fencing).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerToken(pub Arc<str>);

impl OwnerToken {
    /// Wraps a token.
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        OwnerToken(token.into())
    }
}

impl fmt::Display for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a store step was refused. Nothing changes when a step fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The target's queue is at its configured bound; the message was not accepted.
    #[error("queue_full")]
    QueueFull,
    /// The entry is not held by this owner (settled already, or reclaimed by another session).
    #[error("not_owner")]
    NotOwner,
    /// The backend could not be reached or failed; the step may not have happened.
    #[error("storage_unavailable: {0}")]
    Unavailable(String),
}
