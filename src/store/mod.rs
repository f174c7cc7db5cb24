//! The storage contract: what the domain needs of a blob store, in terms of
//! instances and digests, with no storage engine in sight.
//!
//! [`BlobStore`] is the whole of it for the CAS and uploads: which blobs are
//! present, whole and ranged reads, whole and streamed writes, removal of a
//! blob that failed its digest, and the "can this ever fit" refusal. Key
//! encodings, chunking, write-ahead-log decisions, memory-only fast paths
//! and blocking-pool hops belong to a backend: [`rocks`] (RocksDB, the
//! server's) and [`memory`] (a map, for the domain's unit tests). A new
//! backend (an object store, a read-through pair of stores) is a new file
//! implementing these traits.
//!
//! Backend failures reach the domain as a [`StoreError`], whose
//! [`StoreErrorKind`] decides the gRPC code in [`crate::error`].

pub mod action_store;
pub mod hit_log_store;
pub mod memory;
pub mod memory_actions;
pub mod object;
pub mod replica;
pub mod rocks;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};

/// What went wrong in a backend, as far as a client's answer depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The backend is out of space: the client may retry later
    /// (RESOURCE_EXHAUSTED).
    NoSpace,
    /// Stored data failed a checksum (DATA_LOSS; clients treat it as a miss).
    Corruption,
    /// The backend cannot be reached or is shutting down (UNAVAILABLE).
    Unavailable,
    /// A concurrent writer (another replica) took the slot this write wanted,
    /// such as a hit-log sequence: the caller may re-read and retry (ABORTED).
    Conflict,
    /// The store is held open by another process (RocksDB's lock file):
    /// only met when opening, where `serve` and `backup` say which directory
    /// and what to do. UNAVAILABLE if it ever reached a caller.
    Locked,
    /// Anything else (INTERNAL).
    Other,
}

/// A backend failure: its kind (which the gRPC code follows) and the
/// backend's own message (which the operator reads).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

impl StoreError {
    /// A failure of `kind`, described by `message`.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError { kind, message: message.into() }
    }

    /// What kind of failure it was.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

/// The bytes of a ranged read, piece by piece, so memory stays bounded
/// whatever the blob's size. An error ends it.
pub type BlobStream = BoxStream<'static, Result<Bytes>>;

/// A blob store, addressed by instance and digest. The empty blob is the
/// domain's business: it is never asked for, written or deleted here.
///
/// Async and object-safe (the domain holds an `Arc<dyn BlobStore>`, so tests
/// swap the backend without making every domain type generic).
#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Which of `digests` are stored, in order. The present ones count as
    /// used (they are kept longest when space runs short).
    async fn contains(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<bool>>;

    /// A whole stored blob (`None` if absent), counted as used. Not checked
    /// against its digest: the caller checks, and calls
    /// [`BlobStore::delete`] on a mismatch.
    async fn get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>>;

    /// Bytes `[offset, end)` of a stored blob (`None` if absent), counted as
    /// used. Every byte is checked against the digest before it is yielded
    /// (a ranged read cannot be checked by its caller); a blob that fails is
    /// removed and the stream ends with DATA_LOSS ([`corrupt_blob`]).
    async fn read(&self, instance: &InstanceName, digest: Digest, offset: u64, end: u64) -> Result<Option<BlobStream>>;

    /// Stores a whole blob the caller has checked against `digest` (a no-op
    /// if it is already stored). Refuses one that can never fit, as
    /// [`BlobStore::check_fits`].
    async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()>;

    /// Starts a streamed write of a blob of `digest.size` bytes, invisible
    /// until [`BlobWriter::commit`]: what a resumable upload writes into as
    /// its bytes arrive.
    async fn begin_write(&self, instance: &InstanceName, digest: Digest) -> Result<Box<dyn BlobWriter>>;

    /// Removes a stored blob (one that failed its digest); absent is fine.
    async fn delete(&self, instance: &InstanceName, digest: Digest) -> Result<()>;

    /// Refuses, with RESOURCE_EXHAUSTED, a blob of `size` bytes that could
    /// never fit in this store, before anyone uploads it.
    fn check_fits(&self, size: u64) -> Result<()>;
}

/// A blob being written: bytes are appended in order, then the blob is
/// committed (after the caller checked the digest) or abandoned. Dropping a
/// writer without either leaves its bytes for the backend to clean up.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends the next bytes (any size; the backend buffers as it needs).
    async fn write(&mut self, data: Bytes) -> Result<()>;

    /// Makes the blob visible under its digest. If another writer stored the
    /// same blob first, that copy stays and this one is dropped.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// Abandons the blob and frees what was written.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// The error for a stored blob found not to match its digest, after the
/// caller tried to remove it (`removed`): logged loudly, DATA_LOSS to the
/// client, which then uploads it again.
pub fn corrupt_blob(digest: Digest, removed: Result<()>) -> Error {
    tracing::error!(%digest, "stored blob does not match its digest; deleting it");
    if let Err(e) = removed {
        tracing::error!(%digest, error = %e, "could not delete corrupt blob");
    }
    Error::DataLoss(format!("stored blob {digest} was corrupt and has been removed"))
}
