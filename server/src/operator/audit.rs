//! The audit calls of the admin API: verify every chain, query message records, and follow
//! new ones as a stream.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mas_core::policy::audit::{AuditFilter, AuditRecord, Chained, Decision};
use mas_proto::admin::{self, ChainVerdict, QueryAuditRequest, QueryAuditResponse, VerifyAuditResponse};
use tokio_stream::Stream;
use tonic::Status;

use super::detail;
use crate::broker::Broker;

/// Most records one query returns.
const MAX_QUERY: usize = 1_000;
/// How often a follower looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// How far back each poll looks for records committed after newer ones were sent.
const FOLLOW_LAG: Duration = Duration::from_secs(2);
/// Records a follower reads per poll; more wait for the next one.
const FOLLOW_BATCH: usize = 1_000;
/// Records queued for a slow follower before the broker waits for it.
const FOLLOW_BUFFER: usize = 256;

/// The record stream of `FollowAudit`.
pub(super) type Follow = Pin<Box<dyn Stream<Item = Result<admin::AuditRecord, Status>> + Send>>;

fn store_failed(err: mas_core::store::StoreError) -> Status {
    mas_net::status::store_failed(&err)
}

pub(super) async fn verify(broker: &Broker) -> Result<VerifyAuditResponse, Status> {
    let report = broker.verify_audit().await.map_err(store_failed)?;
    let chains = report
        .chains
        .iter()
        .map(|check| ChainVerdict {
            chain: check.chain.clone(),
            records: check.records as u64,
            archived: check.archived,
            fault: check.result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
        })
        .collect();
    Ok(VerifyAuditResponse { intact: report.is_intact(), chains })
}

pub(super) fn filter(req: &QueryAuditRequest) -> Result<AuditFilter, Status> {
    let text = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    let decision = match req.decision.as_str() {
        "" => None,
        name => Some(Decision::parse(name).ok_or_else(|| Status::invalid_argument(detail::UNKNOWN_DECISION))?),
    };
    let time = |t: f64| Some(t).filter(|t| *t > 0.0);
    Ok(AuditFilter {
        sender: text(&req.sender),
        target: text(&req.target),
        decision,
        since: time(req.since),
        until: time(req.until),
    })
}

fn to_proto(record: &AuditRecord) -> admin::AuditRecord {
    admin::AuditRecord { json: record.canonical().0 }
}

pub(super) async fn query(broker: &Broker, req: &QueryAuditRequest) -> Result<QueryAuditResponse, Status> {
    let limit = match req.limit as usize {
        0 => MAX_QUERY,
        n => n.min(MAX_QUERY),
    };
    let records = broker.query_audit(&filter(req)?, limit).await.map_err(store_failed)?;
    Ok(QueryAuditResponse { records: records.iter().map(to_proto).collect() })
}

/// Streams the records matching `req` that are written from `since` (default: now) on, each
/// once. Records carry their broker's admission time and may be committed a little later (or
/// by another broker), so every poll looks back [`FOLLOW_LAG`] before the newest record sent
/// and skips the ones it already sent (remembered by hash for that long).
pub(super) fn follow(broker: Arc<Broker>, req: &QueryAuditRequest) -> Result<Follow, Status> {
    let mut filter = filter(req)?;
    let start = filter.since.unwrap_or_else(|| broker.clock().now().wall.0 as f64 / 1000.0);
    let (tx, rx) = tokio::sync::mpsc::channel(FOLLOW_BUFFER);
    tokio::spawn(async move {
        let mut shutdown = broker.shutdown_signal();
        let lag = FOLLOW_LAG.as_secs_f64();
        let mut newest = start;
        let mut since = start;
        let mut sent: BTreeMap<String, f64> = BTreeMap::new();
        loop {
            filter.since = Some(since);
            match broker.query_audit(&filter, FOLLOW_BATCH).await {
                Ok(records) => {
                    // A full batch may end before the newest records: continue from its end
                    // rather than looking back, so a busy chain never stalls the follower.
                    let full_until = (records.len() == FOLLOW_BATCH).then(|| records.last().map(|r| r.timestamp));
                    for record in records {
                        let hash = record.hash();
                        if sent.contains_key(&hash) {
                            continue;
                        }
                        newest = newest.max(record.timestamp);
                        sent.insert(hash, record.timestamp);
                        if tx.send(Ok(to_proto(&record))).await.is_err() {
                            return; // the follower went away
                        }
                    }
                    sent.retain(|_, at| *at >= newest - lag);
                    since = match full_until {
                        Some(Some(until)) => until,
                        _ => (newest - lag).max(start),
                    };
                }
                Err(err) => {
                    let _ = tx.send(Err(store_failed(err))).await;
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => {}
                () = tx.closed() => return,
                _ = shutdown.wait_for(|draining| *draining) => return,
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
