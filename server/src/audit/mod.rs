//! The broker's side of the audit trail. The store holds the chains (one per agent that
//! receives messages, plus the security chain) and appends to them atomically with the
//! enqueue; here live what surrounds them: the optional JSONL file sink, the writer of security
//! events (raised in places that cannot wait for the store, such as the authentication
//! interceptor), and verification and queries over all chains.

pub mod offline;
pub mod sink;

use std::sync::atomic::{AtomicU64, Ordering};

use mas_core::ids::AgentId;
use mas_core::policy::audit::{
    self, AuditFilter, AuditRecord, ChainError, Chained, FileLine, SecurityEvent, file::FileRecord,
};
use mas_core::store::StoreError;
use mas_core::time::UnixMillis;
use tokio::sync::mpsc;

use crate::config::AuditSettings;
use crate::store::Store;

/// Security events waiting for the store; beyond it events are dropped (counted, logged).
const SECURITY_BACKLOG: usize = 4_096;

/// The name of an agent's chain in files and reports.
pub fn chain_name(agent: &AgentId) -> String {
    format!("agent:{agent}")
}

/// The name of the security chain in files and reports.
pub const SECURITY_CHAIN: &str = "security";

/// Feeds the file sink and the security chain.
#[derive(Debug)]
pub struct AuditTrail {
    file: Option<mpsc::Sender<FileLine>>,
    security: mpsc::Sender<SecurityEvent>,
    dropped_lines: AtomicU64,
    dropped_events: AtomicU64,
}

impl AuditTrail {
    /// Starts the writer tasks (the file sink only when `settings.file_path` is set). Must be
    /// called inside a runtime. The tasks end when the trail is dropped.
    pub(crate) fn start(store: Store, settings: &AuditSettings) -> Self {
        let file = settings.file_path.as_ref().map(|path| {
            let (tx, rx) = mpsc::channel(sink::SINK_CAPACITY);
            let file = sink::JsonlFile::new(path.clone(), settings.max_bytes, settings.backup_count);
            tokio::spawn(sink::run(file, rx));
            tx
        });
        let (security, events) = mpsc::channel(SECURITY_BACKLOG);
        tokio::spawn(write_security_events(store, events, file.clone()));
        AuditTrail { file, security, dropped_lines: AtomicU64::new(0), dropped_events: AtomicU64::new(0) }
    }

    /// Copies a committed record of `chain` to the file sink, if there is one.
    pub fn recorded(&self, chain: &AgentId, record: &AuditRecord) {
        if let Some(file) = &self.file {
            let line =
                FileLine { chain: chain_name(chain), hash: record.hash(), record: FileRecord::Message(record.clone()) };
            if file.try_send(line).is_err() {
                let n = self.dropped_lines.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(dropped = n, "audit file sink is behind; line dropped (the store keeps the record)");
            }
        }
    }

    /// Records a security event (authentication denied, management change). Never waits:
    /// callers include the synchronous authentication interceptor.
    pub fn security_event(&self, event_type: &str, details: serde_json::Value, wall: UnixMillis) {
        let event = SecurityEvent {
            details,
            event_type: event_type.to_string(),
            hash_version: 0,
            previous_hash: None,
            timestamp: wall.0 as f64 / 1000.0,
        };
        if self.security.try_send(event).is_err() {
            let n = self.dropped_events.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(dropped = n, event_type, "security event backlog full; event dropped");
        }
    }
}

async fn write_security_events(
    store: Store,
    mut events: mpsc::Receiver<SecurityEvent>,
    file: Option<mpsc::Sender<FileLine>>,
) {
    while let Some(event) = events.recv().await {
        match store.append_security(event).await {
            Ok(linked) => {
                if let Some(file) = &file {
                    let line = FileLine {
                        chain: SECURITY_CHAIN.to_string(),
                        hash: linked.hash(),
                        record: FileRecord::Security(linked),
                    };
                    let _ = file.try_send(line);
                }
            }
            Err(err) => tracing::error!(error = %err, "security event could not be recorded"),
        }
    }
}

/// The verdict on one chain.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainCheck {
    /// `agent:{id}` or `security`.
    pub chain: String,
    /// Records in it.
    pub records: usize,
    /// Whether it verified.
    pub result: Result<(), ChainError>,
}

/// The verdict on every chain.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditReport {
    /// One entry per chain that has records (or a head).
    pub chains: Vec<ChainCheck>,
}

impl AuditReport {
    /// True when every chain verified.
    pub fn is_intact(&self) -> bool {
        self.chains.iter().all(|c| c.result.is_ok())
    }

    /// Records in all chains.
    pub fn records(&self) -> usize {
        self.chains.iter().map(|c| c.records).sum()
    }
}

/// Verifies the chain of every agent in `agents` and the security chain, each up to a
/// consistent point and against its stored head (edits, deletions, re-links and a cut-off
/// tail all fail).
pub async fn verify<'a>(
    store: &Store,
    agents: impl IntoIterator<Item = &'a AgentId>,
) -> Result<AuditReport, StoreError> {
    let mut report = AuditReport::default();
    for agent in agents {
        let (records, head) = store.audit_chain(agent).await?;
        if records.is_empty() && head.is_none() {
            continue;
        }
        let result = audit::verify(&records, head.as_deref());
        report.chains.push(ChainCheck { chain: chain_name(agent), records: records.len(), result });
    }
    let (events, head) = store.security_chain().await?;
    if !events.is_empty() || head.is_some() {
        let result = audit::verify(&events, head.as_deref());
        report.chains.push(ChainCheck { chain: SECURITY_CHAIN.to_string(), records: events.len(), result });
    }
    Ok(report)
}

/// Records matching `filter` from the chains of `agents`, oldest first, at most `limit`.
/// A target filter naming one of `agents` reads only that agent's chain.
pub async fn query<'a>(
    store: &Store,
    agents: impl IntoIterator<Item = &'a AgentId>,
    filter: &AuditFilter,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let agents: Vec<&AgentId> = agents.into_iter().collect();
    let only = filter.target.as_ref().and_then(|t| agents.iter().find(|a| a.as_str() == t).copied());
    let chains: Vec<&AgentId> = match only {
        Some(agent) => vec![agent],
        None => agents,
    };
    let mut found = Vec::new();
    for agent in chains {
        let (records, _) = store.audit_chain(agent).await?;
        found.extend(records.into_iter().filter(|r| filter.matches(r)));
    }
    found.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    found.truncate(limit);
    Ok(found)
}
