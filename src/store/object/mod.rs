//! Backends over an S3-compatible bucket, the source of truth that every
//! replica shares (docs of the scale-out issue): [`ObjectBlobs`] (the CAS),
//! [`ObjectActions`] (the Action Cache and its history) and [`ObjectHitLog`]
//! (the hit log), all counted in one [`ObjectStats`].
//!
//! Each is built from a [`Bucket`]: an `Arc<dyn ObjectStore>` already scoped
//! to the operator's prefix, the [`ObjectOptions`] and the counters. Nothing
//! here trusts what the bucket returns: blobs are checked against their
//! digests (by the domain, or by [`ObjectBlobs`]'s ranged read), entries and
//! hit records are verified by the domain as from any other store. The key
//! layout is in [`keys`]; the client and its settings in [`client`].
//!
//! Listings rely on the S3 rule that LIST returns keys in lexicographic
//! order (so do the in-memory and local stores of `object_store`).

mod actions;
mod blobs;
mod bucket;
pub mod client;
mod hit_log;
pub mod keys;
mod stats;
mod writer;

#[cfg(test)]
mod tests;

pub use actions::ObjectActions;
pub use blobs::ObjectBlobs;
pub use bucket::{Bucket, ObjectOptions};
pub use hit_log::ObjectHitLog;
pub use stats::{ObjectStats, ObjectStatsSnapshot, Op, OpSnapshot};
