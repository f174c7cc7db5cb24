//! Resumable ByteStream uploads: each upload name owns a session that hashes
//! the (decompressed) bytes as they arrive and hands them, a piece at a time,
//! to a [`BlobWriter`] of the blob store. The blob becomes visible only when
//! the whole stream is in and its digest matches. A dropped stream keeps its session, so the
//! client can ask QueryWriteStatus and resume.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::cache::digest::{Digest, Hasher};
use crate::cache::resource::{Compressor, WriteResource};
use crate::error::{Error, Result};
use crate::limits::{Enforcer, Limits};
use crate::store::{BlobStore, BlobWriter};

/// The most uploads in progress at once, whoever holds them (each holds up
/// to one [`WRITE_PIECE`] in memory, and a zstd window for compressed uploads;
/// the store's writer may hold a few more pieces while it writes them). Per
/// identity and per instance they are bounded further by
/// `limits.max_uploads_per_identity` and `limits.max_uploads_per_instance`.
pub const MAX_SESSIONS: usize = 4096;
/// Decompressed bytes a session gathers before handing them to the store's
/// writer: the memory one upload holds. A blob of at most this size is
/// handed over whole at the end. (The RocksDB store's chunks are this size
/// too, so a piece is stored without being copied again.)
pub const WRITE_PIECE: usize = 1024 * 1024;

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
    feed: Feed,
    /// Bytes of the wire stream accepted so far (compressed bytes for compressed uploads).
    committed: i64,
    /// `committed`, readable without the session lock (for QueryWriteStatus).
    progress: Arc<AtomicI64>,
    /// Where the bytes go, once the first piece is handed over.
    writer: Option<Box<dyn BlobWriter>>,
    /// When it was last written (ms since [`Uploads`]' epoch), readable
    /// without the session lock, so expiry never waits for a stream.
    last_used: Arc<AtomicU64>,
    /// Expired while idle: its bytes are gone and it must not be written.
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
    blobs: Arc<dyn BlobStore>,
    table: Mutex<Table>,
    epoch: Instant,
    idle: Duration,
    window_log_max: u32,
    per_identity: usize,
    per_instance: usize,
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
    /// No uploads yet; they write into `blobs`, and `limits` bound them.
    pub fn new(blobs: Arc<dyn BlobStore>, limits: &Limits) -> Self {
        Uploads {
            blobs,
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
    pub fn session(&self, resource: &WriteResource, limits: &Enforcer) -> Result<Arc<tokio::sync::Mutex<Session>>> {
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
                    self.abort_in_background(expired);
                    return Ok(session);
                }
            }
        };
        self.abort_in_background(expired);
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
            resource: resource.clone(),
            principal: principal.into(),
            feed,
            committed: 0,
            progress: Arc::new(AtomicI64::new(0)),
            writer: None,
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
    /// that no stream holds), marks them expired, and returns the writers
    /// whose bytes must be deleted.
    fn expire_locked(&self, table: &mut Table) -> Vec<Box<dyn BlobWriter>> {
        let now = self.now_ms();
        let idle_ms = self.idle.as_millis() as u64;
        let stale: Vec<String> = table
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.last_used.load(Ordering::Acquire)) >= idle_ms)
            .map(|(name, _)| name.clone())
            .collect();
        let mut writers = Vec::new();
        for name in stale {
            let Some(entry) = table.entries.get(&name) else { continue };
            // A stream holding the session is not idle.
            let Ok(mut s) = entry.session.try_lock() else { continue };
            s.expired = true;
            writers.extend(s.writer.take());
            drop(s);
            table.remove(&name);
        }
        writers
    }

    fn abort_in_background(&self, writers: Vec<Box<dyn BlobWriter>>) {
        if writers.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for writer in writers {
                if let Err(e) = writer.abort().await {
                    tracing::warn!(error = %e, "could not delete an expired upload's chunks");
                }
            }
        });
    }

    /// Drops uploads idle for longer than the idle timeout and abandons their
    /// writes (run periodically; the caps also expire idle uploads on demand).
    pub async fn expire(&self) {
        let writers = self.expire_locked(&mut self.table());
        self.abort_in_background(writers);
    }

    /// Feeds one WriteRequest's data into a locked session; on `finish`,
    /// verifies and commits. Data errors (too much data, wrong digest, bad
    /// compression) end the session; the client must start over.
    pub async fn feed(
        &self,
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
        if write_offset > 0 && session.committed == 0 {
            // A resume this server holds no bytes of: the earlier stream went
            // to another replica, or the session expired. ABORTED, because
            // Bazel retries it (not NOT_FOUND or INVALID_ARGUMENT), and its
            // retry asks QueryWriteStatus, which answers NOT_FOUND once the
            // session is gone, so the client restarts at offset 0. The same
            // code as an expired session's.
            self.discard(session).await;
            return Err(Error::Aborted(format!(
                "this server holds no bytes of upload {} (write_offset {write_offset}); \
                 ask QueryWriteStatus and start again from offset 0",
                session.resource.upload_id
            )));
        }
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
            self.discard(session).await;
            return Err(error);
        }
        session.committed += data.len() as i64;
        session.progress.store(session.committed, Ordering::Release);
        // A blob of one piece or less stays in memory and is handed over whole at the end.
        while session.resource.digest.size > WRITE_PIECE as u64 && session.feed.sink().buf.len() >= WRITE_PIECE {
            let piece = session.feed.sink().buf.split_to(WRITE_PIECE).freeze();
            if let Err(error) = self.hand_over(session, piece).await {
                // The piece is counted as committed but lost: no resume can complete this session.
                self.discard(session).await;
                return Err(error);
            }
        }
        if !finish {
            return Ok(None);
        }
        self.finish(session).await.map(Some)
    }

    /// Writes `piece` into the session's writer (opened on first use).
    async fn hand_over(&self, session: &mut Session, piece: Bytes) -> Result<()> {
        let writer = match &mut session.writer {
            Some(writer) => writer,
            None => {
                let r = &session.resource;
                session.writer.insert(self.blobs.begin_write(&r.instance, r.digest).await?)
            }
        };
        writer.write(piece).await
    }

    async fn finish(&self, session: &mut Session) -> Result<WriteOutcome> {
        let digest = session.resource.digest;
        let received = session.feed.sink().received;
        if received != digest.size {
            let committed = session.committed;
            self.discard(session).await;
            return Err(Error::InvalidArgument(format!(
                "finish_write after {received} bytes ({committed} on the wire), but blob {digest} has {} bytes",
                digest.size
            )));
        }
        let sink = session.feed.sink();
        let hash = std::mem::replace(&mut sink.hasher, digest.function.hasher()).finalize();
        if hash != digest.hash {
            self.discard(session).await;
            return Err(Error::InvalidArgument(format!(
                "uploaded data does not match digest {digest}: its hash is {}",
                hex::encode(hash)
            )));
        }
        let tail = session.feed.sink().buf.split().freeze();
        if let Err(error) = self.commit(session, digest, tail).await {
            // The hash and the tail are consumed: the session cannot be
            // resumed, so it goes, QueryWriteStatus answers NOT_FOUND and the
            // client restarts at 0 (the error keeps its code, UNAVAILABLE for
            // a store that is down, so the client retries).
            self.discard(session).await;
            return Err(error);
        }
        self.remove(&session.resource, &session.principal);
        Ok(WriteOutcome::Complete(session.committed))
    }

    /// Hands the last bytes of a checked upload to the store and commits it.
    async fn commit(&self, session: &mut Session, digest: Digest, tail: Bytes) -> Result<()> {
        if digest.is_empty_blob() {
            return Ok(());
        }
        if !tail.is_empty() {
            self.hand_over(session, tail).await?;
        }
        match session.writer.take() {
            Some(writer) => writer.commit().await,
            None => Ok(()),
        }
    }

    async fn discard(&self, session: &mut Session) {
        if let Some(writer) = session.writer.take() {
            if let Err(e) = writer.abort().await {
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
