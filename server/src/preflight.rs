//! Checks of everything a configuration points at outside itself, run before the broker says
//! it is ready: the ready line means the broker can serve, not that it read a file.

use std::path::{Path, PathBuf};

use crate::config::BrokerConfig;

/// A path the broker will need and cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {path}: {why}")]
pub struct PathError {
    /// The configuration key.
    pub setting: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The cause.
    pub why: String,
}

/// The audit file must be appendable (its directory must exist), the archive directory
/// creatable and writable. Creates what it checks; leaves nothing else behind.
pub fn check_paths(config: &BrokerConfig) -> Result<(), PathError> {
    if let Some(file) = &config.gateway.audit.file_path {
        std::fs::OpenOptions::new().create(true).append(true).open(file).map_err(|err| PathError {
            setting: "gateway.audit.file_path",
            path: file.clone(),
            why: format!("cannot be opened for appending: {err}"),
        })?;
    }
    if let Some(dir) = config.audit_archive_dir() {
        writable_dir(&dir).map_err(|why| PathError { setting: "gateway.audit archive directory", path: dir, why })?;
    }
    Ok(())
}

fn writable_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("cannot be created: {err}"))?;
    let probe = dir.join(format!(".mas-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|err| format!("is not writable: {err}"))?;
    std::fs::remove_file(&probe).map_err(|err| format!("write check could not be removed: {err}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn unusable_audit_paths_are_named() {
        let dir = std::env::temp_dir().join(format!("mas-preflight-{}", std::process::id()));
        let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), BTreeMap::new());
        config.data_dir = dir.join("data");
        check_paths(&config).expect("a creatable data dir is fine");
        assert!(dir.join("data/audit-archive").is_dir());

        config.gateway.audit.file_path = Some(dir.join("missing/audit.jsonl"));
        let err = check_paths(&config).unwrap_err().to_string();
        assert!(err.contains("gateway.audit.file_path") && err.contains("missing/audit.jsonl"), "{err}");

        config.gateway.audit.file_path = None;
        std::fs::write(dir.join("plain-file"), b"").unwrap();
        config.gateway.audit.archive_dir = Some(dir.join("plain-file/archive"));
        let err = check_paths(&config).unwrap_err().to_string();
        assert!(err.contains("plain-file/archive") && err.contains("cannot be created"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
