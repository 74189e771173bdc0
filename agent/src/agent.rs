//! The running agent: connection, the transport loop that dispatches deliveries to handlers
//! and returns their acks, sending, and graceful stop.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mas_core::envelope::Envelope;
use mas_core::ids::{AgentId, InstanceId};
use mas_net::client::{RuntimeClient, runtime_client};
use mas_proto::v1::{Ack, ClientEvent, Hello, Nack, SendRequest, ServerEvent, client_event, server_event};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::config::AgentConfig;
use crate::handler::{HandlerError, Handlers, Message, Outcome};

/// Events queued towards the broker (acks, nacks) at most; the reference uses the same bound.
const OUTGOING_CAPACITY: usize = 2000;

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A TLS file could not be read.
    #[cfg(not(madsim))]
    #[error(transparent)]
    Tls(#[from] mas_net::tls::TlsFileError),
    /// The connection could not be made.
    #[error("cannot connect to the broker: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The broker refused the transport (e.g. `instance_already_connected`, `agent_not_allowlisted`).
    #[error("broker refused the session: {} {}", .0.code(), .0.message())]
    Refused(Status),
    /// No Welcome within the configured time.
    #[error("no Welcome from the broker within {0:?}")]
    WelcomeTimeout(Duration),
    /// The broker authenticated us as someone else than configured.
    #[error("broker identified this agent as {actual}, but it is configured as {expected}")]
    IdentityMismatch {
        /// Configured id.
        expected: AgentId,
        /// Id in the Welcome.
        actual: String,
    },
    /// An RPC failed; the status carries the broker's detail (e.g. `not_authorized`).
    #[error("{} {}", .0.code(), .0.message())]
    Rpc(Status),
    /// The payload could not be serialised, or is not a JSON object.
    #[error("payload must serialise to a JSON object: {0}")]
    Payload(String),
}

impl AgentError {
    /// The gRPC status, if the broker answered with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            AgentError::Refused(s) | AgentError::Rpc(s) => Some(s),
            _ => None,
        }
    }
}

/// Collects handlers, then connects.
#[derive(Debug)]
pub struct AgentBuilder {
    config: AgentConfig,
    handlers: Handlers,
}

impl AgentBuilder {
    /// A builder with no handlers.
    pub fn new(config: AgentConfig) -> Self {
        AgentBuilder { config, handlers: Handlers::default() }
    }

    /// Handles `message_type` with a typed handler; see [`Handlers::on`].
    pub fn on<T, F, Fut>(mut self, message_type: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Agent, Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.on(message_type, handler);
        self
    }

    /// Handles every other message type; see [`Handlers::fallback`].
    pub fn fallback<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Agent, Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.fallback(handler);
        self
    }

    /// Connects, opens the transport (Hello → Welcome) and starts dispatching deliveries.
    pub async fn start(self) -> Result<Agent, AgentError> {
        let config = self.config;
        let instance_id = config.instance_id.clone().unwrap_or_else(random_instance_id);
        let channel = connect(&config).await?;
        let client = runtime_client(channel, &config.agent_id);
        let (outgoing, inbound) = open_transport(&config, &instance_id, client.clone()).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let agent = Agent {
            inner: Arc::new(Inner {
                agent_id: config.agent_id.clone(),
                instance_id,
                client,
                stop: stop_tx,
                transport: Mutex::new(None),
            }),
        };
        let transport = Transport {
            agent: agent.clone(),
            handlers: Arc::new(self.handlers),
            config,
            inbound,
            outgoing,
            stop: stop_rx,
        };
        let task = tokio::spawn(transport.run());
        *agent.inner.transport.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(agent)
    }
}

/// A running agent. Cheap to clone; every clone is the same agent.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    agent_id: AgentId,
    instance_id: InstanceId,
    client: RuntimeClient,
    stop: watch::Sender<bool>,
    transport: Mutex<Option<JoinHandle<()>>>,
}

impl Agent {
    /// This agent's id.
    pub fn agent_id(&self) -> &AgentId {
        &self.inner.agent_id
    }

    /// This process's instance id.
    pub fn instance_id(&self) -> &InstanceId {
        &self.inner.instance_id
    }

    /// Sends `data` (which must serialise to a JSON object) to `target`. Returns the message
    /// id the broker assigned. Denials come back as [`AgentError::Rpc`] with the broker's
    /// detail, e.g. `PERMISSION_DENIED not_authorized`.
    pub async fn send(&self, target: &str, message_type: &str, data: &impl Serialize) -> Result<String, AgentError> {
        let data_json = object_json(data)?;
        let request = SendRequest {
            target_id: target.to_string(),
            message_type: message_type.to_string(),
            data_json,
            instance_id: self.inner.instance_id.to_string(),
        };
        let mut client = self.inner.client.clone();
        let response = client.send(request).await.map_err(AgentError::Rpc)?;
        Ok(response.into_inner().message_id)
    }

    /// Stops gracefully: no new deliveries are started, running handlers get up to
    /// `handler_drain_timeout` to finish, their acks are flushed, then the transport closes and
    /// the broker hands anything unacknowledged to another instance. Idempotent. Must not be
    /// awaited from inside a handler of this agent (it waits for handlers to finish).
    pub async fn stop(&self) {
        self.inner.stop.send_replace(true);
        let task = self.inner.transport.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task
            && let Err(err) = task.await
        {
            tracing::warn!(error = %err, "transport task ended abnormally");
        }
    }

    /// Whether the transport is still running (false after stop or after the broker closed it).
    pub fn is_running(&self) -> bool {
        self.inner.transport.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_some_and(|t| !t.is_finished())
    }
}

fn object_json(data: &impl Serialize) -> Result<String, AgentError> {
    match serde_json::to_value(data) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(value.to_string()),
        Ok(other) => Err(AgentError::Payload(format!("got {}", json_kind(&other)))),
        Err(err) => Err(AgentError::Payload(err.to_string())),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// 8 hex characters, like the reference client. Seeded from the clock (virtual under
/// simulation, so reproducible there) mixed with a process-wide counter.
fn random_instance_id() -> InstanceId {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mixed = (nanos ^ u64::from(std::process::id()) << 32)
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let text = format!("{:08x}", (mixed ^ (mixed >> 29)) as u32);
    // Eight hex digits always satisfy the instance id rules.
    InstanceId::new(&text).unwrap_or_else(|_| unreachable!("hex is a valid instance id"))
}

#[cfg(not(madsim))]
async fn connect(config: &AgentConfig) -> Result<Channel, AgentError> {
    mas_net::tls::install_crypto_provider();
    let pem = config.tls.load()?;
    let endpoint =
        Endpoint::from_shared(config.endpoint.clone())?.tls_config(pem.client_config(&config.server_name))?;
    Ok(endpoint.connect().await?)
}

#[cfg(madsim)]
async fn connect(config: &AgentConfig) -> Result<Channel, AgentError> {
    Ok(Endpoint::from_shared(config.endpoint.clone())?.connect().await?)
}

/// Says Hello and waits for Welcome.
async fn open_transport(
    config: &AgentConfig,
    instance_id: &InstanceId,
    mut client: RuntimeClient,
) -> Result<(mpsc::Sender<ClientEvent>, Streaming<ServerEvent>), AgentError> {
    let (outgoing, rx) = mpsc::channel(OUTGOING_CAPACITY);
    let hello = ClientEvent { event: Some(client_event::Event::Hello(Hello { instance_id: instance_id.to_string() })) };
    // Cannot fail: the channel is fresh and its receiver alive.
    let _ = outgoing.try_send(hello);
    let welcome = async {
        let mut inbound = client.transport(ReceiverStream::new(rx)).await.map_err(AgentError::Refused)?.into_inner();
        match inbound.message().await.map_err(AgentError::Refused)? {
            Some(ServerEvent { event: Some(server_event::Event::Welcome(w)) }) => {
                if w.agent_id != config.agent_id.as_str() {
                    return Err(AgentError::IdentityMismatch { expected: config.agent_id.clone(), actual: w.agent_id });
                }
                Ok(inbound)
            }
            _ => Err(AgentError::Refused(Status::unavailable("transport closed before Welcome"))),
        }
    };
    match tokio::time::timeout(config.welcome_timeout, welcome).await {
        Ok(inbound) => Ok((outgoing, inbound?)),
        Err(_) => Err(AgentError::WelcomeTimeout(config.welcome_timeout)),
    }
}

/// The transport loop's state; consumed by [`Transport::run`].
struct Transport {
    agent: Agent,
    handlers: Arc<Handlers>,
    config: AgentConfig,
    inbound: Streaming<ServerEvent>,
    outgoing: mpsc::Sender<ClientEvent>,
    stop: watch::Receiver<bool>,
}

impl Transport {
    async fn run(mut self) {
        let limit = self.config.max_concurrent_handlers.max(1);
        let permits = Arc::new(Semaphore::new(limit));
        let mut running: Vec<JoinHandle<()>> = Vec::new();
        let broker_closed = loop {
            // Take a handler slot first, so a full agent stops reading and the broker's
            // window, not our memory, absorbs the backlog.
            let permit = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => break false,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break false,
                },
            };
            let event = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => break false,
                event = self.inbound.message() => event,
            };
            match event {
                Ok(Some(ServerEvent { event: Some(server_event::Event::Delivery(d)) })) => {
                    let (agent, handlers, outgoing) =
                        (self.agent.clone(), self.handlers.clone(), self.outgoing.clone());
                    running.retain(|task| !task.is_finished());
                    running.push(tokio::spawn(async move {
                        let outcome = handlers.dispatch(agent, &d.envelope_json).await;
                        let _ = outgoing.send(settle(d.delivery_id, outcome)).await;
                        drop(permit);
                    }));
                }
                Ok(Some(_)) => {}
                Ok(None) => break true,
                Err(status) => {
                    tracing::warn!(code = ?status.code(), detail = status.message(), "transport failed");
                    break true;
                }
            }
        };
        self.finish(permits, limit, running, broker_closed).await;
    }

    /// Lets running handlers finish (bounded), then closes our side after the last ack so the
    /// broker sees every ack before the end of the stream, and waits for it to close its side.
    async fn finish(
        mut self,
        permits: Arc<Semaphore>,
        limit: usize,
        running: Vec<JoinHandle<()>>,
        broker_closed: bool,
    ) {
        let all_slots = u32::try_from(limit).unwrap_or(u32::MAX);
        let all_done = permits.acquire_many(all_slots);
        if tokio::time::timeout(self.config.handler_drain_timeout, all_done).await.is_err() {
            let still = running.iter().filter(|t| !t.is_finished()).count();
            tracing::warn!(
                still_running = still,
                "handlers did not finish in time; their messages will be redelivered"
            );
            for task in &running {
                task.abort();
            }
            for task in running {
                let _ = task.await;
            }
        }
        drop(self.outgoing);
        if broker_closed {
            return;
        }
        let closed = async { while let Ok(Some(_)) = self.inbound.message().await {} };
        if tokio::time::timeout(self.config.ack_flush_timeout, closed).await.is_err() {
            tracing::warn!("broker did not close the transport in time");
        }
    }
}

fn settle(delivery_id: String, outcome: Outcome) -> ClientEvent {
    let event = match outcome {
        Outcome::Ack => client_event::Event::Ack(Ack { delivery_id }),
        Outcome::Nack { reason, retryable } => client_event::Event::Nack(Nack { delivery_id, reason, retryable }),
    };
    ClientEvent { event: Some(event) }
}
