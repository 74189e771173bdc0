//! The operators' authorization overlay in Redis: one hash, read only when its revision moved
//! and replaced by compare-and-set, so brokers polling it cost one small script call each.

use std::sync::Arc;

use mas_core::store::StoreError;

use super::{RedisBackend, unavailable};

const OVERLAY_KEY: &str = "mas:{#admin}:authz";

impl RedisBackend {
    pub(in crate::store) async fn authz_overlay(&self, known: u64) -> Result<Option<(u64, Arc<str>)>, StoreError> {
        let (revision, doc): (u64, Option<String>) = {
            let reply: Vec<redis::Value> = self
                .scripts
                .authz_get
                .key(OVERLAY_KEY)
                .arg(known)
                .invoke_async(&mut self.con())
                .await
                .map_err(unavailable)?;
            let mut values = reply.into_iter().map(super::text);
            let revision = values.next().and_then(|r| r.parse().ok()).unwrap_or(0);
            (revision, values.next())
        };
        Ok(doc.map(|doc| (revision, Arc::from(doc))))
    }

    pub(in crate::store) async fn put_authz_overlay(
        &self,
        expected: u64,
        doc: Arc<str>,
    ) -> Result<Result<u64, u64>, StoreError> {
        let (written, revision): (i64, u64) = self
            .scripts
            .authz_put
            .key(OVERLAY_KEY)
            .arg(expected)
            .arg(&*doc)
            .invoke_async(&mut self.con())
            .await
            .map_err(unavailable)?;
        Ok(if written == 1 { Ok(revision) } else { Err(revision) })
    }
}
