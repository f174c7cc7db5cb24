//! A streamed blob write into the bucket, invisible until committed: small
//! blobs are buffered and PUT create-only at commit; large ones go up as a
//! multipart upload with bounded parts in flight, which S3 shows only once
//! completed.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, WriteMultipart};

use super::bucket::{failed, spawn, Bucket, Recent};
use super::stats::Op;
use crate::error::Result;
use crate::store::BlobWriter;

/// S3's most parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

/// The part size of a `size`-byte upload: the configured one, or the
/// smallest whole number of MiB that fits the blob in [`MAX_PARTS`] parts.
/// Memory held is at most `parts_in_flight` parts: 4 × 8 MiB by default, up
/// to 4 × 525 MiB for S3's largest (5 TiB) object.
fn part_size_for(size: u64, configured: usize) -> usize {
    let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    (configured as u64).max(needed) as usize
}

/// Where the bytes of a write go.
enum Sink {
    /// The blob is already stored: the bytes are dropped, commit succeeds.
    Skip,
    /// A small blob, gathered for one PUT.
    Buffer(BytesMut),
    /// A large blob's multipart upload.
    Upload(WriteMultipart),
}

/// A blob being written to the bucket. Dropped without commit or abort, its
/// upload is aborted in the background (best effort: the bucket's
/// AbortIncompleteMultipartUpload rule covers a crash).
pub struct ObjectWriter {
    bucket: Bucket,
    key: Path,
    present: Arc<Recent<SystemTime>>,
    /// The size of each part of a multipart upload.
    part_size: usize,
    sink: Option<Sink>,
}

impl ObjectWriter {
    /// Starts a write of `size` bytes under `key`, after one HEAD: a blob
    /// already there is not uploaded again (a multipart completion cannot be
    /// made create-only).
    pub(super) async fn begin(
        bucket: Bucket,
        key: Path,
        size: u64,
        present: Arc<Recent<SystemTime>>,
    ) -> Result<ObjectWriter> {
        let part_size = part_size_for(size, bucket.options.part_size);
        let sink = if bucket.head(&key).await?.is_some() {
            Sink::Skip
        } else if size < bucket.options.part_size as u64 {
            Sink::Buffer(BytesMut::with_capacity(size as usize))
        } else {
            let upload = bucket.call(Op::Multipart, bucket.store.put_multipart(&key)).await;
            let upload = upload.map_err(|e| failed(Op::Multipart, &key, e))?;
            Sink::Upload(WriteMultipart::new_with_chunk_size(upload, part_size))
        };
        Ok(ObjectWriter { bucket, key, present, part_size, sink: Some(sink) })
    }

    fn sink(&mut self) -> &mut Sink {
        self.sink.as_mut().expect("a writer's sink is taken only by commit, abort or drop")
    }
}

#[async_trait]
impl BlobWriter for ObjectWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let (part_size, in_flight) = (self.part_size, self.bucket.options.parts_in_flight);
        let stats = self.bucket.stats.clone();
        let key = self.key.clone();
        match self.sink() {
            Sink::Skip => {}
            Sink::Buffer(buffer) => buffer.extend_from_slice(&data),
            Sink::Upload(upload) => {
                // Piece by piece, so one large write cannot start more parts
                // than `parts_in_flight` at once.
                for start in (0..data.len()).step_by(part_size) {
                    upload.wait_for_capacity(in_flight).await.map_err(|e| failed(Op::Multipart, &key, e))?;
                    upload.put(data.slice(start..data.len().min(start + part_size)));
                }
                stats.wrote(data.len() as u64);
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let sink = self.sink.take().expect("a writer commits once");
        match sink {
            Sink::Skip => {}
            Sink::Buffer(buffer) => {
                self.bucket.put(&self.key, buffer.freeze(), PutMode::Create).await?;
            }
            Sink::Upload(upload) => {
                let done = self.bucket.call(Op::Multipart, upload.finish()).await;
                done.map_err(|e| failed(Op::Multipart, &self.key, e))?;
            }
        }
        self.present.insert(self.key.clone(), self.bucket.now());
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        match self.sink.take() {
            Some(Sink::Upload(upload)) => abort(&self.bucket, &self.key, upload).await,
            _ => Ok(()),
        }
    }
}

async fn abort(bucket: &Bucket, key: &Path, upload: WriteMultipart) -> Result<()> {
    bucket.call(Op::Multipart, upload.abort()).await.map_err(|e| failed(Op::Multipart, key, e))
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(Sink::Upload(upload)) = self.sink.take() {
            let (bucket, key) = (self.bucket.clone(), self.key.clone());
            spawn(async move {
                if let Err(e) = abort(&bucket, &key, upload).await {
                    tracing::warn!(%key, error = %e, "could not abort an abandoned upload");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::part_size_for;

    #[test]
    fn parts_grow_so_that_any_blob_fits_in_ten_thousand_of_them() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(20 * MIB, 8 << 20), 8 << 20, "a usual blob keeps the configured size");
        assert_eq!(part_size_for(80_000 * MIB, 8 << 20), 8 << 20, "exactly 10,000 parts of 8 MiB");
        assert_eq!(part_size_for(80_000 * MIB + 1, 8 << 20), 9 << 20, "one byte more needs larger parts");
        let largest = 5u64 << 40;
        let part = part_size_for(largest, 8 << 20) as u64;
        assert!(largest.div_ceil(part) <= 10_000 && part % MIB == 0 && part < 530 * MIB, "{part}");
    }
}
