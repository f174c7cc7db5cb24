//! Accounting and eviction against a real store in a temporary directory.

use super::*;
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::store::rocks::StoreOptions;
use std::time::Duration;

fn open(dir: &std::path::Path, max_size: Option<u64>) -> RocksStore {
    let opts = StoreOptions { sync: false, max_size, touch_interval: Duration::ZERO, ..Default::default() };
    RocksStore::open(dir, &opts).unwrap()
}

fn blob(i: u32, len: usize) -> (Key, Vec<u8>) {
    let data: Vec<u8> = std::iter::repeat_n(i.to_le_bytes(), len / 4 + 1).flatten().take(len).collect();
    let key = Key::new(&InstanceName::parse("").unwrap(), &Digest::of(DigestFunction::Sha256, &data));
    (key, data)
}

fn present(s: &RocksStore, keys: &[Key]) -> Vec<bool> {
    s.contains(keys).unwrap()
}

#[test]
fn accounting_follows_writes_replacements_deletes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), None);
    let (k1, d1) = blob(1, 3000);
    let (k2, d2) = blob(2, 5000);
    assert!(s.put_blob(&k1, &d1).unwrap());
    assert!(!s.put_blob(&k1, &d1).unwrap(), "a second put counts nothing");
    let id = s.begin_upload().unwrap();
    s.write_chunk(id, 0, &d2, true).unwrap();
    s.commit_upload(&k2, id, 5000, false).unwrap();
    s.ac_put(&k1, &[7; 100], 1).unwrap();
    s.ac_put(&k1, &[7; 40], 2).unwrap();
    let want = Usage { blob_bytes: 8000, blobs: 2, action_bytes: 40, actions: 1 };
    assert_eq!(s.usage(), want);
    drop(s);
    let s = open(dir.path(), None);
    assert_eq!(s.usage(), want, "restored at open");
    s.delete_blob(&k2).unwrap();
    assert_eq!(s.usage(), Usage { blob_bytes: 3000, blobs: 1, ..want });
}

#[test]
fn evicts_least_recently_used_first_and_a_touch_saves_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Some(10_240));
    let blobs: Vec<(Key, Vec<u8>)> = (0..13).map(|i| blob(i, 1000)).collect();
    let keys: Vec<Key> = blobs.iter().map(|(k, _)| k.clone()).collect();
    for (k, d) in &blobs[..10] {
        s.put_blob(k, d).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    s.ac_put(&keys[0], &[1; 200], 1).unwrap();
    assert!(!s.over_limit());
    s.touch(Kind::Blob, &keys[0]);
    assert_eq!(s.apply_touches().unwrap(), 1);
    for (k, d) in &blobs[10..] {
        std::thread::sleep(Duration::from_millis(2));
        s.put_blob(k, d).unwrap();
    }
    assert!(s.over_limit());
    let e = s.evict().unwrap();
    assert!(s.usage().total_bytes() <= (10_240.0 * LOW_WATERMARK) as u64, "{:?}", s.usage());
    assert_eq!(e, Evictions { blobs: 4, actions: 0, bytes: 4000 });
    assert_eq!(s.evictions(), e);
    let p = present(&s, &keys);
    assert_eq!(p, [true, false, false, false, false, true, true, true, true, true, true, true, true], "{p:?}");
    assert!(s.ac_get(&keys[0]).unwrap().is_some(), "the newer Action Cache entry stays");
    // Evicted chunks are gone too.
    let meta_gone = s.blob_meta(&keys[1]).unwrap();
    assert!(meta_gone.is_none());
    drop(s);
    let s = open(dir.path(), Some(10_240));
    assert_eq!(s.usage(), Usage { blob_bytes: 9000, blobs: 9, action_bytes: 200, actions: 1 });
}

#[test]
fn evicts_action_cache_entries_too() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Some(1000));
    let keys: Vec<Key> = (0..10).map(|i| blob(i, 1).0).collect();
    for k in &keys {
        s.ac_put(k, &[0; 150], 1).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    s.evict().unwrap();
    let kept: Vec<bool> = keys.iter().map(|k| s.ac_get(k).unwrap().is_some()).collect();
    assert_eq!(kept, [false, false, false, false, true, true, true, true, true, true]);
    assert_eq!(s.usage().actions, 6);
}

#[test]
fn oversized_blobs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Some(100));
    let (k, d) = blob(1, 101);
    assert!(matches!(s.put_blob(&k, &d), Err(Error::ResourceExhausted(_))));
    assert_eq!(s.usage(), Usage::default());
}

#[test]
fn an_existing_data_directory_is_indexed_at_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), None);
    let (k1, d1) = blob(1, 3000);
    s.put_blob(&k1, &d1).unwrap();
    s.ac_put(&k1, &[1; 10], 1).unwrap();
    // Forget the index, as a data directory written before it existed.
    for cf in [CF_LRU, CF_ATIME, CF_USAGE] {
        let keys: Vec<Box<[u8]>> =
            s.db.iterator_cf(s.cf(cf), rocksdb::IteratorMode::Start).map(|r| r.unwrap().0).collect();
        for k in keys {
            s.db.delete_cf(s.cf(cf), k).unwrap();
        }
    }
    drop(s);
    let s = open(dir.path(), Some(3005));
    assert_eq!(s.usage(), Usage { blob_bytes: 3000, blobs: 1, action_bytes: 10, actions: 1 });
    assert!(s.over_limit());
    s.evict().unwrap();
    assert_eq!(s.usage().blobs + s.usage().actions, 1, "the indexed records are evictable");
}
