//! Filling the local cache from the remote on a ranged-read miss: the whole
//! blob is streamed into a local writer, hashed as it goes, and committed
//! only if it matches its digest. Concurrent readers of one missing blob
//! wait for a single fill instead of each downloading it.
//!
//! The price of serving only checked bytes: the first byte of a missed blob
//! waits for the whole download. A blob the local cache cannot hold is read
//! whole and checked in memory, or, above a bound, streamed and checked only
//! at its end (see [`serve_from_remote`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use futures::StreamExt;

use super::blobs::verify;
use super::stats::ReplicaStats;
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::Result;
use crate::store::{corrupt_blob, BlobStore, BlobStream};

/// The blob being read: (instance, digest).
type BlobKey = (InstanceName, Digest);

/// One gate per blob being filled; readers of the same blob queue on it.
type Gate = tokio::sync::Mutex<()>;

/// Fills tried before a blob the local cache could not keep is served from
/// the remote: one retry rides out a transient local failure.
const FILL_ATTEMPTS: usize = 2;

/// The largest blob served from a whole, checked remote read when the local
/// cache cannot hold it (each such read holds this much memory while it is
/// served); larger ones are streamed and checked only at the end.
const VERIFIED_BUFFER_MAX: u64 = 64 * 1024 * 1024;

/// A ranged read that missed the local cache.
pub(super) struct Request<'a> {
    pub instance: &'a InstanceName,
    pub digest: Digest,
    pub offset: u64,
    pub end: u64,
}

/// The fills under way. An entry lives only as long as someone holds its
/// gate (the map keeps weak references), so the map holds no more than the
/// blobs being read right now.
#[derive(Debug, Default)]
pub(super) struct Fills {
    in_flight: Mutex<HashMap<BlobKey, Weak<Gate>>>,
}

/// What a fill left behind.
enum Filled {
    /// The blob is in the local cache, checked.
    Cached,
    /// The remote does not have the blob.
    Absent,
    /// The local cache could not take it (logged): read the remote directly.
    NotCached,
}

impl Fills {
    /// The gate of `key`, shared with every reader filling it now.
    fn gate(&self, key: BlobKey) -> Arc<Gate> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        in_flight.retain(|_, gate| gate.strong_count() > 0);
        if let Some(gate) = in_flight.get(&key).and_then(Weak::upgrade) {
            return gate;
        }
        let gate = Arc::new(Gate::default());
        in_flight.insert(key, Arc::downgrade(&gate));
        gate
    }

    /// Serves `request` from the local cache after making sure the blob is
    /// there: the first reader fills it (in its own task, so a reader that
    /// hangs up does not waste the download others wait for), later ones
    /// find it there once the gate opens. A fill that could not leave the
    /// blob in the local cache (disk full, a failed write, an eviction
    /// before the re-read) is tried once more; then the blob is served from
    /// the remote by [`serve_from_remote`].
    pub(super) async fn read_through(
        &self,
        local: &Arc<dyn BlobStore>,
        remote: &Arc<dyn BlobStore>,
        stats: &Arc<ReplicaStats>,
        request: Request<'_>,
    ) -> Result<Option<BlobStream>> {
        let Request { instance, digest, offset, end } = request;
        for _ in 0..FILL_ATTEMPTS {
            let guard = self.gate((instance.clone(), digest)).lock_owned().await;
            if let Some(stream) = local.read(instance, digest, offset, end).await? {
                stats.cas_fill_shared();
                return Ok(Some(stream));
            }
            let fill =
                Fill { local: local.clone(), remote: remote.clone(), stats: stats.clone(), instance: instance.clone() };
            let filled = tokio::spawn(async move {
                let _guard = guard;
                fill.run(digest).await
            })
            .await??;
            match filled {
                Filled::Absent => return Ok(None),
                Filled::NotCached => continue,
                Filled::Cached => match local.read(instance, digest, offset, end).await {
                    Ok(Some(stream)) => return Ok(Some(stream)),
                    Ok(None) => tracing::warn!(%digest, "a filled blob left the local cache before it was read"),
                    Err(error) => tracing::warn!(%digest, %error, "the local cache could not serve a filled blob"),
                },
            }
        }
        serve_from_remote(remote, stats, Request { instance, digest, offset, end }).await
    }
}

/// Serves a range of a blob the local cache cannot hold. A blob of at most
/// [`VERIFIED_BUFFER_MAX`] bytes is read whole, checked against its digest
/// and served from that buffer, so every byte served was checked (a
/// mismatch removes the remote object and is DATA_LOSS).
///
/// A larger blob is streamed from the remote's own `read`, which checks the
/// digest only as the stream ends: this is the one weaker guarantee. A
/// client may have received bytes of a corrupt blob before the DATA_LOSS
/// (it must check the digest of what it reassembles, as REAPI clients do).
pub(super) async fn serve_from_remote(
    remote: &Arc<dyn BlobStore>,
    stats: &ReplicaStats,
    request: Request<'_>,
) -> Result<Option<BlobStream>> {
    let Request { instance, digest, offset, end } = request;
    if digest.size > VERIFIED_BUFFER_MAX {
        return remote.read(instance, digest, offset, end).await;
    }
    let Some(data) = remote.get(instance, digest).await? else { return Ok(None) };
    let (data, good) = verify(digest, data).await?;
    if !good {
        return Err(reject_remote(remote, stats, instance, digest).await);
    }
    let range = data.slice(offset as usize..end as usize);
    Ok(Some(Box::pin(futures::stream::once(async move { Ok(range) }))))
}

/// The remote's copy of `digest` failed its check: it is counted and
/// removed from the remote (no replica must serve it), and the read is
/// DATA_LOSS.
async fn reject_remote(
    remote: &Arc<dyn BlobStore>,
    stats: &ReplicaStats,
    instance: &InstanceName,
    digest: Digest,
) -> crate::error::Error {
    stats.corrupt_from_remote();
    corrupt_blob(digest, remote.delete(instance, digest).await)
}

/// One download of a blob from the remote into the local cache.
struct Fill {
    local: Arc<dyn BlobStore>,
    remote: Arc<dyn BlobStore>,
    stats: Arc<ReplicaStats>,
    instance: InstanceName,
}

impl Fill {
    /// Streams the whole blob into a local writer, hashing each piece;
    /// commits only a match. A mismatch removes the remote object (no
    /// replica must serve it) and is DATA_LOSS.
    async fn run(self, digest: Digest) -> Result<Filled> {
        let Some(mut stream) = self.remote.read(&self.instance, digest, 0, digest.size).await? else {
            return Ok(Filled::Absent);
        };
        let mut writer = match self.local.begin_write(&self.instance, digest).await {
            Ok(writer) => writer,
            Err(error) => return Ok(self.not_cached(digest, error)),
        };
        let (mut hasher, mut len) = (digest.function.hasher(), 0u64);
        while let Some(piece) = stream.next().await {
            let piece = match piece {
                Ok(piece) => piece,
                Err(error) => {
                    let _ = writer.abort().await;
                    if error.code() == tonic::Code::DataLoss {
                        self.stats.corrupt_from_remote();
                    }
                    return Err(error);
                }
            };
            hasher.update(&piece);
            len += piece.len() as u64;
            if len > digest.size {
                break;
            }
            if let Err(error) = writer.write(piece).await {
                let _ = writer.abort().await;
                return Ok(self.not_cached(digest, error));
            }
        }
        if len != digest.size || hasher.finalize() != digest.hash {
            let _ = writer.abort().await;
            return Err(reject_remote(&self.remote, &self.stats, &self.instance, digest).await);
        }
        match writer.commit().await {
            Ok(()) => {
                self.stats.cas_remote_fill();
                Ok(Filled::Cached)
            }
            Err(error) => Ok(self.not_cached(digest, error)),
        }
    }

    fn not_cached(&self, digest: Digest, error: crate::error::Error) -> Filled {
        tracing::warn!(%digest, %error, "could not cache a blob locally; reading it from the remote");
        Filled::NotCached
    }
}
