//! The dead-letter calls of the admin API: a selector picks letters from each agent's
//! dead-letter queue as the store lists them, and only ids found in that listing reach a
//! redrive or purge, so a stale or made-up id is simply not found.

use std::time::Duration;

use mas_core::ids::AgentId;
use mas_core::store::{self, Redrive};
use mas_proto::admin::{
    DeadLetter, DeadLetterSelector, GetDeadLetterRequest, ListDeadLettersRequest, ListDeadLettersResponse,
    PurgeDeadLettersResponse, RedriveDeadLettersResponse,
};
use tonic::Status;

use super::detail;
use crate::broker::Broker;

/// Most letters one listing returns.
const MAX_LIST: usize = 1_000;
/// Read the whole of a dead-letter queue (each is bounded by the store).
const WHOLE_QUEUE: usize = 1 << 31;

/// The agents a selector covers and the core selector it means.
fn resolve(
    broker: &Broker,
    selector: Option<&DeadLetterSelector>,
) -> Result<(Vec<AgentId>, store::DeadLetterSelector), Status> {
    let Some(selector) = selector else {
        return Ok((broker.config().agents.keys().cloned().collect(), store::DeadLetterSelector::default()));
    };
    let agents = match selector.agent_id.as_str() {
        "" => broker.config().agents.keys().cloned().collect(),
        id => vec![super::fleet::allowlisted(broker, id)?],
    };
    let core = store::DeadLetterSelector {
        ids: selector.ids.clone(),
        reason: Some(selector.reason.clone()).filter(|r| !r.is_empty()),
        older_than: Some(Duration::from_millis(selector.older_than_ms)).filter(|d| !d.is_zero()),
        all: selector.all,
    };
    Ok((agents, core))
}

/// Whether a selector names its letters explicitly: by agent or by a condition.
fn names_something(selector: &DeadLetterSelector) -> bool {
    !selector.agent_id.is_empty()
        || !selector.ids.is_empty()
        || !selector.reason.is_empty()
        || selector.older_than_ms > 0
        || selector.all
}

/// `agent`'s letters the selector picks, oldest first.
async fn selected(
    broker: &Broker,
    agent: &AgentId,
    selector: &store::DeadLetterSelector,
) -> Result<Vec<store::DeadLetter>, Status> {
    let letters =
        broker.store().dead_letters(agent, WHOLE_QUEUE).await.map_err(|e| mas_net::status::store_failed(&e))?;
    Ok(letters.into_iter().filter(|letter| selector.matches(letter)).collect())
}

/// Listing: a missing or empty selector lists every letter.
pub(super) async fn list(broker: &Broker, req: &ListDeadLettersRequest) -> Result<ListDeadLettersResponse, Status> {
    let (agents, mut selector) = resolve(broker, req.selector.as_ref())?;
    if selector.is_empty() {
        selector.all = true;
    }
    let limit = match req.limit as usize {
        0 => MAX_LIST,
        n => n.min(MAX_LIST),
    };
    let mut letters = Vec::new();
    let mut truncated = false;
    for agent in &agents {
        for letter in selected(broker, agent, &selector).await? {
            if letters.len() == limit {
                truncated = true;
                break;
            }
            letters.push(to_proto(letter, req.include_envelope));
        }
    }
    Ok(ListDeadLettersResponse { letters, truncated })
}

/// One letter with its envelope.
pub(super) async fn get(broker: &Broker, req: &GetDeadLetterRequest) -> Result<DeadLetter, Status> {
    let by_id = DeadLetterSelector { agent_id: req.agent_id.clone(), ids: vec![req.id.clone()], ..Default::default() };
    let (agents, selector) = resolve(broker, Some(&by_id))?;
    for agent in &agents {
        if let Some(letter) = selected(broker, agent, &selector).await?.into_iter().next() {
            return Ok(to_proto(letter, true));
        }
    }
    Err(Status::not_found(detail::DEAD_LETTER_NOT_FOUND))
}

/// Redrives what the selector picks; ids asked for and not found are counted.
pub(super) async fn redrive(broker: &Broker, req: &DeadLetterSelector) -> Result<RedriveDeadLettersResponse, Status> {
    if !names_something(req) {
        return Err(Status::invalid_argument(detail::EMPTY_SELECTOR));
    }
    let (agents, mut selector) = resolve(broker, Some(req))?;
    selector.all |= selector.is_empty();
    let mut response = RedriveDeadLettersResponse::default();
    let mut found = 0;
    for agent in &agents {
        let ids: Vec<String> = selected(broker, agent, &selector).await?.into_iter().map(|l| l.id).collect();
        found += ids.len();
        for outcome in
            broker.store().redrive_dead_letters(agent, &ids).await.map_err(|e| mas_net::status::store_failed(&e))?
        {
            match outcome {
                Redrive::Queued(_) => response.redriven += 1,
                Redrive::NotFound => response.not_found += 1,
                Redrive::QueueFull => response.queue_full += 1,
            }
        }
    }
    response.not_found += count(req.ids.len().saturating_sub(found));
    Ok(response)
}

/// Purges what the selector picks.
pub(super) async fn purge(broker: &Broker, req: &DeadLetterSelector) -> Result<PurgeDeadLettersResponse, Status> {
    if !names_something(req) {
        return Err(Status::invalid_argument(detail::EMPTY_SELECTOR));
    }
    let (agents, mut selector) = resolve(broker, Some(req))?;
    selector.all |= selector.is_empty();
    let mut purged = 0;
    for agent in &agents {
        let ids: Vec<String> = selected(broker, agent, &selector).await?.into_iter().map(|l| l.id).collect();
        purged +=
            broker.store().purge_dead_letters(agent, &ids).await.map_err(|e| mas_net::status::store_failed(&e))?;
    }
    Ok(PurgeDeadLettersResponse { purged: count(purged) })
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A selector as the security chain records it.
pub(super) fn describe(selector: Option<&DeadLetterSelector>) -> serde_json::Value {
    let Some(s) = selector else { return serde_json::json!({}) };
    serde_json::json!({
        "agent_id": s.agent_id,
        "ids": s.ids,
        "reason": s.reason,
        "older_than_ms": s.older_than_ms,
        "all": s.all,
    })
}

fn to_proto(letter: store::DeadLetter, include_envelope: bool) -> DeadLetter {
    let envelope: serde_json::Value = serde_json::from_str(&letter.envelope).unwrap_or_default();
    let field = |name: &str| envelope.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    DeadLetter {
        agent_id: letter.agent.to_string(),
        id: letter.id,
        reason: letter.reason,
        attempts: letter.attempts,
        age_ms: u64::try_from(letter.age.as_millis()).unwrap_or(u64::MAX),
        message_id: field("message_id"),
        sender_id: field("sender_id"),
        message_type: field("message_type"),
        envelope_json: if include_envelope { letter.envelope.to_string() } else { String::new() },
    }
}
