//! The built-in detectors, custom rules, and their compilation into one [`Dlp`] scanner.

use std::collections::BTreeMap;

use regex::{Regex, RegexSet};
use serde::Deserialize;

use super::{Action, Dlp, Rule, Severity};

/// Luhn checksum over the digits of `text` (separators ignored).
pub fn luhn_valid(text: &str) -> bool {
    let digits: Vec<u32> = text.chars().filter_map(|c| c.to_digit(10)).collect();
    if digits.len() < 12 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| if i % 2 == 1 { if d * 2 > 9 { d * 2 - 9 } else { d * 2 } } else { *d })
        .sum();
    sum.is_multiple_of(10)
}

/// (type, pattern, action, severity, Luhn-validated). A named group `s` marks the sensitive
/// part when the pattern includes a label (e.g. `CVV: 123` → `123`).
///
/// Changed from the reference to cut false positives: an SSN needs separators (`123-45-6789`,
/// `123 45 6789`) or an SSN label (`ssn: 123456789`); a lone 9-digit number is not one.
const BUILT_IN: &[(&str, &str, Action, Severity, bool)] = &[
    ("ssn", r"\b\d{3}[- ]\d{2}[- ]\d{4}\b", Action::Redact, Severity::High, false),
    (
        "ssn",
        r"(?i)\b(?:ssn|social[ _-]?security(?:[ _-]?(?:number|no))?)\b\W{0,3}(?P<s>\d{9})\b",
        Action::Redact,
        Severity::High,
        false,
    ),
    ("email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b", Action::Alert, Severity::Low, false),
    ("phone", r"(?:\+1[ .-]?)?(?:\(\d{3}\)|\b\d{3})[ .-]?\d{3}[ .-]\d{4}\b", Action::Alert, Severity::Low, false),
    (
        "mrn",
        r"(?i)\b(?:MRN|Medical Record(?: Number)?)\s*[:#]?\s*(?P<s>\d{6,10})\b",
        Action::Block,
        Severity::Critical,
        false,
    ),
    (
        "health_insurance",
        r"(?i)\b(?:Health Insurance|Policy)(?: (?:Number|No\.?|ID))?\s*[:#]?\s*#?(?P<s>\d{8,12})\b",
        Action::Block,
        Severity::Critical,
        false,
    ),
    ("icd10", r"\b[A-Z]\d{2}(?:\.\d{1,4})?\b", Action::Alert, Severity::Medium, false),
    (
        "credit_card",
        r"\b(?:4\d{3}|5[1-5]\d{2}|3[47]\d{2}|6011|65\d{2})[- ]?\d{4}[- ]?\d{4}[- ]?\d{3,4}\b",
        Action::Block,
        Severity::Critical,
        true,
    ),
    ("cvv", r"(?i)\b(?:CVV|CVC)2?\s*[:=]?\s*(?P<s>\d{3,4})\b", Action::Block, Severity::Critical, false),
    (
        "api_key",
        r#"(?i)api[_-]?key\b\s*[:=]?\s*["']?(?P<s>[A-Za-z0-9_-]{32,})"#,
        Action::Block,
        Severity::Critical,
        false,
    ),
    ("aws_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", Action::Block, Severity::Critical, false),
    ("private_key", r"(?i)-----BEGIN (?:RSA |EC )?PRIVATE KEY-----", Action::Block, Severity::Critical, false),
    ("jwt", r"\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", Action::Block, Severity::High, false),
    (
        "password",
        r#"(?i)(?:password|passwd|pwd)\b\s*[:=]?\s*["']?(?P<s>[^\s"']{6,})"#,
        Action::Block,
        Severity::Critical,
        false,
    ),
];

/// Labels that the labelled rules look for. A value is scanned again with its key as context
/// only if the key carries one of them (or custom rules exist): for any other key the context
/// string cannot match anything the value alone did not.
const CONTEXT_LABELS: &[&str] = &[
    r"(?i)\b(?:ssn|social[ _-]?security)",
    r"(?i)(?:password|passwd|pwd)",
    r"(?i)\b(?:mrn|medical record)",
    r"(?i)\b(?:health insurance|policy)",
    r"(?i)\b(?:cvv|cvc)",
    r"(?i)api[_-]?key",
];

/// Types with a policy but no built-in detector (the reference has `address` this way).
const POLICY_ONLY: &[(&str, Action, Severity)] = &[("address", Action::Alert, Severity::Medium)];

/// A rule from configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomRule {
    /// Rule name (for operators).
    pub id: String,
    /// Violation type it reports, e.g. `secret`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Regular expression (Rust `regex` syntax; a group named `s` marks the sensitive part).
    pub pattern: String,
    /// What a match does; this also becomes the action of its type.
    pub action: Action,
    /// Severity; default medium.
    #[serde(default)]
    pub severity: Severity,
    /// Disabled rules are ignored.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Case-insensitive matching.
    #[serde(default)]
    pub case_insensitive: bool,
}

fn yes() -> bool {
    true
}

/// Whether custom rules add to the built-ins or replace them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeStrategy {
    /// Built-ins (minus `disable_defaults`) plus custom rules.
    #[default]
    Append,
    /// Custom rules only.
    Replace,
}

/// The `gateway.dlp` configuration section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlpSettings {
    /// Append to or replace the built-in rules.
    pub merge_strategy: MergeStrategy,
    /// Built-in types to drop.
    pub disable_defaults: Vec<String>,
    /// Per-type actions, applied last.
    pub policy_overrides: BTreeMap<String, Action>,
    /// Custom rules.
    pub rules: Vec<CustomRule>,
}

/// A custom rule whose pattern does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DLP rule {id}: invalid pattern: {reason}")]
pub struct RuleError {
    /// The rule: `rules[{index}] "{id}"` for a custom rule, `built-in "{kind}"` otherwise.
    pub id: String,
    /// The regex error.
    pub reason: String,
}

impl Dlp {
    /// Compiles the rules of `settings`, once. Every pattern is checked here, so a bad custom
    /// rule fails at start-up, never during a scan.
    pub fn new(settings: &DlpSettings) -> Result<Dlp, RuleError> {
        let mut rules = Vec::new();
        let mut policies: BTreeMap<String, (Action, Severity)> = BTreeMap::new();
        if settings.merge_strategy == MergeStrategy::Append {
            for (kind, pattern, action, severity, luhn) in BUILT_IN {
                if settings.disable_defaults.iter().any(|d| d == kind) {
                    continue;
                }
                let regex = Regex::new(pattern)
                    .map_err(|e| RuleError { id: format!("built-in {kind:?}"), reason: e.to_string() })?;
                rules.push(Rule { kind: (*kind).to_string(), regex, luhn: *luhn });
                policies.insert((*kind).to_string(), (*action, *severity));
            }
            for (kind, action, severity) in POLICY_ONLY {
                if !settings.disable_defaults.iter().any(|d| d == kind) {
                    policies.insert((*kind).to_string(), (*action, *severity));
                }
            }
        }
        for (index, rule) in settings.rules.iter().enumerate().filter(|(_, r)| r.enabled) {
            let pattern = if rule.case_insensitive { format!("(?i){}", rule.pattern) } else { rule.pattern.clone() };
            let regex = Regex::new(&pattern)
                .map_err(|e| RuleError { id: format!("rules[{index}] {:?}", rule.id), reason: e.to_string() })?;
            rules.push(Rule { kind: rule.kind.clone(), regex, luhn: false });
            policies.insert(rule.kind.clone(), (rule.action, rule.severity));
        }
        for (kind, action) in &settings.policy_overrides {
            let severity = policies.get(kind).map_or(Severity::Medium, |p| p.1);
            policies.insert(kind.clone(), (*action, severity));
        }
        let set = RegexSet::new(rules.iter().map(|r| r.regex.as_str()))
            .map_err(|e| RuleError { id: "set (all rules together)".into(), reason: e.to_string() })?;
        let labels = RegexSet::new(CONTEXT_LABELS)
            .map_err(|e| RuleError { id: "context labels".into(), reason: e.to_string() })?;
        let always_with_context = settings.rules.iter().any(|r| r.enabled);
        Ok(Dlp { rules, set, labels, always_with_context, policies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_valid("4111 1111 1111 1111"));
        assert!(luhn_valid("5500-0000-0000-0004"));
        assert!(!luhn_valid("4111 1111 1111 1112"));
        assert!(!luhn_valid("1234"));
    }

    #[test]
    fn bad_custom_pattern_fails_at_build() {
        let settings = DlpSettings {
            rules: vec![CustomRule {
                id: "broken".into(),
                kind: "secret".into(),
                pattern: "(".into(),
                action: Action::Block,
                severity: Severity::High,
                enabled: true,
                case_insensitive: false,
            }],
            ..DlpSettings::default()
        };
        assert_eq!(Dlp::new(&settings).unwrap_err().id, r#"rules[0] "broken""#);
    }
}
