//! Blobs: their records, chunks and uploads.

use rocksdb::{WriteBatch, WriteOptions};

use super::lru::{self, Access, Kind};
use super::memory_only;
use super::verified::VerifiedChunks;
use super::{random_u64, unix_now, Key, RocksStore, CF_CAS, CF_CHUNKS, CF_PENDING, CHUNK_SIZE, MIN_BLOB_FILE_VALUE};
use crate::error::{Error, Result};

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

    pub(super) fn decode(v: &[u8]) -> Result<Self> {
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

pub(super) fn chunk_key(blob_id: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&blob_id.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

impl RocksStore {
    /// The record of a stored blob.
    pub fn blob_meta(&self, key: &Key) -> Result<Option<BlobMeta>> {
        match self.db.get_pinned_cf(self.cf(CF_CAS), key.as_bytes())? {
            Some(v) => Ok(Some(BlobMeta::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// [`RocksStore::contains`] answered from memory alone (memtables and the
    /// block cache), for callers on an async worker thread: `None` as soon as
    /// one key would need a disk read (call [`RocksStore::contains`] on a blocking
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
    /// [`RocksStore::contains_cached`]). `Some(Ok(None))`: not stored. `None`: a
    /// disk read would be needed, or the blob is not small, or its record
    /// looks wrong; read it with [`RocksStore::blob_meta`] and
    /// [`RocksStore::read_chunk`] on a blocking thread then. Not checked against
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
    /// [`RocksStore::commit_upload`] must be told to flush before the blob becomes
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
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key, store};
    use super::super::StoreOptions;
    use super::*;

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
        let s = RocksStore::open(dir.path(), &StoreOptions::default()).unwrap();
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
}
