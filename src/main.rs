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
    /// Drive a running server with load and print throughput and latency.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Server URL: grpc://HOST:PORT or grpcs://HOST:PORT.
    #[arg(long, default_value = "grpc://127.0.0.1:8980")]
    server: String,
    /// CA certificate (PEM) that signed the server's certificate (grpcs://).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) (grpcs://).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (PEM) (grpcs://).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Instance name.
    #[arg(long, default_value = "")]
    instance: String,
    /// Scenarios to run, in order: ac-hit, ac-update, find-missing, write, read, big-write.
    #[arg(long, value_delimiter = ',', default_value = "ac-hit,find-missing,write,read")]
    scenario: Vec<String>,
    /// Concurrent request loops.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections to spread the loops over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Timed duration of each scenario (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Action Cache working set (keys stored through the real write path first).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Blob size for write, read and big-write (e.g. 1MiB, 1GiB).
    #[arg(long, default_value = "1MiB", value_parser = provcache::units::parse_size)]
    size: u64,
    /// ByteStream message size for writes (Bazel sends 16KiB).
    #[arg(long, default_value = "16KiB", value_parser = provcache::units::parse_size)]
    chunk: u64,
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
        Command::Bench(args) => runtime.block_on(bench(args)),
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let tls = match (args.ca, args.cert, args.key) {
        (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
        (None, None, None) => None,
        _ => anyhow::bail!("--ca, --cert and --key go together"),
    };
    let target = provcache::bench::Target { url: args.server, tls, instance: args.instance };
    let params = provcache::bench::Params {
        concurrency: args.concurrency,
        duration: args.duration,
        keys: args.keys,
        size: args.size as usize,
        chunk: args.chunk as usize,
        connections: args.connections,
    };
    for scenario in &args.scenario {
        let report = provcache::bench::run(&target, scenario, &params).await?;
        println!("{report}");
    }
    Ok(())
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
