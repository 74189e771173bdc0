//! The gRPC service: thin handlers that authenticate, validate, decide and hand work to the
//! store or a session task.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mas_core::envelope::{Envelope, Payload};
use mas_core::ids::{AgentId, InstanceId};
use mas_core::limits::LimitExceeded;
use mas_core::payload::WirePayload;
use mas_core::policy::dlp::Action;
use mas_core::reply::{self, ReplyRefusal, ReplyRoute};
use mas_core::store::{Admission, PendingRequest, ReplyCommit, ReplyReceipt, SessionRef, StateError, StoreError};
use mas_net::identity::PeerIdentities;
use mas_net::status::{self, detail};
use mas_proto::runtime::runtime_service_server::RuntimeService;
use mas_proto::runtime::{
    AgentRecord, ClientEvent, DiscoverRequest, DiscoverResponse, GetStateRequest, GetStateResponse, ReplyRequest,
    ReplyResponse, RequestRequest, RequestResponse, ResetStateRequest, ResetStateResponse, SendBatchRequest,
    SendBatchResponse, SendRequest, SendResponse, ServerEvent, UpdateStateRequest, UpdateStateResponse, Welcome,
    client_event, server_event,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::broker::{Broker, OpenError};
use crate::metrics::Method;
use crate::session;
use crate::store::PendingAhead;

mod admission;
pub(crate) mod mas_v1;
mod send_batch;
mod spans;

pub use mas_v1::MasV1Service;
pub use send_batch::MAX_SENDS_PER_BATCH;

use admission::{Exchange, Ingress, Outgoing, Screened};

/// A request's pending lifetime when the client gives `timeout_ms = 0` (reference default).
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Who is calling, put into request extensions by [`authenticate`]: the authenticated,
/// allowlisted agent, or the refusal its certificate earned.
#[derive(Debug, Clone)]
pub struct Caller(pub Result<AgentId, Status>);

/// Interceptor run before every RPC: identity from the peer certificate (or the simulated
/// identity header), then the allowlist. Denials carry the reference's details and are
/// audited here; they are returned by the handler (`caller`), never by the interceptor,
/// so that a `Transport` stream is refused only after its `Hello` was read (see
/// `Service::open_transport`).
pub fn authenticate(broker: &Broker, peers: &PeerIdentities, mut req: Request<()>) -> Result<Request<()>, Status> {
    let caller = identify(broker, peers, &req);
    req.extensions_mut().insert(Caller(caller));
    Ok(req)
}

/// Denials are audited and logged once per peer identity and reason per window, with a count
/// of the repeats in between (see [`crate::audit::AuditTrail::denial`]).
fn identify(broker: &Broker, peers: &PeerIdentities, req: &Request<()>) -> Result<AgentId, Status> {
    let denied = |key: &str, details: serde_json::Value| {
        broker.audit().denial(key, "authentication_denied", details, broker.clock().now())
    };
    let agent = peers.peer_agent(req).map_err(|err| {
        let reason = err.to_string();
        if denied(&reason, serde_json::json!({ "reason": reason })) {
            tracing::info!(%reason, "authentication denied (repeats within 10 s are counted, not logged)");
        }
        status::identity_denied(err)
    })?;
    if broker.agent(&agent).is_none() {
        let details = serde_json::json!({ "agent": agent.as_str(), "reason": detail::AGENT_NOT_ALLOWLISTED });
        if denied(&format!("{}/{agent}", detail::AGENT_NOT_ALLOWLISTED), details) {
            tracing::info!(%agent, "agent not allowlisted (repeats within 10 s are counted, not logged)");
        }
        return Err(Status::unauthenticated(detail::AGENT_NOT_ALLOWLISTED));
    }
    Ok(agent)
}

fn caller<T>(req: &Request<T>) -> Result<AgentId, Status> {
    // Absent only if the service was mounted without the interceptor: fail closed.
    req.extensions()
        .get::<Caller>()
        .map_or_else(|| Err(Status::unauthenticated(detail::AGENT_NOT_ALLOWLISTED)), |c| c.0.clone())
}

fn instance(id: &str) -> Result<InstanceId, Status> {
    InstanceId::new(id).map_err(|_| Status::invalid_argument(detail::INVALID_INSTANCE_ID))
}

fn store_failed(err: mas_core::store::StoreError) -> Status {
    status::store_failed(&err)
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

    /// Validates the instance id and that it holds a live session (here or on a broker
    /// sharing the store), and that the broker is taking messages.
    async fn connected_instance(&self, agent: &AgentId, instance_id: &str) -> Result<InstanceId, Status> {
        let instance = instance(instance_id)?;
        if self.broker.is_shutting_down() {
            return Err(Status::unavailable(detail::BROKER_SHUTTING_DOWN));
        }
        if !self.broker.is_connected(&(agent.clone(), instance.clone())).await.map_err(store_failed)? {
            return Err(Status::failed_precondition(detail::SESSION_NOT_CONNECTED));
        }
        Ok(instance)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ServerEvent, Status>> + Send + 'static>>;
type EventResponse = Result<Response<EventStream>, Status>;

/// The wire generation a client speaks. Both run the same handlers; they differ only in how a
/// `Transport` stream's NACKs are read (see `mas_v1::nack_retryable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// `mas.runtime.v1.RuntimeService` (mas-framework 0.5 and later).
    Runtime,
    /// `mas.v1.MasService` (mas-framework 0.4.x).
    MasV1,
}

impl Service {
    /// Serves an instance's `Transport` stream: `Hello` first, then the session task takes the
    /// stream over. A refusal is returned only after the `Hello` was read, even for a caller
    /// refused at authentication: a status that overtakes the client's first write makes grpc
    /// C-core clients report `INTERNAL "Internal error from Core"` instead of it (about one
    /// refused stream in ten on a new connection).
    async fn open_transport(&self, request: Request<Streaming<ClientEvent>>, generation: Generation) -> EventResponse {
        let agent = caller(&request);
        let mut inbound = request.into_inner();
        let hello = read_hello(&mut inbound).await;
        let opened = match (agent, hello) {
            (Ok(agent), Ok(instance)) => self.open_session(agent, instance).await,
            (Err(status), _) | (_, Err(status)) => Err(status),
        };
        let (session, seed) = opened?;
        tracing::info!(agent = %session.agent, instance = %session.instance, ?generation, "session opened");
        // Room for a full window plus Welcome and a final error: sends never wait on the agent.
        let (tx, rx) = mpsc::channel(self.broker.config().delivery.max_in_flight + 2);
        let welcome = ServerEvent {
            event: Some(server_event::Event::Welcome(Welcome {
                agent_id: session.agent.to_string(),
                instance_id: session.instance.to_string(),
            })),
        };
        // Cannot fail: the channel is fresh and has room.
        let _ = tx.try_send(Ok(welcome));
        tokio::spawn(session::run(self.broker.clone(), session, seed, generation, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Opens the session of `agent`'s `instance`.
    async fn open_session(&self, agent: AgentId, instance: InstanceId) -> Result<(SessionRef, u64), Status> {
        let key = (agent, instance);
        self.broker.open_session(key.clone()).await.map_err(|err| match err {
            OpenError::AlreadyConnected => Status::failed_precondition(detail::INSTANCE_ALREADY_CONNECTED),
            OpenError::ShuttingDown => Status::unavailable(detail::BROKER_SHUTTING_DOWN),
            OpenError::TooManySessions => {
                tracing::warn!(agent = %key.0, "session refused: the agent holds limits.max_sessions_per_agent sessions");
                Status::resource_exhausted(detail::TOO_MANY_SESSIONS)
            }
            OpenError::Store(err) => store_failed(err),
        })
    }
}

/// How long a new `Transport` stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a stream's first event, which must be a `Hello` with a valid instance id.
async fn read_hello(inbound: &mut Streaming<ClientEvent>) -> Result<InstanceId, Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::invalid_argument(detail::MISSING_HELLO))?;
    match first? {
        None => Err(Status::invalid_argument(detail::MISSING_HELLO)),
        Some(ClientEvent { event: Some(client_event::Event::Hello(hello)) }) => instance(&hello.instance_id),
        Some(_) => Err(Status::invalid_argument(detail::EXPECTED_HELLO)),
    }
}

/// The RPC handlers, each timed and counted by [`Service::observed`].
impl Service {
    async fn handle_send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let started = self.broker.clock().now().mono;
        let sender = caller(&request)?;
        let trace = spans::ingress_context(&request);
        let req = request.into_inner();
        spans::record_parties(sender.as_str(), &req.instance_id, Some(&req.target_id), Some(&req.message_type));
        let outgoing = Outgoing {
            instance_id: &req.instance_id,
            target_id: &req.target_id,
            message_type: &req.message_type,
            data_json: &req.data_json,
        };
        let admitted = async {
            let sender_instance = self.connected_instance(&sender, outgoing.instance_id).await?;
            let Screened { sender_instance, message_id, passed } =
                self.screen_outgoing(started, &sender, sender_instance, outgoing, None, &trace).await?;
            let now = self.broker.clock().now().wall;
            let envelope = Envelope::new_send(
                &sender,
                &sender_instance,
                &passed.target,
                req.message_type.clone(),
                passed.payload,
                message_id.clone(),
                now,
            )
            .traced(trace.traceparent.clone(), trace.tracestate.clone());
            let envelope = Some(Arc::from(envelope.to_json()));
            self.admit(Admission { chain: passed.target, record: passed.record, envelope }).await?;
            Ok::<_, Status>(message_id)
        };
        let message_id = admitted.instrument(spans::admission_span()).await?;
        Ok(Response::new(SendResponse { message_id }))
    }

    async fn handle_request(&self, request: Request<RequestRequest>) -> Result<Response<RequestResponse>, Status> {
        let started = self.broker.clock().now().mono;
        let sender = caller(&request)?;
        let trace = spans::ingress_context(&request);
        let req = request.into_inner();
        spans::record_parties(sender.as_str(), &req.instance_id, Some(&req.target_id), Some(&req.message_type));
        let longest = self.broker.config().limits.max_request_timeout_ms;
        let timeout = match req.timeout_ms {
            ms if ms < 0 => return Err(Status::invalid_argument(detail::INVALID_TIMEOUT_MS)),
            0 => DEFAULT_REQUEST_TIMEOUT.min(Duration::from_millis(longest)),
            ms if u64::from(ms.unsigned_abs()) > longest => {
                return Err(Status::invalid_argument(detail::TIMEOUT_MS_TOO_LARGE));
            }
            ms => Duration::from_millis(ms.unsigned_abs().into()),
        };
        let correlation_id = self.broker.next_correlation_id(&sender);
        let outgoing = Outgoing {
            instance_id: &req.instance_id,
            target_id: &req.target_id,
            message_type: &req.message_type,
            data_json: &req.data_json,
        };
        let admitted = async {
            let sender_instance = self.connected_instance(&sender, outgoing.instance_id).await?;
            // The pending record is written while the policies run (the reference writes it
            // before them too), and forgotten again if they refuse the request.
            let ahead = self.begin_request(&sender, &sender_instance, &req.target_id, &correlation_id, timeout);
            let screen = self.screen_outgoing(
                started,
                &sender,
                sender_instance.clone(),
                outgoing,
                Some(&correlation_id),
                &trace,
            );
            let (screened, ahead) = tokio::join!(screen, ahead);
            let screened = match screened {
                Ok(screened) => screened,
                Err(status) => {
                    if let Ok(ahead) = ahead {
                        self.broker.store().abandon_request(&sender, &correlation_id, ahead).await;
                    }
                    return Err(status);
                }
            };
            let ahead = ahead.map_err(store_failed)?;
            let Screened { sender_instance, message_id, passed } = screened;
            let now = self.broker.clock().now().wall;
            let envelope = Envelope::new_request(
                &sender,
                &sender_instance,
                &passed.target,
                req.message_type.clone(),
                passed.payload,
                message_id.clone(),
                correlation_id.clone(),
                now,
            )
            .traced(trace.traceparent.clone(), trace.tracestate.clone());
            let target = passed.target;
            let pending = PendingRequest {
                requester: sender.clone(),
                requester_instance: sender_instance,
                target: target.clone(),
            };
            let envelope = Some(Arc::from(envelope.to_json()));
            let admission = Admission { chain: target.clone(), record: passed.record, envelope };
            let committed = self
                .broker
                .store()
                .open_request(&correlation_id, pending, timeout, admission, self.broker.circuit(), ahead)
                .await;
            admission::routed(&self.recorded(&target, committed)?)?;
            Ok::<_, Status>(message_id)
        };
        let message_id = admitted.instrument(spans::admission_span()).await?;
        Ok(Response::new(RequestResponse { message_id, correlation_id }))
    }

    /// [`crate::store::Store::begin_request`] for a request to `target_id`; nothing when that
    /// is no agent id (the policies refuse it).
    async fn begin_request(
        &self,
        sender: &AgentId,
        sender_instance: &InstanceId,
        target_id: &str,
        correlation_id: &str,
        timeout: Duration,
    ) -> Result<PendingAhead, StoreError> {
        let Ok(target) = AgentId::new(target_id) else { return Ok(PendingAhead::Deferred) };
        let pending = PendingRequest { requester: sender.clone(), requester_instance: sender_instance.clone(), target };
        self.broker.store().begin_request(correlation_id, &pending, timeout).await
    }

    async fn handle_reply(&self, request: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        let started = self.broker.clock().now().mono;
        let sender = caller(&request)?;
        let trace = spans::ingress_context(&request);
        let req = request.into_inner();
        spans::record_parties(sender.as_str(), &req.instance_id, None, Some(&req.message_type));
        let sender_instance = self.connected_instance(&sender, &req.instance_id).await?;
        let limits = self.broker.config().limits.input();
        limits.check_message_type(&req.message_type).map_err(status::limit_exceeded)?;
        limits.check_payload(&req.data_json).map_err(status::limit_exceeded)?;
        let data = WirePayload::parse(&req.data_json).map_err(status::payload_invalid)?;
        let requester = reply::requester_of(&req.correlation_id).map_err(status::reply_refused)?;
        let fingerprint = reply::fingerprint(&sender, &req.message_type, &data);
        let correlation =
            self.broker.store().correlation(&requester, &req.correlation_id).await.map_err(store_failed)?;
        let pending = match reply::route(correlation, &sender, &fingerprint) {
            Ok(ReplyRoute::Answer(pending)) => pending,
            Ok(ReplyRoute::AlreadyAnswered { message_id }) => return Ok(Response::new(ReplyResponse { message_id })),
            Err(refusal) => {
                if refusal == ReplyRefusal::SenderMismatch {
                    tracing::info!(%sender, "reply from someone other than the request's target");
                }
                return Err(status::reply_refused(refusal));
            }
        };
        // The request authorized this exchange: a reply needs no grant of its own (the
        // reference requires one, which breaks one-way grants). It is still rate-limited and
        // screened, and a refusal leaves the request pending for a better answer.
        let message_id = self.broker.next_message_id();
        let ingress = Ingress {
            sender: &sender,
            sender_instance: &sender_instance,
            target_id: pending.requester.as_str(),
            message_type: &req.message_type,
            correlation_id: Some(&req.correlation_id),
            message_id: &message_id,
            started,
            trace: &trace,
        };
        let passed = self
            .pass_policies(&ingress, Exchange::Reply(&pending.requester), data)
            .instrument(spans::admission_span())
            .await?;
        let envelope = Envelope::new_reply(
            &sender,
            &sender_instance,
            &pending.requester,
            &pending.requester_instance,
            req.message_type,
            passed.payload,
            message_id.clone(),
            req.correlation_id.clone(),
            self.broker.clock().now().wall,
        )
        .traced(trace.traceparent.clone(), trace.tracestate.clone());
        let receipt = ReplyReceipt { sender, fingerprint, message_id };
        let committed = self
            .broker
            .store()
            .commit_reply(&req.correlation_id, &pending, receipt, Arc::from(envelope.to_json()), passed.record)
            .await
            .map_err(|err| self.audit_step_failed(&pending.requester, err))?;
        match committed {
            Ok((commit, record)) => {
                if let Some(record) = record {
                    self.committed(&pending.requester, &record);
                }
                let (ReplyCommit::Queued { message_id } | ReplyCommit::AlreadyQueued { message_id }) = commit;
                Ok(Response::new(ReplyResponse { message_id }))
            }
            Err(err) => Err(status::reply_refused(ReplyRefusal::from(err))),
        }
    }

    async fn handle_discover(&self, request: Request<DiscoverRequest>) -> Result<Response<DiscoverResponse>, Status> {
        let sender = caller(&request)?;
        let wanted = request.into_inner().capabilities;
        // Exactly what authorization allows; the allowlist is a BTreeMap, so sorted by id.
        let candidates: Vec<_> = self
            .broker
            .config()
            .agents
            .iter()
            .filter(|(id, _)| self.broker.authorize(&sender, id, true).is_ok())
            .filter(|(_, def)| wanted.is_empty() || def.capabilities.iter().any(|c| wanted.contains(c)))
            .collect();
        let ids: Vec<AgentId> = candidates.iter().map(|(id, _)| (*id).clone()).collect();
        let live = self.broker.store().live_agents(&ids).await.map_err(store_failed)?;
        let agents = candidates
            .into_iter()
            .zip(live)
            .filter(|(_, live)| *live)
            .map(|((id, def), _)| AgentRecord {
                agent_id: id.to_string(),
                capabilities: def.capabilities.clone(),
                metadata_json: serde_json::Value::Object(def.metadata.clone()).to_string(),
                status: "ACTIVE".to_string(),
            })
            .collect();
        Ok(Response::new(DiscoverResponse { agents }))
    }

    async fn handle_get_state(&self, request: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
        let agent = caller(&request)?;
        let snapshot = self.broker.store().get_state(&agent).await.map_err(store_failed)?;
        Ok(Response::new(GetStateResponse {
            state: snapshot.fields.into_iter().collect(),
            revision: snapshot.revision,
        }))
    }

    async fn handle_update_state(
        &self,
        request: Request<UpdateStateRequest>,
    ) -> Result<Response<UpdateStateResponse>, Status> {
        let agent = caller(&request)?;
        let req = request.into_inner();
        let limits = self.broker.config().limits.input();
        // The write alone must fit (cheap, before DLP); the store checks the merged state.
        let write = req.updates.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        limits.check_state([], write).map_err(status::limit_exceeded)?;
        let updates = self.screen_state(&agent, req.updates.into_iter().collect())?;
        let written = self
            .broker
            .store()
            .update_state(&agent, updates, req.expected_revision, limits.max_state_bytes)
            .await
            .map_err(store_failed)?;
        Ok(Response::new(UpdateStateResponse { revision: revision_or_conflict(written)? }))
    }

    async fn handle_reset_state(
        &self,
        request: Request<ResetStateRequest>,
    ) -> Result<Response<ResetStateResponse>, Status> {
        let agent = caller(&request)?;
        let req = request.into_inner();
        let written = self.broker.store().reset_state(&agent, req.expected_revision).await.map_err(store_failed)?;
        Ok(Response::new(ResetStateResponse { revision: revision_or_conflict(written)? }))
    }
}

#[tonic::async_trait]
impl RuntimeService for Service {
    type TransportStream = EventStream;

    async fn transport(&self, mut request: Request<Streaming<ClientEvent>>) -> EventResponse {
        let span = spans::rpc_span(Method::transport, &mut request);
        self.observed(Method::transport, span, self.open_transport(request, Generation::Runtime)).await
    }

    async fn send(&self, mut request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let span = spans::rpc_span(Method::send, &mut request);
        self.observed(Method::send, span, self.handle_send(request)).await
    }

    async fn send_batch(&self, mut request: Request<SendBatchRequest>) -> Result<Response<SendBatchResponse>, Status> {
        let span = spans::rpc_span(Method::send_batch, &mut request);
        self.observed(Method::send_batch, span, self.handle_send_batch(request)).await
    }

    async fn request(&self, mut request: Request<RequestRequest>) -> Result<Response<RequestResponse>, Status> {
        let span = spans::rpc_span(Method::request, &mut request);
        self.observed(Method::request, span, self.handle_request(request)).await
    }

    async fn reply(&self, mut request: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
        let span = spans::rpc_span(Method::reply, &mut request);
        self.observed(Method::reply, span, self.handle_reply(request)).await
    }

    async fn discover(&self, mut request: Request<DiscoverRequest>) -> Result<Response<DiscoverResponse>, Status> {
        let span = spans::rpc_span(Method::discover, &mut request);
        self.observed(Method::discover, span, self.handle_discover(request)).await
    }

    async fn get_state(&self, mut request: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
        let span = spans::rpc_span(Method::get_state, &mut request);
        self.observed(Method::get_state, span, self.handle_get_state(request)).await
    }

    async fn update_state(
        &self,
        mut request: Request<UpdateStateRequest>,
    ) -> Result<Response<UpdateStateResponse>, Status> {
        let span = spans::rpc_span(Method::update_state, &mut request);
        self.observed(Method::update_state, span, self.handle_update_state(request)).await
    }

    async fn reset_state(
        &self,
        mut request: Request<ResetStateRequest>,
    ) -> Result<Response<ResetStateResponse>, Status> {
        let span = spans::rpc_span(Method::reset_state, &mut request);
        self.observed(Method::reset_state, span, self.handle_reset_state(request)).await
    }
}

impl Service {
    /// Runs one RPC's handler inside its span (see [`spans::rpc_span`]) and records its
    /// latency and status code.
    async fn observed<T>(
        &self,
        method: Method,
        span: tracing::Span,
        rpc: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        use tracing::Instrument;

        let started = tokio::time::Instant::now();
        let result = rpc.instrument(span.clone()).await;
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        spans::record_status(&span, code);
        self.broker.metrics().rpc(method, code, started.elapsed());
        result
    }
}

impl Service {
    /// State values are JSON texts; they are screened like a payload of their decoded values
    /// (a value that is not JSON is screened as a string) and stored re-encoded if redacted.
    /// A blocking finding refuses the write (`PERMISSION_DENIED dlp_blocked`).
    fn screen_state(
        &self,
        agent: &AgentId,
        updates: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Status> {
        let Some(dlp) = self.broker.dlp() else { return Ok(updates) };
        if updates.is_empty() {
            return Ok(updates);
        }
        let decoded: Payload = updates
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()))))
            .collect();
        let scan = dlp.scan(&decoded);
        let kinds = scan.kinds();
        match (scan.action, scan.redacted) {
            (Some(Action::Block), _) => {
                tracing::info!(%agent, violations = ?kinds, "DLP blocked a state write");
                Err(Status::permission_denied(detail::DLP_BLOCKED))
            }
            (Some(Action::Redact), Some(redacted)) => {
                Ok(redacted.into_iter().map(|(k, v)| (k, v.to_string())).collect())
            }
            _ => Ok(updates),
        }
    }
}

fn revision_or_conflict(written: Result<u64, StateError>) -> Result<u64, Status> {
    written.map_err(|err| match err {
        StateError::RevisionConflict { .. } => Status::aborted(detail::STATE_REVISION_CONFLICT),
        StateError::TooLarge { .. } => status::limit_exceeded(LimitExceeded::StateTooLarge),
    })
}
