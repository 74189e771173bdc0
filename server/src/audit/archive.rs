//! Archiving audit records out of the store into segment files, so that chains never fill up
//! under sustained traffic.
//!
//! When a chain holds `max_records_per_chain - archive_batch` live records, its oldest
//! `archive_batch` records are written to a segment file (JSONL lines, as the file sink writes
//! them), fsynced, and only then removed from the store, which moves the chain's checkpoint
//! (records archived so far, hash of the last one). A crash between the two leaves the records
//! in the store and a segment that the next pass rewrites with the same content. Verification
//! joins the parts: a chain's segments in order are its beginning, and the last one ends where
//! the store's checkpoint says.
//!
//! Layout: `{archive_dir}/{store epoch}/{agent}/{index of the first record:020}.jsonl`. The
//! epoch names the store, so a restarted embedded store (whose chains begin anew) never
//! overwrites the segments of an earlier one.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mas_core::ids::AgentId;
use mas_core::policy::audit::{FileLine, LineVerifier, canonical_links};
use mas_core::store::StoreError;

use super::chain_name;
use crate::store::Store;

/// Why archiving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A segment could not be written.
    #[error("segment {path}: {source}")]
    Io {
        /// The segment.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The records to archive do not continue from the checkpoint: the chain is damaged and
    /// must be looked at before anything is moved out of the store.
    #[error("chain {0} does not verify from its checkpoint; not archiving it")]
    Broken(String),
}

/// Moves the oldest records of full chains into segment files.
#[derive(Debug)]
pub struct Archiver {
    store: Store,
    /// `{archive_dir}/{store epoch}`.
    dir: PathBuf,
    batch: usize,
    high_water: usize,
    /// Chains being archived now (one pass per chain at a time).
    busy: Mutex<BTreeSet<AgentId>>,
    appended: AtomicU64,
}

impl Archiver {
    /// An archiver writing under `dir` (the store epoch's directory) in batches of `batch`,
    /// for chains bounded at `max_records`.
    pub fn new(store: Store, dir: PathBuf, batch: usize, max_records: usize) -> Arc<Self> {
        let high_water = max_records.saturating_sub(batch).max(batch);
        Arc::new(Archiver { store, dir, batch, high_water, busy: Mutex::default(), appended: AtomicU64::new(0) })
    }

    /// Called for every record committed to `chain`. Checks that chain's length about four
    /// times per batch of appends (all chains together), without a lock on the common path.
    pub fn note_append(self: &Arc<Self>, chain: &AgentId) {
        let every = (self.batch as u64 / 4).max(1);
        if self.appended.fetch_add(1, Ordering::Relaxed).is_multiple_of(every) {
            self.check(chain);
        }
    }

    /// Starts an archiving pass over `chain` unless one is running.
    pub fn check(self: &Arc<Self>, chain: &AgentId) {
        if !self.busy.lock().unwrap_or_else(PoisonError::into_inner).insert(chain.clone()) {
            return;
        }
        let (archiver, chain) = (self.clone(), chain.clone());
        tokio::spawn(async move {
            if let Err(err) = archiver.run(&chain).await {
                tracing::error!(%chain, error = %err, "audit archiving failed; the chain refuses messages once full");
            }
            archiver.busy.lock().unwrap_or_else(PoisonError::into_inner).remove(&chain);
        });
    }

    /// Archives batches of `chain` until it is below the high-water mark.
    async fn run(&self, chain: &AgentId) -> Result<(), ArchiveError> {
        while self.store.audit_len(chain).await? >= self.high_water {
            let oldest = self.store.audit_oldest(chain, self.batch).await?;
            let Some(last) = oldest.records.last().cloned() else { return Ok(()) };
            // Each record is serialised and hashed once: the link check and the segment line
            // both use that text.
            let Ok(links) = canonical_links(&oldest.records, oldest.checkpoint.base.as_deref()) else {
                return Err(ArchiveError::Broken(chain.to_string()));
            };
            let count = oldest.records.len();
            // Writing and fsyncing block: keep them off the runtime's workers.
            let (dir, owner) = (self.dir.clone(), chain.clone());
            let path = off_the_runtime(move || write_segment(&dir, &owner, oldest.checkpoint.archived, &links))
                .await
                .map_err(|source| ArchiveError::Io { path: self.dir.clone(), source })??;
            match self.store.trim_audit(chain, count, &last).await? {
                Some(checkpoint) => {
                    tracing::info!(%chain, archived = checkpoint.archived, segment = %path.display(), "audit records archived");
                }
                // Someone else moved the chain on; their pass wrote the same segment.
                None => return Ok(()),
            }
        }
        Ok(())
    }
}

/// Runs blocking file work on the blocking pool, off the runtime's workers.
#[cfg(not(madsim))]
async fn off_the_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)
}

/// Under simulation there are no threads to block: the work runs inline.
#[cfg(madsim)]
async fn off_the_runtime<T>(work: impl FnOnce() -> T) -> std::io::Result<T> {
    Ok(work())
}

/// The directory of `chain`'s segments under an epoch directory.
pub fn chain_dir(epoch_dir: &Path, chain: &AgentId) -> PathBuf {
    epoch_dir.join(chain.as_str())
}

/// Writes `records` (the chain's records from index `first`, as canonical JSON and hash) as a
/// segment: to a temporary file, fsynced, renamed into place, directory fsynced.
fn write_segment(
    epoch_dir: &Path,
    chain: &AgentId,
    first: u64,
    records: &[(String, String)],
) -> Result<PathBuf, ArchiveError> {
    let dir = chain_dir(epoch_dir, chain);
    let path = dir.join(format!("{first:020}.jsonl"));
    let io = |source| ArchiveError::Io { path: path.clone(), source };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let tmp = dir.join(format!("{first:020}.jsonl.tmp"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    let name = chain_name(chain);
    for (json, hash) in records {
        out.write_all(FileLine::json_of(&name, hash, json).as_bytes()).map_err(io)?;
        out.write_all(b"\n").map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(path)
}

/// What a chain's segments hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentReport {
    /// Records in all segments.
    pub records: u64,
    /// Hash of the last archived record.
    pub last_hash: Option<String>,
    /// Every problem found.
    pub errors: Vec<String>,
}

/// Verifies the segments of one chain (the directory [`chain_dir`] names): they must start at
/// index 0 with the chain's first record, follow each other without gaps, and link record to
/// record. A missing directory is an empty archive.
pub fn verify_segments(dir: &Path) -> Result<SegmentReport, std::io::Error> {
    let mut report = SegmentReport::default();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(err) => return Err(err),
    };
    files.sort();
    // One segment in memory at a time: an archive of millions of records verifies in the
    // memory of one segment.
    let mut verifier = LineVerifier::default();
    for file in &files {
        let first: Option<u64> = file.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok());
        if first != Some(report.records) {
            report.errors.push(format!(
                "{}: expected the segment starting at record {}",
                file.display(),
                report.records
            ));
        }
        let text = std::fs::read_to_string(file)?;
        let name = file.display();
        for (i, line) in text.lines().enumerate() {
            report.records += u64::from(!line.trim().is_empty());
            verifier.line(format_args!("{name}:{}", i + 1), line);
        }
    }
    let verified = verifier.finish();
    report.errors.extend(verified.errors);
    for (chain, summary) in verified.chains {
        if summary.starts_mid_chain {
            report.errors.push(format!("{chain}: the oldest archived records are missing"));
        }
        report.last_hash = summary.head;
    }
    Ok(report)
}
