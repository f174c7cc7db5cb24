//! The object store's raw speed, measured with the same client library and
//! the same part sizes a replica uses, so `bench` can say how close a replica
//! gets to the store beneath it (docs/performance.md, "Scale-out").
//!
//! A replica's write hashes every byte and streams it as a multipart upload;
//! the raw write here does exactly that and nothing else (no gRPC, no local
//! cache, no RocksDB), so the ratio of the two is what the replica costs.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};

use super::bench::{pseudo_random_bytes, rand_seed, single, Report};
use crate::cache::digest::DigestFunction;

/// Part size and parts in flight of the raw multipart upload: a replica's
/// defaults, so the comparison is like for like.
#[derive(Clone, Copy, Debug)]
pub struct RawParams {
    /// Bytes per multipart part.
    pub part_size: usize,
    /// Parts uploading at once.
    pub parts_in_flight: usize,
}

impl Default for RawParams {
    fn default() -> Self {
        RawParams { part_size: 8 << 20, parts_in_flight: 4 }
    }
}

/// Where the raw benchmark's objects go, outside the cache's own keys.
fn raw_key(seed: u64) -> Path {
    Path::from(format!("bench-raw/{seed:016x}"))
}

/// Streams `size` bytes into the store as one multipart upload, hashing each
/// byte as a replica does, and returns the report and the object's key (for
/// [`raw_read`]). The data is one repeated pseudo-random block, so memory
/// stays at the parts in flight.
pub async fn raw_write(store: &Arc<dyn ObjectStore>, size: usize, p: RawParams) -> anyhow::Result<(Report, Path)> {
    let seed = rand_seed();
    let block = pseudo_random_bytes(seed, p.part_size.min(size.max(1)));
    let key = raw_key(seed);
    let t = Instant::now();
    let upload = store.put_multipart(&key).await.context("starting the raw multipart upload")?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, p.part_size);
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut sent = 0;
    while sent < size {
        let len = block.len().min(size - sent);
        hasher.update(&block[..len]);
        writer.wait_for_capacity(p.parts_in_flight).await.context("raw multipart part")?;
        writer.put(block.slice(..len));
        sent += len;
    }
    let _ = hasher.finalize();
    writer.finish().await.context("completing the raw multipart upload")?;
    let secs = t.elapsed().as_secs_f64();
    Ok((single("raw-store-write", size, secs, 0.0), key))
}

/// Streams the object at `key` back, hashing every byte, and deletes it.
pub async fn raw_read(store: &Arc<dyn ObjectStore>, key: &Path, size: usize) -> anyhow::Result<Report> {
    let t = Instant::now();
    let mut stream = store.get(key).await.context("raw GET")?.into_stream();
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("raw GET body")?;
        hasher.update(&chunk);
        n += chunk.len();
    }
    let _ = hasher.finalize();
    let secs = t.elapsed().as_secs_f64();
    store.delete(key).await.context("deleting the raw benchmark object")?;
    if n != size {
        bail!("raw read returned {n} of {size} bytes");
    }
    Ok(single("raw-store-read", size, secs, 0.0))
}

/// One small object written and read back, to check the store answers
/// before a run (and to warm its connection pool).
pub async fn probe(store: &Arc<dyn ObjectStore>) -> anyhow::Result<()> {
    let key = raw_key(rand_seed());
    store.put(&key, PutPayload::from_static(b"probe")).await.context("probe PUT")?;
    store.delete(&key).await.context("probe DELETE")?;
    Ok(())
}

/// Runs `raw-store-{kind}`: `write` streams `size` bytes into the store (and
/// deletes them), `read` writes them and reports reading them back.
pub async fn run(store: &Arc<dyn ObjectStore>, kind: &str, size: usize) -> anyhow::Result<Report> {
    probe(store).await?;
    let (written, key) = raw_write(store, size, RawParams::default()).await?;
    match kind {
        "write" => {
            store.delete(&key).await.context("deleting the raw benchmark object")?;
            Ok(written)
        }
        "read" => raw_read(store, &key, size).await,
        other => bail!("unknown scenario raw-store-{other} (raw-store-write, raw-store-read)"),
    }
}
