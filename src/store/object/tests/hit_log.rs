use std::time::{SystemTime, UNIX_EPOCH};

use object_store::{ObjectStoreExt, PutPayload};

use super::bucket;
use crate::store::hit_log_store::HitLogStore;
use crate::store::object::{keys, ObjectHitLog};

fn nanos_from_now(seconds: i64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    (now + seconds * 1_000_000_000) as u64
}

#[tokio::test]
async fn a_sequence_stored_by_another_replica_is_a_conflict() {
    let (_, bucket, _) = bucket();
    let (a, b) = (ObjectHitLog::new(bucket.clone()), ObjectHitLog::new(bucket));
    a.append("inv", 1, 0, b"from a".to_vec()).await.unwrap();
    let err = b.append("inv", 1, 0, b"from b".to_vec()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
    let page = a.list("inv", None, 10, usize::MAX).await.unwrap();
    assert_eq!(page.rows[0].value, b"from a".to_vec(), "the first record stays");
}

#[tokio::test]
async fn a_listing_pages_by_count_and_bytes_with_cursors_bound_to_their_invocation() {
    let (_, bucket, _) = bucket();
    let log = ObjectHitLog::new(bucket);
    for sequence in 1..=5 {
        log.append("inv", sequence, 0, vec![b'x'; 10]).await.unwrap();
    }
    log.append("other", 1, 0, b"y".to_vec()).await.unwrap();
    let first = log.list("inv", None, 2, usize::MAX).await.unwrap();
    assert_eq!(first.rows.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![Some(1), Some(2)]);
    let cursor = first.next.unwrap();
    assert!(log.is_cursor_of("inv", &cursor) && !log.is_cursor_of("other", &cursor));
    let second = log.list("inv", Some(&cursor), 10, 15).await.unwrap();
    assert_eq!(second.rows.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![Some(3)], "15 bytes hold one row");
    let tail = log.list("inv", Some(&log.cursor_after("inv", 3)), 10, usize::MAX).await.unwrap();
    assert_eq!((tail.rows.len(), tail.next), (2, None));
    assert!(log.list("other", Some(&cursor), 10, usize::MAX).await.is_err());
}

#[tokio::test]
async fn a_purge_removes_whole_invocations_last_written_before_the_cutoff() {
    let (_, bucket, _) = bucket();
    let log = ObjectHitLog::new(bucket);
    log.append("inv/1", 1, 0, b"a".to_vec()).await.unwrap();
    log.append("inv/1", 2, 0, b"b".to_vec()).await.unwrap();
    assert_eq!(log.purge(nanos_from_now(-3600)).await.unwrap().rows, 0, "recent chains stay");
    let purged = log.purge(nanos_from_now(3600)).await.unwrap();
    assert_eq!((purged.rows, purged.invocations), (2, vec!["inv/1".to_string()]));
    assert!(log.list("inv/1", None, 10, usize::MAX).await.unwrap().rows.is_empty());
}

#[tokio::test]
async fn a_hit_object_too_large_to_be_a_record_is_listed_as_an_empty_row() {
    let (store, bucket, _) = bucket();
    let log = ObjectHitLog::new(bucket);
    log.append("inv", 1, 0, b"fine".to_vec()).await.unwrap();
    store.put(&keys::hit("inv", 2), PutPayload::from(vec![b'x'; 1 << 20])).await.unwrap();
    let page = log.list("inv", None, 10, usize::MAX).await.unwrap();
    let rows: Vec<_> = page.rows.iter().map(|r| (r.sequence, r.value.len())).collect();
    assert_eq!(rows, vec![(Some(1), 4), (Some(2), 0)], "the damaged row is there for the audit to flag, unread");
}

#[tokio::test]
async fn a_retried_append_of_the_same_record_succeeds_without_a_duplicate() {
    let (_, bucket, _) = bucket();
    let log = ObjectHitLog::new(bucket);
    log.append("inv", 1, 0, b"record".to_vec()).await.unwrap();
    log.append("inv", 1, 0, b"record".to_vec()).await.expect("our own earlier attempt is not a conflict");
    assert_eq!(log.list("inv", None, 10, usize::MAX).await.unwrap().rows.len(), 1);
}
