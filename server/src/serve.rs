//! Starting the gRPC server: mTLS over TCP in production, plain simulated transport under
//! madsim. Only this file differs between the modes.

use std::future::Future;
use std::sync::Arc;

use mas_proto::mas_v1::mas_service_server::MasServiceServer;
use mas_proto::runtime::runtime_service_server::RuntimeServiceServer;

use crate::broker::Broker;
use crate::service::{MasV1Service, Service, authenticate};

/// The authentication interceptor, bound to `broker`'s allowlist.
fn interceptor(
    broker: &Arc<Broker>,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
    let broker = broker.clone();
    move |req| authenticate(&broker, req)
}

/// Both wire generations over one service, each behind the authentication interceptor.
macro_rules! services {
    ($broker:expr) => {{
        let service = Service::new($broker.clone());
        (
            RuntimeServiceServer::with_interceptor(service.clone(), interceptor(&$broker)),
            MasServiceServer::with_interceptor(MasV1Service::new(service), interceptor(&$broker)),
        )
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

    use mas_net::tls::TlsPem;
    use tokio::net::TcpListener;
    use tonic::transport::Server;
    use tonic::transport::server::TcpIncoming;

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

    /// Accepted connections with `TCP_NODELAY` set. Without it, Nagle's algorithm plus the
    /// peer's delayed ACK hold back every small response that follows another (a unary reply
    /// after its headers, a delivery after an ack): ~40 ms per request/reply round trip.
    fn incoming(listener: TcpListener) -> TcpIncoming {
        TcpIncoming::from(listener).with_nodelay(Some(true))
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
        let (runtime, mas_v1) = services!(broker);
        let drained = drain_after(broker, shutdown);
        Server::builder()
            .tls_config(tls.server_config())
            .map_err(ServeError::Tls)?
            .add_service(runtime)
            .add_service(mas_v1)
            .serve_with_incoming_shutdown(incoming(bound.listener), drained)
            .await
            .map_err(ServeError::Transport)
    }

    #[cfg(test)]
    mod tests {
        use tokio_stream::StreamExt;

        use super::*;

        /// Without TCP_NODELAY a stock grpcio client's request/reply at concurrency 1 ran at
        /// 23 req/s (p50 44 ms): Nagle's algorithm against its delayed ACKs.
        #[tokio::test]
        async fn accepted_connections_set_tcp_nodelay() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut accepted = incoming(listener);
            let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let socket = accepted.next().await.expect("a connection").expect("accepted");
            assert!(socket.nodelay().expect("read TCP_NODELAY"));
        }
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
