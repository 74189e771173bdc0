use super::*;

fn record(n: u32) -> AuditRecord {
    AuditRecord {
        message_id: format!("m{n}"),
        timestamp: 1_700_000_000.5 + f64::from(n),
        sender_id: "alice".into(),
        sender_instance_id: Some("a1".into()),
        target_id: if n.is_multiple_of(2) { "bob".into() } else { "carol".into() },
        message_type: Some("t".into()),
        correlation_id: None,
        decision: if n == 3 { Decision::DlpBlocked } else { Decision::Allowed },
        latency_ms: 0.25,
        payload_hash: payload_hash(&serde_json::Map::new()),
        trace_id: None,
        violations: vec![],
        previous_hash: None,
        hash_version: 0,
    }
}

fn chain(n: u32) -> (Vec<AuditRecord>, Option<String>) {
    let mut chain = Chain::default();
    let records = (0..n).map(|i| chain.append(record(i))).collect();
    (records, chain.head().map(str::to_string))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn payload_hash_is_the_hash_of_canonical_json() {
    let v: Value = serde_json::from_str(r#"{"b":1,"a":[true,null]}"#).unwrap();
    let expected = sha256_hex(br#"{"a":[true,null],"b":1}"#);
    assert_eq!(payload_hash(v.as_object().unwrap()), expected);
}

#[test]
fn canonical_json_sorts_keys_and_keeps_nulls() {
    let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":null,"c":[1,2]}}"#).unwrap();
    assert_eq!(canonical_json(&v), r#"{"a":{"c":[1,2],"d":null},"b":1}"#);
}

#[test]
fn record_hash_is_sha256_of_the_canonical_json_of_the_whole_record() {
    let (records, _) = chain(3);
    for r in &records {
        let via_sorted_map = canonical_json(&serde_json::to_value(r).unwrap());
        assert_eq!(serde_json::to_string(r).unwrap(), via_sorted_map, "fields are declared in key order");
        assert_eq!(r.hash(), sha256_hex(via_sorted_map.as_bytes()));
        assert!(via_sorted_map.contains(r#""previous_hash":"#) && via_sorted_map.contains(r#""hash_version":2"#));
    }
    let event = Chain::default().append(SecurityEvent {
        details: serde_json::json!({"z": 1, "a": null}),
        event_type: "authz_changed".into(),
        hash_version: 0,
        previous_hash: None,
        timestamp: 1.5,
    });
    let canonical = canonical_json(&serde_json::to_value(&event).unwrap());
    assert_eq!(serde_json::to_string(&event).unwrap(), canonical);
    assert_eq!(event.hash(), sha256_hex(canonical.as_bytes()));
}

#[test]
fn append_json_gives_the_text_the_hash_covers() {
    let (mut plain, mut with_json) = (Chain::default(), Chain::default());
    for n in 0..3 {
        let linked = plain.append(record(n));
        let (same, json) = with_json.append_json(record(n));
        assert_eq!(same, linked);
        assert_eq!(json, serde_json::to_string(&linked).unwrap());
        assert_eq!(with_json.head(), plain.head());
        assert_eq!(linked.canonical(), (json, linked.hash()));
    }
}

#[test]
fn records_survive_a_json_round_trip_with_the_same_hash() {
    let (records, head) = chain(20);
    let text: Vec<String> = records.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    let back: Vec<AuditRecord> = text.iter().map(|t| serde_json::from_str(t).unwrap()).collect();
    assert_eq!(verify(&back, head.as_deref()), Ok(()));
}

#[test]
fn decisions_are_written_as_the_reference_spells_them() {
    assert_eq!(serde_json::to_string(&Decision::DlpRedacted).unwrap(), r#""DLP_REDACTED""#);
    assert_eq!(Decision::parse("circuit_open"), Some(Decision::CircuitOpen));
    for d in ALL_DECISIONS {
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{}\"", d.as_str()));
        assert_eq!(Decision::parse(d.as_str()), Some(d));
    }
    assert!(Decision::Alert.is_routable() && !Decision::QueueFull.is_routable());
}

#[test]
fn an_intact_chain_verifies() {
    let (records, head) = chain(5);
    assert_eq!(records[0].previous_hash, None);
    assert_eq!(records[1].previous_hash, Some(records[0].hash()));
    assert_eq!(verify(&records, head.as_deref()), Ok(()));
    assert_eq!(verify::<AuditRecord>(&[], None), Ok(()));
}

#[test]
fn edits_deletions_relinks_and_truncation_are_detected() {
    let (records, head) = chain(5);
    let mut edited = records.clone();
    edited[2].decision = Decision::DlpBlocked;
    assert_eq!(verify(&edited, head.as_deref()), Err(ChainError::BrokenLink { index: 3 }));
    let mut last_edited = records.clone();
    last_edited[4].violations.push("x".into());
    assert_eq!(verify(&last_edited, head.as_deref()), Err(ChainError::HeadMismatch));
    let mut deleted = records.clone();
    deleted.remove(2);
    assert_eq!(verify(&deleted, head.as_deref()), Err(ChainError::BrokenLink { index: 2 }));
    let mut relinked = deleted.clone();
    relinked[2].previous_hash = Some(relinked[1].hash());
    assert!(verify(&relinked, head.as_deref()).is_err(), "re-linking changes the hash the head expects");
    assert_eq!(verify(&records[..4], head.as_deref()), Err(ChainError::HeadMismatch), "truncated tail");
    let mut old = records.clone();
    old[0].hash_version = 1;
    assert_eq!(verify(&old, head.as_deref()), Err(ChainError::Version { index: 0, version: 1 }));
}

#[test]
fn filter_matches_every_set_field() {
    let (records, _) = chain(6);
    let by = |f: AuditFilter| records.iter().filter(|r| f.matches(r)).count();
    assert_eq!(by(AuditFilter::default()), 6);
    assert_eq!(by(AuditFilter { target: Some("bob".into()), ..Default::default() }), 3);
    assert_eq!(by(AuditFilter { decision: Some(Decision::DlpBlocked), ..Default::default() }), 1);
    assert_eq!(by(AuditFilter { sender: Some("carol".into()), ..Default::default() }), 0);
    let window = AuditFilter { since: Some(1_700_000_001.5), until: Some(1_700_000_003.5), ..Default::default() };
    assert_eq!(by(window), 3, "bounds are inclusive");
}

#[test]
fn csv_and_json_exports() {
    assert_eq!(to_csv(&[]), "");
    assert_eq!(to_json(&[], false), "[]");
    let (mut records, _) = chain(2);
    records[1].violations = vec!["email".into(), "phone".into()];
    records[1].message_type = Some("a,\"b\"".into());
    let csv = to_csv(&records);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("message_id,timestamp,sender_id,"));
    assert!(lines[2].contains("email;phone") && lines[2].contains("\"a,\"\"b\"\"\""), "{}", lines[2]);
    let json: Vec<AuditRecord> = serde_json::from_str(&to_json(&records, true)).unwrap();
    assert_eq!(json, records);
}

fn file_lines(records: &[AuditRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let line = FileLine::new("agent:bob".into(), file::FileRecord::Message(r.clone()));
            serde_json::to_string(&line).unwrap()
        })
        .collect()
}

fn numbered(lines: &[String]) -> impl Iterator<Item = (String, &str)> {
    lines.iter().enumerate().map(|(i, l)| (format!("line {}", i + 1), l.as_str()))
}

#[test]
fn a_jsonl_file_verifies_and_an_edited_line_is_found() {
    let (records, head) = chain(4);
    let lines = file_lines(&records);
    let report = verify_lines(numbered(&lines));
    assert!(report.is_intact(), "{:?}", report.errors);
    assert_eq!(report.chains["agent:bob"].records, 4);
    assert_eq!(report.chains["agent:bob"].head, head);

    let mut edited = lines.clone();
    edited[1] = edited[1].replace("ALLOWED", "DLP_BLOCKED");
    let report = verify_lines(numbered(&edited));
    assert!(!report.is_intact());
    assert!(report.errors.iter().any(|e| e.starts_with("line 2:") && e.contains("edited")), "{:?}", report.errors);

    let mut deleted = lines.clone();
    deleted.remove(1);
    let report = verify_lines(numbered(&deleted));
    assert!(report.errors.iter().any(|e| e.contains("does not link")), "{:?}", report.errors);

    let rotated = verify_lines(numbered(&lines[2..]));
    assert!(rotated.is_intact() && rotated.chains["agent:bob"].starts_mid_chain);
}

#[test]
fn a_marked_gap_is_reported_as_a_gap_and_an_unmarked_one_as_a_break() {
    let (records, head) = chain(5);
    let mut lines = file_lines(&records);
    // Records 1 and 2 never reached the file; the sink marked them before record 3.
    lines.drain(1..3);
    let marker = serde_json::to_string(&GapLine { gap: Gap { chain: "agent:bob".into(), missing: 2 } }).unwrap();
    assert_eq!(marker, r#"{"gap":{"chain":"agent:bob","missing":2}}"#);
    let mut marked = lines.clone();
    marked.insert(1, marker);
    let report = verify_lines(numbered(&marked));
    assert!(report.is_intact(), "a marked gap is not tampering: {:?}", report.errors);
    assert_eq!(report.gaps, ["line 2: 2 records of chain agent:bob never reached the file"]);
    assert_eq!((report.chains["agent:bob"].records, report.chains["agent:bob"].missing), (3, 2));
    assert_eq!(report.chains["agent:bob"].head, head);
    // The link after the gap is the only one excused.
    let mut edited_after = marked.clone();
    edited_after[3] = edited_after[3].replace("ALLOWED", "ALERT");
    assert!(!verify_lines(numbered(&edited_after)).is_intact());
    let unmarked = verify_lines(numbered(&lines));
    assert!(unmarked.errors.iter().any(|e| e.contains("does not link")) && unmarked.gaps.is_empty());
}

#[test]
fn canonical_links_check_what_verify_from_checks_and_give_each_records_text_and_hash() {
    let (records, _) = chain(5);
    let links = canonical_links(&records[2..], Some(&records[1].hash())).unwrap();
    let expected: Vec<(String, String)> = records[2..].iter().map(|r| r.canonical()).collect();
    assert_eq!(links, expected);
    assert_eq!(links[2].1, records[4].hash());
    assert_eq!(canonical_links(&records[2..], None), Err(ChainError::BrokenLink { index: 0 }));
    let mut edited = records.clone();
    edited[2].decision = Decision::Alert;
    assert_eq!(canonical_links(&edited, None), Err(ChainError::BrokenLink { index: 3 }));
    let mut old = records.clone();
    old[1].hash_version = 1;
    assert_eq!(canonical_links(&old, None), Err(ChainError::Version { index: 1, version: 1 }));
}

#[test]
fn a_file_line_written_from_canonical_text_is_the_serialised_line() {
    let (mut records, _) = chain(3);
    records[1].message_type = Some("quote \" backslash \\ tab \t é ☃ \u{1F600}".into());
    records[2].violations = vec!["x\ny".into()];
    for record in records {
        let (json, hash) = record.canonical();
        for chain in ["agent:bob", "security", "agent:we\"ird\\"] {
            let line = FileLine::new(chain.to_string(), file::FileRecord::Message(record.clone()));
            assert_eq!(FileLine::json_of(chain, &hash, &json), serde_json::to_string(&line).unwrap());
        }
    }
}
