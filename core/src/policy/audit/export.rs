//! Querying and exporting audit records: a filter over sender, target, decision and time, and
//! CSV / JSON renderings for compliance reports.

use serde::Deserialize;

use super::{AuditRecord, Decision};

/// Which records a query wants; every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditFilter {
    /// Only records of this sender.
    pub sender: Option<String>,
    /// Only records naming this target.
    pub target: Option<String>,
    /// Only records with this decision.
    pub decision: Option<Decision>,
    /// Only records at or after this time (seconds since the Unix epoch).
    pub since: Option<f64>,
    /// Only records at or before this time (seconds since the Unix epoch).
    pub until: Option<f64>,
}

impl AuditFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        self.sender.as_ref().is_none_or(|s| *s == record.sender_id)
            && self.target.as_ref().is_none_or(|t| *t == record.target_id)
            && self.decision.is_none_or(|d| d == record.decision)
            && self.since.is_none_or(|t| record.timestamp >= t)
            && self.until.is_none_or(|t| record.timestamp <= t)
    }
}

/// The reference's CSV columns (without its Redis stream id), in its order.
const CSV_HEADER: &str = "message_id,timestamp,sender_id,sender_instance_id,target_id,message_type,correlation_id,decision,latency_ms,payload_hash,violations,previous_hash";

/// Records as CSV with a header; violations joined with `;`. Empty input gives `""`, as in the
/// reference.
pub fn to_csv(records: &[AuditRecord]) -> String {
    if records.is_empty() {
        return String::new();
    }
    let mut out = String::with_capacity(records.len() * 256);
    out.push_str(CSV_HEADER);
    out.push('\n');
    for r in records {
        let fields = [
            r.message_id.clone(),
            r.timestamp.to_string(),
            r.sender_id.clone(),
            r.sender_instance_id.clone().unwrap_or_default(),
            r.target_id.clone(),
            r.message_type.clone().unwrap_or_default(),
            r.correlation_id.clone().unwrap_or_default(),
            r.decision.as_str().to_string(),
            r.latency_ms.to_string(),
            r.payload_hash.clone(),
            r.violations.join(";"),
            r.previous_hash.clone().unwrap_or_default(),
        ];
        let cells: Vec<String> = fields.iter().map(|f| csv_cell(f)).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Quotes a cell that holds a separator, a quote or a line break (RFC 4180).
fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_string() }
}

/// Records as a JSON array (keys sorted); `pretty` indents by two spaces.
pub fn to_json(records: &[AuditRecord], pretty: bool) -> String {
    let rendered = if pretty { serde_json::to_string_pretty(records) } else { serde_json::to_string(records) };
    rendered.unwrap_or_else(|_| "[]".to_string())
}
