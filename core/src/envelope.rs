//! The message envelope, byte-compatible with the reference's JSON (`EnvelopeMessage`): same
//! field names, same order, `null` for absent optional fields, so a Python client parses what
//! we emit and we parse what it emits.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{AgentId, InstanceId};
use crate::payload::CanonicalPayload;
use crate::time::UnixMillis;

/// A business payload: always a JSON object.
pub type Payload = Map<String, Value>;

/// Why a `data_json` string was refused. The display strings are the reference's status details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not parseable as JSON.
    #[error("invalid_json")]
    InvalidJson,
    /// Valid JSON, but not an object (the reference accepts objects only).
    #[error("payload_must_be_object")]
    NotAnObject,
}

/// Parses a wire payload. The empty string means `{}`, as in the reference.
pub fn parse_payload(data_json: &str) -> Result<Payload, PayloadError> {
    if data_json.is_empty() {
        return Ok(Payload::new());
    }
    match serde_json::from_str::<Value>(data_json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(PayloadError::NotAnObject),
        Err(_) => Err(PayloadError::InvalidJson),
    }
}

/// Routing metadata; the broker sets every field from what it authenticated, never from what
/// a client claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Envelope format version; always 1.
    #[serde(default = "meta_version")]
    pub version: u32,
    /// Set on requests and their replies.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// True on requests.
    #[serde(default)]
    pub expects_reply: bool,
    /// True on replies.
    #[serde(default)]
    pub is_reply: bool,
    /// The sending instance, from the RPC's `instance_id`.
    #[serde(default)]
    pub sender_instance_id: Option<String>,
    /// On replies: the instance that asked.
    #[serde(default)]
    pub reply_to_instance_id: Option<String>,
    /// W3C trace context.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// W3C trace state.
    #[serde(default)]
    pub tracestate: Option<String>,
}

fn meta_version() -> u32 {
    1
}

impl Default for MessageMeta {
    fn default() -> Self {
        MessageMeta {
            version: 1,
            correlation_id: None,
            expects_reply: false,
            is_reply: false,
            sender_instance_id: None,
            reply_to_instance_id: None,
            traceparent: None,
            tracestate: None,
        }
    }
}

/// One message as it travels through queues and reaches the target agent.
///
/// Ids are kept as plain strings here because envelopes are also parsed from other
/// implementations; the broker only builds them from validated [`AgentId`]s.
///
/// The payload's type is a parameter so the broker can write an envelope whose payload is
/// already canonical JSON (`Envelope<CanonicalPayload>`, see [`crate::payload`]) without
/// serialising it again; everything that reads envelopes uses the default, a [`Payload`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D = Payload> {
    /// Authenticated sender.
    pub sender_id: String,
    /// The agent the message is for.
    pub target_id: String,
    /// Free-form dispatch key.
    pub message_type: String,
    /// The payload (possibly redacted by policy).
    pub data: D,
    /// Routing metadata.
    #[serde(default)]
    pub meta: MessageMeta,
    /// Wall-clock seconds since the Unix epoch at broker ingress.
    pub timestamp: f64,
    /// Unique per message, stable across redeliveries: the key for handler deduplication.
    pub message_id: String,
}

/// Where the `traceparent` value of an envelope serialised by [`Envelope::to_json`] starts
/// and ends, if it has one.
///
/// The payload comes before `meta` and may hold a `traceparent` key of its own, so the key
/// is looked for from the end: after `meta.traceparent` come only the `tracestate` string
/// (whose quotes are escaped), the timestamp and the broker's message id.
fn traceparent_span(json: &str) -> Option<std::ops::Range<usize>> {
    const KEY: &str = "\"traceparent\":";
    let start = json.rfind(KEY)? + KEY.len();
    let value = json[start..].strip_prefix('"')?;
    let len = value.find('"')?;
    Some(start + 1..start + 1 + len)
}

/// The `meta.traceparent` of an envelope serialised by [`Envelope::to_json`], found without
/// parsing it (a delivery reads it on the hot path when tracing is on).
pub fn traceparent_of(json: &str) -> Option<&str> {
    traceparent_span(json).map(|r| &json[r])
}

/// The envelope with its `meta.traceparent` replaced by `traceparent` (the context of the
/// delivery attempt, so the receiving handler's span is its child); `None` when it has none.
pub fn with_traceparent(json: &str, traceparent: &str) -> Option<String> {
    let range = traceparent_span(json)?;
    Some(format!("{}{traceparent}{}", &json[..range.start], &json[range.end..]))
}

impl<D> Envelope<D> {
    /// Sets the W3C trace context the message carries.
    pub fn traced(mut self, traceparent: Option<String>, tracestate: Option<String>) -> Self {
        self.meta.traceparent = traceparent;
        self.meta.tracestate = tracestate;
        self
    }

    /// Builds the envelope of a plain send, stamped at broker ingress.
    pub fn new_send(
        sender: &AgentId,
        sender_instance: &InstanceId,
        target: &AgentId,
        message_type: String,
        data: D,
        message_id: String,
        at: UnixMillis,
    ) -> Self {
        Envelope {
            sender_id: sender.to_string(),
            target_id: target.to_string(),
            message_type,
            data,
            meta: MessageMeta { sender_instance_id: Some(sender_instance.to_string()), ..MessageMeta::default() },
            timestamp: at.as_secs_f64(),
            message_id,
        }
    }

    /// Builds the envelope of a request: a send that expects a reply under `correlation_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_request(
        sender: &AgentId,
        sender_instance: &InstanceId,
        target: &AgentId,
        message_type: String,
        data: D,
        message_id: String,
        correlation_id: String,
        at: UnixMillis,
    ) -> Self {
        let mut env = Self::new_send(sender, sender_instance, target, message_type, data, message_id, at);
        env.meta.correlation_id = Some(correlation_id);
        env.meta.expects_reply = true;
        env
    }

    /// Builds the envelope of a reply to `requester`'s instance `requester_instance`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_reply(
        sender: &AgentId,
        sender_instance: &InstanceId,
        requester: &AgentId,
        requester_instance: &InstanceId,
        message_type: String,
        data: D,
        message_id: String,
        correlation_id: String,
        at: UnixMillis,
    ) -> Self {
        let mut env = Self::new_send(sender, sender_instance, requester, message_type, data, message_id, at);
        env.meta.correlation_id = Some(correlation_id);
        env.meta.is_reply = true;
        env.meta.reply_to_instance_id = Some(requester_instance.to_string());
        env
    }
}

impl<D: Serialize> Envelope<D> {
    /// The JSON wire form.
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings, bools, numbers and a JSON map cannot fail, except
        // for a non-finite float, which `timestamp` never is (it comes from UnixMillis).
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Envelope<CanonicalPayload> {
    /// The JSON wire form, with the payload's canonical text written in as it is: byte for
    /// byte what [`Envelope::to_json`] writes for the same envelope holding the parsed payload
    /// (the fields in declaration order, as the derived form writes them).
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(self.data.as_str().len() + 384);
        push_field(&mut out, "{\"sender_id\":", &self.sender_id);
        push_field(&mut out, ",\"target_id\":", &self.target_id);
        push_field(&mut out, ",\"message_type\":", &self.message_type);
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(self.data.as_str().as_bytes());
        push_field(&mut out, ",\"meta\":", &self.meta);
        push_field(&mut out, ",\"timestamp\":", &self.timestamp);
        push_field(&mut out, ",\"message_id\":", &self.message_id);
        out.push(b'}');
        // serde_json writes UTF-8, and the payload's text is a `String`.
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Appends `prefix` (punctuation and a key) and `value` as JSON.
fn push_field<T: Serialize>(out: &mut Vec<u8>, prefix: &str, value: &T) {
    out.extend_from_slice(prefix.as_bytes());
    // Writing strings, a struct of plain fields or a finite float into a Vec cannot fail.
    let _ = serde_json::to_writer(out, value);
}

impl Envelope {
    /// Parses the JSON wire form.
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod trace_tests {
    use super::*;

    #[test]
    fn the_traceparent_is_found_and_replaced_in_place() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let env = Envelope::new_send(
            &AgentId::new("alice").unwrap(),
            &InstanceId::new("i1").unwrap(),
            &AgentId::new("bob").unwrap(),
            "t".into(),
            Payload::new(),
            "m".into(),
            UnixMillis(1),
        )
        .traced(Some(tp.into()), None);
        let json = env.to_json();
        assert_eq!(traceparent_of(&json), Some(tp));
        let next = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        let replaced = with_traceparent(&json, next).unwrap();
        let parsed: Envelope = serde_json::from_str(&replaced).unwrap();
        assert_eq!(parsed.meta.traceparent.as_deref(), Some(next));
        assert_eq!(parsed, env.clone().traced(Some(next.into()), None));
        let untraced = env.traced(None, None).to_json();
        assert_eq!(traceparent_of(&untraced), None);
        assert_eq!(with_traceparent(&untraced, next), None);
    }

    #[test]
    fn a_payload_key_named_traceparent_is_not_the_envelopes() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let data = parse_payload(r#"{"traceparent":"mine","meta":{"traceparent":"also mine"}}"#).unwrap();
        let env = Envelope::new_send(
            &AgentId::new("alice").unwrap(),
            &InstanceId::new("i1").unwrap(),
            &AgentId::new("bob").unwrap(),
            "t".into(),
            data,
            "m".into(),
            UnixMillis(1),
        );
        let untraced = env.clone().to_json();
        assert_eq!(traceparent_of(&untraced), None, "the payload's field is not a trace context");
        assert_eq!(with_traceparent(&untraced, tp), None);
        let traced = env.clone().traced(Some(tp.into()), Some(r#"k="traceparent":"x""#.into())).to_json();
        assert_eq!(traceparent_of(&traced), Some(tp));
        let next = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        let parsed = Envelope::from_json(&with_traceparent(&traced, next).unwrap()).unwrap();
        assert_eq!(parsed.meta.traceparent.as_deref(), Some(next));
        assert_eq!(parsed.data, env.data, "the payload is untouched");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_payload_is_an_empty_object() {
        assert_eq!(parse_payload(""), Ok(Payload::new()));
    }

    #[test]
    fn payload_errors_carry_reference_details() {
        assert_eq!(parse_payload("{nope").map_err(|e| e.to_string()), Err("invalid_json".into()));
        assert_eq!(parse_payload("[1,2]").map_err(|e| e.to_string()), Err("payload_must_be_object".into()));
        assert!(parse_payload(r#"{"a":1}"#).is_ok());
    }

    #[test]
    fn json_has_reference_field_names_and_order() {
        let env = Envelope::new_send(
            &AgentId::new("alice").unwrap(),
            &InstanceId::new("i1").unwrap(),
            &AgentId::new("bob").unwrap(),
            "greet".into(),
            parse_payload(r#"{"n":1}"#).unwrap(),
            "m-1".into(),
            UnixMillis(1_700_000_000_250),
        );
        let json = env.to_json();
        assert_eq!(
            json,
            r#"{"sender_id":"alice","target_id":"bob","message_type":"greet","data":{"n":1},"meta":{"version":1,"correlation_id":null,"expects_reply":false,"is_reply":false,"sender_instance_id":"i1","reply_to_instance_id":null,"traceparent":null,"tracestate":null},"timestamp":1700000000.25,"message_id":"m-1"}"#
        );
        assert_eq!(Envelope::from_json(&json).unwrap(), env);
    }

    proptest::proptest! {
        /// The envelope written around a canonical payload is the derived form, byte for byte.
        #[test]
        fn a_canonical_envelope_is_written_as_the_derived_one(
            message_type in "[a-z\"\\\\é\n]{0,8}",
            value in "[a-z\"é\u{1}]{0,8}",
            kind in 0..3u8,
            traceparent in proptest::option::of("[0-9a-f-]{0,20}"),
            tracestate in proptest::option::of("[a-z=\"]{0,8}"),
            millis in 0u64..4_000_000_000_000,
        ) {
            let data: Payload = [("k".to_string(), Value::String(value)), ("a".to_string(), Value::from(1.5))]
                .into_iter()
                .collect();
            fn build<D>(kind: u8, data: D, message_type: &str, millis: u64) -> Envelope<D> {
                let (alice, bob) = (AgentId::new("alice").unwrap(), AgentId::new("bob").unwrap());
                let i1 = InstanceId::new("i1").unwrap();
                let (id, at, mt) = ("m-1".to_string(), UnixMillis(millis), message_type.to_string());
                match kind {
                    0 => Envelope::new_send(&alice, &i1, &bob, mt, data, id, at),
                    1 => Envelope::new_request(&alice, &i1, &bob, mt, data, id, "c.alice".into(), at),
                    _ => Envelope::new_reply(&bob, &i1, &alice, &i1, mt, data, id, "c.alice".into(), at),
                }
            }
            let trace = (traceparent, tracestate);
            let owned = build(kind, data.clone(), &message_type, millis).traced(trace.0.clone(), trace.1.clone());
            let canonical = build(kind, CanonicalPayload::of(&data), &message_type, millis).traced(trace.0, trace.1);
            proptest::prop_assert_eq!(canonical.to_json(), owned.to_json());
        }
    }

    #[test]
    fn parses_a_python_envelope_with_missing_meta_fields() {
        let py = r#"{"sender_id":"a","target_id":"b","message_type":"t","data":{},"meta":{"version":1},"timestamp":1.5,"message_id":"x"}"#;
        let env = Envelope::from_json(py).unwrap();
        assert_eq!(env.meta, MessageMeta::default());
        assert_eq!(env.timestamp, 1.5);
    }
}
