//! The tamper-evident audit chain (reference v2 semantics).
//!
//! Each record's hash is SHA-256 over the canonical JSON (keys sorted, no whitespace, nulls
//! included) of the *whole* record, including `previous_hash` — so editing a record, deleting
//! one, or re-linking around a deletion all break the chain. A chain's head (the last hash) is
//! kept apart from the records; verifying against it also detects a truncated tail.
//!
//! There is no single global chain: the broker keeps one chain per agent that receives messages
//! (the chain lives beside that agent's queue, so "audit and enqueue" is one atomic store step
//! and appends to different agents never serialise on one head), plus one chain of security
//! events. Verification walks every chain.

mod export;
pub mod file;

pub use export::{AuditFilter, to_csv, to_json};
pub use file::{FileLine, FileReport, Gap, GapLine, LineVerifier, verify_lines};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ids::hex;
use crate::payload::CanonicalPayload;

/// The hash format version written by this code.
pub const HASH_VERSION: u32 = 2;

/// What the admission pipeline decided about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Decision {
    /// Delivered unchanged; nothing found.
    Allowed,
    /// Delivered unchanged; DLP found something worth an alert.
    Alert,
    /// Delivered with DLP redactions.
    DlpRedacted,
    /// Refused by authorization.
    AuthzDenied,
    /// Refused by the sender's rate limit.
    RateLimited,
    /// Refused because the target's circuit is open.
    CircuitOpen,
    /// Refused by DLP.
    DlpBlocked,
    /// Refused because the target's queue is full (ours; the reference does not audit it).
    QueueFull,
}

impl Decision {
    /// Whether a message with this decision is delivered.
    pub fn is_routable(self) -> bool {
        matches!(self, Decision::Allowed | Decision::Alert | Decision::DlpRedacted)
    }

    /// The decision as written in records (`ALLOWED`, `DLP_BLOCKED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "ALLOWED",
            Decision::Alert => "ALERT",
            Decision::DlpRedacted => "DLP_REDACTED",
            Decision::AuthzDenied => "AUTHZ_DENIED",
            Decision::RateLimited => "RATE_LIMITED",
            Decision::CircuitOpen => "CIRCUIT_OPEN",
            Decision::DlpBlocked => "DLP_BLOCKED",
            Decision::QueueFull => "QUEUE_FULL",
        }
    }

    /// Parses [`Decision::as_str`]'s form.
    pub fn parse(text: &str) -> Option<Decision> {
        ALL_DECISIONS.iter().copied().find(|d| d.as_str().eq_ignore_ascii_case(text))
    }
}

const ALL_DECISIONS: [Decision; 8] = [
    Decision::Allowed,
    Decision::Alert,
    Decision::DlpRedacted,
    Decision::AuthzDenied,
    Decision::RateLimited,
    Decision::CircuitOpen,
    Decision::DlpBlocked,
    Decision::QueueFull,
];

/// One admission decision. Fields are declared in alphabetical order: serialising the struct
/// then yields canonical JSON directly, without building a sorted map first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Correlation id of requests and replies.
    pub correlation_id: Option<String>,
    /// What was decided.
    pub decision: Decision,
    /// Always [`HASH_VERSION`] once linked.
    pub hash_version: u32,
    /// Time spent deciding, in milliseconds.
    pub latency_ms: f64,
    /// The message.
    pub message_id: String,
    /// Message type.
    pub message_type: Option<String>,
    /// SHA-256 of the canonical JSON of the (possibly redacted) payload.
    pub payload_hash: String,
    /// Hash of the previous record of this chain; `None` for the first.
    pub previous_hash: Option<String>,
    /// Authenticated sender.
    pub sender_id: String,
    /// Sending instance.
    pub sender_instance_id: Option<String>,
    /// Target agent, as the sender named it.
    pub target_id: String,
    /// Wall-clock seconds since the Unix epoch.
    pub timestamp: f64,
    /// The W3C trace id of the message (32 hex digits), when it carried a trace context: the
    /// way from a decision to the whole trace. Absent (not null) otherwise, so records without
    /// one hash exactly as the reference's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Violation types (DLP) or denial reasons.
    pub violations: Vec<String>,
}

impl AuditRecord {
    /// Turns a routable decision into a refusal, recorded with its reason (the store does
    /// this when the target's circuit or queue refuses at the moment of enqueueing).
    pub fn refuse(&mut self, decision: Decision, reason: &str) {
        self.decision = decision;
        self.violations = vec![reason.to_string()];
    }
}

/// A security event: an authentication denial or a change made through the management API.
/// Fields in alphabetical order, as for [`AuditRecord`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityEvent {
    /// Event-specific facts (who, what changed).
    pub details: Value,
    /// E.g. `authentication_denied`, `authz_changed`.
    pub event_type: String,
    /// Always [`HASH_VERSION`] once linked.
    pub hash_version: u32,
    /// Hash of the previous event; `None` for the first.
    pub previous_hash: Option<String>,
    /// Wall-clock seconds since the Unix epoch.
    pub timestamp: f64,
}

/// A record that lives in a hash chain.
pub trait Chained: Serialize {
    /// The link to the predecessor.
    fn previous_hash(&self) -> Option<&str>;
    /// The record's hash format version.
    fn hash_version(&self) -> u32;
    /// Sets the link and the version.
    fn link(&mut self, previous: Option<String>);

    /// SHA-256 (hex) of the record's canonical JSON, `previous_hash` included.
    fn hash(&self) -> String {
        hash_of(self)
    }

    /// The record's canonical JSON and its hash, serialised once: for stores that keep
    /// records as text.
    fn canonical(&self) -> (String, String) {
        // Serialising plain data cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        let hash = hex(&Sha256::digest(json.as_bytes()));
        (json, hash)
    }
}

/// Both record kinds link the same way: through their `previous_hash` and `hash_version`.
macro_rules! chained {
    ($($record:ty),*) => {$(
        impl Chained for $record {
            fn previous_hash(&self) -> Option<&str> {
                self.previous_hash.as_deref()
            }
            fn hash_version(&self) -> u32 {
                self.hash_version
            }
            fn link(&mut self, previous: Option<String>) {
                self.previous_hash = previous;
                self.hash_version = HASH_VERSION;
            }
        }
    )*};
}

chained!(AuditRecord, SecurityEvent);

/// Canonical JSON: object keys sorted, compact separators, nulls kept.
pub fn canonical_json(value: &Value) -> String {
    // serde_json's default map is ordered by key and its writer is compact.
    value.to_string()
}

/// Feeds serialised bytes straight into the hasher: no intermediate string.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SHA-256 (hex) of `value` serialised as compact JSON. Canonical when `value`'s keys come
/// out sorted (structs declared in key order, `serde_json::Map`).
fn hash_of<T: Serialize + ?Sized>(value: &T) -> String {
    let mut writer = HashWriter(Sha256::new());
    // Serialising plain data into an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut writer, value);
    hex(&writer.0.finalize())
}

/// SHA-256 (hex) of a payload's canonical JSON (its map is ordered by key): the hash
/// admission takes of the [`CanonicalPayload`] it writes into the envelope.
pub fn payload_hash(payload: &serde_json::Map<String, Value>) -> String {
    CanonicalPayload::of(payload).hash()
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
    pub fn append<T: Chained>(&mut self, mut record: T) -> T {
        record.link(self.head.take());
        self.head = Some(record.hash());
        record
    }

    /// Like [`Chain::append`], also returning the linked record's canonical JSON (what its
    /// hash covers), so a store that keeps records as text serialises each only once.
    pub fn append_json<T: Chained>(&mut self, mut record: T) -> (T, String) {
        record.link(self.head.take());
        let (json, hash) = record.canonical();
        self.head = Some(hash);
        (record, json)
    }
}

/// Where the live part of a chain begins once older records were archived out of the store:
/// how many records were archived, and the hash of the last one (the `previous_hash` the first
/// live record must carry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Records archived out of the store so far.
    pub archived: u64,
    /// Hash of the last archived record; `None` while nothing was archived.
    pub base: Option<String>,
}

/// A chain as read from the store: its live records (oldest first), its head, and where the
/// live part begins.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainSnapshot<T> {
    /// The live records, oldest first.
    pub records: Vec<T>,
    /// The hash of the newest record, archived or live; `None` for a chain never written.
    pub head: Option<String>,
    /// What was archived before `records`.
    pub checkpoint: Checkpoint,
}

impl<T> Default for ChainSnapshot<T> {
    fn default() -> Self {
        ChainSnapshot { records: Vec::new(), head: None, checkpoint: Checkpoint::default() }
    }
}

impl<T: Chained> ChainSnapshot<T> {
    /// Verifies the live records: they must continue from the checkpoint and end at the head.
    pub fn verify(&self) -> Result<(), ChainError> {
        verify_from(&self.records, self.checkpoint.base.as_deref(), self.head.as_deref())
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
    /// A stored record could not be read back.
    #[error("record {index}: unreadable ({reason})")]
    Unreadable {
        /// Position in the chain.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// Verifies `records` (oldest first) as one whole chain that must end at `head`. An edited
/// record changes its hash, so its successor's link (or the head) no longer matches it.
pub fn verify<T: Chained>(records: &[T], head: Option<&str>) -> Result<(), ChainError> {
    verify_from(records, None, head)
}

/// Verifies `records` as the part of a chain that follows the record hashed `base` (`None`:
/// the chain's beginning) and ends at `head`.
pub fn verify_from<T: Chained>(records: &[T], base: Option<&str>, head: Option<&str>) -> Result<(), ChainError> {
    let mut previous: Option<String> = base.map(str::to_string);
    for (index, record) in records.iter().enumerate() {
        check_link(index, record, previous.as_deref())?;
        previous = Some(record.hash());
    }
    if previous.as_deref() != head {
        return Err(ChainError::HeadMismatch);
    }
    Ok(())
}

/// Verifies `records` as the part of a chain that follows the record hashed `base`, as
/// [`verify_from`] does without a head, and returns each record's canonical JSON and hash:
/// what an archiver writes out, serialised once.
pub fn canonical_links<T: Chained>(records: &[T], base: Option<&str>) -> Result<Vec<(String, String)>, ChainError> {
    let mut links: Vec<(String, String)> = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        let previous = links.last().map(|(_, hash)| hash.as_str()).or(base);
        check_link(index, record, previous)?;
        links.push(record.canonical());
    }
    Ok(links)
}

/// Record `index` must carry the current hash version and link to `previous`.
fn check_link<T: Chained>(index: usize, record: &T, previous: Option<&str>) -> Result<(), ChainError> {
    if record.hash_version() != HASH_VERSION {
        return Err(ChainError::Version { index, version: record.hash_version() });
    }
    if record.previous_hash() != previous {
        return Err(ChainError::BrokenLink { index });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
