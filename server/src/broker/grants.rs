//! Run-time grant changes, shared by every broker on one store.
//!
//! The policy in force is always "the configuration, then the operators' overlay" (see
//! `mas_core::policy::overlay`). The overlay lives in the store with a revision; a change is a
//! compare-and-set on it (retried when another broker changed it first), and every broker polls
//! the revision every `admin.authz_refresh_ms`, so a change made through any broker applies on
//! all of them within that bound, and survives restarts.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use mas_core::ids::AgentId;
use mas_core::policy::authz::{AuthzPolicy, Grants};
use mas_core::policy::overlay::{AuthzOverlay, GrantChange};
use mas_core::store::StoreError;

use super::Broker;
use crate::config::PermissionPreset;

/// Compare-and-set attempts before a change gives up. Each lost attempt means another change
/// landed in between, so with n changes racing none needs more than n attempts: this bound is
/// how many simultaneous changes are all kept. It was 16, and 20 concurrent changes through
/// two brokers (`tests/grants.rs`) could exhaust it.
const MAX_CHANGE_ATTEMPTS: usize = 64;

/// Why a grant change failed.
#[derive(Debug, thiserror::Error)]
pub enum GrantChangeError {
    /// The store could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored overlay does not parse (written by something else); nothing was changed.
    #[error("the stored authorization overlay is unreadable: {0}")]
    Unreadable(String),
    /// Other changes kept landing first.
    #[error("the authorization overlay kept changing; try again")]
    Contended,
}

impl Broker {
    /// The revision of the operators' overlay this broker applies (0: none yet).
    pub fn authz_revision(&self) -> u64 {
        self.authz_revision.load(Ordering::Acquire)
    }

    /// The grants in force for `agent` on this broker.
    pub fn grants(&self, agent: &AgentId) -> Grants {
        self.authz.read().unwrap_or_else(PoisonError::into_inner).grants(agent)
    }

    /// Applies the store's overlay if its revision moved; returns whether it did.
    pub async fn refresh_authz(&self) -> Result<bool, GrantChangeError> {
        let known = self.authz_revision();
        let Some((revision, doc)) = self.store.authz_overlay(known).await? else { return Ok(false) };
        let overlay = parse(&doc)?;
        self.install(revision, &overlay);
        tracing::info!(revision, "authorization overlay applied");
        Ok(true)
    }

    /// Changes `agent`'s grants for every broker on the store; returns the new revision and
    /// the agent's grants. Applied here at once, elsewhere within `admin.authz_refresh_ms`.
    pub async fn change_grants(
        &self,
        agent: &AgentId,
        change: &GrantChange,
    ) -> Result<(u64, Grants), GrantChangeError> {
        self.update_overlay(|effective, overlay| overlay.change(effective, agent, change)).await
    }

    /// Applies a permission preset (as in the file's `permissions`) for every broker on the
    /// store: each agent it names gets the grants the preset gives it on top of the policy in
    /// force. Returns the new revision and the agents' new grants.
    pub async fn apply_preset(
        &self,
        preset: &PermissionPreset,
    ) -> Result<(u64, Vec<(AgentId, Grants)>), GrantChangeError> {
        self.update_overlay(|effective, overlay| {
            let mut after = effective.clone();
            preset.apply(&mut after);
            let mut named: Vec<AgentId> = preset.agents().into_iter().cloned().collect();
            named.sort();
            named.dedup();
            named
                .into_iter()
                .map(|agent| {
                    let grants = after.grants(&agent);
                    overlay.grants.insert(agent.clone(), grants.clone());
                    (agent, grants)
                })
                .collect()
        })
        .await
    }

    /// Compare-and-set of the store's overlay: `edit` sees the policy in force under the
    /// current overlay and changes the overlay; retried from a fresh read when another change
    /// landed first. Installs the result here at once.
    async fn update_overlay<T>(
        &self,
        mut edit: impl FnMut(&AuthzPolicy, &mut AuthzOverlay) -> T,
    ) -> Result<(u64, T), GrantChangeError> {
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            // Read whatever is current (u64::MAX is never a stored revision).
            let (revision, mut overlay) = match self.store.authz_overlay(u64::MAX).await? {
                Some((revision, doc)) => (revision, parse(&doc)?),
                None => (0, AuthzOverlay::default()),
            };
            let effective = self.policy_with(&overlay);
            let edited = edit(&effective, &mut overlay);
            let doc: Arc<str> =
                serde_json::to_string(&overlay).map_err(|e| GrantChangeError::Unreadable(e.to_string()))?.into();
            if let Ok(written) = self.store.put_authz_overlay(revision, doc).await? {
                self.install(written, &overlay);
                return Ok((written, edited));
            }
        }
        Err(GrantChangeError::Contended)
    }

    /// The configured policy with `overlay` applied.
    fn policy_with(&self, overlay: &AuthzOverlay) -> AuthzPolicy {
        let mut policy = self.config.authz_policy();
        overlay.apply(&mut policy);
        policy
    }

    /// Makes `overlay` (at `revision`) the policy in force, unless a newer one already is.
    fn install(&self, revision: u64, overlay: &AuthzOverlay) {
        let policy = self.policy_with(overlay);
        let mut current = self.authz.write().unwrap_or_else(PoisonError::into_inner);
        if revision > self.authz_revision() {
            *current = policy;
            self.authz_revision.store(revision, Ordering::Release);
        }
    }
}

fn parse(doc: &str) -> Result<AuthzOverlay, GrantChangeError> {
    if doc.is_empty() {
        return Ok(AuthzOverlay::default());
    }
    serde_json::from_str(doc).map_err(|e| GrantChangeError::Unreadable(e.to_string()))
}

/// Reads the overlay at once, then every `every`, until the broker is gone. The first read
/// is what applies it for a broker made by `Broker::with_store` (tests, the simulation);
/// `Broker::connect` has already applied it before serving, so there it finds nothing new.
/// A failed poll is logged and tried again at the next tick: the policy in force stays.
pub(super) async fn follow_overlay(broker: Weak<Broker>, every: Duration) {
    loop {
        {
            let Some(broker) = broker.upgrade() else { return };
            if let Err(err) = broker.refresh_authz().await {
                tracing::warn!(error = %err, "could not refresh the authorization overlay; keeping the policy in force");
            }
        }
        tokio::time::sleep(every).await;
    }
}
