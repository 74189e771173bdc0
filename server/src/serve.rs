//! Starting the gRPC server: mTLS over TCP in production, plain simulated transport under
//! madsim. Only this file differs between the modes.

use std::future::Future;
use std::sync::Arc;

use mas_net::identity::PeerIdentities;
use mas_proto::mas_v1::mas_service_server::MasServiceServer;
use mas_proto::runtime::runtime_service_server::RuntimeServiceServer;

use crate::broker::Broker;
use crate::service::{MasV1Service, Service, authenticate};

/// The authentication interceptor, bound to `broker`'s allowlist and to the peer identities
/// of the connections it has seen (shared by both wire generations).
fn interceptor(
    broker: &Arc<Broker>,
    peers: &Arc<PeerIdentities>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
    let (broker, peers) = (broker.clone(), peers.clone());
    move |req| authenticate(&broker, &peers, req)
}

/// Both wire generations over one service, each behind the authentication interceptor.
/// (Under madsim the generated servers take no decoding limit.)
macro_rules! services {
    ($broker:expr) => {{
        let service = Service::new($broker.clone());
        let peers = Arc::new(PeerIdentities::new($broker.config().limits.max_connections));
        #[cfg(not(madsim))]
        let servers = {
            use tonic::service::interceptor::InterceptedService;
            let max = $broker.config().limits.max_message_bytes;
            (
                InterceptedService::new(
                    RuntimeServiceServer::new(service.clone()).max_decoding_message_size(max),
                    interceptor(&$broker, &peers),
                ),
                InterceptedService::new(
                    MasServiceServer::new(MasV1Service::new(service)).max_decoding_message_size(max),
                    interceptor(&$broker, &peers),
                ),
            )
        };
        #[cfg(madsim)]
        let servers = (
            RuntimeServiceServer::with_interceptor(service.clone(), interceptor(&$broker, &peers)),
            MasServiceServer::with_interceptor(MasV1Service::new(service), interceptor(&$broker, &peers)),
        );
        servers
    }};
}

/// Resolves after `shutdown` and then a full drain of `broker`'s sessions: the listener stops
/// only once every session has handed its work back.
async fn drain_after(broker: Arc<Broker>, shutdown: impl Future<Output = ()>) {
    shutdown.await;
    broker.shutdown().await;
}

#[cfg(not(madsim))]
pub use real::*;
#[cfg(madsim)]
pub use sim::*;

#[cfg(not(madsim))]
mod real {
    use super::*;
    use std::net::SocketAddr;

    use std::time::Duration;

    use mas_net::tls::TlsPem;
    use tokio::net::TcpListener;
    use tonic::transport::Server;

    /// Why the listener could not start.
    #[derive(Debug, thiserror::Error)]
    pub enum ServeError {
        /// Binding the address failed.
        #[error("cannot listen on {addr}: {source}")]
        Bind {
            /// The address.
            addr: SocketAddr,
            /// The cause.
            source: std::io::Error,
        },
        /// The TLS material was rejected.
        #[error("TLS configuration rejected: {0}")]
        Tls(tonic::transport::Error),
        /// The server failed while running.
        #[error("server failed: {0}")]
        Transport(tonic::transport::Error),
    }

    /// A bound, not yet serving listener; lets callers learn the port before serving.
    pub struct Bound {
        listener: TcpListener,
        /// The actual address (useful with port 0).
        pub local_addr: SocketAddr,
    }

    /// Binds the configured address.
    pub async fn bind(addr: SocketAddr) -> Result<Bound, ServeError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
        Ok(Bound { listener, local_addr })
    }

    /// Serves the broker over mTLS until `shutdown` resolves; then drains every session
    /// (see [`Broker::shutdown`]) before the listener closes. Connections are bounded in
    /// number (see [`crate::listener`]), must finish the TLS handshake in time, and are
    /// pinged when idle and closed when a ping goes unanswered. The standard gRPC health
    /// service answers on the same port (see [`crate::admin::track_grpc_health`]).
    pub async fn serve_tls(
        broker: Arc<Broker>,
        bound: Bound,
        tls: &TlsPem,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        mas_net::tls::install_crypto_provider();
        let limits = broker.config().limits.clone();
        let ms = Duration::from_millis;
        let (runtime, mas_v1) = services!(broker);
        let (reporter, health) = tonic_health::server::health_reporter();
        let names = vec![
            <RuntimeServiceServer<Service> as tonic::server::NamedService>::NAME,
            <MasServiceServer<MasV1Service> as tonic::server::NamedService>::NAME,
        ];
        tokio::spawn(crate::admin::track_grpc_health(broker.clone(), reporter, names));
        let operators = crate::operator::AdminServiceServer::new(crate::operator::Admin::new(broker.clone()));
        let incoming = crate::listener::accept(bound.listener, limits.max_connections);
        let drained = drain_after(broker, shutdown);
        Server::builder()
            .tls_config(tls.server_config().timeout(ms(limits.tls_handshake_timeout_ms)))
            .map_err(ServeError::Tls)?
            .http2_keepalive_interval(Some(ms(limits.http2_keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(ms(limits.http2_keepalive_timeout_ms)))
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .add_service(health)
            .add_service(runtime)
            .add_service(mas_v1)
            .add_service(operators)
            .serve_with_incoming_shutdown(incoming, drained)
            .await
            .map_err(ServeError::Transport)
    }
}

#[cfg(madsim)]
mod sim {
    use super::*;
    use std::net::SocketAddr;

    use tonic::transport::Server;

    /// Serves the broker on the simulated network (no TLS: identity travels in a header)
    /// until `shutdown` resolves, then drains every session.
    pub async fn serve_sim(
        broker: Arc<Broker>,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let (runtime, mas_v1) = services!(broker);
        let drained = drain_after(broker, shutdown);
        Server::builder().add_service(runtime).add_service(mas_v1).serve_with_shutdown(addr, drained).await
    }
}
