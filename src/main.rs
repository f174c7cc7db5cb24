//! The `provcache` command line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use provcache::config::{IdentityArg, LogFormat, ServeConfig, Settings, VerifyModeArg};
use provcache::provenance::{Mode, ProvenanceConfig};
use provcache::server::{Cache, ServerOptions};
use provcache::store::StoreOptions;

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
    Serve(ServeArgs),
    /// Drive a running server with load and print throughput and latency.
    Bench(BenchArgs),
    /// Generate an ed25519 signing key and print its trust-policy entry.
    Keygen(KeygenArgs),
    /// Issue a development client certificate for an identity, signed by the dev CA.
    IssueCert(IssueCertArgs),
    /// Audit a build: check, with public keys alone, that every cache hit was signed by a trusted key.
    ///
    /// Exit status: 0 when every hit verifies, 1 on any finding, 2 when the audit could not run.
    VerifyBuild(VerifyBuildArgs),
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

#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Scenarios to run, in order: ac-hit, ac-update, find-missing, write, read, big-write, big-read.
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
    /// Instead of the scenarios: store one Action Cache entry through the
    /// real write path and write a gRPC-framed GetActionResultRequest for it
    /// to FILE (a request body for `h2load -d FILE`).
    #[arg(long, value_name = "FILE")]
    write_request: Option<PathBuf>,
    /// Run each scenario alone and then again while an attacker loop runs:
    /// inline-names, directory-amplification, half-uploads, ranged-reads.
    #[arg(long, value_name = "KIND")]
    attacker: Option<String>,
    /// Attacker loops for --attacker.
    #[arg(long, default_value_t = 2)]
    attackers: usize,
    /// The server's process id: --attacker then reports its memory (Linux).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// The attacker's own client certificate (same CA as --ca), so that its
    /// share of per-identity limits is not the honest client's.
    #[arg(long, requires = "attacker_key")]
    attacker_cert: Option<PathBuf>,
    /// The key of --attacker-cert.
    #[arg(long, requires = "attacker_cert")]
    attacker_key: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Configuration file (TOML, docs/configuration.md). Flags and PROVCACHE_*
    /// environment variables override its settings.
    #[arg(long, env = "PROVCACHE_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration (file, policies, TLS files, signing key, trust
    /// policy), print the effective settings and exit: 0 if valid.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    settings: ServeConfig,
}

#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// Where to write the private key (PKCS#8 PEM, mode 0600; never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// The key's name in the trust policy.
    #[arg(long, default_value = "signing-key")]
    name: String,
    /// Validity of the printed trust-policy entry.
    #[arg(long, default_value = "180d", value_parser = humantime::parse_duration)]
    valid_for: std::time::Duration,
}

/// How a client command reaches the server.
#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// Server URL: grpcs://HOST:PORT (or grpc:// behind a trusted proxy).
    #[arg(long, default_value = "grpcs://127.0.0.1:8980")]
    server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Instance name (for verify-build: of exec-log hits missing from the server's hit log).
    #[arg(long, default_value = "")]
    instance: String,
}

impl ClientArgs {
    fn target(self) -> anyhow::Result<provcache::tools::client::Target> {
        let tls = match (self.ca, self.cert, self.key) {
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            (None, None, None) => None,
            _ => anyhow::bail!("--ca, --cert and --key go together"),
        };
        Ok(provcache::tools::client::Target { url: self.server, tls, instance: self.instance })
    }
}

#[derive(clap::Args, Debug)]
struct VerifyBuildArgs {
    /// The server and an auditor certificate (audit:read and cas:read).
    #[command(flatten)]
    client: ClientArgs,
    /// Trust policy (TOML) with the public keys to trust; the server's verdicts are not trusted.
    #[arg(long)]
    policy: PathBuf,
    /// The build's invocation id (Bazel --invocation_id; the BEP's started.uuid).
    #[arg(long)]
    invocation: Option<String>,
    /// Bazel's --execution_log_json_file of the build: its remote cache hits must match signed results.
    #[arg(long)]
    exec_log: Option<PathBuf>,
    /// Download and re-hash every referenced blob and the Action.
    #[arg(long)]
    deep: bool,
    /// Audit only the hits of this reader principal (e.g. the CI runner's SPIFFE ID); the hit log's
    /// chain is still checked in full. Use it when another identity injected lookups under the id.
    #[arg(long, value_name = "PRINCIPAL")]
    reader: Option<String>,
    /// Print the stable JSON document of docs/audit.md instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct IssueCertArgs {
    /// Directory of the development CA (ca.pem and ca.key), e.g. provcache-data/dev-pki.
    #[arg(long, default_value = "provcache-data/dev-pki")]
    ca_dir: PathBuf,
    /// The identity: a SPIFFE ID such as spiffe://provcache.dev/ci-runner-7.
    #[arg(long)]
    principal: String,
    /// Output prefix: writes PREFIX.pem and PREFIX.key (PKCS#8 EC P-256).
    #[arg(long)]
    out: PathBuf,
    /// Validity.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    valid_for: std::time::Duration,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = match &cli.command {
        Command::Serve(args) => {
            let rust_log = std::env::var("RUST_LOG").ok();
            let loaded = args.config.as_deref().map(ServeConfig::load).transpose();
            let settings = loaded
                .and_then(|file| provcache::config::resolve(args.settings.clone(), rust_log, file))
                .unwrap_or_else(|e| config_failed(e));
            init_logging(settings.log_format, &settings.log_level);
            Some(settings)
        }
        _ => {
            init_logging(LogFormat::Text, &std::env::var("RUST_LOG").unwrap_or_default());
            None
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve(args) => {
            let settings = settings.expect("resolved above");
            if args.check_config {
                check_config(&settings, args.config.as_deref()).unwrap_or_else(|e| config_failed(format!("{e:#}")));
                return Ok(());
            }
            runtime.block_on(serve(settings))
        }
        Command::Bench(args) => runtime.block_on(bench(args)),
        Command::Keygen(args) => keygen(args),
        Command::IssueCert(args) => issue_cert(args),
        Command::Backup(args) => backup(args),
        Command::VerifyBuild(args) => {
            let json = args.json;
            match runtime.block_on(verify_build(args)) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&provcache::tools::verify_build::to_json(&report))?
                        );
                    } else {
                        print!("{}", provcache::tools::verify_build::to_text(&report));
                    }
                    std::process::exit(report.exit_code());
                }
                Err(e) => {
                    let empty = e.downcast_ref::<provcache::tools::verify_build::NothingToAudit>().is_some();
                    if json {
                        let doc = provcache::tools::verify_build::error_json(empty, &format!("{e:#}"));
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    }
                    if empty {
                        eprintln!("verify-build: {e:#}");
                    } else {
                        eprintln!("verify-build: the audit could not run: {e:#}");
                    }
                    std::process::exit(2);
                }
            }
        }
    }
}

fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let db = provcache::server::db_path(&args.data_dir);
    anyhow::ensure!(db.is_dir(), "{} holds no provcache storage (no db/ directory)", args.data_dir.display());
    anyhow::ensure!(!args.dest.exists(), "{} exists already; name a new directory", args.dest.display());
    let store = provcache::store::Store::open(&db, &provcache::store::StoreOptions::default()).map_err(|e| {
        if e.to_string().contains("lock") {
            anyhow::anyhow!(
                "{} is in use by a running server: stop it first (SIGTERM), or snapshot the \
                 filesystem (provcache recovers from a crash-consistent copy)",
                args.data_dir.display()
            )
        } else {
            anyhow::anyhow!("opening {}: {e}", db.display())
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

/// A configuration that cannot be used: its message, exit status 2.
fn config_failed(e: impl std::fmt::Display) -> ! {
    eprintln!("provcache serve: {e}");
    std::process::exit(2)
}

/// Logs to stderr: text or JSON (with the request span's fields), filtered
/// by `filter` (RUST_LOG syntax; empty or invalid: info).
fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .ok()
        .filter(|_| !filter.trim().is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// `serve --check-config`: everything `serve` would load, without binding
/// or creating anything; prints the effective settings (paths, no key material).
fn check_config(s: &Settings, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use provcache::access::policy::Policy;
    let dev_dir = s.data_dir.join("dev-pki");
    let mut notes = Vec::new();
    let policy = match (&s.policy, s.plaintext_insecure, &s.tls_cert) {
        (Some(p), _, _) => Some(p.clone()),
        (None, true, _) => None,
        (None, false, Some(_)) => anyhow::bail!("policy (--policy) is required with your own PKI"),
        (None, false, None) => {
            let p = dev_dir.join("policy.toml");
            if p.exists() {
                Some(p)
            } else {
                notes.push(format!("the development PKI will be created in {}", dev_dir.display()));
                None
            }
        }
    };
    if let Some(p) = &policy {
        Policy::load(p).with_context(|| format!("authorization policy {}", p.display()))?;
    }
    if let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) {
        let mut t =
            provcache::access::tls::TlsSettings::new(cert.clone(), key.clone(), s.client_ca.clone(), s.crl.clone());
        t.crl_reload_interval = s.crl_reload_interval;
        provcache::access::tls::TlsServer::from_settings(&t).context("TLS settings")?;
    }
    if s.identity == IdentityArg::UriSan && s.trust_domain.is_empty() && s.tls_cert.is_some() && !s.plaintext_insecure {
        anyhow::bail!("identity uri-san needs at least one trust_domain (--trust-domain)");
    }
    if let (Some(key), Some(trust)) = (&s.signing_key, &s.trust_policy) {
        let k = provcache::provenance::signing::SigningKey::load(key)
            .with_context(|| format!("signing key {}", key.display()))?;
        provcache::provenance::trust::TrustPolicy::load(trust)
            .with_context(|| format!("trust policy {}", trust.display()))?;
        notes.push(format!("signing key id {}", k.key_id()));
    } else {
        notes.push(format!("the development signing key and trust policy in {}", dev_dir.display()));
    }
    match file {
        Some(f) => println!("# configuration file: {}", f.display()),
        None => println!("# no configuration file"),
    }
    notes.iter().for_each(|n| println!("# {n}"));
    println!("# effective settings:\n{}", s.to_toml());
    println!("configuration OK");
    Ok(())
}

async fn verify_build(args: VerifyBuildArgs) -> anyhow::Result<provcache::tools::verify_build::Report> {
    let opts = provcache::tools::verify_build::Options {
        target: args.client.target()?,
        policy: args.policy,
        invocation: args.invocation,
        exec_log: args.exec_log,
        deep: args.deep,
        reader: args.reader,
    };
    provcache::tools::verify_build::run(&opts).await
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(duration) = args.soak {
        return soak(&args, duration).await;
    }
    let target = args.client.target()?;
    let mut attacker_target = target.clone();
    if let (Some((ca, _, _)), Some(cert), Some(key)) = (&target.tls, &args.attacker_cert, &args.attacker_key) {
        attacker_target.tls = Some((ca.clone(), cert.clone(), key.clone()));
    }
    if let Some(path) = &args.write_request {
        return provcache::tools::bench::write_get_request(&target, path).await;
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
    };
    for scenario in &args.scenario {
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

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let key = provcache::provenance::signing::SigningKey::generate()?;
    key.write_pem(&args.out)?;
    let now = std::time::SystemTime::now();
    let entry = provcache::provenance::trust::render_key_entry(
        &args.name,
        &key.verifying_key(),
        provcache::provenance::trust::KeyState::Active,
        now,
        now + args.valid_for,
    );
    println!("wrote {}", args.out.display());
    println!("key id: {}", key.key_id());
    println!("\n# Add to the trust policy (every server and auditor):\n{entry}");
    Ok(())
}

fn issue_cert(args: IssueCertArgs) -> anyhow::Result<()> {
    let issued = provcache::access::pki::issue_client_cert(&args.ca_dir, &args.principal, &args.out, args.valid_for)?;
    println!("wrote {} and {}", issued.cert.display(), issued.key.display());
    Ok(())
}

async fn serve(args: Settings) -> anyhow::Result<()> {
    use provcache::access::identity::IdentityMode;
    use provcache::access::pki::{ensure_dev_pki, ensure_dev_signing, DevClient};
    use provcache::access::policy::{MtlsGate, PlaintextGate, Policy};

    let dev_dir = args.data_dir.join("dev-pki");
    let (signing_key, trust_policy) = match (&args.signing_key, &args.trust_policy) {
        (Some(k), Some(p)) => (k.clone(), p.clone()),
        _ => ensure_dev_signing(&dev_dir).context("creating the development signing key")?,
    };
    let options = ServerOptions {
        data_dir: args.data_dir.clone(),
        store: StoreOptions {
            sync: !args.unsafe_no_sync,
            max_size: args.max_size,
            block_cache_bytes: usize::try_from(args.block_cache).unwrap_or(usize::MAX),
            ..Default::default()
        },
        provenance: ProvenanceConfig {
            signing_key,
            trust_policy,
            mode: match args.verify_mode {
                VerifyModeArg::Reject => Mode::Reject,
                VerifyModeArg::Flag => Mode::Flag,
            },
            server_id: args.server_id.clone(),
            verification_disabled: args.unsafe_no_verify,
            signing_disabled: args.unsafe_no_sign,
        },
        history_retention: args.history_retention,
        metrics: args.metrics_listen.is_some(),
        shutdown_timeout: args.shutdown_timeout,
        limits: args.limits.clone(),
    };
    if args.unsafe_no_sign {
        tracing::warn!("signing of Action Cache entries is OFF (--unsafe-no-sign): for measurements only");
    }
    if args.unsafe_no_verify {
        tracing::warn!("verification of Action Cache reads is OFF (--unsafe-no-verify): for measurements only");
    }
    if matches!(args.verify_mode, VerifyModeArg::Flag) {
        tracing::warn!("flag mode: results that fail verification are SERVED, marked with a VerificationStatus");
    }
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match args.metrics_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("metrics: listening on {a}"))?),
        None => None,
    };
    let start_metrics = |cache: &Cache| -> anyhow::Result<()> {
        if let Some(l) = metrics_listener {
            println!("provcache metrics on http://{}/metrics", l.local_addr()?);
            cache.serve_metrics(l)?;
        }
        Ok(())
    };

    if args.plaintext_insecure {
        let policy = match &args.policy {
            Some(p) => Policy::load(p).with_context(|| format!("authorization policy {}", p.display()))?,
            None => Policy::parse(&format!(
                "[[rules]]\nname = \"plaintext-all\"\nprincipals = [{:?}]\ninstances = [\"*\"]\n\
                 permissions = [\"ac:read\", \"ac:write\", \"cas:read\", \"cas:write\", \"audit:read\"]\n",
                args.plaintext_principal
            ))?,
        };
        let gate = Arc::new(PlaintextGate::new(Arc::new(policy), args.plaintext_principal.clone()));
        let cache = Cache::open(&options, gate)
            .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
        tracing::warn!("serving PLAINTEXT gRPC without TLS; use only behind a trusted proxy");
        start_metrics(&cache)?;
        println!("provcache listening on grpc://{addr}");
        println!("Bazel flags: --remote_cache=grpc://{addr}");
        return cache.serve_plaintext(listener, shutdown_signal()).await;
    }

    let (settings, policy_path, dev) = match &args.tls_cert {
        Some(cert) => {
            let mut s = provcache::access::tls::TlsSettings::new(
                cert.clone(),
                args.tls_key.clone().context("--tls-key is required with --tls-cert")?,
                args.client_ca.clone(),
                args.crl.clone(),
            );
            s.crl_reload_interval = args.crl_reload_interval;
            let policy = args.policy.clone().context("--policy is required with your own PKI")?;
            (s, policy, None)
        }
        None => {
            let pki = ensure_dev_pki(&dev_dir).context("creating the development PKI")?;
            let mut s = pki.tls_settings();
            s.crls = args.crl.clone();
            s.crl_reload_interval = args.crl_reload_interval;
            let policy = args.policy.clone().unwrap_or_else(|| pki.policy.clone());
            (s, policy, Some(pki))
        }
    };
    let policy =
        Policy::load(&policy_path).with_context(|| format!("authorization policy {}", policy_path.display()))?;
    let mode = match args.identity {
        IdentityArg::UriSan => {
            let domains = if args.trust_domain.is_empty() && dev.is_some() {
                vec![provcache::access::pki::DEV_TRUST_DOMAIN.to_string()]
            } else {
                args.trust_domain.clone()
            };
            anyhow::ensure!(!domains.is_empty(), "--identity uri-san needs at least one --trust-domain");
            IdentityMode::spiffe(domains)
        }
        IdentityArg::DnsSan => IdentityMode::DnsSan,
        IdentityArg::CommonName => {
            tracing::warn!("identities come from the subject common name (--identity common-name)");
            IdentityMode::CommonName
        }
    };
    let tls = provcache::access::tls::TlsServer::from_settings(&settings)?;
    let gate = Arc::new(MtlsGate::new(Arc::new(policy), mode, tls.verifier.clone()));
    let cache = Cache::open(&options, gate)
        .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
    start_metrics(&cache)?;
    println!("provcache listening on grpcs://{addr}");
    if let Some(pki) = &dev {
        println!("Development PKI: {}", pki.dir.display());
        println!("Bazel flags for a CI writer (read and write):");
        println!("  {}", pki.bazel_flags(DevClient::Writer, addr.port()));
        println!("Bazel flags for a developer (read only):");
        println!("  {}", pki.bazel_flags(DevClient::Reader, addr.port()));
    }
    cache.serve_tls(listener, tls.config.clone(), shutdown_signal()).await
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
}
