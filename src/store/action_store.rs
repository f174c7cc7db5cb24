//! What the Action Cache and the audit service need from storage: the
//! current entry of an action, its history, and recency for eviction.
//!
//! An entry is the encoded `StoredActionEntry`: its format belongs to the
//! domain (it is what the signatures cover), so a backend stores the bytes
//! as given and hands back exactly those bytes. How an action is keyed, and
//! where the bytes live, is the backend's business.

use async_trait::async_trait;

use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::Result;

/// One stored version of an action: (history time in ns, entry bytes).
pub type Version = (u64, Vec<u8>);

/// One page of an action's history, so a long history is read in bounded
/// replies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// The versions, oldest first.
    pub versions: Vec<Version>,
    /// The history time the following page starts at, when more follow.
    pub next: Option<u64>,
}

/// The Action Cache's storage, shared as `Arc<dyn ActionStore>` so the
/// domain does not know (or care) which backend holds the entries.
#[async_trait]
pub trait ActionStore: Send + Sync + std::fmt::Debug {
    /// The current entry of `action`, `None` on a miss. Damaged storage is
    /// an `Error::DataLoss`-coded error, which the Action Cache reads as a
    /// miss.
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>>;

    /// Makes `entry` the current entry of `action` and adds it to the
    /// history, both or neither, durably before returning. The history time
    /// is `stored_at_nanos` or, if that is not later than every history time
    /// before it, just after the latest: the newest history version is then
    /// always the current entry, even when writers race. Returns that time.
    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64>;

    /// Every stored version of `action`, oldest first (for audits and tests;
    /// services page with [`ActionStore::history_page`]).
    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>>;

    /// Versions of `action` from history time `from_nanos` on (inclusive),
    /// oldest first: at most `max_count`, and at most `max_bytes` of entries
    /// unless `must_progress` and the page would otherwise be empty.
    async fn history_page(
        &self,
        instance: &InstanceName,
        action: &Digest,
        from_nanos: u64,
        max_count: usize,
        max_bytes: usize,
        must_progress: bool,
    ) -> Result<HistoryPage>;

    /// Deletes history versions stored before `before_nanos` (never a
    /// current entry); returns how many.
    async fn purge_history(&self, before_nanos: u64) -> Result<usize>;

    /// Counts the entry of `action` as used just now (eviction keeps used
    /// entries). Never blocks: it is called on every hit.
    fn touch(&self, instance: &InstanceName, action: &Digest);
}
