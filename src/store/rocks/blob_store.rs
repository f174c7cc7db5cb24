//! [`BlobStore`] on RocksDB: the async face of the blob methods. Lookups
//! RocksDB can answer from memory run on the caller's thread; everything
//! else hops to the blocking pool.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::verified::{chunk_hash, ChunkHash};
use super::{blocking, BlobMeta, Key, Kind, RocksStore, CHUNK_SIZE, MIN_BLOB_FILE_VALUE};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::store::{corrupt_blob, BlobStore, BlobStream, BlobWriter};

/// Blobs larger than this are written to disk once, bypassing the WAL, and
/// flushed before commit; smaller ones go through the WAL, which is cheaper
/// than a flush per upload.
pub const NO_WAL_THRESHOLD: u64 = 64 * 1024 * 1024;

/// Pieces of a ranged read waiting for a slow reader.
const READ_AHEAD: usize = 2;

/// Chunk writes one upload keeps running on the blocking pool while its
/// stream receives and hashes the next bytes: receiving, hashing and the
/// RocksDB write overlap, and an upload holds at most this many chunks more.
const WRITES_IN_FLIGHT: usize = 2;

fn keys_of(instance: &InstanceName, digests: &[Digest]) -> Vec<Key> {
    digests.iter().map(|d| Key::new(instance, d)).collect()
}

fn touch_present(store: &RocksStore, keys: &[Key], present: &[bool]) {
    for (key, _) in keys.iter().zip(present).filter(|(_, p)| **p) {
        store.touch(Kind::Blob, key);
    }
}

/// Implemented on the shared handle: the blocking work runs on other
/// threads, which must own a handle to the store.
#[async_trait]
impl BlobStore for Arc<RocksStore> {
    async fn contains(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<bool>> {
        let keys = keys_of(instance, digests);
        // From memory on this thread when possible; a disk read goes to a
        // blocking thread.
        if let Some(present) = self.contains_cached(&keys) {
            let present = present?;
            touch_present(self, &keys, &present);
            return Ok(present);
        }
        let store = self.clone();
        blocking(move || {
            let present = RocksStore::contains(&store, &keys)?;
            touch_present(&store, &keys, &present);
            Ok(present)
        })
        .await
    }

    async fn get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>> {
        let key = Key::new(instance, &digest);
        // A small blob is usually in memory: read it on this thread.
        if digest.size < MIN_BLOB_FILE_VALUE as u64 {
            match self.small_blob_cached(&key) {
                Some(Ok(None)) => return Ok(None),
                Some(Ok(Some(data))) => {
                    self.touch(Kind::Blob, &key);
                    return Ok(Some(Bytes::from(data)));
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
        let store = self.clone();
        blocking(move || {
            let Some(meta) = store.blob_meta(&key)? else { return Ok(None) };
            store.touch(Kind::Blob, &key);
            let mut data = Vec::with_capacity(meta.size as usize);
            for i in 0..meta.chunks() {
                data.extend_from_slice(&store.read_chunk(&meta, i)?);
            }
            Ok(Some(Bytes::from(data)))
        })
        .await
    }

    async fn read(&self, instance: &InstanceName, digest: Digest, offset: u64, end: u64) -> Result<Option<BlobStream>> {
        let key = Key::new(instance, &digest);
        let store = self.clone();
        let found = blocking(move || {
            let meta = store.blob_meta(&key)?;
            if meta.is_some() {
                store.touch(Kind::Blob, &key);
            }
            Ok(meta.map(|meta| (store, key, meta)))
        })
        .await?;
        let Some((store, key, meta)) = found else { return Ok(None) };
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            let range = RangeRead { store: &store, key: &key, meta: &meta, digest, tx: &tx };
            if let Err(e) = range.run(offset, end) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Some(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        let key = Key::new(instance, &digest);
        let store = self.clone();
        blocking(move || store.put_blob(&key, &data).map(|_| ())).await
    }

    async fn begin_write(&self, instance: &InstanceName, digest: Digest) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(RocksWriter {
            store: self.clone(),
            key: Key::new(instance, &digest),
            size: digest.size,
            wal: digest.size <= NO_WAL_THRESHOLD,
            pending: VecDeque::new(),
            pending_len: 0,
            blob_id: None,
            next_chunk: 0,
            in_flight: VecDeque::new(),
            committing: false,
        }))
    }

    async fn delete(&self, instance: &InstanceName, digest: Digest) -> Result<()> {
        let key = Key::new(instance, &digest);
        let store = self.clone();
        blocking(move || store.delete_blob(&key)).await
    }

    fn check_fits(&self, size: u64) -> Result<()> {
        RocksStore::check_fits(self, size)
    }
}

/// A streamed write: chunks go to RocksDB under a private blob id as they
/// fill; a blob of one chunk or less stays in memory and is stored in one
/// batch at commit.
struct RocksWriter {
    store: Arc<RocksStore>,
    key: Key,
    size: u64,
    /// Whether chunks go through the write-ahead log ([`NO_WAL_THRESHOLD`]).
    wal: bool,
    /// Bytes not yet written, in order (pieces as the caller gave them, so
    /// a caller writing whole chunks costs no copy).
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// The upload's blob id, once its first chunk is written.
    blob_id: Option<u64>,
    next_chunk: u32,
    /// Chunk writes started and not yet awaited, oldest first (at most
    /// [`WRITES_IN_FLIGHT`]); all of them end before the commit or the abort.
    in_flight: VecDeque<JoinHandle<Result<()>>>,
    /// Set once the commit is handed to the blocking pool, where it runs to
    /// its end even if the writer is dropped meanwhile.
    committing: bool,
}

impl Drop for RocksWriter {
    /// A writer dropped before its commit began (the client went away, a
    /// call was cancelled) frees its chunks now rather than at the next
    /// start. One dropped while committing is left alone: the commit may
    /// have succeeded, and aborting would delete the blob's chunks.
    fn drop(&mut self) {
        let (Some(id), false) = (self.blob_id.take(), self.committing) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, writes) = (self.store.clone(), std::mem::take(&mut self.in_flight));
        // The chunk writes still running end first, so none lands after the delete.
        runtime.spawn(async move {
            settle_all(writes).await;
            if let Err(e) = blocking(move || store.abort_upload(id)).await {
                tracing::warn!(error = %e, "could not delete an abandoned upload's chunks");
            }
        });
    }
}

impl RocksWriter {
    /// The first `n` pending bytes (at most `pending_len`), copied only when
    /// they span pieces.
    fn take(&mut self, n: usize) -> Bytes {
        self.pending_len -= n;
        match self.pending.front_mut() {
            Some(first) if first.len() >= n => {
                let out = first.split_to(n);
                if first.is_empty() {
                    self.pending.pop_front();
                }
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(n);
                while out.len() < n {
                    let first = self.pending.front_mut().expect("pending holds n bytes");
                    out.extend_from_slice(&first.split_to((n - out.len()).min(first.len())));
                    if first.is_empty() {
                        self.pending.pop_front();
                    }
                }
                out.freeze()
            }
        }
    }

    async fn store_chunk(&mut self, chunk: Bytes) -> Result<()> {
        let id = match self.blob_id {
            Some(id) => id,
            None => {
                let s = self.store.clone();
                let id = blocking(move || s.begin_upload()).await?;
                self.blob_id = Some(id);
                id
            }
        };
        if self.in_flight.len() >= WRITES_IN_FLIGHT {
            self.settle_oldest().await?;
        }
        let (s, index, wal) = (self.store.clone(), self.next_chunk, self.wal);
        self.in_flight.push_back(tokio::task::spawn_blocking(move || s.write_chunk(id, index, &chunk, wal)));
        self.next_chunk += 1;
        Ok(())
    }

    /// Waits for the oldest chunk write in flight; its failure fails the
    /// upload (the caller then aborts it).
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some(write) = self.in_flight.front_mut() else { return Ok(()) };
        // Left in the queue while awaited: a writer dropped meanwhile still waits for it.
        let written = write.await;
        self.in_flight.pop_front();
        written?
    }

    async fn finish(&mut self) -> Result<()> {
        let tail = self.take(self.pending_len);
        let Some(id) = self.blob_id else {
            let (s, key) = (self.store.clone(), self.key.clone());
            return blocking(move || s.put_blob(&key, &tail).map(|_| ())).await;
        };
        if !tail.is_empty() {
            self.store_chunk(tail).await?;
        }
        // Every chunk is written before the record that makes them visible.
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        let (s, key, size, flush) = (self.store.clone(), self.key.clone(), self.size, !self.wal);
        self.committing = true;
        let committed = blocking(move || s.commit_upload(&key, id, size, flush)).await;
        self.committing = false;
        committed?;
        self.blob_id = None;
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for RocksWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.pending_len += data.len();
        self.pending.push_back(data);
        while self.size > CHUNK_SIZE as u64 && self.pending_len >= CHUNK_SIZE {
            let chunk = self.take(CHUNK_SIZE);
            self.store_chunk(chunk).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let result = self.finish().await;
        if result.is_err() {
            // A refused commit (say, over capacity) frees its chunks now.
            let _ = self.abort().await;
        }
        result
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        settle_all(std::mem::take(&mut self.in_flight)).await;
        match self.blob_id.take() {
            Some(id) => {
                let s = self.store.clone();
                blocking(move || s.abort_upload(id)).await
            }
            None => Ok(()),
        }
    }
}

/// Waits for chunk writes of an upload being abandoned (their errors no
/// longer matter), so that deleting its chunks comes after the last one.
async fn settle_all(writes: VecDeque<JoinHandle<Result<()>>>) {
    for write in writes {
        let _ = write.await;
    }
}

/// One ranged read on a blocking thread (see [`RangeRead::run`]).
struct RangeRead<'a> {
    store: &'a RocksStore,
    key: &'a Key,
    meta: &'a BlobMeta,
    digest: Digest,
    tx: &'a mpsc::Sender<Result<Bytes>>,
}

impl RangeRead<'_> {
    fn corrupt(&self) -> Error {
        corrupt_blob(self.digest, self.store.delete_blob(self.key))
    }

    /// Sends a piece; false when the reader went away.
    fn send(&self, data: Vec<u8>) -> bool {
        self.tx.blocking_send(Ok(Bytes::from(data))).is_ok()
    }

    /// Reads `[offset, end)` chunk by chunk. A read that covers the whole
    /// blob is hash-checked as it goes (its last piece is held until the
    /// hash matches); a single-chunk blob is checked before any byte is
    /// sent; a part of a multi-chunk blob is checked chunk by chunk against
    /// the remembered hashes of a whole-blob check (made on the first such
    /// read); a corrupt blob is deleted and the read fails.
    fn run(&self, offset: u64, end: u64) -> Result<()> {
        let (meta, digest) = (self.meta, self.digest);
        if meta.size != digest.size {
            return Err(Error::DataLoss(format!("stored blob {digest} has size {}", meta.size)));
        }
        if offset >= end {
            return Ok(());
        }
        if meta.chunks() == 1 {
            let data = self.store.read_chunk(meta, 0)?;
            if digest.verify(&data).is_err() {
                return Err(self.corrupt());
            }
            self.send(data[offset as usize..end as usize].to_vec());
            return Ok(());
        }
        let whole = offset == 0 && end == digest.size;
        let mut hasher = whole.then(|| digest.function.hasher());
        let chunk_hashes = if whole { None } else { Some(self.chunk_hashes()?) };
        let chunk = meta.chunk_size as u64;
        let mut pos = offset;
        while pos < end {
            let index = (pos / chunk) as u32;
            let data = self.store.read_chunk(meta, index)?;
            if let Some(h) = &mut hasher {
                h.update(&data);
            }
            if chunk_hashes.as_ref().is_some_and(|hashes| hashes.get(index as usize) != Some(&chunk_hash(&data))) {
                return Err(self.corrupt());
            }
            let from = (pos - index as u64 * chunk) as usize;
            let to = ((end - index as u64 * chunk) as usize).min(data.len());
            let piece = if from == 0 && to == data.len() { data } else { data[from..to].to_vec() };
            pos += piece.len() as u64;
            if pos >= end && hasher.take().is_some_and(|h| h.finalize() != digest.hash) {
                return Err(self.corrupt());
            }
            if !self.send(piece) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A ranged read of a multi-chunk blob cannot be hash-checked as it
    /// goes. The first one checks the whole blob (one extra pass, a chunk at
    /// a time) and remembers each chunk's hash; later ones check only the
    /// chunks they touch against those. Either way no read ever succeeds
    /// with bytes that do not match the digest.
    fn chunk_hashes(&self) -> Result<Arc<[ChunkHash]>> {
        let (store, meta) = (self.store, self.meta);
        if let Some(hashes) = store.verified_chunks().get(self.key, meta) {
            return Ok(hashes);
        }
        let mut h = self.digest.function.hasher();
        let mut hashes = Vec::with_capacity(meta.chunks() as usize);
        for index in 0..meta.chunks() {
            let data = store.read_chunk(meta, index)?;
            h.update(&data);
            hashes.push(chunk_hash(&data));
        }
        if h.finalize() != self.digest.hash {
            return Err(self.corrupt());
        }
        let hashes: Arc<[ChunkHash]> = hashes.into();
        store.verified_chunks().insert(self.key, meta, hashes.clone());
        Ok(hashes)
    }
}

const _: () = assert!(CHUNK_SIZE as u64 <= crate::cache::cas::MAX_BATCH_TOTAL_BYTES);

#[cfg(test)]
mod tests {
    use super::super::testing::store;
    use super::super::{CF_CHUNKS, CF_PENDING};
    use super::*;
    use crate::cache::digest::DigestFunction;

    /// A streamed upload of several chunks (so writes overlap) and its digest.
    fn upload() -> (Arc<RocksStore>, tempfile::TempDir, Bytes, Digest) {
        let (dir, s) = store();
        let data: Bytes = (0..CHUNK_SIZE * 5 + 123).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        let digest = Digest::of(DigestFunction::Sha256, &data);
        (Arc::new(s), dir, data, digest)
    }

    async fn write_all(writer: &mut Box<dyn BlobWriter>, data: &Bytes) {
        for piece in data.chunks(64 * 1024) {
            writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
    }

    fn rows(s: &RocksStore, cf: &str) -> usize {
        s.db.iterator_cf(s.cf(cf), rocksdb::IteratorMode::Start).count()
    }

    #[tokio::test]
    async fn a_streamed_upload_is_whole_after_commit() {
        let (s, _dir, data, digest) = upload();
        let i = InstanceName::default();
        let mut writer = s.begin_write(&i, digest).await.unwrap();
        write_all(&mut writer, &data).await;
        assert_eq!(s.contains(&i, &[digest]).await.unwrap(), vec![false], "invisible before the commit");
        writer.commit().await.unwrap();
        assert_eq!(s.get(&i, digest).await.unwrap(), Some(data));
        assert_eq!(rows(&s, CF_PENDING), 0);
    }

    #[tokio::test]
    async fn an_aborted_or_dropped_upload_leaves_no_chunk() {
        let (s, _dir, data, digest) = upload();
        let i = InstanceName::default();
        let mut writer = s.begin_write(&i, digest).await.unwrap();
        write_all(&mut writer, &data).await;
        writer.abort().await.unwrap();
        assert_eq!((rows(&s, CF_CHUNKS), rows(&s, CF_PENDING)), (0, 0), "aborted: every chunk deleted");

        let mut writer = s.begin_write(&i, digest).await.unwrap();
        write_all(&mut writer, &data).await;
        drop(writer);
        for _ in 0..500 {
            if (rows(&s, CF_CHUNKS), rows(&s, CF_PENDING)) == (0, 0) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("a dropped upload's chunks are still there");
    }
}
