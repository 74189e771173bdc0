//! `mas.v1.MasService`, the earlier wire generation (mas-framework 0.4.x, the release on PyPI),
//! as a thin adapter over the `mas.runtime.v1` handlers: the same authentication, policies,
//! audit records and delivery rules, because it is the same code.
//!
//! Its messages are the runtime messages on the wire (see `proto/mas_v1.proto`). What differs:
//! - state has no revisions: a 0.4 client never sends `expected_revision`, so its updates are
//!   unconditional per-field merges and its resets unconditional; the revisions we return are
//!   fields it does not know and skips;
//! - its NACKs are read by [`nack_retryable`].

use tonic::{Request, Response, Status, Streaming};

use mas_proto::mas_v1::mas_service_server::MasService;
use mas_proto::runtime::runtime_service_server::RuntimeService;
use mas_proto::runtime::{
    ClientEvent, DiscoverRequest, DiscoverResponse, GetStateRequest, GetStateResponse, ReplyRequest, ReplyResponse,
    RequestRequest, RequestResponse, ResetStateRequest, ResetStateResponse, SendRequest, SendResponse,
    UpdateStateRequest, UpdateStateResponse,
};

use crate::metrics::Method;

use super::{EventResponse, EventStream, Generation, Service};

/// The reason a 0.4 client gives when a handler's payload model rejected the message
/// (pydantic's `ValidationError`): redelivering it cannot help.
const PAYLOAD_MODEL_REJECTED: &str = "handler_error:ValidationError";

/// Whether a NACK from a 0.4 client is retryable. That client NACKs *every* handler exception
/// as non-retryable (`handler_error:{Exception}`), so a transient failure went straight to the
/// dead-letter queue, although its README promised redelivery; later clients fixed this by
/// retrying handler errors except payload-model failures. We apply that rule to 0.4 clients:
/// handler errors are retried within `max_delivery_attempts`, a payload-model failure and every
/// other NACK keep the client's flag (an unparseable envelope stays non-retryable).
pub(crate) fn nack_retryable(reason: &str, retryable: bool) -> bool {
    retryable || (reason.starts_with("handler_error:") && reason != PAYLOAD_MODEL_REJECTED)
}

/// The `MasService` implementation: every RPC is the runtime handler of the same name.
#[derive(Debug, Clone)]
pub struct MasV1Service(Service);

impl MasV1Service {
    /// The earlier generation over the same service (and so the same broker).
    pub fn new(service: Service) -> Self {
        MasV1Service(service)
    }
}

#[tonic::async_trait]
impl MasService for MasV1Service {
    type TransportStream = EventStream;

    async fn transport(&self, mut request: Request<Streaming<ClientEvent>>) -> EventResponse {
        let span = super::spans::rpc_span(Method::transport, &mut request);
        self.0.observed(Method::transport, span, self.0.open_transport(request, Generation::MasV1)).await
    }

    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        self.0.send(request).await
    }

    async fn request(&self, request: Request<RequestRequest>) -> Result<Response<RequestResponse>, Status> {
        self.0.request(request).await
    }

    async fn reply(&self, request: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        self.0.reply(request).await
    }

    async fn discover(&self, request: Request<DiscoverRequest>) -> Result<Response<DiscoverResponse>, Status> {
        self.0.discover(request).await
    }

    async fn get_state(&self, request: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
        self.0.get_state(request).await
    }

    async fn update_state(
        &self,
        request: Request<UpdateStateRequest>,
    ) -> Result<Response<UpdateStateResponse>, Status> {
        self.0.update_state(request).await
    }

    async fn reset_state(&self, request: Request<ResetStateRequest>) -> Result<Response<ResetStateResponse>, Status> {
        self.0.reset_state(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::nack_retryable;

    #[test]
    fn handler_errors_of_04_clients_are_retried_except_payload_model_failures() {
        assert!(nack_retryable("handler_error:RuntimeError", false));
        assert!(nack_retryable("handler_error:KeyError", false));
        assert!(!nack_retryable("handler_error:ValidationError", false));
        assert!(!nack_retryable("invalid_envelope:ValidationError", false));
        assert!(!nack_retryable("poison", false));
        assert!(nack_retryable("anything", true), "a retryable NACK stays retryable");
    }
}
