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
        let operator = self.operator(&req, "ListDeadLetters")?;
        let req = req.into_inner();
        let listed = dead_letters::list(&self.broker, &req).await?;
        self.record(
            &operator,
            "ListDeadLetters",
            dead_letters::describe(req.selector.as_ref()),
            serde_json::json!({ "letters": listed.letters.len(), "truncated": listed.truncated }),
        );
        Ok(Response::new(listed))
    }

    async fn get_dead_letter(&self, req: Request<GetDeadLetterRequest>) -> Result<Response<DeadLetter>, Status> {
        let operator = self.operator(&req, "GetDeadLetter")?;
        let req = req.into_inner();
        let found = dead_letters::get(&self.broker, &req).await;
        let result = outcome(&found, |_| serde_json::json!({ "found": true }));
        self.record(&operator, "GetDeadLetter", serde_json::json!({ "agent_id": req.agent_id, "id": req.id }), result);
        found.map(Response::new)
    }

    async fn redrive_dead_letters(
        &self,
        req: Request<DeadLetterSelector>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        let operator = self.operator(&req, "RedriveDeadLetters")?;
        let selector = req.into_inner();
        let redriven = dead_letters::redrive(&self.broker, &selector).await;
        let result = outcome(
            &redriven,
            |r| serde_json::json!({ "redriven": r.redriven, "not_found": r.not_found, "queue_full": r.queue_full }),
        );
        self.record(&operator, "RedriveDeadLetters", dead_letters::describe(Some(&selector)), result);
        redriven.map(Response::new)
    }

    async fn purge_dead_letters(
        &self,
        req: Request<DeadLetterSelector>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let operator = self.operator(&req, "PurgeDeadLetters")?;
        let selector = req.into_inner();
        let purged = dead_letters::purge(&self.broker, &selector).await;
        let result = outcome(&purged, |r| serde_json::json!({ "purged": r.purged }));
        self.record(&operator, "PurgeDeadLetters", dead_letters::describe(Some(&selector)), result);
        purged.map(Response::new)
    }

    async fn get_grants(&self, req: Request<GetGrantsRequest>) -> Result<Response<GetGrantsResponse>, Status> {
        let operator = self.operator(&req, "GetGrants")?;
        let req = req.into_inner();
        let found = grants::get(&self.broker, &req);
        let result = outcome(&found, |r| serde_json::json!({ "agents": r.grants.len(), "revision": r.revision }));
        self.record(&operator, "GetGrants", serde_json::json!({ "agent_id": req.agent_id }), result);
        found.map(Response::new)
    }

    async fn change_grants(&self, req: Request<ChangeGrantsRequest>) -> Result<Response<ChangeGrantsResponse>, Status> {
        let operator = self.operator(&req, "ChangeGrants")?;
        let req = req.into_inner();
        let changed = grants::change(&self.broker, &req).await;
        let result = outcome(&changed, |r| serde_json::json!({ "revision": r.revision }));
        self.record(&operator, "ChangeGrants", grants::describe(&req), result);
        if changed.is_ok() {
            tracing::info!(%operator, agent = req.agent_id, "grants changed through the admin API");
        }
        changed.map(Response::new)
    }

    async fn apply_preset(&self, req: Request<ApplyPresetRequest>) -> Result<Response<ApplyPresetResponse>, Status> {
        let operator = self.operator(&req, "ApplyPreset")?;
        let req = req.into_inner();
        let applied = grants::apply_preset(&self.broker, &req).await;
        let request =
            serde_json::from_str(&req.preset_json).unwrap_or(serde_json::Value::String(req.preset_json.clone()));
        let result = outcome(&applied, |r| serde_json::json!({ "revision": r.revision, "agents": r.grants.len() }));
        self.record(&operator, "ApplyPreset", serde_json::json!({ "preset": request }), result);
        applied.map(Response::new)
    }

    async fn list_agents(&self, req: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        let operator = self.operator(&req, "ListAgents")?;
        let req = req.into_inner();
        let listed = fleet::list(&self.broker, &req).await;
        self.record(
            &operator,
            "ListAgents",
            serde_json::json!({ "agent_id": req.agent_id }),
            outcome(&listed, |r| serde_json::json!({ "agents": r.agents.len() })),
        );
        listed.map(Response::new)
    }

    async fn reset_circuit(&self, req: Request<AgentRequest>) -> Result<Response<ResetResponse>, Status> {
        let operator = self.operator(&req, "ResetCircuit")?;
        let req = req.into_inner();
        let reset = fleet::reset_circuit(&self.broker, &req).await;
        self.record(
            &operator,
            "ResetCircuit",
            serde_json::json!({ "agent_id": req.agent_id }),
            outcome(&reset, |r| serde_json::json!({ "had_state": r.had_state })),
        );
        reset.map(Response::new)
    }

    async fn reset_rate_limit(&self, req: Request<AgentRequest>) -> Result<Response<ResetResponse>, Status> {
        let operator = self.operator(&req, "ResetRateLimit")?;
        let req = req.into_inner();
        let reset = fleet::reset_rate(&self.broker, &req).await;
        self.record(
            &operator,
            "ResetRateLimit",
            serde_json::json!({ "agent_id": req.agent_id }),
            outcome(&reset, |r| serde_json::json!({ "had_state": r.had_state })),
        );
        reset.map(Response::new)
    }

    async fn kick_session(&self, req: Request<KickSessionRequest>) -> Result<Response<KickSessionResponse>, Status> {
        let operator = self.operator(&req, "KickSession")?;
        let req = req.into_inner();
        let kicked = fleet::kick(&self.broker, &req).await;
        let request = serde_json::json!({ "agent_id": req.agent_id, "instance_id": req.instance_id });
        self.record(&operator, "KickSession", request, outcome(&kicked, |r| serde_json::json!({ "kicked": r.kicked })));
        kicked.map(Response::new)
    }

    async fn verify_audit(&self, req: Request<VerifyAuditRequest>) -> Result<Response<VerifyAuditResponse>, Status> {
        let operator = self.operator(&req, "VerifyAudit")?;
        let verified = audit::verify(&self.broker).await;
        self.record(
            &operator,
            "VerifyAudit",
            serde_json::json!({}),
            outcome(&verified, |r| serde_json::json!({ "intact": r.intact, "chains": r.chains.len() })),
        );
        verified.map(Response::new)
    }

    async fn query_audit(&self, req: Request<QueryAuditRequest>) -> Result<Response<QueryAuditResponse>, Status> {
        let operator = self.operator(&req, "QueryAudit")?;
        let req = req.into_inner();
        let found = audit::query(&self.broker, &req).await;
        self.record(
            &operator,
            "QueryAudit",
            describe_query(&req),
            outcome(&found, |r| serde_json::json!({ "records": r.records.len() })),
        );
        found.map(Response::new)
    }

    type FollowAuditStream = audit::Follow;

    async fn follow_audit(&self, req: Request<QueryAuditRequest>) -> Result<Response<Self::FollowAuditStream>, Status> {
        let operator = self.operator(&req, "FollowAudit")?;
        let req = req.into_inner();
        let stream = audit::follow(self.broker.clone(), &req);
        self.record(
            &operator,
            "FollowAudit",
            describe_query(&req),
            outcome(&stream, |_| serde_json::json!({ "following": true })),
        );
        stream.map(Response::new)
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
