//! The `provcache` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use provcache::config::LogFormat;

mod cli;

/// A Remote Execution API v2 cache that signs where every cached result came from.
#[derive(Parser, Debug)]
#[command(name = "provcache", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the cache server.
    Serve(cli::serve::ServeArgs),
    /// Drive a running server with load and print throughput and latency.
    Bench(cli::bench::BenchArgs),
    /// Generate an ed25519 signing key and print its trust-policy entry.
    Keygen(cli::keys::KeygenArgs),
    /// Issue a development client certificate for an identity, signed by the dev CA.
    IssueCert(cli::keys::IssueCertArgs),
    /// Audit a build: check, with public keys alone, that every cache hit was signed by a trusted key.
    ///
    /// Exit status: 0 when every hit verifies, 1 on any finding, 2 when the audit could not run.
    VerifyBuild(cli::verify_build::VerifyBuildArgs),
    /// Write a consistent copy (a RocksDB checkpoint) of a stopped server's storage.
    ///
    /// Restore: stop the server, replace DATA_DIR/db with the copy, start it.
    /// Keys, certificates and policies (DATA_DIR/dev-pki, or your own files)
    /// are plain files: copy them alongside.
    Backup(BackupArgs),
}

#[derive(clap::Args, Debug)]
struct BackupArgs {
    /// The data directory of a server that is not running (its RocksDB is DATA_DIR/db).
    #[arg(long, env = "PROVCACHE_DATA_DIR", default_value = "provcache-data")]
    data_dir: PathBuf,
    /// Where to write the copy: a directory that must not exist yet. On the
    /// same filesystem, table files are hard links and the copy takes no
    /// extra space until compaction replaces them.
    dest: PathBuf,
}

/// Runs the command; a failure is one line on stderr, `error: ...`, and
/// the exit status docs/configuration.md documents (2: refused, 1: failed).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e));
            std::process::ExitCode::from(cli::exit_code(&e))
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = match &cli.command {
        Command::Serve(args) => {
            let settings = args.settings();
            provcache::observe::logging::init(settings.log_format, &settings.log_level);
            Some(settings)
        }
        _ => {
            provcache::observe::logging::init(LogFormat::Text, &std::env::var("RUST_LOG").unwrap_or_default());
            None
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => cli::serve::run(&args, settings.expect("resolved above"), &runtime),
        Command::Bench(args) => runtime.block_on(cli::bench::bench(args)),
        Command::Keygen(args) => cli::keys::keygen(args),
        Command::IssueCert(args) => cli::keys::issue_cert(args),
        Command::Backup(args) => backup(args),
        Command::VerifyBuild(args) => cli::verify_build::run(args, &runtime),
    }
}

fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let db = provcache::server::db_path(&args.data_dir);
    let refuse = |why: String| anyhow::Error::from(cli::Refused(why));
    if !db.is_dir() {
        return Err(refuse(format!(
            "--data-dir {} holds no provcache storage (no db/ directory)",
            args.data_dir.display()
        )));
    }
    if args.dest.exists() {
        return Err(refuse(format!("DEST {} exists already; name a new directory", args.dest.display())));
    }
    let store = provcache::store::rocks::RocksStore::open(&db, &provcache::store::rocks::StoreOptions::default())
        .map_err(|e| {
            let e = anyhow::Error::from(e);
            match cli::in_use(&e, &args.data_dir) {
                Some(in_use) => anyhow::anyhow!(
                    "{in_use}: stop it first (SIGTERM), or snapshot the filesystem (provcache recovers from a \
                     crash-consistent copy)"
                ),
                None => e.context(format!("opening {}", db.display())),
            }
        })?;
    store.checkpoint(&args.dest)?;
    let usage = store.usage();
    println!(
        "backup of {} written to {}: {} blobs ({} bytes), {} Action Cache entries",
        args.data_dir.display(),
        args.dest.display(),
        usage.blobs,
        usage.blob_bytes,
        usage.actions
    );
    println!("restore: stop the server, replace DATA_DIR/db with {}, start it", args.dest.display());
    Ok(())
}
