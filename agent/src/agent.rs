//! The running agent: connection, messaging RPCs and graceful stop. The transport loop that
//! dispatches deliveries lives in [`crate::transport`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use mas_core::envelope::Envelope;
use mas_core::ids::{AgentId, InstanceId};
use mas_net::client::{RuntimeClient, runtime_client};
use mas_net::telemetry;
use mas_proto::runtime::{BatchedSend, DiscoverRequest, ReplyRequest, RequestRequest, SendRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentConfig;
use crate::handler::{HandlerError, Handlers, Message};
use crate::outbox::Outbox;
use crate::requests::Correlations;
use crate::state::TypedState;
use crate::trace;
use crate::transport::{Transport, open_transport};

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
    /// A request got no reply within its timeout (the whole operation is bounded).
    #[error("no reply within {0:?}")]
    RequestTimeout(Duration),
    /// The timeout is not usable (zero, or over i32::MAX milliseconds).
    #[error("request timeout must be between 1 ms and {} ms", i32::MAX)]
    InvalidTimeout,
    /// The message is not a request (no correlation id), so it cannot be replied to.
    #[error("cannot reply: the message has no correlation_id")]
    NotARequest,
    /// The agent was stopped while the operation waited.
    #[error("agent stopped")]
    Stopped,
    /// A state update does not fit the state type, or stored state does not.
    #[error("invalid state: {0}")]
    State(String),
    /// [`Agent::restart`] was called on an agent that is still running.
    #[error("the agent is still running; stop it before starting it again")]
    StillRunning,
    /// The `on_start` hook failed; `on_stop` ran and the agent is stopped.
    #[error("on_start failed: {0}")]
    Start(HandlerError),
}

type HookFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// The agent's typed state, shared between its handlers and hooks (see
/// [`AgentBuilder::with_state`]).
pub type SharedState<T> = Arc<tokio::sync::Mutex<TypedState<T>>>;

type AnyState = Arc<dyn std::any::Any + Send + Sync>;
type StateFuture = Pin<Box<dyn Future<Output = Result<AnyState, AgentError>> + Send>>;

/// Loads the state type registered with [`AgentBuilder::with_state`].
#[derive(Clone)]
struct StateLoader(Arc<dyn Fn(Agent) -> StateFuture + Send + Sync>);

impl std::fmt::Debug for StateLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateLoader")
    }
}

/// A lifecycle hook (`on_start`, `on_stop`): run once per start of the agent.
#[derive(Clone)]
struct Hook(Arc<dyn Fn(Agent) -> HookFuture + Send + Sync>);

impl Hook {
    fn new<F, Fut>(hook: F) -> Hook
    where
        F: Fn(Agent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Hook(Arc::new(move |agent| Box::pin(hook(agent))))
    }

    async fn run(&self, agent: Agent) -> Result<(), HandlerError> {
        (self.0)(agent).await
    }
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
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
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    config: AgentConfig,
    handlers: Handlers,
    on_start: Option<Hook>,
    on_stop: Option<Hook>,
    state: Option<StateLoader>,
}

impl AgentBuilder {
    /// A builder with no handlers.
    pub fn new(config: AgentConfig) -> Self {
        AgentBuilder { config, handlers: Handlers::default(), on_start: None, on_stop: None, state: None }
    }

    /// Gives the agent a typed state `T`, read from the broker during start: after Welcome,
    /// before any delivery reaches a handler and before `on_start`. Fields never written take
    /// `T`'s defaults; a stored state that does not decode into `T` fails the start with
    /// [`AgentError::State`] (after `on_stop`), never silently resetting it. Handlers and hooks
    /// reach it with [`Agent::state`].
    pub fn with_state<T>(mut self) -> Self
    where
        T: Serialize + DeserializeOwned + Default + Send + Sync + 'static,
    {
        self.state = Some(StateLoader(Arc::new(|agent: Agent| {
            Box::pin(async move {
                let state: SharedState<T> = Arc::new(tokio::sync::Mutex::new(TypedState::<T>::load(&agent).await?));
                Ok(state as AnyState)
            })
        })));
        self
    }

    /// Runs `hook` once the transport is ready (after Welcome), before [`AgentBuilder::start`]
    /// returns: the place to load state or send a first message. If it fails, the `on_stop`
    /// hook runs, the agent stops, and `start` returns [`AgentError::Start`]. Deliveries may
    /// already be dispatched to handlers while it runs.
    pub fn on_start<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Agent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.on_start = Some(Hook::new(hook));
        self
    }

    /// Runs `hook` first thing in [`Agent::stop`], while the transport is still up (it may
    /// still send). A failing hook is logged and the stop goes on.
    pub fn on_stop<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Agent) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.on_stop = Some(Hook::new(hook));
        self
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
    /// After that, a lost transport is reopened with backoff (0.1 s doubling to 5 s) under the
    /// same instance id until [`Agent::stop`].
    pub async fn start(mut self) -> Result<Agent, AgentError> {
        let instance_id = self.config.instance_id.clone().unwrap_or_else(random_instance_id);
        // What `Agent::restart` starts again: the same settings, handlers, hooks and instance.
        self.config.instance_id = Some(instance_id.clone());
        let recipe = self.clone();
        let config = self.config;
        let client = runtime_client(connect(&config, &config.endpoint).await?, &config.agent_id);
        let first = open_transport(&config, &instance_id, client.clone()).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let agent = Agent {
            inner: Arc::new(Inner {
                agent_id: config.agent_id.clone(),
                instance_id: instance_id.clone(),
                client: RwLock::new(client.clone()),
                correlations: Correlations::default(),
                outbox: Arc::default(),
                batch_sends: config.batch_sends,
                request_timeout: config.request_timeout,
                stop: stop_tx,
                transport: Mutex::new(None),
                on_stop: Mutex::new(self.on_stop),
                state: std::sync::OnceLock::new(),
                recipe,
            }),
        };
        // The state is in place before the transport task dispatches the first delivery.
        if let Some(loader) = &self.state {
            match (loader.0)(agent.clone()).await {
                Ok(state) => {
                    let _ = agent.inner.state.set(state);
                }
                Err(err) => {
                    drop(first);
                    agent.stop().await;
                    return Err(err);
                }
            }
        }
        let transport = Transport::new(agent.clone(), Arc::new(self.handlers), config, instance_id, stop_rx);
        let task = tokio::spawn(transport.run(first));
        *agent.inner.transport.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        if let Some(hook) = self.on_start
            && let Err(err) = hook.run(agent.clone()).await
        {
            agent.stop().await;
            return Err(AgentError::Start(err));
        }
        Ok(agent)
    }
}

impl AgentBuilder {
    /// Starts `count` instances of this agent in this process (the reference's `instances`):
    /// each has its own instance id and transport, and they share the agent's queue and
    /// state. A configured `instance_id` is ignored (each needs its own). Stops the ones
    /// already started if one fails.
    pub async fn start_instances(self, count: usize) -> Result<Vec<Agent>, AgentError> {
        let mut started = Vec::with_capacity(count);
        for _ in 0..count {
            let mut builder = self.clone();
            builder.config.instance_id = None;
            match builder.start().await {
                Ok(agent) => started.push(agent),
                Err(err) => {
                    for agent in &started {
                        agent.stop().await;
                    }
                    return Err(err);
                }
            }
        }
        Ok(started)
    }
}

/// A running agent. Cheap to clone; every clone is the same agent.
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    agent_id: AgentId,
    instance_id: InstanceId,
    /// Replaced when the transport reconnects to another broker.
    client: RwLock<RuntimeClient>,
    correlations: Correlations,
    /// Sends waiting to share a call, when `batch_sends` is on.
    outbox: Arc<Outbox>,
    batch_sends: bool,
    request_timeout: Duration,
    stop: watch::Sender<bool>,
    transport: Mutex<Option<JoinHandle<()>>>,
    /// Taken by the first stop.
    on_stop: Mutex<Option<Hook>>,
    /// The typed state, when one was registered.
    state: std::sync::OnceLock<AnyState>,
    /// How this agent was started, for [`Agent::restart`].
    recipe: AgentBuilder,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("agent_id", &self.agent_id).field("instance_id", &self.instance_id).finish()
    }
}

/// One agent the caller may message, as discovery shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    /// Its id.
    pub agent_id: String,
    /// Its capabilities (from the broker's configuration).
    pub capabilities: Vec<String>,
    /// Its metadata (from the broker's configuration).
    pub metadata: serde_json::Value,
    /// `ACTIVE`: discovery lists only agents with a live session.
    pub status: String,
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

    pub(crate) fn client(&self) -> RuntimeClient {
        self.inner.client.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_client(&self, client: RuntimeClient) {
        *self.inner.client.write().unwrap_or_else(PoisonError::into_inner) = client;
    }

    pub(crate) fn correlations(&self) -> &Correlations {
        &self.inner.correlations
    }

    /// Sends `data` (which must serialise to a JSON object) to `target`. Returns the message
    /// id the broker assigned. Denials come back as [`AgentError::Rpc`] with the broker's
    /// detail, e.g. `PERMISSION_DENIED not_authorized`.
    pub async fn send(&self, target: &str, message_type: &str, data: &impl Serialize) -> Result<String, AgentError> {
        let data_json = object_json(data)?;
        // A traced send carries its own span's context, so it goes out on its own call;
        // otherwise sends waiting together share one (see `crate::outbox`).
        if self.inner.batch_sends && !telemetry::enabled() {
            let send = BatchedSend { target_id: target.to_string(), message_type: message_type.to_string(), data_json };
            let sent = self.inner.outbox.send(self.client(), self.inner.instance_id.as_str(), send).await;
            return sent.map_err(AgentError::Rpc);
        }
        let request = SendRequest {
            target_id: target.to_string(),
            message_type: message_type.to_string(),
            data_json,
            instance_id: self.inner.instance_id.to_string(),
        };
        let span = trace::client_span("mas.send", self.inner.agent_id.as_str(), Some(target), Some(message_type));
        let call = async { self.client().send(trace::traced(request)).await.map_err(AgentError::Rpc) };
        Ok(trace::client_call(span, call).await?.into_inner().message_id)
    }

    /// Sends a request and waits for its reply. The whole operation (RPC and wait) is bounded
    /// by `timeout`, which is also the broker's deadline for the reply. Only a reply from
    /// `target` is accepted. Returns the reply envelope.
    pub async fn request(
        &self,
        target: &str,
        message_type: &str,
        data: &impl Serialize,
        timeout: Duration,
    ) -> Result<Envelope, AgentError> {
        let timeout_ms =
            i32::try_from(timeout.as_nanos().div_ceil(1_000_000)).map_err(|_| AgentError::InvalidTimeout)?;
        if timeout.is_zero() {
            return Err(AgentError::InvalidTimeout);
        }
        let request = RequestRequest {
            target_id: target.to_string(),
            message_type: message_type.to_string(),
            data_json: object_json(data)?,
            timeout_ms,
            instance_id: self.inner.instance_id.to_string(),
        };
        let span = trace::client_span("mas.request", self.inner.agent_id.as_str(), Some(target), Some(message_type));
        let mut registered = None;
        let exchange = async {
            let response = self.client().request(trace::traced(request)).await.map_err(AgentError::Rpc)?.into_inner();
            let reply =
                self.correlations().register(&response.correlation_id, target).map_err(|_| AgentError::Stopped)?;
            registered = Some(response.correlation_id);
            reply.await.map_err(|_| AgentError::Stopped)
        };
        let bounded =
            async { tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(AgentError::RequestTimeout(timeout))) };
        let result = trace::client_call(span, bounded).await;
        if let Some(cid) = registered {
            self.correlations().unregister(&cid);
        }
        result
    }

    /// [`Agent::request`] with the configured default timeout
    /// ([`AgentConfig::request_timeout`], 60 s unless changed).
    pub async fn ask(&self, target: &str, message_type: &str, data: &impl Serialize) -> Result<Envelope, AgentError> {
        self.request(target, message_type, data, self.inner.request_timeout).await
    }

    /// Replies to `request` (a message that carries a correlation id). An identical retry
    /// returns the original reply's message id; a late one fails with
    /// `FAILED_PRECONDITION correlation_id_expired`.
    pub async fn reply(
        &self,
        request: &Envelope,
        message_type: &str,
        data: &impl Serialize,
    ) -> Result<String, AgentError> {
        let correlation_id = request.meta.correlation_id.clone().ok_or(AgentError::NotARequest)?;
        let reply = ReplyRequest {
            correlation_id,
            message_type: message_type.to_string(),
            data_json: object_json(data)?,
            instance_id: self.inner.instance_id.to_string(),
        };
        let span =
            trace::client_span("mas.reply", self.inner.agent_id.as_str(), Some(&request.sender_id), Some(message_type));
        let call = async { self.client().reply(trace::traced(reply)).await.map_err(AgentError::Rpc) };
        Ok(trace::client_call(span, call).await?.into_inner().message_id)
    }

    /// Agents this agent may message that are live, having any of `capabilities` (all if
    /// empty), sorted by id.
    pub async fn discover(&self, capabilities: &[&str]) -> Result<Vec<AgentInfo>, AgentError> {
        let request = DiscoverRequest { capabilities: capabilities.iter().map(|c| c.to_string()).collect() };
        let span = trace::client_span("mas.discover", self.inner.agent_id.as_str(), None, None);
        let call = async { self.client().discover(trace::traced(request)).await.map_err(AgentError::Rpc) };
        let response = trace::client_call(span, call).await?.into_inner();
        Ok(response
            .agents
            .into_iter()
            .map(|a| AgentInfo {
                metadata: serde_json::from_str(&a.metadata_json).unwrap_or(serde_json::Value::Null),
                agent_id: a.agent_id,
                capabilities: a.capabilities,
                status: a.status,
            })
            .collect())
    }

    /// Stops gracefully: pending requests fail at once with [`AgentError::Stopped`], no new
    /// deliveries are started, running handlers get up to `handler_drain_timeout` to finish,
    /// their acks are flushed, then the transport closes and the broker hands anything
    /// unacknowledged to another instance. The `on_stop` hook runs first, once. Idempotent.
    /// Must not be awaited from inside a
    /// handler of this agent (it waits for handlers to finish).
    pub async fn stop(&self) {
        let on_stop = self.inner.on_stop.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(hook) = on_stop
            && let Err(err) = hook.run(self.clone()).await
        {
            tracing::warn!(error = %err, "on_stop hook failed; stopping anyway");
        }
        self.inner.correlations.close();
        self.inner.stop.send_replace(true);
        let task = self.inner.transport.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(task) = task
            && let Err(err) = task.await
        {
            tracing::warn!(error = %err, "transport task ended abnormally");
        }
    }

    /// The typed state registered with [`AgentBuilder::with_state`], loaded at start.
    pub fn state<T: Send + 'static>(&self) -> Result<SharedState<T>, AgentError> {
        let state = self.inner.state.get().ok_or_else(|| {
            AgentError::State("this agent has no typed state: register one with AgentBuilder::with_state".into())
        })?;
        state
            .clone()
            .downcast::<tokio::sync::Mutex<TypedState<T>>>()
            .map_err(|_| AgentError::State(format!("the agent's state is not a {}", std::any::type_name::<T>())))
    }

    /// Starts a stopped agent again: the same settings, handlers, hooks and instance id, a new
    /// transport and a new Welcome (TLS files are re-read, so rotated certificates apply);
    /// `on_start` runs again. Returns the new handle; this one stays stopped.
    pub async fn restart(&self) -> Result<Agent, AgentError> {
        if self.is_running() {
            return Err(AgentError::StillRunning);
        }
        self.inner.recipe.clone().start().await
    }

    /// Whether the transport task is still running (false after stop).
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
    let mixed = (nanos ^ (u64::from(std::process::id()) << 32))
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let text = format!("{:08x}", (mixed ^ (mixed >> 29)) as u32);
    // Eight hex digits always satisfy the instance id rules.
    InstanceId::new(&text).unwrap_or_else(|_| unreachable!("hex is a valid instance id"))
}

/// Connects to the broker at `url` (TLS files are re-read, so rotated certificates apply).
#[cfg(not(madsim))]
pub(crate) async fn connect(config: &AgentConfig, url: &str) -> Result<Channel, AgentError> {
    mas_net::tls::install_crypto_provider();
    let pem = config.tls.load()?;
    // TCP_NODELAY explicitly (tonic's default today): request/reply is a ping-pong of small
    // frames, which Nagle's algorithm would delay by a delayed-ACK period each.
    let endpoint =
        Endpoint::from_shared(url.to_string())?.tcp_nodelay(true).tls_config(pem.client_config(&config.server_name))?;
    Ok(endpoint.connect().await?)
}

/// Connects to the broker at `url` on the simulated network.
#[cfg(madsim)]
pub(crate) async fn connect(_config: &AgentConfig, url: &str) -> Result<Channel, AgentError> {
    Ok(Endpoint::from_shared(url.to_string())?.connect().await?)
}
