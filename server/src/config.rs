//! Broker configuration: read once at start-up (JSON file or built in code) and handed down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mas_core::delivery::DeliveryConfig;
use mas_core::ids::{AgentId, BrokerId};
use mas_core::limits::InputLimits;
use mas_core::policy::authz::AuthzPolicy;
use mas_core::policy::circuit::CircuitConfig;
use mas_core::policy::ratelimit::Limits;
use mas_core::store::MemoryStoreConfig;
use serde::Deserialize;

/// One allowlisted agent: who it is, what it offers, and whom it may message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDefinition {
    /// Capabilities shown by discovery.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Free-form JSON object shown by discovery.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Targets this agent may send to: agent ids, or `*` for every allowlisted agent.
    /// Empty means none (deny by default).
    #[serde(default)]
    pub allowed_targets: Vec<String>,
    /// Targets this agent may never send to, whatever else allows it.
    #[serde(default)]
    pub blocked_targets: Vec<String>,
    /// RBAC roles (see `gateway.roles`; used when `gateway.features.rbac` is on).
    #[serde(default)]
    pub roles: Vec<String>,
}

impl AgentDefinition {
    /// An agent allowed to send to `targets`, with no capabilities or metadata.
    pub fn allowing<T: AsRef<str>>(targets: &[T]) -> Self {
        AgentDefinition {
            capabilities: Vec::new(),
            metadata: serde_json::Map::new(),
            allowed_targets: targets.iter().map(|t| t.as_ref().to_string()).collect(),
            blocked_targets: Vec::new(),
            roles: Vec::new(),
        }
    }
}

/// A permission preset (the reference runner's `permissions`), applied at start in order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PermissionPreset {
    /// `sender` may message each of `targets`.
    Allow {
        /// Sender.
        sender: AgentId,
        /// Targets.
        targets: Vec<AgentId>,
    },
    /// Both agents may message each other.
    AllowBidirectional {
        /// Exactly two agents.
        agents: [AgentId; 2],
    },
    /// Bidirectional: everyone may message everyone else; otherwise a chain a → b → c.
    AllowNetwork {
        /// The agents.
        agents: Vec<AgentId>,
        /// Full mesh (default) or chain.
        #[serde(default = "yes")]
        bidirectional: bool,
    },
    /// `sender` may message exactly `receivers`.
    AllowBroadcast {
        /// Sender.
        sender: AgentId,
        /// Receivers.
        receivers: Vec<AgentId>,
    },
    /// `agent_id` may message everyone.
    AllowWildcard {
        /// The agent.
        agent_id: AgentId,
    },
}

fn yes() -> bool {
    true
}

/// Delivery settings in configuration units (milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Deliveries awaiting ack per session (default 200).
    pub max_in_flight: usize,
    /// Ack deadline per delivery (default 30 000 ms).
    pub ack_timeout_ms: u64,
    /// Attempts before dead-lettering (default 5).
    pub max_delivery_attempts: u32,
    /// First retry backoff (default 500 ms), doubling per attempt.
    pub retry_backoff_initial_ms: u64,
    /// Retry backoff cap (default 30 000 ms).
    pub retry_backoff_max_ms: u64,
    /// How long a draining session waits for in-flight acks (default 5 000 ms).
    pub drain_timeout_ms: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        let d = DeliveryConfig::default();
        DeliverySettings {
            max_in_flight: d.max_in_flight,
            ack_timeout_ms: millis(d.ack_timeout),
            max_delivery_attempts: d.max_delivery_attempts,
            retry_backoff_initial_ms: millis(d.retry_backoff_initial),
            retry_backoff_max_ms: millis(d.retry_backoff_max),
            drain_timeout_ms: 5_000,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl DeliverySettings {
    /// The core machine's configuration.
    pub fn machine_config(&self) -> DeliveryConfig {
        DeliveryConfig {
            max_in_flight: self.max_in_flight,
            ack_timeout: Duration::from_millis(self.ack_timeout_ms),
            max_delivery_attempts: self.max_delivery_attempts,
            retry_backoff_initial: Duration::from_millis(self.retry_backoff_initial_ms),
            retry_backoff_max: Duration::from_millis(self.retry_backoff_max_ms),
        }
    }

    /// The drain deadline as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Session leases in the store: how long a session stays owned without renewal, and how often
/// it renews. After a broker crash its sessions' work moves on within `ttl_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseSettings {
    /// Lease lifetime (default 6 000 ms).
    pub ttl_ms: u64,
    /// Renewal period (default 2 000 ms); must be less than half the lifetime.
    pub renewal_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings { ttl_ms: 6_000, renewal_ms: 2_000 }
    }
}

impl LeaseSettings {
    /// The lifetime.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// The renewal period.
    pub fn renewal(&self) -> Duration {
        Duration::from_millis(self.renewal_ms)
    }
}

/// The admin HTTP listener (metrics and health probes, see `crate::admin`) and who may use
/// the admin gRPC API (see `crate::operator`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `null` turns the listener off.
    /// Default `127.0.0.1:9464` (loopback: the probes and metrics carry no payloads, but
    /// nothing outside the host needs them unless you say so).
    pub listen_addr: Option<SocketAddr>,
    /// How long readiness waits for the store to answer (default 1 000 ms); also bounds the
    /// store reads of a `/metrics` scrape.
    pub readiness_timeout_ms: u64,
    /// Operators allowed to call `mas.admin.v1.AdminService` on the broker port: names whose
    /// client certificate carries `spiffe://mas/operator/{name}` (`mas dev-certs --operators`).
    /// Empty (the default): nobody may.
    pub operators: Vec<String>,
    /// How often the broker reads the operators' grant changes from the store (default
    /// 1 000 ms): the bound within which a change made through any broker applies here.
    pub authz_refresh_ms: u64,
    /// The bearer token `/status.json` requires when the listener is not on loopback (without
    /// one, a non-loopback listener serves no status snapshot).
    pub status_token: Option<String>,
}

impl AdminSettings {
    /// [`AdminSettings::authz_refresh_ms`] as a duration.
    pub fn authz_refresh(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.authz_refresh_ms)
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            readiness_timeout_ms: 1_000,
            operators: Vec::new(),
            authz_refresh_ms: 1_000,
            status_token: None,
        }
    }
}

/// Bounds on every input and connection resource; see the README's limits table for the
/// status a client gets when it hits each one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest payload (`data_json`) in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
    /// Deepest nesting of a payload or state value (default 64).
    pub max_json_depth: usize,
    /// Longest `message_type` in bytes (default 256).
    pub max_message_type_bytes: usize,
    /// Largest total state of one agent, field names plus values (default 1 MiB).
    pub max_state_bytes: usize,
    /// Largest gRPC message the transport decodes (default 4 MiB, grpc's default). Anything
    /// larger is refused by the transport itself (`OUT_OF_RANGE`).
    pub max_message_bytes: usize,
    /// Sessions one agent may hold on this broker at once (default 64).
    pub max_sessions_per_agent: usize,
    /// Open client connections (default 4 096); more are closed at once, with a log line.
    pub max_connections: usize,
    /// Concurrent RPCs (HTTP/2 streams) per connection (default 1 024).
    pub max_streams_per_connection: u32,
    /// Longest `timeout_ms` a request may ask for (default 3 600 000 = 1 h).
    pub max_request_timeout_ms: u64,
    /// Requests of one agent awaiting replies at once (default 10 000), in the store, so the
    /// bound holds across brokers.
    pub max_pending_requests_per_agent: usize,
    /// A connection must finish its TLS handshake within this (default 10 000 ms).
    pub tls_handshake_timeout_ms: u64,
    /// Idle connections are pinged this often (default 30 000 ms) ...
    pub http2_keepalive_interval_ms: u64,
    /// ... and closed when a ping is not answered within this (default 10 000 ms).
    pub http2_keepalive_timeout_ms: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        let input = InputLimits::default();
        LimitSettings {
            max_payload_bytes: input.max_payload_bytes,
            max_json_depth: input.max_json_depth,
            max_message_type_bytes: input.max_message_type_bytes,
            max_state_bytes: input.max_state_bytes,
            max_message_bytes: 4 * 1024 * 1024,
            max_sessions_per_agent: 64,
            max_connections: 4_096,
            max_streams_per_connection: 1_024,
            max_request_timeout_ms: 3_600_000,
            max_pending_requests_per_agent: MemoryStoreConfig::default().max_pending_requests,
            tls_handshake_timeout_ms: 10_000,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
        }
    }
}

impl LimitSettings {
    /// The bounds the core checks on each message and state write.
    pub fn input(&self) -> InputLimits {
        InputLimits {
            max_payload_bytes: self.max_payload_bytes,
            max_json_depth: self.max_json_depth,
            max_message_type_bytes: self.max_message_type_bytes,
            max_state_bytes: self.max_state_bytes,
        }
    }
}

/// Paths of the broker's TLS material.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Server certificate (PEM).
    pub server_cert_path: PathBuf,
    /// Server private key (PEM).
    pub server_key_path: PathBuf,
    /// CA that client certificates must chain to (PEM).
    pub client_ca_path: PathBuf,
}

/// Everything the broker needs, validated by [`BrokerConfig::validate`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where to listen, e.g. `127.0.0.1:50051` (port 0 picks a free port).
    pub listen_addr: SocketAddr,
    /// This broker among those sharing a store: stable across its restarts, unique among live
    /// brokers (`[A-Za-z0-9_-]{1,128}`). A restarted broker takes over the sessions of its
    /// previous process at once instead of refusing their reconnecting instances until the
    /// dead leases expire. Default: `{hostname}-{port}` (see [`BrokerConfig::broker_id`]).
    #[serde(default)]
    pub broker_id: Option<BrokerId>,
    /// TLS material; required by the production listener.
    pub tls: Option<TlsSettings>,
    /// The allowlist: only these agents may connect.
    pub agents: BTreeMap<AgentId, AgentDefinition>,
    /// Delivery settings.
    #[serde(default)]
    pub delivery: DeliverySettings,
    /// Extra seed material for message ids, delivery ids and jitter. It is always mixed with
    /// the start time, the process id and the listen address, because ids must never repeat
    /// across restarts or between brokers; under simulation those are virtual and fixed, so a
    /// simulated run is reproducible.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Bound of each agent's queue in the embedded store (default 100 000 entries).
    #[serde(default = "default_max_queue_len")]
    pub max_queue_len: usize,
    /// Session lease timing.
    #[serde(default)]
    pub session_lease: LeaseSettings,
    /// Redis connection; absent means the embedded memory store.
    #[cfg(not(madsim))]
    #[serde(default)]
    pub redis: Option<crate::store::redis::RedisSettings>,
    /// Governance settings (the reference's `gateway` section).
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// Bounds on inputs and connections.
    #[serde(default)]
    pub limits: LimitSettings,
    /// Where the broker keeps its files (audit archive segments unless
    /// `gateway.audit.archive_dir` says otherwise). Default `mas-data`; a relative path is
    /// taken from the configuration file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The admin HTTP listener.
    #[serde(default)]
    pub admin: AdminSettings,
    /// Distributed tracing (off unless `telemetry.otlp_endpoint` is set).
    #[serde(default)]
    pub telemetry: mas_net::telemetry::TelemetrySettings,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("mas-data")
}

/// Which governance features run (authorization and rate limits are always on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureSettings {
    /// Data-loss prevention (default on).
    pub dlp: bool,
    /// Role-based permissions in addition to per-agent grants (default off).
    pub rbac: bool,
    /// Circuit breakers per target agent (default on).
    pub circuit_breaker: bool,
}

impl Default for FeatureSettings {
    fn default() -> Self {
        FeatureSettings { dlp: true, rbac: false, circuit_breaker: true }
    }
}

/// Circuit breaker settings (reference names and defaults, plus the half-open probe bound).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitSettings {
    /// Failed messages within `window_seconds` that open a target's circuit (default 5).
    pub failure_threshold: u32,
    /// Successes while half-open that close it (default 2).
    pub success_threshold: u32,
    /// How long it stays open (default 60 s).
    pub timeout_seconds: f64,
    /// The window failures are counted in (default 300 s).
    pub window_seconds: f64,
    /// Messages admitted while half-open (default 2; the reference admits everything).
    pub max_probes: u32,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        let c = CircuitConfig::default();
        CircuitSettings {
            failure_threshold: c.failure_threshold,
            success_threshold: c.success_threshold,
            timeout_seconds: c.open_for.as_secs_f64(),
            window_seconds: c.window.as_secs_f64(),
            max_probes: c.max_probes,
        }
    }
}

impl CircuitSettings {
    /// The engine's configuration (validated values: positive, finite).
    pub fn config(&self) -> CircuitConfig {
        CircuitConfig {
            failure_threshold: self.failure_threshold,
            window: Duration::try_from_secs_f64(self.window_seconds).unwrap_or(Duration::MAX),
            open_for: Duration::try_from_secs_f64(self.timeout_seconds).unwrap_or(Duration::MAX),
            success_threshold: self.success_threshold,
            max_probes: self.max_probes,
        }
    }
}

/// What a chain does when its live window in the store is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFullChain {
    /// Move the oldest records to archive segment files (fsynced before they leave the
    /// store), so traffic never stops (default).
    #[default]
    Archive,
    /// Strict mode: keep every record in the store and refuse the messages a full chain would
    /// record with `RESOURCE_EXHAUSTED audit_capacity_exceeded`.
    Refuse,
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// Optional JSONL copy of every record (one line each), written after the store commit.
    pub file_path: Option<PathBuf>,
    /// Rotate the file when a line would take it past this size (default 10 000 000 bytes).
    pub max_bytes: u64,
    /// Rotated files kept: `file.1` … `file.N` (default 5; 0 truncates instead).
    pub backup_count: u32,
    /// The live window: most records one chain holds in the store (default 100 000, about
    /// 48 MB of Redis memory per chain: 476 bytes per record measured).
    pub max_records_per_chain: usize,
    /// What a full chain does (default `archive`).
    pub on_full: OnFullChain,
    /// Where archive segments go (default `{data_dir}/audit-archive`); ignored with
    /// `on_full: refuse`.
    pub archive_dir: Option<PathBuf>,
    /// Records moved per segment (default 10 000; at most half of `max_records_per_chain`).
    pub archive_batch: usize,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            file_path: None,
            max_bytes: 10_000_000,
            backup_count: 5,
            max_records_per_chain: MemoryStoreConfig::default().max_audit_records,
            on_full: OnFullChain::Archive,
            archive_dir: None,
            archive_batch: 10_000,
        }
    }
}

impl AuditSettings {
    /// Where segments are archived: `archive_dir`, else `{data_dir}/audit-archive`; `None`
    /// in strict mode.
    pub fn archive_dir_in(&self, data_dir: &Path) -> Option<PathBuf> {
        match self.on_full {
            OnFullChain::Refuse => None,
            OnFullChain::Archive => Some(self.archive_dir.clone().unwrap_or_else(|| data_dir.join("audit-archive"))),
        }
    }
}

/// Per-sender rate limits (always on).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Messages per minute per sender agent (default 100; 0 = always deny).
    pub per_minute: u64,
    /// Messages per hour per sender agent (default 1 000; 0 = always deny).
    pub per_hour: u64,
    /// Per-agent limits replacing the defaults (a missing field keeps the default).
    pub overrides: BTreeMap<AgentId, RateOverride>,
}

/// One agent's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOverride {
    /// Messages per minute.
    pub per_minute: Option<u64>,
    /// Messages per hour.
    pub per_hour: Option<u64>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        let limits = Limits::default();
        RateLimitSettings { per_minute: limits.per_minute, per_hour: limits.per_hour, overrides: BTreeMap::new() }
    }
}

impl RateLimitSettings {
    /// The limits of `sender`.
    pub fn limits_for(&self, sender: &AgentId) -> Limits {
        let o = self.overrides.get(sender);
        Limits {
            per_minute: o.and_then(|o| o.per_minute).unwrap_or(self.per_minute),
            per_hour: o.and_then(|o| o.per_hour).unwrap_or(self.per_hour),
        }
    }

    /// Limits so high they never bind; for load tests.
    pub fn unlimited() -> Self {
        RateLimitSettings { per_minute: u64::MAX / 4, per_hour: u64::MAX / 4, overrides: BTreeMap::new() }
    }
}

/// The `gateway` section: one settings object, read once and handed down.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Feature switches.
    pub features: FeatureSettings,
    /// Rate limits.
    pub rate_limit: RateLimitSettings,
    /// RBAC roles: name → permission patterns such as `send:worker-*`.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Permission presets applied at start, after the per-agent grants.
    pub permissions: Vec<PermissionPreset>,
    /// DLP rules and policies.
    pub dlp: mas_core::policy::dlp::DlpSettings,
    /// Circuit breakers.
    pub circuit_breaker: CircuitSettings,
    /// The audit trail.
    pub audit: AuditSettings,
}

impl GatewaySettings {
    /// The circuit configuration, or `None` when breakers are off.
    pub fn circuit(&self) -> Option<CircuitConfig> {
        self.features.circuit_breaker.then(|| self.circuit_breaker.config())
    }
}

fn default_max_queue_len() -> usize {
    MemoryStoreConfig::default().max_queue_len
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The named file does not exist.
    #[error("config file not found: {}", .0.display())]
    NotFound(PathBuf),
    /// No file was named and no `mas.yaml` was found.
    #[error("mas.yaml not found in {} or any parent directory; create mas.yaml in the project root, or pass --config or set MAS_RUNNER_CONFIG_FILE", .0.display())]
    NoProjectFile(PathBuf),
    /// The file is not valid YAML or JSON, or a key is unknown or of the wrong type.
    #[error("invalid config {}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl BrokerConfig {
    /// The authorization policy this configuration describes: per-agent grants and blocks,
    /// roles, then the presets in order.
    pub fn authz_policy(&self) -> AuthzPolicy {
        let mut policy = AuthzPolicy::new(self.gateway.features.rbac);
        for (name, permissions) in &self.gateway.roles {
            let patterns: Vec<&str> = permissions.iter().map(String::as_str).collect();
            policy.set_role(name, &patterns);
        }
        for (agent, def) in &self.agents {
            policy.set_allowed(agent, def.allowed_targets.iter().cloned());
            for blocked in def.blocked_targets.iter().filter_map(|b| AgentId::new(b).ok()) {
                policy.block(agent, &blocked);
            }
            for role in &def.roles {
                policy.assign_role(agent, role);
            }
        }
        for preset in &self.gateway.permissions {
            preset.apply(&mut policy);
        }
        policy
    }

    /// The dead-letter bound of the configured store: per agent in Redis, for all agents
    /// together in the embedded store.
    pub fn dead_letter_capacity(&self) -> usize {
        #[cfg(not(madsim))]
        if let Some(redis) = &self.redis {
            return redis.max_dead_letters;
        }
        MemoryStoreConfig::default().max_dead_letters
    }

    /// A configuration with defaults for everything but the address and the allowlist.
    pub fn new(listen_addr: SocketAddr, agents: BTreeMap<AgentId, AgentDefinition>) -> Self {
        BrokerConfig {
            listen_addr,
            broker_id: None,
            tls: None,
            agents,
            delivery: DeliverySettings::default(),
            seed: None,
            max_queue_len: default_max_queue_len(),
            session_lease: LeaseSettings::default(),
            #[cfg(not(madsim))]
            redis: None,
            gateway: GatewaySettings::default(),
            limits: LimitSettings::default(),
            data_dir: default_data_dir(),
            admin: AdminSettings::default(),
            telemetry: mas_net::telemetry::TelemetrySettings::default(),
        }
    }

    /// Where audit segments are archived, `None` in strict mode (see [`AuditSettings`]).
    pub fn audit_archive_dir(&self) -> Option<PathBuf> {
        self.gateway.audit.archive_dir_in(&self.data_dir)
    }

    /// The configured broker id, or `{hostname}-{port}`: the same for every start of a broker
    /// on one host and port, and different for any two brokers that can listen at once.
    pub fn broker_id(&self) -> BrokerId {
        if let Some(id) = &self.broker_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
            .take(BrokerId::MAX_LEN - 6)
            .collect();
        let host = if host.is_empty() { "mas" } else { host.as_str() };
        BrokerId::new(&format!("{host}-{}", self.listen_addr.port()))
            .unwrap_or_else(|_| unreachable!("sanitised host and a port form a valid broker id"))
    }

    /// Reads and validates a configuration file, either schema, YAML or JSON (see
    /// [`crate::project`]); relative paths resolve against the file's directory.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        crate::project::Project::load(path).map(|project| project.broker)
    }

    /// Makes every relative path in the configuration absolute against `dir`.
    pub(crate) fn resolve_paths(&mut self, dir: &Path) {
        use crate::project::resolve;
        if let Some(tls) = &mut self.tls {
            for path in [&mut tls.server_cert_path, &mut tls.server_key_path, &mut tls.client_ca_path] {
                resolve(dir, path);
            }
        }
        resolve(dir, &mut self.data_dir);
        let audit = &mut self.gateway.audit;
        for path in audit.file_path.iter_mut().chain(audit.archive_dir.iter_mut()) {
            resolve(dir, path);
        }
        #[cfg(not(madsim))]
        if let Some(ca) = self.redis.as_mut().and_then(|r| r.tls_ca_path.as_mut()) {
            resolve(dir, ca);
        }
    }

    /// Every bounded numeric setting with its accepted range `(name, value, min, max)`. The
    /// maxima keep every later computation far from overflow (durations stay under a day or
    /// an hour, counts under what memory could hold) while leaving room for any real use.
    fn numeric_ranges(&self) -> Vec<(&'static str, u64, u64, u64)> {
        const DAY_MS: u64 = 86_400_000;
        const HOUR_MS: u64 = 3_600_000;
        let n = |v: usize| v as u64;
        let (d, l, a, lease) = (&self.delivery, &self.limits, &self.gateway.audit, &self.session_lease);
        let mut ranges = vec![
            ("delivery.max_in_flight", n(d.max_in_flight), 1, 100_000),
            ("delivery.ack_timeout_ms", d.ack_timeout_ms, 1, DAY_MS),
            ("delivery.max_delivery_attempts", u64::from(d.max_delivery_attempts), 1, 1_000_000),
            ("delivery.retry_backoff_initial_ms", d.retry_backoff_initial_ms, 0, DAY_MS),
            ("delivery.retry_backoff_max_ms", d.retry_backoff_max_ms, 0, DAY_MS),
            ("delivery.drain_timeout_ms", d.drain_timeout_ms, 0, HOUR_MS),
            ("admin.readiness_timeout_ms", self.admin.readiness_timeout_ms, 1, HOUR_MS),
            ("admin.authz_refresh_ms", self.admin.authz_refresh_ms, 10, 60_000),
            ("max_queue_len", n(self.max_queue_len), 1, 1_000_000_000),
            ("session_lease.ttl_ms", lease.ttl_ms, 3, HOUR_MS),
            ("gateway.audit.max_records_per_chain", n(a.max_records_per_chain), 2, 1_000_000_000),
            ("gateway.audit.max_bytes", a.max_bytes, 1, u64::MAX / 2),
            ("gateway.audit.backup_count", u64::from(a.backup_count), 0, 10_000),
            ("limits.max_payload_bytes", n(l.max_payload_bytes), 2, n(l.max_message_bytes)),
            ("limits.max_json_depth", n(l.max_json_depth), 1, 120),
            ("limits.max_message_type_bytes", n(l.max_message_type_bytes), 1, 65_536),
            ("limits.max_state_bytes", n(l.max_state_bytes), 1, 512 * 1024 * 1024),
            ("limits.max_message_bytes", n(l.max_message_bytes), 1024, 64 * 1024 * 1024),
            ("limits.max_sessions_per_agent", n(l.max_sessions_per_agent), 1, 1_000_000),
            ("limits.max_connections", n(l.max_connections), 1, 1_000_000),
            ("limits.max_streams_per_connection", u64::from(l.max_streams_per_connection), 1, 1_000_000),
            ("limits.max_request_timeout_ms", l.max_request_timeout_ms, 1, DAY_MS),
            ("limits.max_pending_requests_per_agent", n(l.max_pending_requests_per_agent), 1, 100_000_000),
            ("limits.tls_handshake_timeout_ms", l.tls_handshake_timeout_ms, 1, HOUR_MS),
            ("limits.http2_keepalive_interval_ms", l.http2_keepalive_interval_ms, 1, DAY_MS),
            ("limits.http2_keepalive_timeout_ms", l.http2_keepalive_timeout_ms, 1, DAY_MS),
        ];
        ranges.extend(self.redis_ranges());
        ranges
    }

    /// The Redis section's ranges (none when the embedded store is used).
    #[cfg(not(madsim))]
    fn redis_ranges(&self) -> Vec<(&'static str, u64, u64, u64)> {
        let Some(r) = &self.redis else { return Vec::new() };
        let n = |v: usize| v as u64;
        vec![
            ("redis.pool_size", n(r.pool_size), 1, 1_024),
            ("redis.connect_timeout_ms", r.connect_timeout_ms, 1, 3_600_000),
            ("redis.response_timeout_ms", r.response_timeout_ms, 1, 3_600_000),
            ("redis.max_queue_len", n(r.max_queue_len), 1, 1_000_000_000),
            ("redis.max_dead_letters", n(r.max_dead_letters), 1, 100_000_000),
        ]
    }

    /// Under simulation there is no Redis section.
    #[cfg(madsim)]
    fn redis_ranges(&self) -> Vec<(&'static str, u64, u64, u64)> {
        Vec::new()
    }

    /// Checks ranges and cross-references; a bad value is named in the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value, min, max) in self.numeric_ranges() {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid(format!("{name} is {value}; it must be between {min} and {max}")));
            }
        }
        self.telemetry.validate().map_err(ConfigError::Invalid)?;
        if let Some(bad) = self.admin.operators.iter().find(|name| mas_net::identity::OperatorId::new(name).is_none()) {
            return Err(ConfigError::Invalid(format!(
                "admin.operators: {bad:?} is not a valid operator name (the agent id rules apply)"
            )));
        }
        let d = &self.delivery;
        if d.retry_backoff_initial_ms > d.retry_backoff_max_ms {
            return Err(ConfigError::Invalid(
                "delivery.retry_backoff_initial_ms must not exceed delivery.retry_backoff_max_ms".into(),
            ));
        }
        let c = &self.gateway.circuit_breaker;
        let circuit_counts = [
            ("failure_threshold", c.failure_threshold),
            ("success_threshold", c.success_threshold),
            ("max_probes", c.max_probes),
        ];
        if let Some((name, _)) = circuit_counts.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("gateway.circuit_breaker.{name} must be greater than 0")));
        }
        const YEAR_SECONDS: f64 = 365.0 * 86_400.0;
        for (name, seconds) in [("timeout_seconds", c.timeout_seconds), ("window_seconds", c.window_seconds)] {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= YEAR_SECONDS) {
                return Err(ConfigError::Invalid(format!(
                    "gateway.circuit_breaker.{name} is {seconds}; it must be a positive number of seconds up to a year"
                )));
            }
        }
        let audit = &self.gateway.audit;
        if audit.archive_batch == 0 || audit.archive_batch.saturating_mul(2) > audit.max_records_per_chain {
            return Err(ConfigError::Invalid(
                "gateway.audit.archive_batch must be positive and at most half of max_records_per_chain".into(),
            ));
        }
        if let Err(err) = mas_core::policy::dlp::Dlp::new(&self.gateway.dlp) {
            return Err(ConfigError::Invalid(format!("gateway.dlp: {err}")));
        }
        let lease = &self.session_lease;
        if lease.renewal_ms == 0 || lease.renewal_ms.saturating_mul(2) >= lease.ttl_ms {
            return Err(ConfigError::Invalid(
                "session_lease.renewal_ms must be positive and less than half of session_lease.ttl_ms".into(),
            ));
        }
        if self.agents.is_empty() {
            return Err(ConfigError::Invalid("agents: the allowlist is empty, nobody could connect".into()));
        }
        for (agent, def) in &self.agents {
            for target in def.allowed_targets.iter().chain(&def.blocked_targets) {
                let known = target == "*" || AgentId::new(target).is_ok_and(|t| self.agents.contains_key(&t));
                if !known {
                    return Err(ConfigError::Invalid(format!(
                        "agents.{agent}.allowed_targets names {target:?}, which is not an allowlisted agent"
                    )));
                }
            }
        }
        self.validate_presets()
    }

    /// Presets name allowlisted agents, with as many as each type needs (the reference's
    /// bounds: two for `allow_bidirectional`, at least two for a network, at least one
    /// receiver or target).
    fn validate_presets(&self) -> Result<(), ConfigError> {
        for (index, preset) in self.gateway.permissions.iter().enumerate() {
            let at = format!("permissions[{index}] ({})", preset.kind());
            preset
                .check(|agent| self.agents.contains_key(agent))
                .map_err(|why| ConfigError::Invalid(format!("{at} {why}")))?;
        }
        Ok(())
    }
}

impl PermissionPreset {
    /// Its `type` as the file writes it.
    pub fn kind(&self) -> &'static str {
        match self {
            PermissionPreset::Allow { .. } => "allow",
            PermissionPreset::AllowBidirectional { .. } => "allow_bidirectional",
            PermissionPreset::AllowNetwork { .. } => "allow_network",
            PermissionPreset::AllowBroadcast { .. } => "allow_broadcast",
            PermissionPreset::AllowWildcard { .. } => "allow_wildcard",
        }
    }

    /// Every agent it names.
    pub fn agents(&self) -> Vec<&AgentId> {
        match self {
            PermissionPreset::Allow { sender, targets } => std::iter::once(sender).chain(targets).collect(),
            PermissionPreset::AllowBidirectional { agents } => agents.iter().collect(),
            PermissionPreset::AllowNetwork { agents, .. } => agents.iter().collect(),
            PermissionPreset::AllowBroadcast { sender, receivers } => {
                std::iter::once(sender).chain(receivers).collect()
            }
            PermissionPreset::AllowWildcard { agent_id } => vec![agent_id],
        }
    }

    /// Refuses a preset naming too few agents, or one that `allowlisted` does not know.
    pub fn check(&self, allowlisted: impl Fn(&AgentId) -> bool) -> Result<(), String> {
        let named = self.agents();
        let min = if matches!(self, PermissionPreset::AllowWildcard { .. }) { 1 } else { 2 };
        if named.len() < min {
            return Err("names too few agents".into());
        }
        match named.iter().find(|agent| !allowlisted(agent)) {
            Some(unknown) => Err(format!("names {unknown}, which is not an allowlisted agent")),
            None => Ok(()),
        }
    }

    /// Applies it to `policy`, as the reference runner does.
    pub fn apply(&self, policy: &mut AuthzPolicy) {
        match self {
            PermissionPreset::Allow { sender, targets } => policy.allow(sender, targets),
            PermissionPreset::AllowBidirectional { agents: [a, b] } => policy.allow_bidirectional(a, b),
            PermissionPreset::AllowNetwork { agents, bidirectional } => policy.allow_network(agents, *bidirectional),
            PermissionPreset::AllowBroadcast { sender, receivers } => policy.allow_broadcast(sender, receivers),
            PermissionPreset::AllowWildcard { agent_id } => policy.allow_wildcard(agent_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_minimal_file_with_defaults() {
        let json = r#"{"listen_addr":"127.0.0.1:0","tls":null,
            "agents":{"alice":{"allowed_targets":["bob"]},"bob":{}}}"#;
        let c: BrokerConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.delivery, DeliverySettings::default());
        let policy = c.authz_policy();
        let (alice, bob) = (AgentId::new("alice").unwrap(), AgentId::new("bob").unwrap());
        assert!(policy.visible(&alice, &bob));
        assert!(!policy.visible(&bob, &alice));
    }

    #[test]
    fn rejects_unknown_fields_bad_ids_and_dangling_grants() {
        let unknown = r#"{"listen_addr":"127.0.0.1:0","agents":{},"colour":1}"#;
        assert!(serde_json::from_str::<BrokerConfig>(unknown).is_err());
        let bad_id = r#"{"listen_addr":"127.0.0.1:0","agents":{"a b":{}}}"#;
        assert!(serde_json::from_str::<BrokerConfig>(bad_id).is_err());
        let dangling = r#"{"listen_addr":"127.0.0.1:0","agents":{"a":{"allowed_targets":["zed"]}}}"#;
        let c: BrokerConfig = serde_json::from_str(dangling).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("zed"));
    }

    #[test]
    fn presets_roles_and_blocks_build_the_policy() {
        let json = r#"{"listen_addr":"127.0.0.1:0","agents":{
              "a":{"blocked_targets":["c"],"roles":["ops"]},"b":{},"c":{},"d":{}},
            "gateway":{"features":{"rbac":true},"roles":{"ops":["send:d"]},
              "permissions":[{"type":"allow_wildcard","agent_id":"a"},
                             {"type":"allow_bidirectional","agents":["b","c"]},
                             {"type":"allow_network","agents":["b","c","d"],"bidirectional":false}]}}"#;
        let c: BrokerConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        let p = c.authz_policy();
        let id = |s: &str| AgentId::new(s).unwrap();
        assert!(p.visible(&id("a"), &id("b")), "wildcard");
        assert!(!p.visible(&id("a"), &id("c")), "a block beats the wildcard");
        assert!(p.visible(&id("c"), &id("b")) && p.visible(&id("b"), &id("c")) && p.visible(&id("c"), &id("d")));
        assert!(!p.visible(&id("d"), &id("c")));
    }

    #[test]
    fn rejects_zero_window() {
        let json = r#"{"listen_addr":"127.0.0.1:0","agents":{"a":{}},"delivery":{"max_in_flight":0}}"#;
        let c: BrokerConfig = serde_json::from_str(json).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("max_in_flight"));
    }

    fn with(section: &str) -> BrokerConfig {
        let json = format!(r#"{{"listen_addr":"127.0.0.1:0","agents":{{"a":{{}}}},{section}}}"#);
        serde_json::from_str(&json).unwrap()
    }

    /// Every range is enforced at both ends, and the error names the key and the bounds.
    #[test]
    fn every_numeric_setting_is_range_checked() {
        let defaults = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), BTreeMap::new());
        for (name, value, min, max) in defaults.numeric_ranges() {
            assert!((min..=max).contains(&value), "default of {name} ({value}) out of its own range");
        }
        let too_big =
            with(r#""delivery":{"retry_backoff_initial_ms":37000000000000,"retry_backoff_max_ms":37000000000000}"#);
        let err = too_big.validate().unwrap_err().to_string();
        assert!(err.contains("delivery.retry_backoff_initial_ms") && err.contains("86400000"), "{err}");
        let err = with(r#""limits":{"max_payload_bytes":5000000}"#).validate().unwrap_err().to_string();
        assert!(err.contains("limits.max_payload_bytes") && err.contains("4194304"), "{err}");
        let err =
            with(r#""gateway":{"circuit_breaker":{"timeout_seconds":1e300}}"#).validate().unwrap_err().to_string();
        assert!(err.contains("timeout_seconds"), "{err}");
        assert!(with(r#""limits":{"max_connections":0}"#).validate().is_err());
    }

    #[test]
    fn a_bad_dlp_pattern_names_its_rule() {
        let c = with(
            r#""gateway":{"dlp":{"rules":[{"id":"ok","type":"t","pattern":"a","action":"alert"},
                                          {"id":"card-x","type":"t","pattern":"(","action":"block"}]}}"#,
        );
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(r#"rules[1] "card-x""#) && err.contains("invalid pattern"), "{err}");
    }

    #[test]
    fn audit_archives_under_the_data_dir_unless_strict() {
        let c = with(r#""data_dir":"/var/lib/mas""#);
        assert_eq!(c.audit_archive_dir(), Some(PathBuf::from("/var/lib/mas/audit-archive")));
        let c = with(r#""gateway":{"audit":{"archive_dir":"/srv/a"}}"#);
        assert_eq!(c.audit_archive_dir(), Some(PathBuf::from("/srv/a")));
        let c = with(r#""gateway":{"audit":{"on_full":"refuse","archive_dir":"/srv/a"}}"#);
        assert_eq!(c.audit_archive_dir(), None);
    }
}
