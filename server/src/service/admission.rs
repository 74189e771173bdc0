//! The admission pipeline of sends, requests and replies, in the reference's order:
//! authorization → rate limit → circuit breaker → DLP → audit + enqueue.
//!
//! The order and the decisions are `mas_core::admission`'s; this shell gathers what they need
//! for a batch of one sender's messages (one gate read per distinct target, one rate-limit
//! step for the whole batch) and records and queues what comes out. A unary send is a batch
//! of one; `SendBatch` hands over many.
//!
//! Every decision is audited: a denial is recorded in the store before its error returns, and
//! an admitted message is recorded in the same store step that queues it (the store may still
//! turn it into `CIRCUIT_OPEN` or `QUEUE_FULL` at that moment, and records that instead).

use std::collections::BTreeMap;

use mas_core::admission::{Authorization, Batch, Verdict};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::payload::{CanonicalPayload, WirePayload};
use mas_core::policy::audit::{AuditRecord, Decision};
use mas_core::policy::ratelimit::Grant;
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
    /// The payload to deliver (redacted when DLP said so), as canonical JSON.
    pub payload: CanonicalPayload,
    /// The decision record (`ALLOWED`, `ALERT` or `DLP_REDACTED`), not yet linked.
    pub record: AuditRecord,
}

/// A message the policies refused: its decision record, to be committed to `chain` before
/// the refusal is answered (see [`Service::refuse`]).
pub(super) struct Refused {
    chain: AgentId,
    record: AuditRecord,
}

/// What the policies made of one message of a batch.
pub(super) enum Screening {
    /// On to the store, to be queued with its record.
    Passed(Passed),
    /// Refused: its record is committed, then the refusal answered.
    Refused(Refused),
}

/// Where a message stands after authorization: its target and gate, or the chain a denial is
/// recorded in (the target's when it is an allowlisted agent, else the sender's).
enum Authorized {
    To(AgentId),
    Denied { chain: AgentId },
}

impl Service {
    /// The common front of a send and a request from `sender_instance` (which holds a live
    /// session): the payload's form, a fresh message id, then the policies. `started` is when
    /// the RPC began.
    pub(super) async fn screen_outgoing(
        &self,
        started: Instant,
        sender: &AgentId,
        sender_instance: InstanceId,
        outgoing: Outgoing<'_>,
        correlation_id: Option<&str>,
        trace: &WireContext,
    ) -> Result<Screened, Status> {
        let data = self.checked_payload(&outgoing)?;
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

    /// The input bounds and the payload's form, checked before anything is screened or
    /// audited: no field of a refused message is ever kept at a size the peer chose.
    pub(super) fn checked_payload<'a>(&self, outgoing: &Outgoing<'a>) -> Result<WirePayload<'a>, Status> {
        let limits = self.broker.config().limits.input();
        limits
            .check_message(outgoing.target_id, outgoing.message_type, outgoing.data_json)
            .map_err(status::limit_exceeded)?;
        WirePayload::parse(outgoing.data_json).map_err(status::payload_invalid)
    }

    /// Runs authorization, rate limit, circuit and DLP over one message. A denial is
    /// audited, then returned as its reference status.
    pub(super) async fn pass_policies(
        &self,
        ingress: &Ingress<'_>,
        exchange: Exchange<'_>,
        payload: WirePayload<'_>,
    ) -> Result<Passed, Status> {
        let mut decided = self.pass_policies_batch(std::slice::from_ref(ingress), exchange, vec![payload]).await?;
        match decided.pop() {
            Some(Screening::Passed(passed)) => Ok(passed),
            Some(Screening::Refused(refused)) => Err(self.refuse(refused).await),
            None => Err(Status::internal("admission decided no message")),
        }
    }

    /// Runs the policies over messages of one sender (`ingresses` and `payloads` in the same
    /// order): authorization by policy, one gate read per distinct target, one rate-limit
    /// step for the batch, then `mas_core::admission` decides. Nothing is recorded yet: the
    /// caller commits every message's record in sending order — a passed one with its
    /// envelope ([`Service::admit`]), a refused one through [`Service::refuse`] — so a chain
    /// lists a batch's decisions in the order its messages were sent. The outer error is a
    /// store failure before any decision.
    pub(super) async fn pass_policies_batch(
        &self,
        ingresses: &[Ingress<'_>],
        exchange: Exchange<'_>,
        payloads: Vec<WirePayload<'_>>,
    ) -> Result<Vec<Screening>, Status> {
        let Some(sender) = ingresses.first().map(|ingress| ingress.sender) else { return Ok(Vec::new()) };
        let authorized: Vec<Authorized> = match exchange {
            Exchange::Reply(requester) => ingresses.iter().map(|_| Authorized::To(requester.clone())).collect(),
            Exchange::Message => {
                ingresses.iter().map(|ingress| self.authorize(ingress.sender, ingress.target_id)).collect()
            }
        };
        let gates = match exchange {
            Exchange::Reply(_) => BTreeMap::new(),
            Exchange::Message => self.gates(&authorized).await?,
        };
        let authorizations: Vec<Authorization> = authorized
            .iter()
            .map(|authorized| match (authorized, exchange) {
                (Authorized::To(_), Exchange::Reply(_)) => Authorization::REPLY,
                (Authorized::To(target), Exchange::Message) => {
                    gates.get(target).map_or(Authorization::Denied, |gate| Authorization::Granted(*gate))
                }
                (Authorized::Denied { .. }, _) => Authorization::Denied,
            })
            .collect();
        let batch = Batch::new(authorizations);
        let grant = match batch.rate_demand() {
            0 => Grant { admitted: 0, refused: None },
            demand => {
                let limits = self.broker.config().gateway.rate_limit.limits_for(sender);
                self.broker.store().admit_rate(sender, limits, demand).await.map_err(store_failed)?
            }
        };
        let verdicts = batch.decide(grant, payloads, self.broker.dlp());
        let decided = ingresses.iter().zip(authorized).zip(verdicts);
        Ok(decided.map(|((ingress, authorized), verdict)| self.screening(ingress, authorized, verdict)).collect())
    }

    /// Turns one verdict into a passed message or a refusal to record.
    fn screening(&self, ingress: &Ingress<'_>, authorized: Authorized, verdict: Verdict) -> Screening {
        for finding in &verdict.findings {
            self.broker.metrics().dlp_finding(&finding.kind, finding.action);
        }
        let chain = match authorized {
            Authorized::To(target) => target,
            Authorized::Denied { chain } => chain,
        };
        match verdict.decision {
            Decision::Allowed | Decision::Alert | Decision::DlpRedacted => {}
            Decision::AuthzDenied | Decision::QueueFull => {}
            Decision::RateLimited => {
                let window = verdict.limited.map(|limited| limited.window);
                tracing::info!(sender = %ingress.sender, ?window, "rate limited");
            }
            Decision::CircuitOpen => tracing::info!(sender = %ingress.sender, target = %chain, "circuit open"),
            Decision::DlpBlocked => {
                tracing::info!(sender = %ingress.sender, violations = ?verdict.violations, "DLP blocked");
            }
        }
        let routable = verdict.routable();
        let record = self.record(ingress, &verdict.payload, verdict.decision, verdict.violations);
        match routable {
            true => Screening::Passed(Passed { target: chain, payload: verdict.payload, record }),
            false => Screening::Refused(Refused { chain, record }),
        }
    }

    /// The gate of every distinct target the policy let messages through to.
    async fn gates(&self, authorized: &[Authorized]) -> Result<BTreeMap<AgentId, TargetGate>, Status> {
        let mut gates = BTreeMap::new();
        for authorized in authorized {
            if let Authorized::To(target) = authorized
                && !gates.contains_key(target)
            {
                let gate = self.broker.store().gate(target, self.broker.circuit()).await.map_err(store_failed)?;
                if !gate.live {
                    tracing::info!(%target, "message not authorized: target has no live session");
                }
                gates.insert(target.clone(), gate);
            }
        }
        Ok(gates)
    }

    /// The audit record of a decision about `payload`.
    fn record(
        &self,
        ingress: &Ingress<'_>,
        payload: &CanonicalPayload,
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
            payload_hash: payload.hash(),
            previous_hash: None,
            sender_id: ingress.sender.to_string(),
            sender_instance_id: Some(ingress.sender_instance.to_string()),
            target_id: ingress.target_id.to_string(),
            timestamp: now.wall.0 as f64 / 1000.0,
            trace_id: ingress.trace.trace_id().map(str::to_string),
            violations,
        }
    }

    /// Records a refusal in its chain, then returns its status — or the store's error if
    /// the refusal could not be recorded (nothing is refused unaudited either).
    pub(super) async fn refuse(&self, refused: Refused) -> Status {
        let Refused { chain, record } = refused;
        let decision = record.decision;
        let admission = Admission { chain: chain.clone(), record, envelope: None };
        let committed = self.broker.store().admit(admission, self.broker.circuit()).await;
        match self.recorded(&chain, committed) {
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

    /// Deny by default, by policy (no store step): the target must be allowlisted, must not
    /// be blocked for the sender, and must be granted (per-agent grant or RBAC role). Whether
    /// it holds a live session is its gate's to say.
    fn authorize(&self, sender: &AgentId, target_id: &str) -> Authorized {
        let denied = |why: &str, chain: &AgentId| {
            tracing::info!(%sender, target = target_id, why, "message not authorized");
            Authorized::Denied { chain: chain.clone() }
        };
        let Some(target) = AgentId::new(target_id).ok().filter(|t| self.broker.agent(t).is_some()) else {
            return denied("target not an allowlisted agent", sender);
        };
        match self.broker.authorize(sender, &target, true) {
            Ok(_) => Authorized::To(target),
            Err(denial) => denied(&format!("{denial:?}"), &target),
        }
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
