//! Opening the database (options, column families, repair), its format
//! record, checkpoints and flushing.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, DBWithThreadMode, Options, SingleThreaded,
};

use super::lru::{self, Lru, CF_ATIME, CF_LRU, CF_USAGE};
use super::verified::VerifiedChunks;
use super::{
    wal_bound, DEFAULT_VERIFIED_CHUNK_CACHE, FORMAT_VERSION, LOCK_STRIPES, LOG_FILE_BYTES, MIN_BLOB_FILE_VALUE,
};
use super::{RocksStore, StoreOptions, CF_AC, CF_AC_HISTORY, CF_AUDIT, CF_CAS, CF_CHUNKS, CF_META, CF_PENDING};
use crate::error::{Error, Result};
use crate::store::StoreErrorKind;

/// Merge operator of the meta column family: the largest big-endian u64
/// (only the history high-water mark is merged).
fn max_u64(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let decode = |v: &[u8]| v.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let max = operands.iter().fold(existing.map(decode).unwrap_or(0), |acc, op| acc.max(decode(op)));
    Some(max.to_be_bytes().to_vec())
}

impl RocksStore {
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
        // Two memtable flushes at once: a large upload fills the `chunks`
        // memtables faster than one flush (a blob file and its fsyncs)
        // drains them, which halved a 1 GiB write's speed. Stated per kind,
        // since `max_background_jobs` gives flushes a quarter (one) of the jobs.
        #[allow(deprecated)]
        {
            db_opts.set_max_background_flushes(2);
            db_opts.set_max_background_compactions(1);
        }
        // Small column families fill their memtables slowly, and a WAL file
        // lives until every column family it holds writes of has flushed:
        // without this bound the WAL kept every blob written since the last
        // flush of the Action Cache (docs/storage.md, "Disk use").
        db_opts.set_max_total_wal_size(wal_bound(options.max_size));
        db_opts.set_keep_log_file_num(5);
        db_opts.set_max_log_file_size(LOG_FILE_BYTES);
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
        // Evicted blobs stay in their blob files until a compaction drops
        // the last reference: compact the oldest files once half garbage.
        chunks.set_blob_gc_force_threshold(0.5);
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
        let mut store = RocksStore {
            db,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            sync: options.sync,
            lru: Lru::new(options.touch_interval, options.max_size),
            history_clock: AtomicU64::new(0),
            verified: VerifiedChunks::new(DEFAULT_VERIFIED_CHUNK_CACHE),
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
            Err(Error::Storage(e)) if e.kind() == StoreErrorKind::Corruption => {
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
