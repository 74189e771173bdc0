//! The broker's trace spans: one SERVER span per RPC (parented on the caller's
//! `traceparent`), an admission span carrying the decision, and the ingress context that a
//! message carries on in its envelope. No span is created while tracing is off.

use mas_net::telemetry::{self, WireContext};
use tonic::Request;
use tracing::Span;
use tracing::field::Empty;

use crate::metrics::Method;

/// The span name of an RPC: `mas.rpc.{method}`.
fn span_name(method: Method) -> &'static str {
    match method {
        Method::send => "mas.rpc.send",
        Method::send_batch => "mas.rpc.send_batch",
        Method::request => "mas.rpc.request",
        Method::reply => "mas.rpc.reply",
        Method::transport => "mas.rpc.transport",
        Method::discover => "mas.rpc.discover",
        Method::get_state => "mas.rpc.get_state",
        Method::update_state => "mas.rpc.update_state",
        Method::reset_state => "mas.rpc.reset_state",
    }
}

/// Reads the caller's trace context from the request's metadata and keeps it in the request's
/// extensions (see [`ingress_context`]); returns the RPC's SERVER span, a child of that
/// context (`Span::none()` while tracing is off).
pub(super) fn rpc_span<T>(method: Method, request: &mut Request<T>) -> Span {
    let caller = WireContext::from_metadata(request.metadata());
    let span = match telemetry::should_record(&caller) {
        true => tracing::info_span!(
            "mas.rpc",
            otel.name = span_name(method),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.grpc.status_code = Empty,
            mas.sender_id = Empty,
            mas.target_id = Empty,
            mas.message_type = Empty,
            mas.agent_id = Empty,
            mas.instance_id = Empty,
            trace_id = Empty,
            span_id = Empty,
        ),
        false => Span::none(),
    };
    if !span.is_none() {
        telemetry::set_parent(&span, &caller);
        telemetry::wire_context(&span).record_ids(&span);
    }
    if caller.traceparent.is_some() {
        request.extensions_mut().insert(caller);
    }
    span
}

/// The trace context a message admitted by this RPC carries: the RPC span's when tracing is
/// on, else the caller's as it came (passed through, so a traced client still sees its trace
/// continue on the receiving side of a broker that records nothing).
pub(super) fn ingress_context<T>(request: &Request<T>) -> WireContext {
    if telemetry::enabled() {
        let own = telemetry::wire_context(&Span::current());
        if own.traceparent.is_some() {
            return own;
        }
    }
    request.extensions().get::<WireContext>().cloned().unwrap_or_default()
}

/// Records the parties of the current RPC on its span.
pub(super) fn record_parties(sender: &str, instance: &str, target: Option<&str>, message_type: Option<&str>) {
    if !telemetry::enabled() {
        return;
    }
    let span = Span::current();
    span.record("mas.sender_id", sender);
    span.record("mas.agent_id", sender);
    span.record("mas.instance_id", instance);
    if let Some(target) = target {
        span.record("mas.target_id", target);
    }
    if let Some(message_type) = message_type {
        span.record("mas.message_type", message_type);
    }
}

/// The span of one message's admission; its `mas.decision` is recorded when the decision is
/// committed.
pub(super) fn admission_span() -> Span {
    // Only inside a recorded RPC span: never the root of a trace of its own.
    match telemetry::enabled() && !Span::current().is_none() {
        true => tracing::info_span!("mas.admission", otel.kind = "internal", mas.decision = Empty),
        false => Span::none(),
    }
}

/// Records the RPC's outcome on its span.
pub(super) fn record_status(span: &Span, code: tonic::Code) {
    if span.is_none() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}
