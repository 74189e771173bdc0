//! Typed, revisioned agent state.
//!
//! The broker stores a flat map of field → JSON text per agent id, with a revision. This
//! keeps a typed copy `T` locally: every update is checked against `T` *before* anything is
//! sent, only the fields it touches are written, and the write is compare-and-set on the
//! revision this copy was read at. A conflict leaves the local copy unchanged; call
//! [`TypedState::refresh`] and retry.

use std::collections::BTreeMap;

use mas_proto::runtime::{GetStateRequest, ResetStateRequest, UpdateStateRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Agent, AgentError};

/// A typed view of the agent's state. `T`'s fields are the state's fields.
#[derive(Debug, Clone)]
pub struct TypedState<T> {
    agent: Agent,
    value: T,
    revision: u64,
}

impl<T: Serialize + DeserializeOwned + Default> TypedState<T> {
    /// Reads the state. Fields never written take `T`'s defaults; a stored value that does not
    /// fit `T` is an error (persisted state is never silently reset).
    pub async fn load(agent: &Agent) -> Result<Self, AgentError> {
        let (value, revision) = read::<T>(agent).await?;
        Ok(TypedState { agent: agent.clone(), value, revision })
    }

    /// The local copy.
    pub fn get(&self) -> &T {
        &self.value
    }

    /// The revision the local copy was read or written at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Re-reads the state from the broker.
    pub async fn refresh(&mut self) -> Result<(), AgentError> {
        (self.value, self.revision) = read::<T>(&self.agent).await?;
        Ok(())
    }

    /// Sets the fields in `updates`. Rejected before sending if a field is unknown to `T` or
    /// the result does not fit `T`; refused with `ABORTED state_revision_conflict` if someone
    /// wrote since this copy's revision (the local copy is then unchanged).
    pub async fn update(&mut self, updates: Map<String, Value>) -> Result<u64, AgentError> {
        let mut merged = match serde_json::to_value(&self.value) {
            Ok(Value::Object(map)) => map,
            _ => return Err(AgentError::State("the state type must serialise to a JSON object".into())),
        };
        let unknown: Vec<&String> = updates.keys().filter(|k| !merged.contains_key(*k)).collect();
        if !unknown.is_empty() {
            return Err(AgentError::State(format!("unknown state field(s): {unknown:?}")));
        }
        merged.extend(updates.clone());
        let value: T = serde_json::from_value(Value::Object(merged)).map_err(|e| AgentError::State(e.to_string()))?;
        let encoded: BTreeMap<String, String> = updates.into_iter().map(|(k, v)| (k, v.to_string())).collect();
        let request =
            UpdateStateRequest { updates: encoded.into_iter().collect(), expected_revision: Some(self.revision) };
        let mut client = self.agent.client();
        let span = crate::trace::client_span("mas.update_state", self.agent.agent_id().as_str(), None, None);
        let call = async { client.update_state(crate::trace::traced(request)).await.map_err(AgentError::Rpc) };
        let revision = crate::trace::client_call(span, call).await?.into_inner().revision;
        self.value = value;
        self.revision = revision;
        Ok(revision)
    }

    /// Resets to `T::default()` (compare-and-set on the current revision).
    pub async fn reset(&mut self) -> Result<u64, AgentError> {
        let defaults = T::default();
        let mut client = self.agent.client();
        let request = ResetStateRequest { expected_revision: Some(self.revision) };
        let span = crate::trace::client_span("mas.reset_state", self.agent.agent_id().as_str(), None, None);
        let call = async { client.reset_state(crate::trace::traced(request)).await.map_err(AgentError::Rpc) };
        let revision = crate::trace::client_call(span, call).await?.into_inner().revision;
        self.value = defaults;
        self.revision = revision;
        Ok(revision)
    }
}

async fn read<T: Serialize + DeserializeOwned + Default>(agent: &Agent) -> Result<(T, u64), AgentError> {
    let mut client = agent.client();
    let span = crate::trace::client_span("mas.get_state", agent.agent_id().as_str(), None, None);
    let call = async { client.get_state(crate::trace::traced(GetStateRequest {})).await.map_err(AgentError::Rpc) };
    let response = crate::trace::client_call(span, call).await?.into_inner();
    let mut fields = match serde_json::to_value(T::default()) {
        Ok(Value::Object(map)) => map,
        _ => return Err(AgentError::State("the state type must serialise to a JSON object".into())),
    };
    for (field, text) in response.state {
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| AgentError::State(format!("stored field {field:?} is not JSON: {e}")))?;
        fields.insert(field, value);
    }
    let value = serde_json::from_value(Value::Object(fields)).map_err(|e| AgentError::State(e.to_string()))?;
    Ok((value, response.revision))
}
