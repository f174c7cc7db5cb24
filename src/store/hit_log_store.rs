//! What the per-invocation hit log needs from storage: append a chained
//! record, list an invocation's records in chain order, purge old
//! invocations. The record rules (chaining, signing, caps) are the domain's
//! ([`crate::provenance::hit_log`]); a backend stores and lists bytes.

use async_trait::async_trait;

use crate::error::Result;

/// One stored hit-log row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HitRow {
    /// The chain sequence; `None` for a record written before chaining
    /// (its value is then an unsigned `HitRecord`, not an envelope).
    pub sequence: Option<u64>,
    /// The stored value.
    pub value: Vec<u8>,
}

/// One page of an invocation's rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HitPage {
    /// The rows: chained records by sequence (older unchained ones first).
    pub rows: Vec<HitRow>,
    /// Where the next page starts, when more follow: an opaque cursor for
    /// [`HitLogStore::list`], which the domain hands out as a page token.
    pub next: Option<Vec<u8>>,
}

/// The hit log's storage, shared as `Arc<dyn HitLogStore>`.
#[async_trait]
pub trait HitLogStore: Send + Sync + std::fmt::Debug {
    /// Stores a chained record of `invocation` under `sequence` (the caller
    /// serialises the appends of one invocation and gives the sequence). A
    /// backend shared by several servers refuses a sequence already taken
    /// with a [`crate::store::StoreErrorKind::Conflict`] error, so the caller
    /// can re-read the chain's tail and relink. Not
    /// necessarily durable at once: the hit log is an audit aid, and a crash
    /// may lose a tail of a chain, never a record in its middle.
    async fn append(&self, invocation: &str, sequence: u64, answered_at_nanos: u64, record: Vec<u8>) -> Result<()>;

    /// A page of `invocation`'s rows after the cursor `after` (from the
    /// start when `None`): at most `max_count` rows and at most `max_bytes`
    /// of values, but always one row when any is left.
    async fn list(&self, invocation: &str, after: Option<&[u8]>, max_count: usize, max_bytes: usize)
        -> Result<HitPage>;

    /// A cursor for [`HitLogStore::list`] that starts just after the row of
    /// `sequence`: how a caller that lost an append race reads only the rows
    /// written after its head, not the whole chain again.
    fn cursor_after(&self, invocation: &str, sequence: u64) -> Vec<u8>;

    /// Whether `cursor` could have been issued by [`HitLogStore::list`] for
    /// `invocation` (a token from another invocation is refused, not read).
    fn is_cursor_of(&self, invocation: &str, cursor: &[u8]) -> bool;

    /// Deletes the rows of every invocation whose newest record was answered
    /// before `before_nanos`, a whole chain at a time (a kept chain never
    /// loses its start).
    async fn purge(&self, before_nanos: u64) -> Result<Purged>;
}

/// What a purge removed: the rows, and the invocations whose chains went
/// whole (the audit log forgets their chain heads, so a reused invocation
/// id starts a new chain at sequence 1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Rows deleted.
    pub rows: usize,
    /// Invocations whose every chained row was deleted.
    pub invocations: Vec<String>,
}
