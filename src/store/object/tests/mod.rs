//! The bucket backends against `object_store`'s in-memory store, which
//! keeps S3's create-only, compare-and-swap and multipart semantics. Request
//! counts come from [`ObjectStats`], time from an injected clock.

mod actions;
mod audit;
mod blobs;
mod hit_log;
mod unreachable;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use object_store::memory::InMemory;

use super::{Bucket, ObjectOptions, ObjectStats, Op};
use crate::cache::digest::{Digest, DigestFunction};

/// A clock the test moves.
#[derive(Clone)]
struct TestClock(Arc<Mutex<SystemTime>>);

impl TestClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

/// A bucket in memory (the store too, to look behind the backend's back)
/// and a clock starting now.
fn bucket() -> (Arc<InMemory>, Bucket, TestClock) {
    bucket_with(ObjectOptions::default())
}

/// [`bucket`] with other options.
fn bucket_with(options: ObjectOptions) -> (Arc<InMemory>, Bucket, TestClock) {
    let store = Arc::new(InMemory::new());
    let clock = TestClock(Arc::new(Mutex::new(SystemTime::now())));
    let now = clock.clone();
    let bucket = Bucket::new(store.clone(), options).with_clock(Arc::new(move || *now.0.lock().unwrap()));
    (store, bucket, clock)
}

fn digest(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

fn requests(stats: &ObjectStats, op: Op) -> u64 {
    stats.snapshot().op(op).requests
}

/// Waits (briefly) for a background task to move a counter to `at_least`.
async fn settle(stats: &ObjectStats, counter: impl Fn(&ObjectStats) -> u64, at_least: u64) {
    for _ in 0..200 {
        if counter(stats) >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the background task never ran");
}
