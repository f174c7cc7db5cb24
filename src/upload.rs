//! Resumable ByteStream uploads: each upload name owns a session that hashes
//! the (decompressed) bytes as they arrive and stores them chunk by chunk under
//! a private blob id. The blob becomes visible only when the whole stream is
//! in and its digest matches. A dropped stream keeps its session, so the
//! client can ask QueryWriteStatus and resume.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::cas::blocking;
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::resource::{Compressor, WriteResource};
use crate::store::{Key, Store, CHUNK_SIZE};

/// How long an idle, unfinished upload is kept for resumption.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most uploads in progress at once (each holds up to one chunk in memory).
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
    key: Key,
    feed: Feed,
    /// Bytes of the wire stream accepted so far (compressed bytes for compressed uploads).
    committed: i64,
    /// `committed`, readable without the session lock (for QueryWriteStatus).
    progress: Arc<AtomicI64>,
    blob_id: Option<u64>,
    next_chunk: u32,
    last_used: Instant,
}

/// What a finished `write` call reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The blob is stored; `committed_size` to report.
    Complete(i64),
}

/// Every upload in progress.
#[derive(Default)]
pub struct Uploads {
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Session>>>>,
    progress_of: Mutex<HashMap<String, Arc<AtomicI64>>>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads").field("sessions", &self.len()).finish()
    }
}

fn session_name(r: &WriteResource) -> String {
    format!("{}\0{}\0{}\0{:?}", r.instance.as_str(), r.upload_id, r.digest, r.compressor)
}

impl Uploads {
    /// Number of uploads in progress.
    pub fn len(&self) -> usize {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no upload is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session for an upload name, created on first use.
    pub fn session(&self, resource: &WriteResource) -> Result<Arc<tokio::sync::Mutex<Session>>> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let name = session_name(resource);
        if let Some(s) = map.get(&name) {
            return Ok(s.clone());
        }
        if map.len() >= MAX_SESSIONS {
            return Err(Error::ResourceExhausted(format!("{MAX_SESSIONS} uploads are in progress; retry later")));
        }
        let sink = Sink {
            hasher: resource.digest.function.hasher(),
            expected: resource.digest.size,
            received: 0,
            buf: BytesMut::new(),
            overflow: false,
        };
        let feed = match resource.compressor {
            None => Feed::Plain(sink),
            Some(Compressor::Zstd) => Feed::Zstd(Box::new(
                zstd::stream::write::Decoder::new(sink).map_err(|e| Error::Internal(format!("zstd: {e}")))?,
            )),
        };
        let session = Arc::new(tokio::sync::Mutex::new(Session {
            key: Key::new(&resource.instance, &resource.digest),
            resource: resource.clone(),
            feed,
            committed: 0,
            progress: Arc::new(AtomicI64::new(0)),
            blob_id: None,
            next_chunk: 0,
            last_used: Instant::now(),
        }));
        let progress = session.try_lock().expect("new session is unlocked").progress.clone();
        self.progress_of.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), progress);
        map.insert(name, session.clone());
        Ok(session)
    }

    /// The session of an upload name, if one is in progress.
    pub fn existing(&self, resource: &WriteResource) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&session_name(resource)).cloned()
    }

    /// The committed size of an upload in progress, without waiting for a
    /// stream that is writing it.
    pub fn progress(&self, resource: &WriteResource) -> Option<i64> {
        let map = self.progress_of.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&session_name(resource)).map(|p| p.load(Ordering::Acquire))
    }

    fn remove(&self, resource: &WriteResource) {
        self.progress_of.lock().unwrap_or_else(|p| p.into_inner()).remove(&session_name(resource));
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&session_name(resource));
    }

    /// Drops uploads idle for longer than `idle` and deletes their chunks.
    pub async fn expire(&self, store: &Arc<Store>, idle: Duration) {
        let stale: Vec<(String, Arc<tokio::sync::Mutex<Session>>)> = {
            let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for (name, session) in stale {
            let Ok(s) = session.try_lock() else { continue };
            if s.last_used.elapsed() < idle {
                continue;
            }
            if let Some(id) = s.blob_id {
                let store = store.clone();
                if let Err(e) = blocking(move || store.abort_upload(id)).await {
                    tracing::warn!(error = %e, "could not delete an expired upload's chunks");
                }
            }
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            self.progress_of.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
        }
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
    ) -> Result<Option<WriteOutcome>> {
        session.last_used = Instant::now();
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
            let why = if session.feed.sink().overflow {
                format!(
                    "upload of {} carries more than {} bytes",
                    session.resource.digest, session.resource.digest.size
                )
            } else {
                format!("invalid zstd data in upload of {}: {e}", session.resource.digest)
            };
            self.discard(store, session).await;
            return Err(Error::InvalidArgument(why));
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
        self.remove(&session.resource);
        Ok(WriteOutcome::Complete(session.committed))
    }

    async fn discard(&self, store: &Arc<Store>, session: &mut Session) {
        if let Some(id) = session.blob_id.take() {
            let s = store.clone();
            if let Err(e) = blocking(move || s.abort_upload(id)).await {
                tracing::warn!(error = %e, "could not delete a failed upload's chunks");
            }
        }
        self.remove(&session.resource);
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
