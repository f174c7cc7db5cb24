//! Test doubles for a replica's remote: memory stores that can be switched
//! off (answering UNAVAILABLE, like an unreachable bucket), return tampered
//! bytes (like a bucket someone wrote into), or answer slowly (so
//! concurrent readers really overlap). As a replica's local cache, they can
//! refuse writes (like a full disk) or lose what they committed (like an
//! eviction). They count the reads that reach them. The domain's tests use
//! them too, as a store that fails mid-upload.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::store::action_store::{ActionStore, HistoryPage, Version};
use crate::store::memory::MemoryStore;
use crate::store::memory_actions::MemoryActions;
use crate::store::{BlobStore, BlobStream, BlobWriter, StoreError, StoreErrorKind};

/// How long a slow store takes to answer a read or a put.
pub(crate) const SLOW: Duration = Duration::from_millis(50);

/// The switches of a faulty remote.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    off: AtomicBool,
    tamper: AtomicBool,
    slow: AtomicBool,
    forget: AtomicBool,
    refusals: AtomicUsize,
    reads: AtomicUsize,
    waiting: AtomicUsize,
    most_waiting: AtomicUsize,
}

impl Faults {
    /// Makes the remote unreachable (`true`) or reachable again.
    pub fn switch_off(&self, off: bool) {
        self.off.store(off, Ordering::SeqCst);
    }

    /// Makes reads return the stored bytes with one byte flipped.
    pub fn tamper(&self, on: bool) {
        self.tamper.store(on, Ordering::SeqCst);
    }

    /// Makes reads and puts wait [`SLOW`] before answering.
    pub fn slow(&self, on: bool) {
        self.slow.store(on, Ordering::SeqCst);
    }

    /// Makes the next `count` writes fail to start, as on a full disk.
    pub fn refuse_writes(&self, count: usize) {
        self.refusals.store(count, Ordering::SeqCst);
    }

    /// Makes committed writes report success but store nothing, as if the
    /// blob were evicted at once.
    pub fn forget_writes(&self, on: bool) {
        self.forget.store(on, Ordering::SeqCst);
    }

    /// How many reads (whole or ranged) reached the remote.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<()> {
        if self.off.load(Ordering::SeqCst) {
            return Err(Error::Storage(StoreError::new(StoreErrorKind::Unavailable, "remote switched off")));
        }
        Ok(())
    }

    /// The most slow calls that were waiting at once.
    pub fn most_at_once(&self) -> usize {
        self.most_waiting.load(Ordering::SeqCst)
    }

    async fn wait_if_slow(&self) {
        if self.slow.load(Ordering::SeqCst) {
            let now = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_waiting.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(SLOW).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn check_write(&self) -> Result<()> {
        self.check()?;
        let refused = self.refusals.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if refused {
            return Err(Error::Storage(StoreError::new(StoreErrorKind::NoSpace, "local disk full")));
        }
        Ok(())
    }

    fn damage(&self, data: Bytes) -> Bytes {
        if !self.tamper.load(Ordering::SeqCst) || data.is_empty() {
            return data;
        }
        let mut bytes = data.to_vec();
        bytes[0] ^= 0xff;
        bytes.into()
    }
}

/// A remote blob store over a [`MemoryStore`] (`inner`, which tests read
/// and plant blobs in directly).
#[derive(Debug, Default)]
pub(crate) struct FaultyBlobs {
    pub inner: MemoryStore,
    pub faults: Arc<Faults>,
}

#[async_trait]
impl BlobStore for FaultyBlobs {
    async fn contains(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<bool>> {
        self.faults.check()?;
        self.inner.contains(instance, digests).await
    }

    async fn get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>> {
        self.faults.check()?;
        self.faults.reads.fetch_add(1, Ordering::SeqCst);
        self.faults.wait_if_slow().await;
        Ok(self.inner.get(instance, digest).await?.map(|data| self.faults.damage(data)))
    }

    /// The stored bytes, unchecked (a remote that does not notice tampering),
    /// in two pieces so readers see a real stream.
    async fn read(&self, instance: &InstanceName, digest: Digest, offset: u64, end: u64) -> Result<Option<BlobStream>> {
        self.faults.check()?;
        self.faults.reads.fetch_add(1, Ordering::SeqCst);
        self.faults.wait_if_slow().await;
        let Some(data) = self.inner.get(instance, digest).await? else { return Ok(None) };
        let range = self.faults.damage(data).slice(offset as usize..end as usize);
        let middle = range.len() / 2;
        let pieces = [range.slice(..middle), range.slice(middle..)].into_iter().filter(|p| !p.is_empty()).map(Ok);
        Ok(Some(Box::pin(futures::stream::iter(pieces.collect::<Vec<_>>()))))
    }

    async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        self.faults.check_write()?;
        self.faults.wait_if_slow().await;
        if self.faults.forget.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.put(instance, digest, data).await
    }

    async fn begin_write(&self, instance: &InstanceName, digest: Digest) -> Result<Box<dyn BlobWriter>> {
        self.faults.check_write()?;
        let inner = self.inner.begin_write(instance, digest).await?;
        Ok(Box::new(FaultyWriter { inner, faults: self.faults.clone() }))
    }

    async fn delete(&self, instance: &InstanceName, digest: Digest) -> Result<()> {
        self.faults.check()?;
        self.inner.delete(instance, digest).await
    }

    fn check_fits(&self, size: u64) -> Result<()> {
        self.inner.check_fits(size)
    }
}

/// A writer that fails while the store is off and stores nothing while it
/// forgets.
struct FaultyWriter {
    inner: Box<dyn BlobWriter>,
    faults: Arc<Faults>,
}

#[async_trait]
impl BlobWriter for FaultyWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.faults.check()?;
        self.inner.write(data).await
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.faults.check()?;
        if self.faults.forget.load(Ordering::SeqCst) {
            return self.inner.abort().await;
        }
        self.inner.commit().await
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.inner.abort().await
    }
}

/// A remote Action Cache store over [`MemoryActions`] (`inner`, which tests
/// write to directly, as another replica would).
#[derive(Debug, Default)]
pub(super) struct FaultyActions {
    pub inner: MemoryActions,
    pub faults: Faults,
}

#[async_trait]
impl ActionStore for FaultyActions {
    async fn get(&self, instance: &InstanceName, action: &Digest) -> Result<Option<Vec<u8>>> {
        self.faults.check()?;
        self.faults.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get(instance, action).await
    }

    async fn put(&self, instance: &InstanceName, action: &Digest, entry: Vec<u8>, stored_at_nanos: u64) -> Result<u64> {
        self.faults.check()?;
        self.inner.put(instance, action, entry, stored_at_nanos).await
    }

    async fn history(&self, instance: &InstanceName, action: &Digest) -> Result<Vec<Version>> {
        self.inner.history(instance, action).await
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
        self.inner.history_page(instance, action, from_nanos, max_count, max_bytes, must_progress).await
    }

    async fn purge_history(&self, before_nanos: u64) -> Result<usize> {
        self.inner.purge_history(before_nanos).await
    }

    fn touch(&self, instance: &InstanceName, action: &Digest) {
        self.inner.touch(instance, action)
    }
}
