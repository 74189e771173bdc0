//! Peer identity from SPIFFE URIs: exactly one `spiffe://mas/agent/{agent_id}` for an agent,
//! or `spiffe://mas/operator/{name}` for an operator of the admin API (never an agent).

use mas_core::ids::AgentId;

/// The only trust domain and path prefix we accept.
pub const SPIFFE_PREFIX: &str = "spiffe://mas/agent/";

/// The path prefix of operator identities.
pub const OPERATOR_SPIFFE_PREFIX: &str = "spiffe://mas/operator/";

/// An operator's name, from `spiffe://mas/operator/{name}`; the same character rules as an
/// agent id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OperatorId(String);

impl OperatorId {
    /// `name`, if it follows the agent id rules.
    pub fn new(name: &str) -> Option<OperatorId> {
        AgentId::new(name).ok().map(|_| OperatorId(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its SPIFFE URI.
    pub fn spiffe_uri(&self) -> String {
        format!("{OPERATOR_SPIFFE_PREFIX}{}", self.0)
    }
}

impl std::fmt::Display for OperatorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a verified certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An agent: may use the agent services, never the admin API.
    Agent(AgentId),
    /// An operator: may use the admin API (when configured), never the agent services.
    Operator(OperatorId),
}

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
/// certificate has no SAN extension at all. An operator's certificate is not an agent's
/// (`invalid_spiffe_format`).
pub fn agent_from_uri_sans<'a>(sans: Option<impl IntoIterator<Item = &'a str>>) -> Result<AgentId, IdentityError> {
    match principal_from_uri_sans(sans)? {
        Principal::Agent(agent) => Ok(agent),
        Principal::Operator(_) => Err(IdentityError::InvalidFormat),
    }
}

/// Picks the principal out of a certificate's URI SANs: exactly one `spiffe://` URI, naming
/// an agent or an operator.
pub fn principal_from_uri_sans<'a>(
    sans: Option<impl IntoIterator<Item = &'a str>>,
) -> Result<Principal, IdentityError> {
    let sans = sans.ok_or(IdentityError::MissingSan)?;
    let mut spiffe = sans.into_iter().filter(|uri| uri.starts_with("spiffe://"));
    let uri = match (spiffe.next(), spiffe.next()) {
        (Some(only), None) => only,
        _ => return Err(IdentityError::InvalidSan),
    };
    match uri.strip_prefix(OPERATOR_SPIFFE_PREFIX) {
        Some(name) => OperatorId::new(name).map(Principal::Operator).ok_or(IdentityError::InvalidFormat),
        None => agent_from_spiffe_uri(uri).map(Principal::Agent),
    }
}

/// Extracts the agent identity from a DER certificate.
#[cfg(not(madsim))]
pub fn agent_from_certificate(der: &[u8]) -> Result<AgentId, IdentityError> {
    match principal_from_certificate(der)? {
        Principal::Agent(agent) => Ok(agent),
        Principal::Operator(_) => Err(IdentityError::InvalidFormat),
    }
}

/// Extracts the principal (agent or operator) from a DER certificate.
#[cfg(not(madsim))]
pub fn principal_from_certificate(der: &[u8]) -> Result<Principal, IdentityError> {
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
    principal_from_uri_sans(uris.as_ref().map(|v| v.iter().copied()))
}

/// The authenticated principal of a request, from the verified TLS client certificate.
#[cfg(not(madsim))]
pub fn peer_principal<T>(req: &tonic::Request<T>) -> Result<Principal, IdentityError> {
    let certs = req.peer_certs().ok_or(IdentityError::MissingPeerCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::MissingPeerCertificate)?;
    principal_from_certificate(leaf.as_ref())
}

/// The authenticated agent of a request: from the verified TLS client certificate.
#[cfg(not(madsim))]
pub fn peer_agent<T>(req: &tonic::Request<T>) -> Result<AgentId, IdentityError> {
    let certs = req.peer_certs().ok_or(IdentityError::MissingPeerCertificate)?;
    leaf_agent(&certs)
}

#[cfg(not(madsim))]
fn leaf_agent(certs: &[rustls::pki_types::CertificateDer<'static>]) -> Result<AgentId, IdentityError> {
    let leaf = certs.first().ok_or(IdentityError::MissingPeerCertificate)?;
    agent_from_certificate(leaf.as_ref())
}

/// The peer certificates of one TLS connection, as tonic hands them to every request on it.
#[cfg(not(madsim))]
type PeerCerts = std::sync::Arc<Vec<rustls::pki_types::CertificateDer<'static>>>;

/// The identity of each connection's peer, parsed from its certificate once per connection
/// rather than once per RPC (an X.509 parse was a visible share of a small send's cost).
///
/// tonic shares one `Arc` of the verified chain among all requests of a connection, so the
/// cache is keyed by that allocation. Each entry holds a `Weak` to it: while the entry
/// exists the allocation cannot be reused for another connection's chain, so a key never
/// names a different peer. Entries of closed connections are pruned when the cache is full;
/// beyond `capacity` live connections, identities are parsed per request, as without a cache.
#[cfg(not(madsim))]
pub struct PeerIdentities {
    by_connection: std::sync::RwLock<std::collections::HashMap<usize, KnownPeer>>,
    capacity: usize,
}

#[cfg(not(madsim))]
struct KnownPeer {
    certs: std::sync::Weak<Vec<rustls::pki_types::CertificateDer<'static>>>,
    identity: Result<AgentId, IdentityError>,
}

#[cfg(not(madsim))]
impl PeerIdentities {
    /// A cache for up to `capacity` connections (the broker's connection bound).
    pub fn new(capacity: usize) -> Self {
        PeerIdentities { by_connection: Default::default(), capacity }
    }

    /// The authenticated agent of a request, as [`peer_agent`] finds it.
    pub fn peer_agent<T>(&self, req: &tonic::Request<T>) -> Result<AgentId, IdentityError> {
        let certs = req.peer_certs().ok_or(IdentityError::MissingPeerCertificate)?;
        self.identify(&certs)
    }

    fn identify(&self, certs: &PeerCerts) -> Result<AgentId, IdentityError> {
        use std::sync::{Arc, PoisonError, Weak};

        let key = Arc::as_ptr(certs) as usize;
        {
            let known = self.by_connection.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(peer) = known.get(&key).filter(|peer| Weak::as_ptr(&peer.certs) == Arc::as_ptr(certs)) {
                return peer.identity.clone();
            }
        }
        let identity = leaf_agent(certs);
        let mut known = self.by_connection.write().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= self.capacity {
            known.retain(|_, peer| peer.certs.strong_count() > 0);
        }
        if known.len() < self.capacity {
            known.insert(key, KnownPeer { certs: Arc::downgrade(certs), identity: identity.clone() });
        }
        identity
    }

    /// Connections currently remembered (for tests).
    pub fn len(&self) -> usize {
        self.by_connection.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Whether no connection is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The authenticated agent of a request: under simulation, from the identity header that
/// [`crate::client::IdentityStamp`] sets (madsim has no TLS).
#[cfg(madsim)]
pub fn peer_agent<T>(req: &tonic::Request<T>) -> Result<AgentId, IdentityError> {
    let uri = req.metadata().get(SIM_IDENTITY_HEADER).and_then(|v| v.to_str().ok()).ok_or(IdentityError::MissingSan)?;
    agent_from_uri_sans(Some([uri]))
}

/// Under simulation identities come from a header on every request; nothing to cache.
#[cfg(madsim)]
pub struct PeerIdentities;

#[cfg(madsim)]
impl PeerIdentities {
    /// A cache that keeps nothing (the capacity is that of the real one).
    pub fn new(_capacity: usize) -> Self {
        PeerIdentities
    }

    /// The authenticated agent of a request, as [`peer_agent`] finds it.
    pub fn peer_agent<T>(&self, req: &tonic::Request<T>) -> Result<AgentId, IdentityError> {
        peer_agent(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_are_their_own_principals() {
        let ops = principal_from_uri_sans(Some(["spiffe://mas/operator/ops-1"]));
        assert_eq!(ops, Ok(Principal::Operator(OperatorId::new("ops-1").unwrap())));
        assert_eq!(principal_from_uri_sans(Some(["spiffe://mas/operator/"])), Err(IdentityError::InvalidFormat));
        assert_eq!(principal_from_uri_sans(Some(["spiffe://mas/operator/a/b"])), Err(IdentityError::InvalidFormat));
        let agent = principal_from_uri_sans(Some(["spiffe://mas/agent/alice"]));
        assert!(matches!(agent, Ok(Principal::Agent(_))));
    }

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
        assert_eq!(
            agent_from_uri_sans(Some(["spiffe://mas/operator/ops"])),
            Err(IdentityError::InvalidFormat),
            "an operator is never an agent"
        );
        assert_eq!(agent_from_uri_sans(Some(["spiffe://mas/agent/"])), Err(IdentityError::InvalidFormat));
    }

    #[cfg(not(madsim))]
    mod cache {
        use std::sync::Arc;

        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;

        use super::super::*;
        use crate::pki::DevCa;

        fn chain(ca: &DevCa, agent: &str) -> PeerCerts {
            let pair = ca.agent_cert(&AgentId::new(agent).expect("id")).expect("certificate");
            Arc::new(vec![CertificateDer::from_pem_slice(pair.cert.as_bytes()).expect("PEM").into_owned()])
        }

        #[test]
        fn a_connection_is_parsed_once_and_each_names_its_own_peer() {
            let ca = DevCa::new("test").expect("CA");
            let peers = PeerIdentities::new(8);
            let (alice, bob) = (chain(&ca, "alice"), chain(&ca, "bob"));
            for _ in 0..3 {
                assert_eq!(peers.identify(&alice).map(|a| a.to_string()), Ok("alice".to_string()));
                assert_eq!(peers.identify(&bob).map(|a| a.to_string()), Ok("bob".to_string()));
            }
            assert_eq!(peers.len(), 2, "one entry per connection, however many requests");
            // A refused certificate is remembered as refused.
            let no_san = Arc::new(vec![CertificateDer::from(vec![0x30, 0x00])]);
            assert_eq!(peers.identify(&no_san), Err(IdentityError::InvalidPeerCertificate));
            assert_eq!(peers.identify(&no_san), Err(IdentityError::InvalidPeerCertificate));
            assert_eq!(peers.identify(&Arc::new(Vec::new())), Err(IdentityError::MissingPeerCertificate));
        }

        #[test]
        fn closed_connections_make_room_and_a_full_cache_still_identifies() {
            let ca = DevCa::new("test").expect("CA");
            let peers = PeerIdentities::new(1);
            let alice = chain(&ca, "alice");
            assert!(peers.identify(&alice).is_ok());
            // Full with a live connection: bob is identified, not remembered.
            let bob = chain(&ca, "bob");
            assert_eq!(peers.identify(&bob).map(|a| a.to_string()), Ok("bob".to_string()));
            assert_eq!(peers.len(), 1);
            // Alice's connection closes: her entry is pruned for the next newcomer.
            drop(alice);
            let carol = chain(&ca, "carol");
            assert_eq!(peers.identify(&carol).map(|a| a.to_string()), Ok("carol".to_string()));
            assert_eq!(peers.len(), 1);
            assert_eq!(peers.identify(&bob).map(|a| a.to_string()), Ok("bob".to_string()));
        }
    }
}
