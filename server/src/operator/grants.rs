//! The grant calls of the admin API: reading the policy in force and changing one agent's
//! grants through the store-wide overlay (see `crate::broker::Broker::change_grants`).

use mas_core::ids::AgentId;
use mas_core::policy::authz::Grants;
use mas_core::policy::overlay::GrantChange;
use mas_proto::admin::{AgentGrants, ChangeGrantsRequest, ChangeGrantsResponse, GetGrantsRequest, GetGrantsResponse};
use tonic::Status;

use super::detail;
use super::fleet::allowlisted;
use crate::broker::{Broker, GrantChangeError};

pub(super) fn get(broker: &Broker, req: &GetGrantsRequest) -> Result<GetGrantsResponse, Status> {
    // The revision first: the grants read after it include at least that revision.
    let revision = broker.authz_revision();
    let agents = match req.agent_id.as_str() {
        "" => broker.config().agents.keys().cloned().collect(),
        id => vec![allowlisted(broker, id)?],
    };
    let grants = agents.iter().map(|agent| to_proto(agent, broker.grants(agent))).collect();
    Ok(GetGrantsResponse { grants, revision })
}

pub(super) async fn change(broker: &Broker, req: &ChangeGrantsRequest) -> Result<ChangeGrantsResponse, Status> {
    let agent = allowlisted(broker, &req.agent_id)?;
    for target in req.allow.iter().filter(|t| t.as_str() != "*").chain(&req.block) {
        allowlisted(broker, target)?;
    }
    let change = GrantChange {
        allow: req.allow.clone(),
        revoke: req.revoke.clone(),
        block: req.block.clone(),
        unblock: req.unblock.clone(),
        assign_roles: req.assign_roles.clone(),
        unassign_roles: req.unassign_roles.clone(),
    };
    if change.is_empty() {
        return Err(Status::invalid_argument(detail::EMPTY_CHANGE));
    }
    let (revision, grants) = broker.change_grants(&agent, &change).await.map_err(|err| match err {
        GrantChangeError::Store(err) => mas_net::status::store_failed(&err),
        GrantChangeError::Contended => Status::aborted(detail::OVERLAY_CONTENDED),
        GrantChangeError::Unreadable(why) => {
            tracing::error!(%why, "authorization overlay unreadable; grant change refused");
            Status::failed_precondition(detail::OVERLAY_UNREADABLE)
        }
    })?;
    Ok(ChangeGrantsResponse { revision, grants: Some(to_proto(&agent, grants)) })
}

/// A change request as the security chain records it.
pub(super) fn describe(req: &ChangeGrantsRequest) -> serde_json::Value {
    serde_json::json!({
        "agent_id": req.agent_id,
        "allow": req.allow,
        "revoke": req.revoke,
        "block": req.block,
        "unblock": req.unblock,
        "assign_roles": req.assign_roles,
        "unassign_roles": req.unassign_roles,
    })
}

fn to_proto(agent: &AgentId, grants: Grants) -> AgentGrants {
    AgentGrants {
        agent_id: agent.to_string(),
        allowed: grants.allowed.into_iter().collect(),
        blocked: grants.blocked.into_iter().collect(),
        roles: grants.roles.into_iter().collect(),
    }
}
