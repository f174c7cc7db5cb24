//! What makes one provcache process a replica of a shared object store: the
//! bucket is the source of truth for the CAS and the Action Cache, and this
//! process keeps only caches in front of it.
//!
//! - [`ReadThroughBlobs`]: a size-bounded local [`BlobStore`] (RocksDB in the
//!   server) in front of the remote one. Writes go through to the remote
//!   before they are acknowledged, so every replica sees them; reads fill the
//!   local cache, and nothing from the remote is served or cached before it
//!   matched its digest.
//! - [`CachedActions`]: a short-TTL, byte-bounded memory cache of current
//!   Action Cache entries in front of the remote [`ActionStore`], which also
//!   answers (stale) while the remote is unreachable. The domain verifies
//!   every entry it is given, so a stale or tampered one is never trusted.
//! - [`ReplicaStats`]: what both count, for the metrics module.
//!
//! The composition root builds one [`ReplicaStats`] per process and hands it
//! to both: `ReadThroughBlobs::new(rocks_blobs, object_blobs, stats.clone())`
//! and `CachedActions::new(object_actions, CachedActions::DEFAULT_TTL,
//! CachedActions::DEFAULT_MAX_BYTES, clock, stats)`.
//!
//! Both are written against the storage traits only, so any backend pair
//! composes (the object-store backends in the server, memory ones in tests).
//!
//! [`BlobStore`]: crate::store::BlobStore
//! [`ActionStore`]: crate::store::action_store::ActionStore

mod actions;
mod blobs;
mod fill;
mod stats;

pub use actions::CachedActions;
pub use blobs::ReadThroughBlobs;
pub use stats::{ReplicaStats, ReplicaStatsSnapshot};

#[cfg(test)]
pub(crate) mod faults;
#[cfg(test)]
mod tests_actions;
#[cfg(test)]
mod tests_blobs;
#[cfg(test)]
mod tests_fill;
