use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{bucket, bucket_with, digest, requests, settle};
use crate::cache::resource::InstanceName;
use crate::store::object::{keys, ObjectBlobs, ObjectOptions, Op};
use crate::store::BlobStore;

#[tokio::test]
async fn a_put_blob_is_found_read_and_deleted() {
    let (_, bucket, _) = bucket();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let (data, missing) = (Bytes::from_static(b"hello"), digest(b"absent"));
    blobs.put(&i, digest(&data), data.clone()).await.unwrap();
    blobs.put(&i, digest(&data), data.clone()).await.expect("storing a stored blob again is fine");
    assert_eq!(blobs.contains(&i, &[digest(&data), missing]).await.unwrap(), vec![true, false]);
    assert_eq!(blobs.get(&i, digest(&data)).await.unwrap(), Some(data.clone()));
    assert_eq!(blobs.get(&i, missing).await.unwrap(), None);
    blobs.delete(&i, digest(&data)).await.unwrap();
    blobs.delete(&i, digest(&data)).await.expect("deleting an absent blob is fine");
    assert_eq!(blobs.contains(&i, &[digest(&data)]).await.unwrap(), vec![false]);
}

#[tokio::test]
async fn contains_trusts_a_confirmation_only_within_the_ttl() {
    let (store, bucket, clock) = bucket();
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let d = digest(b"planted");
    store.put(&keys::blob(&i, &d), PutPayload::from_static(b"planted")).await.unwrap();
    assert_eq!(blobs.contains(&i, &[d]).await.unwrap(), vec![true]);
    clock.advance(Duration::from_secs(59));
    assert_eq!(blobs.contains(&i, &[d]).await.unwrap(), vec![true]);
    assert_eq!(requests(&stats, Op::Head), 1, "a digest confirmed within the TTL is not asked about again");
    store.delete(&keys::blob(&i, &d)).await.unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(blobs.contains(&i, &[d]).await.unwrap(), vec![false], "past the TTL the bucket is asked again");
    assert_eq!(requests(&stats, Op::Head), 2);
}

#[tokio::test]
async fn a_large_streamed_write_is_invisible_until_commit_and_gone_after_abort() {
    let (store, bucket, _) = bucket();
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let data = Bytes::from((0..20u32 << 20).map(|n| (n % 251) as u8).collect::<Vec<_>>());
    let d = digest(&data);
    let key = keys::blob(&i, &d);
    for commit in [false, true] {
        let mut writer = blobs.begin_write(&i, d).await.unwrap();
        for piece in data.chunks(3 << 20) {
            writer.write(data.slice_ref(piece)).await.unwrap();
        }
        assert!(store.head(&key).await.is_err(), "nothing is visible before commit");
        if commit {
            writer.commit().await.unwrap();
        } else {
            writer.abort().await.unwrap();
            assert!(store.head(&key).await.is_err(), "an aborted write leaves nothing");
        }
    }
    assert_eq!(store.get(&key).await.unwrap().bytes().await.unwrap(), data);
    assert_eq!(requests(&stats, Op::Put), 0, "a 20 MiB blob goes up in parts, not one PUT");
}

#[tokio::test]
async fn a_blob_already_stored_is_not_uploaded_again() {
    let (_, bucket, _) = bucket();
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let data = Bytes::from_static(b"twice");
    blobs.put(&i, digest(&data), data.clone()).await.unwrap();
    let written = stats.snapshot().bytes_written;
    let mut writer = blobs.begin_write(&i, digest(&data)).await.unwrap();
    writer.write(data.clone()).await.unwrap();
    writer.commit().await.unwrap();
    assert_eq!(stats.snapshot().bytes_written, written, "no byte was sent again");
    assert_eq!((requests(&stats, Op::Put), requests(&stats, Op::Multipart)), (1, 0));
}

#[tokio::test]
async fn a_ranged_read_yields_the_range_and_a_tampered_blob_ends_in_data_loss() {
    let (store, bucket, _) = bucket();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let data = Bytes::from_static(b"0123456789");
    let d = digest(&data);
    blobs.put(&i, d, data.clone()).await.unwrap();
    let read: Vec<_> = blobs.read(&i, d, 2, 5).await.unwrap().unwrap().collect().await;
    assert_eq!(read.into_iter().map(Result::unwrap).collect::<Vec<_>>(), vec![Bytes::from_static(b"234")]);

    store.put(&keys::blob(&i, &d), PutPayload::from_static(b"0123456780")).await.unwrap();
    let read: Vec<_> = blobs.read(&i, d, 0, 3).await.unwrap().unwrap().collect().await;
    let last = read.last().unwrap().as_ref().expect_err("the stream ends in an error");
    assert_eq!(last.code(), tonic::Code::DataLoss);
    assert!(store.head(&keys::blob(&i, &d)).await.is_err(), "the tampered object is deleted");
    assert_eq!(blobs.contains(&i, &[d]).await.unwrap(), [false], "and no longer known to be present");
    assert_eq!(blobs.read(&i, d, 0, 3).await.unwrap().map(|_| ()), None);
}

#[tokio::test]
async fn a_used_blob_older_than_the_refresh_age_is_redated_once() {
    let (store, bucket, clock) = bucket();
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let data = Bytes::from_static(b"old");
    blobs.put(&i, digest(&data), data.clone()).await.unwrap();
    clock.advance(Duration::from_secs(2 * 86_400));
    assert_eq!(blobs.contains(&i, &[digest(&data)]).await.unwrap(), vec![true]);
    settle(&stats, |s| s.snapshot().refreshes, 1).await;
    clock.advance(Duration::from_secs(120));
    blobs.get(&i, digest(&data)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(stats.snapshot().refreshes, 1, "one refresh per refresh age from this process");
    assert_eq!(blobs.get(&i, digest(&data)).await.unwrap(), Some(data));
    let scratch: Vec<_> = store.list(Some(&"tmp".into())).collect().await;
    assert!(scratch.is_empty(), "the scratch copy is deleted");
}

#[tokio::test]
async fn an_old_blob_whose_bytes_do_not_match_is_never_redated() {
    let (store, bucket, clock) = bucket();
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let d = digest(b"0123456789");
    store.put(&keys::blob(&i, &d), PutPayload::from_static(b"0123456780")).await.unwrap();
    clock.advance(Duration::from_secs(2 * 86_400));
    blobs.get(&i, d).await.unwrap();
    let read: Vec<_> = blobs.read(&i, d, 0, 3).await.unwrap().unwrap().collect().await;
    assert!(read.last().unwrap().is_err(), "the ranged read of a corrupt blob fails");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(requests(&stats, Op::Copy), 0, "no corrupt byte is copied back onto the key");
    assert_eq!(stats.snapshot().refreshes, 0);
}

#[tokio::test]
async fn an_old_blob_read_to_its_end_and_matching_is_redated() {
    let (_, bucket, clock) = bucket();
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let data = Bytes::from_static(b"0123456789");
    blobs.put(&i, digest(&data), data.clone()).await.unwrap();
    clock.advance(Duration::from_secs(2 * 86_400));
    let read: Vec<_> = blobs.read(&i, digest(&data), 0, 3).await.unwrap().unwrap().collect().await;
    assert!(read.iter().all(Result::is_ok));
    settle(&stats, |s| s.snapshot().refreshes, 1).await;
}

#[tokio::test]
async fn removing_a_corrupt_blob_spares_a_good_one_uploaded_since_the_read() {
    let (store, bucket, _) = bucket();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let (good, d) = (Bytes::from_static(b"0123456789"), digest(b"0123456789"));
    let key = keys::blob(&i, &d);
    store.put(&key, PutPayload::from_static(b"0123456780")).await.unwrap();
    assert_ne!(blobs.get(&i, d).await.unwrap(), Some(good.clone()));
    store.put(&key, PutPayload::from(good.clone())).await.unwrap();
    blobs.delete(&i, d).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap().bytes().await.unwrap(), good, "the caller's repair keeps the good blob");

    store.put(&key, PutPayload::from_static(b"0123456780")).await.unwrap();
    let stream = blobs.read(&i, d, 0, 3).await.unwrap().unwrap();
    store.put(&key, PutPayload::from(good.clone())).await.unwrap();
    let read: Vec<_> = stream.collect().await;
    assert_eq!(read.last().unwrap().as_ref().unwrap_err().code(), tonic::Code::DataLoss);
    assert_eq!(store.get(&key).await.unwrap().bytes().await.unwrap(), good, "the failed read keeps the good blob");
}

#[tokio::test]
async fn a_blob_object_of_another_size_than_its_digest_is_data_loss_and_removed() {
    let (store, bucket, _) = bucket();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let d = digest(b"0123456789");
    store.put(&keys::blob(&i, &d), PutPayload::from_static(b"0123456789 and a lot more")).await.unwrap();
    assert_eq!(blobs.get(&i, d).await.unwrap_err().code(), tonic::Code::DataLoss);
    assert!(store.head(&keys::blob(&i, &d)).await.is_err(), "the oversized object is removed");
}

#[tokio::test]
async fn a_redating_with_no_free_permit_is_skipped_counted_and_tried_again_on_a_later_use() {
    let options = ObjectOptions { redates_at_once: 0, ..ObjectOptions::default() };
    let (_, bucket, clock) = bucket_with(options);
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    let data = Bytes::from_static(b"old");
    blobs.put(&i, digest(&data), data.clone()).await.unwrap();
    clock.advance(Duration::from_secs(2 * 86_400));
    blobs.contains(&i, &[digest(&data)]).await.unwrap();
    clock.advance(Duration::from_secs(120));
    blobs.contains(&i, &[digest(&data)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = stats.snapshot();
    assert_eq!((s.refreshes, s.refreshes_skipped), (0, 2), "no copy ran; the second use tried again");
    assert_eq!(requests(&stats, Op::Copy), 0);
}
