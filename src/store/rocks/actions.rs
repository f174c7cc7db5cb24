//! Action Cache entries and their history.

use std::sync::atomic::Ordering;

use rocksdb::WriteBatch;

use super::lru::{self, Access, Kind};
use super::{memory_only, Key, KeyValue, Page, RocksStore, CF_AC, CF_AC_HISTORY, CF_META};
use crate::error::{Error, Result};

/// The key, in the meta column family, of the latest history time stored.
pub(super) const HISTORY_HIGH_WATER: &[u8] = b"history-high-water";

impl RocksStore {
    /// The stored value of an Action Cache key.
    pub fn ac_get(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_AC), key.as_bytes())?)
    }

    /// [`RocksStore::ac_get`] answered from memory alone (see
    /// [`RocksStore::contains_cached`]): `None` if it would need a disk read.
    pub fn ac_get_cached(&self, key: &Key) -> Option<Result<Option<Vec<u8>>>> {
        match self.db.get_cf_opt(self.cf(CF_AC), key.as_bytes(), &memory_only()) {
            Ok(v) => Some(Ok(v)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    /// Stores an Action Cache value and its history record in one synced batch.
    ///
    /// Writers of one action are serialised (striped lock), and the history
    /// record's time comes from the store's history clock under that lock:
    /// strictly later than every history time before it, also across
    /// restarts (its high-water mark is merged into the same batch), so
    /// concurrent writers never overwrite each other's history record (equal
    /// clock readings) and the newest history record is always the current
    /// value (threat model R6), without reading the history on every write.
    /// Returns the history time used.
    pub fn ac_put(&self, key: &Key, value: &[u8], stored_at_nanos: u64) -> Result<u64> {
        let _guard = self.lock(key);
        let at = self.next_history_at(stored_at_nanos);
        let mut batch = WriteBatch::default();
        batch.merge_cf(self.cf(CF_META), HISTORY_HIGH_WATER, at.to_be_bytes());
        batch.put_cf(self.cf(CF_AC), key.as_bytes(), value);
        let mut hkey = key.as_bytes().to_vec();
        hkey.extend_from_slice(&at.to_be_bytes());
        batch.put_cf(self.cf(CF_AC_HISTORY), hkey, value);
        let delta = self.stage_ac(&mut batch, key, value.len())?;
        crate::failpoint::crash_point("ac-before-commit");
        self.db.write_opt(batch, &self.write_opts())?;
        self.applied(delta);
        crate::failpoint::crash_point("ac-after-commit");
        Ok(at)
    }

    /// A history time: `now_nanos`, or just after the last one handed out
    /// if that is later (equal clock readings, or a clock set back).
    fn next_history_at(&self, now_nanos: u64) -> u64 {
        let mut last = self.history_clock.load(Ordering::Acquire);
        loop {
            let next = now_nanos.max(last.saturating_add(1));
            match self.history_clock.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }

    /// The latest history time ever stored: the high-water mark, or, in a
    /// store written before there was one (or with the mark's block
    /// damaged), the largest time among the history records (read once).
    pub(super) fn load_history_high_water(&self) -> Result<u64> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, HISTORY_HIGH_WATER) {
            Ok(Some(v)) if v.len() == 8 => return Ok(u64::from_be_bytes(v[..].try_into().expect("8 bytes"))),
            Ok(_) => {}
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                tracing::error!(error = %e, "the history high-water mark is damaged; recomputing it");
            }
            Err(e) => return Err(e.into()),
        }
        let mut high = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_AC_HISTORY), rocksdb::IteratorMode::Start) {
            let Some((k, _)) = lru::readable(item)? else { break };
            if let Some(at) = k.len().checked_sub(8).map(|i| u64::from_be_bytes(k[i..].try_into().expect("8 bytes"))) {
                high = high.max(at);
            }
        }
        if high > 0 {
            self.db.merge_cf_opt(meta, HISTORY_HIGH_WATER, high.to_be_bytes(), &self.write_opts())?;
        }
        Ok(high)
    }

    fn stage_ac(&self, batch: &mut WriteBatch, key: &Key, len: usize) -> Result<lru::Delta> {
        let old = self.access(Kind::Action, key)?;
        let new = Access { at_ms: lru::now_ms(), size: len as u64 };
        Ok(self.stage(batch, Kind::Action, key, old, Some(new)))
    }

    /// Every history record of an action, oldest first: (stored-at ns, value).
    pub fn ac_history(&self, key: &Key) -> Result<Vec<(u64, Vec<u8>)>> {
        let prefix = key.as_bytes();
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator_cf(self.cf(CF_AC_HISTORY), rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let at = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            out.push((at, v.to_vec()));
        }
        Ok(out)
    }

    /// One page of an action's history, oldest first, from history time
    /// `from_nanos` on (inclusive): at most `max_count` records and, unless
    /// `must_progress` and the page would otherwise be empty, at most
    /// `max_bytes` of values, so any history fits in bounded replies.
    /// `next` is the history time (u64 BE) the following page starts at.
    pub fn ac_history_page(
        &self,
        key: &Key,
        from_nanos: u64,
        max_count: usize,
        max_bytes: usize,
        must_progress: bool,
    ) -> Result<Page<(u64, Vec<u8>)>> {
        let prefix = key.as_bytes();
        let mut start = prefix.to_vec();
        start.extend_from_slice(&from_nanos.to_be_bytes());
        let mut page = Page::default();
        let mut bytes = 0usize;
        let iter = self
            .db
            .iterator_cf(self.cf(CF_AC_HISTORY), rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            let at = u64::from_be_bytes(k[prefix.len()..].try_into().expect("8 bytes"));
            let first = page.rows.is_empty() && must_progress;
            if page.rows.len() >= max_count || (!first && bytes + v.len() > max_bytes) {
                page.next = Some(at.to_be_bytes().to_vec());
                break;
            }
            bytes += v.len();
            page.rows.push((at, v.to_vec()));
        }
        Ok(page)
    }

    /// Deletes history records stored before `before_nanos`; returns how many.
    pub fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        // Key: action key + stored-at (u64 ns).
        self.purge_older(CF_AC_HISTORY, before_nanos, 8)
    }

    /// Deletes the records of `cf` whose key holds a u64 ns time `from_end`
    /// bytes before its end, older than `before_nanos`; returns how many.
    fn purge_older(&self, cf: &str, before_nanos: u64, from_end: usize) -> Result<usize> {
        let cf = self.cf(cf);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            if k.len() >= from_end {
                let at = u64::from_be_bytes(k[k.len() - from_end..k.len() - from_end + 8].try_into().expect("8 bytes"));
                if at < before_nanos {
                    batch.delete_cf(cf, &k);
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.db.write(batch)?;
        }
        Ok(n)
    }

    /// Replaces an Action Cache value without any check. For tests and
    /// operator tools that simulate tampering at rest.
    pub fn ac_put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let key = Key(key.to_vec());
        let _guard = self.lock(&key);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_AC), key.as_bytes(), value);
        let delta = self.stage_ac(&mut batch, &key, value.len())?;
        self.db.write_opt(batch, &self.write_opts())?;
        self.applied(delta);
        Ok(())
    }

    /// Every Action Cache key and value (for operator tools; not for the hot path).
    pub fn ac_entries(&self) -> impl Iterator<Item = Result<KeyValue>> + '_ {
        self.db.iterator_cf(self.cf(CF_AC), rocksdb::IteratorMode::Start).map(|r| r.map_err(Error::from))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key, store};
    use super::super::StoreOptions;
    use super::*;

    #[test]
    fn history_pages_carry_at_least_one_version_when_asked_to_progress() {
        let (_d, s) = store();
        let a = key(b"a", "");
        for (i, at) in [10u64, 20, 30].into_iter().enumerate() {
            s.ac_put(&a, &[i as u8; 100], at).unwrap();
        }
        let page = s.ac_history_page(&a, 0, 10, 150, false).unwrap();
        assert_eq!(page.rows.len(), 1);
        let page = s.ac_history_page(&a, 0, 10, 50, false).unwrap();
        assert!(page.rows.is_empty(), "nothing fits and no progress is required");
        assert_eq!(page.next, Some(10u64.to_be_bytes().to_vec()));
        let page = s.ac_history_page(&a, 20, 10, 50, true).unwrap();
        assert_eq!(page.rows.iter().map(|r| r.0).collect::<Vec<_>>(), [20]);
        assert_eq!(page.next, Some(30u64.to_be_bytes().to_vec()));
        let page = s.ac_history_page(&a, 30, 10, 1000, true).unwrap();
        assert_eq!((page.rows.len(), page.next), (1, None));
    }

    /// History times only go forward: equal clock readings, a clock set
    /// back, a restart, and a store written before the high-water mark
    /// existed (its mark recomputed from the records) never reorder or
    /// overwrite an action's history.
    #[test]
    fn history_times_only_go_forward_across_restarts() {
        let (dir, s) = store();
        let (a, b) = (key(b"a", ""), key(b"b", ""));
        assert_eq!(s.ac_put(&a, b"a1", 1_000).unwrap(), 1_000);
        assert_eq!(s.ac_put(&a, b"a2", 1_000).unwrap(), 1_001, "equal reading");
        assert_eq!(s.ac_put(&b, b"b1", 500).unwrap(), 1_002, "clock set back");
        drop(s);
        let s = RocksStore::open(dir.path(), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        assert_eq!(s.ac_put(&a, b"a3", 10).unwrap(), 1_003, "after a restart with the clock set back");
        // A store from before the high-water mark: recomputed from the records.
        s.db.delete_cf(s.cf(CF_META), HISTORY_HIGH_WATER).unwrap();
        drop(s);
        let s = RocksStore::open(dir.path(), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        assert_eq!(s.ac_put(&a, b"a4", 10).unwrap(), 1_004);
        let history = s.ac_history(&a).unwrap();
        assert_eq!(
            history,
            vec![(1_000, b"a1".to_vec()), (1_001, b"a2".to_vec()), (1_003, b"a3".to_vec()), (1_004, b"a4".to_vec())]
        );
        assert_eq!(s.ac_get(&a).unwrap().unwrap(), b"a4", "the newest history record is the current value");
    }
}
