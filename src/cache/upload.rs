//! Resumable ByteStream uploads: each upload name owns a session that hashes
//! the (decompressed) bytes as they arrive and stores them chunk by chunk under
//! a private blob id. The blob becomes visible only when the whole stream is
//! in and its digest matches. A dropped stream keeps its session, so the
//! client can ask QueryWriteStatus and resume.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::cache::cas::blocking;
use crate::cache::digest::{Digest, Hasher};
use crate::cache::resource::{Compressor, WriteResource};
use crate::error::{Error, Result};
use crate::limits::{Enforcer, Limits};
use crate::store::{Key, Store, CHUNK_SIZE};

/// The most uploads in progress at once, whoever holds them (each holds up
/// to one chunk in memory, and a zstd window for compressed uploads). Per
/// identity and per instance they are bounded further by
/// `limits.max_uploads_per_identity` and `limits.max_uploads_per_instance`.
pub const MAX_SESSIONS: usize = 4096;
/// Blobs larger than this are written to disk once, bypassing the WAL, and
/// flushed before commit; smaller ones go through the WAL, which is cheaper
/// than a flush per upload.
pub const NO_WAL_THRESHOLD: u64 = 64 * 1024 * 1024;

fn use_wal(digest: &Digest) -> bool {
    digest.size <= NO_WAL_THRESHOLD
}

/// Receives the decompressed bytes of an upload.
#[derive(Debug)]
struct Sink {
    hasher: Hasher,
    expected: u64,
    received: u64,
    buf: BytesMut,
    overflow: bool,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.received + data.len() as u64 > self.expected {
            self.overflow = true;
            return Err(std::io::Error::other("more data than the digest's size"));
        }
        self.hasher.update(data);
        self.received += data.len() as u64;
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher")
    }
}

enum Feed {
    Plain(Sink),
    Zstd(Box<zstd::stream::write::Decoder<'static, Sink>>),
}

impl Feed {
    fn sink(&mut self) -> &mut Sink {
        match self {
            Feed::Plain(s) => s,
            Feed::Zstd(d) => d.get_mut(),
        }
    }
}

/// One upload in progress.
pub struct Session {
    resource: WriteResource,
    /// Whose upload this is: only they can resume it.
    principal: Arc<str>,
    key: Key,
    feed: Feed,
    /// Bytes of the wire stream accepted so far (compressed bytes for compressed uploads).
    committed: i64,
    /// `committed`, readable without the session lock (for QueryWriteStatus).
    progress: Arc<AtomicI64>,
    blob_id: Option<u64>,
    next_chunk: u32,
    /// When it was last written (ms since [`Uploads`]' epoch), readable
    /// without the session lock, so expiry never waits for a stream.
    last_used: Arc<AtomicU64>,
    /// Expired while idle: its chunks are gone and it must not be written.
    expired: bool,
}

/// What a finished `write` call reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The blob is stored; `committed_size` to report.
    Complete(i64),
}

/// One upload in the table, with what expiry and the caps need without
/// locking it.
struct Entry {
    session: Arc<tokio::sync::Mutex<Session>>,
    progress: Arc<AtomicI64>,
    last_used: Arc<AtomicU64>,
    principal: Arc<str>,
    instance: String,
}

/// Every upload in progress, counted by identity and by instance.
#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    per_identity: HashMap<Arc<str>, usize>,
    per_instance: HashMap<String, usize>,
}

impl Table {
    fn remove(&mut self, name: &str) -> Option<Entry> {
        let entry = self.entries.remove(name)?;
        let decrement = |n: &mut usize| {
            *n -= 1;
            *n > 0
        };
        if !self.per_identity.get_mut(&entry.principal).is_some_and(decrement) {
            self.per_identity.remove(&entry.principal);
        }
        if !self.per_instance.get_mut(&entry.instance).is_some_and(decrement) {
            self.per_instance.remove(&entry.instance);
        }
        Some(entry)
    }
}

/// Every upload in progress, within the limits on how many one identity and
/// one instance may hold, each dropped after `limits.upload_idle_timeout`
/// without a write.
pub struct Uploads {
    table: Mutex<Table>,
    epoch: Instant,
    idle: Duration,
    window_log_max: u32,
    per_identity: usize,
    per_instance: usize,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads::new(&Limits::default())
    }
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads").field("sessions", &self.len()).finish()
    }
}

/// An upload's name: the same resource name written by another identity is
/// another upload, so nobody can resume, read the progress of, or disturb
/// someone else's.
fn session_name(r: &WriteResource, principal: &str) -> String {
    format!("{principal}\0{}\0{}\0{}\0{:?}", r.instance.as_str(), r.upload_id, r.digest, r.compressor)
}

impl Uploads {
    /// No uploads yet; `limits` bound them.
    pub fn new(limits: &Limits) -> Self {
        Uploads {
            table: Mutex::default(),
            epoch: Instant::now(),
            idle: limits.upload_idle_timeout,
            window_log_max: limits.zstd_window_log_max,
            per_identity: limits.max_uploads_per_identity,
            per_instance: limits.max_uploads_per_instance,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Number of uploads in progress.
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    /// Whether no upload is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Uploads in progress held by `principal`.
    pub fn held_by(&self, principal: &str) -> usize {
        self.table().per_identity.get(principal).copied().unwrap_or(0)
    }

    /// The caller's session for an upload name, created on first use when
    /// the caller, the instance and the server are below their caps (idle
    /// uploads past their expiry are dropped first). Refusals are
    /// RESOURCE_EXHAUSTED naming the limit: the client can retry later.
    pub fn session(
        &self,
        store: &Arc<Store>,
        resource: &WriteResource,
        limits: &Enforcer,
    ) -> Result<Arc<tokio::sync::Mutex<Session>>> {
        let principal = limits.principal();
        let name = session_name(resource, principal);
        let instance = resource.instance.as_str();
        let mut expired = Vec::new();
        let refusal = {
            let mut table = self.table();
            if let Some(e) = table.entries.get(&name) {
                return Ok(e.session.clone());
            }
            let full = |t: &Table| {
                if t.per_identity.get(principal).copied().unwrap_or(0) >= self.per_identity {
                    Some(("max_uploads_per_identity", format!("{principal} holds"), self.per_identity))
                } else if t.per_instance.get(instance).copied().unwrap_or(0) >= self.per_instance {
                    Some(("max_uploads_per_instance", format!("instance {:?} has", instance), self.per_instance))
                } else if t.entries.len() >= MAX_SESSIONS {
                    Some(("max_uploads", "the server has".to_string(), MAX_SESSIONS))
                } else {
                    None
                }
            };
            if full(&table).is_some() {
                expired = self.expire_locked(&mut table);
            }
            match full(&table) {
                Some(refusal) => Some(refusal),
                None => {
                    let session = self.create(resource, principal)?;
                    let entry = {
                        let s = session.try_lock().expect("a new session is unlocked");
                        Entry {
                            session: session.clone(),
                            progress: s.progress.clone(),
                            last_used: s.last_used.clone(),
                            principal: s.principal.clone(),
                            instance: instance.to_string(),
                        }
                    };
                    *table.per_identity.entry(entry.principal.clone()).or_default() += 1;
                    *table.per_instance.entry(entry.instance.clone()).or_default() += 1;
                    table.entries.insert(name, entry);
                    self.abort_in_background(store, expired);
                    return Ok(session);
                }
            }
        };
        self.abort_in_background(store, expired);
        let (limit, who, max) = refusal.expect("refused");
        let idle = humantime::format_duration(self.idle);
        Err(limits.refuse(
            limit,
            Error::ResourceExhausted(format!(
                "{who} {max} unfinished uploads, the limit (limits.{limit}); finish or abandon some \
                 (an upload nobody writes expires after {idle}) and retry"
            )),
        ))
    }

    fn create(&self, resource: &WriteResource, principal: &str) -> Result<Arc<tokio::sync::Mutex<Session>>> {
        let sink = Sink {
            hasher: resource.digest.function.hasher(),
            expected: resource.digest.size,
            received: 0,
            buf: BytesMut::new(),
            overflow: false,
        };
        let feed = match resource.compressor {
            None => Feed::Plain(sink),
            Some(Compressor::Zstd) => {
                let mut decoder =
                    zstd::stream::write::Decoder::new(sink).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
                // A frame that needs a larger window fails its first write.
                decoder.window_log_max(self.window_log_max).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
                Feed::Zstd(Box::new(decoder))
            }
        };
        Ok(Arc::new(tokio::sync::Mutex::new(Session {
            key: Key::new(&resource.instance, &resource.digest),
            resource: resource.clone(),
            principal: principal.into(),
            feed,
            committed: 0,
            progress: Arc::new(AtomicI64::new(0)),
            blob_id: None,
            next_chunk: 0,
            last_used: Arc::new(AtomicU64::new(self.now_ms())),
            expired: false,
        })))
    }

    /// The caller's session of an upload name, if one is in progress.
    pub fn existing(&self, resource: &WriteResource, principal: &str) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.table().entries.get(&session_name(resource, principal)).map(|e| e.session.clone())
    }

    /// The committed size of the caller's upload in progress, without
    /// waiting for a stream that is writing it.
    pub fn progress(&self, resource: &WriteResource, principal: &str) -> Option<i64> {
        self.table().entries.get(&session_name(resource, principal)).map(|e| e.progress.load(Ordering::Acquire))
    }

    fn remove(&self, resource: &WriteResource, principal: &str) {
        self.table().remove(&session_name(resource, principal));
    }

    /// Removes the uploads nobody has written for the idle timeout (and
    /// that no stream holds), marks them expired, and returns the blob ids
    /// whose chunks must be deleted.
    fn expire_locked(&self, table: &mut Table) -> Vec<u64> {
        let now = self.now_ms();
        let idle_ms = self.idle.as_millis() as u64;
        let stale: Vec<String> = table
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.last_used.load(Ordering::Acquire)) >= idle_ms)
            .map(|(name, _)| name.clone())
            .collect();
        let mut blobs = Vec::new();
        for name in stale {
            let Some(entry) = table.entries.get(&name) else { continue };
            // A stream holding the session is not idle.
            let Ok(mut s) = entry.session.try_lock() else { continue };
            s.expired = true;
            blobs.extend(s.blob_id.take());
            drop(s);
            table.remove(&name);
        }
        blobs
    }

    fn abort_in_background(&self, store: &Arc<Store>, blob_ids: Vec<u64>) {
        if blob_ids.is_empty() {
            return;
        }
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            for id in blob_ids {
                if let Err(e) = store.abort_upload(id) {
                    tracing::warn!(error = %e, "could not delete an expired upload's chunks");
                }
            }
        });
    }

    /// Drops uploads idle for longer than the idle timeout and deletes their
    /// chunks (run periodically; the caps also expire idle uploads on demand).
    pub async fn expire(&self, store: &Arc<Store>) {
        let blobs = self.expire_locked(&mut self.table());
        self.abort_in_background(store, blobs);
    }

    /// Feeds one WriteRequest's data into a locked session; on `finish`,
    /// verifies and commits. Data errors (too much data, wrong digest, bad
    /// compression) end the session; the client must start over.
    pub async fn feed(
        &self,
        store: &Arc<Store>,
        session: &mut Session,
        write_offset: i64,
        data: Bytes,
        finish: bool,
        limits: &Enforcer,
    ) -> Result<Option<WriteOutcome>> {
        if session.expired {
            return Err(Error::Aborted(format!(
                "upload {} expired while idle; start it again from offset 0",
                session.resource.upload_id
            )));
        }
        session.last_used.store(self.now_ms(), Ordering::Release);
        if write_offset != session.committed {
            return Err(Error::InvalidArgument(format!(
                "write_offset {write_offset} does not match the committed size {} of upload {}; \
                 ask QueryWriteStatus and resume from there",
                session.committed, session.resource.upload_id
            )));
        }
        let fed = match &mut session.feed {
            Feed::Plain(sink) => sink.write_all(&data),
            Feed::Zstd(dec) => dec.write_all(&data).and_then(|_| dec.flush()),
        };
        if let Err(e) = fed {
            let error = if session.feed.sink().overflow {
                Error::InvalidArgument(format!(
                    "upload of {} carries more than {} bytes",
                    session.resource.digest, session.resource.digest.size
                ))
            } else {
                match crate::cache::cas::zstd_error(e, limits) {
                    Error::InvalidArgument(why) => {
                        Error::InvalidArgument(format!("upload of {}: {why}", session.resource.digest))
                    }
                    other => other,
                }
            };
            self.discard(store, session).await;
            return Err(error);
        }
        session.committed += data.len() as i64;
        session.progress.store(session.committed, Ordering::Release);
        // A blob of one chunk or less stays in memory and is stored in one batch at the end.
        while session.resource.digest.size > CHUNK_SIZE as u64 && session.feed.sink().buf.len() >= CHUNK_SIZE {
            let chunk = session.feed.sink().buf.split_to(CHUNK_SIZE).freeze();
            self.store_chunk(store, session, chunk).await?;
        }
        if !finish {
            return Ok(None);
        }
        self.finish(store, session).await.map(Some)
    }

    async fn store_chunk(&self, store: &Arc<Store>, session: &mut Session, chunk: Bytes) -> Result<()> {
        let id = match session.blob_id {
            Some(id) => id,
            None => {
                let s = store.clone();
                let id = blocking(move || s.begin_upload()).await?;
                session.blob_id = Some(id);
                id
            }
        };
        let index = session.next_chunk;
        let s = store.clone();
        let wal = use_wal(&session.resource.digest);
        blocking(move || s.write_chunk(id, index, &chunk, wal)).await?;
        session.next_chunk += 1;
        Ok(())
    }

    async fn finish(&self, store: &Arc<Store>, session: &mut Session) -> Result<WriteOutcome> {
        let digest = session.resource.digest;
        let received = session.feed.sink().received;
        if received != digest.size {
            let committed = session.committed;
            self.discard(store, session).await;
            return Err(Error::InvalidArgument(format!(
                "finish_write after {received} bytes ({committed} on the wire), but blob {digest} has {} bytes",
                digest.size
            )));
        }
        let sink = session.feed.sink();
        let hash = std::mem::replace(&mut sink.hasher, digest.function.hasher()).finalize();
        if hash != digest.hash {
            self.discard(store, session).await;
            return Err(Error::InvalidArgument(format!(
                "uploaded data does not match digest {digest}: its hash is {}",
                hex::encode(hash)
            )));
        }
        let tail = session.feed.sink().buf.split().freeze();
        match session.blob_id {
            None => {
                let key = session.key.clone();
                let s = store.clone();
                if !digest.is_empty_blob() {
                    blocking(move || s.put_blob(&key, &tail)).await?;
                }
            }
            Some(id) => {
                if !tail.is_empty() {
                    self.store_chunk(store, session, tail).await?;
                }
                let key = session.key.clone();
                let s = store.clone();
                let flush = !use_wal(&digest);
                blocking(move || s.commit_upload(&key, id, digest.size, flush)).await?;
                session.blob_id = None;
            }
        }
        self.remove(&session.resource, &session.principal);
        Ok(WriteOutcome::Complete(session.committed))
    }

    async fn discard(&self, store: &Arc<Store>, session: &mut Session) {
        if let Some(id) = session.blob_id.take() {
            let s = store.clone();
            if let Err(e) = blocking(move || s.abort_upload(id)).await {
                tracing::warn!(error = %e, "could not delete a failed upload's chunks");
            }
        }
        self.remove(&session.resource, &session.principal);
    }
}

impl Session {
    /// Bytes of the wire stream accepted so far.
    pub fn committed(&self) -> i64 {
        self.committed
    }

    /// The digest being uploaded.
    pub fn digest(&self) -> Digest {
        self.resource.digest
    }
}
