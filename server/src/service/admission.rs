//! The admission pipeline of sends, requests and replies, in the reference's order:
//! authorization → rate limit → circuit breaker → DLP → audit + enqueue.
//!
//! Every decision is audited: a denial is recorded in the store before its error returns, and
//! an admitted message is recorded in the same store step that queues it (the store may still
//! turn it into `CIRCUIT_OPEN` or `QUEUE_FULL` at that moment, and records that instead).

use mas_core::envelope::{Payload, parse_payload};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::policy::audit::{AuditRecord, Decision, payload_hash};
use mas_core::policy::dlp::Action;
use mas_core::store::{Admission, Admitted, StoreError, TargetGate};
use mas_core::time::Instant;
use mas_net::status::{self, detail};
use mas_net::telemetry::WireContext;
use tonic::Status;

use super::{Service, store_failed};

/// A message entering the pipeline: everything its audit record needs.
pub(super) struct Ingress<'a> {
    pub sender: &'a AgentId,
    pub sender_instance: &'a InstanceId,
    /// The target as the sender named it (possibly not a valid agent id).
    pub target_id: &'a str,
    pub message_type: &'a str,
    pub correlation_id: Option<&'a str>,
    pub message_id: &'a str,
    /// When the RPC began (broker's monotonic clock), for `latency_ms`.
    pub started: Instant,
    /// The trace context the message carries (its trace id goes into the audit record).
    pub trace: &'a WireContext,
}

/// The fields a send and a request share.
pub(super) struct Outgoing<'a> {
    pub instance_id: &'a str,
    pub target_id: &'a str,
    pub message_type: &'a str,
    pub data_json: &'a str,
}

/// A send or request that passed the policies.
pub(super) struct Screened {
    /// The sending instance (it holds a live session).
    pub sender_instance: InstanceId,
    /// The message's fresh id.
    pub message_id: String,
    /// Where it goes, what it carries, its decision record.
    pub passed: Passed,
}

/// Which checks apply: a reply was authorized by its request and is not gated by the
/// requester's circuit (the requester is waiting for it); it is still rate-limited and screened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange<'a> {
    /// A send or a request: every check.
    Message,
    /// A reply to a request of this agent.
    Reply(&'a AgentId),
}

/// A message the policy engines let through.
pub(super) struct Passed {
    /// The agent that receives it (its chain records the decision).
    pub target: AgentId,
    /// The payload to deliver (redacted when DLP said so).
    pub payload: Payload,
    /// The decision record (`ALLOWED`, `ALERT` or `DLP_REDACTED`), not yet linked.
    pub record: AuditRecord,
}

impl Service {
    /// The common front of a send and a request: the sender's session, the payload's form, a
    /// fresh message id, then the policies. `started` is when the RPC began.
    pub(super) async fn screen_outgoing(
        &self,
        started: Instant,
        sender: &AgentId,
        outgoing: Outgoing<'_>,
        correlation_id: Option<&str>,
        trace: &WireContext,
    ) -> Result<Screened, Status> {
        let sender_instance = self.connected_instance(sender, outgoing.instance_id).await?;
        // Bounded before anything is parsed, screened or audited: no field of a refused
        // message is ever kept at a size the peer chose.
        let limits = self.broker.config().limits.input();
        limits
            .check_message(outgoing.target_id, outgoing.message_type, outgoing.data_json)
            .map_err(status::limit_exceeded)?;
        let data = parse_payload(outgoing.data_json).map_err(status::payload_invalid)?;
        let message_id = self.broker.next_message_id();
        let ingress = Ingress {
            sender,
            sender_instance: &sender_instance,
            target_id: outgoing.target_id,
            message_type: outgoing.message_type,
            correlation_id,
            message_id: &message_id,
            started,
            trace,
        };
        let passed = self.pass_policies(&ingress, Exchange::Message, data).await?;
        Ok(Screened { sender_instance, message_id, passed })
    }

    /// Runs authorization, rate limit, circuit and DLP. A denial is audited, then returned as
    /// its reference status.
    pub(super) async fn pass_policies(
        &self,
        ingress: &Ingress<'_>,
        exchange: Exchange<'_>,
        payload: Payload,
    ) -> Result<Passed, Status> {
        let (target, gate) = match exchange {
            Exchange::Reply(requester) => (requester.clone(), TargetGate { live: true, circuit_admits: true }),
            Exchange::Message => match self.authorize(ingress.sender, ingress.target_id).await? {
                Ok(authorized) => authorized,
                Err(chain) => {
                    let violations = vec!["authorization_denied".to_string()];
                    return Err(self.deny(ingress, &chain, &payload, Decision::AuthzDenied, violations).await);
                }
            },
        };
        let limits = self.broker.config().gateway.rate_limit.limits_for(ingress.sender);
        if let Err(limited) = self.broker.store().admit_rate(ingress.sender, limits).await.map_err(store_failed)? {
            tracing::info!(sender = %ingress.sender, window = ?limited.window, "rate limited");
            let violations = vec!["rate_limit_exceeded".to_string()];
            return Err(self.deny(ingress, &target, &payload, Decision::RateLimited, violations).await);
        }
        if !gate.circuit_admits {
            tracing::info!(sender = %ingress.sender, %target, "circuit open");
            let violations = vec!["circuit_open".to_string()];
            return Err(self.deny(ingress, &target, &payload, Decision::CircuitOpen, violations).await);
        }
        let (decision, violations, payload) = match self.broker.dlp() {
            None => (Decision::Allowed, Vec::new(), payload),
            Some(dlp) => {
                let scan = dlp.scan(&payload);
                for violation in &scan.violations {
                    self.broker.metrics().dlp_finding(&violation.kind, violation.action);
                }
                let kinds = scan.kinds();
                match scan.action {
                    None => (Decision::Allowed, kinds, payload),
                    Some(Action::Alert) => (Decision::Alert, kinds, payload),
                    Some(Action::Redact) => (Decision::DlpRedacted, kinds, scan.redacted.unwrap_or(payload)),
                    Some(Action::Block) => {
                        tracing::info!(sender = %ingress.sender, violations = ?kinds, "DLP blocked");
                        return Err(self.deny(ingress, &target, &payload, Decision::DlpBlocked, kinds).await);
                    }
                }
            }
        };
        let record = self.record(ingress, &payload, decision, violations);
        Ok(Passed { target, payload, record })
    }

    /// The audit record of a decision about `payload`.
    fn record(
        &self,
        ingress: &Ingress<'_>,
        payload: &Payload,
        decision: Decision,
        violations: Vec<String>,
    ) -> AuditRecord {
        let now = self.broker.clock().now();
        AuditRecord {
            correlation_id: ingress.correlation_id.map(str::to_string),
            decision,
            hash_version: 0,
            latency_ms: now.mono.saturating_duration_since(ingress.started).as_secs_f64() * 1000.0,
            message_id: ingress.message_id.to_string(),
            message_type: Some(ingress.message_type.to_string()),
            payload_hash: payload_hash(payload),
            previous_hash: None,
            sender_id: ingress.sender.to_string(),
            sender_instance_id: Some(ingress.sender_instance.to_string()),
            target_id: ingress.target_id.to_string(),
            timestamp: now.wall.0 as f64 / 1000.0,
            trace_id: ingress.trace.trace_id().map(str::to_string),
            violations,
        }
    }

    /// Audits a denial in `chain`, then returns its status — or the store's error if the
    /// denial could not be recorded (nothing is refused unaudited either).
    async fn deny(
        &self,
        ingress: &Ingress<'_>,
        chain: &AgentId,
        payload: &Payload,
        decision: Decision,
        violations: Vec<String>,
    ) -> Status {
        let record = self.record(ingress, payload, decision, violations);
        let admission = Admission { chain: chain.clone(), record, envelope: None };
        let committed = self.broker.store().admit(admission, self.broker.circuit()).await;
        match self.recorded(chain, committed) {
            Ok(_) => denial_status(decision),
            Err(status) => status,
        }
    }

    /// Queues a message that passed the policies, with its audit record, as one store step.
    /// The store may still refuse it (circuit, queue bound): then the refusal was recorded
    /// and its status returns.
    pub(super) async fn admit(&self, admission: Admission) -> Result<(), Status> {
        let chain = admission.chain.clone();
        let committed = self.broker.store().admit(admission, self.broker.circuit()).await;
        routed(&self.recorded(&chain, committed)?)
    }

    /// The end of every audited store step that records in `chain`: a committed record goes
    /// to the file sink (and the archiver's count); a failure becomes its status, and a full
    /// chain is handed to the archiver at once.
    pub(super) fn recorded(
        &self,
        chain: &AgentId,
        committed: Result<Admitted, StoreError>,
    ) -> Result<Admitted, Status> {
        match committed {
            Ok(admitted) => {
                self.committed(chain, &admitted.record);
                Ok(admitted)
            }
            Err(err) => Err(self.audit_step_failed(chain, err)),
        }
    }

    /// A decision record committed to `chain`: to the file sink, the archiver's count and the
    /// admission metrics.
    pub(super) fn committed(&self, chain: &AgentId, record: &AuditRecord) {
        self.broker.audit().recorded(chain, record);
        self.broker.metrics().admitted(record.decision, &record.sender_id);
        tracing::Span::current().record("mas.decision", record.decision.as_str());
    }

    /// The status of a failed step that records in `chain`; a full chain is handed to the
    /// archiver at once.
    pub(super) fn audit_step_failed(&self, chain: &AgentId, err: StoreError) -> Status {
        if err == StoreError::AuditFull {
            self.broker.audit().chain_full(chain);
        }
        store_failed(err)
    }

    /// Deny by default: the target must be allowlisted and hold a live session, must not be
    /// blocked for the sender, and must be granted (per-agent grant or RBAC role). Returns the
    /// target and its gate, or the chain the denial is recorded in (the target's when it is an
    /// allowlisted agent, else the sender's).
    async fn authorize(
        &self,
        sender: &AgentId,
        target_id: &str,
    ) -> Result<Result<(AgentId, TargetGate), AgentId>, Status> {
        let denied = |why: &str, chain: &AgentId| {
            tracing::info!(%sender, target = target_id, why, "message not authorized");
            Ok(Err(chain.clone()))
        };
        let Some(target) = AgentId::new(target_id).ok().filter(|t| self.broker.agent(t).is_some()) else {
            return denied("target not an allowlisted agent", sender);
        };
        // Policy first: a denied message costs no store round trip.
        if let Err(denial) = self.broker.authorize(sender, &target, true) {
            return denied(&format!("{denial:?}"), &target);
        }
        let gate = self.broker.store().gate(&target, self.broker.circuit()).await.map_err(store_failed)?;
        if !gate.live {
            return denied("target has no live session", &target);
        }
        Ok(Ok((target, gate)))
    }
}

/// `Ok` when the message was queued; else the status of the refusal the store recorded.
pub(super) fn routed(admitted: &Admitted) -> Result<(), Status> {
    match admitted.entry {
        Some(_) => Ok(()),
        None => Err(denial_status(admitted.record.decision)),
    }
}

/// The reference's status for a refusal (catalogue §1.4; `queue_full` is ours).
fn denial_status(decision: Decision) -> Status {
    match decision {
        Decision::AuthzDenied => Status::permission_denied(detail::NOT_AUTHORIZED),
        Decision::DlpBlocked => Status::permission_denied(detail::DLP_BLOCKED),
        Decision::RateLimited => Status::resource_exhausted(detail::RATE_LIMITED),
        Decision::QueueFull => Status::resource_exhausted(detail::QUEUE_FULL),
        Decision::CircuitOpen => Status::failed_precondition(detail::CIRCUIT_OPEN),
        // Routable decisions are never refusals; a store that refused one without saying why
        // is reported as unavailable rather than as a policy verdict.
        Decision::Allowed | Decision::Alert | Decision::DlpRedacted => Status::unavailable(detail::STORAGE_UNAVAILABLE),
    }
}
