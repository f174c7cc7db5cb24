//! Whether the shared object store answers, as the operator and the load
//! balancer see it (docs/scale-out.md, "Failures").
//!
//! A replica over an object store can still serve hits from its local cache
//! when the store is down, but it cannot take writes. A probe asks the store
//! one cheap question every few seconds; the answer moves a gauge
//! (`provcache_object_store_up`), is logged once per change, and turns the
//! write services (CAS, ByteStream) NOT_SERVING on the standard health
//! service while the store is unreachable, so a load balancer that checks
//! per-service health sends writes elsewhere. Recovery needs no restart.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};

/// The key the probe asks for: it never exists, and "not found" is a healthy
/// answer (the store answered, the bucket exists, the credentials work).
const PROBE_KEY: &str = "provcache-probe/absent";

/// The last answer of the probe, shared with the metrics and the health
/// service.
#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
    changes: AtomicU64,
    failed_probes: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth { up: AtomicBool::new(true), changes: AtomicU64::new(0), failed_probes: AtomicU64::new(0) }
    }
}

impl StoreHealth {
    /// Whether the last probe got an answer from the store.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Probes that got no answer, since start.
    pub fn failed_probes(&self) -> u64 {
        self.failed_probes.load(Ordering::Relaxed)
    }

    /// Records one probe's outcome; returns `true` when it changed the state.
    pub fn record(&self, up: bool) -> bool {
        if !up {
            self.failed_probes.fetch_add(1, Ordering::Relaxed);
        }
        let changed = self.up.swap(up, Ordering::Relaxed) != up;
        if changed {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        changed
    }
}

/// One probe: a HEAD of a key that does not exist.
pub async fn probe(store: &dyn ObjectStore, timeout: Duration) -> Result<(), String> {
    let key = Path::from(PROBE_KEY);
    let head = store.head(&key);
    match tokio::time::timeout(timeout, head).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Probes `store` every `every` until the task is aborted, recording each
/// outcome in `health` and calling `on_change(up)` when it flips.
pub fn spawn_probe(
    store: Arc<dyn ObjectStore>,
    health: Arc<StoreHealth>,
    every: Duration,
    on_change: impl Fn(bool) -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let outcome = probe(store.as_ref(), every.max(Duration::from_secs(1))).await;
            if health.record(outcome.is_ok()) {
                match &outcome {
                    Ok(()) => tracing::warn!("the object store answers again: writes are accepted"),
                    Err(e) => tracing::error!(
                        error = %e,
                        "the object store does not answer: writes fail UNAVAILABLE, hits in the local cache are still served"
                    ),
                }
                on_change(outcome.is_ok()).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn a_store_that_answers_not_found_is_up() {
        assert_eq!(probe(&InMemory::new(), Duration::from_secs(1)).await, Ok(()));
    }

    #[test]
    fn only_a_change_of_state_is_reported_and_failures_are_counted() {
        let h = StoreHealth::default();
        assert!(h.is_up());
        assert!(!h.record(true));
        assert!(h.record(false));
        assert!(!h.record(false));
        assert!(!h.is_up());
        assert_eq!(h.failed_probes(), 2);
        assert!(h.record(true));
        assert!(h.is_up());
    }
}
