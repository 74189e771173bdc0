//! Starting the gRPC server: mTLS over TCP in production, plain simulated transport under
//! madsim. Only this file differs between the modes.

use std::future::Future;
use std::sync::Arc;

use mas_proto::v1::runtime_service_server::RuntimeServiceServer;

use crate::broker::Broker;
use crate::service::{Service, authenticate};

/// The authentication interceptor, bound to `broker`'s allowlist.
fn interceptor(
    broker: &Arc<Broker>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
    let broker = broker.clone();
    move |req| authenticate(&broker, req)
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

    use mas_net::tls::TlsPem;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
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
    /// (see [`Broker::shutdown`]) before the listener closes.
    pub async fn serve_tls(
        broker: Arc<Broker>,
        bound: Bound,
        tls: &TlsPem,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        mas_net::tls::install_crypto_provider();
        let svc = RuntimeServiceServer::with_interceptor(Service::new(broker.clone()), interceptor(&broker));
        let drained = drain_after(broker, shutdown);
        Server::builder()
            .tls_config(tls.server_config())
            .map_err(ServeError::Tls)?
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(bound.listener), drained)
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
        let svc = RuntimeServiceServer::with_interceptor(Service::new(broker.clone()), interceptor(&broker));
        let drained = drain_after(broker, shutdown);
        Server::builder().add_service(svc).serve_with_shutdown(addr, drained).await
    }
}
