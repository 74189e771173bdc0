//! Criterion benches of mas hot paths; see `benches/`. Fixtures shared by the benches live here,
//! and the bare-Redis baseline of `mas-load`.

#[cfg(not(madsim))]
pub mod redis_baseline;

use std::sync::Arc;

use mas_core::delivery::{EntryId, QueuedMessage};
use mas_core::envelope::{Envelope, parse_payload};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::time::UnixMillis;

/// A JSON object payload of roughly `bytes` bytes.
pub fn payload_json(bytes: usize) -> String {
    let filler = "x".repeat(bytes.saturating_sub(40));
    format!(r#"{{"order_id":12345,"note":"{filler}","ok":true}}"#)
}

/// A send envelope carrying a payload of roughly `bytes` bytes.
pub fn envelope(bytes: usize) -> Envelope {
    let data = parse_payload(&payload_json(bytes)).expect("fixture payload is an object");
    Envelope::new_send(
        &AgentId::new("alice").expect("id"),
        &InstanceId::new("a1").expect("id"),
        &AgentId::new("bob").expect("id"),
        "order".to_string(),
        data,
        "6f1c0e8e-1d4b-4c3a-9a57-6a0f6f1b2c3d".to_string(),
        UnixMillis(1_700_000_000_000),
    )
}

/// A queued message with entry id `seq`.
pub fn queued(seq: u64, envelope: &Arc<str>) -> QueuedMessage {
    QueuedMessage { entry: EntryId::from_seq(seq), envelope: envelope.clone(), attempt: 1 }
}
