//! The Content Addressable Storage domain: hash-checked writes, verified
//! reads, batch calls and GetTree, on top of [`Store`].

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;

use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::proto::reapi;
use crate::resource::{Compressor, InstanceName};
use crate::store::{BlobMeta, Key, Kind, Store, CHUNK_SIZE, MIN_BLOB_FILE_VALUE};

/// The largest total of blob sizes in one batch call (advertised in Capabilities).
pub const MAX_BATCH_TOTAL_BYTES: u64 = 4 * 1024 * 1024;
/// The most directories one GetTree call will walk (bounds hostile trees).
pub const MAX_TREE_DIRECTORIES: usize = 1_000_000;
/// The largest blob the server decodes as a protobuf (Action, Command, Tree, Directory).
pub const MAX_DECODED_BLOB: u64 = 64 * 1024 * 1024;
/// Default and maximum number of directories in one GetTree response.
const TREE_PAGE_DEFAULT: usize = 1000;
/// GetTree responses stay below this encoded size (gRPC's default limit is 4 MiB).
const TREE_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Runs a blocking storage operation on the blocking pool.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// The CAS.
#[derive(Debug)]
pub struct Cas {
    store: Arc<Store>,
}

/// One blob of a BatchUpdateBlobs call.
#[derive(Debug)]
pub struct BatchBlob {
    /// The claimed digest (already parsed) or the parse error.
    pub digest: Result<Digest>,
    /// The bytes as sent.
    pub data: Bytes,
    /// How `data` is compressed.
    pub compressor: Option<Compressor>,
}

impl Cas {
    /// A CAS over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Cas { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The digests among `digests` that are not stored (the empty blob is
    /// always present). The present ones count as used.
    pub async fn find_missing(&self, instance: &InstanceName, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        let mut seen = HashSet::new();
        let wanted: Vec<Digest> = digests.into_iter().filter(|d| !d.is_empty_blob() && seen.insert(*d)).collect();
        if wanted.is_empty() {
            return Ok(vec![]);
        }
        let keys: Vec<Key> = wanted.iter().map(|d| Key::new(instance, d)).collect();
        let touch = |store: &Store, keys: &[Key], present: &[bool]| {
            for (key, _) in keys.iter().zip(present).filter(|(_, p)| **p) {
                store.touch(Kind::Blob, key);
            }
        };
        // From memory on this thread when possible; a disk read goes to a
        // blocking thread.
        let present = match self.store.contains_cached(&keys) {
            Some(present) => {
                let present = present?;
                touch(&self.store, &keys, &present);
                present
            }
            None => {
                let store = self.store.clone();
                blocking(move || {
                    let present = store.contains(&keys)?;
                    touch(&store, &keys, &present);
                    Ok(present)
                })
                .await?
            }
        };
        Ok(wanted.into_iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| d).collect())
    }

    /// The first of `digests` that is missing, if any.
    pub async fn first_missing(&self, instance: &InstanceName, digests: Vec<Digest>) -> Result<Option<Digest>> {
        Ok(self.find_missing(instance, digests).await?.into_iter().next())
    }

    /// Verifies and stores a blob held in memory.
    pub async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        digest.verify(&data)?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        let key = Key::new(instance, &digest);
        let store = self.store.clone();
        blocking(move || store.put_blob(&key, &data).map(|_| ())).await
    }

    /// Reads a whole blob of at most `max` bytes into memory, verifying its
    /// digest. `Ok(None)` if it is not stored.
    pub async fn get(&self, instance: &InstanceName, digest: Digest, max: u64) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        if digest.size > max {
            return Err(Error::InvalidArgument(format!(
                "blob {digest} is larger than the {max}-byte limit for this call"
            )));
        }
        let key = Key::new(instance, &digest);
        // A small blob is usually in memory: read it on this thread. A blob
        // that fails its digest is left to the path below, which deletes it.
        if digest.size < MIN_BLOB_FILE_VALUE as u64 {
            match self.store.small_blob_cached(&key) {
                Some(Ok(None)) => return Ok(None),
                Some(Ok(Some(data))) if digest.verify(&data).is_ok() => {
                    self.store.touch(Kind::Blob, &key);
                    return Ok(Some(Bytes::from(data)));
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(Some(_))) | None => {}
            }
        }
        let store = self.store.clone();
        blocking(move || {
            let Some(meta) = store.blob_meta(&key)? else { return Ok(None) };
            store.touch(Kind::Blob, &key);
            let mut data = Vec::with_capacity(meta.size as usize);
            for i in 0..meta.chunks() {
                data.extend_from_slice(&store.read_chunk(&meta, i)?);
            }
            if digest.verify(&data).is_err() {
                tracing::error!(%digest, "stored blob does not match its digest; deleting it");
                store.delete_blob(&key)?;
                return Err(Error::DataLoss(format!("stored blob {digest} was corrupt and has been removed")));
            }
            Ok(Some(Bytes::from(data)))
        })
        .await
    }

    /// Reads and decodes a protobuf message stored in the CAS.
    pub async fn get_message<M: Message + Default>(
        &self,
        instance: &InstanceName,
        digest: Digest,
    ) -> Result<Option<M>> {
        match self.get(instance, digest, MAX_DECODED_BLOB).await? {
            Some(bytes) => M::decode(bytes)
                .map(Some)
                .map_err(|e| Error::InvalidArgument(format!("blob {digest} is not a valid {}: {e}", type_name::<M>()))),
            None => Ok(None),
        }
    }

    /// BatchUpdateBlobs: one status per blob, in request order.
    pub async fn batch_update(&self, instance: &InstanceName, blobs: Vec<BatchBlob>) -> Result<Vec<Result<()>>> {
        let total: u64 = blobs.iter().map(|b| b.digest.as_ref().map(|d| d.size).unwrap_or(0)).sum();
        if total > MAX_BATCH_TOTAL_BYTES {
            return Err(Error::InvalidArgument(format!(
                "batch holds {total} bytes, over the {MAX_BATCH_TOTAL_BYTES}-byte limit; use ByteStream for large blobs"
            )));
        }
        let mut out = Vec::with_capacity(blobs.len());
        for blob in blobs {
            let result = match blob.digest {
                Err(e) => Err(e),
                Ok(digest) => match decompress(blob.data, blob.compressor, digest.size) {
                    Ok(data) => self.put(instance, digest, data).await,
                    Err(e) => Err(e),
                },
            };
            out.push(result);
        }
        Ok(out)
    }

    /// BatchReadBlobs: the data (zstd-compressed when `zstd` and worth it) or an error per digest.
    pub async fn batch_read(
        &self,
        instance: &InstanceName,
        digests: &[Digest],
        zstd: bool,
    ) -> Result<Vec<Result<(Bytes, Option<Compressor>)>>> {
        let total: u64 = digests.iter().map(|d| d.size).sum();
        if total > MAX_BATCH_TOTAL_BYTES {
            return Err(Error::InvalidArgument(format!(
                "batch asks for {total} bytes, over the {MAX_BATCH_TOTAL_BYTES}-byte limit; use ByteStream for large blobs"
            )));
        }
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            let r = match self.get(instance, *d, MAX_BATCH_TOTAL_BYTES).await {
                Ok(Some(data)) if zstd && data.len() >= 512 => zstd::bulk::compress(&data, 1)
                    .map(|c| (Bytes::from(c), Some(Compressor::Zstd)))
                    .map_err(|e| Error::Internal(format!("zstd: {e}"))),
                Ok(Some(data)) => Ok((data, None)),
                Ok(None) => Err(Error::NotFound(format!("blob {d} not found"))),
                Err(e) => Err(e),
            };
            out.push(r);
        }
        Ok(out)
    }

    /// Streams `limit` bytes (0: to the end) of a blob from `offset`, in
    /// chunks, optionally as one zstd frame. Memory stays bounded by a few
    /// chunks whatever the blob's size.
    pub async fn read(
        &self,
        instance: &InstanceName,
        digest: Digest,
        offset: u64,
        limit: u64,
        compressor: Option<Compressor>,
    ) -> Result<mpsc::Receiver<Result<Bytes>>> {
        if offset > digest.size {
            return Err(Error::OutOfRange(format!("read_offset {offset} is past the end of blob {digest}")));
        }
        let meta = if digest.is_empty_blob() {
            None
        } else {
            let key = Key::new(instance, &digest);
            let store = self.store.clone();
            let meta = blocking(move || {
                let meta = store.blob_meta(&key)?;
                if meta.is_some() {
                    store.touch(Kind::Blob, &key);
                }
                Ok(meta)
            })
            .await?;
            Some(meta.ok_or_else(|| Error::NotFound(format!("blob {digest} not found")))?)
        };
        let end = if limit == 0 { digest.size } else { digest.size.min(offset.saturating_add(limit)) };
        let (tx, rx) = mpsc::channel(2);
        let store = self.store.clone();
        let key = Key::new(instance, &digest);
        tokio::task::spawn_blocking(move || {
            let mut sender = ChunkSender::new(tx, compressor);
            let result = match meta {
                None => Ok(()),
                Some(meta) => stream_chunks(&store, &key, &meta, digest, offset, end, &mut sender),
            };
            match result {
                Ok(()) => sender.finish(),
                Err(e) => sender.fail(e),
            }
        });
        Ok(rx)
    }

    /// GetTree: every directory reachable from `root`, breadth first, in pages.
    /// `page_token` is an offset into that order from an earlier response.
    pub async fn get_tree(
        &self,
        instance: &InstanceName,
        root: Digest,
        page_size: usize,
        page_token: &str,
    ) -> Result<Vec<(Vec<reapi::Directory>, String)>> {
        let start: usize = if page_token.is_empty() {
            0
        } else {
            page_token.strip_prefix('p').and_then(|n| n.parse().ok()).ok_or_else(|| {
                Error::InvalidArgument(format!("page_token {page_token:?} was not issued by this server"))
            })?
        };
        let page_size = if page_size == 0 { TREE_PAGE_DEFAULT } else { page_size.min(TREE_PAGE_DEFAULT * 10) };
        let Some(root_dir) = self.get_message::<reapi::Directory>(instance, root).await? else {
            return Err(Error::NotFound(format!("root directory {root} not found")));
        };
        let mut order: Vec<reapi::Directory> = Vec::new();
        let mut seen: HashSet<Digest> = HashSet::from([root]);
        let mut queue = std::collections::VecDeque::from([root_dir]);
        while let Some(dir) = queue.pop_front() {
            for child in &dir.directories {
                let d = Digest::from_proto(root.function, child.digest.as_ref())?;
                if seen.len() >= MAX_TREE_DIRECTORIES {
                    return Err(Error::InvalidArgument(format!(
                        "tree has more than {MAX_TREE_DIRECTORIES} directories"
                    )));
                }
                if seen.insert(d) {
                    // Missing subtrees are skipped: GetTree returns what is present.
                    if let Some(sub) = self.get_message::<reapi::Directory>(instance, d).await? {
                        queue.push_back(sub);
                    }
                }
            }
            order.push(dir);
        }
        let mut pages = Vec::new();
        let mut page = Vec::new();
        let mut page_bytes = 0;
        for (i, dir) in order.into_iter().enumerate().skip(start) {
            let len = dir.encoded_len();
            if !page.is_empty() && (page.len() >= page_size || page_bytes + len > TREE_PAGE_BYTES) {
                pages.push((std::mem::take(&mut page), format!("p{i}")));
                page_bytes = 0;
            }
            page_bytes += len;
            page.push(dir);
        }
        if !page.is_empty() || pages.is_empty() {
            pages.push((page, String::new()));
        }
        Ok(pages)
    }
}

fn type_name<M>() -> &'static str {
    std::any::type_name::<M>().rsplit("::").next().unwrap_or("message")
}

/// Decompresses a batch blob, refusing output larger than the digest says.
pub fn decompress(data: Bytes, compressor: Option<Compressor>, size: u64) -> Result<Bytes> {
    match compressor {
        None => Ok(data),
        Some(Compressor::Zstd) => {
            let mut out = Vec::with_capacity(size.min(MAX_BATCH_TOTAL_BYTES) as usize);
            let mut decoder = zstd::stream::read::Decoder::new(&data[..])
                .map_err(|e| Error::InvalidArgument(format!("invalid zstd data: {e}")))?;
            let mut limited = std::io::Read::take(&mut decoder, size + 1);
            std::io::Read::read_to_end(&mut limited, &mut out)
                .map_err(|e| Error::InvalidArgument(format!("invalid zstd data: {e}")))?;
            if out.len() as u64 > size {
                return Err(Error::InvalidArgument(format!(
                    "zstd data decompresses to more than the digest's {size} bytes"
                )));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Sends read chunks, optionally through one zstd frame.
struct ChunkSender {
    tx: mpsc::Sender<Result<Bytes>>,
    encoder: Option<zstd::stream::write::Encoder<'static, Vec<u8>>>,
    sent_any: bool,
}

impl ChunkSender {
    fn new(tx: mpsc::Sender<Result<Bytes>>, compressor: Option<Compressor>) -> Self {
        let encoder = compressor.map(|Compressor::Zstd| {
            zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd encoder with a valid level")
        });
        ChunkSender { tx, encoder, sent_any: false }
    }

    /// Returns false when the reader went away.
    fn send(&mut self, data: Vec<u8>) -> Result<bool> {
        let out = match &mut self.encoder {
            None => data,
            Some(enc) => {
                std::io::Write::write_all(enc, &data).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
                std::mem::take(enc.get_mut())
            }
        };
        if out.is_empty() {
            return Ok(true);
        }
        self.sent_any = true;
        Ok(self.tx.blocking_send(Ok(Bytes::from(out))).is_ok())
    }

    fn finish(mut self) {
        let tail = match self.encoder.take() {
            Some(enc) => match enc.finish() {
                Ok(v) => v,
                Err(e) => return self.fail(Error::Internal(format!("zstd: {e}"))),
            },
            None => Vec::new(),
        };
        if !tail.is_empty() || !self.sent_any {
            let _ = self.tx.blocking_send(Ok(Bytes::from(tail)));
        }
    }

    fn fail(self, e: Error) {
        let _ = self.tx.blocking_send(Err(e));
    }
}

/// Reads `[offset, end)` of a blob chunk by chunk. A read that covers the
/// whole blob is hash-checked as it goes; a single-chunk blob, and the whole
/// of a multi-chunk blob read in part, are checked before any byte is sent; a
/// corrupt blob is deleted and the read fails.
fn stream_chunks(
    store: &Store,
    key: &Key,
    meta: &BlobMeta,
    digest: Digest,
    offset: u64,
    end: u64,
    sender: &mut ChunkSender,
) -> Result<()> {
    if meta.size != digest.size {
        return Err(Error::DataLoss(format!("stored blob {digest} has size {}", meta.size)));
    }
    let chunk = meta.chunk_size as u64;
    let whole = offset == 0 && end == digest.size;
    let mut hasher = whole.then(|| digest.function.hasher());
    let corrupt = |store: &Store| -> Error {
        tracing::error!(%digest, "stored blob does not match its digest; deleting it");
        if let Err(e) = store.delete_blob(key) {
            tracing::error!(%digest, error = %e, "could not delete corrupt blob");
        }
        Error::DataLoss(format!("stored blob {digest} was corrupt and has been removed"))
    };
    if meta.chunks() == 1 && offset < end {
        let data = store.read_chunk(meta, 0)?;
        if digest.verify(&data).is_err() {
            return Err(corrupt(store));
        }
        sender.send(data[offset as usize..end as usize].to_vec())?;
        return Ok(());
    }
    // A ranged read of a multi-chunk blob cannot be hash-checked as it goes:
    // check the whole blob first (one extra pass, a chunk at a time), so that
    // no read ever succeeds with bytes that do not match the digest.
    if !whole && offset < end {
        let mut h = digest.function.hasher();
        for index in 0..meta.chunks() {
            h.update(&store.read_chunk(meta, index)?);
        }
        if h.finalize() != digest.hash {
            return Err(corrupt(store));
        }
    }
    let mut pos = offset;
    while pos < end {
        let index = (pos / chunk) as u32;
        let data = store.read_chunk(meta, index)?;
        if let Some(h) = &mut hasher {
            h.update(&data);
        }
        let from = (pos - index as u64 * chunk) as usize;
        let to = ((end - index as u64 * chunk) as usize).min(data.len());
        let piece = if from == 0 && to == data.len() { data } else { data[from..to].to_vec() };
        pos += piece.len() as u64;
        if pos >= end {
            if let Some(h) = hasher.take() {
                if h.finalize() != digest.hash {
                    return Err(corrupt(store));
                }
            }
        }
        if !sender.send(piece)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Resolves the digest function of a request and parses a digest with it.
pub fn parse_digest(function: i32, digest: Option<&reapi::Digest>) -> Result<Digest> {
    let f = DigestFunction::from_proto(function)?;
    Ok(Digest::from_proto(f, digest)?)
}

const _: () = assert!(CHUNK_SIZE as u64 <= MAX_BATCH_TOTAL_BYTES);
