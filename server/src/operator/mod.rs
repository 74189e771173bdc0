//! The operator plane: `mas.admin.v1.AdminService` on the broker's port.
//!
//! Only a client whose certificate names an operator (`spiffe://mas/operator/{name}`) listed in
//! `admin.operators` may call it; agents never can, and an operator is never an agent (the
//! agent services refuse its certificate). Every allowed call is recorded in the security
//! chain as `admin_call` with the operator, the method, what was asked and what it did; every
//! refused one as `admin_denied` (repeats within 10 s counted, as for authentication denials).
//!
//! This file authenticates and records; each area's calls live in their own module:
//! `dead_letters`, `grants` (the store-wide overlay), `fleet` (agents, circuits, rate limits,
//! sessions), `audit` (verify, query, follow). `cli` is `mas admin`.

mod audit;
pub mod cli;
mod dead_letters;
mod fleet;
mod grants;

use std::collections::BTreeSet;
use std::sync::Arc;

use mas_net::identity::{OperatorId, Principal};
use mas_proto::admin::admin_service_server::AdminService;
use mas_proto::admin::{
    AgentRequest, ApplyPresetRequest, ApplyPresetResponse, ChangeGrantsRequest, ChangeGrantsResponse, DeadLetter,
    DeadLetterSelector, GetDeadLetterRequest, GetGrantsRequest, GetGrantsResponse, KickSessionRequest,
    KickSessionResponse, ListAgentsRequest, ListAgentsResponse, ListDeadLettersRequest, ListDeadLettersResponse,
    PurgeDeadLettersResponse, QueryAuditRequest, QueryAuditResponse, RedriveDeadLettersResponse, ResetResponse,
    VerifyAuditRequest, VerifyAuditResponse,
};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::broker::Broker;

pub use mas_proto::admin::admin_service_server::AdminServiceServer;

/// Status details of the admin API.
pub mod detail {
    /// The certificate names an agent, not an operator.
    pub const NOT_AN_OPERATOR: &str = "not_an_operator";
    /// The operator is not in `admin.operators`.
    pub const OPERATOR_NOT_ALLOWED: &str = "operator_not_allowed";
    /// A redrive or purge selected nothing explicitly (no condition and no `all`).
    pub const EMPTY_SELECTOR: &str = "empty_selector";
    /// The selector names an agent that is not allowlisted.
    pub const UNKNOWN_AGENT: &str = "unknown_agent";
    /// No dead letter with that id.
    pub const DEAD_LETTER_NOT_FOUND: &str = "dead_letter_not_found";
    /// A grant change that changes nothing.
    pub const EMPTY_CHANGE: &str = "empty_change";
    /// Other grant changes kept landing first; nothing was changed.
    pub const OVERLAY_CONTENDED: &str = "authz_overlay_contended";
    /// The stored overlay does not parse; nothing was changed.
    pub const OVERLAY_UNREADABLE: &str = "authz_overlay_unreadable";
    /// A preset that does not parse or names an agent that is not allowlisted.
    pub const INVALID_PRESET: &str = "invalid_preset";
    /// An audit query names no known decision.
    pub const UNKNOWN_DECISION: &str = "unknown_decision";
}

/// The admin gRPC service over one broker.
#[derive(Clone)]
pub struct Admin {
    broker: Arc<Broker>,
    operators: Arc<BTreeSet<String>>,
}

impl Admin {
    /// The service for `broker`, allowing its configured operators.
    pub fn new(broker: Arc<Broker>) -> Admin {
        let operators = broker.config().admin.operators.iter().cloned().collect();
        Admin { broker, operators: Arc::new(operators) }
    }

    /// The calling operator, or the refusal (recorded in the security chain).
    fn operator<T>(&self, req: &Request<T>, method: &str) -> Result<OperatorId, Status> {
        let refuse = |key: String, details: serde_json::Value, status: Status| {
            let now = self.broker.clock().now();
            if self.broker.audit().denial(&key, "admin_denied", details, now) {
                tracing::warn!(
                    method,
                    reason = status.message(),
                    "admin call refused (repeats within 10 s are counted)"
                );
            }
            Err(status)
        };
        match mas_net::identity::peer_principal(req) {
            Ok(Principal::Operator(operator)) if self.operators.contains(operator.as_str()) => Ok(operator),
            Ok(Principal::Operator(operator)) => refuse(
                format!("admin/{}/{operator}", detail::OPERATOR_NOT_ALLOWED),
                serde_json::json!({ "operator": operator.as_str(), "method": method, "reason": detail::OPERATOR_NOT_ALLOWED }),
                Status::permission_denied(detail::OPERATOR_NOT_ALLOWED),
            ),
            Ok(Principal::Agent(agent)) => refuse(
                format!("admin/{}/{agent}", detail::NOT_AN_OPERATOR),
                serde_json::json!({ "agent": agent.as_str(), "method": method, "reason": detail::NOT_AN_OPERATOR }),
                Status::permission_denied(detail::NOT_AN_OPERATOR),
            ),
            Err(err) => refuse(
                format!("admin/{err}"),
                serde_json::json!({ "method": method, "reason": err.to_string() }),
                mas_net::status::identity_denied(err),
            ),
        }
    }

    /// Records an allowed call and what it did.
    fn record(&self, operator: &OperatorId, method: &str, request: serde_json::Value, result: serde_json::Value) {
        let details = serde_json::json!({
            "operator": operator.as_str(),
            "method": method,
            "request": request,
            "result": result,
        });
        self.broker.audit().security_event("admin_call", details, self.broker.clock().now().wall);
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "ListDeadLetters",
            |r| dead_letters::describe(r.selector.as_ref()),
            |r| async move { dead_letters::list(broker, &r).await },
            |r| json!({ "letters": r.letters.len(), "truncated": r.truncated }),
        )
        .await
    }

    async fn get_dead_letter(&self, req: Request<GetDeadLetterRequest>) -> Result<Response<DeadLetter>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "GetDeadLetter",
            |r| json!({ "agent_id": r.agent_id, "id": r.id }),
            |r| async move { dead_letters::get(broker, &r).await },
            |_| json!({ "found": true }),
        )
        .await
    }

    async fn redrive_dead_letters(
        &self,
        req: Request<DeadLetterSelector>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "RedriveDeadLetters",
            |r| dead_letters::describe(Some(r)),
            |r| async move { dead_letters::redrive(broker, &r).await },
            |r| json!({ "redriven": r.redriven, "not_found": r.not_found, "queue_full": r.queue_full }),
        )
        .await
    }

    async fn purge_dead_letters(
        &self,
        req: Request<DeadLetterSelector>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "PurgeDeadLetters",
            |r| dead_letters::describe(Some(r)),
            |r| async move { dead_letters::purge(broker, &r).await },
            |r| json!({ "purged": r.purged }),
        )
        .await
    }

    async fn get_grants(&self, req: Request<GetGrantsRequest>) -> Result<Response<GetGrantsResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "GetGrants",
            |r| json!({ "agent_id": r.agent_id }),
            |r| async move { grants::get(broker, &r) },
            |r| json!({ "agents": r.grants.len(), "revision": r.revision }),
        )
        .await
    }

    async fn change_grants(&self, req: Request<ChangeGrantsRequest>) -> Result<Response<ChangeGrantsResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "ChangeGrants",
            grants::describe,
            |r| async move {
                let changed = grants::change(broker, &r).await?;
                tracing::info!(agent = r.agent_id, revision = changed.revision, "grants changed through the admin API");
                Ok(changed)
            },
            |r| json!({ "revision": r.revision }),
        )
        .await
    }

    async fn apply_preset(&self, req: Request<ApplyPresetRequest>) -> Result<Response<ApplyPresetResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "ApplyPreset",
            |r| json!({ "preset": serde_json::from_str(&r.preset_json).unwrap_or(json!(r.preset_json)) }),
            |r| async move { grants::apply_preset(broker, &r).await },
            |r| json!({ "revision": r.revision, "agents": r.grants.len() }),
        )
        .await
    }

    async fn list_agents(&self, req: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "ListAgents",
            |r| json!({ "agent_id": r.agent_id }),
            |r| async move { fleet::list(broker, &r).await },
            |r| json!({ "agents": r.agents.len() }),
        )
        .await
    }

    async fn reset_circuit(&self, req: Request<AgentRequest>) -> Result<Response<ResetResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "ResetCircuit",
            |r| json!({ "agent_id": r.agent_id }),
            |r| async move { fleet::reset_circuit(broker, &r).await },
            |r| json!({ "had_state": r.had_state }),
        )
        .await
    }

    async fn reset_rate_limit(&self, req: Request<AgentRequest>) -> Result<Response<ResetResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "ResetRateLimit",
            |r| json!({ "agent_id": r.agent_id }),
            |r| async move { fleet::reset_rate(broker, &r).await },
            |r| json!({ "had_state": r.had_state }),
        )
        .await
    }

    async fn kick_session(&self, req: Request<KickSessionRequest>) -> Result<Response<KickSessionResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "KickSession",
            |r| json!({ "agent_id": r.agent_id, "instance_id": r.instance_id }),
            |r| async move { fleet::kick(broker, &r).await },
            |r| json!({ "kicked": r.kicked }),
        )
        .await
    }

    async fn verify_audit(&self, req: Request<VerifyAuditRequest>) -> Result<Response<VerifyAuditResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "VerifyAudit",
            |_| json!({}),
            |_| async move { audit::verify(broker).await },
            |r| json!({ "intact": r.intact, "chains": r.chains.len() }),
        )
        .await
    }

    async fn query_audit(&self, req: Request<QueryAuditRequest>) -> Result<Response<QueryAuditResponse>, Status> {
        let broker = &self.broker;
        self.audited(
            req,
            "QueryAudit",
            describe_query,
            |r| async move { audit::query(broker, &r).await },
            |r| json!({ "records": r.records.len() }),
        )
        .await
    }

    type FollowAuditStream = audit::Follow;

    async fn follow_audit(&self, req: Request<QueryAuditRequest>) -> Result<Response<Self::FollowAuditStream>, Status> {
        let broker = self.broker.clone();
        self.audited(
            req,
            "FollowAudit",
            describe_query,
            |r| async move { audit::follow(broker, &r) },
            |_| json!({ "following": true }),
        )
        .await
    }
}

impl Admin {
    /// Runs one admin call: the caller must be an allowed operator (else refused and recorded),
    /// then `run` answers, and the call — `describe` of the request, `summarize` of the answer
    /// or the refusal — goes into the security chain whether it succeeded or not.
    async fn audited<Req, Resp, Fut>(
        &self,
        req: Request<Req>,
        method: &'static str,
        describe: impl FnOnce(&Req) -> serde_json::Value,
        run: impl FnOnce(Req) -> Fut,
        summarize: impl FnOnce(&Resp) -> serde_json::Value,
    ) -> Result<Response<Resp>, Status>
    where
        Fut: Future<Output = Result<Resp, Status>>,
    {
        let operator = self.operator(&req, method)?;
        let req = req.into_inner();
        let request = describe(&req);
        let answer = run(req).await;
        self.record(&operator, method, request, outcome(&answer, summarize));
        answer.map(Response::new)
    }
}

/// What a call did, for the security chain: `ok` applied to its answer, or its refusal.
fn outcome<T>(result: &Result<T, Status>, ok: impl FnOnce(&T) -> serde_json::Value) -> serde_json::Value {
    match result {
        Ok(answer) => ok(answer),
        Err(status) => serde_json::json!({ "error": status.message() }),
    }
}

fn describe_query(req: &QueryAuditRequest) -> serde_json::Value {
    serde_json::json!({
        "sender": req.sender,
        "target": req.target,
        "decision": req.decision,
        "since": req.since,
        "until": req.until,
        "limit": req.limit,
    })
}
