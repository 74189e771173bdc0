//! The JSONL form of the audit trail (the broker's optional file sink) and its verification.
//!
//! One line per record: `{"chain": …, "hash": …, "record": {…}}`. Lines of different chains
//! interleave; within a chain they are in append order. A file that was rotated starts some
//! chains in the middle: their first record's link cannot be checked from the file alone,
//! every later one can, and so can every record's own hash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AuditRecord, Chained, SecurityEvent};

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLine {
    /// Which chain: `agent:{id}` or `security`.
    pub chain: String,
    /// The record's hash.
    pub hash: String,
    /// The record.
    pub record: FileRecord,
}

/// A gap marker: `missing` records of `chain` were committed in the store but never reached
/// the file (the sink fell behind or a write failed). Written just before the chain's next
/// line, so verification knows that this one link cannot be checked from the file, and
/// reports the gap, with its size, instead of a broken chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapLine {
    /// The gap.
    pub gap: Gap,
}

/// What a [`GapLine`] says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    /// Which chain.
    pub chain: String,
    /// How many of its records are missing here.
    pub missing: u64,
}

/// A record of either chain kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FileRecord {
    /// An admission decision.
    Message(AuditRecord),
    /// A security event.
    Security(SecurityEvent),
}

impl FileLine {
    /// The line of `record` in `chain` (its hash computed here).
    pub fn new(chain: String, record: FileRecord) -> Self {
        FileLine { chain, hash: record.hash(), record }
    }

    /// The JSON text of the line of a record already serialised: `record_json` is its
    /// canonical JSON and `hash` that text's hash. Byte for byte what serialising the
    /// [`FileLine`] writes, without serialising the record a second time.
    pub fn json_of(chain: &str, hash: &str, record_json: &str) -> String {
        // A JSON string of a `&str` cannot fail to serialise.
        let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let (chain, hash) = (quoted(chain), quoted(hash));
        let mut line = String::with_capacity(30 + chain.len() + hash.len() + record_json.len());
        for part in [r#"{"chain":"#, &chain, r#","hash":"#, &hash, r#","record":"#, record_json, "}"] {
            line.push_str(part);
        }
        line
    }
}

impl FileRecord {
    fn hash(&self) -> String {
        match self {
            FileRecord::Message(r) => r.hash(),
            FileRecord::Security(e) => e.hash(),
        }
    }

    fn previous_hash(&self) -> Option<&str> {
        match self {
            FileRecord::Message(r) => r.previous_hash(),
            FileRecord::Security(e) => e.previous_hash(),
        }
    }
}

/// What verifying a file found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileReport {
    /// Per chain: records seen, whether the file starts it mid-way (rotation), and its last hash.
    pub chains: BTreeMap<String, ChainSummary>,
    /// Every problem, with the location of its line.
    pub errors: Vec<String>,
    /// Every gap marker, with its location: records the file never received (not tampering;
    /// the store's chain has them).
    pub gaps: Vec<String>,
}

/// One chain as seen in a file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChainSummary {
    /// Records of this chain in the file.
    pub records: usize,
    /// The first record links to one that is not in the file (an older, rotated-away part).
    pub starts_mid_chain: bool,
    /// The last record's hash.
    pub head: Option<String>,
    /// Records the file is known to miss (gap markers), in all.
    pub missing: u64,
    /// A gap marker came since the last record: the next record's link is not checkable.
    after_gap: bool,
}

impl FileReport {
    /// True when no problem was found.
    pub fn is_intact(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Verifies JSONL lines (oldest first), each with its location for error messages (such as
/// `audit.jsonl.1:17`): each record's stored hash must be its real hash, and each record must
/// link to the previous record of its chain.
pub fn verify_lines<'a, L: std::fmt::Display>(lines: impl IntoIterator<Item = (L, &'a str)>) -> FileReport {
    let mut verifier = LineVerifier::default();
    for (n, line) in lines {
        verifier.line(n, line);
    }
    verifier.finish()
}

/// [`verify_lines`] one line at a time, so that a caller can stream files of any size
/// through it without holding them.
#[derive(Debug, Default)]
pub struct LineVerifier {
    report: FileReport,
}

impl LineVerifier {
    /// Checks the line found at `n` (a location for messages).
    pub fn line(&mut self, n: impl std::fmt::Display, line: &str) {
        let report = &mut self.report;
        if line.trim().is_empty() {
            return;
        }
        let parsed: FileLine = match serde_json::from_str(line) {
            Ok(parsed) => parsed,
            Err(err) => {
                if let Ok(GapLine { gap }) = serde_json::from_str::<GapLine>(line) {
                    report
                        .gaps
                        .push(format!("{n}: {} records of chain {} never reached the file", gap.missing, gap.chain));
                    let summary = report.chains.entry(gap.chain).or_default();
                    summary.missing += gap.missing;
                    summary.after_gap = true;
                    return;
                }
                report.errors.push(format!("{n}: unreadable record ({err})"));
                return;
            }
        };
        let actual = parsed.record.hash();
        if actual != parsed.hash {
            report.errors.push(format!("{n}: record of chain {} was edited (hash mismatch)", parsed.chain));
        }
        let summary = report.chains.entry(parsed.chain.clone()).or_default();
        // After a gap marker, the record this one links to is among the missing ones.
        let after_gap = std::mem::take(&mut summary.after_gap);
        match (&summary.head, parsed.record.previous_hash()) {
            _ if after_gap => {}
            (None, Some(_)) if summary.records == 0 => summary.starts_mid_chain = true,
            (expected, link) if expected.as_deref() != link => {
                report.errors.push(format!("{n}: record of chain {} does not link to its predecessor", parsed.chain))
            }
            _ => {}
        }
        summary.records += 1;
        summary.head = Some(actual);
    }

    /// The verdict on every line seen.
    pub fn finish(self) -> FileReport {
        self.report
    }
}
