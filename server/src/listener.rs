//! Accepting client connections under bounds: at most `limits.max_connections` open at once,
//! `TCP_NODELAY` on every socket, and an accept loop that backs off (and says so) when the
//! process runs out of file descriptors instead of spinning on `EMFILE`.
//!
//! TLS handshakes (with their timeout) and HTTP/2 happen above this, in tonic; a connection's
//! slot is held by its [`Connection`] and freed when tonic drops it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mas_core::policy::repeats::{Repeats, Verdict};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::clock::Clock;

/// Accepted connections waiting for tonic to pick them up; the accept loop waits beyond it.
const HANDOFF: usize = 64;
/// First pause after the process ran out of descriptors; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this period for refusals and accept errors (each line carries
/// the count since the last).
const LOG_EVERY: Duration = Duration::from_secs(5);

/// An accepted TCP connection holding one of the broker's connection slots.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// The stream of accepted connections, for `serve_with_incoming_shutdown`. The accept loop
/// runs as its own task and ends when this stream is dropped.
pub fn accept(listener: TcpListener, max_connections: usize) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(HANDOFF);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(accept_loop(listener, slots, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(listener: TcpListener, slots: Arc<Semaphore>, tx: mpsc::Sender<io::Result<Connection>>) {
    // One warning per kind and period, counting the occurrences in between.
    let clock = Clock::new();
    let mut warnings = Repeats::new(LOG_EVERY, 2);
    let mut due = |kind: &str| match warnings.note(kind, clock.now().mono) {
        Verdict::Record { suppressed } => Some(suppressed + 1),
        Verdict::Suppress => None,
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    if let Some(n) = due("refused") {
                        tracing::warn!(%peer, refused = n, "connection closed: limits.max_connections are open");
                    }
                    continue; // Dropping the stream closes it.
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                }
                if tx.send(Ok(Connection { stream, _slot: slot })).await.is_err() {
                    return;
                }
            }
            Err(err) if is_resource_shortage(&err) => {
                if let Some(n) = due("starved") {
                    tracing::warn!(error = %err, errors = n, ?backoff, "cannot accept (out of descriptors or memory); backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            // The peer gave up between SYN and accept: nothing to do.
            Err(err) if is_peer_gone(&err) => {}
            Err(err) => {
                if let Some(n) = due("starved") {
                    tracing::warn!(error = %err, errors = n, "accept failed");
                }
                tokio::time::sleep(FIRST_BACKOFF).await;
            }
        }
    }
}

/// `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`: retrying at once cannot succeed.
fn is_resource_shortage(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(23 | 24 | 105 | 12)) || err.kind() == io::ErrorKind::OutOfMemory
}

fn is_peer_gone(err: &io::Error) -> bool {
    matches!(err.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    use super::*;

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// Without TCP_NODELAY a stock grpcio client's request/reply at concurrency 1 ran at
    /// 23 req/s (p50 44 ms): Nagle's algorithm against its delayed ACKs.
    #[tokio::test]
    async fn accepted_connections_set_tcp_nodelay() {
        let (listener, addr) = listener().await;
        let mut accepted = accept(listener, 4);
        let _client = TcpStream::connect(addr).await.expect("connect");
        let connection = accepted.next().await.expect("a connection").expect("accepted");
        assert!(connection.stream.nodelay().expect("read TCP_NODELAY"));
    }

    /// Beyond the bound a connection is closed at once; a freed slot is reused.
    #[tokio::test]
    async fn connections_beyond_the_bound_are_closed_and_slots_come_back() {
        let (listener, addr) = listener().await;
        let mut accepted = accept(listener, 2);
        let _a = TcpStream::connect(addr).await.expect("connect");
        let first = accepted.next().await.expect("first").expect("accepted");
        let _b = TcpStream::connect(addr).await.expect("connect");
        let _second = accepted.next().await.expect("second").expect("accepted");
        let mut third = TcpStream::connect(addr).await.expect("the kernel still completes the handshake");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte)).await.expect("closed promptly");
        assert!(matches!(read, Ok(0) | Err(_)), "a third connection must be closed, got {read:?}");
        drop(first);
        let _c = TcpStream::connect(addr).await.expect("connect");
        let reused = tokio::time::timeout(Duration::from_secs(5), accepted.next()).await.expect("accepted in time");
        assert!(matches!(reused, Some(Ok(_))), "the freed slot takes a new connection");
    }
}
