//! The Content Addressable Storage domain: hash-checked writes, verified
//! reads, batch calls and GetTree, on top of any [`BlobStore`].

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;

use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::{Compressor, InstanceName};
use crate::error::{Error, Result};
use crate::limits::Enforcer;
use crate::proto::reapi;
use crate::store::{corrupt_blob, BlobStore, BlobStream};

/// The largest total of blob sizes in one batch call (advertised in Capabilities).
pub const MAX_BATCH_TOTAL_BYTES: u64 = 4 * 1024 * 1024;
/// Blobs of one batch call stored or read at once: over an object store each
/// is a round trip, so a batch takes about as long as its slowest few blobs,
/// while the calls one batch holds open stay bounded. Results keep request order.
const BATCH_CONCURRENCY: usize = 16;
/// The largest blob the server decodes as a Directory or Tree; its entries
/// are counted before decoding as well (`limits.max_directory_nodes`,
/// `limits.max_tree_nodes`).
pub const MAX_DECODED_BLOB: u64 = 64 * 1024 * 1024;
/// The largest Action blob the server decodes. Real Actions are a few hundred
/// bytes; a large one could only be many empty repeated fields, which decode
/// to many times their size.
pub const MAX_ACTION_BLOB: u64 = 1024 * 1024;
/// What GetTree counts, against `limits.max_get_tree_memory`, for each
/// directory it has seen: the digest in its seen-set and in its queue.
pub const GET_TREE_BYTES_PER_DIRECTORY: u64 = 128;
/// Whole-blob reads up to this size are checked against their digest on the
/// async worker (a few microseconds); larger ones on the blocking pool.
const VERIFY_ON_WORKER_MAX: usize = 64 * 1024;
/// Default and maximum number of directories in one GetTree response.
const TREE_PAGE_DEFAULT: usize = 1000;
/// GetTree responses stay below this encoded size (gRPC's default limit is 4 MiB).
const TREE_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// The CAS: the rules (digests checked on every write and read, the empty
/// blob always present, batch and decode limits) over a [`BlobStore`].
#[derive(Debug)]
pub struct Cas {
    blobs: Arc<dyn BlobStore>,
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
    /// A CAS over `blobs`.
    pub fn new(blobs: Arc<dyn BlobStore>) -> Self {
        Cas { blobs }
    }

    /// The digests among `digests` that are not stored (the empty blob is
    /// always present). The present ones count as used.
    pub async fn find_missing(&self, instance: &InstanceName, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        let mut seen = HashSet::new();
        let wanted: Vec<Digest> = digests.into_iter().filter(|d| !d.is_empty_blob() && seen.insert(*d)).collect();
        if wanted.is_empty() {
            return Ok(vec![]);
        }
        let present = self.blobs.contains(instance, &wanted).await?;
        Ok(wanted.into_iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| d).collect())
    }

    /// The first of `digests` that is missing, if any.
    pub async fn first_missing(&self, instance: &InstanceName, digests: Vec<Digest>) -> Result<Option<Digest>> {
        Ok(self.find_missing(instance, digests).await?.into_iter().next())
    }

    /// Whether a blob is stored (ByteStream ends a write of a stored blob
    /// early, and answers QueryWriteStatus for it). It counts as used.
    pub async fn contains(&self, instance: &InstanceName, digest: Digest) -> Result<bool> {
        Ok(self.first_missing(instance, vec![digest]).await?.is_none())
    }

    /// Refuses, before any byte is sent, a blob of `size` bytes that could
    /// never fit in this cache (RESOURCE_EXHAUSTED).
    pub fn check_fits(&self, size: u64) -> Result<()> {
        self.blobs.check_fits(size)
    }

    /// Verifies and stores a blob held in memory.
    pub async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        digest.verify(&data)?;
        if digest.is_empty_blob() {
            return Ok(());
        }
        self.blobs.put(instance, digest, data).await
    }

    /// Reads a whole blob of at most `max` bytes into memory, verifying its
    /// digest: a stored blob that does not match is removed and the read is
    /// DATA_LOSS. `Ok(None)` if it is not stored.
    pub async fn get(&self, instance: &InstanceName, digest: Digest, max: u64) -> Result<Option<Bytes>> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        if digest.size > max {
            return Err(Error::InvalidArgument(format!(
                "blob {digest} is larger than the {max}-byte limit for this call"
            )));
        }
        let Some(data) = self.blobs.get(instance, digest).await? else { return Ok(None) };
        // Hashing a large blob would hold up every call on this worker.
        let (data, verified) = if data.len() < VERIFY_ON_WORKER_MAX {
            let verified = digest.verify(&data).is_ok();
            (data, verified)
        } else {
            tokio::task::spawn_blocking(move || {
                let verified = digest.verify(&data).is_ok();
                (data, verified)
            })
            .await?
        };
        if !verified {
            return Err(corrupt_blob(digest, self.blobs.delete(instance, digest).await));
        }
        Ok(Some(data))
    }

    /// Reads and decodes a small protobuf message stored in the CAS (an
    /// Action), refusing a blob larger than `max` bytes before reading it.
    pub async fn get_message<M: Message + Default>(
        &self,
        instance: &InstanceName,
        digest: Digest,
        max: u64,
    ) -> Result<Option<M>> {
        match self.get(instance, digest, max).await? {
            Some(bytes) => decode::<M>(digest, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Reads a Directory, counting its entries before decoding it: a blob of
    /// empty entries decodes to some 60 times its size, so one over
    /// `limits.max_directory_nodes` is refused without being decoded.
    pub async fn get_directory(
        &self,
        instance: &InstanceName,
        digest: Digest,
        limits: &Enforcer,
    ) -> Result<Option<reapi::Directory>> {
        let Some(bytes) = self.get(instance, digest, MAX_DECODED_BLOB).await? else { return Ok(None) };
        let entries = directory_entries(&bytes).ok_or_else(|| malformed::<reapi::Directory>(digest))?;
        let max = limits.limits().max_directory_nodes;
        limits.at_most(
            "max_directory_nodes",
            format_args!("Directory {digest} has too many entries"),
            entries,
            max as u64,
        )?;
        decode(digest, &bytes).map(Some)
    }

    /// Reads an output directory's Tree, counting before decoding: its
    /// directories and entries (`limits.max_tree_nodes`), the entries of
    /// each directory (`limits.max_directory_nodes`), and its files, which
    /// must fit in `max_files` (what is left of the result's
    /// `limits.max_referenced_blobs`).
    pub async fn get_tree_message(
        &self,
        instance: &InstanceName,
        digest: Digest,
        max_files: u64,
        limits: &Enforcer,
    ) -> Result<Option<reapi::Tree>> {
        let Some(bytes) = self.get(instance, digest, MAX_DECODED_BLOB).await? else { return Ok(None) };
        let shape = tree_shape(&bytes).ok_or_else(|| malformed::<reapi::Tree>(digest))?;
        let l = limits.limits();
        let what = |of: &str| format!("Tree {digest} has too many {of}");
        limits.at_most("max_tree_nodes", what("directories and entries"), shape.nodes, l.max_tree_nodes as u64)?;
        let largest = shape.largest_directory;
        limits.at_most(
            "max_directory_nodes",
            what("entries in one directory"),
            largest,
            l.max_directory_nodes as u64,
        )?;
        limits.at_most("max_referenced_blobs", what("files for this result"), shape.files, max_files)?;
        decode(digest, &bytes).map(Some)
    }

    /// BatchUpdateBlobs: one status per blob, in request order.
    pub async fn batch_update(
        &self,
        instance: &InstanceName,
        blobs: Vec<BatchBlob>,
        limits: &Enforcer,
    ) -> Result<Vec<Result<()>>> {
        let total: u64 = blobs.iter().map(|b| b.digest.as_ref().map(|d| d.size).unwrap_or(0)).sum();
        if total > MAX_BATCH_TOTAL_BYTES {
            return Err(Error::InvalidArgument(format!(
                "batch holds {total} bytes, over the {MAX_BATCH_TOTAL_BYTES}-byte limit; use ByteStream for large blobs"
            )));
        }
        let stores = blobs.into_iter().map(|blob| async move {
            let digest = blob.digest?;
            let data = decompress(blob.data, blob.compressor, digest.size, limits)?;
            self.put(instance, digest, data).await
        });
        Ok(futures::stream::iter(stores).buffered(BATCH_CONCURRENCY).collect().await)
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
        let reads = digests.iter().copied().map(|d| async move {
            match self.get(instance, d, MAX_BATCH_TOTAL_BYTES).await? {
                Some(data) if zstd && data.len() >= 512 => zstd::bulk::compress(&data, 1)
                    .map(|c| (Bytes::from(c), Some(Compressor::Zstd)))
                    .map_err(|e| Error::Internal(format!("zstd: {e}"))),
                Some(data) => Ok((data, None)),
                None => Err(Error::NotFound(format!("blob {d} not found"))),
            }
        });
        Ok(futures::stream::iter(reads).buffered(BATCH_CONCURRENCY).collect().await)
    }

    /// Streams `limit` bytes (0: to the end) of a blob from `offset`, in
    /// pieces, optionally as one zstd frame; always at least one piece (an
    /// empty one for an empty range). Memory stays bounded by a few pieces
    /// whatever the blob's size.
    pub async fn read(
        &self,
        instance: &InstanceName,
        digest: Digest,
        offset: u64,
        limit: u64,
        compressor: Option<Compressor>,
    ) -> Result<BlobStream> {
        if offset > digest.size {
            return Err(Error::OutOfRange(format!("read_offset {offset} is past the end of blob {digest}")));
        }
        let end = if limit == 0 { digest.size } else { digest.size.min(offset.saturating_add(limit)) };
        let pieces: BlobStream = if digest.is_empty_blob() {
            Box::pin(futures::stream::empty())
        } else {
            self.blobs
                .read(instance, digest, offset, end)
                .await?
                .ok_or_else(|| Error::NotFound(format!("blob {digest} not found")))?
        };
        Ok(match compressor {
            None => at_least_one_piece(pieces),
            Some(compressor) => compressed(pieces, compressor),
        })
    }

    /// GetTree: every directory reachable from `root`, breadth first, in
    /// pages sent as they fill (at most two pages wait for a slow reader), so
    /// memory stays within `limits.max_get_tree_memory` whatever the tree:
    /// the walk keeps only digests of the directories still to visit, and
    /// stops with RESOURCE_EXHAUSTED naming the limit when even those do not
    /// fit. `page_token` is an offset into that order from an earlier page.
    /// Missing subtrees are skipped: GetTree returns what is present.
    pub async fn get_tree(
        self: Arc<Self>,
        instance: InstanceName,
        root: Digest,
        page_size: usize,
        page_token: &str,
        limits: Enforcer,
    ) -> Result<mpsc::Receiver<Result<TreePage>>> {
        let start: usize = if page_token.is_empty() {
            0
        } else {
            page_token.strip_prefix('p').and_then(|n| n.parse().ok()).ok_or_else(|| {
                Error::InvalidArgument(format!("page_token {page_token:?} was not issued by this server"))
            })?
        };
        let page_size = if page_size == 0 { TREE_PAGE_DEFAULT } else { page_size.min(TREE_PAGE_DEFAULT * 10) };
        let Some(root_dir) = self.get_directory(&instance, root, &limits).await? else {
            return Err(Error::NotFound(format!("root directory {root} not found")));
        };
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let walk = TreeWalk { cas: &self, instance: &instance, root, limits: &limits, tx: &tx };
            if let Err(e) = walk.run(root_dir, start, page_size).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }
}

/// One page of GetTree: its directories and the token of the next page
/// (empty after the last).
pub type TreePage = (Vec<reapi::Directory>, String);

/// A GetTree call's walk (see [`Cas::get_tree`]).
struct TreeWalk<'a> {
    cas: &'a Cas,
    instance: &'a InstanceName,
    root: Digest,
    limits: &'a Enforcer,
    tx: &'a mpsc::Sender<Result<TreePage>>,
}

impl TreeWalk<'_> {
    async fn run(&self, root_dir: reapi::Directory, start: usize, page_size: usize) -> Result<()> {
        let budget = self.limits.limits().max_get_tree_memory;
        let mut seen: HashSet<Digest> = HashSet::from([self.root]);
        let mut queue = std::collections::VecDeque::new();
        let mut page = Vec::new();
        let mut page_bytes = 0usize;
        let mut index = 0usize;
        let mut next = Some(root_dir);
        while let Some(dir) = next.take() {
            for child in &dir.directories {
                let d = Digest::from_proto(self.root.function, child.digest.as_ref())?;
                if seen.insert(d) {
                    queue.push_back(d);
                }
            }
            let len = dir.encoded_len();
            let used = seen.len() as u64 * GET_TREE_BYTES_PER_DIRECTORY + (page_bytes + len) as u64;
            if used > budget {
                let root = self.root;
                return Err(self.limits.refuse(
                    "max_get_tree_memory",
                    Error::ResourceExhausted(format!(
                        "GetTree of {root} needs more than its {budget}-byte memory budget \
                         (limits.max_get_tree_memory) after {} directories; ask for a smaller subtree",
                        seen.len()
                    )),
                ));
            }
            if index >= start {
                if !page.is_empty() && (page.len() >= page_size || page_bytes + len > TREE_PAGE_BYTES) {
                    if self.tx.send(Ok((std::mem::take(&mut page), format!("p{index}")))).await.is_err() {
                        return Ok(()); // the client went away
                    }
                    page_bytes = 0;
                }
                page_bytes += len;
                page.push(dir);
            }
            index += 1;
            if index % 64 == 0 {
                // Directories read from memory never wait: let other calls run.
                tokio::task::yield_now().await;
            }
            while let Some(d) = queue.pop_front() {
                if let Some(sub) = self.cas.get_directory(self.instance, d, self.limits).await? {
                    next = Some(sub);
                    break;
                }
            }
        }
        let _ = self.tx.send(Ok((page, String::new()))).await;
        Ok(())
    }
}

fn decode<M: Message + Default>(digest: Digest, bytes: &[u8]) -> Result<M> {
    M::decode(bytes)
        .map_err(|e| Error::InvalidArgument(format!("blob {digest} is not a valid {}: {e}", type_name::<M>())))
}

fn malformed<M>(digest: Digest) -> Error {
    Error::InvalidArgument(format!("blob {digest} is not a valid {}: malformed protobuf", type_name::<M>()))
}

/// Walks the fields of one protobuf message level without decoding them:
/// `f(field number, payload of a length-delimited field)`. `None` when the
/// bytes are not a well-formed message. Costs one pass, no allocation.
fn scan_fields(buf: &[u8], mut f: impl FnMut(u64, Option<&[u8]>) -> Option<()>) -> Option<()> {
    fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *buf.get(*pos)?;
            *pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let field = key >> 3;
        match key & 7 {
            0 => {
                varint(buf, &mut pos)?;
                f(field, None)?;
            }
            1 => pos = pos.checked_add(8).filter(|&p| p <= buf.len())?,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let end = pos.checked_add(len).filter(|&e| e <= buf.len())?;
                f(field, Some(&buf[pos..end]))?;
                pos = end;
            }
            5 => pos = pos.checked_add(4).filter(|&p| p <= buf.len())?,
            _ => return None,
        }
    }
    Some(())
}

/// Entries (files, directories, symlinks) of an encoded Directory, and how
/// many of them are files.
fn directory_counts(buf: &[u8]) -> Option<(u64, u64)> {
    let (mut entries, mut files) = (0u64, 0u64);
    scan_fields(buf, |field, _| {
        if matches!(field, 1..=3) {
            entries += 1;
            files += u64::from(field == 1);
        }
        Some(())
    })?;
    Some((entries, files))
}

/// Entries of an encoded Directory.
fn directory_entries(buf: &[u8]) -> Option<u64> {
    directory_counts(buf).map(|(entries, _)| entries)
}

/// What an encoded Tree holds, counted without decoding it.
#[derive(Debug, Default, PartialEq, Eq)]
struct TreeShape {
    /// Directories plus all their entries.
    nodes: u64,
    /// File entries.
    files: u64,
    /// Entries of the largest directory.
    largest_directory: u64,
}

fn tree_shape(buf: &[u8]) -> Option<TreeShape> {
    let mut shape = TreeShape::default();
    scan_fields(buf, |field, payload| {
        if let (1 | 2, Some(dir)) = (field, payload) {
            let (entries, files) = directory_counts(dir)?;
            shape.nodes += 1 + entries;
            shape.files += files;
            shape.largest_directory = shape.largest_directory.max(entries);
        }
        Some(())
    })?;
    Some(shape)
}

fn type_name<M>() -> &'static str {
    std::any::type_name::<M>().rsplit("::").next().unwrap_or("message")
}

/// Decompresses a batch blob, refusing output larger than the digest says
/// and frames that need a larger window than `limits.zstd_window_log_max`.
pub fn decompress(data: Bytes, compressor: Option<Compressor>, size: u64, limits: &Enforcer) -> Result<Bytes> {
    match compressor {
        None => Ok(data),
        Some(Compressor::Zstd) => {
            let mut out = Vec::with_capacity(size.min(MAX_BATCH_TOTAL_BYTES) as usize);
            let invalid = |e: std::io::Error| zstd_error(e, limits);
            let mut decoder = zstd::stream::read::Decoder::new(&data[..]).map_err(invalid)?;
            decoder.window_log_max(limits.limits().zstd_window_log_max).map_err(invalid)?;
            let mut limited = std::io::Read::take(&mut decoder, size + 1);
            std::io::Read::read_to_end(&mut limited, &mut out).map_err(invalid)?;
            if out.len() as u64 > size {
                return Err(Error::InvalidArgument(format!(
                    "zstd data decompresses to more than the digest's {size} bytes"
                )));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// A zstd decoding error for the client: a frame that needs a larger window
/// than allowed names the limit (and counts as its hit); anything else is
/// invalid data.
pub fn zstd_error(e: std::io::Error, limits: &Enforcer) -> Error {
    // zstd's message for ZSTD_error_frameParameter_windowTooLarge.
    if e.to_string().contains("too much memory") {
        let log = limits.limits().zstd_window_log_max;
        return limits.refuse(
            "zstd_window_log_max",
            Error::InvalidArgument(format!(
                "the zstd frame needs a window larger than 2^{log} bytes (limits.zstd_window_log_max); \
                 compress with a smaller window"
            )),
        );
    }
    Error::InvalidArgument(format!("invalid zstd data: {e}"))
}

/// `pieces`, or one empty piece if there are none: a ByteStream read
/// always answers at least once.
fn at_least_one_piece(pieces: BlobStream) -> BlobStream {
    Box::pin(futures::stream::unfold((pieces.fuse(), false), |(mut pieces, sent)| async move {
        match pieces.next().await {
            Some(piece) => Some((piece, (pieces, true))),
            None if !sent => Some((Ok(Bytes::new()), (pieces, true))),
            None => None,
        }
    }))
}

/// `pieces` as one zstd frame, compressed on a blocking thread.
fn compressed(mut pieces: BlobStream, Compressor::Zstd: Compressor) -> BlobStream {
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut sender = ZstdSender::new(tx);
        while let Some(piece) = futures::executor::block_on(pieces.next()) {
            match piece.and_then(|data| sender.send(&data)) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return sender.fail(e),
            }
        }
        sender.finish();
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Sends read pieces through one zstd frame.
struct ZstdSender {
    tx: mpsc::Sender<Result<Bytes>>,
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    sent_any: bool,
}

impl ZstdSender {
    fn new(tx: mpsc::Sender<Result<Bytes>>) -> Self {
        let encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd encoder with a valid level");
        ZstdSender { tx, encoder, sent_any: false }
    }

    /// Returns false when the reader went away.
    fn send(&mut self, data: &[u8]) -> Result<bool> {
        std::io::Write::write_all(&mut self.encoder, data).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
        let out = std::mem::take(self.encoder.get_mut());
        if out.is_empty() {
            return Ok(true);
        }
        self.sent_any = true;
        Ok(self.tx.blocking_send(Ok(Bytes::from(out))).is_ok())
    }

    /// Ends the frame (the reader gets at least one piece).
    fn finish(self) {
        match self.encoder.finish() {
            Ok(tail) if !tail.is_empty() || !self.sent_any => {
                let _ = self.tx.blocking_send(Ok(Bytes::from(tail)));
            }
            Ok(_) => {}
            Err(e) => {
                let _ = self.tx.blocking_send(Err(Error::Internal(format!("zstd: {e}"))));
            }
        }
    }

    fn fail(self, e: Error) {
        let _ = self.tx.blocking_send(Err(e));
    }
}

/// Resolves the digest function of a request and parses a digest with it.
pub fn parse_digest(function: i32, digest: Option<&reapi::Digest>) -> Result<Digest> {
    let f = DigestFunction::from_proto(function)?;
    Ok(Digest::from_proto(f, digest)?)
}

#[cfg(test)]
mod domain_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: usize, dirs: usize) -> reapi::Directory {
        let node = |i: usize| format!("n{i}");
        reapi::Directory {
            files: (0..files).map(|i| reapi::FileNode { name: node(i), ..Default::default() }).collect(),
            directories: (0..dirs).map(|i| reapi::DirectoryNode { name: node(i), ..Default::default() }).collect(),
            symlinks: vec![reapi::SymlinkNode { name: "l".into(), target: "t".into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn entries_are_counted_without_decoding_and_agree_with_the_decoder() {
        let d = dir(5, 3);
        assert_eq!(directory_counts(&d.encode_to_vec()), Some((9, 5)));
        let tree = reapi::Tree { root: Some(dir(2, 1)), children: vec![dir(4, 0), dir(0, 0)] };
        let shape = tree_shape(&tree.encode_to_vec()).unwrap();
        assert_eq!(shape, TreeShape { nodes: 3 + (2 + 1 + 1) + (4 + 1) + 1, files: 6, largest_directory: 5 });
        // A blob of empty FileNodes: two bytes each.
        let empty = [0x0a, 0x00].repeat(1000);
        assert_eq!(directory_entries(&empty), Some(1000));
        assert_eq!(reapi::Directory::decode(&empty[..]).unwrap().files.len(), 1000);
    }

    #[test]
    fn malformed_bytes_are_not_counted() {
        for bad in [&[0x0a, 0x05, 0x00][..], &[0x80][..], &[0x0b][..]] {
            assert_eq!(directory_entries(bad), None, "{bad:?}");
        }
    }
}
