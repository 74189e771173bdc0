//! `SendBatch` (ours, additive to `mas.runtime.v1`): many sends of one instance in one call.
//!
//! Each message gets exactly what its own `Send` would: the same input checks, the same
//! pipeline and audit record, the same status on refusal — reported per message in its
//! [`SendOutcome`] instead of failing the call. What a batch saves is per-call work: one
//! session check, one gate read per distinct target, one rate-limit step, and admissions
//! handed to the store together, so the Redis backend commits them to each target's chain in
//! one script call.

use std::sync::Arc;

use futures_util::future::join_all;
use mas_core::envelope::Envelope;
use mas_core::payload::WirePayload;
use mas_core::store::Admission;
use mas_net::status::detail;
use mas_proto::runtime::{SendBatchRequest, SendBatchResponse, SendOutcome};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::admission::{Exchange, Ingress, Outgoing, Passed, Screening};
use super::{Service, caller, spans};

/// The most sends one call may carry: bounds the work and memory of one call (its bytes are
/// bounded by `limits.max_message_bytes` as for every RPC).
pub const MAX_SENDS_PER_BATCH: usize = 1024;

impl Service {
    pub(super) async fn handle_send_batch(
        &self,
        request: Request<SendBatchRequest>,
    ) -> Result<Response<SendBatchResponse>, Status> {
        let started = self.broker.clock().now().mono;
        let sender = caller(&request)?;
        let trace = spans::ingress_context(&request);
        let req = request.into_inner();
        spans::record_parties(sender.as_str(), &req.instance_id, None, None);
        if req.sends.len() > MAX_SENDS_PER_BATCH {
            return Err(Status::invalid_argument(detail::BATCH_TOO_LARGE));
        }
        let sender_instance = self.connected_instance(&sender, &req.instance_id).await?;

        // Input checks first, per message: a malformed one is answered at once and never
        // reaches the policies, as with its own Send. `checks` says per send whether it
        // passed; `checked` holds the index and fresh message id of each that did.
        let mut checks: Vec<Result<(), Status>> = Vec::with_capacity(req.sends.len());
        let mut checked: Vec<(usize, String)> = Vec::with_capacity(req.sends.len());
        let mut payloads: Vec<WirePayload<'_>> = Vec::with_capacity(req.sends.len());
        for (index, send) in req.sends.iter().enumerate() {
            let outgoing = Outgoing {
                instance_id: &req.instance_id,
                target_id: &send.target_id,
                message_type: &send.message_type,
                data_json: &send.data_json,
            };
            checks.push(self.checked_payload(&outgoing).map(|payload| {
                checked.push((index, self.broker.next_message_id()));
                payloads.push(payload);
            }));
        }

        let admitted = async {
            let ingresses: Vec<Ingress<'_>> = checked
                .iter()
                .map(|(index, message_id)| Ingress {
                    sender: &sender,
                    sender_instance: &sender_instance,
                    target_id: &req.sends[*index].target_id,
                    message_type: &req.sends[*index].message_type,
                    correlation_id: None,
                    message_id,
                    started,
                    trace: &trace,
                })
                .collect();
            let decided = self.pass_policies_batch(&ingresses, Exchange::Message, payloads).await?;
            let now = self.broker.clock().now().wall;
            let (sends, sender, sender_instance, trace) = (&req.sends, &sender, &sender_instance, &trace);
            let admissions = decided.into_iter().zip(&checked).map(|(decided, (index, message_id))| async move {
                let Passed { target, payload, record } = match decided {
                    Screening::Passed(passed) => passed,
                    Screening::Refused(refused) => return Err(self.refuse(refused).await),
                };
                let send = &sends[*index];
                let envelope = Envelope::new_send(
                    sender,
                    sender_instance,
                    &target,
                    send.message_type.clone(),
                    payload,
                    message_id.clone(),
                    now,
                )
                .traced(trace.traceparent.clone(), trace.tracestate.clone());
                let envelope = Some(Arc::from(envelope.to_json()));
                self.admit(Admission { chain: target, record, envelope }).await.map(|()| message_id.clone())
            });
            Ok::<_, Status>(join_all(admissions).await)
        };
        let mut decided = admitted.instrument(spans::admission_span()).await?.into_iter();
        let outcomes = checks
            .into_iter()
            .map(|check| match check {
                // The decided results come in the order of the checked sends.
                Ok(()) => decided.next().unwrap_or_else(|| Err(Status::internal("send left undecided"))),
                Err(status) => Err(status),
            })
            .map(outcome)
            .collect();
        Ok(Response::new(SendBatchResponse { outcomes }))
    }
}

/// What a `Send` would have answered, as a batch reports it.
fn outcome(result: Result<String, Status>) -> SendOutcome {
    match result {
        Ok(message_id) => SendOutcome { message_id, code: 0, detail: String::new() },
        Err(status) => {
            SendOutcome { message_id: String::new(), code: status.code() as i32, detail: status.message().to_string() }
        }
    }
}
