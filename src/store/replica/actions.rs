//! [`CachedActions`]: a short-lived memory cache of current Action Cache
//! entries in front of the remote, which also stands in for the remote
//! while it is unreachable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::stats::{is_unavailable, ReplicaStats};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::clock::Clock;
use crate::error::Result;
use crate::store::action_store::{ActionStore, HistoryPage, Version};

/// An action, as the cache keys it.
type ActionKey = (InstanceName, Digest);

/// An [`ActionStore`] whose source of truth is `remote`, with the current
/// entries this replica read or wrote kept in memory (bounded by bytes, the
/// least recently fetched evicted first).
///
/// Staleness: an entry fetched or written less than `ttl` ago is answered
/// from memory, so an entry replaced through another replica is seen here at
/// most `ttl` later (REAPI allows any valid result; the domain verifies
/// every entry it is given, so a cached one is never trusted more than a
/// fresh one). Misses are not cached: a result uploaded through another
/// replica is visible here at once, which is what a build that just ran the
/// action on another replica needs; the price is one remote read per miss.
///
/// Stale-if-error: while the remote is unavailable, a cached entry of any
/// age is served (counted, logged once per outage); staleness is then
/// bounded by the outage. Without one the remote's error is the answer.
///
/// `ttl` zero answers every read from the remote, but the last entries seen
/// are still kept (within the byte bound) for stale-if-error; a `max_bytes`
/// of zero keeps nothing at all.
#[derive(Debug)]
pub struct CachedActions {
    remote: Arc<dyn ActionStore>,
    ttl: Duration,
    max_bytes: usize,
    clock: ClockDebug,
    stats: Arc<ReplicaStats>,
    cache: Mutex<Entries>,
}

/// The injected clock (a closure has no `Debug` of its own).
struct ClockDebug(Clock);

impl std::fmt::Debug for ClockDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// The cached entries and their fetch order.
#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<ActionKey, Cached>,
    /// Fetch sequence → key, oldest first: what eviction removes.
    order: BTreeMap<u64, ActionKey>,
    bytes: usize,
    next_seq: u64,
}

/// One cached entry: its bytes, when it was fetched, its place in `order`.
#[derive(Debug)]
struct Cached {
    entry: Vec<u8>,
    fetched_at: SystemTime,
    seq: u64,
}

impl Entries {
    fn remove(&mut self, key: &ActionKey) {
        if let Some(old) = self.by_key.remove(key) {
            self.order.remove(&old.seq);
            self.bytes -= old.entry.len();
        }
    }

    /// Caches `entry` as fetched at `now`, evicting the oldest entries to
    /// stay within `max_bytes` (an entry larger than that is not kept).
    fn insert(&mut self, key: ActionKey, entry: Vec<u8>, now: SystemTime, max_bytes: usize) {
        self.remove(&key);
        if entry.len() > max_bytes {
            return;
        }
        while self.bytes + entry.len() > max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(old) = self.by_key.remove(&oldest) {
                self.bytes -= old.entry.len();
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += entry.len();
        self.order.insert(seq, key.clone());
        self.by_key.insert(key, Cached { entry, fetched_at: now, seq });
    }
}

impl CachedActions {
    /// A TTL for deployments that do not choose one: short enough that a
    /// result replaced through another replica is seen within seconds, long
    /// enough to absorb a build asking for the same action repeatedly.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    /// A memory bound for deployments that do not choose one: entries are a
    /// few KiB, so this holds tens of thousands of them.
    pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

    /// A replica's Action Cache store: entries of `remote` kept up to
    /// `max_bytes` in memory and answered from there for `ttl`; `clock` is
    /// the time source (tests move it); counts go to `stats`.
    pub fn new(
        remote: Arc<dyn ActionStore>,
        ttl: Duration,
        max_bytes: usize,
        clock: Clock,
        stats: Arc<ReplicaStats>,
    ) -> Self {
        CachedActions { remote, ttl, max_bytes, clock: ClockDebug(clock), stats, cache: Mutex::default() }
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> SystemTime {
        (self.clock.0)()
    }

    /// The cached entry of `key` if it was fetched less than `ttl` ago.
    fn fresh(&self, key: &ActionKey) -> Option<Vec<u8>> {
        let now = self.now();
        let entries = self.entries();
        let cached = entries.by_key.get(key)?;
        // A clock that went backwards makes the entry look new: bounded by
        // the jump, and the domain verifies the entry regardless.
        let age = now.duration_since(cached.fetched_at).unwrap_or_default();
        (age < self.ttl).then(|| cached.entry.clone())
    }

    /// The cached entry of `key`, however old.
    fn any_age(&self, key: &ActionKey) -> Option<Vec<u8>> {
        self.entries().by_key.get(key).map(|c| c.entry.clone())
    }

    fn remember(&self, key: ActionKey, entry: Vec<u8>) {
        let now = self.now();
        self.entries().insert(key, entry, now, self.max_bytes);
    }
}

#[async_trait]
impl ActionStore for CachedActions {
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>> {
        let key = (instance.clone(), *action);
        if let Some(entry) = self.fresh(&key) {
            self.stats.ac_cache_hit();
            return Ok(Some(entry));
        }
        self.stats.ac_remote_read();
        match self.remote.get(instance, action).await {
            Ok(Some(entry)) => {
                self.stats.remote_answered();
                self.remember(key, entry.clone());
                Ok(Some(entry))
            }
            Ok(None) => {
                self.stats.remote_answered();
                self.entries().remove(&key);
                Ok(None)
            }
            Err(error) if is_unavailable(&error) => match self.any_age(&key) {
                Some(entry) => {
                    self.stats.served_while_unavailable(&error);
                    Ok(Some(entry))
                }
                None => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    /// The remote first (the entry is durable there before this returns),
    /// then the cache; a failed write caches nothing.
    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64> {
        let at = self.remote.put(instance, action, entry.clone(), stored_at_nanos).await?;
        self.remember((instance.clone(), *action), entry);
        Ok(at)
    }

    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>> {
        self.remote.history(instance, action).await
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
        self.remote.history_page(instance, action, from_nanos, max_count, max_bytes, must_progress).await
    }

    async fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        self.remote.purge_history(before_nanos).await
    }

    fn touch(&self, instance: &InstanceName, action: &Digest) {
        self.remote.touch(instance, action)
    }
}
