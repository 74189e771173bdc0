//! Agent identity from SPIFFE URIs: exactly one `spiffe://mas/agent/{agent_id}`.

use mas_core::ids::AgentId;

/// The only trust domain and path prefix we accept.
pub const SPIFFE_PREFIX: &str = "spiffe://mas/agent/";

/// Metadata header carrying the SPIFFE id under simulation, where there is no TLS.
#[cfg(madsim)]
pub const SIM_IDENTITY_HEADER: &str = "x-sim-spiffe-id";

/// Why a peer could not be identified. Display strings are the reference's status details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No verified peer certificate reached the handler.
    #[error("missing_peer_certificate")]
    MissingPeerCertificate,
    /// The certificate could not be parsed.
    #[error("invalid_peer_certificate")]
    InvalidPeerCertificate,
    /// The certificate has no subject alternative name extension.
    #[error("missing_spiffe_san")]
    MissingSan,
    /// Zero or several `spiffe://` URIs among the SANs.
    #[error("invalid_spiffe_san")]
    InvalidSan,
    /// One `spiffe://` URI, but not `spiffe://mas/agent/{valid id}`.
    #[error("invalid_spiffe_format")]
    InvalidFormat,
}

/// Parses `spiffe://mas/agent/{id}` (full match; the id follows the agent id rules).
pub fn agent_from_spiffe_uri(uri: &str) -> Result<AgentId, IdentityError> {
    let id = uri.strip_prefix(SPIFFE_PREFIX).ok_or(IdentityError::InvalidFormat)?;
    AgentId::new(id).map_err(|_| IdentityError::InvalidFormat)
}

/// The SPIFFE URI of an agent.
pub fn spiffe_uri(agent: &AgentId) -> String {
    format!("{SPIFFE_PREFIX}{agent}")
}

/// Picks the agent identity out of a certificate's URI SANs. `sans` is `None` when the
/// certificate has no SAN extension at all.
pub fn agent_from_uri_sans<'a>(sans: Option<impl IntoIterator<Item = &'a str>>) -> Result<AgentId, IdentityError> {
    let sans = sans.ok_or(IdentityError::MissingSan)?;
    let mut spiffe = sans.into_iter().filter(|uri| uri.starts_with("spiffe://"));
    match (spiffe.next(), spiffe.next()) {
        (Some(only), None) => agent_from_spiffe_uri(only),
        _ => Err(IdentityError::InvalidSan),
    }
}

/// Extracts the agent identity from a DER certificate.
#[cfg(not(madsim))]
pub fn agent_from_certificate(der: &[u8]) -> Result<AgentId, IdentityError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::InvalidPeerCertificate)?;
    let san = cert.subject_alternative_name().map_err(|_| IdentityError::InvalidSan)?;
    let uris = san.map(|ext| {
        ext.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect::<Vec<&str>>()
    });
    agent_from_uri_sans(uris.as_ref().map(|v| v.iter().copied()))
}

/// The authenticated agent of a request: from the verified TLS client certificate.
#[cfg(not(madsim))]
pub fn peer_agent<T>(req: &tonic::Request<T>) -> Result<AgentId, IdentityError> {
    let certs = req.peer_certs().ok_or(IdentityError::MissingPeerCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::MissingPeerCertificate)?;
    agent_from_certificate(leaf.as_ref())
}

/// The authenticated agent of a request: under simulation, from the identity header that
/// [`crate::client::IdentityStamp`] sets (madsim has no TLS).
#[cfg(madsim)]
pub fn peer_agent<T>(req: &tonic::Request<T>) -> Result<AgentId, IdentityError> {
    let uri = req.metadata().get(SIM_IDENTITY_HEADER).and_then(|v| v.to_str().ok()).ok_or(IdentityError::MissingSan)?;
    agent_from_uri_sans(Some([uri]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exactly_one_well_formed_spiffe_uri() {
        let ok = agent_from_uri_sans(Some(["https://x", "spiffe://mas/agent/alice"]));
        assert_eq!(ok.map(|a| a.to_string()), Ok("alice".to_string()));
    }

    #[test]
    fn classifies_failures_like_the_reference() {
        assert_eq!(agent_from_uri_sans(None::<[&str; 0]>), Err(IdentityError::MissingSan));
        assert_eq!(agent_from_uri_sans(Some(["https://x"])), Err(IdentityError::InvalidSan));
        assert_eq!(
            agent_from_uri_sans(Some(["spiffe://mas/agent/a", "spiffe://mas/agent/b"])),
            Err(IdentityError::InvalidSan)
        );
        assert_eq!(agent_from_uri_sans(Some(["spiffe://other/agent/a"])), Err(IdentityError::InvalidFormat));
        assert_eq!(agent_from_uri_sans(Some(["spiffe://mas/agent/a b"])), Err(IdentityError::InvalidFormat));
        assert_eq!(agent_from_uri_sans(Some(["spiffe://mas/agent/"])), Err(IdentityError::InvalidFormat));
    }
}
