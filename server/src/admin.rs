//! The admin HTTP listener (`admin.listen_addr`, loopback by default): Prometheus metrics on
//! `/metrics`, liveness on `/healthz`, readiness on `/readyz`, the status page on `/status`
//! (see [`crate::status`]); and the standard gRPC health
//! service (`grpc.health.v1.Health`) on the broker port, kept in step with readiness.
//!
//! Readiness means: the broker is not draining, and its store answered a `PING` within
//! `admin.readiness_timeout_ms`. Liveness means only that the process answers HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::broker::Broker;
use crate::metrics::AgentReading;

/// The content type of the OpenMetrics text exposition, which Prometheus scrapes natively.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How often the gRPC health status is re-evaluated (draining turns it at once).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the broker is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Shutdown began; no new sessions or messages are taken.
    Draining,
    /// The store failed the probe.
    StoreUnreachable,
    /// The store did not answer the probe in time.
    StoreTimeout,
}

impl NotReady {
    /// The reason as `/readyz` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            NotReady::Draining => "draining",
            NotReady::StoreUnreachable => "store_unreachable",
            NotReady::StoreTimeout => "store_timeout",
        }
    }
}

/// Whether the broker should receive traffic now.
pub async fn readiness(broker: &Broker) -> Result<(), NotReady> {
    if broker.is_shutting_down() {
        return Err(NotReady::Draining);
    }
    let bound = Duration::from_millis(broker.config().admin.readiness_timeout_ms);
    match tokio::time::timeout(bound, broker.store().ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(NotReady::StoreUnreachable),
        Err(_) => Err(NotReady::StoreTimeout),
    }
}

/// A bound admin listener, not yet serving.
pub struct AdminListener {
    listener: TcpListener,
    /// The actual address (useful with port 0).
    pub local_addr: SocketAddr,
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<AdminListener> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    Ok(AdminListener { listener, local_addr })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `broker` has stopped (the drain is
/// visible on `/readyz` while it lasts).
pub async fn serve(broker: Arc<Broker>, admin: AdminListener, stopped: impl Future<Output = ()> + Send + 'static) {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/status", get(crate::status::page))
        .route("/status/app.js", get(crate::status::script))
        .route("/status/style.css", get(crate::status::style))
        .route("/status.json", get(crate::status::snapshot))
        // Browsers ask for one; an empty answer keeps their consoles free of 404s.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .with_state(broker);
    let listener = admin.listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "admin connection: cannot set TCP_NODELAY");
        }
    });
    if let Err(err) = axum::serve(listener, router).with_graceful_shutdown(stopped).await {
        tracing::warn!(error = %err, "admin listener failed");
    }
}

async fn ready(State(broker): State<Arc<Broker>>) -> Response {
    match readiness(&broker).await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", why.as_str())).into_response(),
    }
}

async fn metrics(State(broker): State<Arc<Broker>>) -> Response {
    let bound = Duration::from_millis(broker.config().admin.readiness_timeout_ms);
    let reading = tokio::time::timeout(bound, read_store(&broker)).await.ok().flatten();
    broker.metrics().refresh_from_store(reading.as_deref());
    ([(header::CONTENT_TYPE, OPENMETRICS)], broker.metrics().encode()).into_response()
}

/// How many agents' gauges a scrape reads from the store at once.
const SCRAPE_CONCURRENCY: usize = 16;

/// The store-held gauges of every allowlisted agent (one store step each, up to
/// [`SCRAPE_CONCURRENCY`] at a time); `None` when the store cannot be read.
async fn read_store(broker: &Arc<Broker>) -> Option<Vec<AgentReading>> {
    let now = broker.clock().now().wall.0 as f64 / 1000.0;
    let agents: Vec<_> = broker.config().agents.keys().cloned().collect();
    let mut readings = Vec::with_capacity(agents.len());
    for chunk in agents.chunks(SCRAPE_CONCURRENCY) {
        let mut reads = tokio::task::JoinSet::new();
        for agent in chunk {
            let (store, agent) = (broker.store().clone(), agent.clone());
            reads.spawn(async move { store.queue_gauges(&agent).await.map(|g| (agent, g)) });
        }
        while let Some(read) = reads.join_next().await {
            let (agent, gauges) = read.ok()?.ok()?;
            readings.push(AgentReading {
                agent,
                queue_depth: gauges.depth,
                // An envelope from elsewhere may carry any number: never trust it to fit.
                oldest_age: gauges
                    .oldest_timestamp
                    .and_then(|at| Duration::try_from_secs_f64((now - at).max(0.0)).ok()),
                circuit: gauges.circuit,
                audit_len: gauges.audit_len,
                dead_letters: gauges.dead_letters,
                dead_letters_dropped: gauges.dead_letters_dropped,
            });
        }
    }
    Some(readings)
}

/// Keeps the gRPC health service in step with [`readiness`]: the overall status (`""`) and
/// both wire generations' services. Ends when the broker has stopped.
pub async fn track_grpc_health(broker: Arc<Broker>, reporter: HealthReporter, services: Vec<&'static str>) {
    let mut shutdown = broker.shutdown_signal();
    let mut last = None;
    loop {
        let status = match readiness(&broker).await {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        if last != Some(status) {
            for service in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        if *shutdown.borrow() && status == ServingStatus::NotServing {
            return;
        }
        tokio::select! {
            _ = shutdown.changed() => {}
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
}
