//! The broker's side of the audit trail. The store holds the chains (one per agent that
//! receives messages, plus the security chain) and appends to them atomically with the
//! enqueue; here live what surrounds them: the optional JSONL file sink, the writer of security
//! events (raised in places that cannot wait for the store, such as the authentication
//! interceptor), and verification and queries over all chains.

pub mod archive;
pub mod offline;
pub mod sink;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mas_core::ids::AgentId;
use mas_core::policy::audit::{AuditFilter, AuditRecord, ChainError, SecurityEvent, file::FileRecord};
use mas_core::policy::repeats::{Repeats, Verdict};
use mas_core::store::StoreError;
use mas_core::time::{Now, UnixMillis};
use tokio::sync::mpsc;

use crate::config::AuditSettings;
use crate::store::Store;

/// Security events waiting for the store; beyond it events are dropped (counted, logged).
const SECURITY_BACKLOG: usize = 4_096;
/// A repeated denial (same reason, same claimed identity) is recorded once per window; the
/// record counts the repeats suppressed since the previous one.
const DENIAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// Distinct denial keys tracked at once (see [`Repeats`]).
const DENIAL_KEYS: usize = 4_096;

/// The name of an agent's chain in files and reports.
pub fn chain_name(agent: &AgentId) -> String {
    format!("agent:{agent}")
}

/// The name of the security chain in files and reports.
pub const SECURITY_CHAIN: &str = "security";

/// Feeds the file sink, the security chain and the archiver.
#[derive(Debug)]
pub struct AuditTrail {
    file: Option<Arc<sink::Feed>>,
    archiver: Option<Arc<archive::Archiver>>,
    /// Where this store's segments are (`{archive_dir}/{store epoch}`), when archiving is on.
    archive_dir: Option<PathBuf>,
    security: mpsc::Sender<SecurityEvent>,
    dropped_events: AtomicU64,
    denials: Mutex<Repeats>,
}

impl AuditTrail {
    /// Starts the writer tasks (the file sink only when `settings.file_path` is set, the
    /// archiver only when `archive_dir` is given). Must be called inside a runtime. The tasks
    /// end when the trail is dropped.
    pub(crate) fn start(store: Store, settings: &AuditSettings, archive_dir: Option<&Path>) -> Self {
        let file = settings.file_path.as_ref().map(|path| {
            let (tx, rx) = mpsc::channel(sink::SINK_CAPACITY);
            let file = sink::JsonlFile::new(path.clone(), settings.max_bytes, settings.backup_count);
            tokio::spawn(sink::run(file, rx));
            Arc::new(sink::Feed::new(tx))
        });
        let archive_dir = archive_dir.map(|dir| dir.join(store.epoch()));
        let archiver = archive_dir.as_ref().map(|dir| {
            archive::Archiver::new(store.clone(), dir.clone(), settings.archive_batch, settings.max_records_per_chain)
        });
        let (security, events) = mpsc::channel(SECURITY_BACKLOG);
        tokio::spawn(write_security_events(store, events, file.clone()));
        AuditTrail {
            file,
            archiver,
            archive_dir,
            security,
            dropped_events: AtomicU64::new(0),
            denials: Mutex::new(Repeats::new(DENIAL_WINDOW, DENIAL_KEYS)),
        }
    }

    /// The directory of this store's archive segments, when archiving is on.
    pub fn archive_dir(&self) -> Option<&Path> {
        self.archive_dir.as_deref()
    }

    /// A chain refused a decision because it is full: archive it now (when archiving is on).
    pub fn chain_full(&self, chain: &AgentId) {
        if let Some(archiver) = &self.archiver {
            archiver.check(chain);
        }
    }

    /// Copies a committed record of `chain` to the file sink, if there is one, and lets the
    /// archiver see the chain grow.
    pub fn recorded(&self, chain: &AgentId, record: &AuditRecord) {
        if let Some(archiver) = &self.archiver {
            archiver.note_append(chain);
        }
        if let Some(file) = &self.file {
            file.send(chain_name(chain), FileRecord::Message(record.clone()));
        }
    }

    /// Records a denial identified by `key` (its reason and claimed identity) unless the same
    /// key was recorded within the last `DENIAL_WINDOW`; a recorded one carries
    /// `suppressed_repeats`. Returns whether it was recorded, so callers log only then: a
    /// peer repeating a refused call cannot flood the chain or the log.
    pub fn denial(&self, key: &str, event_type: &str, mut details: serde_json::Value, now: Now) -> bool {
        let verdict = self.denials.lock().unwrap_or_else(PoisonError::into_inner).note(key, now.mono);
        let Verdict::Record { suppressed } = verdict else { return false };
        if let Some(fields) = details.as_object_mut() {
            fields.insert("suppressed_repeats".into(), suppressed.into());
        }
        self.security_event(event_type, details, now.wall);
        true
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

async fn write_security_events(store: Store, mut events: mpsc::Receiver<SecurityEvent>, file: Option<Arc<sink::Feed>>) {
    while let Some(event) = events.recv().await {
        match store.append_security(event).await {
            Ok(linked) => {
                if let Some(file) = &file {
                    file.send(SECURITY_CHAIN.to_string(), FileRecord::Security(linked));
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
    /// Live records in the store.
    pub records: usize,
    /// Records archived out of the store.
    pub archived: u64,
    /// Whether the archived records were verified too (segments found and joined to the live
    /// part); false when no archive directory was given.
    pub archive_checked: bool,
    /// Whether it verified.
    pub result: Result<(), ChainFault>,
}

/// Why a chain failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainFault {
    /// The live records in the store.
    #[error("live records: {0}")]
    Live(ChainError),
    /// The archive segments, or their join with the live records.
    #[error("archive: {0}")]
    Archive(String),
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

    /// Live records in all chains.
    pub fn records(&self) -> usize {
        self.chains.iter().map(|c| c.records).sum()
    }
}

/// Verifies the chain of every agent in `agents` and the security chain, each up to a
/// consistent point and against its stored head (edits, deletions, re-links and a cut-off
/// tail all fail). With `archive` (a store epoch's segment directory) the archived beginning
/// of each chain is verified too and must end exactly at the live part's checkpoint.
pub async fn verify<'a>(
    store: &Store,
    agents: impl IntoIterator<Item = &'a AgentId>,
    archive: Option<&Path>,
) -> Result<AuditReport, StoreError> {
    let mut report = AuditReport::default();
    for agent in agents {
        let snapshot = store.audit_chain(agent).await?;
        if snapshot.records.is_empty() && snapshot.head.is_none() {
            continue;
        }
        let mut result = snapshot.verify().map_err(ChainFault::Live);
        if let (Ok(()), Some(dir)) = (&result, archive) {
            result = check_archive(&archive::chain_dir(dir, agent), &snapshot.checkpoint);
        }
        report.chains.push(ChainCheck {
            chain: chain_name(agent),
            records: snapshot.records.len(),
            archived: snapshot.checkpoint.archived,
            archive_checked: archive.is_some(),
            result,
        });
    }
    let events = store.security_chain().await?;
    if !events.records.is_empty() || events.head.is_some() {
        report.chains.push(ChainCheck {
            chain: SECURITY_CHAIN.to_string(),
            records: events.records.len(),
            archived: 0,
            archive_checked: archive.is_some(),
            result: events.verify().map_err(ChainFault::Live),
        });
    }
    Ok(report)
}

/// The segments in `dir` must verify and end where `checkpoint` says the live part begins.
fn check_archive(dir: &Path, checkpoint: &mas_core::policy::audit::Checkpoint) -> Result<(), ChainFault> {
    let segments = archive::verify_segments(dir).map_err(|e| ChainFault::Archive(format!("{}: {e}", dir.display())))?;
    if let Some(error) = segments.errors.first() {
        return Err(ChainFault::Archive(error.clone()));
    }
    if segments.records != checkpoint.archived || segments.last_hash != checkpoint.base {
        return Err(ChainFault::Archive(format!(
            "{} holds {} records ending at {:?}; the store says {} ending at {:?}",
            dir.display(),
            segments.records,
            segments.last_hash,
            checkpoint.archived,
            checkpoint.base
        )));
    }
    Ok(())
}

/// Live records matching `filter` from the chains of `agents`, oldest first, at most `limit`.
/// A target filter naming one of `agents` reads only that agent's chain. (Archived records are
/// in the segment files: `mas audit query --file` reads them.)
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
        let snapshot = store.audit_chain(agent).await?;
        found.extend(snapshot.records.into_iter().filter(|r| filter.matches(r)));
    }
    found.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    found.truncate(limit);
    Ok(found)
}
