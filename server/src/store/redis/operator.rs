//! Operators' resets and kicks in Redis: each one command or one small script.

use std::time::Duration;

use mas_core::ids::{AgentId, InstanceId};
use mas_core::policy::ratelimit::Backlog;
use mas_core::store::StoreError;

use super::{RedisBackend, channel, key, unavailable};

impl RedisBackend {
    pub(in crate::store) async fn reset_circuit(&self, agent: &AgentId) -> Result<bool, StoreError> {
        self.delete(key(agent, "circuit")).await
    }

    pub(in crate::store) async fn reset_rate(&self, sender: &AgentId) -> Result<bool, StoreError> {
        self.delete(key(sender, "rate")).await
    }

    async fn delete(&self, key: String) -> Result<bool, StoreError> {
        let deleted: i64 = redis::cmd("DEL").arg(key).query_async(&mut self.con()).await.map_err(unavailable)?;
        Ok(deleted > 0)
    }

    pub(in crate::store) async fn rate_backlog(&self, sender: &AgentId) -> Result<Backlog, StoreError> {
        let (now, minute, hour): (u64, u64, u64) = self
            .scripts
            .rate_backlog
            .key(key(sender, "rate"))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let ahead = |tat: u64| Duration::from_micros(tat.saturating_sub(now));
        Ok(Backlog { minute: ahead(minute), hour: ahead(hour) })
    }

    pub(in crate::store) async fn revoke_lease(
        &self,
        agent: &AgentId,
        instance: &InstanceId,
    ) -> Result<bool, StoreError> {
        self.fresh_gates.forget(agent);
        let revoked: i64 = self
            .scripts
            .lease_revoke
            .key(Self::lease_key(agent, instance))
            .key(key(agent, "owners"))
            .arg(channel(agent))
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(revoked == 1)
    }
}
