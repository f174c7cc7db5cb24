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
//! Every method blocks; async callers run them on the blocking pool.

mod lru;
mod verified;

pub use lru::{Evictions, Kind, Usage};
pub use verified::{chunk_hash, ChunkHash, VerifiedChunks, VerifiedStats};

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, DBWithThreadMode, Options, ReadOptions,
    SingleThreaded, WriteBatch, WriteOptions,
};

use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use lru::{Access, Lru, CF_ATIME, CF_LRU, CF_USAGE};

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
/// Chain heads kept in memory (invocations being appended to); beyond it,
/// idle ones are dropped and re-read from the store when needed.
const MAX_AUDIT_CHAINS: usize = 4096;
/// Key suffix (after the invocation prefix) of a chained hit record:
/// sequence + answered-at.
const AUDIT_CHAINED_SUFFIX: usize = 16;
/// Key suffix of a hit record written before chaining: answered-at + random.
const AUDIT_LEGACY_SUFFIX: usize = 12;

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

/// Where a stored blob's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    /// The chunks' owner id.
    pub blob_id: u64,
    /// Blob size in bytes.
    pub size: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// Unix seconds the blob was committed.
    pub stored_at: u64,
}

impl BlobMeta {
    const ENCODED_LEN: usize = 1 + 8 + 8 + 4 + 8;

    fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut v = [0u8; Self::ENCODED_LEN];
        v[0] = 1;
        v[1..9].copy_from_slice(&self.blob_id.to_be_bytes());
        v[9..17].copy_from_slice(&self.size.to_be_bytes());
        v[17..21].copy_from_slice(&self.chunk_size.to_be_bytes());
        v[21..29].copy_from_slice(&self.stored_at.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<Self> {
        if v.len() != Self::ENCODED_LEN || v[0] != 1 {
            return Err(Error::DataLoss(format!("corrupt blob record ({} bytes)", v.len())));
        }
        let meta = BlobMeta {
            blob_id: u64::from_be_bytes(v[1..9].try_into().expect("8 bytes")),
            size: u64::from_be_bytes(v[9..17].try_into().expect("8 bytes")),
            chunk_size: u32::from_be_bytes(v[17..21].try_into().expect("4 bytes")),
            stored_at: u64::from_be_bytes(v[21..29].try_into().expect("8 bytes")),
        };
        if meta.chunk_size == 0 {
            return Err(Error::DataLoss("corrupt blob record (chunk size 0)".into()));
        }
        Ok(meta)
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u32 {
        self.size.div_ceil(self.chunk_size as u64) as u32
    }
}

/// Tuning knobs for [`Store::open`].
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
pub struct Store {
    db: DBWithThreadMode<SingleThreaded>,
    locks: Vec<Mutex<()>>,
    sync: bool,
    lru: Lru,
    /// The last history time handed out (ns): history times are strictly
    /// increasing across the whole store, and above every stored one.
    history_clock: AtomicU64,
    /// Chunk hashes of blobs verified whole (see [`VerifiedChunks`]).
    verified: VerifiedChunks,
    /// Per-invocation hit-log chain heads (bounded, see [`Store::audit_chain`]).
    audit_chains: Mutex<HashMap<String, AuditChain>>,
}

/// The head of one invocation's hit-log chain, as the appender needs it:
/// `None` until loaded from the store. Its mutex serialises the appends of
/// one invocation, so sequences have no gaps and each record names its
/// predecessor's hash.
pub type AuditChain = Arc<Mutex<Option<AuditChainHead>>>;

/// Where an invocation's hit-log chain stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditChainHead {
    /// The sequence the next record gets (1 for a new invocation).
    pub next_sequence: u64,
    /// SHA-256 of the last record's signed payload (empty before the first).
    pub previous_sha256: Vec<u8>,
    /// Records written per reader principal (for the per-principal cap).
    pub records_by_principal: HashMap<String, u64>,
}

/// One stored hit-log row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// The raw key (a page token points after it).
    pub key: Box<[u8]>,
    /// The chain sequence; `None` for a record written before chaining
    /// (its value is then an unsigned `HitRecord`, not an envelope).
    pub sequence: Option<u64>,
    /// The stored value.
    pub value: Box<[u8]>,
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

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.db.path()).finish()
    }
}

fn chunk_key(blob_id: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&blob_id.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The key prefix of an invocation's hit-log rows (u16 length + id): every
/// row of the invocation, and only those, starts with it.
pub fn audit_prefix(invocation: &str) -> Vec<u8> {
    let id = &invocation.as_bytes()[..invocation.len().min(u16::MAX as usize)];
    let mut k = Vec::with_capacity(2 + id.len() + 12);
    k.extend_from_slice(&(id.len() as u16).to_be_bytes());
    k.extend_from_slice(id);
    k
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

/// The key, in the meta column family, of the latest history time stored.
const HISTORY_HIGH_WATER: &[u8] = b"history-high-water";

/// Merge operator of the meta column family: the largest big-endian u64
/// (only the history high-water mark is merged).
fn max_u64(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let decode = |v: &[u8]| v.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let max = operands.iter().fold(existing.map(decode).unwrap_or(0), |acc, op| acc.max(decode(op)));
    Some(max.to_be_bytes().to_vec())
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

impl Store {
    /// Opens (creating if needed) the store in `path`, and deletes the chunks
    /// of uploads that were in progress when the process last stopped.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| Error::Internal(format!("cannot create {}: {e}", path.display())))?;
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let table = |bloom: bool| {
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            t.set_cache_index_and_filter_blocks(true);
            // Index and filter blocks stay in the cache's high-priority pool,
            // ahead of data blocks.
            t.set_cache_index_and_filter_blocks_with_high_priority(true);
            t.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if bloom {
                t.set_bloom_filter(10.0, false);
                // Partitioned filters and a two-level index: a point lookup
                // reads one 4 KiB filter partition and one index partition,
                // not a filter and an index for the whole file. With whole
                // filters, a million-entry store spent half of every lookup
                // re-reading (and checksumming) filter blocks evicted from
                // the cache (C1 in docs/performance.md).
                t.set_partition_filters(true);
                t.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
                t.set_pin_top_level_index_and_filter(true);
                t.set_metadata_block_size(4096);
            }
            t
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_keep_log_file_num(5);
        // After a crash or a torn write the WAL may end in a partial or
        // corrupt record. Point-in-time recovery replays every record up to
        // the first bad one and drops the rest, so the store opens in a
        // consistent state as of some moment (a prefix of the commits:
        // a blob's chunks always come before its `cas` record). Failing to
        // open (absolute consistency) would turn a lost tail into an outage;
        // skipping bad records and replaying later ones could make a `cas`
        // record visible whose chunks were lost (threat model R8).
        db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Every block read is checked against its checksum (the default,
        // stated): a corrupt block is a DATA_LOSS error, never wrong bytes.
        db_opts.set_paranoid_checks(true);

        let mut small = Options::default();
        small.set_block_based_table_factory(&table(true));
        small.set_compression_type(DBCompressionType::Lz4);
        small.set_write_buffer_size(32 << 20);

        // The access-time index is a queue: eviction deletes from its head.
        let mut queue = small.clone();
        queue.add_compact_on_deletion_collector_factory(10_000, 5_000, 0.5);
        let mut usage = small.clone();
        usage.set_merge_operator_associative("provcache.add_i64", lru::add_i64);
        // No `max_successive_merges`: with it, every merge first reads the
        // key's operands back from the memtable, and with a handful of hot
        // counter keys that read grew to a quarter of the CPU of a write.
        // Operands are combined by flushes, and read only at open.
        let mut meta = small.clone();
        meta.set_merge_operator_associative("provcache.max_u64", max_u64);

        let mut chunks = Options::default();
        chunks.set_block_based_table_factory(&table(false));
        chunks.set_compression_type(DBCompressionType::None);
        // Blob data goes to blob files, so compaction never rewrites it.
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(MIN_BLOB_FILE_VALUE as u64);
        chunks.set_blob_compression_type(DBCompressionType::None);
        chunks.set_enable_blob_gc(true);
        // Bounded memtables keep RSS flat while a large blob streams in.
        chunks.set_write_buffer_size(8 << 20);
        chunks.set_max_write_buffer_number(3);

        let cfs = || {
            vec![
                ColumnFamilyDescriptor::new(CF_CAS, small.clone()),
                ColumnFamilyDescriptor::new(CF_CHUNKS, chunks.clone()),
                ColumnFamilyDescriptor::new(CF_AC, small.clone()),
                ColumnFamilyDescriptor::new(CF_AC_HISTORY, small.clone()),
                ColumnFamilyDescriptor::new(CF_PENDING, small.clone()),
                ColumnFamilyDescriptor::new(CF_AUDIT, small.clone()),
                ColumnFamilyDescriptor::new(CF_ATIME, small.clone()),
                ColumnFamilyDescriptor::new(CF_META, meta.clone()),
                ColumnFamilyDescriptor::new(CF_LRU, queue.clone()),
                ColumnFamilyDescriptor::new(CF_USAGE, usage.clone()),
            ]
        };
        let db = match DBWithThreadMode::<SingleThreaded>::open_cf_descriptors(&db_opts, path, cfs()) {
            Ok(db) => db,
            // A damaged table file (its index, filter or properties block,
            // read at open) or MANIFEST makes RocksDB refuse to open. This
            // is a cache: every CAS read is hash-checked and every Action
            // Cache entry signature-checked, so data salvaged by a repair can
            // never be served wrong, while refusing to start would turn a
            // damaged file into an outage (threat model R8). RepairDB keeps
            // what is intact and drops what is not (clients rebuild it).
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                tracing::error!(error = %e, path = %path.display(),
                    "the store is damaged; repairing it (damaged data is dropped, intact data kept)");
                DBWithThreadMode::<SingleThreaded>::repair(&db_opts, path)?;
                let db = DBWithThreadMode::<SingleThreaded>::open_cf_descriptors(&db_opts, path, cfs())?;
                tracing::warn!(path = %path.display(), "the store was repaired");
                db
            }
            Err(e) => return Err(e.into()),
        };
        let mut store = Store {
            db,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            sync: options.sync,
            lru: Lru::new(options.touch_interval, options.max_size),
            history_clock: AtomicU64::new(0),
            verified: VerifiedChunks::new(DEFAULT_VERIFIED_CHUNK_CACHE),
            audit_chains: Mutex::new(HashMap::new()),
        };
        store.check_format()?;
        store.history_clock = AtomicU64::new(store.load_history_high_water()?);
        // Cleanup only: unreadable leftovers must not keep the cache down.
        if let Err(e) = store.delete_abandoned_uploads(u64::MAX) {
            tracing::error!(error = %e, "could not delete the chunks of interrupted uploads");
        }
        match store.load_usage() {
            Ok(()) => {}
            // The size accounting is derived data: rebuild it from the
            // records rather than keep the cache down (R8).
            Err(Error::Storage(e)) if e.kind() == rocksdb::ErrorKind::Corruption => {
                tracing::error!(error = %e, "the size accounting is damaged; rebuilding it from the stored records");
                for (name, opts) in [(CF_LRU, &queue), (CF_ATIME, &small), (CF_USAGE, &usage)] {
                    store.db.drop_cf(name)?;
                    store.db.create_cf(name, opts)?;
                }
                store.load_usage()?;
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

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

    fn check_format(&self) -> Result<()> {
        let meta = self.cf(CF_META);
        let stored = match self.db.get_cf(meta, b"format") {
            Ok(v) => v,
            // The record's block is damaged. Format 1 is the only format
            // there has been, and reads verify what they serve, so the record
            // is written again rather than keeping the cache down (R8).
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                tracing::error!(error = %e, "the storage format record is damaged; writing it again");
                None
            }
            Err(e) => return Err(e.into()),
        };
        match stored {
            None => {
                self.db.put_cf_opt(meta, b"format", FORMAT_VERSION.to_be_bytes(), &self.write_opts())?;
                Ok(())
            }
            Some(v) if v.as_slice() == FORMAT_VERSION.to_be_bytes() => Ok(()),
            Some(v) => Err(Error::Internal(format!(
                "data directory has storage format {v:?}; this provcache reads format {FORMAT_VERSION}"
            ))),
        }
    }

    // ------------------------------------------------------------ CAS

    /// The record of a stored blob.
    pub fn blob_meta(&self, key: &Key) -> Result<Option<BlobMeta>> {
        match self.db.get_pinned_cf(self.cf(CF_CAS), key.as_bytes())? {
            Some(v) => Ok(Some(BlobMeta::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// [`Store::contains`] answered from memory alone (memtables and the
    /// block cache), for callers on an async worker thread: `None` as soon as
    /// one key would need a disk read (call [`Store::contains`] on a blocking
    /// thread then). A key the cached Bloom filter rules out needs no read.
    pub fn contains_cached(&self, keys: &[Key]) -> Option<Result<Vec<bool>>> {
        let results =
            self.db.batched_multi_get_cf_opt(self.cf(CF_CAS), keys.iter().map(|k| k.as_bytes()), false, &memory_only());
        let mut present = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(v) => present.push(v.is_some()),
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => return None,
                Err(e) => return Some(Err(e.into())),
            }
        }
        Some(Ok(present))
    }

    /// The bytes of a small stored blob (one chunk, smaller than
    /// [`MIN_BLOB_FILE_VALUE`]), answered from memory alone (see
    /// [`Store::contains_cached`]). `Some(Ok(None))`: not stored. `None`: a
    /// disk read would be needed, or the blob is not small, or its record
    /// looks wrong; read it with [`Store::blob_meta`] and
    /// [`Store::read_chunk`] on a blocking thread then. Not checked against
    /// its digest.
    pub fn small_blob_cached(&self, key: &Key) -> Option<Result<Option<Vec<u8>>>> {
        let ro = memory_only();
        let meta = match self.db.get_pinned_cf_opt(self.cf(CF_CAS), key.as_bytes(), &ro) {
            Ok(None) => return Some(Ok(None)),
            Ok(Some(v)) => match BlobMeta::decode(&v) {
                Ok(meta) => meta,
                Err(e) => return Some(Err(e)),
            },
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => return None,
            Err(e) => return Some(Err(e.into())),
        };
        if meta.size == 0 || meta.size >= MIN_BLOB_FILE_VALUE as u64 || meta.chunks() != 1 {
            return None;
        }
        match self.db.get_cf_opt(self.cf(CF_CHUNKS), chunk_key(meta.blob_id, 0), &ro) {
            Ok(Some(v)) if v.len() as u64 == meta.size => Some(Ok(Some(v))),
            Ok(_) => None,
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Which of `keys` are stored.
    pub fn contains(&self, keys: &[Key]) -> Result<Vec<bool>> {
        let cf = self.cf(CF_CAS);
        self.db
            .batched_multi_get_cf(cf, keys.iter().map(|k| k.as_bytes()), false)
            .into_iter()
            .map(|r| Ok(r?.is_some()))
            .collect()
    }

    /// One chunk of a stored blob.
    pub fn read_chunk(&self, meta: &BlobMeta, index: u32) -> Result<Vec<u8>> {
        let v = self.db.get_cf(self.cf(CF_CHUNKS), chunk_key(meta.blob_id, index))?;
        let expected = if index + 1 == meta.chunks() {
            meta.size - index as u64 * meta.chunk_size as u64
        } else {
            meta.chunk_size as u64
        };
        match v {
            Some(v) if v.len() as u64 == expected => Ok(v),
            Some(v) => Err(Error::DataLoss(format!(
                "stored chunk {index} of blob {} has {} bytes, expected {expected}",
                meta.blob_id,
                v.len()
            ))),
            // Evicted or deleted while being read.
            None => Err(Error::NotFound(format!("blob {} was removed during the read", meta.blob_id))),
        }
    }

    /// Stores a whole blob held in memory (already verified by the caller).
    /// Returns false if it was already present.
    pub fn put_blob(&self, key: &Key, data: &[u8]) -> Result<bool> {
        self.check_fits(data.len() as u64)?;
        let _guard = self.lock(key);
        if self.db.get_pinned_cf(self.cf(CF_CAS), key.as_bytes())?.is_some() {
            drop(_guard);
            self.touch(Kind::Blob, key);
            return Ok(false);
        }
        let blob_id = random_u64();
        let mut batch = WriteBatch::default();
        let chunks = self.cf(CF_CHUNKS);
        for (i, chunk) in data.chunks(CHUNK_SIZE).enumerate() {
            batch.put_cf(chunks, chunk_key(blob_id, i as u32), chunk);
        }
        let meta = BlobMeta { blob_id, size: data.len() as u64, chunk_size: CHUNK_SIZE as u32, stored_at: unix_now() };
        batch.put_cf(self.cf(CF_CAS), key.as_bytes(), meta.encode());
        let delta =
            self.stage(&mut batch, Kind::Blob, key, None, Some(Access { at_ms: lru::now_ms(), size: meta.size }));
        self.db.write_opt(batch, &self.write_opts())?;
        self.applied(delta);
        Ok(true)
    }

    /// Starts a streamed upload: returns a fresh blob id whose chunks are
    /// owned by a `pending` record until commit or abort.
    pub fn begin_upload(&self) -> Result<u64> {
        let blob_id = random_u64();
        self.db.put_cf(self.cf(CF_PENDING), blob_id.to_be_bytes(), unix_now().to_be_bytes())?;
        Ok(blob_id)
    }

    /// Writes chunk `index` of an upload in progress (not yet visible).
    ///
    /// With `wal` false the chunk skips the write-ahead log, so a large blob
    /// is written to disk once (into blob files) rather than twice; then
    /// [`Store::commit_upload`] must be told to flush before the blob becomes
    /// visible. A crash before that loses only chunks of an upload that was
    /// never acknowledged.
    pub fn write_chunk(&self, blob_id: u64, index: u32, data: &[u8], wal: bool) -> Result<()> {
        let mut w = WriteOptions::default();
        w.disable_wal(!wal);
        self.db.put_cf_opt(self.cf(CF_CHUNKS), chunk_key(blob_id, index), data, &w)?;
        Ok(())
    }

    /// Makes an upload visible under `key` (its digest verified by the caller).
    /// If another writer committed the same blob first, this upload's chunks are
    /// deleted and the existing copy stays.
    /// `flush` must be true when chunks were written without the WAL.
    pub fn commit_upload(&self, key: &Key, blob_id: u64, size: u64, flush: bool) -> Result<()> {
        if flush {
            self.db.flush_cf(self.cf(CF_CHUNKS))?;
        }
        self.check_fits(size)?;
        let _guard = self.lock(key);
        let mut batch = WriteBatch::default();
        let mut delta = None;
        if self.db.get_pinned_cf(self.cf(CF_CAS), key.as_bytes())?.is_some() {
            self.delete_chunks(&mut batch, blob_id);
        } else {
            let meta = BlobMeta { blob_id, size, chunk_size: CHUNK_SIZE as u32, stored_at: unix_now() };
            batch.put_cf(self.cf(CF_CAS), key.as_bytes(), meta.encode());
            let access = Access { at_ms: lru::now_ms(), size };
            delta = Some(self.stage(&mut batch, Kind::Blob, key, None, Some(access)));
        }
        batch.delete_cf(self.cf(CF_PENDING), blob_id.to_be_bytes());
        self.db.write_opt(batch, &self.write_opts())?;
        if let Some(delta) = delta {
            self.applied(delta);
        }
        Ok(())
    }

    /// Abandons an upload and deletes its chunks.
    pub fn abort_upload(&self, blob_id: u64) -> Result<()> {
        let mut batch = WriteBatch::default();
        self.delete_chunks(&mut batch, blob_id);
        batch.delete_cf(self.cf(CF_PENDING), blob_id.to_be_bytes());
        self.db.write(batch)?;
        Ok(())
    }

    /// The chunk hashes of blobs verified whole, for ranged reads.
    pub fn verified_chunks(&self) -> &VerifiedChunks {
        &self.verified
    }

    /// Removes a stored blob (for example one found corrupt).
    pub fn delete_blob(&self, key: &Key) -> Result<()> {
        self.verified.remove(key);
        let _guard = self.lock(key);
        if let Some(meta) = self.blob_meta(key)? {
            let mut batch = WriteBatch::default();
            batch.delete_cf(self.cf(CF_CAS), key.as_bytes());
            self.delete_chunks(&mut batch, meta.blob_id);
            let delta = self.stage(&mut batch, Kind::Blob, key, self.access(Kind::Blob, key)?, None);
            self.db.write_opt(batch, &self.write_opts())?;
            self.applied(delta);
        }
        Ok(())
    }

    /// Overwrites chunk `index` of the blob stored under `key` with `data`,
    /// bypassing every check. FOR TESTS ONLY: it simulates tampering or bit
    /// rot at rest (threat T8) so tests can prove reads never serve the wrong
    /// bytes. Nothing in the server calls it.
    #[doc(hidden)]
    pub fn tamper_chunk_for_tests(&self, key: &Key, index: u32, data: &[u8]) -> Result<()> {
        let meta = self.blob_meta(key)?.ok_or_else(|| Error::NotFound("no such blob to tamper with".into()))?;
        self.db.put_cf_opt(self.cf(CF_CHUNKS), chunk_key(meta.blob_id, index), data, &self.write_opts())?;
        Ok(())
    }

    /// Every live SST file: (column family, file name relative to the
    /// store's directory). FOR TESTS ONLY, which damage files at rest (R8).
    #[doc(hidden)]
    pub fn sst_files_for_tests(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .db
            .live_files()?
            .into_iter()
            .map(|f| (f.column_family_name, f.name.trim_start_matches('/').to_string()))
            .collect())
    }

    fn delete_chunks(&self, batch: &mut WriteBatch, blob_id: u64) {
        let start = chunk_key(blob_id, 0).to_vec();
        let end = match blob_id.checked_add(1) {
            Some(next) => chunk_key(next, 0).to_vec(),
            None => vec![0xff; 13],
        };
        batch.delete_range_cf(self.cf(CF_CHUNKS), start, end);
    }

    /// Deletes the chunks of uploads started before `older_than` (Unix seconds).
    pub fn delete_abandoned_uploads(&self, older_than: u64) -> Result<usize> {
        let pending = self.cf(CF_PENDING);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for item in self.db.iterator_cf(pending, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            let started = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if started < older_than {
                if let Ok(id) = k.as_ref().try_into().map(u64::from_be_bytes) {
                    self.delete_chunks(&mut batch, id);
                }
                batch.delete_cf(pending, &k);
                n += 1;
            }
        }
        if n > 0 {
            self.db.write(batch)?;
        }
        Ok(n)
    }

    // ------------------------------------------------------------ Action Cache

    /// The stored value of an Action Cache key.
    pub fn ac_get(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_AC), key.as_bytes())?)
    }

    /// [`Store::ac_get`] answered from memory alone (see
    /// [`Store::contains_cached`]): `None` if it would need a disk read.
    pub fn ac_get_cached(&self, key: &Key) -> Option<Result<Option<Vec<u8>>>> {
        match self.db.get_cf_opt(self.cf(CF_AC), key.as_bytes(), &memory_only()) {
            Ok(v) => Some(Ok(v)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Stores an Action Cache value and its history record in one synced batch.
    ///
    /// Writers of one action are serialised (striped lock), and the history
    /// record's time comes from the store's history clock under that lock:
    /// strictly later than every history time before it, also across
    /// restarts (its high-water mark is merged into the same batch), so
    /// concurrent writers never overwrite each other's history record (equal
    /// clock readings) and the newest history record is always the current
    /// value (threat model R6), without reading the history on every write.
    /// Returns the history time used.
    pub fn ac_put(&self, key: &Key, value: &[u8], stored_at_nanos: u64) -> Result<u64> {
        let _guard = self.lock(key);
        let at = self.next_history_at(stored_at_nanos);
        let mut batch = WriteBatch::default();
        batch.merge_cf(self.cf(CF_META), HISTORY_HIGH_WATER, at.to_be_bytes());
        batch.put_cf(self.cf(CF_AC), key.as_bytes(), value);
        let mut hkey = key.as_bytes().to_vec();
        hkey.extend_from_slice(&at.to_be_bytes());
        batch.put_cf(self.cf(CF_AC_HISTORY), hkey, value);
        let delta = self.stage_ac(&mut batch, key, value.len())?;
        crate::failpoint::crash_point("ac-before-commit");
        self.db.write_opt(batch, &self.write_opts())?;
        self.applied(delta);
        crate::failpoint::crash_point("ac-after-commit");
        Ok(at)
    }

    /// A history time: `now_nanos`, or just after the last one handed out
    /// if that is later (equal clock readings, or a clock set back).
    fn next_history_at(&self, now_nanos: u64) -> u64 {
        let mut last = self.history_clock.load(Ordering::Acquire);
        loop {
            let next = now_nanos.max(last.saturating_add(1));
            match self.history_clock.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }

    /// The latest history time ever stored: the high-water mark, or, in a
    /// store written before there was one (or with the mark's block
    /// damaged), the largest time among the history records (read once).
    fn load_history_high_water(&self) -> Result<u64> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, HISTORY_HIGH_WATER) {
            Ok(Some(v)) if v.len() == 8 => return Ok(u64::from_be_bytes(v[..].try_into().expect("8 bytes"))),
            Ok(_) => {}
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                tracing::error!(error = %e, "the history high-water mark is damaged; recomputing it");
            }
            Err(e) => return Err(e.into()),
        }
        let mut high = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_AC_HISTORY), rocksdb::IteratorMode::Start) {
            let Some((k, _)) = lru::readable(item)? else { break };
            if let Some(at) = k.len().checked_sub(8).map(|i| u64::from_be_bytes(k[i..].try_into().expect("8 bytes"))) {
                high = high.max(at);
            }
        }
        if high > 0 {
            self.db.merge_cf_opt(meta, HISTORY_HIGH_WATER, high.to_be_bytes(), &self.write_opts())?;
        }
        Ok(high)
    }

    fn stage_ac(&self, batch: &mut WriteBatch, key: &Key, len: usize) -> Result<lru::Delta> {
        let old = self.access(Kind::Action, key)?;
        let new = Access { at_ms: lru::now_ms(), size: len as u64 };
        Ok(self.stage(batch, Kind::Action, key, old, Some(new)))
    }

    /// Every history record of an action, oldest first: (stored-at ns, value).
    pub fn ac_history(&self, key: &Key) -> Result<Vec<(u64, Vec<u8>)>> {
        let prefix = key.as_bytes();
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator_cf(self.cf(CF_AC_HISTORY), rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let at = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            out.push((at, v.to_vec()));
        }
        Ok(out)
    }

    /// One page of an action's history, oldest first, from history time
    /// `from_nanos` on (inclusive): at most `max_count` records and, unless
    /// `must_progress` and the page would otherwise be empty, at most
    /// `max_bytes` of values, so any history fits in bounded replies.
    /// `next` is the history time (u64 BE) the following page starts at.
    pub fn ac_history_page(
        &self,
        key: &Key,
        from_nanos: u64,
        max_count: usize,
        max_bytes: usize,
        must_progress: bool,
    ) -> Result<Page<(u64, Vec<u8>)>> {
        let prefix = key.as_bytes();
        let mut start = prefix.to_vec();
        start.extend_from_slice(&from_nanos.to_be_bytes());
        let mut page = Page::default();
        let mut bytes = 0usize;
        let iter = self
            .db
            .iterator_cf(self.cf(CF_AC_HISTORY), rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let at = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            let first = page.rows.is_empty() && must_progress;
            if page.rows.len() >= max_count || (!first && bytes + v.len() > max_bytes) {
                page.next = Some(at.to_be_bytes().to_vec());
                break;
            }
            bytes += v.len();
            page.rows.push((at, v.to_vec()));
        }
        Ok(page)
    }

    /// Deletes history records stored before `before_nanos`; returns how many.
    pub fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        // Key: action key + stored-at (u64 ns).
        self.purge_older(CF_AC_HISTORY, before_nanos, 8)
    }

    /// Deletes the records of `cf` whose key holds a u64 ns time `from_end`
    /// bytes before its end, older than `before_nanos`; returns how many.
    fn purge_older(&self, cf: &str, before_nanos: u64, from_end: usize) -> Result<usize> {
        let cf = self.cf(cf);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            if k.len() >= from_end {
                let at = u64::from_be_bytes(k[k.len() - from_end..k.len() - from_end + 8].try_into().expect("8 bytes"));
                if at < before_nanos {
                    batch.delete_cf(cf, &k);
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.db.write(batch)?;
        }
        Ok(n)
    }

    /// Replaces an Action Cache value without any check. For tests and
    /// operator tools that simulate tampering at rest.
    pub fn ac_put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let key = Key(key.to_vec());
        let _guard = self.lock(&key);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_AC), key.as_bytes(), value);
        let delta = self.stage_ac(&mut batch, &key, value.len())?;
        self.db.write_opt(batch, &self.write_opts())?;
        self.applied(delta);
        Ok(())
    }

    /// Every Action Cache key and value (for operator tools; not for the hot path).
    pub fn ac_entries(&self) -> impl Iterator<Item = Result<KeyValue>> + '_ {
        self.db.iterator_cf(self.cf(CF_AC), rocksdb::IteratorMode::Start).map(|r| r.map_err(Error::from))
    }

    // ------------------------------------------------------------ audit log

    /// The chain head of an invocation's hit log, shared by every appender
    /// of that invocation (lock it to append). At most [`MAX_AUDIT_CHAINS`]
    /// are kept: when full, heads nobody holds are dropped, and the next
    /// appender re-reads the head from the store.
    pub fn audit_chain(&self, invocation: &str) -> AuditChain {
        let mut chains = self.audit_chains.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chain) = chains.get(invocation) {
            return chain.clone();
        }
        if chains.len() >= MAX_AUDIT_CHAINS {
            chains.retain(|_, chain| Arc::strong_count(chain) > 1);
        }
        let chain = AuditChain::default();
        chains.insert(invocation.to_string(), chain.clone());
        chain
    }

    /// Appends a chained hit record (not synced: the hit log is an audit aid,
    /// not an acknowledged write; a crash loses a tail of the chain, never a
    /// record in the middle). The caller holds the invocation's
    /// [`Store::audit_chain`] and gives the sequence.
    pub fn audit_append(&self, invocation: &str, sequence: u64, answered_at_nanos: u64, value: &[u8]) -> Result<()> {
        let mut key = audit_prefix(invocation);
        key.extend_from_slice(&sequence.to_be_bytes());
        key.extend_from_slice(&answered_at_nanos.to_be_bytes());
        self.db.put_cf(self.cf(CF_AUDIT), key, value)?;
        Ok(())
    }

    /// Writes a hit record in the format used before chaining (an unsigned
    /// `HitRecord` under answered-at + random). Only for tests of data
    /// written by older versions.
    pub fn audit_put_legacy(&self, invocation: &str, answered_at_nanos: u64, record: &[u8]) -> Result<()> {
        let mut key = audit_prefix(invocation);
        key.extend_from_slice(&answered_at_nanos.to_be_bytes());
        key.extend_from_slice(&(random_u64() as u32).to_be_bytes());
        self.db.put_cf(self.cf(CF_AUDIT), key, record)?;
        Ok(())
    }

    /// Deletes one hit-log row by its raw key. For tests and operator tools
    /// that simulate tampering at rest.
    pub fn audit_delete_raw(&self, key: &[u8]) -> Result<()> {
        self.db.delete_cf(self.cf(CF_AUDIT), key)?;
        Ok(())
    }

    /// Replaces one hit-log row's value without any check. For tests and
    /// operator tools that simulate tampering at rest.
    pub fn audit_put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.put_cf(self.cf(CF_AUDIT), key, value)?;
        Ok(())
    }

    /// One page of an invocation's hit log in key order (chained records by
    /// sequence), after the raw key `after` (a page token) if given: at most
    /// `max_count` rows and at most `max_bytes` of values (but always one
    /// row when any is left). `next` is the last row's key when more follow.
    pub fn audit_list(
        &self,
        invocation: &str,
        after: Option<&[u8]>,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Page<AuditRow>> {
        let prefix = audit_prefix(invocation);
        let start = after.map(|a| a.to_vec()).unwrap_or_else(|| prefix.clone());
        let mut page = Page::default();
        let mut bytes = 0usize;
        let iter =
            self.db.iterator_cf(self.cf(CF_AUDIT), rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if after.is_some_and(|a| a == &k[..]) {
                continue;
            }
            let sequence = match k.len() - prefix.len() {
                AUDIT_CHAINED_SUFFIX => {
                    Some(u64::from_be_bytes(k[prefix.len()..prefix.len() + 8].try_into().expect("8 bytes")))
                }
                AUDIT_LEGACY_SUFFIX => None,
                _ => continue,
            };
            if page.rows.len() >= max_count || (!page.rows.is_empty() && bytes + v.len() > max_bytes) {
                page.next = page.rows.last().map(|r: &AuditRow| r.key.to_vec());
                break;
            }
            bytes += v.len();
            page.rows.push(AuditRow { key: k, sequence, value: v });
        }
        Ok(page)
    }

    /// Deletes the hit log of every invocation whose newest record was
    /// answered before `before_nanos`; returns how many records. An
    /// invocation's records go together, so a kept chain never loses its
    /// start (records written before chaining go one by one, as before).
    pub fn purge_audit(&self, before_nanos: u64) -> Result<usize> {
        let cf = self.cf(CF_AUDIT);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        let mut purged = Vec::new();
        // The chained run being scanned: (prefix, first key, last key, newest time, records).
        type Run = (Vec<u8>, Vec<u8>, Vec<u8>, u64, usize);
        let mut run: Option<Run> = None;
        let mut close = |run: Option<Run>, batch: &mut WriteBatch, n: &mut usize| {
            if let Some((prefix, first, mut last, newest, count)) = run {
                if newest < before_nanos {
                    last.push(0);
                    batch.delete_range_cf(cf, first, last);
                    *n += count;
                    purged.push(prefix);
                }
            }
        };
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            let Some(len) = k.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else { continue };
            let Some(prefix) = k.get(..2 + len) else { continue };
            let at_of = |from_end: usize| {
                u64::from_be_bytes(k[k.len() - from_end..k.len() - from_end + 8].try_into().expect("8 bytes"))
            };
            match k.len() - prefix.len() {
                AUDIT_CHAINED_SUFFIX => {
                    let at = at_of(8);
                    match &mut run {
                        Some((p, _, last, newest, count)) if p.as_slice() == prefix => {
                            *last = k.to_vec();
                            *newest = (*newest).max(at);
                            *count += 1;
                        }
                        _ => {
                            close(run.take(), &mut batch, &mut n);
                            run = Some((prefix.to_vec(), k.to_vec(), k.to_vec(), at, 1));
                        }
                    }
                }
                AUDIT_LEGACY_SUFFIX if at_of(12) < before_nanos => {
                    batch.delete_cf(cf, &k);
                    n += 1;
                }
                _ => {}
            }
        }
        close(run.take(), &mut batch, &mut n);
        if n > 0 {
            self.db.write(batch)?;
            let mut chains = self.audit_chains.lock().unwrap_or_else(|p| p.into_inner());
            for prefix in purged {
                if let Ok(invocation) = std::str::from_utf8(&prefix[2..]) {
                    if chains.get(invocation).is_some_and(|c| Arc::strong_count(c) == 1) {
                        chains.remove(invocation);
                    }
                }
            }
        }
        Ok(n)
    }

    /// Writes a consistent copy of the whole store to `dest` (a directory
    /// that must not exist): a RocksDB checkpoint, hard links where the
    /// filesystem allows. Open it as a data directory's `db` to restore.
    pub fn checkpoint(&self, dest: &Path) -> Result<()> {
        self.flush()?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dest)?;
        Ok(())
    }

    /// Flushes memtables and the WAL to disk (used at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        // The synced WAL holds everything acknowledged; flushing memtables
        // only shortens the next start. A memtable flush that fails (say, a
        // background compaction met a damaged block, R8) is logged, not an
        // error: the data is in the WAL and is replayed at the next open.
        for cf in [CF_CAS, CF_CHUNKS, CF_AC, CF_AC_HISTORY, CF_PENDING, CF_AUDIT, CF_META, CF_LRU, CF_ATIME, CF_USAGE] {
            if let Err(e) = self.db.flush_cf(self.cf(cf)) {
                tracing::error!(column_family = cf, error = %e,
                    "could not flush a memtable; its data stays in the write-ahead log");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        (dir, s)
    }

    fn key(data: &[u8], instance: &str) -> Key {
        Key::new(&InstanceName::parse(instance).unwrap(), &Digest::of(DigestFunction::Sha256, data))
    }

    #[test]
    fn keys_round_trip_and_separate_instances() {
        let d = Digest::of(DigestFunction::Blake3, b"x");
        let i = InstanceName::parse("a/b").unwrap();
        assert_eq!(Key::decode(Key::new(&i, &d).as_bytes()), Some((i, d)));
        assert_ne!(key(b"x", "a"), key(b"x", "b"));
    }

    #[test]
    fn put_then_read_multi_chunk_blob() {
        let (_d, s) = store();
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 17).map(|i| (i % 251) as u8).collect();
        let k = key(&data, "");
        assert!(s.put_blob(&k, &data).unwrap());
        assert!(!s.put_blob(&k, &data).unwrap(), "second put is a no-op");
        let meta = s.blob_meta(&k).unwrap().unwrap();
        assert_eq!(meta.chunks(), 3);
        let mut back = Vec::new();
        for i in 0..meta.chunks() {
            back.extend(s.read_chunk(&meta, i).unwrap());
        }
        assert_eq!(back, data);
    }

    #[test]
    fn uploads_are_invisible_until_commit_and_abandoned_ones_are_cleaned() {
        let (dir, s) = store();
        let k = key(b"abc", "");
        let id = s.begin_upload().unwrap();
        s.write_chunk(id, 0, b"abc", true).unwrap();
        assert_eq!(s.contains(std::slice::from_ref(&k)).unwrap(), vec![false]);
        drop(s);
        let s = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert!(s.db.get_cf(s.cf(CF_CHUNKS), chunk_key(id, 0)).unwrap().is_none(), "restart deleted the chunks");
        let id = s.begin_upload().unwrap();
        s.write_chunk(id, 0, b"abc", true).unwrap();
        s.commit_upload(&k, id, 3, false).unwrap();
        assert_eq!(s.contains(std::slice::from_ref(&k)).unwrap(), vec![true]);
    }

    #[test]
    fn racing_commit_keeps_the_first_copy() {
        let (_d, s) = store();
        let k = key(b"abc", "");
        let a = s.begin_upload().unwrap();
        let b = s.begin_upload().unwrap();
        s.write_chunk(a, 0, b"abc", false).unwrap();
        s.write_chunk(b, 0, b"abc", true).unwrap();
        s.commit_upload(&k, a, 3, true).unwrap();
        s.commit_upload(&k, b, 3, false).unwrap();
        assert_eq!(s.blob_meta(&k).unwrap().unwrap().blob_id, a);
        assert!(s.db.get_cf(s.cf(CF_CHUNKS), chunk_key(b, 0)).unwrap().is_none());
    }

    #[test]
    fn hit_log_pages_are_bounded_by_count_and_bytes_and_keep_chain_order() {
        let (_d, s) = store();
        for seq in 1..=5u64 {
            s.audit_append("inv", seq, 1_000 + seq, &[seq as u8; 100]).unwrap();
        }
        s.audit_append("inv-other", 1, 1_000, b"other").unwrap();
        s.audit_put_legacy("inv", 500, b"legacy").unwrap();
        let page = s.audit_list("inv", None, 2, usize::MAX).unwrap();
        assert_eq!(page.rows.iter().map(|r| r.sequence).collect::<Vec<_>>(), [Some(1), Some(2)]);
        let page = s.audit_list("inv", page.next.as_deref(), 10, 250).unwrap();
        assert_eq!(page.rows.iter().map(|r| r.sequence).collect::<Vec<_>>(), [Some(3), Some(4)], "250 bytes");
        let page = s.audit_list("inv", page.next.as_deref(), 10, 1).unwrap();
        assert_eq!(page.rows.len(), 1, "one row always fits");
        let page = s.audit_list("inv", page.next.as_deref(), 10, usize::MAX).unwrap();
        assert_eq!(page.rows.len(), 1);
        assert_eq!((page.rows[0].sequence, &page.rows[0].value[..]), (None, &b"legacy"[..]));
        assert_eq!(page.next, None);
    }

    #[test]
    fn an_invocations_hit_log_is_purged_whole_once_its_newest_record_is_old() {
        let (_d, s) = store();
        // "old": every record before the cut-off; "live": its first records
        // are old but its newest is not, so none goes.
        for seq in 1..=3u64 {
            s.audit_append("old", seq, 100 + seq, b"r").unwrap();
            s.audit_append("live", seq, if seq == 3 { 10_000 } else { 100 + seq }, b"r").unwrap();
        }
        s.audit_put_legacy("old", 50, b"legacy").unwrap();
        s.audit_put_legacy("live", 20_000, b"legacy").unwrap();
        assert_eq!(s.purge_audit(1_000).unwrap(), 4);
        assert!(s.audit_list("old", None, 10, usize::MAX).unwrap().rows.is_empty());
        assert_eq!(s.audit_list("live", None, 10, usize::MAX).unwrap().rows.len(), 4);
    }

    #[test]
    fn history_pages_carry_at_least_one_version_when_asked_to_progress() {
        let (_d, s) = store();
        let a = key(b"a", "");
        for (i, at) in [10u64, 20, 30].into_iter().enumerate() {
            s.ac_put(&a, &[i as u8; 100], at).unwrap();
        }
        let page = s.ac_history_page(&a, 0, 10, 150, false).unwrap();
        assert_eq!(page.rows.len(), 1);
        let page = s.ac_history_page(&a, 0, 10, 50, false).unwrap();
        assert!(page.rows.is_empty(), "nothing fits and no progress is required");
        assert_eq!(page.next, Some(10u64.to_be_bytes().to_vec()));
        let page = s.ac_history_page(&a, 20, 10, 50, true).unwrap();
        assert_eq!(page.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [20]);
        assert_eq!(page.next, Some(30u64.to_be_bytes().to_vec()));
        let page = s.ac_history_page(&a, 30, 10, 1000, true).unwrap();
        assert_eq!((page.rows.len(), page.next), (1, None));
    }

    /// History times only go forward: equal clock readings, a clock set
    /// back, a restart, and a store written before the high-water mark
    /// existed (its mark recomputed from the records) never reorder or
    /// overwrite an action's history.
    #[test]
    fn history_times_only_go_forward_across_restarts() {
        let (dir, s) = store();
        let (a, b) = (key(b"a", ""), key(b"b", ""));
        assert_eq!(s.ac_put(&a, b"a1", 1_000).unwrap(), 1_000);
        assert_eq!(s.ac_put(&a, b"a2", 1_000).unwrap(), 1_001, "equal reading");
        assert_eq!(s.ac_put(&b, b"b1", 500).unwrap(), 1_002, "clock set back");
        drop(s);
        let s = Store::open(dir.path(), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        assert_eq!(s.ac_put(&a, b"a3", 10).unwrap(), 1_003, "after a restart with the clock set back");
        // A store from before the high-water mark: recomputed from the records.
        s.db.delete_cf(s.cf(CF_META), HISTORY_HIGH_WATER).unwrap();
        drop(s);
        let s = Store::open(dir.path(), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        assert_eq!(s.ac_put(&a, b"a4", 10).unwrap(), 1_004);
        let history = s.ac_history(&a).unwrap();
        assert_eq!(
            history,
            vec![(1_000, b"a1".to_vec()), (1_001, b"a2".to_vec()), (1_003, b"a3".to_vec()), (1_004, b"a4".to_vec())]
        );
        assert_eq!(s.ac_get(&a).unwrap().unwrap(), b"a4", "the newest history record is the current value");
    }
}
