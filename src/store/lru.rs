//! Size accounting and least-recently-used eviction.
//!
//! Three column families sit beside the original ones, whose records are
//! unchanged:
//!
//! | CF      | key                                          | value                                  |
//! |---------|----------------------------------------------|----------------------------------------|
//! | `lru`   | access time (u64 ms BE) + [`Kind`] (u8) + [`Key`] | size (u64 BE)                     |
//! | `atime` | [`Kind`] (u8) + [`Key`]                      | access time (u64 ms BE) + size (u64 BE) |
//! | `usage` | counter name                                 | i64 LE, summed by a merge operator     |
//!
//! Every write that adds, replaces or removes a blob or an Action Cache entry
//! updates its `atime` and `lru` records and the `usage` counters in the same
//! batch, under the key's stripe lock, so the index never disagrees with the
//! data, even after a crash. Restoring the totals at start is four point reads.
//!
//! Reads refresh recency coarsely: a lossy in-memory filter lets at most one
//! refresh per key and [`StoreOptions::touch_interval`](super::StoreOptions)
//! through to a queue, which the eviction task writes in small unsynced
//! batches off the request path.

use std::hash::{BuildHasher, Hasher as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use rocksdb::{MergeOperands, WriteBatch};

use super::{Key, Store, CF_AC, CF_CAS, CF_CHUNKS};
use crate::error::{Error, Result};

pub(super) const CF_LRU: &str = "lru";
pub(super) const CF_ATIME: &str = "atime";
pub(super) const CF_USAGE: &str = "usage";

/// The `usage` key marking that the index covers every record.
const INDEXED: &[u8] = b"indexed";
const BLOB_BYTES: &[u8] = b"blob_bytes";
const BLOBS: &[u8] = b"blobs";
const ACTION_BYTES: &[u8] = b"action_bytes";
const ACTIONS: &[u8] = b"actions";

/// Slots of the recency filter (8 bytes each).
const FILTER_SLOTS: usize = 1 << 20;
/// Refreshes waiting to be written beyond this are dropped (they are advisory).
const MAX_QUEUED_TOUCHES: usize = 1 << 20;
/// Eviction stops at this fraction of the limit, so it runs in bursts rather
/// than after every write.
const LOW_WATERMARK: f64 = 0.95;

/// What an index entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A CAS blob (its size: the blob's bytes).
    Blob,
    /// An Action Cache entry (its size: the stored value's bytes).
    Action,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Blob => 0,
            Kind::Action => 1,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Kind::Blob),
            1 => Some(Kind::Action),
            _ => None,
        }
    }
}

/// When a record was last used, and its accounted size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Access {
    pub at_ms: u64,
    pub size: u64,
}

impl Access {
    fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.at_ms.to_be_bytes());
        v[8..].copy_from_slice(&self.size.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let v: &[u8; 16] = v.try_into().ok()?;
        Some(Access {
            at_ms: u64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
            size: u64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
        })
    }
}

fn atime_key(kind: Kind, key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.as_bytes().len());
    k.push(kind.code());
    k.extend_from_slice(key.as_bytes());
    k
}

fn lru_key(at_ms: u64, kind: Kind, key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.as_bytes().len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.push(kind.code());
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode_lru_key(k: &[u8]) -> Option<(u64, Kind, Key)> {
    let at = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let kind = Kind::from_code(*k.get(8)?)?;
    let key = k.get(9..)?;
    Key::decode(key)?;
    Some((at, kind, Key(key.to_vec())))
}

/// The `usage` merge operator: counters are i64 LE deltas that add up.
pub(super) fn add_i64(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let decode = |v: &[u8]| v.try_into().map(i64::from_le_bytes).unwrap_or(0);
    let sum = operands.iter().fold(existing.map(decode).unwrap_or(0), |acc, op| acc.wrapping_add(decode(op)));
    Some(sum.to_le_bytes().to_vec())
}

/// An item of an indexing scan; None where a damaged block ends the scan
/// (the records behind it stay unaccounted, and so never evicted, until they
/// are deleted; reads of them fail with DATA_LOSS anyway).
type Item = (Box<[u8]>, Box<[u8]>);
pub(super) fn readable(item: std::result::Result<Item, rocksdb::Error>) -> Result<Option<Item>> {
    match item {
        Ok(kv) => Ok(Some(kv)),
        Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
            tracing::error!(error = %e, "a damaged block ends the indexing scan; records behind it are not accounted");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Stored bytes and records, as accounted by the index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of stored blobs.
    pub blob_bytes: u64,
    /// Stored blobs.
    pub blobs: u64,
    /// Bytes of stored Action Cache values.
    pub action_bytes: u64,
    /// Stored Action Cache entries.
    pub actions: u64,
}

impl Usage {
    /// What `--max-size` bounds: blob bytes plus Action Cache bytes.
    pub fn total_bytes(&self) -> u64 {
        self.blob_bytes + self.action_bytes
    }
}

/// What eviction removed since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evictions {
    /// Blobs evicted.
    pub blobs: u64,
    /// Action Cache entries evicted.
    pub actions: u64,
    /// Accounted bytes evicted.
    pub bytes: u64,
}

/// A change of the counters, applied in memory once its batch is written.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Delta {
    blob_bytes: i64,
    blobs: i64,
    action_bytes: i64,
    actions: i64,
}

impl Delta {
    fn add(&mut self, kind: Kind, bytes: i64, records: i64) {
        match kind {
            Kind::Blob => {
                self.blob_bytes += bytes;
                self.blobs += records;
            }
            Kind::Action => {
                self.action_bytes += bytes;
                self.actions += records;
            }
        }
    }

    fn grows(&self) -> bool {
        self.blob_bytes + self.action_bytes > 0
    }
}

/// The in-memory side: counters mirrored from `usage`, the recency filter,
/// queued refreshes and eviction statistics.
pub(super) struct Lru {
    blob_bytes: AtomicI64,
    blobs: AtomicI64,
    action_bytes: AtomicI64,
    actions: AtomicI64,
    evicted_blobs: AtomicU64,
    evicted_actions: AtomicU64,
    evicted_bytes: AtomicU64,
    filter: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    /// Uses waiting to be written: (kind, key, when).
    queue: Mutex<Vec<(Kind, Key, u64)>>,
    /// Where the last eviction stopped: older `lru` keys are deleted, so the
    /// next one seeks past their tombstones.
    cursor: Mutex<Vec<u8>>,
    touch_interval_ms: u64,
    max_size: Option<u64>,
    over_limit: tokio::sync::Notify,
}

impl Lru {
    pub(super) fn new(touch_interval: std::time::Duration, max_size: Option<u64>) -> Self {
        Lru {
            blob_bytes: AtomicI64::new(0),
            blobs: AtomicI64::new(0),
            action_bytes: AtomicI64::new(0),
            actions: AtomicI64::new(0),
            evicted_blobs: AtomicU64::new(0),
            evicted_actions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            filter: (0..FILTER_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
            queue: Mutex::new(Vec::new()),
            cursor: Mutex::new(Vec::new()),
            touch_interval_ms: touch_interval.as_millis() as u64,
            max_size,
            over_limit: tokio::sync::Notify::new(),
        }
    }

    /// Whether a use of `key` now should refresh its recency: false when the
    /// filter saw it within the touch interval. Lossy: a collision causes an
    /// extra refresh, never a missed one.
    fn due(&self, kind: Kind, key: &Key, now_ms: u64) -> bool {
        let mut h = self.hasher.build_hasher();
        h.write_u8(kind.code());
        h.write(key.as_bytes());
        let h = h.finish();
        let slot = &self.filter[h as usize % FILTER_SLOTS];
        let fingerprint = h >> 32;
        let now = (now_ms / 1000) as u32 as u64;
        let seen = slot.load(Ordering::Relaxed);
        if seen >> 32 == fingerprint
            && now.saturating_sub(seen & 0xffff_ffff).saturating_mul(1000) < self.touch_interval_ms
        {
            return false;
        }
        slot.store((fingerprint << 32) | now, Ordering::Relaxed);
        true
    }
}

impl Store {
    /// Stored bytes and records.
    pub fn usage(&self) -> Usage {
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
        let l = &self.lru;
        Usage {
            blob_bytes: get(&l.blob_bytes),
            blobs: get(&l.blobs),
            action_bytes: get(&l.action_bytes),
            actions: get(&l.actions),
        }
    }

    /// What eviction removed since the store was opened.
    pub fn evictions(&self) -> Evictions {
        let l = &self.lru;
        Evictions {
            blobs: l.evicted_blobs.load(Ordering::Relaxed),
            actions: l.evicted_actions.load(Ordering::Relaxed),
            bytes: l.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// The size bound, if any.
    pub fn max_size(&self) -> Option<u64> {
        self.lru.max_size
    }

    /// Whether stored bytes exceed the bound.
    pub fn over_limit(&self) -> bool {
        self.lru.max_size.is_some_and(|max| self.usage().total_bytes() > max)
    }

    /// Notified when a write takes the store over its bound.
    pub fn over_limit_notify(&self) -> &tokio::sync::Notify {
        &self.lru.over_limit
    }

    /// Refuses a blob that could never fit under the bound (RESOURCE_EXHAUSTED).
    pub fn check_fits(&self, size: u64) -> Result<()> {
        match self.lru.max_size {
            Some(max) if size > max => Err(Error::ResourceExhausted(format!(
                "a {size}-byte blob is larger than this cache's whole {max}-byte capacity"
            ))),
            _ => Ok(()),
        }
    }

    /// Marks a record as used now. Cheap and non-blocking: at most one refresh
    /// per key and touch interval is queued; [`Store::apply_touches`] writes them.
    pub fn touch(&self, kind: Kind, key: &Key) {
        let now = now_ms();
        if !self.lru.due(kind, key, now) {
            return;
        }
        let mut q = self.lru.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() < MAX_QUEUED_TOUCHES {
            q.push((kind, key.clone(), now));
        }
    }

    pub(super) fn access(&self, kind: Kind, key: &Key) -> Result<Option<Access>> {
        Ok(self.db.get_pinned_cf(self.cf(CF_ATIME), atime_key(kind, key))?.and_then(|v| Access::decode(&v)))
    }

    /// Stages, in `batch`, the index change of a record going from `old` to
    /// `new` (either may be absent). The caller holds the key's stripe lock
    /// and applies the returned delta with [`Store::applied`] once the batch
    /// is written.
    pub(super) fn stage(
        &self,
        batch: &mut WriteBatch,
        kind: Kind,
        key: &Key,
        old: Option<Access>,
        new: Option<Access>,
    ) -> Delta {
        let (lru, atime, usage) = (self.cf(CF_LRU), self.cf(CF_ATIME), self.cf(CF_USAGE));
        let mut delta = Delta::default();
        if let Some(o) = old {
            batch.delete_cf(lru, lru_key(o.at_ms, kind, key));
            delta.add(kind, -(o.size as i64), -1);
        }
        match new {
            Some(n) => {
                batch.put_cf(lru, lru_key(n.at_ms, kind, key), n.size.to_be_bytes());
                batch.put_cf(atime, atime_key(kind, key), n.encode());
                delta.add(kind, n.size as i64, 1);
            }
            None => batch.delete_cf(atime, atime_key(kind, key)),
        }
        for (name, v) in [
            (BLOB_BYTES, delta.blob_bytes),
            (BLOBS, delta.blobs),
            (ACTION_BYTES, delta.action_bytes),
            (ACTIONS, delta.actions),
        ] {
            if v != 0 {
                batch.merge_cf(usage, name, v.to_le_bytes());
            }
        }
        delta
    }

    /// Applies a written batch's delta to the in-memory counters.
    pub(super) fn applied(&self, d: Delta) {
        let l = &self.lru;
        l.blob_bytes.fetch_add(d.blob_bytes, Ordering::Relaxed);
        l.blobs.fetch_add(d.blobs, Ordering::Relaxed);
        l.action_bytes.fetch_add(d.action_bytes, Ordering::Relaxed);
        l.actions.fetch_add(d.actions, Ordering::Relaxed);
        if d.grows() && self.over_limit() {
            l.over_limit.notify_one();
        }
    }

    /// Loads the counters at open; on a data directory written before the
    /// index existed, builds the index from the records first.
    pub(super) fn load_usage(&self) -> Result<()> {
        let usage = self.cf(CF_USAGE);
        if self.db.get_pinned_cf(usage, INDEXED)?.is_none() {
            self.build_index()?;
        }
        let read = |name: &[u8]| -> Result<i64> {
            Ok(self
                .db
                .get_pinned_cf(usage, name)?
                .and_then(|v| v.as_ref().try_into().ok())
                .map(i64::from_le_bytes)
                .unwrap_or(0))
        };
        let l = &self.lru;
        l.blob_bytes.store(read(BLOB_BYTES)?, Ordering::Relaxed);
        l.blobs.store(read(BLOBS)?, Ordering::Relaxed);
        l.action_bytes.store(read(ACTION_BYTES)?, Ordering::Relaxed);
        l.actions.store(read(ACTIONS)?, Ordering::Relaxed);
        Ok(())
    }

    /// Indexes every blob and Action Cache entry (their access time: when
    /// they were stored), then marks the index complete. Runs once, at the
    /// first open by a version with the index.
    fn build_index(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let (lru, atime, usage) = (self.cf(CF_LRU), self.cf(CF_ATIME), self.cf(CF_USAGE));
        let mut totals = Delta::default();
        let mut batch = WriteBatch::default();
        let flush = |batch: &mut WriteBatch, force: bool| -> Result<()> {
            if batch.len() >= 30_000 || (force && !batch.is_empty()) {
                self.db.write(std::mem::take(batch))?;
            }
            Ok(())
        };
        for item in self.db.iterator_cf(self.cf(CF_CAS), rocksdb::IteratorMode::Start) {
            let Some((k, v)) = readable(item)? else { break };
            let meta = super::BlobMeta::decode(&v)?;
            let key = Key(k.to_vec());
            let a = Access { at_ms: meta.stored_at * 1000, size: meta.size };
            batch.put_cf(lru, lru_key(a.at_ms, Kind::Blob, &key), a.size.to_be_bytes());
            batch.put_cf(atime, atime_key(Kind::Blob, &key), a.encode());
            totals.add(Kind::Blob, a.size as i64, 1);
            flush(&mut batch, false)?;
        }
        for item in self.db.iterator_cf(self.cf(CF_AC), rocksdb::IteratorMode::Start) {
            let Some((k, v)) = readable(item)? else { break };
            let key = Key(k.to_vec());
            let stored_at = <crate::proto::prov::storage::StoredActionEntry as prost::Message>::decode(&v[..])
                .map(|e| e.stored_at_unix.max(0) as u64)
                .unwrap_or_else(|_| super::unix_now());
            let a = Access { at_ms: stored_at * 1000, size: v.len() as u64 };
            batch.put_cf(lru, lru_key(a.at_ms, Kind::Action, &key), a.size.to_be_bytes());
            batch.put_cf(atime, atime_key(Kind::Action, &key), a.encode());
            totals.add(Kind::Action, a.size as i64, 1);
            flush(&mut batch, false)?;
        }
        flush(&mut batch, true)?;
        let mut last = WriteBatch::default();
        for (name, v) in [
            (BLOB_BYTES, totals.blob_bytes),
            (BLOBS, totals.blobs),
            (ACTION_BYTES, totals.action_bytes),
            (ACTIONS, totals.actions),
        ] {
            last.put_cf(usage, name, v.to_le_bytes());
        }
        last.put_cf(usage, INDEXED, [1]);
        self.db.write_opt(last, &self.write_opts())?;
        if totals.blobs + totals.actions > 0 {
            tracing::info!(
                blobs = totals.blobs,
                actions = totals.actions,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "built the access-time index of an existing data directory"
            );
        }
        Ok(())
    }

    /// Writes the queued recency refreshes; returns how many records moved.
    pub fn apply_touches(&self) -> Result<usize> {
        let mut queue = std::mem::take(&mut *self.lru.queue.lock().unwrap_or_else(|p| p.into_inner()));
        if queue.is_empty() {
            return Ok(0);
        }
        queue.sort_by_key(|(_, k, _)| k.stripe());
        let mut moved = 0;
        // One lock and one unsynced batch per stripe: recency is advisory,
        // and holding the lock until the write keeps eviction from racing it.
        for group in queue.chunk_by(|a, b| a.1.stripe() == b.1.stripe()) {
            let _guard = self.lock(&group[0].1);
            let mut batch = WriteBatch::default();
            let mut seen = std::collections::HashSet::new();
            for (kind, key, at) in group.iter().rev() {
                // The latest use of a key wins (later entries are newer).
                if !seen.insert((*kind, key)) {
                    continue;
                }
                let Some(old) = self.access(*kind, key)? else { continue };
                if *at < old.at_ms.saturating_add(self.lru.touch_interval_ms.max(1)) {
                    continue;
                }
                let new = Access { at_ms: *at, size: old.size };
                self.stage(&mut batch, *kind, key, Some(old), Some(new));
                moved += 1;
            }
            if !batch.is_empty() {
                self.db.write(batch)?;
            }
        }
        Ok(moved)
    }

    /// Evicts least recently used records until stored bytes are under the
    /// low watermark of the bound. Takes one stripe lock at a time, briefly,
    /// so requests never wait for a whole eviction run.
    pub fn evict(&self) -> Result<Evictions> {
        let Some(max) = self.lru.max_size else { return Ok(Evictions::default()) };
        let target = (max as f64 * LOW_WATERMARK) as u64;
        let mut done = Evictions::default();
        if self.usage().total_bytes() <= target {
            return Ok(done);
        }
        let start = self.lru.cursor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let from_cursor = self.evict_from(&start, target, &mut done)?;
        // Clocks can step back: anything older than the cursor is next.
        if !from_cursor && !start.is_empty() && self.usage().total_bytes() > target {
            self.evict_from(&[], target, &mut done)?;
        }
        let l = &self.lru;
        l.evicted_blobs.fetch_add(done.blobs, Ordering::Relaxed);
        l.evicted_actions.fetch_add(done.actions, Ordering::Relaxed);
        l.evicted_bytes.fetch_add(done.bytes, Ordering::Relaxed);
        Ok(done)
    }

    /// Evicts from the `lru` key `start` on; true when it reached the target.
    fn evict_from(&self, start: &[u8], target: u64, done: &mut Evictions) -> Result<bool> {
        let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_LRU), mode) {
            if self.usage().total_bytes() <= target {
                return Ok(true);
            }
            let (k, _) = item?;
            *self.lru.cursor.lock().unwrap_or_else(|p| p.into_inner()) = k.to_vec();
            let Some((at, kind, key)) = decode_lru_key(&k) else {
                self.db.delete_cf(self.cf(CF_LRU), &k)?;
                continue;
            };
            let _guard = self.lock(&key);
            let mut batch = WriteBatch::default();
            match self.access(kind, &key)? {
                Some(access) if access.at_ms == at => {
                    match kind {
                        Kind::Blob => {
                            if let Some(meta) = self.blob_meta(&key)? {
                                batch.delete_cf(self.cf(CF_CAS), key.as_bytes());
                                let chunks = self.cf(CF_CHUNKS);
                                for i in 0..meta.chunks() {
                                    batch.delete_cf(chunks, super::chunk_key(meta.blob_id, i));
                                }
                            }
                            done.blobs += 1;
                        }
                        Kind::Action => {
                            batch.delete_cf(self.cf(CF_AC), key.as_bytes());
                            done.actions += 1;
                        }
                    }
                    done.bytes += access.size;
                    let delta = self.stage(&mut batch, kind, &key, Some(access), None);
                    self.db.write(batch)?;
                    self.applied(delta);
                }
                // Refreshed since the iterator's snapshot: its newer entry stays.
                _ => {
                    batch.delete_cf(self.cf(CF_LRU), &k);
                    self.db.write(batch)?;
                }
            }
        }
        Ok(self.usage().total_bytes() <= target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::digest::{Digest, DigestFunction};
    use crate::cache::resource::InstanceName;
    use crate::store::StoreOptions;
    use std::time::Duration;

    fn open(dir: &std::path::Path, max_size: Option<u64>) -> Store {
        let opts = StoreOptions { sync: false, max_size, touch_interval: Duration::ZERO, ..Default::default() };
        Store::open(dir, &opts).unwrap()
    }

    fn blob(i: u32, len: usize) -> (Key, Vec<u8>) {
        let data: Vec<u8> = std::iter::repeat_n(i.to_le_bytes(), len / 4 + 1).flatten().take(len).collect();
        let key = Key::new(&InstanceName::parse("").unwrap(), &Digest::of(DigestFunction::Sha256, &data));
        (key, data)
    }

    fn present(s: &Store, keys: &[Key]) -> Vec<bool> {
        s.contains(keys).unwrap()
    }

    #[test]
    fn accounting_follows_writes_replacements_deletes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), None);
        let (k1, d1) = blob(1, 3000);
        let (k2, d2) = blob(2, 5000);
        assert!(s.put_blob(&k1, &d1).unwrap());
        assert!(!s.put_blob(&k1, &d1).unwrap(), "a second put counts nothing");
        let id = s.begin_upload().unwrap();
        s.write_chunk(id, 0, &d2, true).unwrap();
        s.commit_upload(&k2, id, 5000, false).unwrap();
        s.ac_put(&k1, &[7; 100], 1).unwrap();
        s.ac_put(&k1, &[7; 40], 2).unwrap();
        let want = Usage { blob_bytes: 8000, blobs: 2, action_bytes: 40, actions: 1 };
        assert_eq!(s.usage(), want);
        drop(s);
        let s = open(dir.path(), None);
        assert_eq!(s.usage(), want, "restored at open");
        s.delete_blob(&k2).unwrap();
        assert_eq!(s.usage(), Usage { blob_bytes: 3000, blobs: 1, ..want });
    }

    #[test]
    fn evicts_least_recently_used_first_and_a_touch_saves_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Some(10_240));
        let blobs: Vec<(Key, Vec<u8>)> = (0..13).map(|i| blob(i, 1000)).collect();
        let keys: Vec<Key> = blobs.iter().map(|(k, _)| k.clone()).collect();
        for (k, d) in &blobs[..10] {
            s.put_blob(k, d).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        s.ac_put(&keys[0], &[1; 200], 1).unwrap();
        assert!(!s.over_limit());
        s.touch(Kind::Blob, &keys[0]);
        assert_eq!(s.apply_touches().unwrap(), 1);
        for (k, d) in &blobs[10..] {
            std::thread::sleep(Duration::from_millis(2));
            s.put_blob(k, d).unwrap();
        }
        assert!(s.over_limit());
        let e = s.evict().unwrap();
        assert!(s.usage().total_bytes() <= (10_240.0 * LOW_WATERMARK) as u64, "{:?}", s.usage());
        assert_eq!(e, Evictions { blobs: 4, actions: 0, bytes: 4000 });
        assert_eq!(s.evictions(), e);
        let p = present(&s, &keys);
        assert_eq!(p, [true, false, false, false, false, true, true, true, true, true, true, true, true], "{p:?}");
        assert!(s.ac_get(&keys[0]).unwrap().is_some(), "the newer Action Cache entry stays");
        // Evicted chunks are gone too.
        let meta_gone = s.blob_meta(&keys[1]).unwrap();
        assert!(meta_gone.is_none());
        drop(s);
        let s = open(dir.path(), Some(10_240));
        assert_eq!(s.usage(), Usage { blob_bytes: 9000, blobs: 9, action_bytes: 200, actions: 1 });
    }

    #[test]
    fn evicts_action_cache_entries_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Some(1000));
        let keys: Vec<Key> = (0..10).map(|i| blob(i, 1).0).collect();
        for k in &keys {
            s.ac_put(k, &[0; 150], 1).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        s.evict().unwrap();
        let kept: Vec<bool> = keys.iter().map(|k| s.ac_get(k).unwrap().is_some()).collect();
        assert_eq!(kept, [false, false, false, false, true, true, true, true, true, true]);
        assert_eq!(s.usage().actions, 6);
    }

    #[test]
    fn oversized_blobs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), Some(100));
        let (k, d) = blob(1, 101);
        assert!(matches!(s.put_blob(&k, &d), Err(Error::ResourceExhausted(_))));
        assert_eq!(s.usage(), Usage::default());
    }

    #[test]
    fn an_existing_data_directory_is_indexed_at_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), None);
        let (k1, d1) = blob(1, 3000);
        s.put_blob(&k1, &d1).unwrap();
        s.ac_put(&k1, &[1; 10], 1).unwrap();
        // Forget the index, as a data directory written before it existed.
        for cf in [CF_LRU, CF_ATIME, CF_USAGE] {
            let keys: Vec<Box<[u8]>> =
                s.db.iterator_cf(s.cf(cf), rocksdb::IteratorMode::Start).map(|r| r.unwrap().0).collect();
            for k in keys {
                s.db.delete_cf(s.cf(cf), k).unwrap();
            }
        }
        drop(s);
        let s = open(dir.path(), Some(3005));
        assert_eq!(s.usage(), Usage { blob_bytes: 3000, blobs: 1, action_bytes: 10, actions: 1 });
        assert!(s.over_limit());
        s.evict().unwrap();
        assert_eq!(s.usage().blobs + s.usage().actions, 1, "the indexed records are evictable");
    }
}
