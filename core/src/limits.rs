//! Bounds on what a peer may send: checked before anything is parsed deeply, stored or
//! audited, so that no input can make the broker hold an unbounded amount of memory.
//!
//! Each bound has a wire detail (what the client sees) and a default well under the gRPC
//! transport limit (4 MiB), so an oversized message gets our precise status rather than the
//! transport's generic one.

use crate::ids::AgentId;

/// The bounds on one message, request or state write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Largest `data_json` (payload) in bytes.
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects in a payload or a state value.
    pub max_json_depth: usize,
    /// Longest `message_type` in bytes.
    pub max_message_type_bytes: usize,
    /// Largest total state of one agent: the sum of its field names and values, in bytes.
    pub max_state_bytes: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_payload_bytes: 1024 * 1024,
            max_json_depth: 64,
            max_message_type_bytes: 256,
            max_state_bytes: 1024 * 1024,
        }
    }
}

/// Which bound an input broke. `Display` is the status detail sent to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The payload is larger than `max_payload_bytes`.
    #[error("payload_too_large")]
    PayloadTooLarge,
    /// A payload or state value nests deeper than `max_json_depth`.
    #[error("json_too_deep")]
    JsonTooDeep,
    /// The message type is longer than `max_message_type_bytes`.
    #[error("message_type_too_long")]
    MessageTypeTooLong,
    /// The target id is not a well-formed agent id (so it can name no agent).
    #[error("invalid_target_id")]
    InvalidTargetId,
    /// The state would exceed `max_state_bytes`.
    #[error("state_too_large")]
    StateTooLarge,
}

impl LimitExceeded {
    /// Whether the peer asked for too much of a resource (gRPC `RESOURCE_EXHAUSTED`) rather
    /// than sent a malformed argument (`INVALID_ARGUMENT`).
    pub fn is_resource(self) -> bool {
        matches!(self, LimitExceeded::PayloadTooLarge | LimitExceeded::StateTooLarge)
    }
}

impl InputLimits {
    /// Checks an outgoing message's envelope fields before its payload is parsed: size,
    /// nesting, type and target. Returns the target as an agent id.
    pub fn check_message(
        &self,
        target_id: &str,
        message_type: &str,
        data_json: &str,
    ) -> Result<AgentId, LimitExceeded> {
        self.check_message_type(message_type)?;
        self.check_payload(data_json)?;
        AgentId::new(target_id).map_err(|_| LimitExceeded::InvalidTargetId)
    }

    /// Checks a message type.
    pub fn check_message_type(&self, message_type: &str) -> Result<(), LimitExceeded> {
        if message_type.len() > self.max_message_type_bytes {
            return Err(LimitExceeded::MessageTypeTooLong);
        }
        Ok(())
    }

    /// Checks a payload's size and nesting (a reply's too).
    pub fn check_payload(&self, data_json: &str) -> Result<(), LimitExceeded> {
        if data_json.len() > self.max_payload_bytes {
            return Err(LimitExceeded::PayloadTooLarge);
        }
        self.check_depth(data_json)
    }

    /// Checks one JSON text's nesting.
    pub fn check_depth(&self, json: &str) -> Result<(), LimitExceeded> {
        if json_depth(json) > self.max_json_depth {
            return Err(LimitExceeded::JsonTooDeep);
        }
        Ok(())
    }

    /// Checks a state write: every value's nesting, and that the state after merging
    /// `updates` into `current` stays within `max_state_bytes`.
    pub fn check_state<'a>(
        &self,
        current: impl IntoIterator<Item = (&'a str, &'a str)>,
        updates: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Result<(), LimitExceeded> {
        for (_, value) in updates.clone() {
            self.check_depth(value)?;
        }
        let merged = merged_state_bytes(current, updates);
        if merged > self.max_state_bytes {
            return Err(LimitExceeded::StateTooLarge);
        }
        Ok(())
    }
}

/// Bytes of a state (field names plus values) after `updates` overwrite `current`.
pub fn merged_state_bytes<'a>(
    current: impl IntoIterator<Item = (&'a str, &'a str)>,
    updates: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> usize {
    let mut fields: std::collections::BTreeMap<&str, usize> =
        current.into_iter().map(|(k, v)| (k, k.len() + v.len())).collect();
    for (k, v) in updates {
        fields.insert(k, k.len() + v.len());
    }
    fields.values().sum()
}

/// The deepest nesting of `[` and `{` in a JSON text, counting only brackets outside strings.
/// One pass over the bytes, no allocation: it runs before the text is parsed, so a deeply
/// nested payload is refused without recursing through it. (Malformed text is measured as
/// far as it goes; the parser refuses it afterwards.)
pub fn json_depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in json.bytes() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert_eq!(json_depth(""), 0);
        assert_eq!(json_depth(r#"{"a":1}"#), 1);
        assert_eq!(json_depth(r#"{"a":[{"b":[]}]}"#), 4);
        assert_eq!(json_depth(r#"{"a":"[[[{{{"}"#), 1);
        assert_eq!(json_depth(r#"{"a":"\"[[[","b":[1]}"#), 2);
        assert_eq!(json_depth(r#"{"a":"\\","b":[[1]]}"#), 3);
    }

    #[test]
    fn each_bound_is_named() {
        let limits =
            InputLimits { max_payload_bytes: 20, max_json_depth: 2, max_message_type_bytes: 3, max_state_bytes: 10 };
        assert_eq!(limits.check_message("bob", "abcd", "{}"), Err(LimitExceeded::MessageTypeTooLong));
        assert_eq!(
            limits.check_message("bob", "t", &format!(r#"{{"x":"{}"}}"#, "y".repeat(20))),
            Err(LimitExceeded::PayloadTooLarge)
        );
        assert_eq!(limits.check_message("bob", "t", r#"{"x":[[1]]}"#), Err(LimitExceeded::JsonTooDeep));
        assert_eq!(limits.check_message("b o b", "t", "{}"), Err(LimitExceeded::InvalidTargetId));
        assert_eq!(
            limits.check_message(&"b".repeat(AgentId::MAX_LEN + 1), "t", "{}"),
            Err(LimitExceeded::InvalidTargetId)
        );
        assert_eq!(limits.check_message("bob", "t", r#"{"x":[1]}"#).map(|a| a.to_string()), Ok("bob".into()));
        // 3 + 3 bytes now; overwriting "a" keeps it at 6, adding "bb" takes it to 11.
        let current = [("a", "123"), ("c", "1")];
        assert_eq!(limits.check_state(current, [("a", "456")]), Ok(()));
        assert_eq!(limits.check_state(current, [("bb", "4567")]), Err(LimitExceeded::StateTooLarge));
        assert_eq!(limits.check_state([], [("a", "[[[1]]]")]), Err(LimitExceeded::JsonTooDeep));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// On any JSON text serde accepts, the byte scan agrees with the parsed tree's depth.
        #[test]
        fn depth_matches_the_parsed_tree(value in json_value()) {
            let text = value.to_string();
            prop_assert_eq!(json_depth(&text), tree_depth(&value));
        }

        /// Any bytes at all: no panic, and never deeper than the number of brackets.
        #[test]
        fn depth_of_arbitrary_text_is_bounded(text in ".{0,400}") {
            let brackets = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
            prop_assert!(json_depth(&text) <= brackets);
        }
    }

    fn tree_depth(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Array(items) => 1 + items.iter().map(tree_depth).max().unwrap_or(0),
            serde_json::Value::Object(map) => 1 + map.values().map(tree_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[\\PC\"\\\\\\[\\]{}]{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z\"\\[{]{0,4}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
