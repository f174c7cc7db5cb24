//! [`HitLogStore`] over the bucket: one object per chained hit record,
//! created only if its sequence is free, so two replicas appending to one
//! invocation cannot overwrite each other: the loser gets a Conflict and
//! relinks after the winner's record ([`crate::cache::audit`]).

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path;

use super::bucket::{in_order, page_of, Bucket, Created};
use super::keys;
use crate::error::{Error, Result};
use crate::provenance::verify::MAX_ENVELOPE_BYTES;
use crate::store::hit_log_store::{HitLogStore, HitPage, HitRow, Purged};
use crate::store::{StoreError, StoreErrorKind};

/// Largest object read as a hit record: a signed record is one envelope the
/// verifier accepts ([`MAX_ENVELOPE_BYTES`]) and a little framing. A larger
/// one is damaged: its row is listed empty, which the audit reports.
const MAX_RECORD_BYTES: u64 = 2 * MAX_ENVELOPE_BYTES as u64;

/// The hit log in the bucket.
#[derive(Debug)]
pub struct ObjectHitLog {
    bucket: Bucket,
}

impl ObjectHitLog {
    /// The hit log of `bucket`.
    pub fn new(bucket: Bucket) -> Self {
        ObjectHitLog { bucket }
    }

    /// Deletes one invocation's folder if its newest record is older than
    /// `before`; returns how many records went.
    async fn purge_folder(&self, folder: &Path, before: SystemTime) -> Result<usize> {
        let rows = self.bucket.list(folder, None, usize::MAX).await?;
        let newest = rows.iter().map(|m| SystemTime::from(m.last_modified)).max();
        if newest.is_none_or(|newest| newest >= before) {
            return Ok(0);
        }
        let count = rows.len();
        in_order(rows, |meta| async move { self.bucket.delete(&meta.location).await }).await?;
        Ok(count)
    }
}

/// The sequence of a hit record's key, when it is one.
fn sequence_of(key: &Path) -> Option<u64> {
    keys::number_of(key)
}

#[async_trait]
impl HitLogStore for ObjectHitLog {
    /// Create-only: a sequence another server stored first is a
    /// [`StoreErrorKind::Conflict`]; one holding this very record (a retried
    /// attempt of ours) is success, not a duplicate.
    async fn append(&self, invocation: &str, sequence: u64, _answered_at_nanos: u64, record: Vec<u8>) -> Result<()> {
        let key = keys::hit(invocation, sequence);
        match self.bucket.create_or_same(&key, Bytes::from(record)).await? {
            Created::Yes => Ok(()),
            Created::AlreadyThere => Err(Error::Storage(StoreError::new(
                StoreErrorKind::Conflict,
                format!("hit record {sequence} of invocation {invocation:?} was stored by another server first"),
            ))),
        }
    }

    async fn list(
        &self,
        invocation: &str,
        after: Option<&[u8]>,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<HitPage> {
        let offset = match after {
            Some(cursor) if self.is_cursor_of(invocation, cursor) => {
                let text = std::str::from_utf8(cursor).expect("checked by is_cursor_of");
                Some(Path::parse(text).map_err(|e| Error::InvalidArgument(format!("bad hit-log cursor: {e}")))?)
            }
            Some(_) => return Err(Error::InvalidArgument("the hit-log cursor is for another invocation".into())),
            None => None,
        };
        let dir = keys::hits_dir(invocation);
        let listed = self.bucket.list(&dir, offset.as_ref(), max_count.saturating_add(1)).await?;
        let sized =
            listed.into_iter().filter(|m| sequence_of(&m.location).is_some()).map(|m| (m.location, m.size as usize));
        let (taken, left_out) = page_of(sized, max_count, max_bytes, true);
        let next = left_out.and(taken.last().map(|key| key.as_ref().as_bytes().to_vec()));
        let bodies = self.bucket.get_all(taken.clone(), MAX_RECORD_BYTES).await?;
        let rows = taken
            .iter()
            .zip(bodies)
            .filter_map(|(key, body)| {
                let value = body?.body().map(|b| b.to_vec()).unwrap_or_default();
                Some(HitRow { sequence: sequence_of(key), value })
            })
            .collect();
        Ok(HitPage { rows, next })
    }

    fn cursor_after(&self, invocation: &str, sequence: u64) -> Vec<u8> {
        keys::hit(invocation, sequence).as_ref().as_bytes().to_vec()
    }

    fn is_cursor_of(&self, invocation: &str, cursor: &[u8]) -> bool {
        let dir = format!("{}/", keys::hits_dir(invocation));
        std::str::from_utf8(cursor)
            .ok()
            .and_then(|c| c.strip_prefix(&dir))
            .is_some_and(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// Deletes whole invocations whose newest record was stored (the
    /// object's last-modified) before `before_nanos`, one folder at a time.
    async fn purge(&self, before_nanos: u64) -> Result<Purged> {
        let before = SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(before_nanos);
        let mut purged = Purged::default();
        for folder in self.bucket.folders(&keys::hits_root()).await? {
            let rows = self.purge_folder(&folder, before).await?;
            if rows > 0 {
                purged.rows += rows;
                purged.invocations.extend(keys::invocation_of(&folder));
            }
        }
        Ok(purged)
    }
}
