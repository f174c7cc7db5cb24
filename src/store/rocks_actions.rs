//! [`ActionStore`] and [`HitLogStore`] over the RocksDB [`Store`]: keys,
//! memory-only reads and hops to the blocking pool stay here.

use std::sync::Arc;

use async_trait::async_trait;

use super::action_store::{ActionStore, HistoryPage, Version};
use super::hit_log_store::{HitLogStore, HitPage, HitRow};
use super::{audit_prefix, Key, Kind, Store};
use crate::cas::blocking;
use crate::digest::Digest;
use crate::error::Result;
use crate::resource::InstanceName;

/// The Action Cache entries, their history and the hit log in RocksDB.
#[derive(Debug, Clone)]
pub struct RocksActions(Arc<Store>);

impl RocksActions {
    /// The action and hit-log storage of `store`.
    pub fn new(store: Arc<Store>) -> Self {
        RocksActions(store)
    }
}

#[async_trait]
impl ActionStore for RocksActions {
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>> {
        let key = Key::new(instance, action);
        // From memory on this thread when possible: a hop to the blocking
        // pool costs more than the lookup itself (see Store::ac_get_cached).
        match self.0.ac_get_cached(&key) {
            Some(value) => value,
            None => {
                let store = self.0.clone();
                blocking(move || store.ac_get(&key)).await
            }
        }
    }

    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64> {
        let (key, store) = (Key::new(instance, action), self.0.clone());
        blocking(move || store.ac_put(&key, &entry, stored_at_nanos)).await
    }

    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>> {
        let (key, store) = (Key::new(instance, action), self.0.clone());
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
        let (key, store) = (Key::new(instance, action), self.0.clone());
        let page =
            blocking(move || store.ac_history_page(&key, from_nanos, max_count, max_bytes, must_progress)).await?;
        let next = page.next.and_then(|n| <[u8; 8]>::try_from(n).ok()).map(u64::from_be_bytes);
        Ok(HistoryPage { versions: page.rows, next })
    }

    async fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        let store = self.0.clone();
        blocking(move || store.purge_history(before_nanos)).await
    }

    fn touch(&self, instance: &InstanceName, action: &Digest) {
        self.0.touch(Kind::Action, &Key::new(instance, action));
    }
}

#[async_trait]
impl HitLogStore for RocksActions {
    async fn append(&self, invocation: &str, sequence: u64, answered_at_nanos: u64, record: Vec<u8>) -> Result<()> {
        let (invocation, store) = (invocation.to_string(), self.0.clone());
        blocking(move || store.audit_append(&invocation, sequence, answered_at_nanos, &record)).await
    }

    async fn list(
        &self,
        invocation: &str,
        after: Option<&[u8]>,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<HitPage> {
        let (invocation, after, store) = (invocation.to_string(), after.map(<[u8]>::to_vec), self.0.clone());
        let page = blocking(move || store.audit_list(&invocation, after.as_deref(), max_count, max_bytes)).await?;
        let rows = page.rows.into_iter().map(|r| HitRow { sequence: r.sequence, value: r.value.into_vec() }).collect();
        Ok(HitPage { rows, next: page.next })
    }

    fn is_cursor_of(&self, invocation: &str, cursor: &[u8]) -> bool {
        cursor.starts_with(&audit_prefix(invocation))
    }

    async fn purge(&self, before_nanos: u64) -> Result<usize> {
        let store = self.0.clone();
        blocking(move || store.purge_audit(before_nanos)).await
    }
}
