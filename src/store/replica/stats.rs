//! The replica's counters: how often the local caches answered, how often
//! the remote had to, and what went wrong with the remote, so an operator
//! can size the caches and notice an outage or a tampered bucket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::Error;

/// Counters shared by a replica's [`super::ReadThroughBlobs`] and
/// [`super::CachedActions`] (one `Arc` per process), plus whether the
/// remote is currently known to be unreachable, so an outage is logged once
/// rather than once per request.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    cas_local_hits: AtomicU64,
    cas_remote_fills: AtomicU64,
    cas_fills_shared: AtomicU64,
    ac_cache_hits: AtomicU64,
    ac_remote_reads: AtomicU64,
    served_while_remote_unavailable: AtomicU64,
    corrupt_from_remote: AtomicU64,
    in_outage: AtomicBool,
}

/// One reading of [`ReplicaStats`], for the metrics module (plain numbers,
/// cheap to copy and compare).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStatsSnapshot {
    /// CAS reads answered by the local cache.
    pub cas_local_hits: u64,
    /// CAS reads that had to fetch the blob from the remote.
    pub cas_remote_fills: u64,
    /// CAS reads that waited for another reader's fill of the same blob
    /// instead of downloading it again.
    pub cas_fills_shared: u64,
    /// Action Cache reads answered from memory within the TTL.
    pub ac_cache_hits: u64,
    /// Action Cache reads that went to the remote.
    pub ac_remote_reads: u64,
    /// Answers given from local state because the remote was unavailable
    /// (existence checks and stale Action Cache entries).
    pub served_while_remote_unavailable: u64,
    /// Blobs the remote returned that did not match their digest.
    pub corrupt_from_remote: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl ReplicaStats {
    /// Fresh counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current counts (each read on its own: cheap, and good enough for
    /// metrics, which never need them consistent with each other).
    pub fn snapshot(&self) -> ReplicaStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReplicaStatsSnapshot {
            cas_local_hits: get(&self.cas_local_hits),
            cas_remote_fills: get(&self.cas_remote_fills),
            cas_fills_shared: get(&self.cas_fills_shared),
            ac_cache_hits: get(&self.ac_cache_hits),
            ac_remote_reads: get(&self.ac_remote_reads),
            served_while_remote_unavailable: get(&self.served_while_remote_unavailable),
            corrupt_from_remote: get(&self.corrupt_from_remote),
        }
    }

    pub(super) fn cas_local_hit(&self) {
        bump(&self.cas_local_hits);
    }

    pub(super) fn cas_remote_fill(&self) {
        bump(&self.cas_remote_fills);
    }

    pub(super) fn cas_fill_shared(&self) {
        bump(&self.cas_fills_shared);
    }

    pub(super) fn ac_cache_hit(&self) {
        bump(&self.ac_cache_hits);
    }

    pub(super) fn ac_remote_read(&self) {
        bump(&self.ac_remote_reads);
    }

    pub(super) fn corrupt_from_remote(&self) {
        bump(&self.corrupt_from_remote);
    }

    /// Records an answer given from local state because the remote failed
    /// with `error`; the first one of an outage is logged.
    pub(super) fn served_while_unavailable(&self, error: &Error) {
        bump(&self.served_while_remote_unavailable);
        if !self.in_outage.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "remote store unavailable; answering from this replica's caches");
        }
    }

    /// Records that the remote answered, ending an outage (logged once).
    pub(super) fn remote_answered(&self) {
        if self.in_outage.swap(false, Ordering::Relaxed) {
            tracing::info!("remote store reachable again");
        }
    }
}

/// Whether `error` means the remote could not be reached (or timed out), the
/// one failure a local answer may stand in for.
pub(super) fn is_unavailable(error: &Error) -> bool {
    error.code() == tonic::Code::Unavailable
}
