//! What a user of two replicas over one bucket notices about blobs: writes
//! through one are readable through the other, local copies keep serving
//! through an outage, and tampered bucket bytes are never served or cached.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use tonic::Code;

use super::faults::FaultyBlobs;
use super::{ReadThroughBlobs, ReplicaStats};
use crate::cache::cas::Cas;
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::error::Result;
use crate::store::memory::MemoryStore;
use crate::store::{BlobStore, BlobStream};

/// One replica: its own local cache and counters, over a shared remote.
struct Replica {
    blobs: Arc<ReadThroughBlobs>,
    local: MemoryStore,
    stats: Arc<ReplicaStats>,
}

fn replica(remote: &Arc<FaultyBlobs>, local_max: Option<u64>) -> Replica {
    let local = MemoryStore::new(local_max);
    let stats = Arc::new(ReplicaStats::new());
    let blobs = Arc::new(ReadThroughBlobs::new(Arc::new(local.clone()), remote.clone(), stats.clone()));
    Replica { blobs, local, stats }
}

fn blob(text: &str) -> (Digest, Bytes) {
    (Digest::of(DigestFunction::Sha256, text.as_bytes()), Bytes::copy_from_slice(text.as_bytes()))
}

fn instance() -> InstanceName {
    InstanceName::parse("main").unwrap()
}

async fn collect(stream: Option<BlobStream>) -> Result<Vec<u8>> {
    let pieces: Vec<Bytes> = stream.expect("blob present").try_collect().await?;
    Ok(pieces.concat())
}

#[tokio::test]
async fn a_blob_written_through_one_replica_is_read_through_another_which_then_serves_it_with_the_remote_off() {
    let remote = Arc::new(FaultyBlobs::default());
    let (a, b) = (replica(&remote, None), replica(&remote, None));
    let (whole, whole_data) = blob("written whole through replica A");
    let (streamed, streamed_data) = blob("streamed in pieces through replica A");
    let i = instance();

    a.blobs.put(&i, whole, whole_data.clone()).await.unwrap();
    let mut writer = a.blobs.begin_write(&i, streamed).await.unwrap();
    writer.write(streamed_data.slice(..10)).await.unwrap();
    writer.write(streamed_data.slice(10..)).await.unwrap();
    writer.commit().await.unwrap();

    assert_eq!(b.blobs.contains(&i, &[whole, streamed]).await.unwrap(), vec![true, true]);
    assert_eq!(b.blobs.get(&i, whole).await.unwrap(), Some(whole_data.clone()));
    let range = b.blobs.read(&i, streamed, 3, 20).await.unwrap();
    assert_eq!(collect(range).await.unwrap(), streamed_data[3..20].to_vec());
    assert_eq!(b.stats.snapshot().cas_remote_fills, 2);

    remote.faults.switch_off(true);
    assert_eq!(b.blobs.get(&i, whole).await.unwrap(), Some(whole_data));
    let all = b.blobs.read(&i, streamed, 0, streamed.size).await.unwrap();
    assert_eq!(collect(all).await.unwrap(), streamed_data.to_vec());
    assert_eq!(b.blobs.contains(&i, &[whole, streamed]).await.unwrap(), vec![true, true]);
    let seen = b.stats.snapshot();
    assert_eq!((seen.cas_local_hits, seen.served_while_remote_unavailable), (2, 1));
}

#[tokio::test]
async fn tampered_remote_bytes_from_get_are_not_cached_and_the_domain_removes_them_from_the_remote() {
    let remote = Arc::new(FaultyBlobs::default());
    let b = replica(&remote, None);
    let (digest, data) = blob("a blob someone overwrote in the bucket");
    let i = instance();
    remote.inner.insert_unchecked(&i, digest, Bytes::from_static(b"not the blob the digest names at all!!"));

    let cas = Cas::new(b.blobs.clone());
    let error = cas.get(&i, digest, u64::MAX).await.unwrap_err();

    assert_eq!(error.code(), Code::DataLoss);
    assert!(!b.local.holds(&i, digest), "tampered bytes were cached");
    assert!(!remote.inner.holds(&i, digest), "tampered bytes stay in the bucket");
    assert_eq!(b.stats.snapshot().corrupt_from_remote, 1);
    // A good upload afterwards is served again.
    b.blobs.put(&i, digest, data.clone()).await.unwrap();
    assert_eq!(cas.get(&i, digest, u64::MAX).await.unwrap(), Some(data));
}

#[tokio::test]
async fn a_tampered_remote_blob_fails_a_ranged_read_with_data_loss_and_is_removed_from_the_remote() {
    let remote = Arc::new(FaultyBlobs::default());
    let b = replica(&remote, None);
    let (digest, data) = blob("bytes the bucket will flip on the way out");
    let i = instance();
    remote.inner.put(&i, digest, data).await.unwrap();
    remote.faults.tamper(true);

    let error = b.blobs.read(&i, digest, 0, 4).await.err().expect("a tampered blob is not served");

    assert_eq!(error.code(), Code::DataLoss);
    assert!(!b.local.holds(&i, digest), "tampered bytes were cached");
    assert!(!remote.inner.holds(&i, digest), "tampered bytes stay in the bucket");
    assert_eq!(b.stats.snapshot().corrupt_from_remote, 1);
}

#[tokio::test]
async fn an_upload_the_remote_refuses_fails_and_leaves_nothing_in_the_local_cache() {
    let remote = Arc::new(FaultyBlobs::default());
    let a = replica(&remote, None);
    let (whole, whole_data) = blob("a put while the bucket is down");
    let (streamed, streamed_data) = blob("a stream whose commit the bucket refuses");
    let i = instance();

    remote.faults.switch_off(true);
    let error = a.blobs.put(&i, whole, whole_data).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    remote.faults.switch_off(false);
    let mut writer = a.blobs.begin_write(&i, streamed).await.unwrap();
    writer.write(streamed_data).await.unwrap();
    remote.faults.switch_off(true);
    assert_eq!(writer.commit().await.unwrap_err().code(), Code::Unavailable);

    for digest in [whole, streamed] {
        assert!(!a.local.holds(&i, digest) && !remote.inner.holds(&i, digest));
    }
}

#[tokio::test]
async fn an_aborted_upload_leaves_the_blob_nowhere() {
    let remote = Arc::new(FaultyBlobs::default());
    let a = replica(&remote, None);
    let (digest, data) = blob("an upload the client gave up on");
    let i = instance();

    let mut writer = a.blobs.begin_write(&i, digest).await.unwrap();
    writer.write(data).await.unwrap();
    writer.abort().await.unwrap();

    assert!(!a.local.holds(&i, digest) && !remote.inner.holds(&i, digest));
    assert_eq!(a.blobs.contains(&i, &[digest]).await.unwrap(), vec![false]);
}

#[tokio::test]
async fn contains_follows_the_remote_and_falls_back_to_the_local_cache_only_while_the_remote_is_unavailable() {
    let remote = Arc::new(FaultyBlobs::default());
    let b = replica(&remote, None);
    let (cached, cached_data) = blob("read once, so cached locally");
    let (expired, expired_data) = blob("cached locally but expired from the bucket");
    let (never, _) = blob("never stored");
    let i = instance();
    for (digest, data) in [(cached, cached_data), (expired, expired_data)] {
        remote.inner.put(&i, digest, data).await.unwrap();
        b.blobs.get(&i, digest).await.unwrap();
    }
    remote.inner.delete(&i, expired).await.unwrap();

    assert_eq!(b.blobs.contains(&i, &[cached, expired, never]).await.unwrap(), vec![true, false, false]);
    remote.faults.switch_off(true);
    assert_eq!(b.blobs.contains(&i, &[cached, expired, never]).await.unwrap(), vec![true, true, false]);
    assert_eq!(b.stats.snapshot().served_while_remote_unavailable, 1);
}

#[tokio::test]
async fn concurrent_reads_of_one_missing_blob_download_it_once() {
    let remote = Arc::new(FaultyBlobs::default());
    let b = replica(&remote, None);
    let (digest, data) = blob("a popular blob many actions need at once");
    let i = instance();
    remote.inner.put(&i, digest, data.clone()).await.unwrap();
    remote.faults.slow(true);

    let readers = (0..5).map(|_| {
        let (blobs, i) = (b.blobs.clone(), i.clone());
        tokio::spawn(async move { collect(blobs.read(&i, digest, 0, digest.size).await?).await })
    });
    for reader in futures::future::join_all(readers).await {
        assert_eq!(reader.unwrap().unwrap(), data.to_vec());
    }

    assert_eq!(remote.faults.reads(), 1);
    let seen = b.stats.snapshot();
    assert_eq!((seen.cas_remote_fills, seen.cas_fills_shared), (1, 4));
}

#[tokio::test]
async fn a_blob_too_large_for_the_local_cache_is_read_from_the_remote_and_not_cached() {
    let remote = Arc::new(FaultyBlobs::default());
    let b = replica(&remote, Some(8));
    let (digest, data) = blob("larger than the eight-byte local cache");
    let i = instance();

    b.blobs.put(&i, digest, data.clone()).await.unwrap();
    let range = b.blobs.read(&i, digest, 5, 20).await.unwrap();

    assert_eq!(collect(range).await.unwrap(), data[5..20].to_vec());
    assert!(!b.local.holds(&i, digest) && remote.inner.holds(&i, digest));
    assert!(b.blobs.check_fits(digest.size).is_ok(), "the local bound refused an upload");
}

#[tokio::test]
async fn a_damaged_local_copy_is_replaced_from_the_remote_whose_copy_is_kept() {
    let remote = Arc::new(FaultyBlobs::default());
    let b = replica(&remote, None);
    let (digest, data) = blob("good in the bucket, damaged on this replica's disk");
    let i = instance();
    remote.inner.put(&i, digest, data.clone()).await.unwrap();
    let rotten = Bytes::from_static(b"rotten bytes of the same length, or not");
    b.local.insert_unchecked(&i, digest, rotten.clone());
    let range = b.blobs.read(&i, digest, 0, digest.size).await.unwrap();
    assert_eq!(collect(range).await.unwrap(), data.to_vec());
    b.local.insert_unchecked(&i, digest, rotten);

    let cas = Cas::new(b.blobs.clone());
    assert_eq!(cas.get(&i, digest, u64::MAX).await.unwrap(), Some(data.clone()));

    assert!(remote.inner.holds(&i, digest), "a local fault deleted the bucket's good copy");
    assert_eq!(b.local.get(&i, digest).await.unwrap(), Some(data));
}
