//! The optional JSONL copy of the audit trail, with size-based rotation.
//!
//! The store's chains are the record of truth; the file is a convenience for log shippers and
//! for operators of the embedded store (whose chains live in the broker's memory). Lines are
//! written after the store commit, by one task fed through a bounded channel: a slow disk never
//! slows admissions, and a full channel drops lines, never messages. A dropped line is never a
//! silent gap: the chain's next line is preceded by a gap marker with the count (see
//! `Feed`), and so is the next line after a failed write, which `mas audit verify --file`
//! reports as a gap, not as tampering.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use mas_core::policy::audit::file::FileRecord;
use mas_core::policy::audit::{FileLine, Gap, GapLine};
use tokio::sync::mpsc;

/// Lines waiting for the writer; beyond it lines are dropped with a warning.
pub(super) const SINK_CAPACITY: usize = 65_536;

/// The file and its rotation policy.
#[derive(Debug)]
pub struct JsonlFile {
    path: PathBuf,
    max_bytes: u64,
    backup_count: u32,
    out: Option<BufWriter<File>>,
    size: u64,
}

impl JsonlFile {
    /// A sink appending to `path`; rotates when a line would take it past `max_bytes`, keeping
    /// `backup_count` older files `path.1` (newest) … `path.N` (0: truncate instead).
    pub fn new(path: PathBuf, max_bytes: u64, backup_count: u32) -> Self {
        JsonlFile { path, max_bytes, backup_count, out: None, size: 0 }
    }

    /// Appends one line (a newline is added).
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.out.is_none() {
            self.open()?;
        }
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let out = self.out.as_mut().ok_or_else(|| std::io::Error::other("audit file not open"))?;
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    /// Pushes buffered lines to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }

    fn open(&mut self) -> std::io::Result<()> {
        let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = file.metadata()?.len();
        self.out = Some(BufWriter::new(file));
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.out = None;
        if self.backup_count == 0 {
            File::create(&self.path)?;
        } else {
            let _ = std::fs::remove_file(backup(&self.path, self.backup_count));
            for n in (1..self.backup_count).rev() {
                let from = backup(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, backup(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, backup(&self.path, 1))?;
        }
        self.open()
    }
}

/// `path.n`.
pub fn backup(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The files of a rotated sink, oldest first: `path.N` … `path.1`, `path`.
pub fn files_oldest_first(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=1000).map(|n| backup(path, n)).take_while(|p| p.exists()).collect();
    files.reverse();
    files.push(path.to_path_buf());
    files
}

/// The lines of a JSONL audit file, each with its location (`file:line`) for reports.
pub fn located_lines(file: &Path) -> std::io::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(file)?;
    let name = file.display().to_string();
    Ok(text.lines().enumerate().map(|(i, line)| (format!("{name}:{}", i + 1), line.to_string())).collect())
}

/// A committed record on its way to the file: its chain's name, the record, and how many
/// records of the chain were dropped just before it (a gap marker goes first when non-zero).
/// Hashing and serialising happen in the writer task, off the message path.
pub(super) struct Pending {
    chain: String,
    record: FileRecord,
    missing_before: u64,
}

/// The sending side of the sink: never waits, and remembers per chain what it had to drop, so
/// that the chain's next line carries the count.
#[derive(Debug)]
pub(super) struct Feed {
    tx: mpsc::Sender<Pending>,
    /// Records dropped per chain since that chain's last line went through. The lock spans
    /// the count and the send, so a marker always precedes exactly the lines after the drop.
    dropped: Mutex<BTreeMap<String, u64>>,
    dropped_total: AtomicU64,
}

impl Feed {
    /// A feed into `tx`.
    pub(super) fn new(tx: mpsc::Sender<Pending>) -> Self {
        Feed { tx, dropped: Mutex::default(), dropped_total: AtomicU64::new(0) }
    }

    /// Queues `record` of `chain`; when the writer is behind, drops it and counts it.
    pub(super) fn send(&self, chain: String, record: FileRecord) {
        let mut dropped = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        let missing_before = dropped.get(&chain).copied().unwrap_or(0);
        // The name is kept only when there is a count to clear (rare): no clone per line.
        let marked = (missing_before > 0).then(|| chain.clone());
        match self.tx.try_send(Pending { chain, record, missing_before }) {
            Ok(()) => {
                if let Some(chain) = marked {
                    dropped.remove(&chain);
                }
            }
            Err(full) => {
                let chain = match full {
                    mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p.chain,
                };
                *dropped.entry(chain).or_default() += 1;
                let n = self.dropped_total.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "audit file sink is behind; lines dropped and marked as gaps (the store keeps the records)"
                    );
                }
            }
        }
    }
}

/// Writes records from `lines` until every sender is gone; each burst is flushed once.
pub(super) async fn run(mut file: JsonlFile, mut lines: mpsc::Receiver<Pending>) {
    // Lines that failed to write, per chain: marked before the chain's next line.
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(first) = lines.recv().await {
        let mut next = Some(first);
        while let Some(Pending { chain, record, missing_before }) = next {
            let missing = missing_before + failed.remove(&chain).unwrap_or(0);
            let lost = write_record(&mut file, &chain, record, missing);
            if lost > 0 {
                *failed.entry(chain).or_default() += lost;
            }
            next = lines.try_recv().ok();
        }
        if let Err(err) = file.flush() {
            tracing::error!(error = %err, path = %file.path.display(), "audit file flush failed");
        }
    }
}

/// Writes a gap marker for `missing` earlier records (if any), then the record's line.
/// Returns how many records are still unaccounted for in the file (to mark next time).
fn write_record(file: &mut JsonlFile, chain: &str, record: FileRecord, missing: u64) -> u64 {
    let mut write = |line: Result<String, serde_json::Error>| match line.map_err(std::io::Error::other) {
        Ok(text) => file.write_line(&text).map_err(|err| {
            tracing::error!(error = %err, path = %file.path.display(), "audit file write failed; marked as a gap");
        }),
        Err(err) => {
            tracing::error!(error = %err, "audit line not serialisable; marked as a gap");
            Err(())
        }
    };
    let mut lost = 0;
    if missing > 0 && write(serde_json::to_string(&GapLine { gap: Gap { chain: chain.to_string(), missing } })).is_err()
    {
        lost += missing;
    }
    if write(serde_json::to_string(&FileLine::new(chain.to_string(), record))).is_err() {
        lost += 1;
    }
    lost
}

#[cfg(test)]
mod tests {
    use mas_core::policy::audit::{AuditRecord, Chain, Decision, verify_lines};

    use super::*;

    fn record(n: u32) -> AuditRecord {
        AuditRecord {
            correlation_id: None,
            decision: Decision::Allowed,
            hash_version: 0,
            latency_ms: 0.1,
            message_id: format!("m{n}"),
            message_type: Some("t".into()),
            payload_hash: "ab".into(),
            previous_hash: None,
            sender_id: "alice".into(),
            sender_instance_id: None,
            target_id: "bob".into(),
            timestamp: 1.0,
            trace_id: None,
            violations: vec![],
        }
    }

    /// A writer that falls behind drops lines, and the file says so: the chain's next line is
    /// preceded by a gap marker with the count, which verification reports as a gap.
    #[tokio::test]
    async fn dropped_lines_leave_a_marked_gap_not_a_broken_chain() {
        let dir = std::env::temp_dir().join(format!("mas-sink-gap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let (tx, rx) = mpsc::channel(2);
        let feed = Feed::new(tx);
        let mut chain = Chain::default();
        let mut carol = Chain::default();
        // The writer is not running yet: two lines fit; three of bob's and one of carol's are
        // dropped.
        for n in 0..5 {
            feed.send("agent:bob".into(), FileRecord::Message(chain.append(record(n))));
        }
        feed.send("agent:carol".into(), FileRecord::Message(carol.append(record(0))));
        let writer = tokio::spawn(run(JsonlFile::new(path.clone(), 1_000_000, 1), rx));
        tokio::task::yield_now().await;
        while feed.tx.capacity() < 2 {
            tokio::task::yield_now().await;
        }
        // Bob's next line clears bob's count only; carol's waits for carol's next line.
        feed.send("agent:bob".into(), FileRecord::Message(chain.append(record(5))));
        while feed.tx.capacity() < 2 {
            tokio::task::yield_now().await;
        }
        feed.send("agent:carol".into(), FileRecord::Message(carol.append(record(1))));
        drop(feed);
        writer.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<(String, &str)> = text.lines().enumerate().map(|(i, l)| (format!("{}", i + 1), l)).collect();
        assert_eq!(lines.len(), 6, "two records, then a marker before each chain's next record:\n{text}");
        let report = verify_lines(lines.iter().map(|(at, l)| (at, *l)));
        assert!(report.is_intact(), "{:?}", report.errors);
        assert_eq!(
            report.gaps,
            [
                "3: 3 records of chain agent:bob never reached the file",
                "5: 1 records of chain agent:carol never reached the file"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotates_by_size_and_keeps_backup_count_files() {
        let dir = std::env::temp_dir().join(format!("mas-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let mut file = JsonlFile::new(path.clone(), 25, 2);
        for n in 0..7 {
            file.write_line(&format!("line-{n:02}-padding")).unwrap(); // 16 bytes + newline
        }
        file.flush().unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "line-06-padding\n");
        assert_eq!(read(&backup(&path, 1)), "line-05-padding\n");
        assert_eq!(read(&backup(&path, 2)), "line-04-padding\n");
        assert!(!backup(&path, 3).exists(), "only backup_count files are kept");
        assert_eq!(files_oldest_first(&path), vec![backup(&path, 2), backup(&path, 1), path.clone()]);

        let mut truncating = JsonlFile::new(dir.join("t.jsonl"), 25, 0);
        for n in 0..3 {
            truncating.write_line(&format!("line-{n:02}-padding")).unwrap();
        }
        truncating.flush().unwrap();
        assert_eq!(read(&dir.join("t.jsonl")), "line-02-padding\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
