//! Typed message handlers and the dispatch decision for one delivery.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use mas_core::envelope::Envelope;
use serde::de::DeserializeOwned;

use crate::Agent;

/// What a handler returns on failure; its text becomes the NACK reason.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A received message with its payload decoded into the handler's type.
#[derive(Debug, Clone)]
pub struct Message<T> {
    /// The full envelope (sender, ids, metadata; `data` is the raw payload).
    pub envelope: Envelope,
    /// The payload, decoded.
    pub payload: T,
    /// The agent that received it, for [`Message::reply`].
    receiver: Agent,
}

impl<T> Message<T> {
    /// Answers this message, a request (as the reference's `message.reply(...)`); see
    /// [`Agent::reply`]. A message without a correlation id is refused with
    /// [`crate::AgentError::NotARequest`].
    pub async fn reply(&self, message_type: &str, data: &impl serde::Serialize) -> Result<String, crate::AgentError> {
        self.receiver.reply(&self.envelope, message_type, data).await
    }
}

/// How a delivery ended, as the broker is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ACK.
    Ack,
    /// NACK with a reason; retryable ones are retried with backoff, others dead-lettered.
    Nack {
        /// Why.
        reason: String,
        /// Whether a later attempt may succeed.
        retryable: bool,
    },
}

type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;
type Erased = Arc<dyn Fn(Agent, Envelope) -> BoxFuture + Send + Sync>;

/// Longest handler error text sent as a NACK reason.
const MAX_REASON_LEN: usize = 256;

/// The registered handlers of an agent: one per message type, plus an optional fallback.
#[derive(Clone, Default)]
pub struct Handlers {
    typed: BTreeMap<String, Erased>,
    fallback: Option<Erased>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers")
            .field("typed", &self.typed.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl Handlers {
    /// Registers `handler` for `message_type`, replacing any earlier one. A payload that does
    /// not decode into `T` is NACKed non-retryable (`invalid_payload:…`) and the handler never
    /// runs; a handler error is NACKed retryable (`handler_error:…`).
    pub fn on<T, F, Fut>(&mut self, message_type: &str, handler: F)
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Agent, Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Erased = Arc::new(move |agent, envelope: Envelope| {
            let handler = handler.clone();
            Box::pin(async move {
                let payload = match serde_json::from_value::<T>(serde_json::Value::Object(envelope.data.clone())) {
                    Ok(payload) => payload,
                    Err(err) => return nack(format!("invalid_payload:{err}"), false),
                };
                let message = Message { envelope, payload, receiver: agent.clone() };
                outcome(handler(agent, message).await)
            })
        });
        self.typed.insert(message_type.to_string(), erased);
    }

    /// Registers the handler for message types without a typed handler. Without a fallback
    /// such messages are acknowledged and dropped (as the reference's default `on_message`).
    pub fn fallback<F, Fut>(&mut self, handler: F)
    where
        F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.fallback = Some(Arc::new(move |agent, envelope| {
            let handler = handler.clone();
            Box::pin(async move { outcome(handler(agent, envelope).await) })
        }));
    }

    /// Runs the right handler for `envelope` and says how the delivery ended.
    pub(crate) async fn dispatch(&self, agent: Agent, envelope: Envelope) -> Outcome {
        match self.typed.get(&envelope.message_type).or(self.fallback.as_ref()) {
            Some(handler) => handler(agent, envelope).await,
            None => {
                tracing::debug!(message_type = %envelope.message_type, "no handler; acknowledged");
                Outcome::Ack
            }
        }
    }
}

fn outcome(result: Result<(), HandlerError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Ack,
        Err(err) => nack(format!("handler_error:{err}"), true),
    }
}

fn nack(mut reason: String, retryable: bool) -> Outcome {
    if reason.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    Outcome::Nack { reason, retryable }
}
