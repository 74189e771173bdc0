//! Authorization changes made at run time by operators, on top of the configured policy.
//!
//! The overlay is one document kept in the store with a revision, so every broker sharing the
//! store applies the same changes: a broker rebuilds its policy as "configuration, then the
//! overlay" whenever it sees a new revision. An agent in the overlay has its grants replaced
//! whole (allowed, blocked, roles), so applying the overlay twice, or on a broker that already
//! applied it, changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::authz::{AuthzPolicy, Grants};
use crate::ids::AgentId;

/// The operators' changes: each changed agent's whole grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzOverlay {
    /// Grants replacing the configured ones, per agent.
    pub grants: BTreeMap<AgentId, Grants>,
}

/// One change to one agent's grants, as an operator asks for it. Applied in field order:
/// allow, revoke, block, unblock, assign, unassign.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantChange {
    /// Targets (agent ids or `*`) to add to the allowed set.
    pub allow: Vec<String>,
    /// Targets to remove from the allowed set.
    pub revoke: Vec<String>,
    /// Agents to block (beats every grant).
    pub block: Vec<String>,
    /// Blocks to lift.
    pub unblock: Vec<String>,
    /// Roles to give.
    pub assign_roles: Vec<String>,
    /// Roles to take away.
    pub unassign_roles: Vec<String>,
}

impl GrantChange {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        [&self.allow, &self.revoke, &self.block, &self.unblock, &self.assign_roles, &self.unassign_roles]
            .iter()
            .all(|v| v.is_empty())
    }

    /// `grants` after the change.
    pub fn applied_to(&self, mut grants: Grants) -> Grants {
        grants.allowed.extend(self.allow.iter().cloned());
        for target in &self.revoke {
            grants.allowed.remove(target);
        }
        grants.blocked.extend(self.block.iter().cloned());
        for target in &self.unblock {
            grants.blocked.remove(target);
        }
        grants.roles.extend(self.assign_roles.iter().cloned());
        for role in &self.unassign_roles {
            grants.roles.remove(role);
        }
        grants
    }
}

impl AuthzOverlay {
    /// Replaces the grants of every agent in the overlay.
    pub fn apply(&self, policy: &mut AuthzPolicy) {
        for (agent, grants) in &self.grants {
            policy.set_grants(agent, grants.clone());
        }
    }

    /// Records `change` to `agent`'s grants as `effective` (the policy in force) has them;
    /// returns the agent's new grants.
    pub fn change(&mut self, effective: &AuthzPolicy, agent: &AgentId, change: &GrantChange) -> Grants {
        let grants = change.applied_to(effective.grants(agent));
        self.grants.insert(agent.clone(), grants.clone());
        grants
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::authz::Denial;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    fn configured() -> AuthzPolicy {
        let mut policy = AuthzPolicy::new(false);
        policy.allow(&id("alice"), &[id("bob"), id("carol")]);
        policy
    }

    #[test]
    fn a_change_replaces_the_agents_grants_and_reapplying_changes_nothing() {
        let mut overlay = AuthzOverlay::default();
        let revoke = GrantChange { revoke: vec!["bob".into()], block: vec!["dave".into()], ..Default::default() };
        let grants = overlay.change(&configured(), &id("alice"), &revoke);
        assert_eq!(grants.allowed.iter().map(String::as_str).collect::<Vec<_>>(), ["carol"]);

        let mut policy = configured();
        overlay.apply(&mut policy);
        assert_eq!(policy.authorize(&id("alice"), &id("bob"), true), Err(Denial::NotGranted));
        assert!(policy.authorize(&id("alice"), &id("carol"), true).is_ok());
        assert_eq!(policy.authorize(&id("alice"), &id("dave"), true), Err(Denial::Blocked));
        let once = policy.clone();
        overlay.apply(&mut policy);
        assert_eq!(policy, once, "idempotent");

        let text = serde_json::to_string(&overlay).unwrap();
        assert_eq!(serde_json::from_str::<AuthzOverlay>(&text).unwrap(), overlay, "stored as JSON");
    }

    #[test]
    fn changes_apply_in_order_allow_before_revoke() {
        let change = GrantChange { allow: vec!["x".into()], revoke: vec!["x".into()], ..Default::default() };
        assert!(change.applied_to(Grants::default()).allowed.is_empty());
        assert!(GrantChange::default().is_empty() && !change.is_empty());
    }
}
