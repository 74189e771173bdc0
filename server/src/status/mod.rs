//! The status page on the admin HTTP listener: `/status` (a static page and its script and
//! stylesheet) and `/status.json` (the snapshot it polls once a second).
//!
//! The snapshot shows agents and their sessions on this broker, queue depths and the oldest
//! queued message, circuits, rate-limit pressure, audit chain lengths and the last audit
//! verification, dead-letter counts and the newest dead letters. It never carries a payload or a secret: dead letters are named by id, reason,
//! type, sender and message id only.
//!
//! Access: on a loopback listener (the default) the page is open to the host. On any other
//! address `/status.json` requires `Authorization: Bearer {admin.status_token}`; without a
//! configured token it is refused. Every response carries a strict CSP (scripts and styles
//! from this origin only, no inline code, no framing).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mas_core::policy::circuit::CircuitPhase;
use serde::Serialize;

use crate::broker::Broker;
use crate::store::Backend;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Scripts, styles and fetches from this origin only; nothing inline, no framing, no forms.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Newest dead letters shown, across agents.
const NEWEST_DEAD_LETTERS: usize = 20;
/// Dead letters read per agent for the counts (each queue is bounded by the store).
const DEAD_LETTERS_READ: usize = 100_000;

/// `/status`.
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `/status/app.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `/status/style.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    with_security_headers(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

fn with_security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether a request may read the snapshot, given the admin listener's settings (see the
/// module docs).
fn allowed(admin: &crate::config::AdminSettings, headers: &HeaderMap) -> Result<(), &'static str> {
    if admin.listen_addr.is_some_and(|addr| addr.ip().is_loopback()) {
        return Ok(());
    }
    let Some(token) = admin.status_token.as_deref() else {
        return Err("the status page is served on loopback only unless admin.status_token is set");
    };
    let presented =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err("a bearer token is required"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `/status.json`.
pub async fn snapshot(State(broker): State<Arc<Broker>>, headers: HeaderMap) -> Response {
    if let Err(why) = allowed(&broker.config().admin, &headers) {
        return with_security_headers((StatusCode::FORBIDDEN, why).into_response());
    }
    let bound = Duration::from_millis(broker.config().admin.readiness_timeout_ms);
    let response = match tokio::time::timeout(bound, read(&broker)).await {
        Ok(Ok(snapshot)) => match serde_json::to_string(&snapshot) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
        },
        Ok(Err(err)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {err}")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the store did not answer in time").into_response(),
    };
    with_security_headers(response)
}

#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    pub(crate) broker_id: String,
    pub(crate) ready: bool,
    pub(crate) not_ready: Option<&'static str>,
    pub(crate) store: &'static str,
    pub(crate) authz_revision: u64,
    pub(crate) generated_at: f64,
    pub(crate) agents: Vec<AgentStatus>,
    pub(crate) newest_dead_letters: Vec<LetterStatus>,
    /// The last audit verification on this broker (`mas admin audit verify`), if any.
    pub(crate) last_verification: Option<VerificationStatus>,
}

#[derive(Debug, Serialize)]
pub(crate) struct VerificationStatus {
    pub(crate) at: f64,
    pub(crate) intact: bool,
    pub(crate) chains: usize,
    pub(crate) records: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct AgentStatus {
    pub(crate) agent_id: String,
    /// The sessions on this broker.
    pub(crate) sessions: Vec<SessionStatus>,
    /// Deliveries awaiting an ack on this broker (all its sessions here).
    pub(crate) in_flight_here: u64,
    pub(crate) queue_depth: usize,
    pub(crate) oldest_age_s: Option<f64>,
    pub(crate) circuit: &'static str,
    pub(crate) audit_records: usize,
    pub(crate) dead_letters: usize,
    /// Share of the sender's tighter rate-limit window in use (0 to 1).
    pub(crate) rate_pressure: f64,
    /// Messages counted in the sender's minute and hour windows, and its limits.
    pub(crate) rate_minute_used: u64,
    pub(crate) rate_hour_used: u64,
    pub(crate) rate_limits: (u64, u64),
}

#[derive(Debug, Serialize)]
pub(crate) struct SessionStatus {
    pub(crate) instance_id: String,
    /// When it opened (seconds since the Unix epoch).
    pub(crate) connected_at: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct LetterStatus {
    pub(crate) agent_id: String,
    pub(crate) id: String,
    pub(crate) reason: String,
    pub(crate) attempts: u32,
    pub(crate) age_ms: u128,
    pub(crate) message_type: String,
    pub(crate) sender_id: String,
    pub(crate) message_id: String,
}

/// The snapshot the page shows (also the admin API's agent listing).
pub(crate) async fn read(broker: &Broker) -> Result<Snapshot, mas_core::store::StoreError> {
    let now = broker.clock().now().wall.0 as f64 / 1000.0;
    let sessions = broker.local_sessions();
    let mut agents = Vec::new();
    let mut letters = Vec::new();
    for agent in broker.config().agents.keys() {
        let gauges = broker.store().queue_gauges(agent).await?;
        let dead = broker.store().dead_letters(agent, DEAD_LETTERS_READ).await?;
        let limits = broker.config().gateway.rate_limit.limits_for(agent);
        let (minute, hour) = broker.store().rate_backlog(agent).await?.usage(limits);
        let share = |used: u64, limit: u64| if limit == 0 { 1.0 } else { used as f64 / limit as f64 };
        agents.push(AgentStatus {
            agent_id: agent.to_string(),
            sessions: sessions
                .iter()
                .filter(|((a, _), _)| a == agent)
                .map(|((_, instance), since)| SessionStatus {
                    instance_id: instance.to_string(),
                    connected_at: *since as f64 / 1000.0,
                })
                .collect(),
            in_flight_here: u64::try_from(broker.metrics().in_flight(agent)).unwrap_or(0),
            queue_depth: gauges.depth,
            oldest_age_s: gauges.oldest_timestamp.map(|at| (now - at).max(0.0)),
            circuit: match gauges.circuit {
                CircuitPhase::Closed => "closed",
                CircuitPhase::HalfOpen => "half_open",
                CircuitPhase::Open => "open",
            },
            audit_records: gauges.audit_len,
            dead_letters: gauges.dead_letters,
            rate_pressure: share(minute, limits.per_minute).max(share(hour, limits.per_hour)).min(1.0),
            rate_minute_used: minute,
            rate_hour_used: hour,
            rate_limits: (limits.per_minute, limits.per_hour),
        });
        letters.extend(dead.into_iter().rev().take(NEWEST_DEAD_LETTERS).map(|letter| {
            let envelope: serde_json::Value = serde_json::from_str(&letter.envelope).unwrap_or_default();
            let field = |name: &str| envelope.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            LetterStatus {
                agent_id: letter.agent.to_string(),
                message_type: field("message_type"),
                sender_id: field("sender_id"),
                message_id: field("message_id"),
                id: letter.id,
                reason: letter.reason,
                attempts: letter.attempts,
                age_ms: letter.age.as_millis(),
            }
        }));
    }
    letters.sort_by_key(|letter| letter.age_ms);
    letters.truncate(NEWEST_DEAD_LETTERS);
    let readiness = crate::admin::readiness(broker).await;
    Ok(Snapshot {
        broker_id: broker.config().broker_id().to_string(),
        ready: readiness.is_ok(),
        not_ready: readiness.err().map(|why| why.as_str()),
        store: match broker.store().backend() {
            Backend::Memory(_) => "embedded",
            Backend::Redis(_) => "redis",
        },
        authz_revision: broker.authz_revision(),
        generated_at: now,
        agents,
        newest_dead_letters: letters,
        last_verification: broker.last_verification().map(|v| VerificationStatus {
            at: v.at.0 as f64 / 1000.0,
            intact: v.intact,
            chains: v.chains,
            records: v.records,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_loopback_the_snapshot_needs_the_configured_bearer_token() {
        let mut admin = crate::config::AdminSettings::default();
        let bearer = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert_eq!(allowed(&admin, &HeaderMap::new()), Ok(()), "the default loopback listener is open to the host");
        admin.listen_addr = Some("0.0.0.0:9464".parse().unwrap());
        assert!(allowed(&admin, &bearer("Bearer anything")).is_err(), "no token configured: refused");
        admin.status_token = Some("s3cret".into());
        assert_eq!(allowed(&admin, &bearer("Bearer s3cret")), Ok(()));
        assert!(allowed(&admin, &bearer("Bearer s3cre")).is_err());
        assert!(allowed(&admin, &bearer("s3cret")).is_err(), "only as a bearer token");
        assert!(allowed(&admin, &HeaderMap::new()).is_err());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
