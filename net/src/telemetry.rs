//! Distributed tracing shared by the broker and the agent SDK: the `telemetry` settings, the
//! OTLP pipeline (W3C trace context, parent-based ratio sampling), and carrying the context
//! in gRPC metadata and in an envelope's `meta.traceparent` / `meta.tracestate`.
//!
//! Off by default and free when off: every span site asks [`enabled`] first and creates no
//! span at all otherwise (one relaxed atomic load). Under madsim nothing is exported and
//! [`enabled`] is always false, so simulated runs stay deterministic; only the pass-through of
//! a caller's `traceparent` header (plain string handling) works in both modes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;

/// The gRPC metadata keys of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// Transport of the OTLP exporter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// OTLP over gRPC (collector port 4317).
    #[default]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (collector port 4318, path `/v1/traces`).
    Http,
}

/// The `telemetry` section of the broker's configuration and of an agent's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Where spans go, e.g. `http://127.0.0.1:4317` (gRPC) or
    /// `http://127.0.0.1:4318/v1/traces` (HTTP). Absent: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// `grpc` (default) or `http`.
    pub protocol: Protocol,
    /// The `service.name` resource attribute (default: `mas-broker` for the broker,
    /// `mas-agent-{id}` for an agent).
    pub service_name: Option<String>,
    /// Share of new traces recorded (0.0–1.0, default 1.0). Parent-based: a span whose caller
    /// sampled (or dropped) its trace follows that decision, so traces are never cut in half.
    pub sample_ratio: f64,
    /// Extra headers or gRPC metadata on every export (e.g. an API key).
    pub headers: BTreeMap<String, String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            protocol: Protocol::Grpc,
            service_name: None,
            sample_ratio: 1.0,
            headers: BTreeMap::new(),
        }
    }
}

impl TelemetrySettings {
    /// Checks what serde cannot: the ratio's range and the header names.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!("telemetry.sample_ratio must be between 0 and 1, not {}", self.sample_ratio));
        }
        if let Some(name) = self.headers.keys().find(|k| k.is_empty() || !k.bytes().all(is_header_char)) {
            return Err(format!("telemetry.headers: {name:?} is not a valid header name"));
        }
        Ok(())
    }
}

fn is_header_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `sample_ratio` as `f64` bits.
static RATIO_BITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether spans are being recorded in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether a span with this parent context should be recorded: a caller's decision (the
/// `sampled` flag) is followed; without a caller, a new trace is started with probability
/// `sample_ratio`. Deciding before the span exists is what makes a low ratio cheap: an
/// unsampled message creates no span objects at all, not just none that are exported.
pub fn should_record(parent: &WireContext) -> bool {
    if !enabled() {
        return false;
    }
    match parent.traceparent.as_deref() {
        Some(tp) => sampled_flag(tp),
        None => draw(f64::from_bits(RATIO_BITS.load(Ordering::Relaxed))),
    }
}

/// The `sampled` bit of a well-formed `traceparent`.
fn sampled_flag(traceparent: &str) -> bool {
    u8::from_str_radix(traceparent.get(53..55).unwrap_or("00"), 16).is_ok_and(|flags| flags & 1 == 1)
}

/// True with probability `ratio`: a counter hashed with a per-process random key.
fn draw(ratio: f64) -> bool {
    use std::hash::{BuildHasher, RandomState};
    static KEY: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hash = KEY.get_or_init(RandomState::new).hash_one(n);
    (hash >> 11) as f64 / (1u64 << 53) as f64 <= ratio
}

/// A W3C trace context as carried on the wire: the `traceparent` and `tracestate` values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireContext {
    /// `00-{trace id}-{parent span id}-{flags}`.
    pub traceparent: Option<String>,
    /// Vendor state, passed on unchanged.
    pub tracestate: Option<String>,
}

impl WireContext {
    /// The context a caller sent in gRPC metadata (only a well-formed `traceparent` is kept).
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Self {
        let get = |key| metadata.get(key).and_then(|v| v.to_str().ok());
        let traceparent = get(TRACEPARENT).filter(|tp| is_traceparent(tp)).map(str::to_string);
        let tracestate = traceparent.as_ref().and(get(TRACESTATE)).map(str::to_string);
        WireContext { traceparent, tracestate }
    }

    /// The 32 hex digits of the trace id, if there is a well-formed context.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent.as_deref().filter(|tp| is_traceparent(tp)).and_then(|tp| tp.get(3..35))
    }

    /// The 16 hex digits of the parent (for a span's own context: the span's) id.
    pub fn span_id(&self) -> Option<&str> {
        self.traceparent.as_deref().filter(|tp| is_traceparent(tp)).and_then(|tp| tp.get(36..52))
    }

    /// Records this context's `trace_id` and `span_id` on `span` (fields declared on it), so
    /// every log line inside the span names them.
    pub fn record_ids(&self, span: &tracing::Span) {
        if let (Some(trace_id), Some(span_id)) = (self.trace_id(), self.span_id()) {
            span.record("trace_id", trace_id);
            span.record("span_id", span_id);
        }
    }

    /// Adds the context to outgoing gRPC metadata.
    pub fn inject(&self, metadata: &mut tonic::metadata::MetadataMap) {
        let mut put = |key, value: &Option<String>| {
            if let Some(v) = value.as_deref().and_then(|v| v.parse().ok()) {
                metadata.insert(key, v);
            }
        };
        put(TRACEPARENT, &self.traceparent);
        put(TRACESTATE, &self.tracestate);
    }
}

/// Whether `value` is a version-00 `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex, with a
/// non-zero trace id and parent id.
pub fn is_traceparent(value: &str) -> bool {
    let b = value.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |r: std::ops::Range<usize>| b[r].iter().any(|&c| c != b'0');
    b.len() == 55
        && value.starts_with("00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && nonzero(3..35)
        && nonzero(36..52)
}

#[cfg(not(madsim))]
pub use real::*;

#[cfg(not(madsim))]
mod real {
    use super::*;

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer as _;

    /// Why the tracing pipeline could not start.
    #[derive(Debug, thiserror::Error)]
    pub enum TelemetryError {
        /// A setting is out of range.
        #[error("{0}")]
        Invalid(String),
        /// The exporter could not be built (e.g. a malformed endpoint).
        #[error("cannot build the OTLP exporter: {0}")]
        Exporter(String),
    }

    /// Keeps the pipeline running; dropping it flushes the spans still buffered.
    pub struct TelemetryGuard {
        provider: SdkTracerProvider,
    }

    impl Drop for TelemetryGuard {
        fn drop(&mut self) {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(err) = self.provider.shutdown() {
                eprintln!("telemetry: flushing spans at exit failed: {err}");
            }
        }
    }

    /// Starts the OTLP pipeline and returns the `tracing` layer that feeds it (add it to the
    /// process's subscriber) with its guard; `None` when no endpoint is configured. Must be
    /// called inside a tokio runtime (the batch exporter runs on it).
    pub fn start<S>(
        settings: &TelemetrySettings,
        default_service: &str,
    ) -> Result<Option<(impl tracing_subscriber::Layer<S> + use<S>, TelemetryGuard)>, TelemetryError>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let Some(endpoint) = &settings.otlp_endpoint else { return Ok(None) };
        settings.validate().map_err(TelemetryError::Invalid)?;
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let exporter = match settings.protocol {
            Protocol::Grpc => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &settings.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|e| TelemetryError::Invalid(format!("telemetry.headers {k:?}: {e}")))?;
                    let value = v
                        .parse()
                        .map_err(|_| TelemetryError::Invalid(format!("telemetry.headers {k:?}: bad value")))?;
                    metadata.insert(key, value);
                }
                builder.with_tonic().with_endpoint(endpoint).with_metadata(metadata).build()
            }
            Protocol::Http => builder
                .with_http()
                .with_endpoint(endpoint)
                .with_headers(settings.headers.clone().into_iter().collect())
                .build(),
        }
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let service = settings.service_name.clone().unwrap_or_else(|| default_service.to_string());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            // Roots are chosen by `should_record` before they exist; the SDK records those and
            // follows the parent's flag for the rest.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
            .build();
        let tracer = provider.tracer("mas");
        RATIO_BITS.store(settings.sample_ratio.to_bits(), Ordering::Relaxed);
        ENABLED.store(true, Ordering::Relaxed);
        // Only our own spans (and the events inside them): without this filter every trace-level
        // event of h2, hyper and tonic reached the layer, which cost five times the broker's
        // own work per message.
        let ours = tracing_subscriber::filter::Targets::new()
            .with_target("mas_server", tracing::Level::INFO)
            .with_target("mas_agent", tracing::Level::INFO);
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours);
        Ok(Some((layer, TelemetryGuard { provider })))
    }

    /// Installs the process's global `tracing` subscriber: log lines to stderr (coloured only
    /// when it is a terminal), filtered by `RUST_LOG` (else `default_filter`; lines inside a
    /// traced RPC or handler name its `trace_id`), plus the OTLP layer when `settings` names an endpoint (spans are exported
    /// whatever `RUST_LOG` says). Keep the returned guard alive; dropping it flushes. Call once,
    /// inside a tokio runtime.
    pub fn install(
        settings: Option<&TelemetrySettings>,
        default_service: &str,
        default_filter: &str,
    ) -> Result<Option<TelemetryGuard>, TelemetryError> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::{EnvFilter, Layer};

        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
        // Colours only on a terminal: a log redirected to a file or a collector must be plain.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter);
        let (otel, guard) = match settings.map(|s| start(s, default_service)).transpose()?.flatten() {
            Some((layer, guard)) => (Some(layer), Some(guard)),
            None => (None, None),
        };
        tracing_subscriber::registry().with(fmt).with(otel).init();
        Ok(guard)
    }

    /// Makes `parent` (from the wire) the parent of `span`. A span without a valid parent
    /// starts a new trace (subject to sampling).
    pub fn set_parent(span: &tracing::Span, parent: &WireContext) {
        if parent.traceparent.is_none() {
            return;
        }
        let _ = span.set_parent(extract(parent));
    }

    /// The wire form of `span`'s context: what a message sent under it carries. Empty when
    /// the span records nothing (tracing off, or not sampled: then the caller's context, if
    /// any, is passed on by the caller instead).
    pub fn wire_context(span: &tracing::Span) -> WireContext {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return WireContext::default();
        }
        let mut carrier = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        WireContext {
            traceparent: carrier.remove(TRACEPARENT),
            tracestate: carrier.remove(TRACESTATE).filter(|s| !s.is_empty()),
        }
    }

    fn extract(wire: &WireContext) -> opentelemetry::Context {
        let mut carrier = std::collections::HashMap::new();
        if let Some(tp) = &wire.traceparent {
            carrier.insert(TRACEPARENT.to_string(), tp.clone());
        }
        if let Some(ts) = &wire.tracestate {
            carrier.insert(TRACESTATE.to_string(), ts.clone());
        }
        TraceContextPropagator::new().extract(&carrier)
    }
}

/// Under madsim tracing is never on: parents are ignored and spans carry no context.
#[cfg(madsim)]
mod sim {
    use super::WireContext;

    /// No-op: nothing is recorded under simulation.
    pub fn set_parent(_span: &tracing::Span, _parent: &WireContext) {}

    /// Always empty under simulation.
    pub fn wire_context(_span: &tracing::Span) -> WireContext {
        WireContext::default()
    }
}

#[cfg(madsim)]
pub use sim::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_kept() {
        assert!(is_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), "zero trace id");
        assert!(!is_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"), "zero parent");
        assert!(!is_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), "upper case");
        assert!(!is_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"));
        assert!(!is_traceparent("garbage"));
        assert!(!is_traceparent(""));
    }

    #[test]
    fn trace_id_is_the_second_field() {
        let wire = WireContext {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
        };
        assert_eq!(wire.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(wire.span_id(), Some("00f067aa0ba902b7"));
        let short = WireContext { traceparent: Some("00-4b".into()), tracestate: None };
        assert_eq!(short.trace_id(), None, "a malformed context has no trace id (and no panic)");
    }

    #[test]
    fn the_sampled_flag_is_read_and_the_draw_follows_the_ratio() {
        assert!(sampled_flag("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!sampled_flag("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        assert!((0..1000).all(|_| draw(1.0)));
        assert!(!(0..1000).any(|_| draw(0.0)));
        let hits = (0..100_000).filter(|_| draw(0.1)).count();
        assert!((9_000..11_000).contains(&hits), "{hits} of 100 000 at ratio 0.1");
    }

    #[test]
    fn ratio_out_of_range_is_refused() {
        let bad = TelemetrySettings { sample_ratio: 1.5, ..Default::default() };
        assert!(bad.validate().is_err());
        assert!(TelemetrySettings::default().validate().is_ok());
    }
}
