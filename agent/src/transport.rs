//! The transport loop: keeps one `Transport` stream open (reopening it with backoff when the
//! broker goes away), hands deliveries to handlers, routes replies to waiting requests, and
//! sends acks and nacks back.

use std::sync::Arc;
use std::time::Duration;

use mas_core::envelope::Envelope;
use mas_core::ids::InstanceId;
use mas_net::client::RuntimeClient;
use mas_proto::runtime::{Ack, ClientEvent, Hello, Nack, ServerEvent, client_event, server_event};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::agent::{Agent, AgentError, connect};
use crate::config::AgentConfig;
use crate::handler::{Handlers, Outcome};

/// Events queued towards the broker (acks, nacks) at most; the reference uses the same bound.
const OUTGOING_CAPACITY: usize = 2000;
const RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// An open transport: where acks go, and where deliveries come from.
pub(crate) type Connection = (mpsc::Sender<ClientEvent>, Streaming<ServerEvent>);

/// Says Hello and waits for Welcome.
pub(crate) async fn open_transport(
    config: &AgentConfig,
    instance_id: &InstanceId,
    mut client: RuntimeClient,
) -> Result<Connection, AgentError> {
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

/// How one connection ended.
enum Ended {
    /// `stop()` was called; the connection was closed gracefully.
    Stopped,
    /// The broker closed the stream or the connection broke.
    Lost,
}

/// The transport loop's state; consumed by [`Transport::run`].
pub(crate) struct Transport {
    agent: Agent,
    handlers: Arc<Handlers>,
    config: AgentConfig,
    instance_id: InstanceId,
    stop: watch::Receiver<bool>,
}

impl Transport {
    pub(crate) fn new(
        agent: Agent,
        handlers: Arc<Handlers>,
        config: AgentConfig,
        instance_id: InstanceId,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Transport { agent, handlers, config, instance_id, stop }
    }

    /// Opens a transport on the `attempt`-th endpoint (round robin over all configured), and
    /// makes the agent's RPCs use that broker too.
    async fn reopen(&self, attempt: usize) -> Result<Connection, AgentError> {
        let endpoints: Vec<&str> = self.config.endpoints().collect();
        let url = endpoints[attempt % endpoints.len()];
        let client = mas_net::client::runtime_client(connect(&self.config, url).await?, &self.config.agent_id);
        let connection = open_transport(&self.config, &self.instance_id, client.clone()).await?;
        self.agent.set_client(client);
        tracing::info!(instance = %self.instance_id, broker = url, "transport reopened");
        Ok(connection)
    }

    /// Serves `first`, then keeps reconnecting until stopped. Pending requests survive a
    /// reconnect: their replies wait in this instance's reply queue at the broker.
    pub(crate) async fn run(mut self, first: Connection) {
        let mut connection = Some(first);
        let mut backoff = RECONNECT_BACKOFF_INITIAL;
        let mut attempt = 0usize;
        loop {
            let current = match connection.take() {
                Some(c) => c,
                None => match self.reopen(attempt).await {
                    Ok(c) => {
                        backoff = RECONNECT_BACKOFF_INITIAL;
                        c
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, ?backoff, "reconnect failed");
                        tokio::select! {
                            _ = self.stop.wait_for(|s| *s) => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                        attempt += 1;
                        continue;
                    }
                },
            };
            match self.serve(current).await {
                Ended::Stopped => return,
                Ended::Lost => tracing::warn!(instance = %self.instance_id, "transport interrupted; reconnecting"),
            }
        }
    }

    async fn serve(&mut self, (outgoing, mut inbound): Connection) -> Ended {
        let limit = self.config.max_concurrent_handlers.max(1);
        let permits = Arc::new(Semaphore::new(limit));
        let mut running: Vec<JoinHandle<()>> = Vec::new();
        let stopped = loop {
            // Take a handler slot first, so a busy agent stops reading and the broker's
            // window, not our memory, absorbs the backlog.
            let permit = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => break true,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break true,
                },
            };
            let event = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => break true,
                event = inbound.message() => event,
            };
            let delivery = match event {
                Ok(Some(ServerEvent { event: Some(server_event::Event::Delivery(d)) })) => d,
                Ok(Some(_)) => continue,
                Ok(None) => break false,
                Err(status) => {
                    tracing::warn!(code = ?status.code(), detail = status.message(), "transport failed");
                    break false;
                }
            };
            let envelope = match Envelope::from_json(&delivery.envelope_json) {
                Ok(envelope) => envelope,
                Err(err) => {
                    let nack = Outcome::Nack { reason: format!("invalid_envelope:{err}"), retryable: false };
                    let _ = outgoing.send(settle(delivery.delivery_id, nack)).await;
                    continue;
                }
            };
            if let (true, Some(cid)) = (envelope.meta.is_reply, envelope.meta.correlation_id.clone()) {
                // Replies never reach handlers: route them, and ack at once.
                crate::trace::reply_received(self.agent.agent_id().as_str(), &envelope);
                self.agent.correlations().deliver(&cid, envelope);
                let _ = outgoing.send(settle(delivery.delivery_id, Outcome::Ack)).await;
                continue;
            }
            let (agent, handlers, outgoing) = (self.agent.clone(), self.handlers.clone(), outgoing.clone());
            running.retain(|task| !task.is_finished());
            let span = crate::trace::handler_span(agent.agent_id().as_str(), &envelope);
            running.push(tokio::spawn(async move {
                let outcome = handlers.dispatch(agent, envelope).instrument(span).await;
                let _ = outgoing.send(settle(delivery.delivery_id, outcome)).await;
                drop(permit);
            }));
        };
        if !stopped {
            // The deliveries of a lost stream cannot be acked any more; the broker hands them
            // to another instance (or to us again after reconnecting).
            for task in &running {
                task.abort();
            }
            return Ended::Lost;
        }
        self.drain(permits, limit, running).await;
        drop(outgoing);
        // Our side is closed after the last ack; wait for the broker to close its side, which
        // it does once it has processed them.
        let closed = async { while let Ok(Some(_)) = inbound.message().await {} };
        if tokio::time::timeout(self.config.ack_flush_timeout, closed).await.is_err() {
            tracing::warn!("broker did not close the transport in time");
        }
        Ended::Stopped
    }

    /// Lets running handlers finish, bounded by the drain timeout; the rest are aborted and
    /// their messages redelivered.
    async fn drain(&self, permits: Arc<Semaphore>, limit: usize, running: Vec<JoinHandle<()>>) {
        let all_slots = u32::try_from(limit).unwrap_or(u32::MAX);
        if tokio::time::timeout(self.config.handler_drain_timeout, permits.acquire_many(all_slots)).await.is_err() {
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
    }
}

fn settle(delivery_id: String, outcome: Outcome) -> ClientEvent {
    let event = match outcome {
        Outcome::Ack => client_event::Event::Ack(Ack { delivery_id }),
        Outcome::Nack { reason, retryable } => client_event::Event::Nack(Nack { delivery_id, reason, retryable }),
    };
    ClientEvent { event: Some(event) }
}
