//! The tamper-evident audit chain (reference v2 semantics).
//!
//! Each record's hash is SHA-256 over the canonical JSON (keys sorted, no whitespace, nulls
//! included) of the *whole* record, including `previous_hash` — so editing a record, deleting
//! one, or re-linking around a deletion all break the chain. A chain's head (the last hash) is
//! kept apart from the records; verifying against it also detects a truncated tail.
//!
//! There is no single global chain: the broker keeps one chain per shard (e.g. per target
//! agent), so appends never serialise on one head; verification walks each chain.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The hash format version written by this code.
pub const HASH_VERSION: u32 = 2;

/// One admission decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The message.
    pub message_id: String,
    /// Wall-clock seconds since the Unix epoch.
    pub timestamp: f64,
    /// Authenticated sender.
    pub sender_id: String,
    /// Sending instance.
    pub sender_instance_id: Option<String>,
    /// Target agent.
    pub target_id: String,
    /// Message type.
    pub message_type: Option<String>,
    /// Correlation id of requests and replies.
    pub correlation_id: Option<String>,
    /// `ALLOWED`, `ALERT`, `DLP_REDACTED`, `AUTHZ_DENIED`, `RATE_LIMITED`, `CIRCUIT_OPEN`, `DLP_BLOCKED`.
    pub decision: String,
    /// Time spent deciding.
    pub latency_ms: f64,
    /// SHA-256 of the canonical JSON of the (possibly redacted) payload.
    pub payload_hash: String,
    /// Violation types (DLP) or denial reasons.
    pub violations: Vec<String>,
    /// Hash of the previous record of this chain; `None` for the first.
    pub previous_hash: Option<String>,
    /// Always [`HASH_VERSION`].
    pub hash_version: u32,
}

/// Canonical JSON: object keys sorted, compact separators, nulls kept.
pub fn canonical_json(value: &Value) -> String {
    // serde_json's default map is ordered by key and its writer is compact.
    value.to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a payload's canonical JSON (serialised straight from the map: its keys are
/// already ordered, so no copy into a `Value` is needed).
pub fn payload_hash(payload: &serde_json::Map<String, Value>) -> String {
    sha256_hex(serde_json::to_string(payload).unwrap_or_default().as_bytes())
}

impl AuditRecord {
    /// The record's hash: SHA-256 of its canonical JSON, `previous_hash` included.
    pub fn hash(&self) -> String {
        // Field order in canonical JSON is by key; `to_value` sorts them (its map is ordered).
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        sha256_hex(canonical_json(&value).as_bytes())
    }
}

/// The head of one chain; appends link records to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    head: Option<String>,
}

impl Chain {
    /// A chain continuing after `head` (`None` for an empty chain).
    pub fn resume(head: Option<String>) -> Self {
        Chain { head }
    }

    /// The last record's hash.
    pub fn head(&self) -> Option<&str> {
        self.head.as_deref()
    }

    /// Links `record` to the chain (sets its `previous_hash` and version) and advances the head.
    pub fn append(&mut self, mut record: AuditRecord) -> AuditRecord {
        record.previous_hash = self.head.clone();
        record.hash_version = HASH_VERSION;
        self.head = Some(record.hash());
        record
    }
}

/// How a chain failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// Record `index` does not point at its predecessor (a deletion, insertion or reorder).
    #[error("record {index}: previous_hash does not match the preceding record")]
    BrokenLink {
        /// Position in the chain.
        index: usize,
    },
    /// Record `index` has an unknown hash version.
    #[error("record {index}: unsupported hash version {version}")]
    Version {
        /// Position in the chain.
        index: usize,
        /// Its version.
        version: u32,
    },
    /// The last record is not the recorded head: records were edited, or the tail was cut off.
    #[error("the chain does not end at the recorded head (edited record or truncated tail)")]
    HeadMismatch,
}

/// Verifies `records` (oldest first) as one chain that must end at `head`. An edited record
/// changes its hash, so its successor's link (or the head) no longer matches it.
pub fn verify(records: &[AuditRecord], head: Option<&str>) -> Result<(), ChainError> {
    let mut previous: Option<String> = None;
    for (index, record) in records.iter().enumerate() {
        if record.hash_version != HASH_VERSION {
            return Err(ChainError::Version { index, version: record.hash_version });
        }
        if record.previous_hash != previous {
            return Err(ChainError::BrokenLink { index });
        }
        previous = Some(record.hash());
    }
    if previous.as_deref() != head {
        return Err(ChainError::HeadMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32) -> AuditRecord {
        AuditRecord {
            message_id: format!("m{n}"),
            timestamp: 1_700_000_000.5 + f64::from(n),
            sender_id: "alice".into(),
            sender_instance_id: Some("a1".into()),
            target_id: "bob".into(),
            message_type: Some("t".into()),
            correlation_id: None,
            decision: "ALLOWED".into(),
            latency_ms: 0.25,
            payload_hash: payload_hash(&serde_json::Map::new()),
            violations: vec![],
            previous_hash: None,
            hash_version: 0,
        }
    }

    fn chain(n: u32) -> (Vec<AuditRecord>, Option<String>) {
        let mut chain = Chain::default();
        let records = (0..n).map(|i| chain.append(record(i))).collect();
        (records, chain.head().map(str::to_string))
    }

    #[test]
    fn payload_hash_is_the_hash_of_canonical_json() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":[true,null]}"#).unwrap();
        let expected = sha256_hex(br#"{"a":[true,null],"b":1}"#);
        assert_eq!(payload_hash(v.as_object().unwrap()), expected);
    }

    #[test]
    fn canonical_json_sorts_keys_and_keeps_nulls() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":null,"c":[1,2]}}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":{"c":[1,2],"d":null},"b":1}"#);
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (records, head) = chain(5);
        assert_eq!(records[0].previous_hash, None);
        assert_eq!(records[1].previous_hash, Some(records[0].hash()));
        assert_eq!(verify(&records, head.as_deref()), Ok(()));
    }

    #[test]
    fn edits_deletions_relinks_and_truncation_are_detected() {
        let (records, head) = chain(5);
        let mut edited = records.clone();
        edited[2].decision = "DLP_BLOCKED".into();
        assert_eq!(verify(&edited, head.as_deref()), Err(ChainError::BrokenLink { index: 3 }));
        let mut last_edited = records.clone();
        last_edited[4].violations.push("x".into());
        assert_eq!(verify(&last_edited, head.as_deref()), Err(ChainError::HeadMismatch));
        let mut deleted = records.clone();
        deleted.remove(2);
        assert_eq!(verify(&deleted, head.as_deref()), Err(ChainError::BrokenLink { index: 2 }));
        let mut relinked = deleted.clone();
        relinked[2].previous_hash = Some(relinked[1].hash());
        assert!(verify(&relinked, head.as_deref()).is_err(), "re-linking changes the hash the head expects");
        assert_eq!(verify(&records[..4], head.as_deref()), Err(ChainError::HeadMismatch), "truncated tail");
    }
}
