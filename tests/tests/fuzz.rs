//! Fuzzing on stable Rust: proptest drives every parser a peer or an operator feeds — request
//! messages decoded from random bytes, envelope and payload JSON, the DLP scanner (payloads and
//! custom patterns), configuration files (mutated at every bounded key), certificates and
//! SPIFFE URIs — and checks that each returns a value or a typed error: no panic.
//!
//! Cases per harness: `MAS_FUZZ_CASES` (default 2 000; CI runs the default).

#![cfg(not(madsim))]

use std::sync::OnceLock;

use mas_core::envelope::{Envelope, parse_payload};
use mas_core::ids::AgentId;
use mas_core::limits::{InputLimits, json_depth};
use mas_core::policy::dlp::{Dlp, DlpSettings};
use mas_proto::runtime as pb;
use mas_server::BrokerConfig;
use proptest::prelude::*;
use prost::Message;

fn cases() -> u32 {
    std::env::var("MAS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() }
}

/// Bytes that are sometimes valid protobuf: random, or a real message with bytes flipped.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let real = pb::SendRequest {
        instance_id: "i1".into(),
        target_id: "bob".into(),
        message_type: "t".into(),
        data_json: r#"{"x":[1,{"y":"z"}]}"#.into(),
    }
    .encode_to_vec();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8).prop_map(move |flips| {
            let mut bytes = real.clone();
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            bytes
        }),
    ]
}

/// JSON-ish text: random, or valid JSON values with odd strings and deep nesting.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "\\PC{0,40}".prop_map(serde_json::Value::String),
        "[0-9 -]{8,24}".prop_map(serde_json::Value::String), // card- and phone-like digits
        "[a-z.]{1,8}@[a-z]{1,8}\\.[a-z]{2,3}".prop_map(serde_json::Value::String),
    ];
    let value = leaf.prop_recursive(12, 128, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![value.prop_map(|v| v.to_string()), "\\PC{0,200}", "[\\[\\]{}\",:0-9a]{0,200}"]
}

fn dlp() -> &'static Dlp {
    static DLP: OnceLock<Dlp> = OnceLock::new();
    DLP.get_or_init(|| Dlp::new(&DlpSettings::default()).expect("default rules compile"))
}

/// A valid configuration as JSON, to mutate.
fn base_config() -> serde_json::Value {
    serde_json::json!({
        "listen_addr": "127.0.0.1:0",
        "agents": { "alice": { "allowed_targets": ["bob"] }, "bob": {} },
        "delivery": {}, "limits": {}, "session_lease": {}, "admin": {},
        "gateway": { "circuit_breaker": {}, "audit": {}, "rate_limit": {} }
    })
}

/// Every bounded key of the configuration, as (section path, key).
const CONFIG_KEYS: &[(&[&str], &str)] = &[
    (&["admin"], "readiness_timeout_ms"),
    (&["delivery"], "max_in_flight"),
    (&["delivery"], "ack_timeout_ms"),
    (&["delivery"], "max_delivery_attempts"),
    (&["delivery"], "retry_backoff_initial_ms"),
    (&["delivery"], "retry_backoff_max_ms"),
    (&["delivery"], "drain_timeout_ms"),
    (&[], "max_queue_len"),
    (&["session_lease"], "ttl_ms"),
    (&["session_lease"], "renewal_ms"),
    (&["limits"], "max_payload_bytes"),
    (&["limits"], "max_json_depth"),
    (&["limits"], "max_message_type_bytes"),
    (&["limits"], "max_state_bytes"),
    (&["limits"], "max_message_bytes"),
    (&["limits"], "max_sessions_per_agent"),
    (&["limits"], "max_connections"),
    (&["limits"], "max_request_timeout_ms"),
    (&["limits"], "tls_handshake_timeout_ms"),
    (&["gateway", "circuit_breaker"], "failure_threshold"),
    (&["gateway", "circuit_breaker"], "timeout_seconds"),
    (&["gateway", "circuit_breaker"], "window_seconds"),
    (&["gateway", "audit"], "max_records_per_chain"),
    (&["gateway", "audit"], "archive_batch"),
    (&["gateway", "rate_limit"], "per_minute"),
    (&["gateway", "rate_limit"], "per_hour"),
];

fn config_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(u64::MAX / 2), Just(37_000_000_000_000)]
            .prop_map(|n| serde_json::json!(n)),
        Just(serde_json::Value::Null),
        "\\PC{0,8}".prop_map(serde_json::Value::String),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every message a client or the broker sends, decoded from hostile bytes.
    #[test]
    fn request_messages_decode_or_refuse(bytes in wire_bytes()) {
        let b = bytes.as_slice();
        let _ = pb::ClientEvent::decode(b);
        let _ = pb::SendRequest::decode(b);
        let _ = pb::RequestRequest::decode(b);
        let _ = pb::ReplyRequest::decode(b);
        let _ = pb::DiscoverRequest::decode(b);
        let _ = pb::GetStateRequest::decode(b);
        let _ = pb::UpdateStateRequest::decode(b);
        let _ = pb::ResetStateRequest::decode(b);
    }

    /// Payload and envelope JSON: parsed or refused, and bounded checks agree with the parse.
    #[test]
    fn payload_and_envelope_json_parse_or_refuse(text in json_text()) {
        let parsed = parse_payload(&text);
        let _ = Envelope::from_json(&text);
        let limits = InputLimits::default();
        if limits.check_payload(&text).is_ok() && let Ok(payload) = &parsed {
            // Whatever passes the bounds and parses can be scanned, serialised and hashed.
            let _ = dlp().scan(payload);
            let _ = mas_core::policy::audit::payload_hash(payload);
            prop_assert!(json_depth(&serde_json::Value::Object(payload.clone()).to_string()) <= limits.max_json_depth);
        }
    }

    /// Custom DLP patterns from a configuration: they compile or are refused by name; a
    /// compiled set scans anything.
    #[test]
    fn dlp_rules_compile_or_refuse_and_scan_anything(pattern in "\\PC{0,30}", text in json_text()) {
        let settings: DlpSettings = serde_json::from_value(serde_json::json!({
            "rules": [{ "id": "fuzzed", "type": "fuzz", "pattern": pattern, "action": "alert" }]
        })).expect("settings shape");
        match Dlp::new(&settings) {
            Ok(dlp) => {
                if let Ok(payload) = parse_payload(&text) {
                    let _ = dlp.scan(&payload);
                }
            }
            Err(err) => prop_assert!(err.to_string().contains("fuzzed"), "{err}"),
        }
    }

    /// Configuration files with any value at any bounded key: refused with the key named, or
    /// accepted and usable without overflow.
    #[test]
    fn configuration_is_validated_without_panic(edits in prop::collection::vec((0..CONFIG_KEYS.len(), config_value()), 1..6)) {
        let mut json = base_config();
        for (key, value) in &edits {
            let (path, name) = CONFIG_KEYS[*key];
            let mut section = &mut json;
            for part in path {
                section = &mut section[part];
            }
            section[name] = value.clone();
        }
        let Ok(config) = serde_json::from_value::<BrokerConfig>(json) else { return Ok(()) };
        if config.validate().is_ok() {
            let _ = config.delivery.machine_config();
            let _ = config.gateway.circuit();
            let _ = config.authz_policy();
            let _ = config.limits.input();
            let mut machine = mas_core::delivery::SessionDelivery::new(config.delivery.machine_config(), 1);
            let now = mas_core::time::Now::from_mono(mas_core::time::Instant::from_nanos(u64::MAX / 2));
            machine.handle_queued(now, mas_core::delivery::QueuedMessage {
                entry: mas_core::delivery::EntryId::from_seq(1),
                envelope: std::sync::Arc::from("{}"),
                attempt: 1,
            });
            while machine.poll_output().is_some() {}
        }
    }

    /// Identities: SPIFFE URIs and certificates, random or a real one with bytes flipped.
    #[test]
    fn identities_parse_or_refuse(uri in "\\PC{0,80}", flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), random in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = mas_net::identity::agent_from_spiffe_uri(&uri);
        let _ = mas_net::identity::agent_from_spiffe_uri(&format!("spiffe://mas/agent/{uri}"));
        let _ = mas_net::identity::agent_from_certificate(&random);
        let mut der = real_certificate().to_vec();
        for (at, byte) in flips {
            let i = at.index(der.len());
            der[i] = byte;
        }
        let _ = mas_net::identity::agent_from_certificate(&der);
        let _ = AgentId::new(&uri);
    }
}

/// The DER of a real agent certificate.
fn real_certificate() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let ca = mas_net::pki::DevCa::new("fuzz CA").expect("ca");
        let pair = ca.agent_cert(&AgentId::new("alice").expect("id")).expect("cert");
        CertificateDer::from_pem_slice(pair.cert.as_bytes()).expect("pem").to_vec()
    })
}

#[test]
fn the_real_certificate_parses() {
    assert_eq!(mas_net::identity::agent_from_certificate(real_certificate()).unwrap().as_str(), "alice");
}
