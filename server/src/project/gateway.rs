//! The `gateway` section of `mas.yaml`: the reference's `GatewaySettings` keys, read as the
//! reference writes them, with mas's own keys beside them.
//!
//! Where a reference key has a mas counterpart it is mapped onto it; where it asks for what mas
//! does not do (Sentinel, WAIT/WAITAOF barriers) the file is refused naming the key, never
//! silently accepted. Giving a reference key and its mas counterpart together is refused too.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mas_net::telemetry::{Protocol, TelemetrySettings};
use serde::Deserialize;

use crate::config::{
    AuditSettings, CircuitSettings, ConfigError, FeatureSettings, GatewaySettings, OnFullChain, PermissionPreset,
    RateLimitSettings,
};

/// What the gateway section configures, split by who uses it.
pub(super) struct GatewayParts {
    /// The Redis store, or `None` for the embedded one.
    #[cfg(not(madsim))]
    pub redis: Option<crate::store::redis::RedisSettings>,
    /// Trace export.
    pub telemetry: TelemetrySettings,
    /// Governance.
    pub gateway: GatewaySettings,
}

/// The reference's `gateway` section: its keys, with mas's extensions inside them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct ProjectGateway {
    /// Redis; absent means the embedded store (the reference always used Redis).
    #[cfg(not(madsim))]
    redis: Option<ProjectRedis>,
    rate_limit: RateLimitSettings,
    features: FeatureSettings,
    dlp: mas_core::policy::dlp::DlpSettings,
    audit: ProjectAudit,
    telemetry: ProjectTelemetry,
    circuit_breaker: CircuitSettings,
    /// mas: RBAC roles, name → permission patterns.
    roles: BTreeMap<String, Vec<String>>,
}

impl ProjectGateway {
    /// The broker's settings; `permissions` come from the file's top level.
    pub(super) fn into_parts(self, permissions: Vec<PermissionPreset>) -> Result<GatewayParts, ConfigError> {
        Ok(GatewayParts {
            #[cfg(not(madsim))]
            redis: self.redis.map(ProjectRedis::into_settings).transpose()?,
            telemetry: self.telemetry.settings(),
            gateway: GatewaySettings {
                features: self.features,
                rate_limit: self.rate_limit,
                roles: self.roles,
                permissions,
                dlp: self.dlp,
                circuit_breaker: self.circuit_breaker,
                audit: self.audit.into_settings()?,
            },
        })
    }
}

/// The reference's `gateway.telemetry`. Tracing is exported when `enabled` and an
/// `otlp_endpoint` is given; like the reference, a bare endpoint is an OTLP/HTTP base URL.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProjectTelemetry {
    enabled: bool,
    service_name: Option<String>,
    otlp_endpoint: Option<String>,
    sample_ratio: f64,
    headers: BTreeMap<String, String>,
    /// mas: `grpc` or `http`; absent means the reference's OTLP/HTTP.
    protocol: Option<Protocol>,
    /// Accepted for compatibility; mas's metrics are served at `/metrics`, not pushed.
    service_namespace: Option<String>,
    /// Accepted for compatibility (see `service_namespace`).
    environment: Option<String>,
    /// Accepted for compatibility (see `service_namespace`).
    export_metrics: Option<bool>,
    /// Accepted for compatibility (see `service_namespace`).
    metrics_export_interval_ms: Option<u64>,
}

impl Default for ProjectTelemetry {
    fn default() -> Self {
        ProjectTelemetry {
            enabled: false,
            service_name: None,
            otlp_endpoint: None,
            sample_ratio: 1.0,
            headers: BTreeMap::new(),
            protocol: None,
            service_namespace: None,
            environment: None,
            export_metrics: None,
            metrics_export_interval_ms: None,
        }
    }
}

impl ProjectTelemetry {
    fn settings(self) -> TelemetrySettings {
        let endpoint = self.otlp_endpoint.filter(|_| self.enabled);
        let (protocol, otlp_endpoint) = match self.protocol {
            Some(protocol) => (protocol, endpoint),
            None => (Protocol::Http, endpoint.map(http_traces_url)),
        };
        TelemetrySettings {
            otlp_endpoint,
            protocol,
            service_name: self.service_name,
            sample_ratio: self.sample_ratio,
            headers: self.headers,
        }
    }
}

/// The reference gives OTLP/HTTP a base URL (`http://collector:4318`); spans go to its
/// `/v1/traces`.
fn http_traces_url(base: String) -> String {
    if base.ends_with("/v1/traces") { base } else { format!("{}/v1/traces", base.trim_end_matches('/')) }
}

/// `gateway.redis`: the reference's keys (`url`, `socket_timeout`, `sentinel`, `pool`,
/// `durability`) and mas's (see [`RedisSettings`](crate::store::redis::RedisSettings)).
#[cfg(not(madsim))]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectRedis {
    /// As in the reference, `redis://localhost:6379` when the section names no URL.
    #[serde(default = "reference_redis_url")]
    url: String,
    /// Seconds to wait for a reply: mas's `response_timeout_ms`.
    #[serde(default)]
    socket_timeout: Option<f64>,
    /// Refused: mas connects to one Redis URL.
    #[serde(default)]
    sentinel: Option<serde_json::Value>,
    #[serde(default)]
    pool: Option<ReferencePool>,
    #[serde(default)]
    durability: Option<ReferenceDurability>,
    #[serde(default)]
    tls_ca_path: Option<PathBuf>,
    #[serde(default)]
    pool_size: Option<usize>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    response_timeout_ms: Option<u64>,
    #[serde(default)]
    max_queue_len: Option<usize>,
    #[serde(default)]
    max_dead_letters: Option<usize>,
}

#[cfg(not(madsim))]
fn reference_redis_url() -> String {
    "redis://localhost:6379".to_string()
}

/// The reference's blocking pool. mas multiplexes each connection, so no caller ever waits to
/// acquire one: `max_connections` caps mas's `pool_size`, `acquire_timeout_seconds` is checked
/// as the reference checks it and has nothing to bound.
#[cfg(not(madsim))]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferencePool {
    #[serde(default = "reference_max_connections")]
    max_connections: u32,
    #[serde(default = "reference_acquire_timeout")]
    acquire_timeout_seconds: f64,
}

#[cfg(not(madsim))]
fn reference_max_connections() -> u32 {
    512
}

#[cfg(not(madsim))]
fn reference_acquire_timeout() -> f64 {
    5.0
}

/// The reference's WAIT/WAITAOF barrier after every write. mas has none: a commit is as
/// durable as the server's `appendfsync`. The defaults (no barrier) are accepted; asking for
/// one is refused rather than promised and not kept.
#[cfg(not(madsim))]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceDurability {
    #[serde(default)]
    replica_count: u32,
    #[serde(default = "reference_durability_timeout")]
    timeout_ms: u64,
    #[serde(default)]
    wait_for_aof: bool,
}

#[cfg(not(madsim))]
fn reference_durability_timeout() -> u64 {
    1_000
}

#[cfg(not(madsim))]
impl ProjectRedis {
    fn into_settings(self) -> Result<crate::store::redis::RedisSettings, ConfigError> {
        let invalid = |why: String| Err(ConfigError::Invalid(format!("gateway.redis.{why}")));
        if self.sentinel.is_some() {
            return invalid("sentinel: Redis Sentinel is not supported by mas; give a url".into());
        }
        if let Some(d) = &self.durability
            && (d.replica_count > 0 || d.wait_for_aof)
        {
            return invalid(
                "durability: WAIT/WAITAOF barriers are not supported by mas; a commit is as durable as the \
                 server's appendfsync (set appendfsync always for per-write durability)"
                    .into(),
            );
        }
        let mut settings = crate::store::redis::RedisSettings::new(self.url);
        settings.tls_ca_path = self.tls_ca_path;
        match (self.socket_timeout, self.response_timeout_ms) {
            (Some(_), Some(_)) => {
                return invalid("socket_timeout and response_timeout_ms set the same bound; give one".into());
            }
            (Some(seconds), None) => {
                if !(seconds.is_finite() && seconds > 0.0) {
                    return invalid(format!("socket_timeout: {seconds} is not a positive number of seconds"));
                }
                settings.response_timeout_ms = (seconds * 1_000.0).ceil() as u64;
            }
            (None, Some(ms)) => settings.response_timeout_ms = ms,
            (None, None) => {}
        }
        if let Some(size) = self.pool_size {
            settings.pool_size = size;
        }
        if let Some(pool) = self.pool {
            if !(1..=65_536).contains(&pool.max_connections) {
                return invalid(format!("pool.max_connections: {} is not in 1..=65536", pool.max_connections));
            }
            if !(pool.acquire_timeout_seconds.is_finite() && pool.acquire_timeout_seconds > 0.0) {
                return invalid(format!(
                    "pool.acquire_timeout_seconds: {} is not a positive number of seconds",
                    pool.acquire_timeout_seconds
                ));
            }
            settings.pool_size = settings.pool_size.min(pool.max_connections as usize);
        }
        if let Some(ms) = self.connect_timeout_ms {
            settings.connect_timeout_ms = ms;
        }
        if let Some(len) = self.max_queue_len {
            settings.max_queue_len = len;
        }
        if let Some(bound) = self.max_dead_letters {
            settings.max_dead_letters = bound;
        }
        Ok(settings)
    }
}

/// `gateway.audit`: the JSONL sink as in the reference, its `retention` mapped onto mas's
/// live window and archive, or mas's own keys.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ProjectAudit {
    file_path: Option<PathBuf>,
    max_bytes: Option<u64>,
    backup_count: Option<u32>,
    retention: Option<ReferenceRetention>,
    max_records_per_chain: Option<usize>,
    on_full: Option<OnFullChain>,
    archive_dir: Option<PathBuf>,
    archive_batch: Option<usize>,
}

/// The reference's audit retention: a bound on its one message stream and its one security
/// stream. mas keeps a chain per receiving agent plus the security chain, each bounded alike,
/// so the larger of the two bounds becomes every chain's bound. The reference refuses all
/// traffic when a stream is full and no archive directory is set; mas archives (to
/// `{data_dir}/audit-archive` without one) unless `on_full: refuse` is asked for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceRetention {
    #[serde(default = "reference_retention_bound")]
    max_messages: usize,
    #[serde(default = "reference_retention_bound")]
    max_security_events: usize,
    #[serde(default = "reference_archive_batch")]
    batch_size: usize,
    #[serde(default)]
    archive_directory: Option<PathBuf>,
}

fn reference_retention_bound() -> usize {
    100_000
}

fn reference_archive_batch() -> usize {
    1_000
}

impl ProjectAudit {
    fn into_settings(self) -> Result<AuditSettings, ConfigError> {
        let defaults = AuditSettings::default();
        let (max_records_per_chain, archive_dir, archive_batch) = match self.retention {
            Some(retention) => {
                let ours = [
                    ("max_records_per_chain", self.max_records_per_chain.is_some()),
                    ("archive_dir", self.archive_dir.is_some()),
                    ("archive_batch", self.archive_batch.is_some()),
                ];
                if let Some((key, _)) = ours.iter().find(|(_, given)| *given) {
                    return Err(ConfigError::Invalid(format!(
                        "gateway.audit: retention and {key} set the same thing; give one"
                    )));
                }
                if !(1..=10_000).contains(&retention.batch_size) {
                    return Err(ConfigError::Invalid(format!(
                        "gateway.audit.retention.batch_size: {} is not in 1..=10000",
                        retention.batch_size
                    )));
                }
                (
                    retention.max_messages.max(retention.max_security_events),
                    retention.archive_directory,
                    retention.batch_size,
                )
            }
            None => (
                self.max_records_per_chain.unwrap_or(defaults.max_records_per_chain),
                self.archive_dir,
                self.archive_batch.unwrap_or(defaults.archive_batch),
            ),
        };
        Ok(AuditSettings {
            file_path: self.file_path,
            max_bytes: self.max_bytes.unwrap_or(defaults.max_bytes),
            backup_count: self.backup_count.unwrap_or(defaults.backup_count),
            max_records_per_chain,
            on_full: self.on_full.unwrap_or(defaults.on_full),
            archive_dir,
            archive_batch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_otlp_endpoint_is_an_http_base_as_in_the_reference() {
        let t = ProjectTelemetry {
            enabled: true,
            otlp_endpoint: Some("http://c:4318/".into()),
            ..ProjectTelemetry::default()
        };
        let s = t.settings();
        assert_eq!((s.protocol, s.otlp_endpoint.as_deref()), (Protocol::Http, Some("http://c:4318/v1/traces")));
        let off = ProjectTelemetry { otlp_endpoint: Some("http://c:4318".into()), ..ProjectTelemetry::default() };
        assert_eq!(off.settings().otlp_endpoint, None, "not enabled");
    }
}
