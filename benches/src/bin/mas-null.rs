//! The fastest broker a client could meet: the same wire protocol (both generations) over the
//! same mTLS listener, but no policy, no store and no worker. A `Request` is answered at once
//! and its "reply" (the request's own data, as an echoing worker would send it back) is pushed
//! straight onto the requester's Transport stream; acks are read and dropped.
//!
//! It exists to measure a client alone: what a Python client reaches against it is the
//! ceiling of that client on this machine, whatever broker it talks to. The Python benchmark
//! (`tests/python/bench_request_reply.py`) prints that row beside the real broker's.
//!
//! `mas-null --certs dev-certs` prints `listening 127.0.0.1:PORT` once it serves.

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
fn main() -> anyhow::Result<()> {
    null::main()
}

#[cfg(not(madsim))]
mod null {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use anyhow::Context;
    use clap::Parser;
    use mas_core::envelope::{Envelope, MessageMeta, Payload};
    use mas_net::tls::TlsFiles;
    use mas_proto::mas_v1::mas_service_server::{MasService, MasServiceServer};
    use mas_proto::runtime::runtime_service_server::{RuntimeService, RuntimeServiceServer};
    use mas_proto::runtime::*;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};

    #[derive(Parser, Debug)]
    struct Args {
        /// Directory with `ca.pem`, `server.pem` and `server.key` (as `mas dev-certs` writes).
        #[arg(long)]
        certs: PathBuf,
        /// Where to listen; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    }

    /// Server events queued per Transport stream: enough for every request a benchmark keeps
    /// in flight.
    const STREAM_QUEUE: usize = 1024;

    type Events = Pin<Box<dyn Stream<Item = Result<ServerEvent, Status>> + Send>>;
    /// The sending half of one Transport stream.
    type EventSender = mpsc::Sender<Result<ServerEvent, Status>>;

    /// The open Transport streams by instance id.
    #[derive(Default, Clone)]
    struct Null {
        streams: Arc<Mutex<HashMap<String, EventSender>>>,
        next_id: Arc<AtomicU64>,
    }

    impl Null {
        fn id(&self) -> String {
            format!("{:032x}", self.next_id.fetch_add(1, Ordering::Relaxed))
        }

        fn stream_of(&self, instance: &str) -> Option<EventSender> {
            self.streams.lock().ok()?.get(instance).cloned()
        }

        async fn transport(&self, request: Request<Streaming<ClientEvent>>) -> Result<Response<Events>, Status> {
            let mut incoming = request.into_inner();
            let instance = match incoming.next().await {
                Some(Ok(ClientEvent { event: Some(client_event::Event::Hello(hello)) })) => hello.instance_id,
                _ => return Err(Status::failed_precondition("expected hello")),
            };
            let (tx, rx) = mpsc::channel(STREAM_QUEUE);
            let welcome = Welcome { agent_id: String::new(), instance_id: instance.clone() };
            tx.try_send(Ok(ServerEvent { event: Some(server_event::Event::Welcome(welcome)) }))
                .map_err(|_| Status::internal("stream queue full"))?;
            if let Ok(mut streams) = self.streams.lock() {
                streams.insert(instance.clone(), tx);
            }
            // Acks and nacks are read (so the client's flow control moves) and dropped.
            let streams = self.streams.clone();
            tokio::spawn(async move {
                while let Some(Ok(_)) = incoming.next().await {}
                if let Ok(mut streams) = streams.lock() {
                    streams.remove(&instance);
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn request(&self, request: Request<RequestRequest>) -> Result<Response<RequestResponse>, Status> {
            let request = request.into_inner();
            let data: Payload =
                serde_json::from_str(&request.data_json).map_err(|_| Status::invalid_argument("bad json"))?;
            let (message_id, correlation_id) = (self.id(), self.id());
            let reply = Envelope {
                sender_id: request.target_id,
                target_id: "requester".into(),
                message_type: request.message_type,
                data,
                meta: MessageMeta {
                    correlation_id: Some(correlation_id.clone()),
                    is_reply: true,
                    reply_to_instance_id: Some(request.instance_id.clone()),
                    ..MessageMeta::default()
                },
                timestamp: 0.0,
                message_id: self.id(),
            };
            let delivery = Delivery { delivery_id: self.id(), envelope_json: reply.to_json() };
            let stream =
                self.stream_of(&request.instance_id).ok_or_else(|| Status::failed_precondition("no session"))?;
            // Answered first, delivered right after: the order a broker's reply path has.
            tokio::spawn(async move {
                let _ = stream.send(Ok(ServerEvent { event: Some(server_event::Event::Delivery(delivery)) })).await;
            });
            Ok(Response::new(RequestResponse { message_id, correlation_id }))
        }
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("mas-null answers Transport, Request, Discover and GetState only"))
    }

    /// Both generations' traits over the same handlers.
    macro_rules! null_service {
        ($trait:ident, { $($extra:tt)* }) => {
            #[tonic::async_trait]
            impl $trait for Null {
                type TransportStream = Events;

                async fn transport(
                    &self,
                    request: Request<Streaming<ClientEvent>>,
                ) -> Result<Response<Events>, Status> {
                    Null::transport(self, request).await
                }

                async fn send(&self, _: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
                    unimplemented()
                }

                async fn request(&self, request: Request<RequestRequest>) -> Result<Response<RequestResponse>, Status> {
                    Null::request(self, request).await
                }

                async fn reply(&self, _: Request<ReplyRequest>) -> Result<Response<ReplyResponse>, Status> {
                    unimplemented()
                }

                async fn discover(&self, _: Request<DiscoverRequest>) -> Result<Response<DiscoverResponse>, Status> {
                    Ok(Response::new(DiscoverResponse::default()))
                }

                async fn get_state(&self, _: Request<GetStateRequest>) -> Result<Response<GetStateResponse>, Status> {
                    Ok(Response::new(GetStateResponse::default()))
                }

                async fn update_state(
                    &self,
                    _: Request<UpdateStateRequest>,
                ) -> Result<Response<UpdateStateResponse>, Status> {
                    unimplemented()
                }

                async fn reset_state(
                    &self,
                    _: Request<ResetStateRequest>,
                ) -> Result<Response<ResetStateResponse>, Status> {
                    unimplemented()
                }

                $($extra)*
            }
        };
    }

    null_service!(RuntimeService, {
        async fn send_batch(&self, _: Request<SendBatchRequest>) -> Result<Response<SendBatchResponse>, Status> {
            unimplemented()
        }
    });
    null_service!(MasService, {});

    #[tokio::main]
    pub async fn main() -> anyhow::Result<()> {
        let args = Args::parse();
        mas_net::tls::install_crypto_provider();
        let files = TlsFiles {
            ca: args.certs.join("ca.pem"),
            cert: args.certs.join("server.pem"),
            key: args.certs.join("server.key"),
        };
        let tls = files.load().context("TLS material")?;
        let listener = tokio::net::TcpListener::bind(args.listen).await.context("bind")?;
        println!("listening {}", listener.local_addr()?);
        let null = Null::default();
        tonic::transport::Server::builder()
            .tls_config(tls.server_config())?
            .add_service(RuntimeServiceServer::new(null.clone()))
            .add_service(MasServiceServer::new(null))
            .serve_with_incoming(mas_server::listener::accept(listener, 10_000))
            .await?;
        Ok(())
    }
}
