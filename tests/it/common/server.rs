//! A real server running in this test process on 127.0.0.1:0, with direct
//! access to its store and provenance counters (for tampering at rest and
//! reading what the server counted).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use provcache::access::gate::{AllowAll, SharedGate};
use provcache::server::{Cache, ServerOptions};
use provcache::store::rocks::{RocksStore, StoreOptions};
use tonic::transport::Channel;

use super::certs::{tls_channel, CertFiles};
use super::clients::Clients;

/// How to start a [`TestServer`].
#[derive(Default, Clone)]
pub struct TestOptions {
    /// Serve mutual TLS with the dev PKI (otherwise plaintext with `gate`).
    pub tls: bool,
    /// Authorization policy text for the TLS server (default: the dev policy).
    pub policy: Option<String>,
    /// CRL files the TLS server watches.
    pub crls: Vec<std::path::PathBuf>,
    /// The gate of a plaintext server (default: allow all).
    pub gate: Option<SharedGate>,
    /// Reject (default) or flag.
    pub mode: provcache::provenance::Mode,
    /// Injected clock.
    pub clock: Option<provcache::clock::Clock>,
    /// Signing key and trust policy paths (default: the dev ones).
    pub signing_key: Option<std::path::PathBuf>,
    /// See `signing_key`.
    pub trust_policy: Option<std::path::PathBuf>,
    /// `--max-size`.
    pub max_size: Option<u64>,
    /// How often a record's recency may be refreshed (default: the server's).
    pub touch_interval: Option<std::time::Duration>,
    /// Serve metrics on a second listener ([`TestServer::metrics_addr`]).
    pub metrics: bool,
    /// Limits (default: the server's defaults).
    pub limits: Option<provcache::limits::Limits>,
}

/// A server running in this process on a real socket.
pub struct TestServer {
    /// The gRPC listener.
    pub addr: std::net::SocketAddr,
    /// The metrics endpoint, when started with `metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The data directory, with the dev PKI in `dev-pki/`.
    pub dir: tempfile::TempDir,
    pub store: Arc<RocksStore>,
    /// The server's signer and verifier: its counters and trust policy.
    pub provenance: Arc<provcache::provenance::Provenance>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A plaintext server that allows every call.
    pub async fn start() -> Self {
        Self::start_with(Arc::new(AllowAll)).await
    }

    /// A plaintext server behind `gate`.
    pub async fn start_with(gate: SharedGate) -> Self {
        Self::start_opts(TestOptions { gate: Some(gate), ..Default::default() }).await
    }

    /// Starts a server; with `tls` set, over mutual TLS with the dev PKI
    /// created in `DIR/dev-pki` and `policy` (default: the dev policy).
    pub async fn start_opts(opts: TestOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev-pki");
        let (signing_key, trust_policy) = provcache::access::pki::ensure_dev_signing(&dev).unwrap();
        let options = ServerOptions {
            data_dir: dir.path().to_path_buf(),
            store: StoreOptions {
                sync: false,
                max_size: opts.max_size,
                touch_interval: opts.touch_interval.unwrap_or(StoreOptions::default().touch_interval),
                ..Default::default()
            },
            provenance: provcache::provenance::ProvenanceConfig {
                signing_key: opts.signing_key.unwrap_or(signing_key),
                trust_policy: opts.trust_policy.unwrap_or(trust_policy),
                mode: opts.mode,
                server_id: "test".into(),
                verification_disabled: false,
                signing_disabled: false,
            },
            history_retention: std::time::Duration::from_secs(3600),
            metrics: opts.metrics,
            access_log: false,
            shutdown_timeout: std::time::Duration::from_secs(10),
            limits: opts.limits.clone().unwrap_or_default(),
            object_store: None,
        };
        let clock = opts.clock.clone().unwrap_or_else(|| Arc::new(std::time::SystemTime::now));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = opts.metrics.then(|| metrics_listener.local_addr().unwrap());
        let start_metrics = |cache: &Cache| {
            if opts.metrics {
                cache.serve_metrics(metrics_listener).unwrap();
            }
        };
        let (store, provenance, task) = if opts.tls {
            let pki = provcache::access::pki::ensure_dev_pki(&dev).unwrap();
            let mut settings = pki.tls_settings();
            settings.crls = opts.crls.clone();
            settings.crl_reload_interval = std::time::Duration::from_millis(200);
            let tls = provcache::access::tls::TlsServer::from_settings(&settings).unwrap();
            let policy = match &opts.policy {
                Some(text) => provcache::access::policy::Policy::parse(text).unwrap(),
                None => provcache::access::policy::Policy::load(&pki.policy).unwrap(),
            };
            let gate = provcache::access::policy::MtlsGate::new(
                Arc::new(policy),
                provcache::access::identity::IdentityMode::spiffe(["provcache.dev"]),
                tls.verifier.clone(),
            )
            .with_clock(clock.clone());
            let cache = Cache::open_with_clock(&options, Arc::new(gate), clock).unwrap();
            start_metrics(&cache);
            let store = cache.store().clone();
            let provenance = cache.context().provenance.clone();
            (store, provenance, tokio::spawn(cache.serve_tls(listener, tls.config.clone(), shutdown)))
        } else {
            let gate = opts.gate.unwrap_or_else(|| Arc::new(AllowAll));
            let cache = Cache::open_with_clock(&options, gate, clock).unwrap();
            start_metrics(&cache);
            let store = cache.store().clone();
            let provenance = cache.context().provenance.clone();
            (store, provenance, tokio::spawn(cache.serve_plaintext(listener, shutdown)))
        };
        TestServer { addr, metrics_addr, dir, store, provenance, shutdown: Some(tx), task: Some(task) }
    }

    /// The dev PKI directory of this server.
    pub fn pki_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("dev-pki")
    }

    /// An mTLS channel with a client certificate, or without one. The
    /// handshake's failure is returned: some tests are about it.
    pub async fn tls_channel(&self, identity: Option<&CertFiles>) -> Result<Channel, tonic::transport::Error> {
        tls_channel(self.addr, &self.pki_dir(), identity).await
    }

    /// An mTLS channel as one of the dev PKI's clients (writer, reader, auditor).
    pub async fn dev_channel(&self, name: &str) -> Channel {
        self.tls_channel(Some(&CertFiles::dev(&self.pki_dir(), name))).await.unwrap()
    }

    /// Clients authenticated as one of the dev PKI's clients (writer, reader, auditor).
    pub async fn dev_clients(&self, name: &str) -> Clients {
        Clients::new(self.dev_channel(name).await)
    }

    /// A new certificate from the dev CA for `principal` (a SPIFFE URI the
    /// dev PKI does not have), valid for an hour, kept in the server's
    /// directory.
    pub fn issue_cert(&self, principal: &str) -> CertFiles {
        static ISSUED: AtomicUsize = AtomicUsize::new(0);
        let dir: PathBuf = self.dir.path().join("issued");
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!("{}-{}", principal.rsplit('/').next().unwrap(), ISSUED.fetch_add(1, Ordering::Relaxed));
        CertFiles::issue(&self.pki_dir(), principal, &dir.join(name))
    }

    /// An mTLS channel as `principal`, with a newly issued certificate.
    pub async fn channel_as(&self, principal: &str) -> Channel {
        self.tls_channel(Some(&self.issue_cert(principal))).await.unwrap()
    }

    /// A plaintext channel (to a server started without `tls`).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// Clients on a new plaintext channel.
    pub async fn clients(&self) -> Clients {
        Clients::new(self.channel().await)
    }

    /// Shuts the server down and asserts it ended without an error.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}
