//! The budget of request bytes buffered in flight: one global pool and a
//! share per identity, so a caller that opens many streams and never
//! finishes their messages holds at most its own share of the server's
//! memory, and other identities keep theirs.
//!
//! A message being received is charged its declared length (the gRPC 5-byte
//! prefix) before its bytes are read, against the caller's share and then
//! the global pool, and released once it has been received whole (tonic
//! decodes it then) or the stream ends. Callers without any permission share
//! one small share. Waiting for budget is backpressure: the stream's bytes
//! stay in the HTTP/2 flow-control window, which the client cannot exceed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limit names of the budget, as counted by [`crate::limits::LimitHits`].
pub const GLOBAL_LIMIT: &str = "max_request_bytes";
/// See [`GLOBAL_LIMIT`].
pub const IDENTITY_LIMIT: &str = "max_request_bytes_per_identity";
/// See [`GLOBAL_LIMIT`].
pub const UNIDENTIFIED_LIMIT: &str = "max_request_bytes_unidentified";

/// Shares kept for identities with nothing in flight, before they are pruned.
const IDLE_SHARES_KEPT: usize = 1024;

/// One identity's part of the budget.
#[derive(Debug)]
pub struct Share {
    /// The principal (empty: callers without any permission).
    principal: String,
    limit: &'static str,
    capacity: u64,
    sem: Arc<Semaphore>,
}

impl Share {
    fn new(principal: String, limit: &'static str, capacity: u64) -> Self {
        Share { principal, limit, capacity, sem: Arc::new(Semaphore::new(capacity as usize)) }
    }

    /// Whose share this is (empty: callers without any permission), for
    /// counting limit hits.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// Bytes of this share held now.
    pub fn in_use(&self) -> u64 {
        self.capacity - self.sem.available_permits() as u64
    }
}

/// Bytes reserved for one message; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    _share: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// Why a message was not given budget: the limit's name and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The limit (one of the `*_LIMIT` names).
    pub limit: &'static str,
    /// A sentence for the caller and the log.
    pub detail: String,
}

/// The global pool and the per-identity shares.
#[derive(Debug)]
pub struct RequestBudget {
    global: Arc<Semaphore>,
    global_capacity: u64,
    per_identity: u64,
    unidentified: Arc<Share>,
    shares: Mutex<HashMap<String, Arc<Share>>>,
}

impl RequestBudget {
    /// A budget of `global` bytes, `per_identity` for each principal and
    /// `unidentified` for all callers without any permission together.
    pub fn new(global: u64, per_identity: u64, unidentified: u64) -> Self {
        RequestBudget {
            global: Arc::new(Semaphore::new(global as usize)),
            global_capacity: global,
            per_identity,
            unidentified: Arc::new(Share::new(String::new(), UNIDENTIFIED_LIMIT, unidentified)),
            shares: Mutex::new(HashMap::new()),
        }
    }

    /// The share of `principal`; `None` is the share of callers without
    /// any permission.
    pub fn share(&self, principal: Option<&str>) -> Arc<Share> {
        let Some(principal) = principal else { return self.unidentified.clone() };
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shares.get(principal) {
            return s.clone();
        }
        if shares.len() >= IDLE_SHARES_KEPT {
            // Only shares nobody holds and nothing is charged to can go.
            shares.retain(|_, s| Arc::strong_count(s) > 1 || s.in_use() > 0);
        }
        let share = Arc::new(Share::new(principal.to_owned(), IDENTITY_LIMIT, self.per_identity));
        shares.insert(principal.to_owned(), share.clone());
        share
    }

    /// Bytes held now, by everyone.
    pub fn in_use(&self) -> u64 {
        self.global_capacity - self.global.available_permits() as u64
    }

    /// Reserves `bytes` for one message of `share`'s caller, waiting up to
    /// `wait` for budget to be released. A message that could never fit is
    /// refused at once.
    pub async fn reserve(&self, share: &Arc<Share>, bytes: u32, wait: Duration) -> Result<Reservation, Refusal> {
        let n = u64::from(bytes);
        if n > share.capacity {
            return Err(Refusal {
                limit: share.limit,
                detail: format!("a message of {n} bytes can never fit the caller's share of {} bytes", share.capacity),
            });
        }
        if n > self.global_capacity {
            return Err(Refusal {
                limit: GLOBAL_LIMIT,
                detail: format!("a message of {n} bytes can never fit the budget of {} bytes", self.global_capacity),
            });
        }
        let deadline = tokio::time::Instant::now() + wait;
        let waited = |limit: &'static str, held: u64, capacity: u64| Refusal {
            limit,
            detail: format!(
                "a message of {n} bytes waited {wait:?} for request budget ({held} of {capacity} bytes in flight)"
            ),
        };
        let own = tokio::time::timeout_at(deadline, share.sem.clone().acquire_many_owned(bytes))
            .await
            .map_err(|_| waited(share.limit, share.in_use(), share.capacity))?
            .expect("budget semaphores are never closed");
        let global = tokio::time::timeout_at(deadline, self.global.clone().acquire_many_owned(bytes))
            .await
            .map_err(|_| waited(GLOBAL_LIMIT, self.in_use(), self.global_capacity))?
            .expect("budget semaphores are never closed");
        Ok(Reservation { _share: own, _global: global })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_message_larger_than_the_share_is_refused_at_once_naming_the_limit() {
        let budget = RequestBudget::new(100, 10, 2);
        let writer = budget.share(Some("spiffe://x/writer"));
        let r = budget.reserve(&writer, 11, Duration::from_secs(3600)).await.unwrap_err();
        assert_eq!(r.limit, IDENTITY_LIMIT);
        let r = budget.reserve(&budget.share(None), 3, Duration::from_secs(3600)).await.unwrap_err();
        assert_eq!(r.limit, UNIDENTIFIED_LIMIT);
    }

    #[tokio::test]
    async fn a_caller_cannot_hold_more_than_its_share_and_others_keep_theirs() {
        let budget = RequestBudget::new(25, 10, 2);
        let greedy = budget.share(Some("greedy"));
        let held = budget.reserve(&greedy, 10, WAIT).await.unwrap();
        let r = budget.reserve(&greedy, 1, WAIT).await.unwrap_err();
        assert_eq!(r.limit, IDENTITY_LIMIT, "{r:?}");
        let honest = budget.share(Some("honest"));
        let _ok = budget.reserve(&honest, 10, WAIT).await.unwrap();
        assert_eq!(budget.in_use(), 20);
        drop(held);
        assert_eq!(greedy.in_use(), 0);
        budget.reserve(&greedy, 5, WAIT).await.unwrap();
    }

    #[tokio::test]
    async fn the_global_budget_bounds_the_sum_of_shares() {
        let budget = RequestBudget::new(15, 10, 2);
        let _a = budget.reserve(&budget.share(Some("a")), 10, WAIT).await.unwrap();
        let r = budget.reserve(&budget.share(Some("b")), 10, WAIT).await.unwrap_err();
        assert_eq!(r.limit, GLOBAL_LIMIT, "{r:?}");
        assert_eq!(budget.share(Some("b")).in_use(), 0, "a refused wait gives back the share");
    }

    #[tokio::test]
    async fn a_waiting_message_gets_budget_when_it_is_released() {
        let budget = Arc::new(RequestBudget::new(10, 10, 2));
        let share = budget.share(Some("a"));
        let held = budget.reserve(&share, 8, WAIT).await.unwrap();
        let waiter = {
            let (budget, share) = (budget.clone(), share.clone());
            tokio::spawn(async move { budget.reserve(&share, 8, Duration::from_secs(10)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        waiter.await.unwrap().unwrap();
    }
}
