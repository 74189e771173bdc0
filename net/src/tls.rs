//! rustls configuration for the broker (client certificates required) and for agents.

use std::fs;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Installs ring as rustls' process-wide crypto provider. Call once at start-up; repeated
/// calls are harmless. Needed because a second provider anywhere in the graph would make
/// rustls refuse to pick one.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The three PEM files of one TLS party.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that the peer's certificate must chain to.
    pub ca: PathBuf,
    /// Our certificate (chain).
    pub cert: PathBuf,
    /// Our private key.
    pub key: PathBuf,
}

/// PEM material loaded into memory.
#[derive(Debug, Clone)]
pub struct TlsPem {
    /// CA certificate(s).
    pub ca: String,
    /// Our certificate.
    pub cert: String,
    /// Our key.
    pub key: String,
}

/// A TLS file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct TlsFileError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    pub source: std::io::Error,
}

impl TlsFiles {
    /// Reads all three files.
    pub fn load(&self) -> Result<TlsPem, TlsFileError> {
        Ok(TlsPem { ca: read(&self.ca)?, cert: read(&self.cert)?, key: read(&self.key)? })
    }
}

fn read(path: &Path) -> Result<String, TlsFileError> {
    fs::read_to_string(path).map_err(|source| TlsFileError { path: path.to_path_buf(), source })
}

impl TlsPem {
    /// Broker side: our identity, and client certificates *required* and verified against the CA
    /// (which also enforces the clientAuth extended key usage).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Agent side: trust only our CA, present our certificate, expect `server_name`.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .domain_name(server_name)
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}
