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

/// Why TLS material cannot work, naming the file and the cause. Checked before the broker
/// says it is ready, so a bad file fails the start instead of every handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsMaterialError {
    /// A file could not be read.
    #[error(transparent)]
    Read(#[from] TlsFileError),
    /// A file holds no usable PEM of the expected kind.
    #[error("{path}: {what}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The private key is not the one of the certificate.
    #[error("{key} is not the private key of {cert}: {why}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' finding.
        why: String,
    },
}

impl TlsFiles {
    /// Reads the three files and checks that they can serve: certificates and key parse, the
    /// key belongs to the first certificate, our certificate is within its validity period,
    /// and every certificate in the CA file is a CA (basicConstraints CA:TRUE): a leaf there
    /// would make every peer's handshake fail.
    pub fn load_checked(&self) -> Result<TlsPem, TlsMaterialError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use x509_parser::prelude::{FromDer, X509Certificate};

        let pem = self.load()?;
        let unreadable = |path: &Path, what: String| TlsMaterialError::Unreadable { path: path.to_path_buf(), what };
        let certs = |path: &Path, text: &str| -> Result<Vec<CertificateDer<'static>>, TlsMaterialError> {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| unreadable(path, format!("not PEM certificates ({e})")))?;
            if certs.is_empty() {
                return Err(unreadable(path, "holds no PEM certificate".into()));
            }
            Ok(certs)
        };
        let parsed = |path: &Path, der: &[u8]| -> Result<bool, TlsMaterialError> {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|e| unreadable(path, format!("unparsable certificate ({e})")))?;
            Ok(cert.is_ca())
        };
        let chain = certs(&self.cert, &pem.cert)?;
        let (_, leaf) = X509Certificate::from_der(&chain[0])
            .map_err(|e| unreadable(&self.cert, format!("unparsable certificate ({e})")))?;
        if !leaf.validity().is_valid() {
            let (from, to) = (leaf.validity().not_before, leaf.validity().not_after);
            return Err(unreadable(&self.cert, format!("certificate is not valid now (valid from {from} to {to})")));
        }
        let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes())
            .map_err(|e| unreadable(&self.key, format!("no PEM private key ({e})")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| unreadable(&self.key, format!("unsupported private key ({e})")))?;
        rustls::sign::CertifiedKey::new(chain, signer).keys_match().map_err(|e| TlsMaterialError::KeyMismatch {
            cert: self.cert.clone(),
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        for (i, der) in certs(&self.ca, &pem.ca)?.iter().enumerate() {
            if !parsed(&self.ca, der)? {
                return Err(unreadable(
                    &self.ca,
                    format!("certificate {} is not a CA (basicConstraints CA:TRUE is missing)", i + 1),
                ));
            }
        }
        Ok(pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::DevCa;

    fn files(dir: &Path, ca: &str, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        fs::write(&files.ca, ca).unwrap();
        fs::write(&files.cert, cert).unwrap();
        fs::write(&files.key, key).unwrap();
        files
    }

    #[test]
    fn bad_material_is_named_with_its_file_and_cause() {
        let dir = std::env::temp_dir().join(format!("mas-tls-check-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let ca = DevCa::new("check CA").unwrap();
        let server = ca.server_cert().unwrap();
        let other = ca.server_cert().unwrap();
        let good = files(&dir, &ca.cert_pem(), &server.cert, &server.key);
        good.load_checked().expect("dev material is good");

        let err = files(&dir, &server.cert, &server.cert, &server.key).load_checked().unwrap_err().to_string();
        assert!(err.contains("ca.pem") && err.contains("not a CA"), "{err}");
        let err = files(&dir, &ca.cert_pem(), &server.cert, &other.key).load_checked().unwrap_err().to_string();
        assert!(err.contains("key.pem") && err.contains("cert.pem") && err.contains("not the private key"), "{err}");
        let err = files(&dir, &ca.cert_pem(), "garbage", &server.key).load_checked().unwrap_err().to_string();
        assert!(err.contains("cert.pem") && err.contains("no PEM certificate"), "{err}");
        let err = files(&dir, &ca.cert_pem(), &server.cert, "garbage").load_checked().unwrap_err().to_string();
        assert!(err.contains("key.pem") && err.contains("private key"), "{err}");
        let missing = TlsFiles { ca: dir.join("nope.pem"), ..good };
        let err = missing.load_checked().unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
