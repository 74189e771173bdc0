//! The SDK's trace spans: a CLIENT span around each call to the broker, with its context in
//! the call's gRPC metadata; a CONSUMER span around each handler, parented on the context the
//! delivered envelope carries, so a reply or a message sent from the handler continues the
//! trace; and a CONSUMER span when a reply reaches the waiting requester. None of it runs
//! while tracing is off (see [`mas_net::telemetry::enabled`]).

use mas_core::envelope::Envelope;
use mas_net::telemetry::{self, WireContext};
use tracing::Span;
use tracing::field::Empty;

/// The CLIENT span of one call (`mas.send`, `mas.request`, …) to `target`.
pub(crate) fn client_span(name: &'static str, agent: &str, target: Option<&str>, message_type: Option<&str>) -> Span {
    if !telemetry::enabled() || !telemetry::should_record(&telemetry::wire_context(&Span::current())) {
        return Span::none();
    }
    tracing::info_span!(
        "mas.client",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = Empty,
        mas.agent_id = agent,
        mas.target_id = target.unwrap_or(""),
        mas.message_type = message_type.unwrap_or(""),
    )
}

/// `message` as a request carrying the current span's trace context.
pub(crate) fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if telemetry::enabled() {
        telemetry::wire_context(&Span::current()).inject(request.metadata_mut());
    }
    request
}

/// The context a delivered envelope carries.
fn carried(envelope: &Envelope) -> WireContext {
    WireContext { traceparent: envelope.meta.traceparent.clone(), tracestate: envelope.meta.tracestate.clone() }
}

/// The CONSUMER span of a handler run for `envelope`.
pub(crate) fn handler_span(agent: &str, envelope: &Envelope) -> Span {
    if !telemetry::enabled() || envelope.meta.traceparent.is_none() || !telemetry::should_record(&carried(envelope)) {
        return Span::none();
    }
    let span = tracing::info_span!(
        "mas.handle",
        otel.name = "mas.handle",
        otel.kind = "consumer",
        otel.status_code = Empty,
        mas.agent_id = agent,
        mas.sender_id = %envelope.sender_id,
        mas.message_type = %envelope.message_type,
        mas.message_id = %envelope.message_id,
        trace_id = Empty,
        span_id = Empty,
    );
    telemetry::set_parent(&span, &carried(envelope));
    telemetry::wire_context(&span).record_ids(&span);
    span
}

/// Records a reply's arrival at the requester: a CONSUMER span, parented on the reply's
/// delivery, that ends at once.
pub(crate) fn reply_received(agent: &str, envelope: &Envelope) {
    if !telemetry::enabled() || envelope.meta.traceparent.is_none() || !telemetry::should_record(&carried(envelope)) {
        return;
    }
    let span = tracing::info_span!(
        "mas.receive",
        otel.name = "mas.receive",
        otel.kind = "consumer",
        mas.agent_id = agent,
        mas.sender_id = %envelope.sender_id,
        mas.message_id = %envelope.message_id,
        mas.correlation_id = envelope.meta.correlation_id.as_deref().unwrap_or(""),
    );
    telemetry::set_parent(&span, &carried(envelope));
}

/// Runs `call` inside its CLIENT `span` (build the request with [`traced`] inside `call`, so
/// it carries the span's context) and marks the span failed if the call fails.
pub(crate) async fn client_call<T, E>(
    span: Span,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    use tracing::Instrument;

    let result = call.instrument(span.clone()).await;
    record_result(&span, &result);
    result
}

/// Marks `span` failed when `result` is an error.
pub(crate) fn record_result<T, E>(span: &Span, result: &Result<T, E>) {
    if result.is_err() && !span.is_none() {
        span.record("otel.status_code", "ERROR");
    }
}
