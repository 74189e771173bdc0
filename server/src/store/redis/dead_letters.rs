//! Dead-letter steps of the Redis backend: listing `mas:{A}:dlq` with ages by the Redis clock,
//! redriving letters back to the work stream, purging them. Each is one script or command,
//! so a letter is redriven at most once however many operators or brokers ask at the same time.

use std::sync::Arc;
use std::time::Duration;

use mas_core::delivery::EntryId;
use mas_core::ids::AgentId;
use mas_core::store::{DeadLetter, QueueKey, Redrive, StoreError};
use redis::Value;

use super::{RedisBackend, channel, key, text, unavailable};

/// Fields per letter in the `dlq_list` reply (after its leading `now`).
const LIST_FIELDS: usize = 5;

impl RedisBackend {
    pub(in crate::store) async fn dead_letters(
        &self,
        agent: &AgentId,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let flat: Vec<Value> = self
            .scripts
            .dlq_list
            .key(key(agent, "dlq"))
            .arg(limit)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        let mut values = flat.into_iter().map(text);
        let now: u64 = values.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let values: Vec<String> = values.collect();
        Ok(values
            .chunks_exact(LIST_FIELDS)
            .map(|letter| {
                let died: u64 = letter[4].parse().unwrap_or(now);
                DeadLetter {
                    id: letter[0].clone(),
                    agent: agent.clone(),
                    envelope: Arc::from(letter[1].as_str()),
                    reason: letter[2].clone(),
                    attempts: letter[3].parse().unwrap_or(0),
                    age: Duration::from_millis(now.saturating_sub(died)),
                }
            })
            .collect())
    }

    pub(in crate::store) async fn redrive_dead_letters(
        &self,
        agent: &AgentId,
        ids: &[String],
    ) -> Result<Vec<Redrive>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (work, delayed) = Self::queue_keys(&QueueKey::Work(agent.clone()));
        let mut invocation = self.scripts.dlq_redrive.prepare_invoke();
        invocation.key(key(agent, "dlq")).key(work).key(delayed).arg(self.max_queue_len).arg(channel(agent));
        for id in ids {
            invocation.arg(id);
        }
        let outcomes: Vec<String> = invocation.invoke_async(&mut self.con()).await.map_err(unavailable)?;
        Ok(outcomes
            .into_iter()
            .map(|outcome| match outcome.as_str() {
                "missing" => Redrive::NotFound,
                "full" => Redrive::QueueFull,
                id => Redrive::Queued(EntryId::new(format!("w:{id}"))),
            })
            .collect())
    }

    pub(in crate::store) async fn purge_dead_letters(
        &self,
        agent: &AgentId,
        ids: &[String],
    ) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        // Stream ids are validated by Redis; a malformed one fails the whole XDEL, so a
        // selector's ids come from a listing.
        let deleted: usize = redis::cmd("XDEL")
            .arg(key(agent, "dlq"))
            .arg(ids)
            .query_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(deleted)
    }
}
