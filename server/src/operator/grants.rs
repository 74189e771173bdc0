//! The grant calls of the admin API: reading the policy in force and changing one agent's
//! grants through the store-wide overlay (see `crate::broker::Broker::change_grants`).

use mas_core::ids::AgentId;
use mas_core::policy::authz::Grants;
use mas_core::policy::overlay::GrantChange;
use mas_proto::admin::{
    AgentGrants, ApplyPresetRequest, ApplyPresetResponse, ChangeGrantsRequest, ChangeGrantsResponse, GetGrantsRequest,
    GetGrantsResponse,
};
use tonic::Status;

use super::detail;
use super::fleet::allowlisted;
use crate::broker::{Broker, GrantChangeError};
use crate::config::PermissionPreset;

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
    let (revision, grants) = broker.change_grants(&agent, &change).await.map_err(overlay_failed)?;
    Ok(ChangeGrantsResponse { revision, grants: Some(to_proto(&agent, grants)) })
}

pub(super) async fn apply_preset(broker: &Broker, req: &ApplyPresetRequest) -> Result<ApplyPresetResponse, Status> {
    let preset: PermissionPreset = serde_json::from_str(&req.preset_json)
        .map_err(|err| Status::invalid_argument(format!("{}: {err}", detail::INVALID_PRESET)))?;
    preset
        .check(|agent| broker.agent(agent).is_some())
        .map_err(|why| Status::invalid_argument(format!("{}: {} {why}", detail::INVALID_PRESET, preset.kind())))?;
    let (revision, grants) = broker.apply_preset(&preset).await.map_err(overlay_failed)?;
    let grants = grants.into_iter().map(|(agent, grants)| to_proto(&agent, grants)).collect();
    Ok(ApplyPresetResponse { revision, grants })
}

fn overlay_failed(err: GrantChangeError) -> Status {
    match err {
        GrantChangeError::Store(err) => mas_net::status::store_failed(&err),
        GrantChangeError::Contended => Status::aborted(detail::OVERLAY_CONTENDED),
        GrantChangeError::Unreadable(why) => {
            tracing::error!(%why, "authorization overlay unreadable; grant change refused");
            Status::failed_precondition(detail::OVERLAY_UNREADABLE)
        }
    }
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
