//! One span per delivery attempt, parented on the context the envelope carries, open until
//! the attempt is settled (ack, nack, timeout, hand-back), which it records as an event. The
//! envelope goes out with the attempt's own context in `meta.traceparent`, so the receiving
//! handler's span is the attempt's child. Nothing happens while tracing is off.

use std::collections::HashMap;

use mas_core::delivery::{Delivery, EntryId, StoreEffect};
use mas_core::envelope::{traceparent_of, with_traceparent};
use mas_core::ids::AgentId;
use mas_net::telemetry::{self, WireContext};
use tracing::Span;

/// The open delivery spans of one session (at most its delivery window).
#[derive(Default)]
pub(crate) struct DeliveryTraces {
    open: HashMap<EntryId, Span>,
}

impl DeliveryTraces {
    /// Opens the span of attempt `d` to `agent` and returns the envelope to send, carrying
    /// the attempt's context; `None` to send the envelope unchanged (tracing off, or the
    /// message carries no trace).
    pub(crate) fn start(&mut self, agent: &AgentId, d: &Delivery) -> Option<String> {
        if !telemetry::enabled() {
            return None;
        }
        let parent = WireContext { traceparent: Some(traceparent_of(&d.envelope)?.to_string()), tracestate: None };
        if !telemetry::should_record(&parent) {
            return None;
        }
        let span = tracing::info_span!(
            "mas.deliver",
            otel.kind = "producer",
            mas.agent_id = %agent,
            mas.delivery_id = %d.delivery_id,
            mas.message_id = message_id_of(&d.envelope).unwrap_or(""),
            mas.attempt = d.attempt,
        );
        telemetry::set_parent(&span, &parent);
        let own = telemetry::wire_context(&span);
        let retraced = own.traceparent.as_deref().and_then(|tp| with_traceparent(&d.envelope, tp));
        self.open.insert(d.entry.clone(), span);
        retraced
    }

    /// Ends the span of the attempt `effect` settles, with an event saying how.
    pub(crate) fn settled(&mut self, effect: &StoreEffect) {
        if self.open.is_empty() {
            return;
        }
        let Some(span) = self.open.remove(effect.entry()) else { return };
        span.in_scope(|| match effect {
            StoreEffect::Ack { .. } => tracing::info!(event = "ack", "delivery acknowledged"),
            StoreEffect::Requeue { reason, attempt, .. } => {
                tracing::info!(
                    event = "requeue",
                    reason = reason.as_str(),
                    next_attempt = attempt,
                    "delivery requeued"
                );
            }
            StoreEffect::DeadLetter { reason, .. } => {
                tracing::info!(event = "dead_letter", reason = %reason, "delivery dead-lettered");
            }
        });
    }
}

/// The `message_id` of an envelope serialised by `Envelope::to_json`, found without parsing.
fn message_id_of(json: &str) -> Option<&str> {
    const KEY: &str = "\"message_id\":\"";
    let start = json.rfind(KEY)? + KEY.len();
    let len = json[start..].find('"')?;
    Some(&json[start..start + len])
}
