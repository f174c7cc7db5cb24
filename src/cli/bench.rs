//! `provcache bench`: load scenarios, attacks and the crash soak against a server.

use std::path::PathBuf;

use anyhow::Context as _;

use super::ClientArgs;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Scenarios to run, in order: ac-hit, ac-update, find-missing, write,
    /// read, big-write, big-read; and, with --store, the object store's raw
    /// speed beneath a replica: raw-store-write, raw-store-read.
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
    /// ac-hit reads only the first N of the --keys entries it stored (a hot
    /// working set inside a larger Action Cache); default: all of them.
    #[arg(long, value_name = "N")]
    working_set: Option<usize>,
    /// Wait this long between storing the --keys entries and the timed part
    /// (lets the server's background compaction of a large prefill finish).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    settle: std::time::Duration,
    /// Blob size for write, read and big-write (e.g. 1MiB, 1GiB).
    #[arg(long, default_value = "1MiB", value_parser = provcache::units::parse_size)]
    size: u64,
    /// ByteStream message size for writes (Bazel sends 16KiB).
    #[arg(long, default_value = "16KiB", value_parser = provcache::units::parse_size)]
    chunk: u64,
    /// Crash-soak for this long instead of the scenarios: start a server on
    /// 127.0.0.1 (this binary), mixed load, kill -9 + restart every
    /// --kill-every, invariant checks; exits 1 on any violation.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<std::time::Duration>,
    /// Mean time between two kill -9s in a soak (each interval 0.5x-1.5x).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    kill_every: std::time::Duration,
    /// The soak's data directory (default: a fresh one under the temp
    /// directory, deleted after a clean soak).
    #[arg(long)]
    soak_dir: Option<PathBuf>,
    /// After this many bytes of acknowledged blobs, soak uploads stay small.
    #[arg(long, default_value = "4GiB", value_parser = provcache::units::parse_size)]
    soak_budget: u64,
    /// Instead of the scenarios: write one gRPC-framed request of the first
    /// --scenario (ac-hit, ac-update, find-missing or read of --size) to FILE,
    /// storing what it needs through the real write path first, and print
    /// its gRPC method path (a request body for `h2load -d FILE`).
    #[arg(long, value_name = "FILE")]
    write_request: Option<PathBuf>,
    /// Run each scenario alone and then again while an attacker loop runs:
    /// inline-names, directory-amplification, half-uploads, ranged-reads.
    #[arg(long, value_name = "KIND")]
    attacker: Option<String>,
    /// Attacker loops for --attacker.
    #[arg(long, default_value_t = 2)]
    attackers: usize,
    /// The server's process id: each scenario then reports the server's CPU
    /// per call, and --attacker its memory (Linux).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// A directory on the server's data file system (its --data-dir):
    /// big-write then also measures the synced sequential write speed there
    /// and prints G6, the big write's speed over min(SHA-256, disk).
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// The object store (s3://BUCKET/PREFIX; endpoint and credentials from
    /// the AWS_* variables) whose raw speed the raw-store-* scenarios
    /// measure, with the client library and part sizes a replica uses.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The attacker's own client certificate (same CA as --ca), so that its
    /// share of per-identity limits is not the honest client's.
    #[arg(long, requires = "attacker_key")]
    attacker_cert: Option<PathBuf>,
    /// The key of --attacker-cert.
    #[arg(long, requires = "attacker_cert")]
    attacker_key: Option<PathBuf>,
}

/// Runs the scenarios in order (or, with `--soak`, the crash soak; with
/// `--write-request`, only writes a request body) and prints each report.
pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(duration) = args.soak {
        return soak(&args, duration).await;
    }
    let target = args.client.target()?;
    for (flag, path) in [("--attacker-cert", &args.attacker_cert), ("--attacker-key", &args.attacker_key)] {
        path.as_deref().map(|p| super::readable(flag, p)).transpose()?;
    }
    if let Some(path) = &args.write_request {
        super::in_existing_dir("--write-request", path)?;
    }
    let mut attacker_target = target.clone();
    if let (Some((ca, _, _)), Some(cert), Some(key)) = (&target.tls, &args.attacker_cert, &args.attacker_key) {
        attacker_target.tls = Some((ca.clone(), cert.clone(), key.clone()));
    }
    if let Some(path) = &args.write_request {
        let kind = args.scenario.first().map(String::as_str).unwrap_or_default();
        let method = provcache::tools::bench_request::write_request(&target, kind, args.size as usize, path).await?;
        println!("{method}");
        return Ok(());
    }
    let params = provcache::tools::bench::Params {
        concurrency: args.concurrency,
        duration: args.duration,
        keys: args.keys,
        working_set: args.working_set,
        settle: args.settle,
        size: args.size as usize,
        chunk: args.chunk as usize,
        connections: args.connections,
        server_pid: args.server_pid,
        disk_dir: args.disk_dir.clone(),
    };
    for scenario in &args.scenario {
        if let Some(kind) = scenario.strip_prefix("raw-store-") {
            println!("{}", raw_store(args.store.as_deref(), kind, args.size as usize).await?);
            continue;
        }
        if let Some(kind) = &args.attacker {
            let attacker = provcache::tools::bench::Attacker { target: &attacker_target, kind, loops: args.attackers };
            provcache::tools::bench::run_under_attack(&target, scenario, &params, &attacker, args.server_pid).await?;
            continue;
        }
        let report = provcache::tools::bench::run(&target, scenario, &params).await?;
        println!("{report}");
    }
    Ok(())
}

/// The object store's raw speed beneath a replica (`raw-store-write`,
/// `raw-store-read`), for the store named by `--store`.
async fn raw_store(url: Option<&str>, kind: &str, size: usize) -> anyhow::Result<provcache::tools::bench::Report> {
    use provcache::store::object::client::{self, ObjectStoreSettings};
    let url = url.context("the raw-store-* scenarios need --store s3://BUCKET/PREFIX")?;
    let store = client::connect(&ObjectStoreSettings::parse(url)?)?;
    provcache::tools::bench_object::run(&store, kind, size).await
}

async fn soak(args: &BenchArgs, duration: std::time::Duration) -> anyhow::Result<()> {
    let default_dir = args.soak_dir.is_none();
    let params = provcache::tools::soak::SoakParams {
        duration,
        kill_every: args.kill_every,
        concurrency: args.concurrency,
        data_dir: args.soak_dir.clone().unwrap_or_else(provcache::tools::soak::default_data_dir),
        exe: std::env::current_exe().context("finding this provcache binary")?,
        byte_budget: args.soak_budget,
    };
    println!("soak: {duration:?}, kill -9 every ~{:?}, data in {}", args.kill_every, params.data_dir.display());
    let report = provcache::tools::soak::run(&params).await?;
    println!("{report}");
    if report.violations > 0 {
        println!("soak: data and server log kept in {}", params.data_dir.display());
        std::process::exit(1);
    }
    if default_dir && provcache::tools::soak::is_soak_dir(&params.data_dir) {
        let _ = std::fs::remove_dir_all(&params.data_dir);
        let _ = std::fs::remove_file(params.data_dir.with_extension("server.log"));
    }
    Ok(())
}
