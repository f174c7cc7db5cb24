//! [`BlobStore`] over the bucket: one object per blob, content-addressed
//! and write-once, with an in-memory existence cache in front of the HEADs
//! and "touch on use" re-dating so a lifecycle rule expires only unused blobs.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, PutMode};

use super::bucket::{older_than, spawn, Bucket, Recent};
use super::keys;
use super::stats::Op;
use super::writer::ObjectWriter;
use crate::cache::digest::{Digest, Hasher};
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::store::{corrupt_blob, BlobStore, BlobStream, BlobWriter};

/// S3's largest object.
const MAX_OBJECT: u64 = 5 << 40;

/// The CAS in the bucket.
#[derive(Debug)]
pub struct ObjectBlobs {
    bucket: Bucket,
    /// Blob key → when the bucket last confirmed it present.
    present: Arc<Recent<SystemTime>>,
    /// Blob key → when this process last re-dated it.
    refreshed: Arc<Recent<SystemTime>>,
}

impl ObjectBlobs {
    /// The CAS of `bucket`.
    pub fn new(bucket: Bucket) -> Self {
        let entries = bucket.options.existence_entries;
        ObjectBlobs { bucket, present: Arc::new(Recent::new(entries)), refreshed: Arc::new(Recent::new(entries)) }
    }

    /// Whether `key` was confirmed present within the existence TTL.
    fn known_present(&self, key: &Path, now: SystemTime) -> bool {
        self.present.get(key).is_some_and(|seen| !older_than(seen, self.bucket.options.existence_ttl, now))
    }

    /// Notes a confirmation of `key` last modified at `modified`, and
    /// re-dates it in the background when it is getting old.
    fn confirmed(&self, key: &Path, modified: SystemTime) {
        let now = self.bucket.now();
        self.present.insert(key.clone(), now);
        let age = self.bucket.options.refresh_age;
        if !older_than(modified, age, now) || self.refreshed.get(key).is_some_and(|at| !older_than(at, age, now)) {
            return;
        }
        self.refreshed.insert(key.clone(), now);
        let (bucket, key) = (self.bucket.clone(), key.clone());
        spawn(async move {
            if let Err(e) = redate(&bucket, &key).await {
                tracing::warn!(%key, error = %e, "could not refresh the age of a used blob");
            }
        });
    }
}

/// Gives `key` a new last-modified time. S3 refuses a copy onto itself
/// without a metadata change (which object_store cannot ask for), so the
/// blob takes a detour through a scratch key. Its content is its key's hash,
/// so a concurrent writer of the same key cannot be harmed.
async fn redate(bucket: &Bucket, key: &Path) -> Result<()> {
    let scratch = keys::scratch(rand_u64());
    bucket.copy(key, &scratch).await?;
    let back = bucket.copy(&scratch, key).await;
    bucket.delete(&scratch).await?;
    back?;
    bucket.stats.refreshed();
    Ok(())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    u64::from_le_bytes(b)
}

#[async_trait]
impl BlobStore for ObjectBlobs {
    /// Answers from the existence cache when the bucket confirmed a blob
    /// within the TTL; HEADs the rest, [`super::bucket::PARALLEL`] at once.
    async fn contains(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<bool>> {
        let now = self.bucket.now();
        super::bucket::in_order(digests.to_vec(), |digest| async move {
            let key = keys::blob(instance, &digest);
            if self.known_present(&key, now) {
                return Ok(true);
            }
            match self.bucket.head(&key).await? {
                Some(meta) => {
                    self.confirmed(&key, meta.last_modified.into());
                    Ok(true)
                }
                None => {
                    self.present.remove(&key);
                    Ok(false)
                }
            }
        })
        .await
    }

    async fn get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>> {
        let key = keys::blob(instance, &digest);
        let Some((bytes, meta)) = self.bucket.get(&key).await? else {
            self.present.remove(&key);
            return Ok(None);
        };
        self.confirmed(&key, meta.last_modified.into());
        Ok(Some(bytes))
    }

    /// Weaker than the trait asks: the bucket cannot check a range before
    /// sending it, so the whole object is streamed through the digest's
    /// hasher and only `[offset, end)` yielded. Those bytes may reach the
    /// caller before the check fails; the stream then ends with DATA_LOSS
    /// and the object is deleted. The replica layer reads this way only
    /// blobs too large for its local cache (which checks before yielding).
    async fn read(&self, instance: &InstanceName, digest: Digest, offset: u64, end: u64) -> Result<Option<BlobStream>> {
        let key = keys::blob(instance, &digest);
        let Some(result) = self.bucket.get_stream(&key, GetOptions::default()).await? else {
            self.present.remove(&key);
            return Ok(None);
        };
        if result.meta.size != digest.size {
            self.present.remove(&key);
            return Err(corrupt_blob(digest, self.bucket.delete(&key).await));
        }
        self.confirmed(&key, result.meta.last_modified.into());
        let body = result.into_stream();
        let (bucket, present, hasher) = (self.bucket.clone(), self.present.clone(), digest.function.hasher());
        let check = Check { bucket, present, key, digest, hasher, at: 0 };
        Ok(Some(checked_range(body, check, offset, end)))
    }

    async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        self.check_fits(data.len() as u64)?;
        let key = keys::blob(instance, &digest);
        self.bucket.put(&key, data, PutMode::Create).await?;
        self.present.insert(key, self.bucket.now());
        Ok(())
    }

    async fn begin_write(&self, instance: &InstanceName, digest: Digest) -> Result<Box<dyn BlobWriter>> {
        let key = keys::blob(instance, &digest);
        let writer = ObjectWriter::begin(self.bucket.clone(), key, digest.size, self.present.clone()).await?;
        Ok(Box::new(writer))
    }

    async fn delete(&self, instance: &InstanceName, digest: Digest) -> Result<()> {
        let key = keys::blob(instance, &digest);
        self.present.remove(&key);
        self.bucket.delete(&key).await
    }

    /// No local bound: only S3's largest object (5 TiB).
    fn check_fits(&self, size: u64) -> Result<()> {
        if size > MAX_OBJECT {
            return Err(Error::ResourceExhausted(format!("a {size}-byte blob is larger than an object may be")));
        }
        Ok(())
    }
}

/// The running digest check of a streamed blob.
struct Check {
    bucket: Bucket,
    /// The existence cache, which must forget a blob deleted as corrupt.
    present: Arc<Recent<SystemTime>>,
    key: Path,
    digest: Digest,
    hasher: Hasher,
    /// Bytes hashed so far.
    at: u64,
}

/// The `[offset, end)` part of `body`, ending with DATA_LOSS (and the object
/// deleted) when the whole body does not match the digest.
fn checked_range(
    body: BoxStream<'static, object_store::Result<Bytes>>,
    check: Check,
    offset: u64,
    end: u64,
) -> BlobStream {
    let state = Some((body, check));
    let stream = futures::stream::unfold(state, move |state| async move {
        let (mut body, mut check) = state?;
        loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    let start = check.at;
                    check.hasher.update(&chunk);
                    check.at += chunk.len() as u64;
                    check.bucket.stats.read(chunk.len() as u64);
                    let (from, to) = (offset.clamp(start, check.at), end.clamp(start, check.at));
                    if from < to {
                        let piece = chunk.slice((from - start) as usize..(to - start) as usize);
                        return Some((Ok(piece), Some((body, check))));
                    }
                }
                Some(Err(e)) => return Some((Err(super::bucket::failed(Op::Get, &check.key, e)), None)),
                None => {
                    let Check { bucket, present, key, digest, hasher, at } = check;
                    if at == digest.size && hasher.finalize() == digest.hash {
                        return None;
                    }
                    present.remove(&key);
                    return Some((Err(corrupt_blob(digest, bucket.delete(&key).await)), None));
                }
            }
        }
    });
    Box::pin(stream)
}
