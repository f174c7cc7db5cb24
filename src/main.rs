//! The `provcache` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use provcache::auth::AllowAll;
use provcache::server::{Cache, ServerOptions};
use provcache::store::StoreOptions;

/// A Remote Execution API v2 cache that signs where every cached result came from.
#[derive(Parser, Debug)]
#[command(name = "provcache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the cache server.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Data directory: RocksDB in DIR/db, the development PKI in DIR/dev-pki.
    #[arg(long, env = "PROVCACHE_DATA_DIR", default_value = "provcache-data")]
    data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "PROVCACHE_LISTEN", default_value = "127.0.0.1:8980")]
    listen: SocketAddr,
    /// Serve plaintext gRPC with no authentication (only behind a trusted proxy).
    #[arg(long)]
    plaintext_insecure: bool,
    /// Do not fsync commits (benchmarks only: an acknowledged write can be lost on a crash).
    #[arg(long, hide = true)]
    unsafe_no_sync: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let options = ServerOptions {
        data_dir: args.data_dir.clone(),
        store: StoreOptions { sync: !args.unsafe_no_sync, ..Default::default() },
    };
    let cache = Cache::open(&options, Arc::new(AllowAll))
        .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::warn!("serving PLAINTEXT gRPC without authentication; use only behind a trusted proxy");
    println!("provcache listening on grpc://{addr}");
    println!("Bazel flags: --remote_cache=grpc://{addr}");
    cache.serve_plaintext(listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: draining calls and flushing storage");
}
