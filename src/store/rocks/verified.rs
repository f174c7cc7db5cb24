//! Per-chunk hashes of blobs this process has verified against their digest.
//!
//! A ranged read of a multi-chunk blob cannot check the blob's digest without
//! reading all of it, which made every 1-byte read of a 256 MiB blob cost a
//! full re-hash (issue 13, attack 6). Once a blob has been read whole and
//! matched its digest, the BLAKE3 hash of each chunk is remembered here, in
//! memory only; a later ranged read hashes just the chunks it touches and
//! compares them with these. Someone who can write the RocksDB files still
//! never gets wrong bytes served (threat model T8/R8): the hashes never come
//! from disk, an entry is keyed by the digest *and* the blob id its record
//! points at (a record redirected to other chunks misses the cache and is
//! verified whole again), and a chunk that does not match is an error before
//! any of its bytes is sent.
//!
//! The cache is bounded in bytes (`limits.verified_chunk_cache`) and forgets
//! its oldest entries first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{BlobMeta, Key};

/// The hash of one chunk.
pub type ChunkHash = [u8; 32];

/// Bytes an entry costs beyond its chunk hashes (map and queue slots, the key).
const ENTRY_OVERHEAD: u64 = 160;

/// What the cache remembers of one verified blob.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Which queue slot owns this entry.
    seq: u64,
    blob_id: u64,
    chunk_size: u32,
    hashes: Arc<[ChunkHash]>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Insertion order, oldest first (a key may appear after its entry was
    /// replaced or removed; such stale slots are skipped).
    order: VecDeque<(Key, u64)>,
    bytes: u64,
    next_seq: u64,
}

/// How often the cache answered (tests and diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifiedStats {
    /// Ranged reads that found their blob's chunk hashes here.
    pub hits: u64,
    /// Ranged reads that had to verify the whole blob first.
    pub misses: u64,
    /// Blobs currently remembered.
    pub entries: u64,
    /// Bytes the remembered hashes cost.
    pub bytes: u64,
}

/// The bounded map from verified blob to its chunk hashes.
#[derive(Debug)]
pub struct VerifiedChunks {
    state: Mutex<State>,
    capacity: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The hash a chunk is remembered by.
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    *blake3::hash(data).as_bytes()
}

impl VerifiedChunks {
    /// An empty cache of at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        VerifiedChunks {
            state: Mutex::default(),
            capacity: AtomicU64::new(capacity),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Changes the bound (the server sets it from its limits at start).
    pub fn set_capacity(&self, capacity: u64) {
        self.capacity.store(capacity, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::shrink(&mut state, capacity);
    }

    /// The chunk hashes of the blob `meta` describes under `key`, if it was
    /// verified whole since it was stored there. Counts a hit or a miss.
    pub fn get(&self, key: &Key, meta: &BlobMeta) -> Option<Arc<[ChunkHash]>> {
        let found = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state
                .entries
                .get(key)
                .filter(|e| {
                    e.blob_id == meta.blob_id
                        && e.chunk_size == meta.chunk_size
                        && e.hashes.len() == meta.chunks() as usize
                })
                .map(|e| e.hashes.clone())
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Remembers the chunk hashes of a blob just verified whole against the
    /// digest in `key`.
    pub fn insert(&self, key: &Key, meta: &BlobMeta, hashes: Arc<[ChunkHash]>) {
        let cost = Self::cost(key, hashes.len());
        let capacity = self.capacity.load(Ordering::Relaxed);
        if cost > capacity {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let seq = state.next_seq;
        state.next_seq += 1;
        let entry = Entry { seq, blob_id: meta.blob_id, chunk_size: meta.chunk_size, hashes };
        if let Some(old) = state.entries.insert(key.clone(), entry) {
            state.bytes -= Self::cost(key, old.hashes.len());
        }
        state.bytes += cost;
        state.order.push_back((key.clone(), seq));
        Self::shrink(&mut state, capacity);
    }

    /// Forgets a blob (deleted, or found corrupt).
    pub fn remove(&self, key: &Key) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = state.entries.remove(key) {
            state.bytes -= Self::cost(key, old.hashes.len());
        }
    }

    /// Hits, misses and size so far.
    pub fn stats(&self) -> VerifiedStats {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        VerifiedStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: state.entries.len() as u64,
            bytes: state.bytes,
        }
    }

    fn cost(key: &Key, chunks: usize) -> u64 {
        ENTRY_OVERHEAD + 2 * key.as_bytes().len() as u64 + 32 * chunks as u64
    }

    /// Drops the oldest entries until the cache fits `capacity`, and stale
    /// queue slots so the queue stays proportional to the entries.
    fn shrink(state: &mut State, capacity: u64) {
        while state.bytes > capacity || state.order.len() > 2 * state.entries.len() + 16 {
            let Some((key, seq)) = state.order.pop_front() else { break };
            // Only the newest slot of a key owns its entry.
            if state.entries.get(&key).is_some_and(|e| e.seq == seq) {
                let old = state.entries.remove(&key).expect("just found");
                state.bytes -= Self::cost(&key, old.hashes.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::digest::{Digest, DigestFunction};
    use crate::cache::resource::InstanceName;

    fn key(n: u8) -> Key {
        Key::new(&InstanceName::default(), &Digest::of(DigestFunction::Sha256, &[n]))
    }

    fn meta(blob_id: u64, chunks: u32) -> BlobMeta {
        BlobMeta { blob_id, size: chunks as u64 * 4, chunk_size: 4, stored_at: 0 }
    }

    #[test]
    fn a_blob_is_found_only_under_the_record_it_was_verified_with() {
        let cache = VerifiedChunks::new(1 << 20);
        cache.insert(&key(1), &meta(7, 2), vec![[1; 32], [2; 32]].into());
        assert!(cache.get(&key(1), &meta(7, 2)).is_some());
        assert!(cache.get(&key(1), &meta(8, 2)).is_none(), "a record pointing at other chunks");
        assert!(cache.get(&key(2), &meta(7, 2)).is_none(), "another digest");
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 2));
        cache.remove(&key(1));
        assert!(cache.get(&key(1), &meta(7, 2)).is_none());
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bound_and_forgets_the_oldest_first() {
        let one = VerifiedChunks::cost(&key(0), 10);
        let cache = VerifiedChunks::new(3 * one);
        for n in 0..10u8 {
            cache.insert(&key(n), &meta(n as u64, 10), vec![[n; 32]; 10].into());
            assert!(cache.stats().bytes <= 3 * one);
        }
        assert_eq!(cache.stats().entries, 3);
        assert!(cache.get(&key(9), &meta(9, 10)).is_some());
        assert!(cache.get(&key(0), &meta(0, 10)).is_none());
    }
}
