//! [`ActionStore`] and [`HitLogStore`] over the [`RocksStore`]: keys,
//! memory-only reads and hops to the blocking pool stay here.

use std::sync::Arc;

use async_trait::async_trait;

use super::{audit_cursor_after, audit_prefix, blocking, Key, Kind, RocksStore};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::Result;
use crate::store::action_store::{ActionStore, HistoryPage, Version};
use crate::store::hit_log_store::{HitLogStore, HitPage, HitRow, Purged};

#[async_trait]
impl ActionStore for Arc<RocksStore> {
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>> {
        let key = Key::new(instance, action);
        // From memory on this thread when possible: a hop to the blocking
        // pool costs more than the lookup itself (see RocksStore::ac_get_cached).
        match self.ac_get_cached(&key) {
            Some(value) => value,
            None => {
                let store = self.clone();
                blocking(move || store.ac_get(&key)).await
            }
        }
    }

    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64> {
        let (key, store) = (Key::new(instance, action), self.clone());
        blocking(move || store.ac_put(&key, &entry, stored_at_nanos)).await
    }

    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>> {
        let (key, store) = (Key::new(instance, action), self.clone());
        blocking(move || store.ac_history(&key)).await
    }

    async fn history_page(
        &self,
        instance: &InstanceName,
        action: &Digest,
        from_nanos: u64,
        max_count: usize,
        max_bytes: usize,
        must_progress: bool,
    ) -> Result<HistoryPage> {
        let (key, store) = (Key::new(instance, action), self.clone());
        let page =
            blocking(move || store.ac_history_page(&key, from_nanos, max_count, max_bytes, must_progress)).await?;
        let next = page.next.and_then(|n| <[u8; 8]>::try_from(n).ok()).map(u64::from_be_bytes);
        Ok(HistoryPage { versions: page.rows, next })
    }

    async fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        let store = self.clone();
        blocking(move || RocksStore::purge_history(&store, before_nanos)).await
    }

    fn touch(&self, instance: &InstanceName, action: &Digest) {
        RocksStore::touch(self, Kind::Action, &Key::new(instance, action));
    }
}

#[async_trait]
impl HitLogStore for Arc<RocksStore> {
    async fn append(&self, invocation: &str, sequence: u64, answered_at_nanos: u64, record: Vec<u8>) -> Result<()> {
        let (invocation, store) = (invocation.to_string(), self.clone());
        blocking(move || store.audit_append(&invocation, sequence, answered_at_nanos, &record)).await
    }

    async fn list(
        &self,
        invocation: &str,
        after: Option<&[u8]>,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<HitPage> {
        let (invocation, after, store) = (invocation.to_string(), after.map(<[u8]>::to_vec), self.clone());
        let page = blocking(move || store.audit_list(&invocation, after.as_deref(), max_count, max_bytes)).await?;
        let rows = page.rows.into_iter().map(|r| HitRow { sequence: r.sequence, value: r.value.into_vec() }).collect();
        Ok(HitPage { rows, next: page.next })
    }

    fn cursor_after(&self, invocation: &str, sequence: u64) -> Vec<u8> {
        audit_cursor_after(invocation, sequence)
    }

    fn is_cursor_of(&self, invocation: &str, cursor: &[u8]) -> bool {
        cursor.starts_with(&audit_prefix(invocation))
    }

    async fn purge(&self, before_nanos: u64) -> Result<Purged> {
        let store = self.clone();
        blocking(move || store.purge_audit(before_nanos)).await
    }
}
