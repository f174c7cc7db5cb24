//! Wires storage → domain → services → transport.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;

use crate::access::gate::SharedGate;
use crate::cache::action_cache::ActionCache;
use crate::cache::audit::AuditLog;
use crate::cache::cas::Cas;
use crate::cache::upload::Uploads;
use crate::clock::{system_clock, Clock};
use crate::limits::{LimitHits, Limits};
use crate::observe::metrics::{Metrics, MetricsLayer};
use crate::observe::request_log::RequestSpanLayer;
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::prov::audit_server::AuditServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::proto::reapi::execution_server::ExecutionServer;
use crate::provenance::{Provenance, ProvenanceConfig};
use crate::service::action_cache::ActionCacheService;
use crate::service::audit::AuditService;
use crate::service::bytestream::ByteStreamService;
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;
use crate::service::execution::ExecutionService;
use crate::service::Context;
use crate::store::object::client::ObjectStoreSettings;
use crate::store::rocks::{RocksStore, StoreOptions};
use crate::stores::{Replica, Stores, PROBE_EVERY};
use crate::transport::{RequestBudget, TransportLayer};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

/// Largest gRPC message accepted or sent: a full batch (4 MiB of blob data)
/// plus its framing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Where and how the server keeps its data.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The data directory; RocksDB lives in `DIR/db`.
    pub data_dir: PathBuf,
    /// Storage tuning.
    pub store: StoreOptions,
    /// Signing key, trust policy, mode.
    pub provenance: ProvenanceConfig,
    /// How long earlier statements of an action are kept.
    pub history_retention: Duration,
    /// Measure calls for the metrics endpoint (off: the layer is a pass-through).
    pub metrics: bool,
    /// Log every finished call (target `provcache::access`).
    pub access_log: bool,
    /// How long calls in flight may take to complete after shutdown begins.
    pub shutdown_timeout: Duration,
    /// What one caller may cost (docs/operations.md, "Limits").
    pub limits: Limits,
    /// The shared object store of a replica (docs/scale-out.md); `None`:
    /// RocksDB alone holds everything.
    pub object_store: Option<ObjectStoreSettings>,
}

/// Background tasks of a serving cache; stopped with [`Background::abort`].
#[derive(Debug)]
pub struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    /// Stops every task.
    pub fn abort(&self) {
        self.0.iter().for_each(|t| t.abort());
    }
}

/// Writes queued recency refreshes every second and evicts least recently
/// used records whenever stored bytes exceed the bound, off the request path.
fn spawn_eviction(store: Arc<RocksStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = store.over_limit_notify().notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let s = store.clone();
            match tokio::task::spawn_blocking(move || {
                s.apply_touches()?;
                s.evict()
            })
            .await
            .unwrap_or_else(|e| Err(e.into()))
            {
                Ok(e) if e.blobs + e.actions > 0 => {
                    tracing::debug!(blobs = e.blobs, actions = e.actions, bytes = e.bytes, "evicted")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "eviction failed"),
            }
        }
    })
}

/// The layers in front of every service, outermost first: request span,
/// metrics, transport limits.
pub type Layers = tower_layer::Stack<
    TransportLayer,
    tower_layer::Stack<MetricsLayer, tower_layer::Stack<RequestSpanLayer, tower_layer::Identity>>,
>;

/// An opened cache, ready to serve.
#[derive(Debug)]
pub struct Cache {
    ctx: Context,
    store: Arc<RocksStore>,
    history_retention: Duration,
    shutdown_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
    /// Log every finished call.
    access_log: bool,
    health: HealthReporter,
    metrics_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The transport limits in front of the services.
    transport: TransportLayer,
    /// Request bytes in flight (docs/operations.md, "Limits").
    budget: Arc<RequestBudget>,
    /// A replica's object store, its counters and health.
    replica: Option<Replica>,
    /// Entries are stored unsigned (`--unsafe-no-sign`): no key is needed.
    signing_disabled: bool,
}

/// How often the health service's ActionCache status follows whether a
/// signing key is usable (the key itself is reloaded every 2 s).
const SIGNER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The RocksDB directory inside a data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

impl Cache {
    /// Opens the store and builds the domain.
    pub fn open(options: &ServerOptions, gate: SharedGate) -> anyhow::Result<Self> {
        Self::open_with_clock(options, gate, system_clock())
    }

    /// [`Cache::open`] with an injected clock (tests move time).
    pub fn open_with_clock(options: &ServerOptions, gate: SharedGate, clock: Clock) -> anyhow::Result<Self> {
        let provenance = Arc::new(Provenance::new(options.provenance.clone(), clock.clone())?);
        provenance.spawn_reloader(crate::access::reload::DEFAULT_POLL_INTERVAL);
        let store = Arc::new(RocksStore::open(&db_path(&options.data_dir), &options.store)?);
        let Stores { blobs, actions, hits, replica } = match &options.object_store {
            Some(settings) => Stores::replica(&store, settings, clock)?,
            None => Stores::embedded(&store),
        };
        let cas = Arc::new(Cas::new(blobs.clone()));
        let uploads = Arc::new(Uploads::new(blobs, &options.limits));
        store.verified_chunks().set_capacity(options.limits.verified_chunk_cache);
        let limit_hits = Arc::new(LimitHits::default());
        let max_hits = options.limits.max_hit_records_per_principal;
        let audit = Arc::new(AuditLog::new(actions.clone(), hits, provenance.clone(), max_hits, limit_hits.clone()));
        let ac = Arc::new(ActionCache::new(cas.clone(), actions, provenance.clone(), audit.clone()));
        let metrics = options.metrics.then(|| {
            Metrics::new(store.clone(), provenance.clone(), uploads.clone(), limit_hits.clone(), replica.clone())
        });
        let bare_gate = gate.clone();
        let gate = match &metrics {
            Some(m) => m.gate(gate),
            None => gate,
        };
        let gate = crate::observe::request_log::LoggingGate::wrap(gate);
        let limits = Arc::new(options.limits.clone());
        let budget = Arc::new(RequestBudget::new(
            limits.max_request_bytes,
            limits.max_request_bytes_per_identity,
            limits.max_request_bytes_unidentified,
        ));
        // The bare gate (before logging and metrics) is asked quietly who a caller is.
        let transport = TransportLayer::new(gate.clone(), bare_gate, budget.clone(), limit_hits.clone(), &limits);
        let ctx = Context { gate, cas, ac, audit, uploads, provenance, limits, limit_hits };
        Ok(Cache {
            ctx,
            store,
            history_retention: options.history_retention,
            shutdown_timeout: options.shutdown_timeout,
            metrics,
            access_log: options.access_log,
            health: HealthReporter::new(),
            metrics_task: Default::default(),
            transport,
            budget,
            replica,
            signing_disabled: options.provenance.signing_disabled,
        })
    }

    /// The metrics, when enabled.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Serves the metrics endpoint on `listener` (until the cache stops serving).
    pub fn serve_metrics(&self, listener: TcpListener) -> anyhow::Result<()> {
        let metrics = self.metrics.clone().ok_or_else(|| anyhow::anyhow!("metrics are not enabled"))?;
        let task = tokio::spawn(crate::observe::metrics::serve_http(listener, metrics, std::future::pending()));
        *self.metrics_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Reports every service's status on the standard health service (and
    /// on the metrics listener's `/healthz`).
    async fn report_status(&self, status: ServingStatus) {
        use tonic::server::NamedService;
        let names = [
            "",
            CapabilitiesServer::<CapabilitiesService>::NAME,
            ActionCacheServer::<ActionCacheService>::NAME,
            ContentAddressableStorageServer::<CasService>::NAME,
            ByteStreamServer::<ByteStreamService>::NAME,
            AuditServer::<AuditService>::NAME,
        ];
        for name in names {
            self.health.set_service_status(name, status).await;
        }
        if let Some(m) = &self.metrics {
            m.set_serving(status == ServingStatus::Serving);
        }
    }

    /// The shared service context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The request-bytes budget (tests and diagnostics read what is held).
    pub fn budget(&self) -> &Arc<RequestBudget> {
        &self.budget
    }

    /// The tonic router with every service, behind the request span, the
    /// metrics and the transport limits (in that order, outermost first, so
    /// a call refused by a limit is logged and measured too).
    pub fn router(&self) -> tonic::transport::server::Router<Layers> {
        let ctx = self.ctx.clone();
        let layer = self.metrics.as_ref().map(|m| m.layer()).unwrap_or_default().with_access_log(self.access_log);
        let limits = &ctx.limits;
        tonic::transport::Server::builder()
            .layer(RequestSpanLayer)
            .layer(layer)
            .layer(self.transport.clone())
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            // tonic's default (None) would lift hyper's limit altogether.
            .max_concurrent_streams(Some(limits.max_concurrent_streams))
            .http2_max_header_list_size(Some(limits.max_header_list_size))
            .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
            .add_service(
                CapabilitiesServer::new(CapabilitiesService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                ActionCacheServer::new(ActionCacheService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                ContentAddressableStorageServer::new(CasService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                ByteStreamServer::new(ByteStreamService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(AuditServer::new(AuditService(ctx.clone())))
            .add_service(ExecutionServer::new(ExecutionService))
            .add_service(HealthServer::new(HealthService::from_health_reporter(self.health.clone())))
    }

    /// Starts background maintenance: expiry of abandoned uploads, purge of
    /// old history records, recency refreshes and eviction.
    pub fn spawn_maintenance(&self) -> Background {
        let mut tasks = vec![self.spawn_housekeeping(), spawn_eviction(self.store.clone())];
        tasks.extend(self.replica.as_ref().map(|r| self.spawn_store_probe(r)));
        tasks.extend((!self.signing_disabled).then(|| self.spawn_signer_watch()));
        Background(tasks)
    }

    /// While no signing key is usable (its file, reloaded from disk, became
    /// unreadable or unparsable), every UpdateActionResult fails: the
    /// ActionCache service is NOT_SERVING on the health service until a
    /// good key is back. Checked every [`SIGNER_CHECK_EVERY`].
    fn spawn_signer_watch(&self) -> tokio::task::JoinHandle<()> {
        use tonic::server::NamedService;
        let (health, provenance) = (self.health.clone(), self.ctx.provenance.clone());
        tokio::spawn(async move {
            let mut could_sign = true;
            // The first look comes after start-up has reported SERVING.
            let start = tokio::time::Instant::now() + SIGNER_CHECK_EVERY;
            let mut tick = tokio::time::interval_at(start, SIGNER_CHECK_EVERY);
            loop {
                tick.tick().await;
                let can_sign = provenance.hit_signer().is_some();
                if can_sign != could_sign {
                    let status = if can_sign { ServingStatus::Serving } else { ServingStatus::NotServing };
                    health.set_service_status(ActionCacheServer::<ActionCacheService>::NAME, status).await;
                    could_sign = can_sign;
                }
            }
        })
    }

    /// Asks a replica's bucket whether it answers, every [`PROBE_EVERY`]:
    /// while it does not, the write services (CAS, ByteStream) are
    /// NOT_SERVING on the health service; reads stay SERVING, since hits in
    /// the local cache are still served.
    fn spawn_store_probe(&self, replica: &Replica) -> tokio::task::JoinHandle<()> {
        use tonic::server::NamedService;
        let health = self.health.clone();
        crate::observe::store_health::spawn_probe(
            replica.store.clone(),
            replica.health.clone(),
            PROBE_EVERY,
            move |up| {
                let health = health.clone();
                Box::pin(async move {
                    let status = if up { ServingStatus::Serving } else { ServingStatus::NotServing };
                    for name in [
                        ContentAddressableStorageServer::<CasService>::NAME,
                        ByteStreamServer::<ByteStreamService>::NAME,
                    ] {
                        health.set_service_status(name, status).await;
                    }
                })
            },
        )
    }

    fn spawn_housekeeping(&self) -> tokio::task::JoinHandle<()> {
        let uploads = self.ctx.uploads.clone();
        let audit = self.ctx.audit.clone();
        let retention = self.history_retention;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                uploads.expire().await;
                if n % 60 == 0 {
                    let cutoff = std::time::SystemTime::now()
                        .checked_sub(retention)
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0);
                    match audit.purge(cutoff).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(records = n, "purged old Action Cache history and hit-log records"),
                        Err(e) => tracing::warn!(error = %e, "history purge failed"),
                    }
                }
                n += 1;
            }
        })
    }

    /// The store (for operator tools and tests).
    pub fn store(&self) -> &Arc<RocksStore> {
        &self.store
    }

    /// Serves gRPC over mutual TLS on `listener` until `shutdown` resolves,
    /// then shuts down gracefully ([`Cache::serve`]).
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let options =
            crate::access::accept::IncomingOptions::from_limits(&self.ctx.limits, Some(self.ctx.limit_hits.clone()));
        self.serve(crate::access::accept::tls_incoming_with(listener, tls, options), shutdown).await
    }

    /// Serves plaintext gRPC on `listener` until `shutdown` resolves, then
    /// shuts down gracefully ([`Cache::serve`]).
    pub async fn serve_plaintext(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let keepalive = self.ctx.limits.tcp_keepalive;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
            let conn = conn?;
            // Without this, replies larger than one segment wait for the
            // client's delayed ACK (40 ms).
            conn.set_nodelay(true)?;
            crate::access::accept::set_tcp_keepalive(&conn, keepalive)?;
            Ok::<_, std::io::Error>(conn)
        });
        self.serve(incoming, shutdown).await
    }

    /// Serves connections from `incoming` until `shutdown` resolves; SIGHUP
    /// reloads the policy, TLS and signing files at once. Then:
    /// health turns NOT_SERVING, the listener closes, every connection is told
    /// to finish (HTTP/2 GOAWAY) and calls in flight get up to the shutdown
    /// timeout to complete; calls still running after it are cut off (none of
    /// them was acknowledged). Last, storage is flushed.
    async fn serve<I, IO, IE>(self, incoming: I, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()>
    where
        I: futures::Stream<Item = Result<IO, IE>>,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        crate::access::reload::reload_on_sighup();
        let maintenance = self.spawn_maintenance();
        self.report_status(ServingStatus::Serving).await;
        let (drain, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = incoming.map(|conn| conn.map(crate::transport::coalesce::Coalesce::new));
        let server = self.router().serve_with_incoming_shutdown(incoming, async {
            let _ = drain_rx.await;
        });
        tokio::pin!(server);
        let result = tokio::select! {
            result = &mut server => result,
            _ = shutdown => {
                self.report_status(ServingStatus::NotServing).await;
                tracing::info!(
                    timeout = ?self.shutdown_timeout,
                    "shutting down: no new connections; draining calls in flight"
                );
                let _ = drain.send(());
                let started = std::time::Instant::now();
                match tokio::time::timeout(self.shutdown_timeout, &mut server).await {
                    Ok(result) => {
                        tracing::info!(elapsed = ?started.elapsed(), "every call in flight completed");
                        result
                    }
                    Err(_) => {
                        tracing::warn!(
                            timeout = ?self.shutdown_timeout,
                            "calls still in flight at the shutdown deadline are cut off"
                        );
                        Ok(())
                    }
                }
            }
        };
        maintenance.abort();
        self.close()?;
        tracing::info!("storage flushed");
        result?;
        Ok(())
    }

    /// Stops the metrics endpoint and flushes storage.
    pub fn close(&self) -> crate::error::Result<()> {
        if let Some(task) = self.metrics_task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        self.store.flush()
    }
}
