//! One agent instance's `Transport` stream: a task that owns the session's delivery machine
//! and drives it from the agent's acks, the store's queue, timers and the shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use mas_core::delivery::{Output, SessionDelivery};
use mas_core::ids::DeliveryId;
use mas_core::store::{OwnerToken, StoreError};
use mas_net::status::detail;
use mas_proto::v1::{ClientEvent, Delivery, ServerEvent, client_event, server_event};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::broker::{Broker, SessionKey};

/// How long one claim waits for work before the loop re-checks its other inputs. Only bounds
/// idle wake-ups; new work wakes the claim at once.
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Sends events to the agent. Its capacity exceeds the delivery window, so a send never waits
/// for the agent: deliveries are bounded by the window, not by this channel.
pub type Outbound = mpsc::Sender<Result<ServerEvent, Status>>;

/// What ended a session's loop.
enum End {
    /// The agent closed its side or the connection broke.
    Disconnected,
    /// The agent broke the protocol; it is told why.
    Violation(Status),
    /// A drain completed.
    Drained,
    /// The agent stopped reading deliveries (its response stream is gone).
    OutboundClosed,
}

/// Runs a session until it ends, then hands back what is still in flight and deregisters it.
pub async fn run(
    broker: Arc<Broker>,
    key: SessionKey,
    owner: OwnerToken,
    seed: u64,
    inbound: Streaming<ClientEvent>,
    outbound: Outbound,
) {
    let machine = SessionDelivery::new(broker.config().delivery.machine_config(), seed);
    let mut session = Session { broker: broker.clone(), key, owner, machine, outbound };
    let end = session.drive(inbound).await;
    session.finish(end).await;
}

struct Session {
    broker: Arc<Broker>,
    key: SessionKey,
    owner: OwnerToken,
    machine: SessionDelivery,
    outbound: Outbound,
}

impl Session {
    async fn drive(&mut self, mut inbound: Streaming<ClientEvent>) -> End {
        let mut shutdown = self.broker.shutdown_signal();
        let mut draining = false;
        loop {
            if let Some(end) = self.flush().await {
                return end;
            }
            if !draining && *shutdown.borrow_and_update() {
                draining = true;
                let now = self.broker.clock().now();
                self.machine.handle_drain(now, now.mono + self.broker.config().delivery.drain_timeout());
                continue;
            }
            let timer = self.machine.poll_timeout().map(|(at, _)| self.broker.clock().to_tokio(at));
            let capacity = self.machine.capacity();
            let store = self.broker.store().clone();
            let clock = *self.broker.clock();
            let agent = self.key.0.clone();
            let owner = self.owner.clone();
            tokio::select! {
                biased;
                _ = shutdown.changed(), if !draining => {}
                event = inbound.message() => match event {
                    Ok(Some(event)) => {
                        if let Err(violation) = self.on_client_event(event) {
                            return End::Violation(violation);
                        }
                    }
                    Ok(None) | Err(_) => return End::Disconnected,
                },
                _ = sleep_until(timer), if timer.is_some() => {
                    self.machine.handle_timeout(self.broker.clock().now());
                }
                batch = store.claim(&clock, &agent, &owner, capacity, CLAIM_WAIT), if capacity > 0 && !draining => {
                    let now = self.broker.clock().now();
                    for message in batch {
                        self.machine.handle_queued(now, message);
                    }
                }
                _ = self.outbound.closed() => return End::OutboundClosed,
            }
        }
    }

    fn on_client_event(&mut self, event: ClientEvent) -> Result<(), Status> {
        let now = self.broker.clock().now();
        match event.event {
            Some(client_event::Event::Ack(ack)) => {
                self.machine.handle_ack(now, &DeliveryId::from_wire(&ack.delivery_id));
                Ok(())
            }
            Some(client_event::Event::Nack(nack)) => {
                let id = DeliveryId::from_wire(&nack.delivery_id);
                self.machine.handle_nack(now, &id, &nack.reason, nack.retryable);
                Ok(())
            }
            Some(client_event::Event::Hello(_) | client_event::Event::Heartbeat(_)) | None => {
                Err(Status::invalid_argument(detail::EXPECTED_ACK_OR_NACK))
            }
        }
    }

    /// Acts on every pending output. Returns how the session ends if an output ends it.
    async fn flush(&mut self) -> Option<End> {
        while let Some(output) = self.machine.poll_output() {
            match output {
                Output::Deliver(d) => {
                    let event = ServerEvent {
                        event: Some(server_event::Event::Delivery(Delivery {
                            delivery_id: d.delivery_id.to_string(),
                            envelope_json: d.envelope.to_string(),
                        })),
                    };
                    if self.outbound.send(Ok(event)).await.is_err() {
                        return Some(End::OutboundClosed);
                    }
                }
                Output::Store(effect) => self.apply(effect),
                Output::Drained => return Some(End::Drained),
            }
        }
        None
    }

    fn apply(&self, effect: mas_core::delivery::StoreEffect) {
        match self.broker.store().apply(&self.key.0, &self.owner, effect) {
            Ok(()) => {}
            // Another session owns the entry now (or it was settled): fencing did its job.
            Err(StoreError::NotOwner) => tracing::debug!(agent = %self.key.0, "store effect fenced off"),
            Err(err) => {
                tracing::warn!(agent = %self.key.0, error = %err, "store effect failed; entry stays claimed until released")
            }
        }
    }

    async fn finish(mut self, end: End) {
        let now = self.broker.clock().now();
        self.machine.handle_disconnect(now);
        // Hand-backs only; a closed outbound cannot receive deliveries any more.
        while let Some(output) = self.machine.poll_output() {
            if let Output::Store(effect) = output {
                self.apply(effect);
            }
        }
        let leftover = self.broker.store().release_owner(self.broker.clock(), &self.key.0, &self.owner);
        if leftover > 0 {
            tracing::warn!(agent = %self.key.0, leftover, "released entries the session still held");
        }
        let stats = self.machine.stats();
        match end {
            End::Violation(status) => {
                tracing::info!(agent = %self.key.0, instance = %self.key.1, status = %status.message(), "protocol violation");
                let _ = self.outbound.send(Err(status)).await;
            }
            End::Drained => tracing::debug!(agent = %self.key.0, instance = %self.key.1, "session drained"),
            End::Disconnected | End::OutboundClosed => {
                tracing::debug!(agent = %self.key.0, instance = %self.key.1, "session disconnected")
            }
        }
        tracing::debug!(?stats, "session ended");
        self.broker.close_session(&self.key, &self.owner);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
