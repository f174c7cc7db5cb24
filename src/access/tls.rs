//! The TLS layer: a rustls server configuration that requires a client
//! certificate from a configured CA, its files reloaded without a restart,
//! for the acceptor in [`crate::access::accept`].
//!
//! - TLS 1.3 and 1.2 (Bazel 4.2.3 speaks only 1.2), ALPN `h2`, ring only.
//! - No client certificate, no connection: [`ClientVerifier`] refuses the
//!   handshake, and checks the `clientAuth` EKU and the CRLs.
//! - Session resumption is off, so every connection's certificate is verified
//!   against the CRLs current at its handshake.
//! - [`ClientVerifier`] re-reads the client CA and CRL files when they change
//!   (or on SIGHUP) and swaps the verifier used by new handshakes; the gate
//!   calls [`ClientVerifier::check_chain`] so an already-open connection's
//!   next call is refused too (threat T11). The server certificate and key
//!   are reloaded the same way ([`ServerCertFiles`]); a pair that does not
//!   load or match keeps the last good one ([`crate::access::reload`]).
//!
//! Accepting connections and running their handshakes is [`crate::access::accept`].

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::access::reload::{self, Source, Watched};

/// Default interval between checks of the TLS files (CRLs, client CAs, the
/// server certificate and key).
pub const DEFAULT_CRL_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// File extensions read from a CRL directory.
const CRL_EXTENSIONS: [&str; 3] = ["pem", "crl", "der"];

/// Where the TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// Server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Client CA certificates (PEM files; every certificate in them is a
    /// trust anchor for client certificates).
    pub client_ca: Vec<PathBuf>,
    /// CRLs: files (PEM or DER) or directories of `*.pem`, `*.crl`, `*.der`
    /// files. Replace files atomically (write, then rename).
    pub crls: Vec<PathBuf>,
    /// How often the TLS files (CRLs, client CAs, server certificate and
    /// key) are checked for changes; zero: only on SIGHUP.
    pub crl_reload_interval: Duration,
    /// Accept a client certificate whose revocation status no configured
    /// CRL covers. Off by default: once CRLs are configured, every CA in the
    /// chain must have one.
    pub allow_unknown_revocation_status: bool,
}

impl TlsSettings {
    /// Settings with the default reload interval and strict revocation.
    pub fn new(cert: PathBuf, key: PathBuf, client_ca: Vec<PathBuf>, crls: Vec<PathBuf>) -> Self {
        TlsSettings {
            cert,
            key,
            client_ca,
            crls,
            crl_reload_interval: DEFAULT_CRL_RELOAD_INTERVAL,
            allow_unknown_revocation_status: false,
        }
    }
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file does not contain what it should.
    #[error("{path}: {why}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No client CA was configured.
    #[error("no client CA configured: client certificates are required")]
    NoClientCa,
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration and the client verifier it uses.
#[derive(Clone)]
pub struct TlsServer {
    /// The rustls configuration (for [`tls_incoming`]).
    pub config: Arc<ServerConfig>,
    /// The client certificate verifier (for the gate's per-call checks).
    pub verifier: Arc<ClientVerifier>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer").field("verifier", &self.verifier).finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads the server certificate and key, the client CAs and the CRLs, and
    /// starts their reloaders (polling every `crl_reload_interval`, unless
    /// zero, and on SIGHUP). The reloaders stop when the configuration and
    /// the verifier are dropped.
    pub fn from_settings(settings: &TlsSettings) -> Result<Self, TlsError> {
        let verifier =
            ClientVerifier::new(&settings.client_ca, &settings.crls, settings.allow_unknown_revocation_status)?;
        let server_cert = Watched::load(ServerCertFiles { cert: settings.cert.clone(), key: settings.key.clone() })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(ServerCertResolver(server_cert.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // A resumed session skips certificate verification; with revocation
        // that matters more than the saved round trip.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        verifier.spawn_reloader(settings.crl_reload_interval);
        reload::spawn_poller(&server_cert, settings.crl_reload_interval);
        Ok(TlsServer { config: Arc::new(config), verifier })
    }
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::Read { path: path.to_owned(), source },
        other => TlsError::BadFile { path: path.to_owned(), why: other.to_string() },
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::BadFile { path: path.to_owned(), why: "no CERTIFICATE in the PEM file".into() });
    }
    Ok(certs)
}

/// The server certificate chain and key files (`--tls-cert`, `--tls-key`),
/// as a reloadable source: a key that does not match the certificate is
/// refused, so a half-renewed pair never reaches a handshake.
#[derive(Debug)]
pub struct ServerCertFiles {
    /// Certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

impl Source for ServerCertFiles {
    type Value = CertifiedKey;
    type Error = TlsError;
    const WHAT: &'static str = "tls_server_cert";

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone()]
    }

    fn load(&self) -> Result<CertifiedKey, TlsError> {
        let certs = load_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| pem_error(&self.key, e))?;
        CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::BadFile {
            path: self.key.clone(),
            why: format!("not a usable key for the certificate in {}: {e}", self.cert.display()),
        })
    }

    /// Where a newly loaded server certificate is installed.
    fn installed(&self, value: &CertifiedKey) {
        tracing::debug!(cert = %self.cert.display(), chain = value.cert.len(), "TLS server certificate installed");
        crate::observe::tls::set_server_expiry(crate::observe::tls::earliest_not_after(&value.cert));
    }
}

/// Gives every new handshake the server certificate in force.
#[derive(Debug)]
struct ServerCertResolver(Arc<Watched<ServerCertFiles>>);

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// The client CA files (`--client-ca`) and the CRLs (`--crl`), as one
/// reloadable source: each CRL is checked against the CAs it comes with.
#[derive(Debug)]
pub struct ClientTrust {
    /// Client CA certificates (PEM files).
    pub client_ca: Vec<PathBuf>,
    /// CRL files or directories.
    pub crls: Vec<PathBuf>,
    /// See [`TlsSettings::allow_unknown_revocation_status`].
    pub allow_unknown_revocation_status: bool,
}

/// What a [`ClientTrust`] loads: the WebPKI verifier and the CA names sent
/// to clients in the certificate request.
pub struct TrustAnchors {
    inner: Arc<dyn ClientCertVerifier>,
    hints: &'static [DistinguishedName],
    /// Client CA certificates loaded.
    pub cas: usize,
    /// CRLs loaded.
    pub crls: usize,
    /// The earliest expiry of the client CAs (Unix time), for the metrics.
    pub ca_not_after: Option<i64>,
    /// The earliest `nextUpdate` of the CRLs (Unix time), for the metrics.
    pub crl_next_update: Option<i64>,
}

impl Source for ClientTrust {
    type Value = TrustAnchors;
    type Error = TlsError;
    const WHAT: &'static str = "tls_client_ca";

    fn paths(&self) -> Vec<PathBuf> {
        self.client_ca.iter().chain(&self.crls).cloned().collect()
    }

    fn load(&self) -> Result<TrustAnchors, TlsError> {
        if self.client_ca.is_empty() {
            return Err(TlsError::NoClientCa);
        }
        let mut roots = RootCertStore::empty();
        let mut ca_not_after: Option<i64> = None;
        for path in &self.client_ca {
            let certs = load_certs(path)?;
            let earliest = crate::observe::tls::earliest_not_after(&certs);
            ca_not_after = ca_not_after.into_iter().chain(earliest).min();
            for cert in certs {
                roots.add(cert).map_err(|e| TlsError::BadFile {
                    path: path.clone(),
                    why: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        let roots = Arc::new(roots);
        let crls = read_crls(&self.crls, &roots)?;
        let (count, crl_next_update) = (crls.len(), crate::observe::tls::earliest_next_update(&crls));
        let inner = build_inner(&roots, crls, self.allow_unknown_revocation_status)?;
        let hints = lasting_hints(inner.root_hint_subjects());
        Ok(TrustAnchors { hints, inner, cas: roots.len(), crls: count, ca_not_after, crl_next_update })
    }

    /// Where a newly loaded client CA set (and its CRLs) is installed.
    fn installed(&self, value: &TrustAnchors) {
        tracing::debug!(cas = value.cas, crls = value.crls, "client CAs and CRLs installed");
        crate::observe::tls::set_client_trust_expiry(value.ca_not_after, value.crl_next_update);
    }
}

/// The CA names sent to clients must outlive every handshake that borrows
/// them (rustls lends them as `&self`-bound slices). Each distinct set is
/// kept for the life of the process: CA sets change a few times a year, and
/// a CRL reload reuses the set it already has.
fn lasting_hints(hints: &[DistinguishedName]) -> &'static [DistinguishedName] {
    static KEPT: Mutex<Vec<&'static [DistinguishedName]>> = Mutex::new(Vec::new());
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    let same_names = |k: &[DistinguishedName]| k.iter().map(|n| n.as_ref()).eq(hints.iter().map(|n| n.as_ref()));
    if let Some(same) = kept.iter().find(|k| same_names(k)) {
        return same;
    }
    let leaked: &'static [DistinguishedName] = Vec::leak(hints.to_vec());
    kept.push(leaked);
    leaked
}

/// The client certificate verifier: a WebPKI verifier (client CAs, clientAuth
/// EKU, CRLs) that is rebuilt and swapped when the CA or CRL files change.
pub struct ClientVerifier {
    trust: Arc<Watched<ClientTrust>>,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let anchors = self.trust.get();
        f.debug_struct("ClientVerifier")
            .field("cas", &anchors.cas)
            .field("crls", &anchors.crls)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl ClientVerifier {
    /// Builds the verifier from client CA files and CRL paths (files or
    /// directories). Any unreadable or malformed file is an error.
    pub fn new(
        client_ca: &[PathBuf],
        crl_paths: &[PathBuf],
        allow_unknown_revocation_status: bool,
    ) -> Result<Arc<Self>, TlsError> {
        let trust = Watched::load(ClientTrust {
            client_ca: client_ca.to_vec(),
            crls: crl_paths.to_vec(),
            allow_unknown_revocation_status,
        })?;
        Ok(Arc::new(ClientVerifier { trust }))
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        self.trust.get().inner.clone()
    }

    /// Increments each time new CAs or CRLs take effect.
    pub fn generation(&self) -> u64 {
        self.trust.generation()
    }

    /// The CA and CRL files, to point the verifier at other files.
    pub fn trust(&self) -> &Arc<Watched<ClientTrust>> {
        &self.trust
    }

    /// Re-reads the CAs and CRLs if any file changed (size, mtime, or the
    /// set of files). Returns whether new ones took effect. On error the
    /// previous ones stay in force and the next call tries again.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.trust.reload(false)
    }

    /// Starts a thread that reloads the CAs and CRLs when they change,
    /// checking every `interval` (zero: only on SIGHUP). It ends once the
    /// verifier is dropped.
    pub fn spawn_reloader(&self, interval: Duration) {
        reload::spawn_poller(&self.trust, interval);
    }

    /// Verifies a client chain (leaf first) as a new handshake would now:
    /// trust anchors, validity at `now`, clientAuth EKU and the current CRLs.
    pub fn check_chain(&self, chain: &[CertificateDer<'_>], now: SystemTime) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(rustls::Error::NoCertificatesPresented);
        };
        let now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        self.inner().verify_client_cert(leaf, intermediates, now).map(|_| ())
    }

    /// Whether the current CRLs revoke this leaf (issued directly by a
    /// configured client CA; for longer chains use
    /// [`check_chain`](Self::check_chain)). An expired leaf is reported as
    /// expired by `check_chain`, not as revoked here.
    pub fn is_revoked(&self, leaf: &CertificateDer<'_>) -> bool {
        matches!(
            self.check_chain(std::slice::from_ref(leaf), SystemTime::now()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked))
        )
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.trust.get().hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

fn build_inner(
    roots: &Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    allow_unknown: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).with_crls(crls);
    if allow_unknown {
        builder = builder.allow_unknown_revocation_status();
    }
    builder.build().map_err(|e| TlsError::Rustls(format!("client certificate verifier: {e}")))
}

/// The CRL files named by `paths`, directories expanded, sorted.
fn crl_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TlsError> {
    fn read_err(path: &Path) -> impl Fn(io::Error) -> TlsError + '_ {
        move |source| TlsError::Read { path: path.to_owned(), source }
    }
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(read_err(path))?;
        if !meta.is_dir() {
            files.push(path.clone());
            continue;
        }
        for entry in std::fs::read_dir(path).map_err(read_err(path))? {
            let file = entry.map_err(read_err(path))?.path();
            let hidden = file.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
            let known = file.extension().and_then(|e| e.to_str()).is_some_and(|e| CRL_EXTENSIONS.contains(&e));
            if !hidden && known && file.is_file() {
                files.push(file);
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads every CRL. Each file is parsed on its own so that an error names
/// the file.
fn read_crls(
    paths: &[PathBuf],
    roots: &Arc<RootCertStore>,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    for file in &crl_files(paths)? {
        let bad = |why: String| TlsError::BadFile { path: file.clone(), why };
        let bytes = std::fs::read(file).map_err(|source| TlsError::Read { path: file.clone(), source })?;
        let found = if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            let found = CertificateRevocationListDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(file, e))?;
            if found.is_empty() {
                return Err(bad("no X509 CRL in the PEM file".into()));
            }
            found
        } else {
            vec![CertificateRevocationListDer::from(bytes)]
        };
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(found.iter().cloned())
            .build()
            .map_err(|e| bad(format!("invalid CRL: {e}")))?;
        crls.extend(found);
    }
    Ok(crls)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicI64, Ordering};

    use futures::StreamExt;
    use rcgen::{ExtendedKeyUsagePurpose, KeyPair, SanType};
    use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ProtocolVersion, SupportedProtocolVersion};
    use time::OffsetDateTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;

    use futures::Stream;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::server::TlsStream;

    use super::*;
    use crate::access::accept::*;
    use crate::access::gate::{Gate, Peer, Permission};
    use crate::access::identity::tests::{client_params, uri, TestCa};
    use crate::access::identity::IdentityMode;
    use crate::access::policy::{MtlsGate, Policy};
    use crate::cache::resource::InstanceName;
    use crate::clock::{system_clock, Clock};
    use crate::proto::reapi;

    type Incoming = std::pin::Pin<Box<dyn Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send>>;

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    }

    /// A client certificate and key.
    struct Client {
        der: CertificateDer<'static>,
        key: KeyPair,
    }

    impl Client {
        fn new(ca: &TestCa, spiffe_id: &str) -> Self {
            let (der, key) = ca.sign(&client_params(vec![uri(spiffe_id)]));
            Client { der, key }
        }

        fn serial(&self) -> Vec<u8> {
            let (_, cert) = x509_parser::parse_x509_certificate(&self.der).unwrap();
            cert.raw_serial().to_vec()
        }

        fn peer(&self) -> Peer {
            Peer { certs: Some(Arc::new(vec![self.der.clone()])), ..Peer::default() }
        }
    }

    /// A server on 127.0.0.1:0 with a CA, a CRL directory and an acceptor.
    struct Fixture {
        dir: tempfile::TempDir,
        ca: TestCa,
        server: TlsServer,
        addr: std::net::SocketAddr,
        incoming: Incoming,
    }

    impl Fixture {
        async fn start(crl_reload_interval: Duration) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = TestCa::new("test client CA");
            let mut params = client_params(vec![SanType::IpAddress(Ipv4Addr::LOCALHOST.into())]);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let (server_der, server_key) = ca.sign(&params);
            let path = |name: &str| dir.path().join(name);
            std::fs::write(path("ca.pem"), pem("CERTIFICATE", &ca.der)).unwrap();
            std::fs::write(path("server.pem"), pem("CERTIFICATE", &server_der)).unwrap();
            std::fs::write(path("server.key"), server_key.serialize_pem()).unwrap();
            std::fs::create_dir(path("crls")).unwrap();
            let mut settings =
                TlsSettings::new(path("server.pem"), path("server.key"), vec![path("ca.pem")], vec![path("crls")]);
            settings.crl_reload_interval = crl_reload_interval;
            let server = TlsServer::from_settings(&settings).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let incoming = Box::pin(tls_incoming(listener, server.config.clone()));
            Fixture { dir, ca, server, addr, incoming }
        }

        fn client_config(
            &self,
            client: Option<&Client>,
            versions: &[&'static SupportedProtocolVersion],
        ) -> ClientConfig {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der.clone()).unwrap();
            let builder = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots);
            let mut config = match client {
                Some(c) => builder
                    .with_client_auth_cert(vec![c.der.clone()], PrivatePkcs8KeyDer::from(c.key.serialize_der()).into())
                    .unwrap(),
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![b"h2".to_vec()];
            config
        }

        /// Connects with `config`; Ok is the server side of an accepted
        /// connection, Err what the client saw of a refusal.
        async fn handshake(&mut self, config: ClientConfig) -> Result<TlsStream<TcpStream>, String> {
            let addr = self.addr;
            let client = tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
                let mut tls =
                    TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
                // In TLS 1.3 the server judges the client certificate after the
                // client finished: its verdict arrives as an alert on read.
                tls.write_all(b"x").await.map_err(|e| e.to_string())?;
                let mut buf = [0u8; 1];
                match tls.read(&mut buf).await {
                    Ok(_) => Err::<(), String>("connection closed".into()),
                    Err(e) => Err(e.to_string()),
                }
            });
            let result = tokio::select! {
                accepted = self.incoming.next() => Ok(accepted.expect("acceptor ended").expect("acceptor yields no errors")),
                refused = client => Err(refused.unwrap().unwrap_err()),
                _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("handshake neither accepted nor refused"),
            };
            result
        }

        fn write_crl(&self, name: &str, revoked: &[Vec<u8>], number: u64) {
            let path = self.dir.path().join("crls").join(name);
            crate::access::pki::write_crl(&self.ca.issuer, &path, revoked, number, Duration::from_secs(86400)).unwrap();
        }

        async fn wait_for_generation(&self, above: u64) {
            for _ in 0..250 {
                if self.server.verifier.generation() > above {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("CRLs were not reloaded");
        }

        fn gate(&self, clock: Clock) -> MtlsGate {
            let policy = Policy::parse(
                r#"
                [[rules]]
                name = "writers"
                principals = ["spiffe://provcache.dev/writer"]
                instances = ["*"]
                permissions = ["ac:read", "ac:write", "cas:read", "cas:write"]

                [[rules]]
                name = "readers"
                principals = ["spiffe://provcache.dev/reader"]
                instances = ["*"]
                permissions = ["ac:read", "cas:read"]
                "#,
            )
            .unwrap();
            MtlsGate::new(Arc::new(policy), IdentityMode::spiffe(["provcache.dev"]), self.server.verifier.clone())
                .with_clock(clock)
        }
    }

    const ALL: &[&SupportedProtocolVersion] = rustls::DEFAULT_VERSIONS;
    const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

    #[tokio::test]
    async fn good_client_certificate_is_accepted_with_tls13_and_tls12() {
        let mut fx = Fixture::start(Duration::ZERO).await;
        let writer = Client::new(&fx.ca, "spiffe://provcache.dev/writer");

        let tls = fx.handshake(fx.client_config(Some(&writer), ALL)).await.unwrap();
        let conn = tls.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(conn.peer_certificates().unwrap()[0], writer.der);

        // Bazel 4.2.3 speaks TLS 1.2 only.
        let tls = fx.handshake(fx.client_config(Some(&writer), TLS12)).await.unwrap();
        let conn = tls.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_2));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert!(tls.get_ref().0.nodelay().unwrap(), "TCP_NODELAY is set");
    }

    #[tokio::test]
    async fn missing_or_foreign_client_certificate_is_refused() {
        let mut fx = Fixture::start(Duration::ZERO).await;
        for versions in [ALL, TLS12] {
            let err = fx.handshake(fx.client_config(None, versions)).await.unwrap_err();
            assert!(err.contains("CertificateRequired") || err.contains("HandshakeFailure"), "{err}");

            let other_ca = TestCa::new("another CA");
            let stranger = Client::new(&other_ca, "spiffe://provcache.dev/writer");
            let err = fx.handshake(fx.client_config(Some(&stranger), versions)).await.unwrap_err();
            assert!(err.contains("UnknownCA") || err.contains("BadCertificate"), "{err}");
        }
        // The acceptor is still serving after the failures.
        let writer = Client::new(&fx.ca, "spiffe://provcache.dev/writer");
        fx.handshake(fx.client_config(Some(&writer), ALL)).await.unwrap();
    }

    #[tokio::test]
    async fn slow_and_broken_handshakes_do_not_block_others() {
        let mut fx = Fixture::start(Duration::ZERO).await;
        // Connections that never finish (silent) or send garbage.
        let _silent: Vec<TcpStream> = futures::future::join_all((0..4).map(|_| TcpStream::connect(fx.addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut garbage = TcpStream::connect(fx.addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

        let writer = Client::new(&fx.ca, "spiffe://provcache.dev/writer");
        let started = std::time::Instant::now();
        fx.handshake(fx.client_config(Some(&writer), ALL)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn crl_update_refuses_new_handshakes_and_open_connections() {
        let mut fx = Fixture::start(Duration::from_millis(50)).await;
        let writer = Client::new(&fx.ca, "spiffe://provcache.dev/writer");
        let reader = Client::new(&fx.ca, "spiffe://provcache.dev/reader");
        let gate = fx.gate(system_clock());
        let main = InstanceName::parse("main").unwrap();

        // An open connection, and its first call.
        let open = fx.handshake(fx.client_config(Some(&writer), ALL)).await.unwrap();
        let open_peer =
            Peer { certs: Some(Arc::new(open.get_ref().1.peer_certificates().unwrap().to_vec())), ..Peer::default() };
        let caller = gate.authorize(&open_peer, &main, Permission::AcWrite).unwrap();
        assert_eq!(caller.principal, "spiffe://provcache.dev/writer");
        assert_eq!(caller.rule, "writers");
        assert!(!fx.server.verifier.is_revoked(&writer.der));

        // Revoke the writer.
        let generation = fx.server.verifier.generation();
        fx.write_crl("ca.crl.pem", &[writer.serial()], 1);
        fx.wait_for_generation(generation).await;

        assert!(fx.server.verifier.is_revoked(&writer.der));
        assert!(!fx.server.verifier.is_revoked(&reader.der));
        let err = fx.handshake(fx.client_config(Some(&writer), TLS12)).await.unwrap_err();
        assert!(err.contains("CertificateRevoked") || err.contains("BadCertificate"), "{err}");
        fx.handshake(fx.client_config(Some(&writer), ALL)).await.unwrap_err();
        // The open connection's next call is refused as well.
        let err = gate.authorize(&open_peer, &main, Permission::AcRead).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert!(err.to_string().contains("Revoked"), "{err}");
        // Others are unaffected.
        fx.handshake(fx.client_config(Some(&reader), TLS12)).await.unwrap();
        assert!(gate.authorize(&reader.peer(), &main, Permission::AcRead).is_ok());

        // A broken CRL file does not lift the revocation.
        let generation = fx.server.verifier.generation();
        std::fs::write(fx.dir.path().join("crls/broken.crl"), b"not a CRL").unwrap();
        assert!(matches!(fx.server.verifier.reload_if_changed(), Err(TlsError::BadFile { .. })));
        assert_eq!(fx.server.verifier.generation(), generation);
        assert!(fx.server.verifier.is_revoked(&writer.der));
        std::fs::remove_file(fx.dir.path().join("crls/broken.crl")).unwrap();

        // A new CRL without the writer lets it back in.
        fx.write_crl("ca.crl.pem", &[], 2);
        fx.wait_for_generation(generation).await;
        assert!(!fx.server.verifier.is_revoked(&writer.der));
        fx.handshake(fx.client_config(Some(&writer), ALL)).await.unwrap();
        assert!(gate.authorize(&open_peer, &main, Permission::AcRead).is_ok());
    }

    #[tokio::test]
    async fn gate_rechecks_expiry_against_its_clock() {
        let fx = Fixture::start(Duration::ZERO).await;
        let mut params = client_params(vec![uri("spiffe://provcache.dev/writer")]);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(3600);
        let (der, key) = fx.ca.sign(&params);
        let writer = Client { der, key };

        let offset = Arc::new(AtomicI64::new(0));
        let clock: Clock = {
            let offset = offset.clone();
            Arc::new(move || {
                let o = offset.load(Ordering::SeqCst);
                SystemTime::now() + Duration::from_secs(o.unsigned_abs())
            })
        };
        let gate = fx.gate(clock);
        let main = InstanceName::default();
        let caller = gate.authorize(&writer.peer(), &main, Permission::AcWrite).unwrap();
        let cert = caller.cert.unwrap();
        assert_eq!(cert.not_after, SystemTime::from(params.not_after.replace_nanosecond(0).unwrap()));

        // Two hours later the same connection's next call is refused.
        offset.store(7200, Ordering::SeqCst);
        let err = gate.authorize(&writer.peer(), &main, Permission::AcRead).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn gate_separates_unauthenticated_from_permission_denied() {
        let fx = Fixture::start(Duration::ZERO).await;
        let gate = fx.gate(system_clock());
        let main = InstanceName::parse("main").unwrap();

        let err = gate.authorize(&Peer::default(), &main, Permission::AcRead).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.to_string().contains("no client certificate"), "{err}");

        let reader = Client::new(&fx.ca, "spiffe://provcache.dev/reader");
        assert_eq!(gate.authorize(&reader.peer(), &main, Permission::CasRead).unwrap().rule, "readers");
        assert!(gate.allows(&reader.peer(), &main, Permission::AcRead));
        assert!(!gate.allows(&reader.peer(), &main, Permission::AcWrite));
        let err = gate.authorize(&reader.peer(), &main, Permission::AcWrite).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let msg = err.to_string();
        assert!(
            msg.contains("spiffe://provcache.dev/reader") && msg.contains("ac:write") && msg.contains("main"),
            "{msg}"
        );

        // A certificate that names nobody (no URI SAN) is not authenticated.
        let (der, _) = fx.ca.sign(&client_params(vec![]));
        let peer = Peer { certs: Some(Arc::new(vec![der])), ..Peer::default() };
        let err = gate.authorize(&peer, &main, Permission::AcRead).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.to_string().contains("URI SAN"), "{err}");

        // A certificate from another CA handed to the gate directly is refused too.
        let stranger = Client::new(&TestCa::new("another CA"), "spiffe://provcache.dev/writer");
        let err = gate.authorize(&stranger.peer(), &main, Permission::AcRead).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    /// The GetCapabilities shape of a service: gate on ac:read, report
    /// whether the caller may write.
    struct Caps(Arc<MtlsGate>);

    #[tonic::async_trait]
    impl reapi::capabilities_server::Capabilities for Caps {
        async fn get_capabilities(
            &self,
            request: tonic::Request<reapi::GetCapabilitiesRequest>,
        ) -> Result<tonic::Response<reapi::ServerCapabilities>, tonic::Status> {
            let peer = Peer::of(&request);
            let instance = InstanceName::parse(&request.get_ref().instance_name).map_err(crate::error::Error::from)?;
            self.0.authorize(&peer, &instance, Permission::AcRead)?;
            let update_enabled = self.0.allows(&peer, &instance, Permission::AcWrite);
            Ok(tonic::Response::new(reapi::ServerCapabilities {
                cache_capabilities: Some(reapi::CacheCapabilities {
                    action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities { update_enabled }),
                    ..Default::default()
                }),
                ..Default::default()
            }))
        }
    }

    #[tokio::test]
    async fn tonic_serves_over_tls_incoming_and_sees_the_client_certificate() {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server};

        let mut fx = Fixture::start(Duration::ZERO).await;
        let gate = Arc::new(fx.gate(system_clock()));
        let incoming = std::mem::replace(&mut fx.incoming, Box::pin(futures::stream::empty()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(reapi::capabilities_server::CapabilitiesServer::new(Caps(gate)))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );

        let ca_pem = std::fs::read_to_string(fx.dir.path().join("ca.pem")).unwrap();
        let call = |client: Option<&Client>| {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem));
            if let Some(c) = client {
                tls = tls.identity(Identity::from_pem(pem("CERTIFICATE", &c.der), c.key.serialize_pem()));
            }
            let endpoint = Endpoint::from_shared(format!("https://{}", fx.addr)).unwrap().tls_config(tls).unwrap();
            async move {
                let channel = endpoint.connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let request = reapi::GetCapabilitiesRequest { instance_name: "main".into() };
                let caps = reapi::capabilities_client::CapabilitiesClient::new(channel)
                    .get_capabilities(request)
                    .await?
                    .into_inner();
                Ok::<bool, tonic::Status>(
                    caps.cache_capabilities.unwrap().action_cache_update_capabilities.unwrap().update_enabled,
                )
            }
        };

        let writer = Client::new(&fx.ca, "spiffe://provcache.dev/writer");
        let reader = Client::new(&fx.ca, "spiffe://provcache.dev/reader");
        let nobody = Client::new(&fx.ca, "spiffe://provcache.dev/nobody");
        assert!(call(Some(&writer)).await.unwrap());
        assert!(!call(Some(&reader)).await.unwrap());
        let denied = call(Some(&nobody)).await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");
        assert!(denied.message().contains("spiffe://provcache.dev/nobody"), "{denied}");
        let anonymous = call(None).await.unwrap_err();
        assert_ne!(anonymous.code(), tonic::Code::Ok);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("ca");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, pem("CERTIFICATE", &ca.der)).unwrap();

        assert!(matches!(ClientVerifier::new(&[], &[], false), Err(TlsError::NoClientCa)));
        let missing = dir.path().join("missing.crl");
        let err = ClientVerifier::new(std::slice::from_ref(&ca_path), &[missing], false).unwrap_err();
        assert!(err.to_string().contains("missing.crl"), "{err}");
        let garbage = dir.path().join("garbage.crl");
        std::fs::write(&garbage, b"\x30\x03\x02\x01\x01").unwrap();
        let err = ClientVerifier::new(std::slice::from_ref(&ca_path), &[garbage], false).unwrap_err();
        assert!(err.to_string().contains("garbage.crl"), "{err}");
        let not_a_ca = dir.path().join("empty.pem");
        std::fs::write(&not_a_ca, "").unwrap();
        let err = ClientVerifier::new(&[not_a_ca], &[], false).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }
}
