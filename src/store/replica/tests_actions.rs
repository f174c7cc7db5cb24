//! What a user of a replica notices about Action Cache entries: how stale
//! an answer can be, and that an outage of the bucket still serves what
//! this replica has seen.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tonic::Code;

use super::faults::FaultyActions;
use super::{CachedActions, ReplicaStats};
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::clock::Clock;
use crate::store::action_store::ActionStore;

const TTL: Duration = Duration::from_secs(10);

/// A replica's Action Cache over a faulty remote, with a clock tests move.
struct Fixture {
    actions: CachedActions,
    remote: Arc<FaultyActions>,
    stats: Arc<ReplicaStats>,
    now: Arc<Mutex<SystemTime>>,
}

fn fixture(ttl: Duration, max_bytes: usize) -> Fixture {
    let remote = Arc::new(FaultyActions::default());
    let stats = Arc::new(ReplicaStats::new());
    let now = Arc::new(Mutex::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)));
    let time = now.clone();
    let clock: Clock = Arc::new(move || *time.lock().unwrap());
    let actions = CachedActions::new(remote.clone(), ttl, max_bytes, clock, stats.clone());
    Fixture { actions, remote, stats, now }
}

impl Fixture {
    fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }
}

fn action(name: &str) -> Digest {
    Digest::of(DigestFunction::Sha256, name.as_bytes())
}

fn instance() -> InstanceName {
    InstanceName::default()
}

#[tokio::test]
async fn an_entry_replaced_through_another_replica_is_seen_after_the_ttl_and_not_before() {
    let f = fixture(TTL, 1 << 20);
    let (i, a) = (instance(), action("compile"));
    f.actions.put(&i, &a, b"first".to_vec(), 1).await.unwrap();
    f.remote.inner.put(&i, &a, b"second".to_vec(), 2).await.unwrap();

    f.advance(TTL - Duration::from_secs(1));
    assert_eq!(f.actions.get(&i, &a).await.unwrap(), Some(b"first".to_vec()));
    assert_eq!(f.remote.faults.reads(), 0);

    f.advance(Duration::from_secs(1));
    assert_eq!(f.actions.get(&i, &a).await.unwrap(), Some(b"second".to_vec()));
    assert_eq!(f.remote.faults.reads(), 1);
    let seen = f.stats.snapshot();
    assert_eq!((seen.ac_cache_hits, seen.ac_remote_reads), (1, 1));
}

#[tokio::test]
async fn an_entry_read_from_the_remote_is_answered_from_memory_until_the_ttl_runs_out() {
    let f = fixture(TTL, 1 << 20);
    let (i, a) = (instance(), action("link"));
    f.remote.inner.put(&i, &a, b"result".to_vec(), 1).await.unwrap();

    for _ in 0..3 {
        assert_eq!(f.actions.get(&i, &a).await.unwrap(), Some(b"result".to_vec()));
    }
    assert_eq!(f.remote.faults.reads(), 1);
    f.advance(TTL);
    assert_eq!(f.actions.get(&i, &a).await.unwrap(), Some(b"result".to_vec()));
    assert_eq!(f.remote.faults.reads(), 2);
}

#[tokio::test]
async fn a_miss_is_not_cached_so_a_result_uploaded_elsewhere_is_seen_at_once() {
    let f = fixture(TTL, 1 << 20);
    let (i, a) = (instance(), action("test"));

    assert_eq!(f.actions.get(&i, &a).await.unwrap(), None);
    f.remote.inner.put(&i, &a, b"uploaded via replica A".to_vec(), 1).await.unwrap();

    assert_eq!(f.actions.get(&i, &a).await.unwrap(), Some(b"uploaded via replica A".to_vec()));
}

#[tokio::test]
async fn while_the_remote_is_unavailable_a_cached_entry_of_any_age_is_served_and_without_one_the_error() {
    let f = fixture(TTL, 1 << 20);
    let (i, cached, unseen) = (instance(), action("cached"), action("unseen"));
    f.actions.put(&i, &cached, b"old but signed".to_vec(), 1).await.unwrap();
    f.remote.inner.put(&i, &unseen, b"never read here".to_vec(), 2).await.unwrap();
    f.advance(TTL * 100);

    f.remote.faults.switch_off(true);
    assert_eq!(f.actions.get(&i, &cached).await.unwrap(), Some(b"old but signed".to_vec()));
    assert_eq!(f.actions.get(&i, &unseen).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(f.stats.snapshot().served_while_remote_unavailable, 1);
}

#[tokio::test]
async fn a_put_the_remote_refuses_fails_and_caches_nothing() {
    let f = fixture(TTL, 1 << 20);
    let (i, a) = (instance(), action("refused"));

    f.remote.faults.switch_off(true);
    assert_eq!(f.actions.put(&i, &a, b"never stored".to_vec(), 1).await.unwrap_err().code(), Code::Unavailable);
    // Stale-if-error would serve a cached entry: there is none.
    assert_eq!(f.actions.get(&i, &a).await.unwrap_err().code(), Code::Unavailable);
    f.remote.faults.switch_off(false);
    assert_eq!(f.actions.get(&i, &a).await.unwrap(), None);
}

#[tokio::test]
async fn with_a_zero_ttl_every_read_goes_to_the_remote_yet_the_last_entry_still_covers_an_outage() {
    let f = fixture(Duration::ZERO, 1 << 20);
    let (i, a) = (instance(), action("uncached"));
    f.actions.put(&i, &a, b"entry".to_vec(), 1).await.unwrap();

    f.actions.get(&i, &a).await.unwrap();
    f.actions.get(&i, &a).await.unwrap();
    assert_eq!(f.remote.faults.reads(), 2);
    f.remote.faults.switch_off(true);
    assert_eq!(f.actions.get(&i, &a).await.unwrap(), Some(b"entry".to_vec()));
}

#[tokio::test]
async fn the_cache_stays_within_its_byte_bound_by_forgetting_the_oldest_entries() {
    let f = fixture(TTL, 10);
    let i = instance();
    let (oldest, middle, newest) = (action("1"), action("2"), action("3"));
    for (n, a) in [oldest, middle, newest].iter().enumerate() {
        f.actions.put(&i, a, b"4444".to_vec(), n as u64).await.unwrap();
    }

    f.remote.faults.switch_off(true);
    assert_eq!(f.actions.get(&i, &oldest).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(f.actions.get(&i, &middle).await.unwrap(), Some(b"4444".to_vec()));
    assert_eq!(f.actions.get(&i, &newest).await.unwrap(), Some(b"4444".to_vec()));
}

#[tokio::test]
async fn history_and_touches_are_the_remotes() {
    let f = fixture(TTL, 1 << 20);
    let (i, a) = (instance(), action("audited"));
    f.actions.put(&i, &a, b"v1".to_vec(), 1).await.unwrap();
    f.remote.inner.put(&i, &a, b"v2".to_vec(), 2).await.unwrap();

    f.actions.touch(&i, &a);

    let versions: Vec<Vec<u8>> = f.actions.history(&i, &a).await.unwrap().into_iter().map(|(_, e)| e).collect();
    assert_eq!(versions, vec![b"v1".to_vec(), b"v2".to_vec()]);
    assert_eq!(f.remote.inner.touches(&i, &a), 1);
}
