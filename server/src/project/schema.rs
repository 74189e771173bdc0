//! The `mas.yaml` schema: the reference runner's project file (server address, TLS paths,
//! `gateway`, `permissions`, `agents[]`) plus mas's own sections in the same file.
//!
//! These types only describe the file; [`ProjectFile::into_project`] turns a parsed file into
//! the broker's [`BrokerConfig`] and the runner's list of agent processes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use mas_core::ids::{AgentId, BrokerId};
use serde::Deserialize;

use crate::config::{
    AdminSettings, AgentDefinition, BrokerConfig, ConfigError, DeliverySettings, LeaseSettings, LimitSettings,
    PermissionPreset, TlsSettings,
};

use super::gateway::ProjectGateway;
use super::{AgentProcess, Launch, Project, RunnerSettings};

/// The whole file. Keys of the reference schema first, then mas's own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProjectFile {
    /// Where the broker listens (`host:port`; a wildcard host binds every interface).
    #[serde(default = "default_listen_addr")]
    server_listen_addr: String,
    /// CA for client certificates, and the agents' root CA.
    tls_ca_path: PathBuf,
    /// The broker's certificate.
    tls_server_cert_path: PathBuf,
    /// The broker's private key.
    tls_server_key_path: PathBuf,
    /// Governance, as the reference's `GatewaySettings`.
    #[serde(default)]
    gateway: ProjectGateway,
    /// Permission presets, applied in order after the per-agent grants.
    #[serde(default)]
    permissions: Vec<PermissionPreset>,
    /// The agents: the allowlist, and what `mas run` starts.
    #[serde(default)]
    agents: Vec<AgentEntry>,
    /// mas: see [`BrokerConfig::broker_id`].
    #[serde(default)]
    broker_id: Option<BrokerId>,
    /// mas: delivery settings.
    #[serde(default)]
    delivery: DeliverySettings,
    /// mas: session leases.
    #[serde(default)]
    session_lease: LeaseSettings,
    /// mas: input and connection bounds.
    #[serde(default)]
    limits: LimitSettings,
    /// mas: the admin HTTP listener.
    #[serde(default)]
    admin: AdminSettings,
    /// mas: where the broker keeps its files.
    #[serde(default)]
    data_dir: Option<PathBuf>,
    /// mas: extra id seed material.
    #[serde(default)]
    seed: Option<u64>,
    /// mas: bound of each queue in the embedded store.
    #[serde(default)]
    max_queue_len: Option<usize>,
    /// mas: how `mas run` supervises agent processes.
    #[serde(default)]
    runner: RunnerSettings,
}

fn default_listen_addr() -> String {
    "127.0.0.1:50051".to_string()
}

/// One `agents[]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentEntry {
    agent_id: AgentId,
    /// A Python `mas.Agent` subclass, `module:ClassName`, imported from the file's directory.
    #[serde(default)]
    class_path: Option<String>,
    /// mas: a program and its arguments, started with the connection settings in its
    /// environment.
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default = "one")]
    instances: u32,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    tls_cert_path: PathBuf,
    tls_key_path: PathBuf,
    #[serde(default)]
    init_kwargs: serde_json::Map<String, serde_json::Value>,
    /// mas: per-agent grants, as in the JSON broker file.
    #[serde(default)]
    allowed_targets: Vec<String>,
    /// mas: per-agent blocks.
    #[serde(default)]
    blocked_targets: Vec<String>,
    /// mas: RBAC roles.
    #[serde(default)]
    roles: Vec<String>,
}

fn one() -> u32 {
    1
}

/// Keys the runner passes itself, so `init_kwargs` may not set them (as in the reference).
const RESERVED_INIT_KWARGS: [&str; 3] = ["agent_id", "server_addr", "tls"];

impl ProjectFile {
    /// The broker's configuration and the agent processes; paths are still as written.
    pub(super) fn into_project(self, path: PathBuf) -> Result<Project, ConfigError> {
        let listen_addr = parse_listen_addr(&self.server_listen_addr)?;
        let mut allowlist = BTreeMap::new();
        let mut processes = Vec::with_capacity(self.agents.len());
        for (index, entry) in self.agents.into_iter().enumerate() {
            let at = format!("agents[{index}] ({})", entry.agent_id);
            if entry.instances == 0 {
                return Err(ConfigError::Invalid(format!("{at}: instances must be at least 1")));
            }
            let launch = launch_of(&at, entry.class_path, entry.command)?;
            if let Some(key) = RESERVED_INIT_KWARGS.iter().find(|k| entry.init_kwargs.contains_key(**k)) {
                return Err(ConfigError::Invalid(format!(
                    "{at}: init_kwargs contains the reserved key {key:?} (the runner sets agent_id, server_addr and tls)"
                )));
            }
            let definition = AgentDefinition {
                capabilities: entry.capabilities,
                metadata: entry.metadata,
                allowed_targets: entry.allowed_targets,
                blocked_targets: entry.blocked_targets,
                roles: entry.roles,
            };
            if allowlist.insert(entry.agent_id.clone(), definition).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{at}: agent_id is listed twice (use `instances` for several processes of one agent)"
                )));
            }
            processes.push(AgentProcess {
                agent_id: entry.agent_id,
                instances: entry.instances,
                launch,
                tls_cert_path: entry.tls_cert_path,
                tls_key_path: entry.tls_key_path,
                init_kwargs: entry.init_kwargs,
            });
        }
        let mut broker = BrokerConfig::new(listen_addr, allowlist);
        broker.broker_id = self.broker_id;
        broker.tls = Some(TlsSettings {
            server_cert_path: self.tls_server_cert_path,
            server_key_path: self.tls_server_key_path,
            client_ca_path: self.tls_ca_path,
        });
        broker.delivery = self.delivery;
        broker.seed = self.seed;
        if let Some(len) = self.max_queue_len {
            broker.max_queue_len = len;
        }
        broker.session_lease = self.session_lease;
        broker.limits = self.limits;
        if let Some(dir) = self.data_dir {
            broker.data_dir = dir;
        }
        broker.admin = self.admin;
        let parts = self.gateway.into_parts(self.permissions)?;
        #[cfg(not(madsim))]
        {
            broker.redis = parts.redis;
        }
        broker.telemetry = parts.telemetry;
        broker.gateway = parts.gateway;
        Ok(Project { path, broker, agents: processes, runner: self.runner })
    }
}

/// How an entry's processes start: exactly one of `class_path` and `command`, or neither for
/// an agent that is only allowlisted (it runs elsewhere; `mas run` refuses such a file).
fn launch_of(
    at: &str,
    class_path: Option<String>,
    command: Option<Vec<String>>,
) -> Result<Option<Launch>, ConfigError> {
    match (class_path, command) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!("{at}: give class_path or command, not both"))),
        (Some(class_path), None) => {
            let valid = class_path
                .split_once(':')
                .is_some_and(|(module, class)| !module.is_empty() && !class.is_empty() && !class.contains(':'));
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "{at}: invalid class_path {class_path:?}; use module:ClassName"
                )));
            }
            Ok(Some(Launch::Python { class_path }))
        }
        (None, Some(argv)) if argv.first().is_none_or(String::is_empty) => {
            Err(ConfigError::Invalid(format!("{at}: command must name a program")))
        }
        (None, Some(argv)) => Ok(Some(Launch::Command(argv))),
        (None, None) => Ok(None),
    }
}

/// `host:port` as the reference accepts it: an IP address, `localhost`, or a wildcard
/// (`0.0.0.0`, `*`, `::`, `[::]`, or nothing before the colon).
pub(crate) fn parse_listen_addr(text: &str) -> Result<SocketAddr, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid(format!("server_listen_addr {text:?}: {why}"));
    let (host, port) = text.rsplit_once(':').ok_or_else(|| invalid("expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| invalid("the port must be a number from 0 to 65535"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let ip = match host {
        "" | "*" | "0.0.0.0" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "::" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => other.parse().map_err(|_| invalid("the host must be an IP address, localhost or a wildcard"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// The address agents dial for a broker bound at `bound`: a wildcard bind becomes
/// `localhost:{port}`, so the name the agents verify is one a certificate can carry.
pub fn client_addr(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() { format!("localhost:{}", bound.port()) } else { bound.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_as_the_reference_writes_them() {
        let ok = |s: &str| parse_listen_addr(s).unwrap().to_string();
        assert_eq!(ok("127.0.0.1:50051"), "127.0.0.1:50051");
        assert_eq!(ok("0.0.0.0:7"), "0.0.0.0:7");
        assert_eq!(ok("*:7"), "0.0.0.0:7");
        assert_eq!(ok(":7"), "0.0.0.0:7");
        assert_eq!(ok("[::]:7"), "[::]:7");
        assert_eq!(ok("localhost:7"), "127.0.0.1:7");
        assert_eq!(ok("[::1]:7"), "[::1]:7");
        for bad in ["50051", "example.com:1", "1.2.3.4:99999", "1.2.3.4:x"] {
            let err = parse_listen_addr(bad).unwrap_err().to_string();
            assert!(err.contains("server_listen_addr"), "{bad}: {err}");
        }
    }

    #[test]
    fn wildcard_binds_are_dialled_as_localhost() {
        assert_eq!(client_addr("0.0.0.0:5000".parse().unwrap()), "localhost:5000");
        assert_eq!(client_addr("[::]:5000".parse().unwrap()), "localhost:5000");
        assert_eq!(client_addr("127.0.0.1:5000".parse().unwrap()), "127.0.0.1:5000");
    }
}
