//! What a reader notices when the replica's local cache cannot keep a blob
//! it fills (a full disk, a failed write, an eviction before the re-read):
//! a transient failure is ridden out, and bytes from the remote are still
//! never served before they matched their digest.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use tonic::Code;

use super::faults::FaultyBlobs;
use super::{ReadThroughBlobs, ReplicaStats};
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::store::{BlobStore, BlobStream};

/// A replica whose local cache is a faulty store, over a faulty remote.
struct Setup {
    blobs: ReadThroughBlobs,
    local: Arc<FaultyBlobs>,
    remote: Arc<FaultyBlobs>,
}

/// A replica over a remote holding `text`.
async fn setup(text: &str) -> (Setup, Digest, Bytes) {
    let (local, remote) = (Arc::new(FaultyBlobs::default()), Arc::new(FaultyBlobs::default()));
    let blobs = ReadThroughBlobs::new(local.clone(), remote.clone(), Arc::new(ReplicaStats::new()));
    let data = Bytes::copy_from_slice(text.as_bytes());
    let digest = Digest::of(DigestFunction::Sha256, &data);
    remote.inner.put(&instance(), digest, data.clone()).await.unwrap();
    (Setup { blobs, local, remote }, digest, data)
}

fn instance() -> InstanceName {
    InstanceName::parse("main").unwrap()
}

/// Everything a read stream yields, or its first error.
async fn collect(stream: crate::error::Result<Option<BlobStream>>) -> crate::error::Result<Vec<u8>> {
    let pieces: Vec<Bytes> = stream?.expect("blob present").try_collect().await?;
    Ok(pieces.concat())
}

#[tokio::test]
async fn a_fill_the_local_disk_refuses_once_is_retried_and_the_blob_is_then_served_from_the_local_cache() {
    let (s, digest, data) = setup("refused once by a momentarily full disk").await;
    s.local.faults.refuse_writes(1);

    let range = collect(s.blobs.read(&instance(), digest, 2, 12).await).await.unwrap();

    assert_eq!(range, data[2..12].to_vec());
    assert!(s.local.inner.holds(&instance(), digest), "the retried fill was not cached");
}

#[tokio::test]
async fn tampered_remote_bytes_are_not_served_when_the_local_disk_refuses_every_fill() {
    let (s, digest, _) = setup("the disk is full and the bucket lies").await;
    s.local.faults.refuse_writes(usize::MAX);
    s.remote.faults.tamper(true);

    let error = collect(s.blobs.read(&instance(), digest, 0, 4).await).await.unwrap_err();

    assert_eq!(error.code(), Code::DataLoss);
    assert!(!s.remote.inner.holds(&instance(), digest), "tampered bytes stay in the bucket");
}

#[tokio::test]
async fn a_blob_whose_filled_copies_are_evicted_is_served_checked_after_one_retry() {
    let (s, digest, data) = setup("evicted as soon as it lands, but good").await;
    s.local.faults.forget_writes(true);

    let range = collect(s.blobs.read(&instance(), digest, 5, 20).await).await.unwrap();

    assert_eq!(range, data[5..20].to_vec());
    // Two fills (the first and its retry), then one whole read to check.
    assert_eq!(s.remote.faults.reads(), 3);
}

#[tokio::test]
async fn a_tampered_blob_too_large_for_the_local_cache_is_not_served_if_it_fits_the_checked_buffer() {
    let remote = Arc::new(FaultyBlobs::default());
    let local = Arc::new(crate::store::memory::MemoryStore::new(Some(8)));
    let blobs = ReadThroughBlobs::new(local, remote.clone(), Arc::new(ReplicaStats::new()));
    let data = Bytes::from_static(b"larger than the eight-byte local cache, and tampered");
    let digest = Digest::of(DigestFunction::Sha256, &data);
    remote.inner.put(&instance(), digest, data).await.unwrap();
    remote.faults.tamper(true);

    let error = collect(blobs.read(&instance(), digest, 10, 20).await).await.unwrap_err();

    assert_eq!(error.code(), Code::DataLoss);
    assert!(!remote.inner.holds(&instance(), digest), "tampered bytes stay in the bucket");
}
