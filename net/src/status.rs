//! The single mapping to gRPC status codes. Codes and detail strings follow the reference's
//! catalogue exactly, because clients match on them.

use mas_core::envelope::PayloadError;
use mas_core::limits::LimitExceeded;
use mas_core::reply::ReplyRefusal;
use mas_core::store::StoreError;
use tonic::{Code, Status};

use crate::identity::IdentityError;

/// Status details of the reference catalogue used by this broker.
pub mod detail {
    /// The agent id is not in the broker's allowlist.
    pub const AGENT_NOT_ALLOWLISTED: &str = "agent_not_allowlisted";
    /// The stream ended before a Hello.
    pub const MISSING_HELLO: &str = "missing_hello";
    /// Another event came before the Hello.
    pub const EXPECTED_HELLO: &str = "expected_hello";
    /// After the Hello only Ack and Nack are accepted.
    pub const EXPECTED_ACK_OR_NACK: &str = "expected_ack_or_nack";
    /// The instance id breaks the id rules.
    pub const INVALID_INSTANCE_ID: &str = "invalid_instance_id";
    /// The (agent, instance) already has a session.
    pub const INSTANCE_ALREADY_CONNECTED: &str = "instance_already_connected";
    /// The RPC names an instance that has no live session.
    pub const SESSION_NOT_CONNECTED: &str = "session_not_connected";
    /// Authorization denied the message.
    pub const NOT_AUTHORIZED: &str = "not_authorized";
    /// The session's lease was lost (renewal failed or another owner took it).
    pub const SESSION_LEASE_LOST: &str = "session_lease_lost";
    /// `timeout_ms` was negative.
    pub const INVALID_TIMEOUT_MS: &str = "invalid_timeout_ms";
    /// A reply without a correlation id.
    pub const MISSING_CORRELATION_ID: &str = "missing_correlation_id";
    /// A reply to a request that never existed or is long gone.
    pub const UNKNOWN_CORRELATION_ID: &str = "unknown_correlation_id";
    /// A different reply was committed first.
    pub const UNKNOWN_OR_COMPLETED_CORRELATION_ID: &str = "unknown_or_completed_correlation_id";
    /// A reply after the request's deadline.
    pub const CORRELATION_ID_EXPIRED: &str = "correlation_id_expired";
    /// A reply from someone other than the request's target.
    pub const REPLY_SENDER_MISMATCH: &str = "reply_sender_mismatch";
    /// A compare-and-set state write with a stale revision.
    pub const STATE_REVISION_CONFLICT: &str = "state_revision_conflict";
    /// The sender is over its rate limit.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// DLP found data that must not leave the sender.
    pub const DLP_BLOCKED: &str = "dlp_blocked";
    /// The store could not be reached.
    pub const STORAGE_UNAVAILABLE: &str = "storage_unavailable";
    /// The target's queue is at its bound (ours; the reference has no bound).
    pub const QUEUE_FULL: &str = "queue_full";
    /// The broker is shutting down and takes no new sessions or messages (ours).
    pub const BROKER_SHUTTING_DOWN: &str = "broker_shutting_down";
    /// The target's circuit breaker is open.
    pub const CIRCUIT_OPEN: &str = "circuit_open";
    /// A `SendBatch` beyond the most sends one call may carry (ours).
    pub const BATCH_TOO_LARGE: &str = "batch_too_large";
    /// The agent holds `limits.max_sessions_per_agent` sessions on this broker (ours).
    pub const TOO_MANY_SESSIONS: &str = "too_many_sessions";
    /// The requester has `limits.max_pending_requests_per_agent` requests awaiting replies (ours).
    pub const TOO_MANY_PENDING_REQUESTS: &str = "too_many_pending_requests";
    /// `timeout_ms` is above `limits.max_request_timeout_ms` (ours).
    pub const TIMEOUT_MS_TOO_LARGE: &str = "timeout_ms_too_large";
    /// The audit chain that must record the decision is full (the reference's
    /// `audit_capacity_exceeded`); nothing is delivered unaudited.
    pub const AUDIT_CAPACITY_EXCEEDED: &str = "audit_capacity_exceeded";
}

/// `UNAUTHENTICATED` with the identity failure's detail.
pub fn identity_denied(err: IdentityError) -> Status {
    Status::unauthenticated(err.to_string())
}

/// `INVALID_ARGUMENT invalid_json` / `payload_must_be_object`.
pub fn payload_invalid(err: PayloadError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// An input over its bound: `RESOURCE_EXHAUSTED` for sizes (`payload_too_large`,
/// `state_too_large`), `INVALID_ARGUMENT` for malformed fields (`json_too_deep`,
/// `message_type_too_long`, `invalid_target_id`).
pub fn limit_exceeded(err: LimitExceeded) -> Status {
    if err.is_resource() {
        Status::resource_exhausted(err.to_string())
    } else {
        Status::invalid_argument(err.to_string())
    }
}

/// A refused reply: `INVALID_ARGUMENT` for a correlation id that names no open request,
/// `FAILED_PRECONDITION correlation_id_expired`, `PERMISSION_DENIED reply_sender_mismatch`.
pub fn reply_refused(refusal: ReplyRefusal) -> Status {
    let detail = refusal.to_string();
    match refusal {
        ReplyRefusal::MissingCorrelationId | ReplyRefusal::Unknown | ReplyRefusal::Completed => {
            Status::invalid_argument(detail)
        }
        ReplyRefusal::Expired => Status::failed_precondition(detail),
        ReplyRefusal::SenderMismatch => Status::permission_denied(detail),
    }
}

/// Store failures: a full queue is `RESOURCE_EXHAUSTED queue_full`, a full audit chain
/// `RESOURCE_EXHAUSTED audit_capacity_exceeded`; anything else is `UNAVAILABLE
/// storage_unavailable` (backend text is logged, never sent to the peer).
pub fn store_failed(err: &StoreError) -> Status {
    match err {
        StoreError::QueueFull => Status::resource_exhausted(detail::QUEUE_FULL),
        StoreError::TooManyPending => Status::resource_exhausted(detail::TOO_MANY_PENDING_REQUESTS),
        StoreError::AuditFull => {
            tracing::error!("audit chain full: refusing messages it would record until it is archived");
            Status::resource_exhausted(detail::AUDIT_CAPACITY_EXCEEDED)
        }
        StoreError::NotOwner | StoreError::Unavailable(_) => {
            tracing::warn!(error = %err, "store step failed");
            Status::unavailable(detail::STORAGE_UNAVAILABLE)
        }
    }
}

/// Whether `status` carries `code` with exactly `detail`; for clients and tests.
pub fn is(status: &Status, code: Code, detail: &str) -> bool {
    status.code() == code && status.message() == detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_reference_codes() {
        let s = identity_denied(IdentityError::MissingSan);
        assert!(is(&s, Code::Unauthenticated, "missing_spiffe_san"));
        let s = payload_invalid(PayloadError::NotAnObject);
        assert!(is(&s, Code::InvalidArgument, "payload_must_be_object"));
        let s = store_failed(&StoreError::Unavailable("connection reset".into()));
        assert!(is(&s, Code::Unavailable, "storage_unavailable"), "backend text must not leak");
        assert!(is(&store_failed(&StoreError::AuditFull), Code::ResourceExhausted, "audit_capacity_exceeded"));
        assert!(is(&limit_exceeded(LimitExceeded::PayloadTooLarge), Code::ResourceExhausted, "payload_too_large"));
        assert!(is(&limit_exceeded(LimitExceeded::JsonTooDeep), Code::InvalidArgument, "json_too_deep"));
        let reply = |r| reply_refused(r);
        assert!(is(&reply(ReplyRefusal::MissingCorrelationId), Code::InvalidArgument, detail::MISSING_CORRELATION_ID));
        assert!(is(&reply(ReplyRefusal::Unknown), Code::InvalidArgument, detail::UNKNOWN_CORRELATION_ID));
        assert!(is(
            &reply(ReplyRefusal::Completed),
            Code::InvalidArgument,
            detail::UNKNOWN_OR_COMPLETED_CORRELATION_ID
        ));
        assert!(is(&reply(ReplyRefusal::Expired), Code::FailedPrecondition, detail::CORRELATION_ID_EXPIRED));
        assert!(is(&reply(ReplyRefusal::SenderMismatch), Code::PermissionDenied, detail::REPLY_SENDER_MISMATCH));
    }
}
