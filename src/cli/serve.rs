//! `provcache serve`: starts the server a [`Plan`] describes, or, with
//! `--check-config`, checks and describes that plan without creating anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use provcache::access::gate::SharedGate;
use provcache::access::identity::IdentityMode;
use provcache::access::pki::{ensure_dev_pki, ensure_dev_signing, DevClient, DevPki};
use provcache::access::policy::{MtlsGate, PlaintextGate, Policy};
use provcache::access::proxy::TrustedProxies;
use provcache::access::tls::TlsServer;
use provcache::config::{load_policy, resolve, tls_server, Access, Pki, Plan, ServeConfig, Settings, Signing};
use provcache::server::{Cache, ServerOptions};
use provcache::store::object::client::{self, ObjectStoreSettings};

/// `serve --check-config`: prints what the already validated `plan` would
/// create or use and the effective settings (paths, no key material).
fn check_config(settings: &Settings, plan: &Plan, file: Option<&Path>) -> anyhow::Result<()> {
    let notes = plan.check()?;
    match file {
        Some(f) => println!("# configuration file: {}", f.display()),
        None => println!("# no configuration file"),
    }
    notes.iter().for_each(|n| println!("# {n}"));
    plan.warnings().iter().for_each(|w| println!("# warning: {w}"));
    println!("# effective settings:\n{}", settings.to_toml());
    println!("configuration OK");
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
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

impl ServeArgs {
    /// The complete settings: flags and `PROVCACHE_*` variables over
    /// `RUST_LOG` (the log filter) over the file over the defaults. A
    /// configuration that cannot be used ends the process (status 2).
    pub fn settings(&self) -> Settings {
        let rust_log = std::env::var("RUST_LOG").ok();
        let loaded = self.config.as_deref().map(ServeConfig::load).transpose();
        loaded.and_then(|file| resolve(self.settings.clone(), rust_log, file)).unwrap_or_else(|e| config_failed(e))
    }
}

/// Serves, or with `--check-config` checks and prints the configuration.
/// Both refuse a configuration the plan cannot use the same way: its
/// message, status 2, before anything is created or bound.
pub fn run(args: &ServeArgs, settings: Settings, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let plan = Plan::new(&settings).unwrap_or_else(|e| config_failed(super::one_line(&e)));
    if args.check_config {
        check_config(&settings, &plan, args.config.as_deref()).unwrap_or_else(|e| config_failed(super::one_line(&e)));
        return Ok(());
    }
    runtime.block_on(serve(plan))
}

/// A configuration that cannot be used: its message, exit status 2.
fn config_failed(e: impl std::fmt::Display) -> ! {
    eprintln!("provcache serve: {e}");
    std::process::exit(2)
}

/// The bound listeners of a starting server.
struct Listeners {
    grpc: TcpListener,
    metrics: Option<TcpListener>,
}

/// `serve`: creates the development key and PKI where the plan uses them,
/// binds the listeners and serves until SIGTERM or Ctrl-C.
async fn serve(plan: Plan) -> anyhow::Result<()> {
    let (signing_key, trust_policy) = signing_files(&plan.provenance.signing)?;
    let options = plan.server_options(signing_key, trust_policy);
    plan.warnings().into_iter().for_each(|w| tracing::warn!("{w}"));
    let grpc = TcpListener::bind(plan.listen).await.with_context(|| format!("listening on {}", plan.listen))?;
    let metrics = match plan.metrics_listen {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("metrics: listening on {a}"))?),
        None => None,
    };
    if let Some(settings) = &plan.storage.object_store {
        check_object_store(settings).await?;
    }
    let listeners = Listeners { grpc, metrics };
    match plan.access {
        Access::Plaintext { principal, policy, .. } => serve_plaintext(&options, listeners, principal, policy).await,
        Access::Mtls { pki, identity, proxies } => serve_mtls(&options, listeners, pki, identity, proxies).await,
    }
}

/// Refuses to start, with one clear message, when the object store does not
/// answer (missing bucket, refused credentials, unreachable endpoint).
async fn check_object_store(settings: &ObjectStoreSettings) -> anyhow::Result<()> {
    let store = client::connect(settings)?;
    client::check_bucket(&store, settings).await?;
    tracing::info!("object store {}", settings.describe());
    Ok(())
}

/// The signing key and trust policy files, the development ones created when missing.
fn signing_files(signing: &Signing) -> anyhow::Result<(PathBuf, PathBuf)> {
    match signing {
        Signing::Own { key, trust_policy, .. } => Ok((key.clone(), trust_policy.clone())),
        Signing::Development { dir } => ensure_dev_signing(dir).context("creating the development signing key"),
    }
}

async fn serve_plaintext(
    options: &ServerOptions,
    listeners: Listeners,
    principal: String,
    policy: Policy,
) -> anyhow::Result<()> {
    let cache = open(options, Arc::new(PlaintextGate::new(Arc::new(policy), principal)))?;
    tracing::warn!("serving PLAINTEXT gRPC without TLS; use only behind a trusted proxy");
    start_metrics(&cache, listeners.metrics)?;
    let addr = listeners.grpc.local_addr()?;
    println!("provcache listening on grpc://{addr}");
    println!("Bazel flags: --remote_cache=grpc://{addr}");
    cache.serve_plaintext(listeners.grpc, shutdown_signal()).await
}

async fn serve_mtls(
    options: &ServerOptions,
    listeners: Listeners,
    pki: Pki,
    identity: IdentityMode,
    proxies: TrustedProxies,
) -> anyhow::Result<()> {
    if identity == IdentityMode::CommonName {
        tracing::warn!("identities come from the subject common name (--identity common-name)");
    }
    let (tls, policy, dev) = match pki {
        Pki::Own { tls, policy } => (tls, policy, None),
        Pki::Development { dir, crls, crl_reload_interval, policy } => {
            let pki = ensure_dev_pki(&dir).context("creating the development PKI")?;
            let mut settings = pki.tls_settings();
            settings.crls = crls;
            settings.crl_reload_interval = crl_reload_interval;
            let policy = match policy {
                Some(policy) => policy,
                None => load_policy(&pki.policy)?,
            };
            (tls_server(&settings)?, policy, Some(pki))
        }
    };
    let TlsServer { config, verifier } = tls;
    let gate = MtlsGate::new(Arc::new(policy), identity, verifier).with_trusted_proxies(proxies);
    let cache = open(options, Arc::new(gate))?;
    start_metrics(&cache, listeners.metrics)?;
    let addr = listeners.grpc.local_addr()?;
    println!("provcache listening on grpcs://{addr}");
    if let Some(pki) = &dev {
        print_dev_flags(pki, addr.port());
    }
    cache.serve_tls(listeners.grpc, config, shutdown_signal()).await
}

/// Opens the data directory; errors name it, and one held by another
/// server says so once, with what to do.
fn open(options: &ServerOptions, gate: SharedGate) -> anyhow::Result<Cache> {
    let dir = &options.data_dir;
    Cache::open(options, gate).map_err(|e| match super::in_use(&e, dir) {
        Some(in_use) => anyhow::anyhow!("{in_use}: stop that server, or give this one its own --data-dir"),
        None => e.context(format!("opening the data directory {}", dir.display())),
    })
}

fn start_metrics(cache: &Cache, listener: Option<TcpListener>) -> anyhow::Result<()> {
    if let Some(l) = listener {
        println!("provcache metrics on http://{}/metrics", l.local_addr()?);
        cache.serve_metrics(l)?;
    }
    Ok(())
}

/// How to point Bazel at a server using the development PKI.
fn print_dev_flags(pki: &DevPki, port: u16) {
    println!("Development PKI: {}", pki.dir.display());
    println!("Bazel flags for a CI writer (read and write):");
    println!("  {}", pki.bazel_flags(DevClient::Writer, port));
    println!("Bazel flags for a developer (read only):");
    println!("  {}", pki.bazel_flags(DevClient::Reader, port));
}

/// Resolves on SIGTERM or Ctrl-C. The server first polls it once it serves
/// (stores open, listener bound), which is when systemd hears `READY=1`.
async fn shutdown_signal() {
    provcache::observe::notify::ready();
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
    provcache::observe::notify::stopping();
}
