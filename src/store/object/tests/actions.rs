use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};

use super::{bucket, digest, requests, settle};
use crate::cache::resource::InstanceName;
use crate::store::action_store::ActionStore;
use crate::store::object::{keys, ObjectActions, Op};

#[tokio::test]
async fn entries_are_stored_with_a_history_that_pages_and_purges_to_the_newest() {
    let (_, bucket, _) = bucket();
    let actions = ObjectActions::new(bucket);
    let (i, a) = (InstanceName::default(), digest(b"action"));
    assert_eq!(actions.get(&i, &a).await.unwrap(), None);
    assert_eq!(actions.put(&i, &a, b"one".to_vec(), 10).await.unwrap(), 10);
    assert_eq!(actions.put(&i, &a, b"two".to_vec(), 10).await.unwrap(), 11, "a taken time moves on by 1 ns");
    assert_eq!(actions.put(&i, &a, b"three".to_vec(), 30).await.unwrap(), 30);
    assert_eq!(actions.get(&i, &a).await.unwrap(), Some(b"three".to_vec()));
    let all = actions.history(&i, &a).await.unwrap();
    assert_eq!(all, vec![(10, b"one".to_vec()), (11, b"two".to_vec()), (30, b"three".to_vec())]);

    let first = actions.history_page(&i, &a, 0, 2, usize::MAX, true).await.unwrap();
    assert_eq!((first.versions.len(), first.next), (2, Some(30)));
    let rest = actions.history_page(&i, &a, 30, 2, usize::MAX, true).await.unwrap();
    assert_eq!((rest.versions, rest.next), (vec![(30, b"three".to_vec())], None));
    let forced = actions.history_page(&i, &a, 0, 10, 0, true).await.unwrap();
    assert_eq!((forced.versions.len(), forced.next), (1, Some(11)), "must_progress returns one over budget");
    let empty = actions.history_page(&i, &a, 0, 10, 0, false).await.unwrap();
    assert_eq!((empty.versions.len(), empty.next), (0, Some(10)));

    let other = digest(b"other action");
    actions.put(&i, &other, b"only".to_vec(), 5).await.unwrap();
    assert_eq!(actions.purge_history(100).await.unwrap(), 2);
    assert_eq!(actions.history(&i, &a).await.unwrap(), vec![(30, b"three".to_vec())]);
    assert_eq!(actions.history(&i, &other).await.unwrap(), vec![(5, b"only".to_vec())], "each newest is kept");
}

#[tokio::test]
async fn a_touch_redates_an_old_entry_but_never_overwrites_a_newer_one() {
    let (_, bucket, clock) = bucket();
    let stats = bucket.stats();
    let (replica_a, replica_b) = (ObjectActions::new(bucket.clone()), ObjectActions::new(bucket));
    let (i, a) = (InstanceName::default(), digest(b"action"));
    replica_a.put(&i, &a, b"old".to_vec(), 1).await.unwrap();
    replica_a.touch(&i, &a);
    assert_eq!(requests(&stats, Op::Get), 0, "a touch of an entry not read adds no request");

    replica_a.get(&i, &a).await.unwrap();
    clock.advance(Duration::from_secs(2 * 86_400));
    replica_a.touch(&i, &a);
    settle(&stats, |s| s.snapshot().refreshes, 1).await;
    assert_eq!(replica_a.get(&i, &a).await.unwrap(), Some(b"old".to_vec()));

    clock.advance(Duration::from_secs(2 * 86_400));
    replica_b.put(&i, &a, b"new".to_vec(), 2).await.unwrap();
    let gets = requests(&stats, Op::Get);
    replica_a.touch(&i, &a);
    settle(&stats, |s| s.snapshot().op(Op::Get).requests, gets + 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(replica_b.get(&i, &a).await.unwrap(), Some(b"new".to_vec()), "the newer entry stays");
    assert_eq!(stats.snapshot().refreshes, 1);
}

#[tokio::test]
async fn an_action_object_too_large_to_be_an_entry_is_a_miss_and_left_out_of_the_history() {
    let (store, bucket, _) = bucket();
    let actions = ObjectActions::new(bucket);
    let (i, a) = (InstanceName::default(), digest(b"action"));
    actions.put(&i, &a, b"fine".to_vec(), 1).await.unwrap();
    let huge = PutPayload::from(vec![0u8; (16 << 20) + 1]);
    store.put(&keys::action(&i, &a), huge.clone()).await.unwrap();
    store.put(&keys::history(&i, &a, 2), huge).await.unwrap();
    assert_eq!(actions.get(&i, &a).await.unwrap(), None);
    assert_eq!(actions.history(&i, &a).await.unwrap(), vec![(1, b"fine".to_vec())]);
}

#[tokio::test]
async fn a_retried_put_of_the_same_entry_at_the_same_time_adds_no_second_version() {
    let (_, bucket, _) = bucket();
    let actions = ObjectActions::new(bucket);
    let (i, a) = (InstanceName::default(), digest(b"action"));
    assert_eq!(actions.put(&i, &a, b"entry".to_vec(), 7).await.unwrap(), 7);
    assert_eq!(actions.put(&i, &a, b"entry".to_vec(), 7).await.unwrap(), 7, "the retry finds its own version");
    assert_eq!(actions.history(&i, &a).await.unwrap(), vec![(7, b"entry".to_vec())]);
}
