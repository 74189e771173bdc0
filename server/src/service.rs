//! The gRPC service: thin handlers that authenticate, validate, decide and hand work to the
//! store or a session task.

use std::pin::Pin;
use std::sync::Arc;

use mas_core::envelope::{Envelope, parse_payload};
use mas_core::ids::{AgentId, InstanceId};
use mas_net::identity::peer_agent;
use mas_net::status::{self, detail};
use mas_proto::v1::runtime_service_server::RuntimeService;
use mas_proto::v1::{
    ClientEvent, DiscoverRequest, DiscoverResponse, GetStateRequest, GetStateResponse, ReplyRequest, ReplyResponse,
    RequestRequest, RequestResponse, ResetStateRequest, ResetStateResponse, SendRequest, SendResponse, ServerEvent,
    UpdateStateRequest, UpdateStateResponse, Welcome, client_event, server_event,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::broker::{Broker, OpenError};
use crate::session;

/// The authenticated, allowlisted caller, put into request extensions by [`authenticate`].
#[derive(Debug, Clone)]
pub struct Caller(pub AgentId);

/// Interceptor run before every RPC: identity from the peer certificate (or the simulated
/// identity header), then the allowlist. Denials carry the reference's details.
pub fn authenticate(broker: &Broker, mut req: Request<()>) -> Result<Request<()>, Status> {
    let agent = peer_agent(&req).map_err(|err| {
        tracing::info!(reason = %err, "authentication denied");
        status::identity_denied(err)
    })?;
    if broker.agent(&agent).is_none() {
        tracing::info!(%agent, "agent not allowlisted");
        return Err(Status::unauthenticated(detail::AGENT_NOT_ALLOWLISTED));
    }
    req.extensions_mut().insert(Caller(agent));
    Ok(req)
}

fn caller<T>(req: &Request<T>) -> Result<AgentId, Status> {
    // Absent only if the service was mounted without the interceptor: fail closed.
    req.extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .ok_or_else(|| Status::unauthenticated(detail::AGENT_NOT_ALLOWLISTED))
}

fn instance(id: &str) -> Result<InstanceId, Status> {
    InstanceId::new(id).map_err(|_| Status::invalid_argument(detail::INVALID_INSTANCE_ID))
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented by this broker yet"))
}

/// The `RuntimeService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    broker: Arc<Broker>,
}

impl Service {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Service { broker }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ServerEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RuntimeService for Service {
    type TransportStream = EventStream;

    async fn transport(
        &self,
        request: Request<Streaming<ClientEvent>>,
    ) -> Result<Response<Self::TransportStream>, Status> {
        let agent = caller(&request)?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            None => return Err(Status::invalid_argument(detail::MISSING_HELLO)),
            Some(ClientEvent { event: Some(client_event::Event::Hello(hello)) }) => hello,
            Some(_) => return Err(Status::invalid_argument(detail::EXPECTED_HELLO)),
        };
        let instance = instance(&hello.instance_id)?;
        let key = (agent.clone(), instance.clone());
        let (owner, seed) = self.broker.open_session(key.clone()).map_err(|err| match err {
            OpenError::AlreadyConnected => Status::failed_precondition(detail::INSTANCE_ALREADY_CONNECTED),
            OpenError::ShuttingDown => Status::unavailable(detail::BROKER_SHUTTING_DOWN),
        })?;
        tracing::info!(%agent, %instance, "session opened");
        // Room for a full window plus Welcome and a final error: sends never wait on the agent.
        let (tx, rx) = mpsc::channel(self.broker.config().delivery.max_in_flight + 2);
        let welcome = ServerEvent {
            event: Some(server_event::Event::Welcome(Welcome {
                agent_id: agent.to_string(),
                instance_id: instance.to_string(),
            })),
        };
        // Cannot fail: the channel is fresh and has room.
        let _ = tx.try_send(Ok(welcome));
        tokio::spawn(session::run(self.broker.clone(), key, owner, seed, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let sender = caller(&request)?;
        let req = request.into_inner();
        let sender_instance = instance(&req.instance_id)?;
        if self.broker.is_shutting_down() {
            return Err(Status::unavailable(detail::BROKER_SHUTTING_DOWN));
        }
        if !self.broker.is_connected(&(sender.clone(), sender_instance.clone())) {
            return Err(Status::failed_precondition(detail::SESSION_NOT_CONNECTED));
        }
        let data = parse_payload(&req.data_json).map_err(status::payload_invalid)?;
        let target = self.authorize(&sender, &req.target_id)?;
        let message_id = self.broker.next_message_id();
        let envelope = Envelope::new_send(
            &sender,
            &sender_instance,
            &target,
            req.message_type,
            data,
            message_id.clone(),
            self.broker.clock().now().wall,
        );
        self.broker
            .store()
            .enqueue(&target, Arc::from(envelope.to_json()))
            .map_err(|err| status::store_failed(&err))?;
        Ok(Response::new(SendResponse { message_id }))
    }

    async fn request(&self, _: Request<RequestRequest>) -> Result<Response<RequestResponse>, Status> {
        Err(not_yet("Request"))
    }

    async fn reply(&self, _: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        Err(not_yet("Reply"))
    }

    async fn discover(&self, _: Request<DiscoverRequest>) -> Result<Response<DiscoverResponse>, Status> {
        Err(not_yet("Discover"))
    }

    async fn get_state(&self, _: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
        Err(not_yet("GetState"))
    }

    async fn update_state(&self, _: Request<UpdateStateRequest>) -> Result<Response<UpdateStateResponse>, Status> {
        Err(not_yet("UpdateState"))
    }

    async fn reset_state(&self, _: Request<ResetStateRequest>) -> Result<Response<ResetStateResponse>, Status> {
        Err(not_yet("ResetState"))
    }
}

impl Service {
    /// Deny by default: the target must be allowlisted and named by the sender's grants.
    fn authorize(&self, sender: &AgentId, target_id: &str) -> Result<AgentId, Status> {
        let denied = || {
            tracing::info!(%sender, target = target_id, "send not authorized");
            Status::permission_denied(detail::NOT_AUTHORIZED)
        };
        let target = AgentId::new(target_id).map_err(|_| denied())?;
        let grants = self.broker.agent(sender).ok_or_else(denied)?;
        if self.broker.agent(&target).is_none() || !grants.may_send_to(&target) {
            return Err(denied());
        }
        Ok(target)
    }
}
