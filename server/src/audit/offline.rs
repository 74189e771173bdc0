//! Audit tools that run outside the broker (`mas audit verify|query`): over the store of a
//! configuration (Redis; the embedded store lives inside its broker process), or over the
//! JSONL file sink including its rotated backups.

use std::path::Path;

use mas_core::policy::audit::file::FileRecord;
use mas_core::policy::audit::{AuditFilter, AuditRecord, FileLine, FileReport, verify_lines};

use super::sink::{files_oldest_first, located_lines};
#[cfg(not(madsim))]
pub use from_store::*;

/// Why an offline audit tool could not run.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The configuration has no Redis section.
    #[error(
        "this configuration uses the embedded store, whose chains live inside the broker process; \
         verify or query its JSONL copy with --file (gateway.audit.file_path)"
    )]
    EmbeddedStore,
    /// The store could not be read.
    #[error("store: {0}")]
    Store(#[from] mas_core::store::StoreError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The lines of the sink at `path` and its rotated backups, oldest first, each with its
/// location (`file:line`).
fn sink_lines(path: &Path) -> Result<Vec<(String, String)>, OfflineError> {
    let mut lines = Vec::new();
    for file in files_oldest_first(path) {
        let read =
            located_lines(&file).map_err(|source| OfflineError::Read { path: file.display().to_string(), source })?;
        lines.extend(read);
    }
    Ok(lines)
}

/// Verifies the JSONL sink at `path` (with its rotated backups).
pub fn verify_file(path: &Path) -> Result<FileReport, OfflineError> {
    let lines = sink_lines(path)?;
    Ok(verify_lines(lines.iter().map(|(at, line)| (at, line.as_str()))))
}

/// Message records in the JSONL sink matching `filter`, oldest first, at most `limit`.
/// Unreadable lines are skipped here; `verify_file` reports them.
pub fn query_file(path: &Path, filter: &AuditFilter, limit: usize) -> Result<Vec<AuditRecord>, OfflineError> {
    Ok(sink_lines(path)?
        .into_iter()
        .filter_map(|(_, line)| serde_json::from_str::<FileLine>(&line).ok())
        .filter_map(|line| match line.record {
            FileRecord::Message(record) => Some(record),
            FileRecord::Security(_) => None,
        })
        .filter(|r| filter.matches(r))
        .take(limit)
        .collect())
}

#[cfg(not(madsim))]
mod from_store {
    use mas_core::policy::audit::{AuditFilter, AuditRecord};

    use super::OfflineError;
    use crate::audit::{AuditReport, query, verify};
    use crate::config::BrokerConfig;
    use crate::store::Store;

    async fn store_of(config: &BrokerConfig) -> Result<Store, OfflineError> {
        let settings = config.redis.as_ref().ok_or(OfflineError::EmbeddedStore)?;
        Ok(Store::from(crate::store::redis::RedisBackend::connect(settings).await?))
    }

    /// Verifies every chain in the store of `config`.
    pub async fn verify_store(config: &BrokerConfig) -> Result<AuditReport, OfflineError> {
        let store = store_of(config).await?;
        let archive = config.audit_archive_dir().map(|dir| dir.join(store.epoch()));
        Ok(verify(&store, config.agents.keys(), archive.as_deref()).await?)
    }

    /// Records in the store of `config` matching `filter`, oldest first, at most `limit`.
    pub async fn query_store(
        config: &BrokerConfig,
        filter: &AuditFilter,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, OfflineError> {
        let store = store_of(config).await?;
        Ok(query(&store, config.agents.keys(), filter, limit).await?)
    }
}
