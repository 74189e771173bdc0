//! Authorization, deny by default.
//!
//! Decision order for `sender → target` (the reference's, with its RBAC bypass fixed):
//! 1. the target must hold a live session, else deny (`TargetNotLive`);
//! 2. a target in the sender's block list is denied whatever else allows it (`Blocked`);
//! 3. the sender's allowed set containing `*` or the target allows;
//! 4. with RBAC on, any permission of any of the sender's roles matching `send:{target}` allows;
//! 5. otherwise deny (`NotGranted`).
//!
//! Permission patterns: `*` matches everything; otherwise `*` matches any run of characters
//! (possibly empty) and everything else is literal, so `send:agent.*` matches `send:agent.1`
//! but not `send:agent-1`. Patterns are compiled once, when a role changes.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::AgentId;

/// A compiled permission pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    /// The literal pieces between `*`s.
    parts: Vec<String>,
    /// Whether the pattern starts / ends with a `*`.
    open_start: bool,
    open_end: bool,
}

impl Pattern {
    /// Compiles `source`.
    pub fn new(source: &str) -> Self {
        let parts: Vec<String> = source.split('*').map(str::to_string).collect();
        Pattern {
            source: source.to_string(),
            open_start: source.starts_with('*'),
            open_end: source.ends_with('*'),
            parts: parts.into_iter().filter(|p| !p.is_empty()).collect(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `text` matches. Linear in `text` (greedy leftmost matching of the literal
    /// pieces is exact for patterns whose only wildcard is `*`).
    pub fn matches(&self, text: &str) -> bool {
        if self.parts.is_empty() {
            // "", "*", "**", …: empty matches only empty; any star matches everything.
            return self.open_start || text.is_empty();
        }
        let mut rest = text;
        for (i, part) in self.parts.iter().enumerate() {
            let first = i == 0;
            let last = i == self.parts.len() - 1;
            if first && !self.open_start {
                let Some(after) = rest.strip_prefix(part.as_str()) else { return false };
                rest = after;
                if last && !self.open_end {
                    return rest.is_empty();
                }
                continue;
            }
            if last && !self.open_end {
                return rest.len() >= part.len() && rest.ends_with(part.as_str());
            }
            match rest.find(part.as_str()) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// One sender's grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grants {
    /// Agent ids this sender may message, or `*` for all.
    pub allowed: BTreeSet<String>,
    /// Agent ids this sender may never message (beats everything).
    pub blocked: BTreeSet<String>,
    /// Role names (RBAC).
    pub roles: BTreeSet<String>,
}

/// Why a message was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The target holds no live session.
    TargetNotLive,
    /// The target is in the sender's block list.
    Blocked,
    /// Nothing grants it.
    NotGranted,
}

/// Why a message was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// The sender's allowed set names the target (or `*`).
    Acl,
    /// A role permission matched.
    Role,
}

/// The authorization state: every sender's grants and every role's permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzPolicy {
    grants: BTreeMap<AgentId, Grants>,
    roles: BTreeMap<String, Vec<Pattern>>,
    rbac: bool,
}

impl AuthzPolicy {
    /// An empty policy (denies everything); `rbac` turns role checks on.
    pub fn new(rbac: bool) -> Self {
        AuthzPolicy { rbac, ..AuthzPolicy::default() }
    }

    /// Decides `sender → target`; `target_live` says whether the target holds a live session.
    pub fn authorize(&self, sender: &AgentId, target: &AgentId, target_live: bool) -> Result<Allowance, Denial> {
        if !target_live {
            return Err(Denial::TargetNotLive);
        }
        let Some(grants) = self.grants.get(sender) else { return Err(Denial::NotGranted) };
        if grants.blocked.contains(target.as_str()) {
            return Err(Denial::Blocked);
        }
        if grants.allowed.contains("*") || grants.allowed.contains(target.as_str()) {
            return Ok(Allowance::Acl);
        }
        if self.rbac {
            let permission = format!("send:{target}");
            let granted =
                grants.roles.iter().filter_map(|r| self.roles.get(r)).flatten().any(|p| p.matches(&permission));
            if granted {
                return Ok(Allowance::Role);
            }
        }
        Err(Denial::NotGranted)
    }

    /// Whether discovery may show `target` to `sender`: what [`Self::authorize`] would allow
    /// for a live target.
    pub fn visible(&self, sender: &AgentId, target: &AgentId) -> bool {
        self.authorize(sender, target, true).is_ok()
    }

    /// The grants of `agent` (empty if none).
    pub fn grants(&self, agent: &AgentId) -> Grants {
        self.grants.get(agent).cloned().unwrap_or_default()
    }

    fn entry(&mut self, agent: &AgentId) -> &mut Grants {
        self.grants.entry(agent.clone()).or_default()
    }

    /// Lets `sender` message each of `targets` (adds to its allowed set).
    pub fn allow(&mut self, sender: &AgentId, targets: &[AgentId]) {
        self.entry(sender).allowed.extend(targets.iter().map(|t| t.to_string()));
    }

    /// Removes `target` from `sender`'s allowed set.
    pub fn revoke(&mut self, sender: &AgentId, target: &AgentId) {
        self.entry(sender).allowed.remove(target.as_str());
    }

    /// Replaces all of `agent`'s grants (allowed, blocked, roles).
    pub fn set_grants(&mut self, agent: &AgentId, grants: Grants) {
        self.grants.insert(agent.clone(), grants);
    }

    /// Replaces `sender`'s allowed set.
    pub fn set_allowed(&mut self, sender: &AgentId, allowed: impl IntoIterator<Item = String>) {
        self.entry(sender).allowed = allowed.into_iter().collect();
    }

    /// Lets `sender` message everyone.
    pub fn allow_wildcard(&mut self, sender: &AgentId) {
        self.entry(sender).allowed.insert("*".to_string());
    }

    /// `a → b` and `b → a`.
    pub fn allow_bidirectional(&mut self, a: &AgentId, b: &AgentId) {
        self.allow(a, std::slice::from_ref(b));
        self.allow(b, std::slice::from_ref(a));
    }

    /// Bidirectional: every agent's allowed set becomes all the others. Otherwise a chain
    /// `a → b → c …`.
    pub fn allow_network(&mut self, agents: &[AgentId], bidirectional: bool) {
        if bidirectional {
            for a in agents {
                let others = agents.iter().filter(|b| *b != a).map(|b| b.to_string());
                self.set_allowed(a, others);
            }
        } else {
            for pair in agents.windows(2) {
                self.allow(&pair[0], std::slice::from_ref(&pair[1]));
            }
        }
    }

    /// `sender`'s allowed set becomes exactly `receivers`.
    pub fn allow_broadcast(&mut self, sender: &AgentId, receivers: &[AgentId]) {
        self.set_allowed(sender, receivers.iter().map(|r| r.to_string()));
    }

    /// Blocks `sender → target` whatever else allows it.
    pub fn block(&mut self, sender: &AgentId, target: &AgentId) {
        self.entry(sender).blocked.insert(target.to_string());
    }

    /// Lifts a block.
    pub fn unblock(&mut self, sender: &AgentId, target: &AgentId) {
        self.entry(sender).blocked.remove(target.as_str());
    }

    /// Defines (or replaces) a role's permission patterns.
    pub fn set_role(&mut self, role: &str, permissions: &[&str]) {
        self.roles.insert(role.to_string(), permissions.iter().map(|p| Pattern::new(p)).collect());
    }

    /// Removes a role (its assignments stay but grant nothing).
    pub fn delete_role(&mut self, role: &str) {
        self.roles.remove(role);
    }

    /// Gives `agent` a role.
    pub fn assign_role(&mut self, agent: &AgentId, role: &str) {
        self.entry(agent).roles.insert(role.to_string());
    }

    /// Takes a role from `agent`.
    pub fn unassign_role(&mut self, agent: &AgentId, role: &str) {
        self.entry(agent).roles.remove(role);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn patterns_follow_the_reference_rules() {
        let p = Pattern::new("send:agent.*");
        assert!(p.matches("send:agent.1"));
        assert!(!p.matches("send:agent-1"));
        assert!(Pattern::new("*").matches("anything"));
        assert!(Pattern::new("send:bob").matches("send:bob"));
        assert!(!Pattern::new("send:bob").matches("send:bobby"));
        assert!(Pattern::new("send:*-worker").matches("send:a-worker"));
        assert!(!Pattern::new("send:*-worker").matches("send:a-worker2"));
        assert!(Pattern::new("*:b*b").matches("send:bob"));
        assert!(!Pattern::new("a*a").matches("a"));
    }

    /// Reference semantics of `*` as "any substring", checked against a brute-force matcher.
    fn brute(pattern: &str, text: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == text,
            Some((head, tail)) => {
                text.starts_with(head)
                    && (head.len()..=text.len()).any(|i| text.is_char_boundary(i) && brute(tail, &text[i..]))
            }
        }
    }

    proptest! {
        #[test]
        fn pattern_matches_like_the_brute_force_glob(pattern in "[ab*.]{0,6}", text in "[ab.]{0,8}") {
            prop_assert_eq!(Pattern::new(&pattern).matches(&text), brute(&pattern, &text));
        }
    }

    #[test]
    fn deny_by_default_and_live_target_required() {
        let mut p = AuthzPolicy::new(false);
        assert_eq!(p.authorize(&id("a"), &id("b"), true), Err(Denial::NotGranted));
        p.allow(&id("a"), &[id("b")]);
        assert_eq!(p.authorize(&id("a"), &id("b"), true), Ok(Allowance::Acl));
        assert_eq!(p.authorize(&id("a"), &id("b"), false), Err(Denial::TargetNotLive));
        p.revoke(&id("a"), &id("b"));
        assert_eq!(p.authorize(&id("a"), &id("b"), true), Err(Denial::NotGranted));
    }

    #[test]
    fn a_block_beats_wildcard_and_roles() {
        let mut p = AuthzPolicy::new(true);
        p.allow_wildcard(&id("a"));
        p.set_role("ops", &["send:*"]);
        p.assign_role(&id("a"), "ops");
        p.block(&id("a"), &id("b"));
        assert_eq!(p.authorize(&id("a"), &id("b"), true), Err(Denial::Blocked));
        assert!(!p.visible(&id("a"), &id("b")));
        assert_eq!(p.authorize(&id("a"), &id("c"), true), Ok(Allowance::Acl));
        p.unblock(&id("a"), &id("b"));
        assert!(p.visible(&id("a"), &id("b")));
    }

    #[test]
    fn roles_count_only_with_rbac_on() {
        for rbac in [false, true] {
            let mut p = AuthzPolicy::new(rbac);
            p.set_role("workers", &["send:worker*"]);
            p.assign_role(&id("a"), "workers");
            assert_eq!(p.authorize(&id("a"), &id("worker7"), true).is_ok(), rbac);
            assert!(p.authorize(&id("a"), &id("boss"), true).is_err());
        }
    }

    #[test]
    fn presets() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let mut p = AuthzPolicy::new(false);
        p.allow_network(&[a.clone(), b.clone(), c.clone()], false);
        assert!(p.visible(&a, &b) && p.visible(&b, &c) && !p.visible(&c, &a) && !p.visible(&a, &c));
        p.allow_network(&[a.clone(), b.clone(), c.clone()], true);
        assert!(p.visible(&c, &a) && p.visible(&a, &c) && !p.visible(&a, &a));
        p.allow_broadcast(&a, std::slice::from_ref(&c));
        assert!(!p.visible(&a, &b) && p.visible(&a, &c));
        p.allow_bidirectional(&a, &b);
        assert!(p.visible(&a, &b) && p.visible(&b, &a));
    }
}
