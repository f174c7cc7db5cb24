//! The bucket as the backends use it: every request goes through
//! [`Bucket::call`], which times and counts it, and every failure becomes a
//! [`StoreError`] naming the request and the key.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetResult, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use tokio::sync::Semaphore;

use super::stats::{ObjectStats, Op};
use crate::clock::{system_clock, Clock};
use crate::error::{Error, Result};
use crate::observe::store_health::StoreHealth;
use crate::store::{StoreError, StoreErrorKind};

/// Requests of one call (a FindMissingBlobs, a page) sent at once.
pub(super) const PARALLEL: usize = 32;

/// The operator's knobs for the bucket backends.
#[derive(Clone, Debug)]
pub struct ObjectOptions {
    /// How long a blob seen present is believed present without asking the
    /// bucket again (a lifecycle rule may delete it after that).
    pub existence_ttl: Duration,
    /// Most digests the existence cache remembers (bounded memory: about
    /// 200 bytes each).
    pub existence_entries: usize,
    /// Age past which an object that is used gets re-dated, so that a
    /// bucket lifecycle rule expiring old objects spares used ones.
    pub refresh_age: Duration,
    /// Blobs this size and over go up as multipart uploads of parts this size.
    pub part_size: usize,
    /// Parts of one upload in flight at once (memory ≈ parts × part size).
    pub parts_in_flight: usize,
    /// Background re-datings running at once; a use that finds none free
    /// skips its re-dating (a later use tries again), so a burst of old
    /// objects cannot queue unbounded copies.
    pub redates_at_once: usize,
}

impl Default for ObjectOptions {
    fn default() -> Self {
        ObjectOptions {
            existence_ttl: Duration::from_secs(60),
            existence_entries: 200_000,
            refresh_age: Duration::from_secs(24 * 3600),
            part_size: 8 << 20,
            parts_in_flight: 4,
            redates_at_once: 8,
        }
    }
}

/// An `ObjectStore` scoped to the operator's prefix, with the options, the
/// counters and the clock the three backends share.
#[derive(Clone)]
pub struct Bucket {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) stats: Arc<ObjectStats>,
    pub(super) options: ObjectOptions,
    clock: Clock,
    /// Permits for background re-datings ([`ObjectOptions::redates_at_once`]).
    redates: Arc<Semaphore>,
    /// The health probe's last answer: while it gets none, requests fail at
    /// once instead of each waiting out connect timeouts and retries.
    health: Arc<StoreHealth>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("store", &self.store.to_string()).field("options", &self.options).finish()
    }
}

/// The answer to a create-only write.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Created {
    /// The object is now ours.
    Yes,
    /// Something was already stored under the key.
    AlreadyThere,
}

impl Bucket {
    /// A bucket over `store` (already scoped to the operator's prefix).
    pub fn new(store: Arc<dyn ObjectStore>, options: ObjectOptions) -> Self {
        let redates = Arc::new(Semaphore::new(options.redates_at_once));
        Bucket { store, stats: Arc::default(), options, clock: system_clock(), redates, health: Arc::default() }
    }

    /// The same bucket failing fast while `health` says the store is down
    /// (the probe asks the raw store, so it still sees the recovery).
    pub fn with_health(self, health: Arc<StoreHealth>) -> Self {
        Bucket { health, ..self }
    }

    /// The same bucket reading time from `clock` (tests move time).
    pub fn with_clock(self, clock: Clock) -> Self {
        Bucket { clock, ..self }
    }

    /// The counters, for the metrics module.
    pub fn stats(&self) -> Arc<ObjectStats> {
        self.stats.clone()
    }

    /// The time by the injected clock.
    pub(super) fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Starts `redate` of `key` in the background if a re-dating permit is
    /// free; otherwise skips it (counted) and returns `false`, so the caller
    /// does not note it as done and a later use tries again.
    pub(super) fn spawn_redate(&self, key: Path, redate: impl Future<Output = Result<()>> + Send + 'static) -> bool {
        let Ok(permit) = self.redates.clone().try_acquire_owned() else {
            self.stats.refresh_skipped();
            return false;
        };
        spawn(async move {
            if let Err(e) = redate.await {
                tracing::warn!(%key, error = %e, "could not refresh the age of a used object");
            }
            drop(permit);
        });
        true
    }

    /// Runs one request, timed and counted; `benign` failures (a 404, a lost
    /// create race) are answers, not errors. While the health probe gets no
    /// answer, nothing is sent: the request fails at once as unavailable.
    pub(super) async fn call<T>(
        &self,
        op: Op,
        request: impl Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        if !self.health.is_up() {
            let source = "unavailable (the health probe gets no answer)".into();
            return Err(object_store::Error::Generic { store: "object store", source });
        }
        let started = Instant::now();
        let result = request.await;
        let benign = matches!(
            &result,
            Err(object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. })
        );
        self.stats.record(op, started.elapsed(), result.is_err() && !benign);
        result
    }

    /// HEAD: the object's metadata, `None` if absent.
    pub(super) async fn head(&self, key: &Path) -> Result<Option<ObjectMeta>> {
        absent_is_none(Op::Head, key, self.call(Op::Head, self.store.head(key)).await)
    }

    /// GET of the whole object, at most `max` bytes (the bucket is not
    /// trusted to send a sane size), `None` if absent.
    pub(super) async fn get(&self, key: &Path, max: u64) -> Result<Option<Found>> {
        self.get_if(key, GetOptions::default(), max).await
    }

    /// GET of the whole object, at most `max` bytes, `None` if absent or if
    /// a precondition in `options` (an e-tag) does not hold. The size is
    /// checked before the body is read and again while it is.
    pub(super) async fn get_if(&self, key: &Path, options: GetOptions, max: u64) -> Result<Option<Found>> {
        let request = async { read_at_most(self.store.get_opts(key, options).await?, max).await };
        let found = absent_is_none(Op::Get, key, self.call(Op::Get, request).await)?;
        if let Some(Found::Body(bytes, _)) = &found {
            self.stats.read(bytes.len() as u64);
        }
        Ok(found)
    }

    /// GET whose body the caller streams, `None` if absent.
    pub(super) async fn get_stream(&self, key: &Path, options: GetOptions) -> Result<Option<GetResult>> {
        absent_is_none(Op::Get, key, self.call(Op::Get, self.store.get_opts(key, options)).await)
    }

    /// PUT in `mode`; a create that finds the key taken is [`Created::AlreadyThere`].
    pub(super) async fn put(&self, key: &Path, data: Bytes, mode: PutMode) -> Result<Created> {
        let len = data.len() as u64;
        let options = PutOptions { mode, ..Default::default() };
        match self.call(Op::Put, self.store.put_opts(key, PutPayload::from(data), options)).await {
            Ok(_) => {
                self.stats.wrote(len);
                Ok(Created::Yes)
            }
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(Created::AlreadyThere)
            }
            Err(e) => Err(failed(Op::Put, key, e)),
        }
    }

    /// A create-only PUT that also counts as done when `key` already holds
    /// exactly `data`: our own earlier attempt, whose answer was lost and
    /// which the client retried, is not someone else's object.
    pub(super) async fn create_or_same(&self, key: &Path, data: Bytes) -> Result<Created> {
        if self.put(key, data.clone(), PutMode::Create).await? == Created::Yes {
            return Ok(Created::Yes);
        }
        match self.get(key, data.len() as u64).await? {
            Some(Found::Body(there, _)) if there == data => Ok(Created::Yes),
            _ => Ok(Created::AlreadyThere),
        }
    }

    /// DELETE; absent is fine.
    pub(super) async fn delete(&self, key: &Path) -> Result<()> {
        absent_is_none(Op::Delete, key, self.call(Op::Delete, self.store.delete(key)).await).map(|_| ())
    }

    /// DELETE of the object `read` described, only if `key` still holds it
    /// (same e-tag, or same time and size when the bucket gives none):
    /// object_store has no conditional delete, so a HEAD compares first.
    /// Another replica may have replaced a corrupt blob with a good one
    /// meanwhile; that one stays. Returns whether it deleted.
    pub(super) async fn delete_if_same(&self, key: &Path, read: &ObjectMeta) -> Result<bool> {
        let Some(now) = self.head(key).await? else { return Ok(false) };
        let same = match (&now.e_tag, &read.e_tag) {
            (Some(now), Some(read)) => now == read,
            _ => now.last_modified == read.last_modified && now.size == read.size,
        };
        if !same {
            tracing::warn!(%key, "the damaged object was replaced meanwhile; keeping the new one");
            return Ok(false);
        }
        self.delete(key).await?;
        Ok(true)
    }

    /// COPY (overwriting `to`).
    pub(super) async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.call(Op::Copy, self.store.copy(from, to)).await.map_err(|e| failed(Op::Copy, from, e))
    }

    /// Up to `limit` objects under `prefix` whose keys sort after `offset`,
    /// in key order.
    pub(super) async fn list(&self, prefix: &Path, offset: Option<&Path>, limit: usize) -> Result<Vec<ObjectMeta>> {
        let listing = match offset {
            Some(offset) => self.store.list_with_offset(Some(prefix), offset),
            None => self.store.list(Some(prefix)),
        };
        let found = self.call(Op::List, listing.take(limit).try_collect::<Vec<_>>()).await;
        let mut found = found.map_err(|e| failed(Op::List, prefix, e))?;
        found.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(found)
    }

    /// The folders directly under `prefix`.
    pub(super) async fn folders(&self, prefix: &Path) -> Result<Vec<Path>> {
        let listed = self.call(Op::List, self.store.list_with_delimiter(Some(prefix))).await;
        Ok(listed.map_err(|e| failed(Op::List, prefix, e))?.common_prefixes)
    }

    /// The bodies of `keys` (each at most `max` bytes), fetched
    /// [`PARALLEL`] at a time, in order; a key gone meanwhile is `None`.
    pub(super) async fn get_all(&self, keys: Vec<Path>, max: u64) -> Result<Vec<Option<Found>>> {
        in_order(keys, |key| async move { self.get(&key, max).await }).await
    }
}

/// What a bounded GET found.
#[derive(Debug)]
pub(super) enum Found {
    /// The whole body, within the bound.
    Body(Bytes, ObjectMeta),
    /// An object over the bound: damaged (nothing this server writes is that
    /// large), its body left unread.
    TooLarge(ObjectMeta),
}

impl Found {
    /// The body, when it was within the bound.
    pub(super) fn body(self) -> Option<Bytes> {
        match self {
            Found::Body(bytes, _) => Some(bytes),
            Found::TooLarge(_) => None,
        }
    }
}

/// Reads the body of `result` if it is at most `max` bytes, by its stated
/// size and by what actually arrives.
async fn read_at_most(result: GetResult, max: u64) -> object_store::Result<Found> {
    let meta = result.meta.clone();
    if meta.size > max {
        return Ok(Found::TooLarge(meta));
    }
    let mut body = BytesMut::with_capacity(meta.size as usize);
    let mut stream = result.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if (body.len() + chunk.len()) as u64 > max {
            return Ok(Found::TooLarge(meta));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Found::Body(body.freeze(), meta))
}

/// `f` over `items`, [`PARALLEL`] at a time, answers in the items' order.
pub(super) async fn in_order<I, T, F, Fut>(items: Vec<I>, f: F) -> Result<Vec<T>>
where
    F: FnMut(I) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    futures::stream::iter(items).map(f).buffered(PARALLEL).try_collect().await
}

/// Splits listed `(name, size)` items, in order, into the page a caller
/// asked for: at most `max_count` of them and at most `max_bytes` in all,
/// but one at least when `must_progress`. Returns the names taken and the
/// first one left out (where the next page starts), if any.
pub(super) fn page_of<K>(
    items: impl IntoIterator<Item = (K, usize)>,
    max_count: usize,
    max_bytes: usize,
    must_progress: bool,
) -> (Vec<K>, Option<K>) {
    let (mut taken, mut bytes) = (Vec::new(), 0usize);
    for (name, size) in items {
        let first = taken.is_empty() && must_progress;
        if taken.len() >= max_count || (!first && bytes.saturating_add(size) > max_bytes) {
            return (taken, Some(name));
        }
        bytes = bytes.saturating_add(size);
        taken.push(name);
    }
    (taken, None)
}

/// A 404 (or an unmet precondition: not the version asked for) is `None`.
fn absent_is_none<T>(op: Op, key: &Path, result: object_store::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(found) => Ok(Some(found)),
        Err(object_store::Error::NotFound { .. } | object_store::Error::Precondition { .. }) => Ok(None),
        Err(e) => Err(failed(op, key, e)),
    }
}

/// A bucket request that failed, naming the request and key. A refusal
/// (credentials, bucket policy) or a request the store does not support is
/// the operator's to fix, not the client's to retry: INTERNAL, saying what
/// to check. Anything else (transport, timeout, 5xx) is UNAVAILABLE: the
/// client retries. The store's message carries no credentials.
pub(super) fn failed(op: Op, key: &Path, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let what = format!("object store {} of {key}", op.name());
    let (kind, message) = match &e {
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            StoreErrorKind::Other,
            format!("{what} was refused; check the credentials and the bucket policy ([storage]): {e}"),
        ),
        E::NotImplemented { .. } | E::NotSupported { .. } => (
            StoreErrorKind::Other,
            format!("{what} is not supported by this object store; check the endpoint and its S3 features: {e}"),
        ),
        _ => (StoreErrorKind::Unavailable, format!("{what} failed: {e}")),
    };
    Error::Storage(StoreError::new(kind, message))
}

/// A bounded map of recent facts about keys (seen present, last re-dated):
/// when full it forgets everything, which costs only a repeated request.
#[derive(Debug)]
pub(super) struct Recent<V> {
    map: Mutex<HashMap<Path, V>>,
    capacity: usize,
}

impl<V: Clone> Recent<V> {
    /// An empty map holding at most `capacity` keys.
    pub(super) fn new(capacity: usize) -> Self {
        Recent { map: Mutex::default(), capacity: capacity.max(1) }
    }

    /// What is remembered of `key`.
    pub(super) fn get(&self, key: &Path) -> Option<V> {
        self.lock().get(key).cloned()
    }

    /// Remembers `value` for `key`.
    pub(super) fn insert(&self, key: Path, value: V) {
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, value);
    }

    /// Forgets `key`.
    pub(super) fn remove(&self, key: &Path) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Path, V>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `modified` is older than `age` at `now`.
pub(super) fn older_than(modified: SystemTime, age: Duration, now: SystemTime) -> bool {
    now.duration_since(modified).is_ok_and(|elapsed| elapsed > age)
}

/// A background task when a runtime runs (never blocks the caller).
pub(super) fn spawn(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}
