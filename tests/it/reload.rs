//! Reloading without a restart (docs/operations.md, "Reloading"): the real
//! binary with its own PKI, real mTLS clients, files rewritten under it and
//! SIGHUP. Each test waits for the server's visible behaviour to change,
//! never for a fixed time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use provcache::access::pki::{ensure_dev_pki, ensure_dev_signing, DevPki};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::Code;

use crate::common::*;

const WRITER: &str = "spiffe://provcache.dev/writer";
/// How long a reload may take to show before the test fails.
const WITHIN: Duration = Duration::from_secs(30);

/// A policy granting the reader `cas:read`, and the writer too when `writer`.
fn policy(writer: bool) -> String {
    let mut text = "[[rules]]\nname = \"readers\"\nprincipals = [\"spiffe://provcache.dev/reader\"]\n\
                    instances = [\"*\"]\npermissions = [\"cas:read\"]\n"
        .to_string();
    if writer {
        text.push_str(&format!(
            "[[rules]]\nname = \"writers\"\nprincipals = [\"{WRITER}\"]\ninstances = [\"*\"]\npermissions = [\"cas:read\"]\n"
        ));
    }
    text
}

/// A server with its own PKI (the dev PKI's files, passed as an operator
/// passes theirs), its own policy file and a client CA bundle of its own.
struct Deployment {
    dir: tempfile::TempDir,
    pki: DevPki,
    authz: PathBuf,
    client_cas: PathBuf,
    metrics: SocketAddr,
    server: ServerProcess,
}

impl Deployment {
    fn start(policy_text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(&dir.path().join("pki")).unwrap();
        let (key, trust) = ensure_dev_signing(&dir.path().join("signing")).unwrap();
        let authz = dir.path().join("authz.toml");
        std::fs::write(&authz, policy_text).unwrap();
        let client_cas = dir.path().join("client-cas.pem");
        std::fs::copy(&pki.ca_cert, &client_cas).unwrap();
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let server = ServerProcess::start([
            "--tls-cert".into(),
            path(&pki.server_cert),
            "--tls-key".into(),
            path(&pki.server_key),
            "--client-ca".into(),
            path(&client_cas),
            "--authz-policy".into(),
            path(&authz),
            "--trust-domain".into(),
            "provcache.dev".into(),
            "--signing-key".into(),
            path(&key),
            "--trust-policy".into(),
            path(&trust),
            "--metrics-listen".into(),
            metrics.to_string(),
        ]);
        Deployment { dir, pki, authz, client_cas, metrics, server }
    }

    /// Clients on a new mTLS connection as `identity`, or the handshake's failure.
    async fn connect(&self, identity: &CertFiles) -> Result<Clients, String> {
        let channel = tls_channel(self.server.addr(), &self.pki.dir, Some(identity)).await;
        channel.map(Clients::new).map_err(|e| format!("{e:?}"))
    }

    /// A FindMissingBlobs call on a new connection as `identity`: with TLS
    /// 1.3 a refused client certificate fails the first call, not the
    /// connect. The error is the client's whole error chain.
    async fn call(&self, identity: &CertFiles) -> Result<(), String> {
        let mut clients = self.connect(identity).await?;
        clients.find_missing("", &[sha(b"call")]).await.map(drop).map_err(|status| {
            let mut chain = format!("{status}");
            let mut source = std::error::Error::source(&status);
            while let Some(s) = source {
                chain.push_str(&format!(" <- {s}"));
                source = s.source();
            }
            chain
        })
    }

    async fn connect_as(&self, name: &str) -> Clients {
        self.connect(&CertFiles::dev(&self.pki.dir, name)).await.unwrap()
    }

    /// Handshakes the server refused for an unknown client CA, as it reports them.
    async fn unknown_ca_refusals(&self) -> u64 {
        let (_, body) = http_get(self.metrics, "/metrics").await;
        let series = "provcache_tls_handshake_failures_total{reason=\"unknown_ca\"} ";
        body.lines().find_map(|l| l.strip_prefix(series)).map_or(0, |n| n.trim().parse().unwrap())
    }

    /// `provcache_reloads_total{what, result}` as the server reports it.
    async fn reloads(&self, what: &str, result: &str) -> u64 {
        let (_, body) = http_get(self.metrics, "/metrics").await;
        let series = format!("provcache_reloads_total{{what=\"{what}\",result=\"{result}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// SIGHUP, then waits until `what`'s `result` count exceeds `before`.
    async fn hangup_until_counted(&self, what: &str, result: &str, before: u64) {
        self.server.signal("HUP");
        let deadline = Instant::now() + WITHIN;
        while self.reloads(what, result).await <= before {
            assert!(Instant::now() < deadline, "no {what} reload counted {result} within {WITHIN:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leaf certificate the server presents to a new connection.
    async fn served_certificate(&self) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&self.pki.ca_cert).unwrap()).unwrap();
        let writer = CertFiles::dev(&self.pki.dir, "writer");
        let chain = vec![CertificateDer::from_pem_file(&writer.cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&writer.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.server.addr()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
    }
}

/// A port free now, for the metrics listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes `contents` to a new file beside `path` and renames it over `path`,
/// as the docs tell operators to.
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A new server certificate from the dev CA for the same names, and its key.
fn renewed_server_cert(pki: &DevPki) -> (String, KeyPair) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.distinguished_name.push(DnType::CommonName, "provcache server (renewed)");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.is_ca = IsCa::ExplicitNoCa;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, &dev_ca(&pki.dir)).unwrap();
    (cert.pem(), key)
}

/// A CA the server does not trust yet: its certificate (PEM) and issuer.
fn new_ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "second client CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

#[tokio::test]
async fn a_caller_the_policy_refuses_is_allowed_once_the_file_allows_it_and_a_broken_file_keeps_the_policy() {
    let d = Deployment::start(&policy(false));
    let mut writer = d.connect_as("writer").await;
    let blob = [sha(b"reload")];
    let refused = writer.find_missing("", &blob).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");

    // The file now allows the writer: the same connection's next call is
    // allowed, without a restart.
    let ok = d.reloads("authz_policy", "ok").await;
    replace(&d.authz, policy(true).as_bytes());
    d.hangup_until_counted("authz_policy", "ok", ok).await;
    writer.find_missing("", &blob).await.unwrap();
    d.connect_as("writer").await.find_missing("", &blob).await.unwrap();

    // A broken file is refused, logged and counted; the policy in force stays.
    let refused = d.reloads("authz_policy", "refused").await;
    replace(&d.authz, b"[[rules]]\nname = \"half a rule\"\n");
    d.hangup_until_counted("authz_policy", "refused", refused).await;
    writer.find_missing("", &blob).await.unwrap();
    d.connect_as("writer").await.find_missing("", &blob).await.unwrap();
    let log = d.server.log();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("authz_policy") && l.contains("authz.toml")), "{log}");
    assert_eq!(d.reloads("authz_policy", "ok").await, ok + 1, "the broken file was not installed");
}

#[tokio::test]
async fn a_renewed_server_certificate_is_served_to_new_connections_and_a_key_that_does_not_match_is_refused() {
    let d = Deployment::start(&policy(true));
    let original = d.served_certificate().await;
    let mut open = d.connect_as("writer").await;
    open.find_missing("", &[sha(b"before")]).await.unwrap();

    // Renew: new key, then new certificate, each renamed into place.
    let (cert, key) = renewed_server_cert(&d.pki);
    let ok = d.reloads("tls_server_cert", "ok").await;
    replace(&d.pki.server_key, key.serialize_pem().as_bytes());
    replace(&d.pki.server_cert, cert.as_bytes());
    d.hangup_until_counted("tls_server_cert", "ok", ok).await;
    let renewed = d.served_certificate().await;
    assert_ne!(renewed, original);
    assert_eq!(renewed, CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(), "the renewed certificate");
    open.find_missing("", &[sha(b"after")]).await.expect("an open connection keeps working");

    // A key that does not match the certificate: refused, the pair in force stays.
    let refused = d.reloads("tls_server_cert", "refused").await;
    let stranger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    replace(&d.pki.server_key, stranger.serialize_pem().as_bytes());
    d.hangup_until_counted("tls_server_cert", "refused", refused).await;
    assert_eq!(d.served_certificate().await, renewed);
    d.connect_as("writer").await.find_missing("", &[sha(b"still")]).await.unwrap();
    let log = d.server.log();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("server.key") && l.contains("server.pem")), "{log}");
}

#[tokio::test]
async fn a_client_ca_added_to_the_bundle_is_trusted_by_new_handshakes_without_a_restart() {
    let d = Deployment::start(&policy(true));
    let (ca_pem, ca) = new_ca();
    let issued = CertFiles::sign(&ca, &client_params("writer", vec![uri(WRITER)]), d.dir.path(), "second-ca-writer");
    let refused = d.unknown_ca_refusals().await;
    d.call(&issued).await.expect_err("a CA the server does not trust yet");
    // TLS 1.3 sends the client's certificate after the client considers the
    // handshake done, so the client may see the alert or just a closed
    // connection: the server's count says why it refused.
    for _ in 0..100 {
        if d.unknown_ca_refusals().await > refused {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(d.unknown_ca_refusals().await > refused, "the handshake was not refused for its CA");
    let mut open = d.connect_as("writer").await;

    let ok = d.reloads("tls_client_ca", "ok").await;
    let mut bundle = std::fs::read_to_string(&d.client_cas).unwrap();
    bundle.push_str(&ca_pem);
    replace(&d.client_cas, bundle.as_bytes());
    d.hangup_until_counted("tls_client_ca", "ok", ok).await;
    d.call(&issued).await.expect("the second CA's client is accepted");
    open.find_missing("", &[sha(b"first")]).await.expect("an open connection keeps working");

    // A bundle that does not parse is refused; both CAs stay trusted.
    let refused = d.reloads("tls_client_ca", "refused").await;
    replace(&d.client_cas, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n");
    d.hangup_until_counted("tls_client_ca", "refused", refused).await;
    d.call(&issued).await.expect("still trusted");
    d.connect_as("writer").await.find_missing("", &[sha(b"y")]).await.unwrap();
}
