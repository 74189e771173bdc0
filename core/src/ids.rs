//! Identifiers and their validation rules, matching the reference exactly (full match, no
//! trailing newline accepted): agent id `[A-Za-z0-9_-]{1,128}`, instance id `[A-Za-z0-9_-]{1,32}`.

use std::fmt;
use std::sync::Arc;

use rand_core::RngCore;
use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty, too long, or containing a character outside `[A-Za-z0-9_-]`.
    #[error("invalid {kind}: must match [A-Za-z0-9_-]{{1,{max_len}}}")]
    Invalid {
        /// Which identifier.
        kind: &'static str,
        /// Its maximum length.
        max_len: usize,
    },
}

fn is_id_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

fn check(s: &str, kind: &'static str, max_len: usize) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(is_id_char) {
        return Err(IdError::Invalid { kind, max_len });
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Longest accepted identifier, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `s` and wraps it.
            pub fn new(s: &str) -> Result<Self, IdError> {
                check(s, $kind, Self::MAX_LEN)?;
                Ok(Self(Arc::from(s)))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_id!(
    /// An agent's identity, taken from its certificate's SPIFFE URI. Shared by all its instances.
    AgentId,
    "agent id",
    128
);
validated_id!(
    /// One running process of an agent; several instances of one agent share its work queue.
    InstanceId,
    "instance id",
    32
);
validated_id!(
    /// One broker among those sharing a store (reference `broker_id`). Stable across restarts
    /// of the same broker and unique among live brokers: a restarted broker takes over the
    /// sessions its previous process left behind (see `OwnerToken::supersedes`).
    BrokerId,
    "broker id",
    128
);

/// Identifies one delivery *attempt*: a redelivery of the same message gets a fresh one, so a
/// late ack for an earlier attempt can be recognised as stale. 32 lowercase hex characters,
/// like the reference's `uuid4().hex`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct DeliveryId(Arc<str>);

impl DeliveryId {
    /// Draws a fresh id from a seeded generator (the machine's own; never a thread RNG).
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        DeliveryId(Arc::from(hex(&bytes)))
    }

    /// Wraps an id received from a peer. Unknown ids are harmless: they match nothing.
    pub fn from_wire(s: &str) -> Self {
        DeliveryId(Arc::from(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message id in the reference's `str(uuid4())` form (RFC 4122 version 4, 36 characters),
/// drawn from a seeded generator so that simulation runs are reproducible.
pub fn random_uuid_v4(rng: &mut impl RngCore) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    #[test]
    fn agent_id_accepts_the_reference_charset_and_length() {
        assert!(AgentId::new("alice_01-b").is_ok());
        assert!(AgentId::new(&"a".repeat(128)).is_ok());
        assert!(AgentId::new(&"a".repeat(129)).is_err());
        assert!(AgentId::new("").is_err());
        assert!(AgentId::new("a.b").is_err());
        assert!(AgentId::new("alice\n").is_err(), "trailing newline must not pass");
    }

    #[test]
    fn instance_id_is_at_most_32() {
        assert!(InstanceId::new(&"x".repeat(32)).is_ok());
        assert!(InstanceId::new(&"x".repeat(33)).is_err());
        assert!(InstanceId::new("ab/cd").is_err());
    }

    #[test]
    fn ids_deserialize_with_validation() {
        let ok: Result<AgentId, _> = serde_json::from_str("\"bob\"");
        assert_eq!(ok.map(|a| a.to_string()).ok(), Some("bob".to_string()));
        let bad: Result<AgentId, _> = serde_json::from_str("\"b b\"");
        assert!(bad.is_err());
    }

    #[test]
    fn uuid_v4_has_version_and_variant_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let id = random_uuid_v4(&mut rng);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(id, random_uuid_v4(&mut rng));
    }

    #[test]
    fn delivery_ids_are_32_hex_and_distinct() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = DeliveryId::random(&mut rng);
        let b = DeliveryId::random(&mut rng);
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
