//! The hit log (audit rows), chained per invocation.

use rocksdb::WriteBatch;

use super::{random_u64, Page, RocksStore, CF_AUDIT};
use crate::error::Result;
use crate::store::hit_log_store::Purged;

/// Key suffix (after the invocation prefix) of a chained hit record:
/// sequence + answered-at.
const AUDIT_CHAINED_SUFFIX: usize = 16;
/// Key suffix of a hit record written before chaining: answered-at + random.
const AUDIT_LEGACY_SUFFIX: usize = 12;

/// One stored hit-log row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// The raw key (a page token points after it).
    pub key: Box<[u8]>,
    /// The chain sequence; `None` for a record written before chaining
    /// (its value is then an unsigned `HitRecord`, not an envelope).
    pub sequence: Option<u64>,
    /// The stored value.
    pub value: Box<[u8]>,
}

/// The key prefix of an invocation's hit-log rows (u16 length + id): every
/// row of the invocation, and only those, starts with it.
pub fn audit_prefix(invocation: &str) -> Vec<u8> {
    let id = &invocation.as_bytes()[..invocation.len().min(u16::MAX as usize)];
    let mut k = Vec::with_capacity(2 + id.len() + 12);
    k.extend_from_slice(&(id.len() as u16).to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// A listing cursor just after every row of `sequence`: the row keys are
/// prefix + sequence + answered-at, so the largest answered-at sorts after
/// them all and before the next sequence's rows.
pub fn audit_cursor_after(invocation: &str, sequence: u64) -> Vec<u8> {
    let mut k = audit_prefix(invocation);
    k.extend_from_slice(&sequence.to_be_bytes());
    k.extend_from_slice(&u64::MAX.to_be_bytes());
    k
}

impl RocksStore {
    /// Appends a chained hit record (not synced: the hit log is an audit aid,
    /// not an acknowledged write; a crash loses a tail of the chain, never a
    /// record in the middle). The caller (the audit log, which holds each
    /// invocation's chain head) gives the sequence.
    pub fn audit_append(&self, invocation: &str, sequence: u64, answered_at_nanos: u64, value: &[u8]) -> Result<()> {
        let mut key = audit_prefix(invocation);
        key.extend_from_slice(&sequence.to_be_bytes());
        key.extend_from_slice(&answered_at_nanos.to_be_bytes());
        self.db.put_cf(self.cf(CF_AUDIT), key, value)?;
        Ok(())
    }

    /// Writes a hit record in the format used before chaining (an unsigned
    /// `HitRecord` under answered-at + random). Only for tests of data
    /// written by older versions.
    pub fn audit_put_legacy(&self, invocation: &str, answered_at_nanos: u64, record: &[u8]) -> Result<()> {
        let mut key = audit_prefix(invocation);
        key.extend_from_slice(&answered_at_nanos.to_be_bytes());
        key.extend_from_slice(&(random_u64() as u32).to_be_bytes());
        self.db.put_cf(self.cf(CF_AUDIT), key, record)?;
        Ok(())
    }

    /// Deletes one hit-log row by its raw key. For tests and operator tools
    /// that simulate tampering at rest.
    pub fn audit_delete_raw(&self, key: &[u8]) -> Result<()> {
        self.db.delete_cf(self.cf(CF_AUDIT), key)?;
        Ok(())
    }

    /// Replaces one hit-log row's value without any check. For tests and
    /// operator tools that simulate tampering at rest.
    pub fn audit_put_raw(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.put_cf(self.cf(CF_AUDIT), key, value)?;
        Ok(())
    }

    /// One page of an invocation's hit log in key order (chained records by
    /// sequence), after the raw key `after` (a page token) if given: at most
    /// `max_count` rows and at most `max_bytes` of values (but always one
    /// row when any is left). `next` is the last row's key when more follow.
    pub fn audit_list(
        &self,
        invocation: &str,
        after: Option<&[u8]>,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Page<AuditRow>> {
        let prefix = audit_prefix(invocation);
        let start = after.map(|a| a.to_vec()).unwrap_or_else(|| prefix.clone());
        let mut page = Page::default();
        let mut bytes = 0usize;
        let iter =
            self.db.iterator_cf(self.cf(CF_AUDIT), rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if after.is_some_and(|a| a == &k[..]) {
                continue;
            }
            let sequence = match k.len() - prefix.len() {
                AUDIT_CHAINED_SUFFIX => {
                    Some(u64::from_be_bytes(k[prefix.len()..prefix.len() + 8].try_into().expect("8 bytes")))
                }
                AUDIT_LEGACY_SUFFIX => None,
                _ => continue,
            };
            if page.rows.len() >= max_count || (!page.rows.is_empty() && bytes + v.len() > max_bytes) {
                page.next = page.rows.last().map(|r: &AuditRow| r.key.to_vec());
                break;
            }
            bytes += v.len();
            page.rows.push(AuditRow { key: k, sequence, value: v });
        }
        Ok(page)
    }

    /// Deletes the hit log of every invocation whose newest record was
    /// answered before `before_nanos`; returns how many records. An
    /// invocation's records go together, so a kept chain never loses its
    /// start (records written before chaining go one by one, as before).
    pub fn purge_audit(&self, before_nanos: u64) -> Result<Purged> {
        let cf = self.cf(CF_AUDIT);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        let mut purged = Vec::new();
        // The chained run being scanned: (prefix, first key, last key, newest time, records).
        type Run = (Vec<u8>, Vec<u8>, Vec<u8>, u64, usize);
        let mut run: Option<Run> = None;
        let mut close = |run: Option<Run>, batch: &mut WriteBatch, n: &mut usize| {
            if let Some((prefix, first, mut last, newest, count)) = run {
                if newest < before_nanos {
                    last.push(0);
                    batch.delete_range_cf(cf, first, last);
                    *n += count;
                    purged.push(String::from_utf8_lossy(&prefix[2..]).into_owned());
                }
            }
        };
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            let Some(len) = k.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) else { continue };
            let Some(prefix) = k.get(..2 + len) else { continue };
            let at_of = |from_end: usize| {
                u64::from_be_bytes(k[k.len() - from_end..k.len() - from_end + 8].try_into().expect("8 bytes"))
            };
            match k.len() - prefix.len() {
                AUDIT_CHAINED_SUFFIX => {
                    let at = at_of(8);
                    match &mut run {
                        Some((p, _, last, newest, count)) if p.as_slice() == prefix => {
                            *last = k.to_vec();
                            *newest = (*newest).max(at);
                            *count += 1;
                        }
                        _ => {
                            close(run.take(), &mut batch, &mut n);
                            run = Some((prefix.to_vec(), k.to_vec(), k.to_vec(), at, 1));
                        }
                    }
                }
                AUDIT_LEGACY_SUFFIX if at_of(12) < before_nanos => {
                    batch.delete_cf(cf, &k);
                    n += 1;
                }
                _ => {}
            }
        }
        close(run.take(), &mut batch, &mut n);
        if n > 0 {
            self.db.write(batch)?;
        }
        Ok(Purged { rows: n, invocations: purged })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::store;

    #[test]
    fn hit_log_pages_are_bounded_by_count_and_bytes_and_keep_chain_order() {
        let (_d, s) = store();
        for seq in 1..=5u64 {
            s.audit_append("inv", seq, 1_000 + seq, &[seq as u8; 100]).unwrap();
        }
        s.audit_append("inv-other", 1, 1_000, b"other").unwrap();
        s.audit_put_legacy("inv", 500, b"legacy").unwrap();
        let page = s.audit_list("inv", None, 2, usize::MAX).unwrap();
        assert_eq!(page.rows.iter().map(|r| r.sequence).collect::<Vec<_>>(), [Some(1), Some(2)]);
        let page = s.audit_list("inv", page.next.as_deref(), 10, 250).unwrap();
        assert_eq!(page.rows.iter().map(|r| r.sequence).collect::<Vec<_>>(), [Some(3), Some(4)], "250 bytes");
        let page = s.audit_list("inv", page.next.as_deref(), 10, 1).unwrap();
        assert_eq!(page.rows.len(), 1, "one row always fits");
        let page = s.audit_list("inv", page.next.as_deref(), 10, usize::MAX).unwrap();
        assert_eq!(page.rows.len(), 1);
        assert_eq!((page.rows[0].sequence, &page.rows[0].value[..]), (None, &b"legacy"[..]));
        assert_eq!(page.next, None);
        let tail = s.audit_list("inv", Some(&super::audit_cursor_after("inv", 3)), 10, usize::MAX).unwrap();
        let sequences: Vec<_> = tail.rows.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [Some(4), Some(5), None], "a cursor after 3 skips the rows up to 3");
    }

    #[test]
    fn an_invocations_hit_log_is_purged_whole_once_its_newest_record_is_old() {
        let (_d, s) = store();
        // "old": every record before the cut-off; "live": its first records
        // are old but its newest is not, so none goes.
        for seq in 1..=3u64 {
            s.audit_append("old", seq, 100 + seq, b"r").unwrap();
            s.audit_append("live", seq, if seq == 3 { 10_000 } else { 100 + seq }, b"r").unwrap();
        }
        s.audit_put_legacy("old", 50, b"legacy").unwrap();
        s.audit_put_legacy("live", 20_000, b"legacy").unwrap();
        let purged = s.purge_audit(1_000).unwrap();
        assert_eq!((purged.rows, purged.invocations), (4, vec!["old".to_string()]));
        assert!(s.audit_list("old", None, 10, usize::MAX).unwrap().rows.is_empty());
        assert_eq!(s.audit_list("live", None, 10, usize::MAX).unwrap().rows.len(), 4);
    }
}
