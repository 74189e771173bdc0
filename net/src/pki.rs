//! A development PKI in pure Rust (rcgen, no openssl): one CA, a server certificate for
//! `localhost`/`127.0.0.1`, and one client certificate per agent carrying its SPIFFE URI SAN
//! and the clientAuth usage. For development and tests only: the keys are written unencrypted.
//!
//! Every certificate conforms to RFC 5280 profile rules that strict verifiers enforce (Python
//! 3.13's default `ssl` context sets `VERIFY_X509_STRICT`): each carries a Subject Key
//! Identifier, leaves carry the Authority Key Identifier of the CA, key usage and
//! `basicConstraints CA:FALSE`.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use mas_core::ids::AgentId;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{OperatorId, Principal, spiffe_uri};
use crate::tls::TlsFiles;

/// Why the dev PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert: String,
    /// Its private key (PKCS#8).
    pub key: String,
}

/// A certificate authority that issues dev certificates.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A fresh self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.distinguished_name.push(DnType::CommonName, common_name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(DevCa { issuer })
    }

    /// The CA certificate (the trust root for both sides).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> Result<PemPair, PkiError> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, "mas broker (dev)");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate for `agent`: SAN `spiffe://mas/agent/{agent}`, clientAuth.
    pub fn agent_cert(&self, agent: &AgentId) -> Result<PemPair, PkiError> {
        let uri = spiffe_uri(agent).try_into()?;
        self.client_cert(agent.as_str(), vec![SanType::URI(uri)])
    }

    /// A client certificate for an operator of the admin API: SAN
    /// `spiffe://mas/operator/{name}`, clientAuth.
    pub fn operator_cert(&self, operator: &OperatorId) -> Result<PemPair, PkiError> {
        let uri = operator.spiffe_uri().try_into()?;
        self.client_cert(&format!("operator {operator}"), vec![SanType::URI(uri)])
    }

    /// The client certificate of `principal`.
    pub fn principal_cert(&self, principal: &Principal) -> Result<PemPair, PkiError> {
        match principal {
            Principal::Agent(agent) => self.agent_cert(agent),
            Principal::Operator(operator) => self.operator_cert(operator),
        }
    }

    /// A client certificate with exactly the given SANs (none at all if empty); for tests of
    /// identity rules.
    pub fn client_cert(&self, common_name: &str, sans: Vec<SanType>) -> Result<PemPair, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// Signs a leaf: RFC 5280 key identifiers (SKI, AKI from the CA's SKI), `CA:FALSE` and the
    /// digitalSignature usage (what an ECDSA TLS key does) beside the given extended usage.
    fn issue(&self, mut params: CertificateParams) -> Result<PemPair, PkiError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// Where [`write_dev_pki`] put things.
#[derive(Debug, Clone)]
pub struct DevPkiFiles {
    /// The broker's files (CA, server certificate, server key).
    pub server: TlsFiles,
    /// The directory; agent `x` has `x.pem` and `x.key` in it.
    pub dir: PathBuf,
}

impl DevPkiFiles {
    /// The files of a development PKI in `dir`, laid out as [`write_dev_pki`] (and
    /// `mas dev-certs`) write them.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let server = TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
        DevPkiFiles { server, dir }
    }

    /// An agent's files (CA, its certificate, its key).
    pub fn agent(&self, agent: &AgentId) -> TlsFiles {
        TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{agent}.pem")),
            key: self.dir.join(format!("{agent}.key")),
        }
    }

    /// An operator's files: `operators/{name}.pem` and `.key` beside the CA.
    pub fn operator(&self, operator: &OperatorId) -> TlsFiles {
        let paths = operator_paths(&self.dir.join("ca.pem"), operator);
        TlsFiles { ca: self.dir.join("ca.pem"), cert: paths.cert, key: paths.key }
    }
}

/// Where `mas dev-certs` writes an operator's certificate and key: `operators/{name}.pem` and
/// `.key` in the CA certificate's directory.
pub fn operator_paths(ca_path: &Path, operator: &OperatorId) -> CertPaths {
    let dir = ca_path.parent().unwrap_or(Path::new("")).join("operators");
    CertPaths { cert: dir.join(format!("{operator}.pem")), key: dir.join(format!("{operator}.key")) }
}

/// Where one certificate and its key are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM), written readable by the owner only.
    pub key: PathBuf,
}

/// Writes a fresh dev PKI into `dir`: `ca.pem`, `server.pem`/`server.key`,
/// `{agent}.pem`/`{agent}.key` per agent and `operators/{name}.pem`/`.key` per operator. The
/// CA key is not written: nothing else is signed.
pub fn write_dev_pki(dir: &Path, agents: &[AgentId], operators: &[OperatorId]) -> Result<DevPkiFiles, PkiError> {
    let pair = |name: &str| CertPaths { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
    let ca = dir.join("ca.pem");
    let clients: Vec<_> = agents
        .iter()
        .map(|agent| (Principal::Agent(agent.clone()), pair(agent.as_str())))
        .chain(operators.iter().map(|op| (Principal::Operator(op.clone()), operator_paths(&ca, op))))
        .collect();
    write_dev_pki_to(&ca, &pair("server"), &clients)?;
    Ok(DevPkiFiles::at(dir))
}

/// Writes a fresh dev PKI to the paths given (a project file names each one): the CA
/// certificate, the server's pair and each client's. Missing directories are created.
pub fn write_dev_pki_to(
    ca_path: &Path,
    server: &CertPaths,
    clients: &[(Principal, CertPaths)],
) -> Result<(), PkiError> {
    let ca = DevCa::new("mas dev CA")?;
    write(ca_path, &ca.cert_pem(), false)?;
    write_pair(server, &ca.server_cert()?)?;
    for (principal, paths) in clients {
        write_pair(paths, &ca.principal_cert(principal)?)?;
    }
    Ok(())
}

fn write_pair(paths: &CertPaths, pair: &PemPair) -> Result<(), PkiError> {
    write(&paths.cert, &pair.cert, false)?;
    write(&paths.key, &pair.key, true)
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source| PkiError::Write { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_path_buf(), source })?;
    }
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(failed)?;
    file.write_all(contents.as_bytes()).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::agent_from_certificate;

    fn der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&body)
    }

    // Minimal base64 decoder for the test (avoids a dependency just for this).
    fn base64_decode(s: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|c| *c != b'=') {
            let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn agent_cert_carries_its_spiffe_id() {
        let ca = DevCa::new("test").unwrap();
        let alice = AgentId::new("alice").unwrap();
        let pair = ca.agent_cert(&alice).unwrap();
        assert_eq!(agent_from_certificate(&der(&pair.cert)), Ok(alice));
    }

    /// The extensions a strict RFC 5280 verifier requires (Python 3.13's `VERIFY_X509_STRICT`
    /// refused our leaves without them): key identifiers that link leaf to CA, key usage, and
    /// basic constraints on both sides.
    #[test]
    fn certificates_carry_rfc5280_key_identifiers_and_usages() {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

        /// What a verifier reads: key identifiers, CA flag, (digitalSignature, keyCertSign).
        #[derive(Default)]
        struct Extensions {
            ski: Option<Vec<u8>>,
            aki: Option<Vec<u8>>,
            is_ca: Option<bool>,
            usage: Option<(bool, bool)>,
        }

        fn extensions(der: &[u8]) -> Extensions {
            let (_, cert) = X509Certificate::from_der(der).expect("parse");
            let mut found = Extensions::default();
            for ext in cert.extensions() {
                match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => found.ski = Some(id.0.to_vec()),
                    ParsedExtension::AuthorityKeyIdentifier(a) => {
                        found.aki = a.key_identifier.as_ref().map(|id| id.0.to_vec());
                    }
                    ParsedExtension::BasicConstraints(bc) => found.is_ca = Some(bc.ca),
                    ParsedExtension::KeyUsage(ku) => found.usage = Some((ku.digital_signature(), ku.key_cert_sign())),
                    _ => {}
                }
            }
            found
        }

        let ca = DevCa::new("test").unwrap();
        let root = extensions(&der(&ca.cert_pem()));
        let ca_ski = root.ski.expect("CA has a subject key identifier");
        assert_eq!(root.is_ca, Some(true));
        assert_eq!(root.usage.map(|(_, sign)| sign), Some(true), "CA may sign certificates");

        let server = ca.server_cert().unwrap();
        let agent = ca.agent_cert(&AgentId::new("alice").unwrap()).unwrap();
        for leaf in [&server.cert, &agent.cert] {
            let found = extensions(&der(leaf));
            assert!(found.ski.is_some_and(|id| !id.is_empty() && id != ca_ski), "leaf has its own SKI");
            assert_eq!(found.aki.as_ref(), Some(&ca_ski), "leaf AKI names the CA's key");
            assert_eq!(found.is_ca, Some(false), "leaf says CA:FALSE");
            assert_eq!(found.usage, Some((true, false)), "leaf: digitalSignature, never keyCertSign");
        }
    }

    #[test]
    fn cert_without_san_is_missing_spiffe_san() {
        let ca = DevCa::new("test").unwrap();
        let pair = ca.client_cert("nobody", vec![]).unwrap();
        assert_eq!(agent_from_certificate(&der(&pair.cert)), Err(crate::identity::IdentityError::MissingSan));
    }
}
