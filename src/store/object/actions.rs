//! [`ActionStore`] over the bucket: the current entry of an action is one
//! object (last writer wins, as REAPI allows) and every stored version one
//! more object under the action's history folder, named by its time.

use std::time::SystemTime;

use async_trait::async_trait;
use object_store::path::Path;
use object_store::{GetOptions, PutMode, UpdateVersion};

use super::bucket::{in_order, older_than, page_of, Bucket, Created, Found, Recent};
use super::keys;
use crate::cache::action_result::MAX_RESULT_BYTES;
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::provenance::verify::MAX_ENVELOPE_BYTES;
use crate::store::action_store::{ActionStore, HistoryPage, Version};

/// Largest object read as an entry or a history version: a stored entry is
/// an ActionResult (at most [`MAX_RESULT_BYTES`]) and its signature
/// envelope; a larger object is damaged and read as a miss.
const MAX_ENTRY_BYTES: u64 = 16 << 20;
const _: () = assert!(MAX_ENTRY_BYTES as usize > 2 * MAX_RESULT_BYTES + MAX_ENVELOPE_BYTES);

/// Times tried for a history version whose time another writer took.
const HISTORY_ATTEMPTS: u64 = 64;
/// Current entries whose version this process remembers for `touch`.
const SEEN_ENTRIES: usize = 65_536;

/// The version of a current entry this process last read.
#[derive(Clone, Debug)]
struct Seen {
    e_tag: Option<String>,
    version: Option<String>,
    modified: SystemTime,
}

/// The Action Cache and its history in the bucket.
#[derive(Debug)]
pub struct ObjectActions {
    bucket: Bucket,
    seen: Recent<Seen>,
}

impl ObjectActions {
    /// The Action Cache of `bucket`.
    pub fn new(bucket: Bucket) -> Self {
        ObjectActions { bucket, seen: Recent::new(SEEN_ENTRIES) }
    }
}

/// Re-PUTs the current entry under `key` if it is still the version `seen`
/// (compare-and-swap both ways), giving it a new last-modified time without
/// ever replacing a newer entry.
async fn redate(bucket: &Bucket, key: &Path, seen: Seen) -> Result<()> {
    let if_match = GetOptions { if_match: seen.e_tag.clone(), ..Default::default() };
    let Some(Found::Body(bytes, _)) = bucket.get_if(key, if_match, MAX_ENTRY_BYTES).await? else { return Ok(()) };
    let expected = UpdateVersion { e_tag: seen.e_tag, version: seen.version };
    if bucket.put(key, bytes, PutMode::Update(expected)).await? == Created::Yes {
        bucket.stats.refreshed();
    }
    Ok(())
}

#[async_trait]
impl ActionStore for ObjectActions {
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>> {
        let key = keys::action(instance, action);
        let (bytes, meta) = match self.bucket.get(&key, MAX_ENTRY_BYTES).await? {
            Some(Found::Body(bytes, meta)) => (bytes, meta),
            Some(Found::TooLarge(meta)) => {
                tracing::error!(%key, size = meta.size, "an Action Cache object is too large to be an entry; a miss");
                return Ok(None);
            }
            None => return Ok(None),
        };
        let seen = Seen { e_tag: meta.e_tag, version: meta.version, modified: meta.last_modified.into() };
        self.seen.insert(key, seen);
        Ok(Some(bytes.to_vec()))
    }

    /// Writes the history version (create-only at `stored_at_nanos`, one ns
    /// later while another entry took that time; a retry finding its own
    /// version there goes on), then the current entry. Across
    /// replicas "the newest history version is the current entry" holds only
    /// up to their clock skew: two replicas writing one action within it may
    /// leave the older write current. Neither object is half-written, but a
    /// failure between the two PUTs leaves a version that is not current.
    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64> {
        let entry = bytes::Bytes::from(entry);
        let mut at = stored_at_nanos;
        for _ in 0..HISTORY_ATTEMPTS {
            let key = keys::history(instance, action, at);
            if self.bucket.create_or_same(&key, entry.clone()).await? == Created::Yes {
                let current = keys::action(instance, action);
                self.bucket.put(&current, entry, PutMode::Overwrite).await?;
                self.seen.remove(&current);
                return Ok(at);
            }
            at = at.saturating_add(1);
        }
        Err(Error::Aborted(format!("no free history time for action {action} after {HISTORY_ATTEMPTS} tries")))
    }

    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>> {
        Ok(self.history_page(instance, action, 0, usize::MAX, usize::MAX, true).await?.versions)
    }

    async fn history_page(
        &self,
        instance: &InstanceName,
        action: &Digest,
        from_nanos: u64,
        max_count: usize,
        max_bytes: usize,
        must_progress: bool,
    ) -> Result<HistoryPage> {
        let offset = from_nanos.checked_sub(1).map(|before| keys::history(instance, action, before));
        let dir = keys::history_dir(instance, action);
        let listed = self.bucket.list(&dir, offset.as_ref(), max_count.saturating_add(1)).await?;
        let sized = listed.iter().filter_map(|m| Some((keys::number_of(&m.location)?, m.size as usize)));
        let (taken, next) = page_of(sized, max_count, max_bytes, must_progress);
        let keys = taken.iter().map(|at| keys::history(instance, action, *at)).collect();
        let bodies = self.bucket.get_all(keys, MAX_ENTRY_BYTES).await?;
        // A version gone meanwhile or too large to be one is left out.
        let versions =
            taken.into_iter().zip(bodies).filter_map(|(at, body)| Some((at, body?.body()?.to_vec()))).collect();
        Ok(HistoryPage { versions, next })
    }

    /// Deletes versions older than `before_nanos`, except each action's
    /// newest (its current entry, up to clock skew). Lists the whole history
    /// folder: a retention job's cost, not a request's.
    async fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        let listed = self.bucket.list(&keys::history_root(), None, usize::MAX).await?;
        let mut doomed = Vec::new();
        for (i, meta) in listed.iter().enumerate() {
            let newest_of_action = listed.get(i + 1).is_none_or(|next| !same_folder(&next.location, &meta.location));
            if !newest_of_action && keys::number_of(&meta.location).is_some_and(|at| at < before_nanos) {
                doomed.push(meta.location.clone());
            }
        }
        let count = doomed.len();
        in_order(doomed, |key| async move { self.bucket.delete(&key).await }).await?;
        Ok(count)
    }

    /// Adds no request to the hit: only when this process's last read of the
    /// entry showed it older than the refresh age does a background task
    /// re-PUT the same bytes, conditional on the e-tag of that read, so a
    /// newer entry written meanwhile is never replaced. At most once per
    /// refresh age per entry, and only while a re-dating permit is free.
    fn touch(&self, instance: &InstanceName, action: &Digest) {
        let key = keys::action(instance, action);
        let Some(seen) = self.seen.get(&key) else { return };
        let now = self.bucket.now();
        if !older_than(seen.modified, self.bucket.options.refresh_age, now) {
            return;
        }
        let (bucket, current) = (self.bucket.clone(), seen.clone());
        let task = {
            let key = key.clone();
            async move { redate(&bucket, &key, current).await }
        };
        if self.bucket.spawn_redate(key.clone(), task) {
            self.seen.insert(key, Seen { modified: now, ..seen });
        }
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    let parent = |p: &Path| p.as_ref().rsplit_once('/').map(|(dir, _)| dir.to_string());
    parent(a) == parent(b)
}
