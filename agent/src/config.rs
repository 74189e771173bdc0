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
    /// Sends waiting together share one `SendBatch` call (default on; a lone send is always a
    /// plain `Send`). Off: one `Send` per message, as the reference client does.
    pub batch_sends: bool,
}

impl AgentConfig {
    /// Every broker endpoint, the primary first.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.endpoint.as_str()).chain(self.fallback_endpoints.iter().map(String::as_str))
    }

    /// Settings with the reference's defaults (Welcome 10 s, handler drain 5 s, ack flush 2 s).
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
            batch_sends: true,
        }
    }
}
