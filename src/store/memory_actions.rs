//! [`ActionStore`] and [`HitLogStore`] in memory: the domain's unit tests
//! run the Action Cache and the audit log against it, without a disk or a
//! server. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::action_store::{ActionStore, HistoryPage, Version};
use super::hit_log_store::{HitLogStore, HitPage, HitRow, Purged};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::Result;

/// An action, as this store keys it.
type ActionKey = (String, Digest);

/// The Action Cache entries, their history and the hit log, in memory.
#[derive(Debug, Default)]
pub struct MemoryActions(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    current: HashMap<ActionKey, Vec<u8>>,
    /// (action, history time) → entry.
    history: BTreeMap<(ActionKey, u64), Vec<u8>>,
    /// The last history time handed out.
    history_clock: u64,
    touches: HashMap<ActionKey, u64>,
    /// (invocation, sequence) → (answered at, record).
    hits: BTreeMap<(String, u64), (u64, Vec<u8>)>,
}

fn key(instance: &InstanceName, action: &Digest) -> ActionKey {
    (instance.as_str().to_string(), *action)
}

impl MemoryActions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How often the entry of `action` was counted as used (tests check
    /// that hits keep entries from eviction).
    pub fn touches(&self, instance: &InstanceName, action: &Digest) -> u64 {
        self.state().touches.get(&key(instance, action)).copied().unwrap_or(0)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl ActionStore for MemoryActions {
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>> {
        Ok(self.state().current.get(&key(instance, action)).cloned())
    }

    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64> {
        let mut state = self.state();
        let at = stored_at_nanos.max(state.history_clock.saturating_add(1));
        state.history_clock = at;
        state.history.insert((key(instance, action), at), entry.clone());
        state.current.insert(key(instance, action), entry);
        Ok(at)
    }

    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>> {
        let page = self.history_page(instance, action, 0, usize::MAX, usize::MAX, true).await?;
        Ok(page.versions)
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
        let k = key(instance, action);
        let state = self.state();
        let mut page = HistoryPage::default();
        let mut bytes = 0usize;
        for ((_, at), entry) in state.history.range((k.clone(), from_nanos)..=(k, u64::MAX)) {
            let first = page.versions.is_empty() && must_progress;
            if page.versions.len() >= max_count || (!first && bytes + entry.len() > max_bytes) {
                page.next = Some(*at);
                break;
            }
            bytes += entry.len();
            page.versions.push((*at, entry.clone()));
        }
        Ok(page)
    }

    async fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        let mut state = self.state();
        let before = state.history.len();
        state.history.retain(|(_, at), _| *at >= before_nanos);
        Ok(before - state.history.len())
    }

    fn touch(&self, instance: &InstanceName, action: &Digest) {
        *self.state().touches.entry(key(instance, action)).or_default() += 1;
    }
}

/// A listing cursor: the invocation, then the last listed sequence.
fn cursor(invocation: &str, sequence: u64) -> Vec<u8> {
    let mut c = invocation.as_bytes().to_vec();
    c.extend_from_slice(&sequence.to_be_bytes());
    c
}

#[async_trait]
impl HitLogStore for MemoryActions {
    async fn append(&self, invocation: &str, sequence: u64, answered_at_nanos: u64, record: Vec<u8>) -> Result<()> {
        self.state().hits.insert((invocation.to_string(), sequence), (answered_at_nanos, record));
        Ok(())
    }

    async fn list(
        &self,
        invocation: &str,
        after: Option<&[u8]>,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<HitPage> {
        let start = match after.and_then(|a| a.get(invocation.len()..)).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
            Some(last) => u64::from_be_bytes(last).saturating_add(1),
            None => 0,
        };
        let state = self.state();
        let mut page = HitPage::default();
        let mut bytes = 0usize;
        let mut last = None;
        for ((_, sequence), (_, value)) in
            state.hits.range((invocation.to_string(), start)..=(invocation.to_string(), u64::MAX))
        {
            if page.rows.len() >= max_count || (!page.rows.is_empty() && bytes + value.len() > max_bytes) {
                page.next = last.map(|s| cursor(invocation, s));
                break;
            }
            bytes += value.len();
            last = Some(*sequence);
            page.rows.push(HitRow { sequence: Some(*sequence), value: value.clone() });
        }
        Ok(page)
    }

    fn cursor_after(&self, invocation: &str, sequence: u64) -> Vec<u8> {
        cursor(invocation, sequence)
    }

    fn is_cursor_of(&self, invocation: &str, cursor: &[u8]) -> bool {
        cursor.len() == invocation.len() + 8 && cursor.starts_with(invocation.as_bytes())
    }

    async fn purge(&self, before_nanos: u64) -> Result<Purged> {
        let mut state = self.state();
        let mut newest: HashMap<String, u64> = HashMap::new();
        for ((invocation, _), (at, _)) in &state.hits {
            let n = newest.entry(invocation.clone()).or_default();
            *n = (*n).max(*at);
        }
        let before = state.hits.len();
        state.hits.retain(|(invocation, _), _| newest[invocation] >= before_nanos);
        let invocations = newest.into_iter().filter(|(_, at)| *at < before_nanos).map(|(i, _)| i).collect();
        Ok(Purged { rows: before - state.hits.len(), invocations })
    }
}
