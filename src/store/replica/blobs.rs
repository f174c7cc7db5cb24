//! [`ReadThroughBlobs`]: the replica's local blob store as a size-bounded
//! read-through, write-through cache of the remote one.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::fill::{serve_from_remote, Fills, Request};
use super::stats::{is_unavailable, ReplicaStats};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::Result;
use crate::store::{BlobStore, BlobStream, BlobWriter};

/// Blobs smaller than this are hashed on the calling worker; larger ones on
/// the blocking pool, so one big blob does not hold up other requests.
const VERIFY_ON_WORKER_MAX: usize = 256 * 1024;

/// A [`BlobStore`] whose source of truth is `remote` (the shared bucket) and
/// whose `local` store (this replica's RocksDB) only caches it.
///
/// - Writes are write-through: acknowledged once the remote has committed
///   them, so every replica can read what any replica acknowledged. The
///   local copy is best effort.
/// - Reads try the local cache first. Bytes from the remote are checked
///   against the digest before they are cached or served (a ranged read of
///   a large blob the local cache cannot hold is the one exception: see
///   [`BlobStore::read`] below).
/// - The remote decides presence and size limits: a blob only in the local
///   cache may already have expired from the bucket, and other replicas must
///   be able to read what this one reports present.
#[derive(Debug)]
pub struct ReadThroughBlobs {
    local: Arc<dyn BlobStore>,
    remote: Arc<dyn BlobStore>,
    stats: Arc<ReplicaStats>,
    fills: Fills,
}

impl ReadThroughBlobs {
    /// A replica's blob store: `local` caches `remote`; both count into
    /// `stats` (shared with the replica's [`super::CachedActions`]).
    pub fn new(local: Arc<dyn BlobStore>, remote: Arc<dyn BlobStore>, stats: Arc<ReplicaStats>) -> Self {
        ReadThroughBlobs { local, remote, stats, fills: Fills::default() }
    }

    /// Best-effort local copy of a blob already stored in the remote: the
    /// remote has it, so a local failure costs only a later remote read.
    async fn cache_locally(&self, instance: &InstanceName, digest: Digest, data: Bytes) {
        if self.local.check_fits(digest.size).is_err() {
            return;
        }
        if let Err(error) = self.local.put(instance, digest, data).await {
            tracing::warn!(%digest, %error, "could not cache a blob locally");
        }
    }

    /// A local blob that failed its digest is removed from the local cache
    /// only (the remote's copy may be fine) and treated as a miss, as is a
    /// failure of the local store.
    async fn local_get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>> {
        let data = match self.local.get(instance, digest).await {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(None),
            Err(error) => {
                tracing::warn!(%digest, %error, "local cache could not serve a blob; reading through");
                return Ok(None);
            }
        };
        let (data, good) = verify(digest, data).await?;
        if good {
            return Ok(Some(data));
        }
        tracing::error!(%digest, "locally cached blob does not match its digest; dropping the local copy");
        if let Err(error) = self.local.delete(instance, digest).await {
            tracing::error!(%digest, %error, "could not delete a corrupt local blob");
        }
        Ok(None)
    }
}

/// Checks `data` against `digest`, on the blocking pool if it is large.
pub(super) async fn verify(digest: Digest, data: Bytes) -> Result<(Bytes, bool)> {
    if data.len() < VERIFY_ON_WORKER_MAX {
        let good = digest.verify(&data).is_ok();
        return Ok((data, good));
    }
    Ok(tokio::task::spawn_blocking(move || {
        let good = digest.verify(&data).is_ok();
        (data, good)
    })
    .await?)
}

#[async_trait]
impl BlobStore for ReadThroughBlobs {
    /// The remote's answer; while it is unavailable, the local cache's (what
    /// this replica can serve now), counted and logged once per outage.
    async fn contains(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<bool>> {
        match self.remote.contains(instance, digests).await {
            Ok(present) => {
                self.stats.remote_answered();
                Ok(present)
            }
            Err(error) if is_unavailable(&error) => {
                let present = self.local.contains(instance, digests).await?;
                self.stats.served_while_unavailable(&error);
                Ok(present)
            }
            Err(error) => Err(error),
        }
    }

    /// Local first (checked here, so a damaged local copy never makes the
    /// caller delete the remote's); then the remote, whose bytes are cached
    /// only if they match. Bytes that do not are counted and returned as
    /// they are: the caller's digest check then deletes them ([`Self::delete`]
    /// removes the remote object too).
    async fn get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>> {
        if let Some(data) = self.local_get(instance, digest).await? {
            self.stats.cas_local_hit();
            return Ok(Some(data));
        }
        let Some(data) = self.remote.get(instance, digest).await? else { return Ok(None) };
        let (data, good) = verify(digest, data).await?;
        if good {
            self.stats.cas_remote_fill();
            self.cache_locally(instance, digest, data.clone()).await;
        } else {
            self.stats.corrupt_from_remote();
        }
        Ok(Some(data))
    }

    /// Local first (a local failure counts as a miss). On a miss, a blob that fits the local cache is first
    /// downloaded whole into it, hashed on the way and committed only if it
    /// matches (readers of the same blob share one download); the range is
    /// then served from the local copy, so every byte served was checked. A
    /// mismatch removes the remote object and ends in DATA_LOSS.
    ///
    /// A blob the local cache cannot hold (too large for it, or a fill that
    /// failed twice) is read whole from the remote and checked before it is
    /// served, up to a bound; above it, it is streamed from the remote's own
    /// `read`, which checks the digest only as the stream ends: a client may
    /// have received bytes of a corrupt blob before the DATA_LOSS (it must
    /// check the digest of what it reassembles, as REAPI clients do).
    async fn read(&self, instance: &InstanceName, digest: Digest, offset: u64, end: u64) -> Result<Option<BlobStream>> {
        match self.local.read(instance, digest, offset, end).await {
            Ok(Some(stream)) => {
                self.stats.cas_local_hit();
                return Ok(Some(stream));
            }
            Ok(None) => {}
            // A damaged local copy (which the local store has just removed)
            // or a failing local store: the remote still has the blob.
            Err(error) => tracing::warn!(%digest, %error, "local cache could not serve a blob; reading through"),
        }
        let request = Request { instance, digest, offset, end };
        if self.local.check_fits(digest.size).is_err() {
            return serve_from_remote(&self.remote, &self.stats, request).await;
        }
        self.fills.read_through(&self.local, &self.remote, &self.stats, request).await
    }

    /// Write-through: the remote first (its failure is the caller's), then a
    /// best-effort local copy.
    async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        self.remote.put(instance, digest, data.clone()).await?;
        self.cache_locally(instance, digest, data).await;
        Ok(())
    }

    /// A writer feeding the remote and, if the blob fits, a local copy; see
    /// `TeeWriter`.
    async fn begin_write(&self, instance: &InstanceName, digest: Digest) -> Result<Box<dyn BlobWriter>> {
        let remote = self.remote.begin_write(instance, digest).await?;
        let local = match self.local.check_fits(digest.size) {
            Ok(()) => match self.local.begin_write(instance, digest).await {
                Ok(writer) => Some(writer),
                Err(error) => {
                    tracing::warn!(%digest, %error, "not caching an upload locally");
                    None
                }
            },
            Err(_) => None,
        };
        Ok(Box::new(TeeWriter { remote, local }))
    }

    /// Removes the blob everywhere (it failed its digest): from the remote so
    /// no replica serves it again, and from the local cache.
    async fn delete(&self, instance: &InstanceName, digest: Digest) -> Result<()> {
        let remote = self.remote.delete(instance, digest).await;
        let local = self.local.delete(instance, digest).await;
        remote.and(local)
    }

    /// The remote's limit: the local cache's bound never refuses an upload
    /// (a blob too large for it is simply not cached).
    fn check_fits(&self, size: u64) -> Result<()> {
        self.remote.check_fits(size)
    }
}

/// An upload written to the remote and, when it fits, to the local cache at
/// once. The remote decides: its errors are the caller's, and its commit
/// comes first, so the local cache never holds a blob the remote refused.
struct TeeWriter {
    remote: Box<dyn BlobWriter>,
    local: Option<Box<dyn BlobWriter>>,
}

impl TeeWriter {
    /// Gives up the local copy after `error` (the upload goes on).
    async fn drop_local(&mut self, error: crate::error::Error) {
        tracing::warn!(%error, "local copy of an upload failed; the upload continues to the remote only");
        if let Some(local) = self.local.take() {
            let _ = local.abort().await;
        }
    }
}

#[async_trait]
impl BlobWriter for TeeWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if let Some(local) = self.local.as_mut() {
            if let Err(error) = local.write(data.clone()).await {
                self.drop_local(error).await;
            }
        }
        if let Err(error) = self.remote.write(data).await {
            if let Some(local) = self.local.take() {
                let _ = local.abort().await;
            }
            return Err(error);
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let local = self.local.take();
        if let Err(error) = self.remote.commit().await {
            if let Some(local) = local {
                let _ = local.abort().await;
            }
            return Err(error);
        }
        if let Some(local) = local {
            if let Err(error) = local.commit().await {
                tracing::warn!(%error, "could not cache an uploaded blob locally");
            }
        }
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        if let Some(local) = self.local.take() {
            let _ = local.abort().await;
        }
        self.remote.abort().await
    }
}
