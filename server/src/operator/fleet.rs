//! The agent calls of the admin API: what each agent looks like from the store and this
//! broker (the status page's snapshot, plus rate-limit usage), and the resets and kicks.

use mas_core::ids::{AgentId, InstanceId};
use mas_proto::admin::{
    AgentRequest, AgentStatus, KickSessionRequest, KickSessionResponse, ListAgentsRequest, ListAgentsResponse,
    ResetResponse, SessionHere,
};
use tonic::Status;

use super::detail;
use crate::broker::Broker;

fn store_failed(err: mas_core::store::StoreError) -> Status {
    mas_net::status::store_failed(&err)
}

/// An allowlisted agent named by a request.
pub(super) fn allowlisted(broker: &Broker, id: &str) -> Result<AgentId, Status> {
    AgentId::new(id)
        .ok()
        .filter(|agent| broker.agent(agent).is_some())
        .ok_or_else(|| Status::invalid_argument(detail::UNKNOWN_AGENT))
}

pub(super) async fn list(broker: &Broker, req: &ListAgentsRequest) -> Result<ListAgentsResponse, Status> {
    if !req.agent_id.is_empty() {
        allowlisted(broker, &req.agent_id)?;
    }
    let snapshot = crate::status::read(broker).await.map_err(store_failed)?;
    let mut agents = Vec::new();
    for agent in snapshot.agents.into_iter().filter(|a| req.agent_id.is_empty() || a.agent_id == req.agent_id) {
        let sessions: Vec<SessionHere> = agent
            .sessions
            .into_iter()
            .map(|s| SessionHere { instance_id: s.instance_id, connected_at: s.connected_at })
            .collect();
        agents.push(AgentStatus {
            agent_id: agent.agent_id,
            sessions_here: sessions.iter().map(|s| s.instance_id.clone()).collect(),
            sessions,
            in_flight_here: agent.in_flight_here,
            queue_depth: agent.queue_depth as u64,
            oldest_age_s: agent.oldest_age_s.unwrap_or(0.0),
            circuit: agent.circuit.to_string(),
            audit_records: agent.audit_records as u64,
            dead_letters: agent.dead_letters as u64,
            rate_minute_used: agent.rate_minute_used,
            rate_hour_used: agent.rate_hour_used,
            rate_per_minute: agent.rate_limits.0,
            rate_per_hour: agent.rate_limits.1,
        });
    }
    Ok(ListAgentsResponse { agents })
}

pub(super) async fn reset_circuit(broker: &Broker, req: &AgentRequest) -> Result<ResetResponse, Status> {
    let agent = allowlisted(broker, &req.agent_id)?;
    let had_state = broker.store().reset_circuit(&agent).await.map_err(store_failed)?;
    Ok(ResetResponse { had_state })
}

pub(super) async fn reset_rate(broker: &Broker, req: &AgentRequest) -> Result<ResetResponse, Status> {
    let agent = allowlisted(broker, &req.agent_id)?;
    let had_state = broker.store().reset_rate(&agent).await.map_err(store_failed)?;
    Ok(ResetResponse { had_state })
}

pub(super) async fn kick(broker: &Broker, req: &KickSessionRequest) -> Result<KickSessionResponse, Status> {
    let agent = allowlisted(broker, &req.agent_id)?;
    let instance = InstanceId::new(&req.instance_id)
        .map_err(|_| Status::invalid_argument(mas_net::status::detail::INVALID_INSTANCE_ID))?;
    let kicked = broker.store().revoke_lease(&agent, &instance).await.map_err(store_failed)?;
    Ok(KickSessionResponse { kicked })
}
