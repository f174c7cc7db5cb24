//! A [`BlobStore`] in a map, for the domain's unit tests: no disk, no
//! runtime threads, and a hook to damage a stored blob.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{corrupt_blob, BlobStore, BlobStream, BlobWriter};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};

type Blobs = HashMap<(InstanceName, Digest), Bytes>;

/// Blobs held in memory, optionally bounded like a real store's capacity.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    blobs: Arc<Mutex<Blobs>>,
    max_size: Option<u64>,
}

fn lock(blobs: &Mutex<Blobs>) -> MutexGuard<'_, Blobs> {
    blobs.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// An empty store that refuses blobs larger than `max_size` (if given).
    pub fn new(max_size: Option<u64>) -> Self {
        MemoryStore { blobs: Arc::default(), max_size }
    }

    /// Stores `data` under `digest` without any check: tests use it to
    /// plant a blob whose bytes do not match its digest.
    pub fn insert_unchecked(&self, instance: &InstanceName, digest: Digest, data: Bytes) {
        lock(&self.blobs).insert((instance.clone(), digest), data);
    }

    /// Whether a blob is stored (tests check what a failed write left).
    pub fn holds(&self, instance: &InstanceName, digest: Digest) -> bool {
        lock(&self.blobs).contains_key(&(instance.clone(), digest))
    }
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn contains(&self, instance: &InstanceName, digests: &[Digest]) -> Result<Vec<bool>> {
        Ok(digests.iter().map(|d| self.holds(instance, *d)).collect())
    }

    async fn get(&self, instance: &InstanceName, digest: Digest) -> Result<Option<Bytes>> {
        Ok(lock(&self.blobs).get(&(instance.clone(), digest)).cloned())
    }

    async fn read(&self, instance: &InstanceName, digest: Digest, offset: u64, end: u64) -> Result<Option<BlobStream>> {
        let Some(data) = self.get(instance, digest).await? else { return Ok(None) };
        if digest.verify(&data).is_err() {
            return Err(corrupt_blob(digest, self.delete(instance, digest).await));
        }
        let piece = data.slice(offset as usize..end as usize);
        let pieces = if piece.is_empty() { vec![] } else { vec![Ok(piece)] };
        Ok(Some(Box::pin(futures::stream::iter(pieces))))
    }

    async fn put(&self, instance: &InstanceName, digest: Digest, data: Bytes) -> Result<()> {
        self.check_fits(data.len() as u64)?;
        lock(&self.blobs).entry((instance.clone(), digest)).or_insert(data);
        Ok(())
    }

    async fn begin_write(&self, instance: &InstanceName, digest: Digest) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(MemoryWriter { store: self.clone(), instance: instance.clone(), digest, data: BytesMut::new() }))
    }

    async fn delete(&self, instance: &InstanceName, digest: Digest) -> Result<()> {
        lock(&self.blobs).remove(&(instance.clone(), digest));
        Ok(())
    }

    fn check_fits(&self, size: u64) -> Result<()> {
        match self.max_size {
            Some(max) if size > max => {
                Err(Error::ResourceExhausted(format!("a {size}-byte blob is larger than the {max}-byte store")))
            }
            _ => Ok(()),
        }
    }
}

/// A write gathered in memory until commit.
struct MemoryWriter {
    store: MemoryStore,
    instance: InstanceName,
    digest: Digest,
    data: BytesMut,
}

#[async_trait]
impl BlobWriter for MemoryWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.data.extend_from_slice(&data);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.store.put(&self.instance, self.digest, self.data.freeze()).await
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}
