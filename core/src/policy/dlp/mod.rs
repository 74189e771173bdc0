//! Data-loss prevention: find sensitive data in a payload and block, redact or flag it.
//!
//! The scan is structure-aware: every key is scanned; every string value is scanned alone and
//! again with its key as context (`"password: hunter22"`); numbers and booleans are scanned as
//! their JSON text (with their key as context too); list items inherit their parent's key. One
//! `RegexSet` pass per text selects the few rules worth running, so clean text costs one scan.
//!
//! The most restrictive action among the violations wins (block > redact > alert). Redaction
//! masks only the matches whose own policy is redact, in keys and string values; if masking
//! makes two keys collide, the decision escalates to block rather than lose a field.

mod rules;

pub use rules::{CustomRule, DlpSettings, MergeStrategy, RuleError, luhn_valid};

use std::collections::{BTreeMap, BTreeSet};

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::Payload;
use crate::payload::{Node, WirePayload};

/// What a violation does to the message. Ordered: a later variant is more restrictive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Deliver unchanged, audit as an alert.
    Alert,
    /// Deliver with the match masked.
    Redact,
    /// Refuse the message (`dlp_blocked`).
    Block,
}

/// How bad a violation is (reported, not acted on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Low.
    Low,
    /// Medium (the default for custom rules).
    #[default]
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// Its type, e.g. `credit_card`.
    pub kind: String,
    /// The matched sensitive text.
    pub matched: String,
    /// Its type's action.
    pub action: Action,
    /// Its type's severity.
    pub severity: Severity,
}

/// The outcome of scanning one payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    /// Findings, de-duplicated, ordered by type then text.
    pub violations: Vec<Violation>,
    /// The most restrictive action; `None` when the payload is clean.
    pub action: Option<Action>,
    /// With `action == Some(Redact)`: the payload to deliver instead.
    pub redacted: Option<Payload>,
}

impl Scan {
    /// The violation types, de-duplicated and sorted (what the audit records).
    pub fn kinds(&self) -> Vec<String> {
        self.violations.iter().map(|v| v.kind.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }
}

struct Rule {
    kind: String,
    regex: Regex,
    luhn: bool,
}

/// A compiled scanner. Build once (from configuration), share, scan many payloads.
pub struct Dlp {
    rules: Vec<Rule>,
    set: RegexSet,
    /// Keys worth a context scan.
    labels: RegexSet,
    /// Custom rules may look for any context, so with them every value gets one.
    always_with_context: bool,
    policies: BTreeMap<String, (Action, Severity)>,
}

impl std::fmt::Debug for Dlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dlp").field("rules", &self.rules.len()).field("policies", &self.policies).finish()
    }
}

impl Dlp {
    /// The action configured for a violation type.
    pub fn policy(&self, kind: &str) -> Option<Action> {
        self.policies.get(kind).map(|p| p.0)
    }

    /// Scans an owned payload.
    pub fn scan(&self, payload: &Payload) -> Scan {
        self.scan_wire(&WirePayload::borrowed(payload))
    }

    /// Scans a payload as admission parsed it.
    pub fn scan_wire(&self, payload: &WirePayload<'_>) -> Scan {
        // Fast path for the common clean payload: one pass of the whole rule set over all its
        // texts joined by newlines. The built-in rules have no anchors, so anything the
        // per-text walk would find is found here too (a match straddling two texts only costs
        // the walk below). Custom rules may use anchors, so with them the walk always runs.
        if !self.always_with_context {
            let mut joined = String::with_capacity(4096);
            for (key, node) in payload.members() {
                joined.push_str(key);
                joined.push('\n');
                self.join_texts(node, Some(key), &mut joined);
            }
            if !self.set.is_match(&joined) {
                return Scan { violations: Vec::new(), action: None, redacted: None };
            }
        }
        self.scan_walking(payload)
    }

    /// The full structure-aware scan, without the clean fast path.
    fn scan_walking(&self, payload: &WirePayload<'_>) -> Scan {
        let mut found = BTreeSet::new();
        for (key, node) in payload.members() {
            self.scan_text(key, &mut found);
            self.walk(node, Some(key), &mut found);
        }
        let violations: Vec<Violation> = found.into_iter().collect();
        let action = violations.iter().map(|v| v.action).max();
        let mut scan = Scan { violations, action, redacted: None };
        if scan.action == Some(Action::Redact) {
            match redact(&payload.to_payload(), &scan.violations) {
                Some(redacted) => scan.redacted = Some(redacted),
                None => scan.action = Some(Action::Block),
            }
        }
        scan
    }

    fn walk(&self, node: &Node<'_>, key: Option<&str>, found: &mut BTreeSet<Violation>) {
        match node {
            Node::Object(members) => {
                for (k, v) in members {
                    self.scan_text(k, found);
                    self.walk(v, Some(k), found);
                }
            }
            Node::Array(items) => items.iter().for_each(|item| self.walk(item, key, found)),
            Node::String(s) => self.scan_with_context(s, key, found),
            Node::Number(n) => self.scan_with_context(&n.to_string(), key, found),
            Node::Bool(b) => self.scan_with_context(if *b { "true" } else { "false" }, key, found),
            Node::Null => {}
        }
    }

    /// Appends every text the walk would scan, one per line, so that one pass over the result
    /// finds whatever the walk would. A scalar directly under its key follows the key's own
    /// line, which the built-in labelled rules match as they match `key: text` (their label and
    /// value may be separated by any white space or up to three non-word characters); array
    /// items are not next to their key, so under a labelled key each gets its `key: item` line.
    fn join_texts(&self, node: &Node<'_>, key: Option<&str>, out: &mut String) {
        match node {
            Node::Object(members) => {
                for (k, v) in members {
                    out.push_str(k);
                    out.push('\n');
                    self.join_texts(v, Some(k), out);
                }
            }
            Node::Array(items) => {
                let labelled = key.filter(|k| self.labels.is_match(k));
                for item in items {
                    match (labelled, item) {
                        (Some(k), Node::String(_) | Node::Number(_) | Node::Bool(_)) => {
                            push_scalar(item, out);
                            out.push_str(k);
                            out.push_str(": ");
                            push_scalar(item, out);
                        }
                        _ => self.join_texts(item, key, out),
                    }
                }
            }
            Node::String(_) | Node::Number(_) | Node::Bool(_) => push_scalar(node, out),
            Node::Null => {}
        }
    }

    fn scan_with_context(&self, text: &str, key: Option<&str>, found: &mut BTreeSet<Violation>) {
        self.scan_text(text, found);
        if let Some(key) = key
            && (self.always_with_context || self.labels.is_match(key))
        {
            self.scan_text(&format!("{key}: {text}"), found);
        }
    }

    fn scan_text(&self, text: &str, found: &mut BTreeSet<Violation>) {
        for index in self.set.matches(text).iter() {
            let rule = &self.rules[index];
            let Some(&(action, severity)) = self.policies.get(&rule.kind) else { continue };
            for caps in rule.regex.captures_iter(text) {
                let Some(m) = caps.name("s").or_else(|| caps.get(0)) else { continue };
                if rule.luhn && !luhn_valid(m.as_str()) {
                    continue;
                }
                found.insert(Violation { kind: rule.kind.clone(), matched: m.as_str().to_string(), action, severity });
            }
        }
    }
}

/// Appends a string's text, or a number's or boolean's JSON text, and a line break.
fn push_scalar(node: &Node<'_>, out: &mut String) {
    use std::fmt::Write;
    match node {
        Node::String(s) => out.push_str(s),
        // `Number`'s text is its JSON text; writing into a String cannot fail.
        Node::Number(n) => drop(write!(out, "{n}")),
        Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Node::Null | Node::Array(_) | Node::Object(_) => {}
    }
    out.push('\n');
}

/// The mask that replaces a redacted match (the reference's formats).
pub fn mask(kind: &str, matched: &str) -> String {
    let last = |n: usize| -> String {
        let chars: Vec<char> = matched.chars().collect();
        chars[chars.len().saturating_sub(n)..].iter().collect()
    };
    match kind {
        "ssn" => format!("XXX-XX-{}", last(4)),
        "credit_card" => {
            let digits: String = matched.chars().filter(char::is_ascii_digit).collect();
            format!("**** **** **** {}", &digits[digits.len().saturating_sub(4)..])
        }
        "email" => match matched.split_once('@') {
            Some((local, domain)) => format!("{}***@{domain}", local.chars().next().unwrap_or('*')),
            None => "[REDACTED EMAIL]".to_string(),
        },
        "phone" => {
            let digits: String = matched.chars().filter(char::is_ascii_digit).collect();
            format!("(XXX) XXX-{}", &digits[digits.len().saturating_sub(4)..])
        }
        other => format!("[REDACTED {}]", other.to_uppercase()),
    }
}

/// Masks every match whose own policy is redact, longest first, in keys and string values;
/// numbers and booleans whose text changes become strings. `None` if two keys collide.
fn redact(payload: &Payload, violations: &[Violation]) -> Option<Payload> {
    let mut targets: Vec<(&str, String)> = violations
        .iter()
        .filter(|v| v.action == Action::Redact)
        .map(|v| (v.matched.as_str(), mask(&v.kind, &v.matched)))
        .collect();
    targets.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
    let replace = |text: &str| targets.iter().fold(text.to_string(), |acc, (from, to)| acc.replace(from, to));
    redact_map(payload, &replace)
}

fn redact_map(map: &Payload, replace: &impl Fn(&str) -> String) -> Option<Payload> {
    let mut out = Payload::new();
    for (key, value) in map {
        let new_key = replace(key);
        if out.insert(new_key, redact_value(value, replace)?).is_some() {
            return None;
        }
    }
    Some(out)
}

fn redact_value(value: &Value, replace: &impl Fn(&str) -> String) -> Option<Value> {
    Some(match value {
        Value::Object(map) => Value::Object(redact_map(map, replace)?),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact_value(v, replace)).collect::<Option<_>>()?),
        Value::String(s) => Value::String(replace(s)),
        Value::Number(_) | Value::Bool(_) => {
            let text = value.to_string();
            let masked = replace(&text);
            if masked == text { value.clone() } else { Value::String(masked) }
        }
        Value::Null => Value::Null,
    })
}

#[cfg(test)]
mod tests;
