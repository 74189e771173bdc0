//! A payload parsed once from its wire text, and its canonical JSON.
//!
//! Admission reads a payload three times: DLP scans its keys and values, the audit record
//! hashes its canonical JSON, and the envelope carries that same JSON. Parsing the wire text
//! into a `serde_json::Map` and serialising it twice cost more than all the policy checks of a
//! 2 KB message together (one allocation per key and per string, a tree to drop). So the
//! pipeline parses into a [`WirePayload`] instead: strings borrowed from the wire text where
//! they hold no escape, members sorted as `serde_json::Map` sorts them, numbers as
//! `serde_json::Number`. It is written out once, as a [`CanonicalPayload`], whose text is
//! exactly what `serde_json` writes for the `Map` parsed from the same wire text — the hash of
//! every audit record is unchanged — and which `Envelope<CanonicalPayload>` writes into the
//! envelope as it is.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

use crate::envelope::{Payload, PayloadError};
use crate::ids::hex;

/// An object's members: sorted by key in byte order, each key once (the last of equal keys
/// in the wire text wins) — the order and the de-duplication of `serde_json::Map`.
pub type Members<'a> = Vec<(Cow<'a, str>, Node<'a>)>;

/// One JSON value of a [`WirePayload`].
#[derive(Debug, Clone, PartialEq)]
pub enum Node<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as `serde_json` reads it (so it is written back as `serde_json` writes it).
    Number(Number),
    /// A string: borrowed from the wire text unless it held an escape.
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Node<'a>>),
    /// An object.
    Object(Members<'a>),
}

/// A business payload (always a JSON object) as admission reads it: parsed once, borrowing
/// its wire text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WirePayload<'a> {
    members: Members<'a>,
}

impl<'a> WirePayload<'a> {
    /// Parses a wire payload, refusing what [`crate::envelope::parse_payload`] refuses. The
    /// empty string means `{}`, as in the reference.
    pub fn parse(data_json: &'a str) -> Result<Self, PayloadError> {
        if data_json.is_empty() {
            return Ok(WirePayload::default());
        }
        match serde_json::from_str::<Node<'a>>(data_json) {
            Ok(Node::Object(members)) => Ok(WirePayload { members }),
            Ok(_) => Err(PayloadError::NotAnObject),
            Err(_) => Err(PayloadError::InvalidJson),
        }
    }

    /// A view of an owned payload, borrowing its keys and strings.
    pub fn borrowed(payload: &'a Payload) -> Self {
        WirePayload { members: members_of(payload) }
    }

    /// The top-level members, in key order.
    pub fn members(&self) -> &[(Cow<'a, str>, Node<'a>)] {
        &self.members
    }

    /// The owned payload (for the rare paths that rewrite it, such as redaction).
    pub fn to_payload(&self) -> Payload {
        self.members.iter().map(|(key, node)| (key.to_string(), node.to_value())).collect()
    }

    /// The canonical JSON, written once.
    pub fn canonical(&self) -> CanonicalPayload {
        // Writing plain data into a string cannot fail (JSON numbers are always finite).
        CanonicalPayload(serde_json::to_string(self).unwrap_or_default())
    }
}

fn members_of(map: &serde_json::Map<String, Value>) -> Members<'_> {
    map.iter().map(|(key, value)| (Cow::Borrowed(key.as_str()), Node::borrowed(value))).collect()
}

impl<'a> Node<'a> {
    fn borrowed(value: &'a Value) -> Self {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Number(n.clone()),
            Value::String(s) => Node::String(Cow::Borrowed(s)),
            Value::Array(items) => Node::Array(items.iter().map(Node::borrowed).collect()),
            Value::Object(map) => Node::Object(members_of(map)),
        }
    }

    /// The owned `serde_json` value.
    pub fn to_value(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Number(n) => Value::Number(n.clone()),
            Node::String(s) => Value::String(s.to_string()),
            Node::Array(items) => Value::Array(items.iter().map(Node::to_value).collect()),
            Node::Object(members) => {
                Value::Object(members.iter().map(|(key, node)| (key.to_string(), node.to_value())).collect())
            }
        }
    }
}

/// A payload's canonical JSON: keys sorted, compact — what its audit record's
/// `payload_hash` covers and what its envelope carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPayload(String);

impl CanonicalPayload {
    /// The canonical JSON of an owned payload (its map is ordered by key).
    pub fn of(payload: &Payload) -> Self {
        // Serialising a JSON map into a string cannot fail.
        CanonicalPayload(serde_json::to_string(payload).unwrap_or_default())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// SHA-256 (hex) of the text: the audit record's `payload_hash`.
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }
}

impl Serialize for Node<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => serializer.serialize_unit(),
            Node::Bool(b) => serializer.serialize_bool(*b),
            Node::Number(n) => n.serialize(serializer),
            Node::String(s) => serializer.serialize_str(s),
            Node::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Node::Object(members) => MembersRef(members).serialize(serializer),
        }
    }
}

/// Written as its canonical JSON object.
impl Serialize for WirePayload<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MembersRef(&self.members).serialize(serializer)
    }
}

/// Members serialised as a map, in their (sorted) order.
struct MembersRef<'m, 'a>(&'m [(Cow<'a, str>, Node<'a>)]);

impl Serialize for MembersRef<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, node) in self.0 {
            map.serialize_entry(key.as_ref(), node)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

/// A string that borrows from the input when it can.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(NodeVisitor).and_then(|node| match node {
            Node::String(s) => Ok(Text(s)),
            _ => Err(de::Error::custom("object key is not a string")),
        })
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(b))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.into()))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Node<'de>, E> {
        // As serde_json's own value: a number it cannot hold becomes null (never from JSON).
        Ok(Number::from_f64(n).map_or(Node::Null, Node::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(s.to_string())))
    }

    fn visit_string<E>(self, s: String) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut members: Members<'de> = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((Text(key), node)) = map.next_entry::<Text<'de>, Node<'de>>()? {
            members.push((key, node));
        }
        Ok(Node::Object(sorted(members)))
    }
}

/// Sorts members by key and keeps the last of equal keys, as inserting them one by one into a
/// `serde_json::Map` does.
fn sorted(mut members: Members<'_>) -> Members<'_> {
    if members.is_sorted_by(|a, b| a.0 < b.0) {
        return members;
    }
    // Reversed, a stable sort puts the last of equal keys first, which `dedup_by` keeps.
    members.reverse();
    members.sort_by(|a, b| a.0.cmp(&b.0));
    members.dedup_by(|later, kept| later.0 == kept.0);
    members
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::envelope::parse_payload;

    /// What the owned path writes for the same wire text: the reference for every check here.
    fn owned_canonical(wire: &str) -> Result<String, PayloadError> {
        parse_payload(wire).map(|payload| CanonicalPayload::of(&payload).as_str().to_string())
    }

    fn wire_canonical(wire: &str) -> Result<String, PayloadError> {
        WirePayload::parse(wire).map(|payload| payload.canonical().as_str().to_string())
    }

    #[test]
    fn canonical_json_is_what_serde_json_writes_for_its_map() {
        for wire in [
            "",
            "{}",
            r#"{"b": 1, "a": [true, null, {"z": "é", "y": "tab\there"}]}"#,
            r#"{"n": 1.50, "e": 1e2, "neg": -0, "negf": -0.0, "big": 18446744073709551616, "i": -42}"#,
            r#"{"dup": 1, "x": 0, "dup": 2}"#,
            r#"{"esc\u0041ped": "\u00e9\n\"q\"", "ctl": "\u001f"}"#,
            r#"{"Z": 1, "a": 2, "_": 3, "ä": 4, "aa": 5, "": 6}"#,
        ] {
            assert_eq!(wire_canonical(wire), owned_canonical(wire), "{wire}");
        }
    }

    #[test]
    fn it_refuses_what_the_owned_parser_refuses() {
        for wire in ["[]", "3", "\"s\"", "null", "{", "{} x", "{\"a\":}", "{'a':1}"] {
            assert_eq!(wire_canonical(wire), owned_canonical(wire), "{wire}");
            assert!(WirePayload::parse(wire).is_err(), "{wire}");
        }
        let deep = format!("{}{}", "{\"a\":".repeat(200), "}".repeat(200));
        assert_eq!(WirePayload::parse(&deep), Err(PayloadError::InvalidJson), "the same depth limit");
    }

    #[test]
    fn unescaped_strings_are_borrowed() {
        let wire = r#"{"plain": "text", "escaped": "a\nb"}"#;
        let payload = WirePayload::parse(wire).expect("object");
        let borrowed = |key: &str| {
            payload
                .members()
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, node)| matches!(node, Node::String(Cow::Borrowed(_))))
        };
        assert_eq!(borrowed("plain"), Some(true));
        assert_eq!(borrowed("escaped"), Some(false));
    }

    #[test]
    fn the_hash_is_the_audit_payload_hash() {
        let wire = r#"{"b": [1, 2.5], "a": "x"}"#;
        let owned = parse_payload(wire).expect("object");
        let canonical = WirePayload::parse(wire).expect("object").canonical();
        assert_eq!(canonical.hash(), crate::policy::audit::payload_hash(&owned));
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "[a-zA-Z0-9 é\"\\\\\n\u{1}-]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-d\"é]{0,3}", inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the wire text (compact or pretty, keys in any order, duplicated keys), the
        /// canonical JSON and its hash are the owned path's, and the payload round-trips.
        #[test]
        fn wire_and_owned_paths_agree(
            members in prop::collection::vec(("[a-e]{0,2}", json()), 0..8),
            pretty in any::<bool>(),
        ) {
            // Written member by member, so keys keep their generated order and may repeat.
            let write = |v: &Value| if pretty { serde_json::to_string_pretty(v) } else { serde_json::to_string(v) };
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), write(v).expect("json")))
                .collect();
            let wire = format!("{{{}}}", body.join(if pretty { ",\n  " } else { "," }));
            prop_assert_eq!(wire_canonical(&wire), owned_canonical(&wire));
            let parsed = WirePayload::parse(&wire).expect("object");
            let owned = parse_payload(&wire).expect("object");
            prop_assert_eq!(parsed.to_payload(), owned.clone());
            prop_assert_eq!(WirePayload::borrowed(&owned), parsed);
        }
    }
}
