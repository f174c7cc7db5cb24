//! Embedded storage on RocksDB.
//!
//! Column families and record formats (docs/architecture.md has the rationale):
//!
//! | CF        | key                                   | value                                   |
//! |-----------|---------------------------------------|-----------------------------------------|
//! | `cas`     | [`Key`] (instance, function, hash, size) | [`BlobMeta`]: blob id, size, chunk size, stored-at |
//! | `chunks`  | blob id (u64 BE) + chunk index (u32 BE) | up to [`CHUNK_SIZE`] bytes of the blob |
//! | `ac`      | [`Key`] of the action digest          | `StoredActionEntry` (protobuf)          |
//! | `ac_history` | [`Key`] + stored-at (u64 ns BE)    | an earlier (or the current) `StoredActionEntry` |
//! | `pending` | blob id (u64 BE)                      | Unix seconds the upload started         |
//! | `audit`   | u16 len + invocation id + sequence (u64 BE) + answered-at (u64 ns BE) | a signed hit record: an encoded DSSE `Envelope` whose payload is a `HitRecord` |
//! | `audit` (before chaining) | u16 len + invocation id + answered-at (u64 ns BE) + u32 random | an unsigned `HitRecord` (protobuf), still listed |
//! | `meta`    | `format`                              | format version                          |
//! | `lru`, `atime`, `usage` | the access-time index and size counters ([`lru`]) | |
//!
//! A blob becomes visible only when its `cas` record is written, in one synced
//! batch after its chunks and after its digest was verified; chunks of uploads
//! that never complete are owned by a `pending` record and deleted on restart
//! or expiry. Blob ids are random, so concurrent writers of one digest never
//! share chunks: the first commit wins and the others delete theirs.
//!
//! Files by concern: `blobs` (records, chunks, uploads), `blob_store` (the
//! [`BlobStore`](super::BlobStore) implementation: writer, ranged reads),
//! `actions` (Action Cache entries and history), `hit_log`, `lru`
//! (accounting and eviction), `verified` (chunk hashes for ranged reads),
//! `open` (options, repair, checkpoints).
//!
//! Every inherent method blocks; the [`BlobStore`](super::BlobStore)
//! implementation runs them on the blocking pool, except the lookups RocksDB
//! can answer from memory, which run on the caller's thread.

mod action_store;
mod actions;
mod blob_store;
mod blobs;
mod hit_log;
mod lru;
mod open;
mod verified;

pub use blob_store::NO_WAL_THRESHOLD;
pub use blobs::BlobMeta;
pub use hit_log::{audit_cursor_after, audit_prefix, AuditRow};
pub use lru::{Evictions, Kind, Usage};
pub use verified::{chunk_hash, ChunkHash, VerifiedChunks, VerifiedStats};

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{DBWithThreadMode, ReadOptions, SingleThreaded, WriteOptions};

use super::{StoreError, StoreErrorKind};
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use lru::Lru;
/// Size of one stored chunk of a blob. Reads and writes move at most this much
/// at a time, which bounds the memory a large blob costs.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// Chunk values at least this large go to RocksDB blob files; smaller ones
/// stay in the table files (and the block cache).
pub const MIN_BLOB_FILE_VALUE: usize = 4096;

/// Memory for remembered chunk hashes until the server sets its limit.
const DEFAULT_VERIFIED_CHUNK_CACHE: u64 = 32 << 20;

/// On-disk format version, checked at open.
const FORMAT_VERSION: u32 = 1;

const CF_CAS: &str = "cas";
const CF_CHUNKS: &str = "chunks";
const CF_AC: &str = "ac";
const CF_AC_HISTORY: &str = "ac_history";
const CF_PENDING: &str = "pending";
const CF_AUDIT: &str = "audit";
const CF_META: &str = "meta";
const LOCK_STRIPES: usize = 256;

/// A storage key: instance, digest function, hash and size. The same shape
/// keys blobs (in `cas`) and actions (in `ac`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key(Vec<u8>);

impl Key {
    /// The key of `digest` in `instance`.
    pub fn new(instance: &InstanceName, digest: &Digest) -> Self {
        let name = instance.as_str().as_bytes();
        let mut k = Vec::with_capacity(2 + name.len() + 1 + 32 + 8);
        k.extend_from_slice(&(name.len() as u16).to_be_bytes());
        k.extend_from_slice(name);
        k.push(digest.function.storage_code());
        k.extend_from_slice(&digest.hash);
        k.extend_from_slice(&digest.size.to_be_bytes());
        Key(k)
    }

    /// Decodes a key back into its instance and digest (None if malformed).
    pub fn decode(bytes: &[u8]) -> Option<(InstanceName, Digest)> {
        let len = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?;
        let rest = bytes.get(2 + len..)?;
        if rest.len() != 1 + 32 + 8 {
            return None;
        }
        let function = DigestFunction::from_storage_code(rest[0])?;
        let hash: [u8; 32] = rest[1..33].try_into().ok()?;
        let size = u64::from_be_bytes(rest[33..41].try_into().ok()?);
        Some((InstanceName::parse(name).ok()?, Digest { function, hash, size }))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn stripe(&self) -> usize {
        // The hash is near the end; its first byte is uniformly distributed.
        self.0.len().checked_sub(40).map(|i| self.0[i]).unwrap_or(0) as usize % LOCK_STRIPES
    }
}

/// A raw key and value read from a column family.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Tuning knobs for [`RocksStore::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// fsync the WAL on every commit (the default; off only for benchmarks).
    pub sync: bool,
    /// Shared block cache size in bytes (`serve --block-cache`).
    pub block_cache_bytes: usize,
    /// Bound on stored bytes (blobs plus Action Cache values); least recently
    /// used records are evicted to stay under it. None: unbounded.
    pub max_size: Option<u64>,
    /// A record's recency is refreshed at most this often.
    pub touch_interval: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sync: true,
            block_cache_bytes: crate::config::DEFAULT_BLOCK_CACHE as usize,
            max_size: None,
            touch_interval: std::time::Duration::from_secs(60),
        }
    }
}

/// The RocksDB-backed store.
pub struct RocksStore {
    db: DBWithThreadMode<SingleThreaded>,
    locks: Vec<Mutex<()>>,
    sync: bool,
    lru: Lru,
    /// The last history time handed out (ns): history times are strictly
    /// increasing across the whole store, and above every stored one.
    history_clock: AtomicU64,
    /// Chunk hashes of blobs verified whole (see [`VerifiedChunks`]).
    verified: VerifiedChunks,
}

/// A page of rows and whether more follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The rows, in key order.
    pub rows: Vec<T>,
    /// Where the next page starts (a raw key or a history time), if any.
    pub next: Option<Vec<u8>>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page { rows: Vec::new(), next: None }
    }
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore").field("path", &self.db.path()).finish()
    }
}

/// Read options for reads that must not wait for the disk: RocksDB answers
/// from its memtables and block cache, or fails at once with `Incomplete`.
/// Hot lookups then run on the async worker without a hop to a blocking
/// thread (which costs more than the lookup itself).
fn memory_only() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.set_read_tier(rocksdb::ReadTier::BlockCache);
    o
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    u64::from_le_bytes(b)
}

impl RocksStore {
    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn write_opts(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(self.sync);
        w
    }

    fn lock(&self, key: &Key) -> MutexGuard<'_, ()> {
        self.locks[key.stripe()].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a blocking storage operation on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// RocksDB's failures in the backend-neutral shape. "No space" has no error
/// kind of its own in RocksDB (it is an I/O error), so it is recognised by its
/// message, here and nowhere else.
impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let message = e.to_string();
        let kind = if message.contains("No space left") || message.contains("NoSpace") {
            StoreErrorKind::NoSpace
        } else if e.kind() == rocksdb::ErrorKind::Corruption {
            StoreErrorKind::Corruption
        } else if e.kind() == rocksdb::ErrorKind::IOError
            && (message.contains("lock file") || message.contains("LOCK:"))
        {
            // RocksDB's words for a LOCK file another process holds (flock
            // refused) or this process holds already.
            StoreErrorKind::Locked
        } else {
            StoreErrorKind::Other
        };
        StoreError::new(kind, message)
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Storage(e.into())
    }
}

/// Helpers shared by the tests of this folder's files.
#[cfg(test)]
mod testing {
    use super::*;

    /// A fresh unsynced store in a temporary directory.
    pub fn store() -> (tempfile::TempDir, RocksStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        (dir, s)
    }

    /// The key of `data`'s SHA-256 digest in `instance`.
    pub fn key(data: &[u8], instance: &str) -> Key {
        Key::new(&InstanceName::parse(instance).unwrap(), &Digest::of(DigestFunction::Sha256, data))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::key;
    use super::*;

    #[test]
    fn a_rocksdb_corruption_error_keeps_its_corruption_kind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("CURRENT"), b"not a manifest name\n").unwrap();
        let e = StoreError::from(rocksdb::DB::open_default(dir.path()).unwrap_err());
        assert_eq!(e.kind(), StoreErrorKind::Corruption, "{e}");
    }

    #[test]
    fn a_store_already_held_open_is_refused_as_locked() {
        let (dir, _held) = super::testing::store();
        let err = match RocksStore::open(dir.path(), &StoreOptions::default()) {
            Err(Error::Storage(e)) => e,
            other => panic!("expected a storage error, got {:?}", other.map(|_| ())),
        };
        assert_eq!(err.kind(), StoreErrorKind::Locked, "{err}");
    }

    #[test]
    fn keys_round_trip_and_separate_instances() {
        let d = Digest::of(DigestFunction::Blake3, b"x");
        let i = InstanceName::parse("a/b").unwrap();
        assert_eq!(Key::decode(Key::new(&i, &d).as_bytes()), Some((i, d)));
        assert_ne!(key(b"x", "a"), key(b"x", "b"));
    }
}

/// The most write-ahead log RocksDB keeps: an eighth of `--max-size`, at
/// least 16 MiB (one chunk-family memtable and a margin), at most 256 MiB.
pub fn wal_bound(max_size: Option<u64>) -> u64 {
    max_size.map_or(WAL_MAX, |m| (m / 8).clamp(WAL_MIN, WAL_MAX))
}

const WAL_MIN: u64 = 16 << 20;
const WAL_MAX: u64 = 256 << 20;
/// Each of RocksDB's five kept info logs is rotated at this size.
const LOG_FILE_BYTES: usize = 1 << 20;

/// How far the data directory may exceed `--max-size` once writes settle:
/// the WAL bound, evicted blobs awaiting collection in their blob files (a
/// quarter of the bound, at least a memtable's worth), and 16 MiB for
/// RocksDB's own files (manifest, options, info logs, small tables).
/// Documented in docs/storage.md; checked by tests/it/eviction.rs.
pub fn disk_overhead(max_size: u64) -> u64 {
    wal_bound(Some(max_size)) + (max_size / 4).max(16 << 20) + (16 << 20)
}
