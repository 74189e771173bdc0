use super::*;
use serde_json::json;

fn dlp() -> Dlp {
    Dlp::new(&DlpSettings::default()).unwrap()
}

fn payload(v: Value) -> Payload {
    v.as_object().unwrap().clone()
}

fn kinds(v: Value) -> Vec<String> {
    dlp().scan(&payload(v)).kinds()
}

#[test]
fn every_built_in_detector_fires() {
    let cases = [
        ("ssn", json!({"note": "ssn 123-45-6789"})),
        ("email", json!({"contact": "jane.doe@example.com"})),
        ("phone", json!({"call": "(555) 123-4567"})),
        ("mrn", json!({"chart": "MRN: 12345678"})),
        ("health_insurance", json!({"ins": "Policy #123456789"})),
        ("icd10", json!({"dx": "A01.1"})),
        ("credit_card", json!({"card": "4111 1111 1111 1111"})),
        ("cvv", json!({"c": "CVV: 123"})),
        ("api_key", json!({"cfg": "api_key=abcdefghijklmnopqrstuvwxyz0123456789"})),
        ("aws_key", json!({"k": "AKIAABCDEFGHIJKLMNOP"})),
        ("private_key", json!({"k": "-----BEGIN RSA PRIVATE KEY-----"})),
        ("jwt", json!({"t": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_nature-1"})),
        ("password", json!({"login": "password: hunter22"})),
    ];
    for (kind, value) in cases {
        assert!(kinds(value.clone()).contains(&kind.to_string()), "{kind} not found in {value}");
    }
}

#[test]
fn default_actions_and_the_most_restrictive_wins() {
    let d = dlp();
    assert_eq!(d.scan(&payload(json!({"a": "jane@example.com"}))).action, Some(Action::Alert));
    assert_eq!(d.scan(&payload(json!({"a": "123-45-6789"}))).action, Some(Action::Redact));
    let both = d.scan(&payload(json!({"a": "123-45-6789", "b": "4111111111111111"})));
    assert_eq!(both.action, Some(Action::Block));
    assert_eq!(both.redacted, None);
    assert_eq!(d.scan(&payload(json!({"a": "hello", "n": 5}))).action, None);
}

#[test]
fn luhn_invalid_card_numbers_pass() {
    assert!(!kinds(json!({"n": "4111 1111 1111 1112"})).contains(&"credit_card".to_string()));
}

#[test]
fn structure_aware_keys_context_numbers_and_lists() {
    assert!(kinds(json!({"credentials": {"password": "MySecretPass123"}})).contains(&"password".to_string()));
    assert!(kinds(json!({"jane@example.com": 1})).contains(&"email".to_string()), "keys are scanned");
    assert!(kinds(json!({"card": 4111111111111111u64})).contains(&"credit_card".to_string()), "numbers as text");
    assert!(kinds(json!({"cards": ["x", "4111-1111-1111-1111"]})).contains(&"credit_card".to_string()));
    assert!(
        kinds(json!({"password": ["longsecret1"]})).contains(&"password".to_string()),
        "list items inherit the key"
    );
}

#[test]
fn a_lone_nine_digit_number_is_not_an_ssn_but_a_labelled_one_is() {
    assert!(kinds(json!({"order_id": 123456789})).is_empty(), "reference false positive fixed");
    assert!(kinds(json!({"order": "ref 123456789"})).is_empty());
    assert!(kinds(json!({"ssn": 123456789})).contains(&"ssn".to_string()));
    assert!(kinds(json!({"note": "SSN: 123456789"})).contains(&"ssn".to_string()));
}

#[test]
fn redaction_masks_match_the_reference() {
    let d = Dlp::new(&DlpSettings {
        policy_overrides: [("email".to_string(), Action::Redact), ("phone".to_string(), Action::Redact)].into(),
        ..DlpSettings::default()
    })
    .unwrap();
    let scan = d.scan(&payload(json!({
        "ssn": "123-45-6789",
        "email": "jane.doe@example.com",
        "phone": "555-123-4567",
        "ok": "nothing here",
        "id": 123456789
    })));
    assert_eq!(scan.action, Some(Action::Redact));
    let r = scan.redacted.unwrap();
    assert_eq!(r["ssn"], "XXX-XX-6789");
    assert_eq!(r["email"], "j***@example.com");
    assert_eq!(r["phone"], "(XXX) XXX-4567");
    assert_eq!(r["ok"], "nothing here");
    assert_eq!(r["id"], 123456789, "an unlabelled number is left alone");
    assert_eq!(mask("credit_card", "4111-1111-1111-1111"), "**** **** **** 1111");
    assert_eq!(mask("secret", "x"), "[REDACTED SECRET]");
}

#[test]
fn a_labelled_number_is_redacted_into_a_string() {
    let scan = dlp().scan(&payload(json!({"ssn": 123456789})));
    assert_eq!(scan.redacted.unwrap()["ssn"], "XXX-XX-6789");
}

#[test]
fn alert_matches_stay_visible_in_a_redacted_payload() {
    let scan = dlp().scan(&payload(json!({"a": "123-45-6789 jane@example.com"})));
    assert_eq!(scan.redacted.unwrap()["a"], "XXX-XX-6789 jane@example.com");
}

#[test]
fn colliding_redacted_keys_escalate_to_block() {
    let scan = dlp().scan(&payload(json!({"123-45-6789": 1, "XXX-XX-6789": 2})));
    assert_eq!(scan.action, Some(Action::Block));
    assert_eq!(scan.redacted, None);
}

#[test]
fn custom_rules_append_replace_disable_and_override() {
    let secret = CustomRule {
        id: "s1".into(),
        kind: "secret".into(),
        pattern: r"\bTOPSECRET-\d+\b".into(),
        action: Action::Redact,
        severity: Severity::High,
        enabled: true,
        case_insensitive: true,
    };
    let append = Dlp::new(&DlpSettings { rules: vec![secret.clone()], ..DlpSettings::default() }).unwrap();
    let scan = append.scan(&payload(json!({"a": "topsecret-42", "b": "jane@example.com"})));
    assert_eq!(scan.kinds(), ["email", "secret"]);
    assert_eq!(scan.redacted.unwrap()["a"], "[REDACTED SECRET]");
    let replace = Dlp::new(&DlpSettings {
        merge_strategy: MergeStrategy::Replace,
        rules: vec![secret],
        ..DlpSettings::default()
    })
    .unwrap();
    assert_eq!(replace.scan(&payload(json!({"b": "jane@example.com"}))).action, None);
    let disabled = Dlp::new(&DlpSettings { disable_defaults: vec!["email".into()], ..DlpSettings::default() }).unwrap();
    assert_eq!(disabled.scan(&payload(json!({"b": "jane@example.com"}))).action, None);
    let overridden = Dlp::new(&DlpSettings {
        policy_overrides: [("email".to_string(), Action::Block)].into(),
        ..DlpSettings::default()
    })
    .unwrap();
    assert_eq!(overridden.scan(&payload(json!({"b": "jane@example.com"}))).action, Some(Action::Block));
}

#[test]
fn settings_parse_from_json() {
    let s: DlpSettings = serde_json::from_str(
        r#"{"merge_strategy":"append","disable_defaults":["icd10"],"policy_overrides":{"email":"redact"},
            "rules":[{"id":"r","type":"secret","pattern":"x{3}","action":"block"}]}"#,
    )
    .unwrap();
    assert_eq!(s.rules[0].severity, Severity::Medium);
    assert!(
        serde_json::from_str::<DlpSettings>(r#"{"rules":[{"id":"r","type":"t","pattern":"x","action":"encrypt"}]}"#)
            .is_err()
    );
}

#[test]
fn labelled_list_items_after_a_clean_one_are_found() {
    assert!(kinds(json!({"ssn": ["x", 123456789]})).contains(&"ssn".to_string()));
    assert!(kinds(json!({"cvv": ["n/a", "123"]})).contains(&"cvv".to_string()));
}

mod fast_path {
    use proptest::prelude::*;

    use super::*;

    const KEYS: &[&str] =
        &["ssn", "password", "cvv", "api_key", "mrn", "policy", "note", "id", "Medical Record", "pwd"];
    const TEXTS: &[&str] = &[
        "123456789",
        "123-45-6789",
        "hunter2222",
        "123",
        "x",
        "4111 1111 1111 1111",
        "0123456789abcdef0123456789abcdef01",
        "jane@example.com",
        "A12.3",
        "plain words",
        "AKIAABCDEFGHIJKLMNOP",
        "",
    ];

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            prop::sample::select(TEXTS).prop_map(|t| Value::String(t.to_string())),
            prop_oneof![Just(123456789u64), Just(123), Just(4111111111111111), Just(7)].prop_map(Value::from),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(prop::sample::select(KEYS).prop_map(str::to_string), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The clean fast path never hides a finding: whenever the full walk finds something,
        /// the one-pass pre-check must not call the payload clean.
        #[test]
        fn never_misses_what_the_walk_finds(
            entries in prop::collection::btree_map(prop::sample::select(KEYS).prop_map(str::to_string), value(), 0..5)
        ) {
            let dlp = dlp();
            let payload: Payload = entries.into_iter().collect();
            prop_assert_eq!(dlp.scan(&payload), dlp.scan_walking(&WirePayload::borrowed(&payload)));
        }
    }
}
