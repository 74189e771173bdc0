//! The broker's Prometheus metrics: one registry per broker, encoded on each scrape of the
//! admin listener's `/metrics` (see `crate::admin`).
//!
//! Label sets are bounded by construction: agents come from the allowlist (per-agent handles
//! are created once at start, so the message path does one map lookup and an atomic add),
//! decisions, reasons, methods and codes are enums, DLP types come from the configured rules.
//! Gauges that live in the store (queue depth, oldest message, circuits, audit chains) are
//! read at scrape time by [`Metrics::refresh_from_store`], never on the message path.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mas_core::delivery::{RequeueReason, StoreEffect};
use mas_core::ids::AgentId;
use mas_core::policy::audit::Decision;
use mas_core::policy::circuit::CircuitPhase;
use mas_core::policy::dlp::Action;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets (seconds): 50 µs to ~13 s, doubling. Request/reply on loopback is
/// sub-millisecond; a store outage shows up in the top buckets.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 19)
}

/// A latency histogram with [`latency_buckets`].
fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// One RPC of either wire generation, named as in the trace spans (`mas.rpc.{method}`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Method {
    /// `Send`.
    send,
    /// `SendBatch` (ours).
    send_batch,
    /// `Request`.
    request,
    /// `Reply`.
    reply,
    /// `Transport` (the bidirectional session stream; observed when it ends).
    transport,
    /// `Discover`.
    discover,
    /// `GetState`.
    get_state,
    /// `UpdateState`.
    update_state,
    /// `ResetState`.
    reset_state,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Method,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: Method,
    /// The gRPC status code name, e.g. `OK`, `PERMISSION_DENIED`.
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SenderLabels {
    sender: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChainLabels {
    chain: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentReasonLabels {
    agent: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NackLabels {
    agent: String,
    retryable: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DlpLabels {
    kind: String,
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The store's own instruments: latency and errors of each step. Shared by every broker that
/// shares the store (each registers the same families), so a step is counted once.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    duration: Family<OperationLabels, Histogram, fn() -> Histogram>,
    errors: Family<OperationLabels, Counter>,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics { duration: Family::new_with_constructor(latency_histogram), errors: Family::default() }
    }
}

impl StoreMetrics {
    /// Records one step named `operation` that took `elapsed` and failed or not.
    pub fn observe(&self, operation: &'static str, elapsed: Duration, failed: bool) {
        let labels = OperationLabels { operation };
        self.duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
        if failed {
            self.errors.get_or_create(&labels).inc();
        }
    }
}

/// What the session shells count for one agent; cloned handles into the registry's families.
#[derive(Debug, Clone)]
struct AgentInstruments {
    deliveries: Counter,
    acks: Counter,
    nacks_retryable: Counter,
    nacks_final: Counter,
    in_flight: Gauge,
    sessions: Gauge,
    rate_limited: Counter,
}

/// Every metric of one broker.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    agents: HashMap<AgentId, AgentInstruments>,
    admitted: Family<DecisionLabels, Counter>,
    redeliveries: Family<AgentReasonLabels, Counter>,
    dead_letters: Family<AgentReasonLabels, Counter>,
    rpc_duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    rpcs: Family<RpcLabels, Counter>,
    dlp_findings: Family<DlpLabels, Counter>,
    queue_depth: Family<AgentLabels, Gauge>,
    oldest_age: Family<AgentLabels, Gauge<f64, AtomicU64>>,
    circuit_state: Family<AgentLabels, Gauge>,
    audit_chain_length: Family<ChainLabels, Gauge>,
    dead_letter_queue_length: Family<AgentLabels, Gauge>,
    dead_letters_dropped: Family<AgentLabels, Gauge>,
    dead_letter_queue_capacity: Gauge,
    store_up: Gauge,
    draining: Gauge,
}

impl Metrics {
    /// The registry for a broker allowlisting `agents` over a store with `store` instruments.
    pub fn new<'a>(agents: impl IntoIterator<Item = &'a AgentId>, store: &StoreMetrics) -> Self {
        let deliveries = Family::<AgentLabels, Counter>::default();
        let acks = Family::<AgentLabels, Counter>::default();
        let nacks = Family::<NackLabels, Counter>::default();
        let in_flight = Family::<AgentLabels, Gauge>::default();
        let sessions = Family::<AgentLabels, Gauge>::default();
        let rate_limited = Family::<SenderLabels, Counter>::default();
        let agents: HashMap<AgentId, AgentInstruments> = agents
            .into_iter()
            .map(|agent| {
                let name = agent.to_string();
                let by_agent = AgentLabels { agent: name.clone() };
                let nack = |retryable| NackLabels { agent: name.clone(), retryable };
                let instruments = AgentInstruments {
                    deliveries: deliveries.get_or_create_owned(&by_agent),
                    acks: acks.get_or_create_owned(&by_agent),
                    nacks_retryable: nacks.get_or_create_owned(&nack("true")),
                    nacks_final: nacks.get_or_create_owned(&nack("false")),
                    in_flight: in_flight.get_or_create_owned(&by_agent),
                    sessions: sessions.get_or_create_owned(&by_agent),
                    rate_limited: rate_limited.get_or_create_owned(&SenderLabels { sender: name.clone() }),
                };
                (agent.clone(), instruments)
            })
            .collect();
        let mut metrics = Metrics {
            agents,
            admitted: Family::default(),
            redeliveries: Family::default(),
            dead_letters: Family::default(),
            rpc_duration: Family::new_with_constructor(latency_histogram),
            rpcs: Family::default(),
            dlp_findings: Family::default(),
            queue_depth: Family::default(),
            oldest_age: Family::default(),
            circuit_state: Family::default(),
            audit_chain_length: Family::default(),
            dead_letter_queue_length: Family::default(),
            dead_letters_dropped: Family::default(),
            dead_letter_queue_capacity: Gauge::default(),
            store_up: Gauge::default(),
            draining: Gauge::default(),
            registry: Registry::with_prefix("mas"),
        };
        let r = &mut metrics.registry;
        r.register(
            "messages_admitted",
            "Admission decisions, one per message (routable or refused)",
            metrics.admitted.clone(),
        );
        r.register("deliveries", "Delivery attempts sent to agent instances", deliveries);
        r.register("acks", "Deliveries acknowledged", acks);
        r.register("nacks", "Deliveries refused by the agent, by whether it asked for a retry", nacks);
        r.register("redeliveries", "Messages put back in their queue, by reason", metrics.redeliveries.clone());
        r.register("dead_letters", "Messages moved to the dead-letter queue, by reason", metrics.dead_letters.clone());
        r.register("in_flight", "Deliveries awaiting an ack on this broker", in_flight);
        r.register("sessions", "Live Transport sessions on this broker", sessions);
        r.register("rate_limited", "Messages refused by the sender's rate limit", rate_limited);
        r.register("dlp_findings", "DLP findings by type and the type's action", metrics.dlp_findings.clone());
        r.register("rpcs", "RPCs answered, by method and gRPC status code", metrics.rpcs.clone());
        r.register_with_unit(
            "rpc_duration",
            "Time from an RPC's arrival to its answer (Transport: the session's life)",
            Unit::Seconds,
            metrics.rpc_duration.clone(),
        );
        r.register_with_unit(
            "store_operation_duration",
            "Latency of each store step",
            Unit::Seconds,
            store.duration.clone(),
        );
        r.register("store_operation_errors", "Store steps that failed", store.errors.clone());
        r.register(
            "queue_depth",
            "Entries in the agent's work queue (ready, delayed, in flight)",
            metrics.queue_depth.clone(),
        );
        r.register_with_unit(
            "oldest_message_age",
            "Age of the oldest entry in the agent's work stream (0 when empty)",
            Unit::Seconds,
            metrics.oldest_age.clone(),
        );
        r.register(
            "circuit_state",
            "The agent's circuit breaker: 0 closed, 1 half-open, 2 open",
            metrics.circuit_state.clone(),
        );
        r.register(
            "audit_chain_length",
            "Live records in each audit chain (archived ones excluded)",
            metrics.audit_chain_length.clone(),
        );
        r.register(
            "dead_letter_queue_length",
            "Dead letters kept for the agent (compare with mas_dead_letter_queue_capacity)",
            metrics.dead_letter_queue_length.clone(),
        );
        r.register(
            "dead_letters_dropped",
            "Dead letters dropped, oldest first, because the queue was at its bound (as the store counts them)",
            metrics.dead_letters_dropped.clone(),
        );
        r.register(
            "dead_letter_queue_capacity",
            "The bound of each agent's dead-letter queue (the embedded store's bound is for all agents together)",
            metrics.dead_letter_queue_capacity.clone(),
        );
        r.register("store_up", "1 when the last scrape could read the store, else 0", metrics.store_up.clone());
        r.register("draining", "1 while the broker drains for shutdown", metrics.draining.clone());
        // A gauge fixed at 1 rather than an OpenMetrics `info`, which the Prometheus text
        // parsers (promtool among them) do not know.
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "The broker's version (always 1)", build);
        metrics
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Runs `count` on `agent`'s instruments (an agent outside the allowlist has none).
    fn for_agent(&self, agent: &AgentId, count: impl FnOnce(&AgentInstruments)) {
        if let Some(instruments) = self.agents.get(agent) {
            count(instruments);
        }
    }

    /// A message's admission decision (routable or refused), and who was rate-limited.
    pub fn admitted(&self, decision: Decision, sender: &str) {
        self.admitted.get_or_create(&DecisionLabels { decision: decision.as_str() }).inc();
        if decision == Decision::RateLimited
            && let Ok(sender) = AgentId::new(sender)
        {
            self.for_agent(&sender, |s| {
                s.rate_limited.inc();
            });
        }
    }

    /// One DLP finding of type `kind` whose action is `action`.
    pub fn dlp_finding(&self, kind: &str, action: Action) {
        let action = match action {
            Action::Alert => "alert",
            Action::Redact => "redact",
            Action::Block => "block",
        };
        self.dlp_findings.get_or_create(&DlpLabels { kind: kind.to_string(), action }).inc();
    }

    /// `n` delivery attempts sent to `agent`.
    pub fn delivered(&self, agent: &AgentId, n: u64) {
        self.for_agent(agent, |a| {
            a.deliveries.inc_by(n);
        });
    }

    /// A nack from `agent`.
    pub fn nacked(&self, agent: &AgentId, retryable: bool) {
        self.for_agent(agent, |a| {
            match retryable {
                true => a.nacks_retryable.inc(),
                false => a.nacks_final.inc(),
            };
        });
    }

    /// Settlements of `agent`'s deliveries that the store applied.
    pub fn settled(&self, agent: &AgentId, settled: impl IntoIterator<Item = Settled>) {
        for settlement in settled {
            match settlement {
                Settled::Ack => self.for_agent(agent, |a| {
                    a.acks.inc();
                }),
                Settled::Requeue(reason) => {
                    let reason = reason.as_str();
                    self.redeliveries.get_or_create(&AgentReasonLabels { agent: agent.to_string(), reason }).inc();
                }
                Settled::DeadLetter(reason) => {
                    self.dead_letters.get_or_create(&AgentReasonLabels { agent: agent.to_string(), reason }).inc();
                }
            }
        }
    }

    /// Deliveries to `agent` awaiting an ack on this broker, across its sessions here.
    pub fn in_flight(&self, agent: &AgentId) -> i64 {
        self.agents.get(agent).map_or(0, |a| a.in_flight.get())
    }

    /// `agent`'s deliveries awaiting an ack changed by `delta`.
    pub fn in_flight_changed(&self, agent: &AgentId, delta: i64) {
        self.for_agent(agent, |a| {
            a.in_flight.inc_by(delta);
        });
    }

    /// A session of `agent` opened (`+1`) or closed (`-1`).
    pub fn session_changed(&self, agent: &AgentId, delta: i64) {
        self.for_agent(agent, |a| {
            a.sessions.inc_by(delta);
        });
    }

    /// An RPC answered with `code` after `elapsed`.
    pub fn rpc(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        self.rpc_duration.get_or_create(&MethodLabels { method }).observe(elapsed.as_secs_f64());
        self.rpcs.get_or_create(&RpcLabels { method, code: code_name(code) }).inc();
    }

    /// The broker began draining.
    pub fn draining(&self) {
        self.draining.set(1);
    }

    /// Records the store's dead-letter bound (set once, at start).
    pub fn set_dead_letter_capacity(&self, capacity: usize) {
        self.dead_letter_queue_capacity.set(to_i64(capacity));
    }

    /// Sets the store-held gauges from a fresh reading (`None`: the store could not be read;
    /// the gauges keep their last values and `mas_store_up` turns 0).
    pub fn refresh_from_store(&self, reading: Option<&[AgentReading]>) {
        let Some(readings) = reading else {
            self.store_up.set(0);
            return;
        };
        self.store_up.set(1);
        for r in readings {
            let labels = AgentLabels { agent: r.agent.to_string() };
            self.queue_depth.get_or_create(&labels).set(to_i64(r.queue_depth));
            self.oldest_age.get_or_create(&labels).set(r.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
            let state = match r.circuit {
                CircuitPhase::Closed => 0,
                CircuitPhase::HalfOpen => 1,
                CircuitPhase::Open => 2,
            };
            self.circuit_state.get_or_create(&labels).set(state);
            self.audit_chain_length.get_or_create(&ChainLabels { chain: r.agent.to_string() }).set(to_i64(r.audit_len));
            self.dead_letter_queue_length.get_or_create(&labels).set(to_i64(r.dead_letters));
            self.dead_letters_dropped
                .get_or_create(&labels)
                .set(i64::try_from(r.dead_letters_dropped).unwrap_or(i64::MAX));
        }
    }
}

/// What a store effect did to a delivery, as the metrics count it (taken before the effect is
/// handed to the store, so the effects need not be kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acknowledged and removed.
    Ack,
    /// Put back in its queue.
    Requeue(RequeueReason),
    /// Dead-lettered, with its reason class.
    DeadLetter(&'static str),
}

impl Settled {
    /// The settlement `effect` makes.
    pub fn of(effect: &StoreEffect) -> Self {
        match effect {
            StoreEffect::Ack { .. } => Settled::Ack,
            StoreEffect::Requeue { reason, .. } => Settled::Requeue(*reason),
            StoreEffect::DeadLetter { nacked, reason, .. } => Settled::DeadLetter(dead_letter_reason(*nacked, reason)),
        }
    }
}

/// What the store says about one agent at scrape time.
#[derive(Debug, Clone)]
pub struct AgentReading {
    /// The agent.
    pub agent: AgentId,
    /// Entries in its work queue.
    pub queue_depth: usize,
    /// Age of the oldest entry, if any.
    pub oldest_age: Option<Duration>,
    /// Its circuit.
    pub circuit: CircuitPhase,
    /// Live records in its audit chain.
    pub audit_len: usize,
    /// Dead letters kept.
    pub dead_letters: usize,
    /// Dead letters dropped at the bound.
    pub dead_letters_dropped: u64,
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A dead letter's reason class: refused outright by the handler, retried to the limit after
/// nacks, or never answered within the attempts.
fn dead_letter_reason(nacked: bool, reason: &str) -> &'static str {
    match (nacked, reason.contains("retry_limit_exceeded")) {
        (false, _) => "ack_timeout",
        (true, true) => "retry_limit_exceeded",
        (true, false) => "rejected",
    }
}

/// The gRPC code's canonical name, as the status appears in logs and traces.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
