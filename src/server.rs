//! Wires storage → domain → services → transport.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpListener;

use crate::action_cache::ActionCache;
use crate::auth::SharedGate;
use crate::cas::Cas;
use crate::proto::bytestream::byte_stream_server::ByteStreamServer;
use crate::proto::reapi::action_cache_server::ActionCacheServer;
use crate::proto::reapi::capabilities_server::CapabilitiesServer;
use crate::proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use crate::proto::reapi::execution_server::ExecutionServer;
use crate::service::action_cache::ActionCacheService;
use crate::service::bytestream::ByteStreamService;
use crate::service::capabilities::CapabilitiesService;
use crate::service::cas::CasService;
use crate::service::execution::ExecutionService;
use crate::service::Context;
use crate::store::{Store, StoreOptions};
use crate::upload::{Uploads, UPLOAD_IDLE_TIMEOUT};

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
}

/// An opened cache, ready to serve.
#[derive(Debug)]
pub struct Cache {
    ctx: Context,
    store: Arc<Store>,
}

/// The RocksDB directory inside a data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

impl Cache {
    /// Opens the store and builds the domain.
    pub fn open(options: &ServerOptions, gate: SharedGate) -> crate::error::Result<Self> {
        let store = Arc::new(Store::open(&db_path(&options.data_dir), &options.store)?);
        let cas = Arc::new(Cas::new(store.clone()));
        let ac = Arc::new(ActionCache::new(cas.clone()));
        let ctx = Context { gate, cas, ac, uploads: Arc::new(Uploads::default()) };
        Ok(Cache { ctx, store })
    }

    /// The shared service context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The tonic router with every service.
    pub fn router(&self) -> tonic::transport::server::Router {
        let ctx = self.ctx.clone();
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
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
            .add_service(ExecutionServer::new(ExecutionService))
    }

    /// Starts background maintenance (expiry of abandoned uploads).
    pub fn spawn_maintenance(&self) -> tokio::task::JoinHandle<()> {
        let uploads = self.ctx.uploads.clone();
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                uploads.expire(&store, UPLOAD_IDLE_TIMEOUT).await;
            }
        })
    }

    /// Serves plaintext gRPC on `listener` until `shutdown` resolves, then
    /// flushes storage.
    pub async fn serve_plaintext(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let maintenance = self.spawn_maintenance();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
            let conn = conn?;
            // Without this, replies larger than one segment wait for the
            // client's delayed ACK (40 ms).
            conn.set_nodelay(true)?;
            Ok::<_, std::io::Error>(conn)
        });
        let result = self.router().serve_with_incoming_shutdown(incoming, shutdown).await;
        maintenance.abort();
        self.close()?;
        result?;
        Ok(())
    }

    /// Flushes storage.
    pub fn close(&self) -> crate::error::Result<()> {
        self.store.flush()
    }
}
