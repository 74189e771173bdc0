//! One agent instance's `Transport` stream: a task that owns the session's delivery machine
//! and drives it from the agent's acks, the store's queues, timers, lease renewal and the
//! shutdown signal.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use mas_core::delivery::{Output, QueuedMessage, SessionDelivery, StoreEffect};
use mas_core::ids::DeliveryId;
use mas_core::store::{SessionRef, StoreError};
use mas_net::status::detail;
use mas_proto::runtime::{ClientEvent, Delivery, ServerEvent, client_event, server_event};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::broker::Broker;
use crate::service::Generation;

/// How long one claim waits for work before the loop re-checks its other inputs. Only bounds
/// idle wake-ups; new work wakes the claim at once.
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Most inbound events taken in one turn before their store effects are applied.
const ACK_BATCH_MAX: usize = 256;

/// Sends events to the agent. Its capacity exceeds the delivery window, so a send never waits
/// for the agent: deliveries are bounded by the window, not by this channel.
pub type Outbound = mpsc::Sender<Result<ServerEvent, Status>>;

type ClaimFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<QueuedMessage>, StoreError>> + Send>>;

/// What ended a session's loop.
enum End {
    /// The agent closed its side or the connection broke.
    Disconnected,
    /// The agent broke the protocol, or the broker must close the stream; the agent is told why.
    Abort(Status),
    /// A drain completed.
    Drained,
}

/// Runs a session until it ends, then hands back what is still in flight, releases its lease
/// and deregisters it.
pub async fn run(
    broker: Arc<Broker>,
    session: SessionRef,
    seed: u64,
    generation: Generation,
    inbound: Streaming<ClientEvent>,
    outbound: Outbound,
) {
    let machine = SessionDelivery::new(broker.config().delivery.machine_config(), seed);
    let mut task = Session { broker: broker.clone(), session, generation, machine, outbound };
    let end = task.drive(inbound).await;
    task.finish(end).await;
}

struct Session {
    broker: Arc<Broker>,
    session: SessionRef,
    generation: Generation,
    machine: SessionDelivery,
    outbound: Outbound,
}

impl Session {
    async fn drive(&mut self, mut inbound: Streaming<ClientEvent>) -> End {
        let mut shutdown = self.broker.shutdown_signal();
        let lease = self.broker.config().session_lease.clone();
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + lease.renewal(), lease.renewal());
        // The lease is ours until this instant unless renewed; past it we must stop delivering.
        let mut lease_valid_until = tokio::time::Instant::now() + lease.ttl();
        let mut draining = false;
        // A claim in progress. It lives across loop turns and is never dropped half-way: with
        // Redis, a claim that was sent has claimed its entries whether or not we read the
        // answer, so abandoning it would strand them until the session ends.
        let mut claim: Option<ClaimFuture> = None;
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
            if claim.is_none() && self.machine.capacity() > 0 && !draining {
                claim = Some(self.start_claim());
            }
            let timer = self.machine.poll_timeout().map(|(at, _)| self.broker.clock().to_tokio(at));
            let outbound = self.outbound.clone();
            tokio::select! {
                biased;
                _ = shutdown.changed(), if !draining => {}
                event = inbound.message() => {
                    if let Some(end) = self.on_inbound(event, &mut inbound).await {
                        return end;
                    }
                }
                _ = renew.tick() => match self.broker.store().renew_lease(&self.session, lease.ttl()).await {
                    Ok(true) => lease_valid_until = tokio::time::Instant::now() + lease.ttl(),
                    Ok(false) => return End::Abort(Status::unavailable(detail::SESSION_LEASE_LOST)),
                    Err(err) => {
                        tracing::warn!(agent = %self.session.agent, error = %err, "lease renewal failed");
                        if tokio::time::Instant::now() + lease.renewal() >= lease_valid_until {
                            return End::Abort(Status::unavailable(detail::SESSION_LEASE_LOST));
                        }
                    }
                },
                _ = sleep_until(timer), if timer.is_some() => {
                    self.machine.handle_timeout(self.broker.clock().now());
                }
                batch = async { claim.as_mut().expect("guarded by is_some").await }, if claim.is_some() => {
                    claim = None;
                    match batch {
                        Ok(batch) => {
                            let now = self.broker.clock().now();
                            for message in batch {
                                // Beyond the window (or while draining) the machine hands it back.
                                self.machine.handle_queued(now, message);
                            }
                        }
                        Err(StoreError::NotOwner) => return End::Abort(Status::unavailable(detail::SESSION_LEASE_LOST)),
                        Err(err) => {
                            tracing::warn!(agent = %self.session.agent, error = %err, "claim failed");
                            return End::Abort(Status::unavailable(detail::STORAGE_UNAVAILABLE));
                        }
                    }
                }
                _ = outbound.closed() => return End::Disconnected,
            }
        }
    }

    fn start_claim(&self) -> ClaimFuture {
        let store = self.broker.store().clone();
        let session = self.session.clone();
        let capacity = self.machine.capacity();
        Box::pin(async move { store.claim(&session, capacity, CLAIM_WAIT).await })
    }

    /// Handles one inbound event and then every further event already received, so that a
    /// burst of acks becomes one batch of store effects (one round trip), not one each.
    async fn on_inbound(
        &mut self,
        first: Result<Option<ClientEvent>, Status>,
        inbound: &mut Streaming<ClientEvent>,
    ) -> Option<End> {
        let mut event = first;
        for _ in 0..ACK_BATCH_MAX {
            match event {
                Ok(Some(e)) => {
                    if let Err(violation) = self.on_client_event(e) {
                        return Some(End::Abort(violation));
                    }
                }
                Ok(None) | Err(_) => return Some(End::Disconnected),
            }
            match already_arrived(inbound).await {
                Some(next) => event = next,
                None => break,
            }
        }
        None
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
                let retryable = match self.generation {
                    Generation::Runtime => nack.retryable,
                    Generation::MasV1 => crate::service::mas_v1::nack_retryable(&nack.reason, nack.retryable),
                };
                self.machine.handle_nack(now, &id, &nack.reason, retryable);
                Ok(())
            }
            Some(client_event::Event::Hello(_) | client_event::Event::Heartbeat(_)) | None => {
                Err(Status::invalid_argument(detail::EXPECTED_ACK_OR_NACK))
            }
        }
    }

    /// Acts on every pending output: deliveries go to the agent, store effects go to the store
    /// in one batch. Returns how the session ends if an output ends it.
    async fn flush(&mut self) -> Option<End> {
        let mut effects = Vec::new();
        let mut end = None;
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
                        end = Some(End::Disconnected);
                    }
                }
                Output::Store(effect) => effects.push(effect),
                Output::Drained => end = Some(End::Drained),
            }
        }
        if let Err(err) = self.apply(effects).await {
            tracing::warn!(agent = %self.session.agent, error = %err, "store effects failed");
            return Some(End::Abort(Status::unavailable(detail::STORAGE_UNAVAILABLE)));
        }
        end
    }

    /// Applies effects; entries fenced off (reclaimed by another session) are only logged.
    /// A store failure leaves the entries claimed by us; they are reclaimed once our lease ends.
    async fn apply(&self, effects: Vec<StoreEffect>) -> Result<(), StoreError> {
        if effects.is_empty() {
            return Ok(());
        }
        let now = self.broker.clock().now();
        let results = self.broker.store().apply(&self.session, effects, now, self.broker.circuit()).await?;
        let fenced = results.iter().filter(|r| r.is_err()).count();
        if fenced > 0 {
            self.broker.count_fenced(fenced as u64);
            tracing::debug!(agent = %self.session.agent, fenced, "store effects fenced off");
        }
        Ok(())
    }

    async fn finish(mut self, end: End) {
        self.machine.handle_disconnect(self.broker.clock().now());
        // Only hand-backs remain; a closed session delivers nothing more.
        let effects: Vec<StoreEffect> = std::iter::from_fn(|| self.machine.poll_output())
            .filter_map(|o| if let Output::Store(e) = o { Some(e) } else { None })
            .collect();
        if let Err(err) = self.apply(effects).await {
            tracing::warn!(agent = %self.session.agent, error = %err, "hand-back failed; work returns when the lease ends");
        }
        match self.broker.store().release(&self.session).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(agent = %self.session.agent, n, "released entries the session still held"),
            Err(err) => tracing::warn!(agent = %self.session.agent, error = %err, "release failed"),
        }
        tracing::debug!(stats = ?self.machine.stats(), agent = %self.session.agent, instance = %self.session.instance, "session ended");
        if let End::Abort(status) = end {
            if status.message() == detail::SESSION_LEASE_LOST {
                self.broker.count_lease_lost();
            }
            tracing::info!(agent = %self.session.agent, instance = %self.session.instance, status = %status.message(), "session aborted");
            let _ = self.outbound.send(Err(status)).await;
        }
        self.broker.close_session(&self.session).await;
    }
}

/// The stream's next event if it has already arrived; never waits.
///
/// Not `timeout(Duration::ZERO, …)`: a zero timeout that is not ready arms a timer, and the
/// timer wheel fires it at the next millisecond tick, so every burst of acks stalled the
/// session loop for up to 1 ms (about 0.9 ms on each hop of a request/reply).
async fn already_arrived(inbound: &mut Streaming<ClientEvent>) -> Option<Result<Option<ClientEvent>, Status>> {
    let mut next = std::pin::pin!(inbound.message());
    std::future::poll_fn(|cx| match next.as_mut().poll(cx) {
        Poll::Ready(event) => Poll::Ready(Some(event)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
