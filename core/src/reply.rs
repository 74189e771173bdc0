//! The reply rules: which request a reply answers, who may send it, what an identical retry
//! gets, and why a reply is refused. The shell reads the correlation from the store and
//! commits the reply; everything between is decided here.
//!
//! - A correlation id is `{random}.{requester}`: the requester (whose keys hold the pending
//!   request) is read from it without a store lookup; an id this broker could not have issued
//!   is unknown at once.
//! - Only the request's target may answer it (`reply_sender_mismatch`). The request authorized
//!   the exchange: a reply needs no grant of its own.
//! - A retry of the committed reply — same sender, same message type and payload — gets the
//!   first reply's message id again (idempotent); any other later reply is refused as
//!   completed.

use sha2::{Digest, Sha256};

use crate::ids::{AgentId, hex};
use crate::payload::WirePayload;
use crate::store::{Correlation, PendingRequest, ReplyError};

/// Longer than any correlation id a broker issues (`{random}.{agent id}`); a longer one is
/// unknown without a store lookup.
pub const MAX_CORRELATION_ID_BYTES: usize = 256;

/// Why a reply is refused. Display strings are the reference's status details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyRefusal {
    /// The reply names no correlation id.
    #[error("missing_correlation_id")]
    MissingCorrelationId,
    /// No request has this correlation id (never issued, or forgotten long ago).
    #[error("unknown_correlation_id")]
    Unknown,
    /// The request was answered by another reply, or changed under us.
    #[error("unknown_or_completed_correlation_id")]
    Completed,
    /// The request's deadline passed.
    #[error("correlation_id_expired")]
    Expired,
    /// The reply does not come from the agent the request was sent to.
    #[error("reply_sender_mismatch")]
    SenderMismatch,
}

impl From<ReplyError> for ReplyRefusal {
    fn from(err: ReplyError) -> Self {
        match err {
            ReplyError::Unknown => ReplyRefusal::Unknown,
            ReplyError::Expired => ReplyRefusal::Expired,
            ReplyError::Completed => ReplyRefusal::Completed,
        }
    }
}

/// What to do with a reply the rules let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyRoute {
    /// Screen it and commit it to this pending request.
    Answer(PendingRequest),
    /// An identical retry of the committed reply: answer with its message id, commit nothing.
    AlreadyAnswered {
        /// The first reply's message id.
        message_id: String,
    },
}

/// The requester a correlation id names, or why it cannot name one.
pub fn requester_of(correlation_id: &str) -> Result<AgentId, ReplyRefusal> {
    if correlation_id.is_empty() {
        return Err(ReplyRefusal::MissingCorrelationId);
    }
    if correlation_id.len() > MAX_CORRELATION_ID_BYTES {
        return Err(ReplyRefusal::Unknown);
    }
    correlation_id.rsplit_once('.').and_then(|(_, requester)| AgentId::new(requester).ok()).ok_or(ReplyRefusal::Unknown)
}

/// Decides a reply of `sender` whose fingerprint is `fingerprint` (see [`fingerprint`]),
/// given what its correlation id refers to now.
pub fn route(correlation: Correlation, sender: &AgentId, fingerprint: &str) -> Result<ReplyRoute, ReplyRefusal> {
    match correlation {
        Correlation::Pending(pending) if pending.target == *sender => Ok(ReplyRoute::Answer(pending)),
        Correlation::Pending(_) => Err(ReplyRefusal::SenderMismatch),
        Correlation::Answered(receipt) if receipt.sender == *sender && receipt.fingerprint == fingerprint => {
            Ok(ReplyRoute::AlreadyAnswered { message_id: receipt.message_id })
        }
        Correlation::Answered(_) => Err(ReplyRefusal::Completed),
        Correlation::Expired => Err(ReplyRefusal::Expired),
        Correlation::Unknown => Err(ReplyRefusal::Unknown),
    }
}

/// SHA-256 (hex) of compact JSON `[sender, message_type, payload]` with object keys sorted:
/// two replies are "identical" when their fingerprints match.
pub fn fingerprint(sender: &AgentId, message_type: &str, payload: &WirePayload<'_>) -> String {
    // A tuple is written as a JSON array; serialising plain data cannot fail.
    let canonical = serde_json::to_string(&(sender.as_str(), message_type, payload)).unwrap_or_default();
    hex(&Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse_payload;
    use crate::ids::InstanceId;
    use crate::store::ReplyReceipt;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).expect("id")
    }

    fn pending(target: &str) -> PendingRequest {
        PendingRequest {
            requester: id("alice"),
            requester_instance: InstanceId::new("a1").expect("id"),
            target: id(target),
        }
    }

    #[test]
    fn a_correlation_id_names_its_requester_or_is_refused_without_a_lookup() {
        assert_eq!(requester_of("5f0c.alice"), Ok(id("alice")));
        assert_eq!(requester_of("a.b.carol"), Ok(id("carol")), "the last dot separates the requester");
        assert_eq!(requester_of(""), Err(ReplyRefusal::MissingCorrelationId));
        assert_eq!(requester_of("no-dot"), Err(ReplyRefusal::Unknown));
        assert_eq!(requester_of("x.not an id"), Err(ReplyRefusal::Unknown));
        let long = format!("{}.alice", "x".repeat(MAX_CORRELATION_ID_BYTES));
        assert_eq!(requester_of(&long), Err(ReplyRefusal::Unknown));
    }

    #[test]
    fn only_the_target_answers_a_pending_request() {
        assert_eq!(
            route(Correlation::Pending(pending("bob")), &id("bob"), "f"),
            Ok(ReplyRoute::Answer(pending("bob")))
        );
        assert_eq!(route(Correlation::Pending(pending("bob")), &id("mallory"), "f"), Err(ReplyRefusal::SenderMismatch));
    }

    #[test]
    fn an_identical_retry_gets_the_first_id_and_anything_else_is_completed() {
        let receipt = ReplyReceipt { sender: id("bob"), fingerprint: "f1".into(), message_id: "m1".into() };
        let answered = || Correlation::Answered(receipt.clone());
        assert_eq!(route(answered(), &id("bob"), "f1"), Ok(ReplyRoute::AlreadyAnswered { message_id: "m1".into() }));
        assert_eq!(route(answered(), &id("bob"), "f2"), Err(ReplyRefusal::Completed));
        assert_eq!(route(answered(), &id("carol"), "f1"), Err(ReplyRefusal::Completed));
        assert_eq!(route(Correlation::Expired, &id("bob"), "f1"), Err(ReplyRefusal::Expired));
        assert_eq!(route(Correlation::Unknown, &id("bob"), "f1"), Err(ReplyRefusal::Unknown));
    }

    #[test]
    fn fingerprints_ignore_key_order_but_not_content_type_or_sender() {
        let bob = id("bob");
        let a = WirePayload::parse(r#"{"x":1,"y":2}"#).expect("payload");
        let b = WirePayload::parse(r#"{"y":2,"x":1}"#).expect("payload");
        let c = WirePayload::parse(r#"{"x":1,"y":3}"#).expect("payload");
        assert_eq!(fingerprint(&bob, "t", &a), fingerprint(&bob, "t", &b));
        assert_ne!(fingerprint(&bob, "t", &a), fingerprint(&bob, "t", &c));
        assert_ne!(fingerprint(&bob, "t", &a), fingerprint(&bob, "u", &a));
        assert_ne!(fingerprint(&bob, "t", &a), fingerprint(&id("carol"), "t", &a));
    }

    #[test]
    fn a_fingerprint_is_the_hash_of_the_sorted_json_array() {
        // Receipts in a store outlive a broker version: the form is pinned to the one
        // written by serde_json's own value of `[sender, type, payload]`.
        let wire = r#"{"b": [1, 2.5, "é\n"], "a": {"d": null, "c": true}}"#;
        let owned = parse_payload(wire).expect("payload");
        let text = serde_json::json!(["bob", "t", owned]).to_string();
        let expected = hex(&Sha256::digest(text.as_bytes()));
        assert_eq!(fingerprint(&id("bob"), "t", &WirePayload::parse(wire).expect("payload")), expected);
    }

    #[test]
    fn commit_failures_read_as_the_same_refusals() {
        assert_eq!(ReplyRefusal::from(ReplyError::Expired).to_string(), "correlation_id_expired");
        assert_eq!(ReplyRefusal::from(ReplyError::Unknown).to_string(), ReplyError::Unknown.to_string());
        assert_eq!(ReplyRefusal::from(ReplyError::Completed).to_string(), ReplyError::Completed.to_string());
    }
}
