//! The optional JSONL copy of the audit trail, with size-based rotation.
//!
//! The store's chains are the record of truth; the file is a convenience for log shippers and
//! for operators of the embedded store (whose chains live in the broker's memory). Lines are
//! written after the store commit, by one task fed through a bounded channel: a slow disk never
//! slows admissions, and a full channel drops lines (counted and logged), never messages.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mas_core::policy::audit::FileLine;
use mas_core::policy::audit::file::FileRecord;
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

/// A committed record on its way to the file, with its chain's name. Hashing and serialising
/// happen in the writer task, off the message path.
pub(super) type Pending = (String, FileRecord);

/// Writes records from `lines` until every sender is gone; each burst is flushed once.
pub(super) async fn run(mut file: JsonlFile, mut lines: mpsc::Receiver<Pending>) {
    while let Some(first) = lines.recv().await {
        let mut next = Some(first);
        while let Some((chain, record)) = next {
            match serde_json::to_string(&FileLine::new(chain, record)) {
                Ok(text) => {
                    if let Err(err) = file.write_line(&text) {
                        tracing::error!(error = %err, path = %file.path.display(), "audit file write failed");
                    }
                }
                Err(err) => tracing::error!(error = %err, "audit line not serialisable"),
            }
            next = lines.try_recv().ok();
        }
        if let Err(err) = file.flush() {
            tracing::error!(error = %err, path = %file.path.display(), "audit file flush failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
