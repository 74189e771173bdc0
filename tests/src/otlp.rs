//! An in-process OTLP trace collector over real gRPC (the trace service of the published
//! `opentelemetry-proto` crate): tests read the spans it received, benchmarks count them.

use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

/// Every span the collector was sent (or only their number, for benchmarks).
#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    received: Arc<std::sync::atomic::AtomicU64>,
    keep: bool,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut n = 0;
        let mut kept = Vec::new();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                n += scope.spans.len() as u64;
                if self.keep {
                    kept.extend(scope.spans);
                }
            }
        }
        self.received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).extend(kept);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// A collector that keeps every span.
    pub fn keeping() -> Self {
        Collector { keep: true, ..Default::default() }
    }

    /// A collector that only counts spans.
    pub fn counting() -> Self {
        Collector::default()
    }

    /// Serves on a free loopback port; returns the endpoint URL for `telemetry.otlp_endpoint`.
    pub async fn start(&self) -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(err) =
                tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
            {
                eprintln!("OTLP collector failed: {err}");
            }
        });
        Ok(format!("http://{addr}"))
    }

    /// The spans received so far (empty for a counting collector).
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many spans were received.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}
