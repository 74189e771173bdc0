//! Sends that wait together go out together: while a call to the broker is in flight, further
//! sends of this agent queue here, and the next call carries all of them in one `SendBatch`.
//! A lone send goes out at once as a plain `Send`, so batching never adds latency when idle;
//! under load the per-call cost (HTTP/2 stream, TLS record, the broker's session check, gate
//! and rate-limit steps) is paid once per batch instead of once per message.
//!
//! Each message still gets its own outcome (message id or the status its own `Send` would
//! have got). A broker without `SendBatch` (the reference, or an older mas) answers
//! `UNIMPLEMENTED`; the outbox then sends one by one from there on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mas_net::client::RuntimeClient;
use mas_proto::runtime::{BatchedSend, SendBatchRequest, SendRequest};
use tokio::sync::oneshot;
use tonic::{Code, Status};

/// Most sends in one `SendBatch` (the broker accepts up to 1024).
const MAX_BATCH: usize = 256;
/// Calls in flight at once per agent: enough to keep the connection busy while one batch is
/// decided, few enough that waiting sends gather into large batches.
const MAX_CALLS_IN_FLIGHT: usize = 4;

struct Waiting {
    send: BatchedSend,
    done: oneshot::Sender<Result<String, Status>>,
}

/// The sends of one agent instance waiting for a call to carry them.
#[derive(Default)]
pub(crate) struct Outbox {
    waiting: Mutex<Vec<Waiting>>,
    /// Flusher tasks running (each makes one call at a time).
    flushers: AtomicUsize,
    /// The broker answered `SendBatch` with `UNIMPLEMENTED`.
    unsupported: AtomicBool,
    /// The broker answered a `SendBatch`: no copy of a batch is kept for a fallback any more.
    supported: AtomicBool,
}

impl Outbox {
    /// Queues one send and waits for its outcome. `client` is the connection to use if this
    /// send starts a flusher.
    pub(crate) async fn send(
        self: &Arc<Self>,
        client: RuntimeClient,
        instance_id: &str,
        send: BatchedSend,
    ) -> Result<String, Status> {
        let (done, outcome) = oneshot::channel();
        self.lock().push(Waiting { send, done });
        self.start_flusher(client, instance_id);
        outcome.await.unwrap_or_else(|_| Err(Status::cancelled("the send was dropped with its agent")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a flusher unless enough are running. The flusher is its own task, so a caller
    /// that stops waiting (a cancelled send) never strands the sends queued behind it.
    fn start_flusher(self: &Arc<Self>, client: RuntimeClient, instance_id: &str) {
        if self.take_flusher_slot() {
            tokio::spawn(self.clone().flush(client, instance_id.to_string()));
        }
    }

    /// Counts one more flusher, unless [`MAX_CALLS_IN_FLIGHT`] are running.
    fn take_flusher_slot(&self) -> bool {
        let taken = self
            .flushers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_CALLS_IN_FLIGHT).then_some(n + 1));
        taken.is_ok()
    }

    async fn flush(self: Arc<Self>, mut client: RuntimeClient, instance_id: String) {
        loop {
            let batch: Vec<Waiting> = {
                let mut waiting = self.lock();
                let take = waiting.len().min(MAX_BATCH);
                waiting.drain(..take).collect()
            };
            if batch.is_empty() {
                self.flushers.fetch_sub(1, Ordering::AcqRel);
                // A send queued after the drain but before the count went down found every
                // flusher busy; make sure someone takes it.
                if !self.lock().is_empty() && self.take_flusher_slot() {
                    continue;
                }
                return;
            }
            self.call(&mut client, &instance_id, batch).await;
        }
    }

    /// One call for `batch`: a plain `Send` for one message (or when the broker has no
    /// `SendBatch`), else a `SendBatch`; every waiting sender gets its outcome.
    async fn call(&self, client: &mut RuntimeClient, instance_id: &str, batch: Vec<Waiting>) {
        if batch.len() == 1 || self.unsupported.load(Ordering::Relaxed) {
            for Waiting { send, done } in batch {
                let request = SendRequest {
                    target_id: send.target_id,
                    message_type: send.message_type,
                    data_json: send.data_json,
                    instance_id: instance_id.to_string(),
                };
                let outcome = client.send(request).await.map(|response| response.into_inner().message_id);
                let _ = done.send(outcome);
            }
            return;
        }
        let (sends, done): (Vec<BatchedSend>, Vec<_>) = batch.into_iter().map(|w| (w.send, w.done)).unzip();
        let request = SendBatchRequest { instance_id: instance_id.to_string(), sends };
        // Until the broker is known to have SendBatch, keep the sends to fall back on.
        let fallback = (!self.supported.load(Ordering::Relaxed)).then(|| request.sends.clone());
        match client.send_batch(request).await {
            Ok(response) => {
                self.supported.store(true, Ordering::Relaxed);
                let mut outcomes = response.into_inner().outcomes.into_iter();
                for done in done {
                    let outcome = match outcomes.next() {
                        Some(o) if o.code == 0 => Ok(o.message_id),
                        Some(o) => Err(Status::new(Code::from(o.code), o.detail)),
                        None => Err(Status::internal("the broker answered fewer sends than it was sent")),
                    };
                    let _ = done.send(outcome);
                }
            }
            Err(status) if status.code() == Code::Unimplemented && fallback.is_some() => {
                tracing::info!("the broker has no SendBatch; sending one message per call");
                self.unsupported.store(true, Ordering::Relaxed);
                let sends = fallback.unwrap_or_default();
                let batch = sends.into_iter().zip(done).map(|(send, done)| Waiting { send, done }).collect();
                Box::pin(self.call(client, instance_id, batch)).await;
            }
            Err(status) => {
                for done in done {
                    let _ = done.send(Err(status.clone()));
                }
            }
        }
    }
}
