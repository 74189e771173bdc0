//! `mas audit verify|query --file`: the offline tools over a JSONL audit file.

#![cfg(not(madsim))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mas_core::policy::audit::file::FileRecord;
use mas_core::policy::audit::{AuditRecord, Chain, Decision, FileLine};

fn record(n: u32, decision: Decision) -> AuditRecord {
    AuditRecord {
        correlation_id: None,
        decision,
        hash_version: 0,
        latency_ms: 0.1,
        message_id: format!("m{n}"),
        message_type: Some("job".into()),
        payload_hash: "ab".into(),
        previous_hash: None,
        sender_id: if n.is_multiple_of(2) { "alice".into() } else { "carol".into() },
        sender_instance_id: Some("i".into()),
        target_id: "bob".into(),
        timestamp: 1_700_000_000.0 + f64::from(n),
        trace_id: None,
        violations: if decision == Decision::Alert { vec!["email".into()] } else { vec![] },
    }
}

fn write_file(dir: &Path) -> PathBuf {
    let mut chain = Chain::default();
    let lines: Vec<String> = (0..6)
        .map(|n| {
            let linked = chain.append(record(n, if n == 4 { Decision::Alert } else { Decision::Allowed }));
            let line = FileLine::new("agent:bob".into(), FileRecord::Message(linked));
            serde_json::to_string(&line).unwrap()
        })
        .collect();
    // The oldest two lines sit in a rotated backup, as the sink leaves them.
    let path = dir.join("audit.jsonl");
    std::fs::write(dir.join("audit.jsonl.1"), format!("{}\n", lines[..2].join("\n"))).unwrap();
    std::fs::write(&path, format!("{}\n", lines[2..].join("\n"))).unwrap();
    path
}

fn mas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mas")).args(args).output().expect("run mas")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn verify_and_query_a_rotated_jsonl_file() {
    let dir = std::env::temp_dir().join(format!("mas-audit-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = write_file(&dir);
    let file = path.to_str().unwrap();

    let out = mas(&["audit", "verify", "--file", file]);
    assert!(out.status.success(), "{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(stdout(&out).contains("agent:bob") && stdout(&out).contains("6 records"), "{}", stdout(&out));

    let out = mas(&["audit", "query", "--file", file, "--decision", "alert", "--format", "csv"]);
    assert!(out.status.success());
    let csv = stdout(&out);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(rows[1].starts_with("m4,") && rows[1].contains(",ALERT,") && rows[1].contains(",email,"), "{csv}");
    let out = mas(&["audit", "query", "--file", file, "--sender", "carol", "--since", "1700000002"]);
    let json: Vec<AuditRecord> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json.iter().map(|r| r.message_id.as_str()).collect::<Vec<_>>(), ["m3", "m5"]);

    // A line the sink could not write, marked as a gap: exit 2, reported as a gap, not tampering.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1] = r#"{"gap":{"chain":"agent:bob","missing":1}}"#;
    std::fs::write(&path, format!("{}\n", lines.join("\n"))).unwrap();
    let out = mas(&["audit", "verify", "--file", file]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("GAP: ") && stdout(&out).contains("1 records of chain agent:bob"),
        "{}",
        stdout(&out)
    );
    std::fs::write(&path, &text).unwrap();

    std::fs::write(&path, text.replacen("\"m3\"", "\"m9\"", 1)).unwrap();
    let out = mas(&["audit", "verify", "--file", file]);
    assert_eq!(out.status.code(), Some(1), "an edited record fails verification");
    assert!(stdout(&out).contains("audit.jsonl:2: record of chain agent:bob was edited"), "{}", stdout(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}
