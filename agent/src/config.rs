//! Agent connection settings.

use std::time::Duration;

use mas_core::ids::{AgentId, InstanceId};

/// How an agent reaches the broker and how it behaves at the edges of its life.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This agent's id; must equal the identity in its certificate (checked against Welcome).
    pub agent_id: AgentId,
    /// This process's instance id; random 8 hex characters when `None`.
    pub instance_id: Option<InstanceId>,
    /// Broker URL, e.g. `https://127.0.0.1:50051` (`http://` under simulation).
    pub endpoint: String,
    /// Other brokers sharing the same store, tried in turn when the transport must be reopened.
    pub fallback_endpoints: Vec<String>,
    /// Name expected in the broker's certificate.
    pub server_name: String,
    /// CA, certificate and key files (production only; simulation has no TLS).
    #[cfg(not(madsim))]
    pub tls: mas_net::tls::TlsFiles,
    /// Handlers running at once; further deliveries wait (the broker's window bounds them too).
    pub max_concurrent_handlers: usize,
    /// How long the transport may take to say Welcome.
    pub welcome_timeout: Duration,
    /// On stop: how long running handlers may take to finish.
    pub handler_drain_timeout: Duration,
    /// On stop: how long to wait for the broker to confirm it has our last acks.
    pub ack_flush_timeout: Duration,
    /// The timeout of [`crate::Agent::ask`] (default 60 s, the reference's
    /// `DEFAULT_REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Sends waiting together share one `SendBatch` call (default on; a lone send is always a
    /// plain `Send`). Off: one `Send` per message, as the reference client does.
    pub batch_sends: bool,
}

impl AgentConfig {
    /// Every broker endpoint, the primary first.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.endpoint.as_str()).chain(self.fallback_endpoints.iter().map(String::as_str))
    }

    /// Settings with the reference's defaults (Welcome 10 s, handler drain 5 s, ack flush 2 s,
    /// request timeout 60 s).
    pub fn new(
        agent_id: AgentId,
        endpoint: impl Into<String>,
        #[cfg(not(madsim))] tls: mas_net::tls::TlsFiles,
    ) -> Self {
        AgentConfig {
            agent_id,
            instance_id: None,
            endpoint: endpoint.into(),
            fallback_endpoints: Vec::new(),
            server_name: "localhost".to_string(),
            #[cfg(not(madsim))]
            tls,
            max_concurrent_handlers: 64,
            welcome_timeout: Duration::from_secs(10),
            handler_drain_timeout: Duration::from_secs(5),
            ack_flush_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
            batch_sends: true,
        }
    }
}

/// What `mas run` tells an agent process, in its environment (the names are a contract the
/// README documents; the broker's runner sets them).
pub mod env {
    /// `host:port` of the broker.
    pub const SERVER_ADDR: &str = "MAS_SERVER_ADDR";
    /// The agent id.
    pub const AGENT_ID: &str = "MAS_AGENT_ID";
    /// Which of the entry's `instances` this process is, from 0.
    pub const INSTANCE_INDEX: &str = "MAS_INSTANCE_INDEX";
    /// The CA the broker's certificate chains to.
    pub const TLS_CA_PATH: &str = "MAS_TLS_CA_PATH";
    /// The agent's certificate.
    pub const TLS_CERT_PATH: &str = "MAS_TLS_CERT_PATH";
    /// The agent's private key.
    pub const TLS_KEY_PATH: &str = "MAS_TLS_KEY_PATH";
    /// The entry's `init_kwargs`, a JSON object.
    pub const INIT_KWARGS: &str = "MAS_INIT_KWARGS";
}

/// A setting `mas run` should have put in the environment is missing or malformed.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The variable is not set (is this process running under `mas run`?).
    #[error("{0} is not set (agents started by `mas run` get it from the runner)")]
    Missing(&'static str),
    /// The variable's value is unusable.
    #[error("{name}: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

#[cfg(not(madsim))]
fn var(name: &'static str) -> Result<String, EnvError> {
    std::env::var(name).map_err(|_| EnvError::Missing(name))
}

impl AgentConfig {
    /// The settings `mas run` passes an agent process: broker address, agent id and TLS files.
    #[cfg(not(madsim))]
    pub fn from_env() -> Result<AgentConfig, EnvError> {
        let agent_id = var(env::AGENT_ID)?;
        let agent_id = AgentId::new(&agent_id)
            .map_err(|err| EnvError::Invalid { name: env::AGENT_ID, reason: err.to_string() })?;
        let server_addr = var(env::SERVER_ADDR)?;
        let host = match server_addr.rsplit_once(':') {
            Some((host, _)) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => {
                return Err(EnvError::Invalid {
                    name: env::SERVER_ADDR,
                    reason: format!("{server_addr:?} is not host:port"),
                });
            }
        };
        let tls = mas_net::tls::TlsFiles {
            ca: var(env::TLS_CA_PATH)?.into(),
            cert: var(env::TLS_CERT_PATH)?.into(),
            key: var(env::TLS_KEY_PATH)?.into(),
        };
        let mut config = AgentConfig::new(agent_id, format!("https://{server_addr}"), tls);
        config.server_name = host;
        Ok(config)
    }
}

/// The entry's `init_kwargs` from the environment, decoded into `T` (an empty object when
/// the variable is absent, so `T`'s defaults apply outside `mas run`).
pub fn init_kwargs<T: serde::de::DeserializeOwned>() -> Result<T, EnvError> {
    let text = std::env::var(env::INIT_KWARGS).unwrap_or_else(|_| "{}".to_string());
    serde_json::from_str(&text).map_err(|err| EnvError::Invalid { name: env::INIT_KWARGS, reason: err.to_string() })
}

/// Which of its entry's `instances` this process is (0 outside `mas run`).
pub fn instance_index() -> Result<u32, EnvError> {
    match std::env::var(env::INSTANCE_INDEX) {
        Err(_) => Ok(0),
        Ok(text) => text
            .parse()
            .map_err(|_| EnvError::Invalid { name: env::INSTANCE_INDEX, reason: format!("{text:?} is not a number") }),
    }
}

/// Resolves on SIGTERM (how `mas run`, systemd and Kubernetes stop a process) or SIGINT; an
/// agent's `main` awaits it, then calls [`crate::Agent::stop`]. Never resolves if the signal
/// handlers cannot be installed.
#[cfg(not(madsim))]
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
