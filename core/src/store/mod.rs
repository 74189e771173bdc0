//! Domain-level store operations and the in-memory reference store.
//!
//! The broker never speaks storage verbs; it asks for domain steps ("append to the target's
//! queue", "ack this entry if this owner still holds it", "compare-and-set state at revision
//! r"). [`MemoryStore`] defines their semantics; the Redis backend must behave identically
//! (the contract tests run the same sequences against both).
//!
//! Time inside a store is the store's own clock (Redis `TIME`, or the clock the memory store's
//! owner passes in), never a broker's: leases and request deadlines must mean the same thing
//! to every broker sharing the store.

mod memory;
mod types;

pub use memory::{MemoryStore, MemoryStoreConfig};
pub use types::*;
