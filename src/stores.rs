//! Which stores the domain runs on: the embedded RocksDB alone (one server),
//! or a replica's read-through pair over the shared object store
//! (docs/scale-out.md). The composition root ([`crate::server`]) asks for
//! [`Stores`] and never looks inside.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

use crate::clock::Clock;
use crate::observe::store_health::StoreHealth;
use crate::store::action_store::ActionStore;
use crate::store::hit_log_store::HitLogStore;
use crate::store::object::client::{self, ObjectStoreSettings};
use crate::store::object::{Bucket, ObjectActions, ObjectBlobs, ObjectHitLog, ObjectOptions, ObjectStats};
use crate::store::replica::{CachedActions, ReadThroughBlobs, ReplicaStats};
use crate::store::rocks::RocksStore;
use crate::store::BlobStore;

/// The three stores the domain needs, plus a replica's shared parts.
pub struct Stores {
    /// The CAS and uploads.
    pub blobs: Arc<dyn BlobStore>,
    /// The Action Cache and its history.
    pub actions: Arc<dyn ActionStore>,
    /// The per-invocation hit log.
    pub hits: Arc<dyn HitLogStore>,
    /// Set when the server is a replica over an object store.
    pub replica: Option<Replica>,
}

/// What a replica shares with metrics and health: the client, its counters
/// and the probe's last answer.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The bucket's client, scoped to the prefix (the health probe asks it).
    pub store: Arc<dyn ObjectStore>,
    /// Requests, errors, latency and bytes of the object store.
    pub object_stats: Arc<ObjectStats>,
    /// Local-cache hits, fills and outages.
    pub replica_stats: Arc<ReplicaStats>,
    /// Whether the bucket answers now.
    pub health: Arc<StoreHealth>,
}

impl Stores {
    /// RocksDB alone, as one server runs.
    pub fn embedded(rocks: &Arc<RocksStore>) -> Self {
        Stores {
            blobs: Arc::new(rocks.clone()),
            actions: Arc::new(rocks.clone()),
            hits: Arc::new(rocks.clone()),
            replica: None,
        }
    }

    /// A replica: `rocks` becomes the read-through cache of blobs in front of
    /// the bucket, Action Cache entries are cached in memory for
    /// `settings.ac_ttl`, and the hit log lives in the bucket, so every
    /// replica sees every record.
    pub fn replica(rocks: &Arc<RocksStore>, settings: &ObjectStoreSettings, clock: Clock) -> anyhow::Result<Self> {
        let store = client::connect(settings)?;
        let options = ObjectOptions {
            existence_ttl: settings.existence_ttl,
            refresh_age: settings.refresh_age,
            ..ObjectOptions::default()
        };
        let health = Arc::new(StoreHealth::default());
        let bucket = Bucket::new(store.clone(), options).with_clock(clock.clone()).with_health(health.clone());
        let replica_stats = Arc::new(ReplicaStats::new());
        let local: Arc<dyn BlobStore> = Arc::new(rocks.clone());
        let remote: Arc<dyn BlobStore> = Arc::new(ObjectBlobs::new(bucket.clone()));
        let remote_actions: Arc<dyn ActionStore> = Arc::new(ObjectActions::new(bucket.clone()));
        let ac_ttl = settings.ac_ttl;
        Ok(Stores {
            blobs: Arc::new(ReadThroughBlobs::new(local, remote, replica_stats.clone())),
            actions: Arc::new(CachedActions::new(
                remote_actions,
                ac_ttl,
                CachedActions::DEFAULT_MAX_BYTES,
                clock,
                replica_stats.clone(),
            )),
            hits: Arc::new(ObjectHitLog::new(bucket.clone())),
            replica: Some(Replica { store, object_stats: bucket.stats(), replica_stats, health }),
        })
    }
}

/// How often a replica asks the bucket whether it answers.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
