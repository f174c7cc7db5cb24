//! Trusted-proxy mode (docs/access-control.md, "Behind a TLS-terminating
//! proxy"): the real binary with the development PKI and
//! `--trusted-proxy spiffe://provcache.dev/envoy`, a real mTLS client holding
//! the proxy's certificate and sending Envoy's `x-forwarded-client-cert`
//! header, and the dev PKI's own clients.

use std::process::Command;
use std::time::Duration;

use prost::Message;
use provcache::proto::prov::audit_client::AuditClient;
use provcache::proto::prov::{ActionResultStatement, Envelope, Writer};
use provcache::proto::reapi;
use provcache::provenance::signing;
use tonic::Code;

use crate::common::*;

const ENVOY: &str = "spiffe://provcache.dev/envoy";
const WRITER: &str = "spiffe://provcache.dev/writer";
const READER: &str = "spiffe://provcache.dev/reader";
const XFCC: &str = "x-forwarded-client-cert";

/// A server trusting [`ENVOY`], and the proxy's own mTLS clients.
struct Fixture {
    server: ServerProcess,
    proxy: Clients,
    _certs: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Self {
        let server = ServerProcess::start(["--trusted-proxy", ENVOY]);
        let certs = tempfile::tempdir().unwrap();
        let envoy = CertFiles::issue(&server.pki_dir(), ENVOY, &certs.path().join("envoy"));
        let channel = tls_channel(server.addr(), &server.pki_dir(), Some(&envoy)).await.unwrap();
        Fixture { server, proxy: Clients::new(channel), _certs: certs }
    }

    async fn dev(&self, name: &str) -> Clients {
        Clients::new(self.server.dev_channel(name).await)
    }
}

/// The element Envoy adds for a client whose certificate's URI SAN is `uri`
/// (`SANITIZE_SET` with `uri: true`, `subject: true`, `dns: true`).
fn envoy_element(uri: &str) -> String {
    format!("By={ENVOY};Hash=8a1f0e6c3b2d;Subject=\"CN=ci,O=Example\\, Inc.\";URI={uri};DNS=")
}

/// `msg` carrying the XFCC header `xfcc`.
fn forwarded<T>(msg: T, xfcc: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(msg);
    request.metadata_mut().insert(XFCC, xfcc.parse().unwrap());
    request
}

/// An action and its output uploaded by the dev writer, and the result naming them.
async fn action_and_result(f: &Fixture, salt: &str) -> (reapi::Digest, reapi::ActionResult) {
    let mut writer = f.dev("writer").await;
    let action = upload_action(&mut writer, "", salt).await;
    (action, writer.result_with_output("", salt.as_bytes()).await)
}

/// The writer the served result's one signed statement names.
fn signed_writer(result: &reapi::ActionResult) -> Writer {
    let envelopes = signing::envelopes(result);
    assert_eq!(envelopes.len(), 1, "one envelope: {result:?}");
    let statement = ActionResultStatement::decode(Envelope::decode(envelopes[0]).unwrap().payload).unwrap();
    statement.origin.and_then(|o| o.writer).expect("a writer")
}

async fn update_via(c: &mut Clients, xfcc: &str, action: &reapi::Digest, result: reapi::ActionResult) -> tonic::Status {
    c.ac.update_action_result(forwarded(update("", action, result), xfcc)).await.unwrap_err()
}

#[tokio::test]
async fn a_trusted_proxy_forwarding_a_writer_writes_as_the_writer_and_the_hit_log_names_the_forwarded_reader() {
    let mut f = Fixture::start().await;
    let (action, result) = action_and_result(&f, "forwarded writer").await;
    let request = forwarded(update("", &action, result), &envoy_element(WRITER));
    let stored = f.proxy.ac.update_action_result(request).await.expect("the forwarded writer may write").into_inner();

    let writer = signed_writer(&stored);
    assert_eq!(writer.principal, WRITER, "the signed entry names the forwarded writer, not the proxy");
    assert_eq!(writer.rule, "dev-writer");
    assert!(
        writer.leaf_cert_sha256.is_empty() && writer.cert_not_after.is_none(),
        "only the proxy saw its certificate"
    );

    // A read forwarded for the reader is a hit whose record names both.
    let meta = request_metadata("proxy-invocation", "CppCompile", "//proxy:target");
    let read = with_request_metadata(forwarded(get("", &action), &envoy_element(READER)), &meta);
    let served = f.proxy.ac.get_action_result(read).await.expect("the forwarded reader may read").into_inner();
    assert_eq!(served, stored);
    let mut audit = AuditClient::new(f.server.dev_channel("auditor").await);
    let records = records_of(&wait_for_hit_envelopes(&mut audit, "proxy-invocation", 1, Duration::from_secs(10)).await);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!((records[0].verdict.as_str(), records[0].reader_principal.as_str()), ("hit", READER));
    assert_eq!(records[0].writer_principal, WRITER);
}

#[tokio::test]
async fn a_trusted_proxy_forwarding_a_reader_cannot_write_and_without_the_header_is_only_itself() {
    let mut f = Fixture::start().await;
    let (action, result) = action_and_result(&f, "forwarded reader").await;
    let status = update_via(&mut f.proxy, &envoy_element(READER), &action, result.clone()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(READER) && status.message().contains("ac:write"), "{status:?}");

    // Without the header the proxy is its own principal, which the policy grants nothing.
    let status = f.proxy.ac.update_action_result(update("", &action, result)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(ENVOY), "{status:?}");
}

#[tokio::test]
async fn a_client_that_is_not_a_trusted_proxy_is_itself_whatever_header_it_sends() {
    let f = Fixture::start().await;
    let (action, result) = action_and_result(&f, "not a proxy").await;
    let mut reader = f.dev("reader").await;
    let status = update_via(&mut reader, &envoy_element(WRITER), &action, result.clone()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "the reader's own certificate decides: {status:?}");
    assert!(status.message().contains(READER), "{status:?}");

    let mut writer = f.dev("writer").await;
    for xfcc in [envoy_element(READER), "not; an = xfcc header".to_owned()] {
        let request = forwarded(update("", &action, result.clone()), &xfcc);
        let stored = writer.ac.update_action_result(request).await.unwrap_or_else(|s| panic!("{xfcc:?}: {s:?}"));
        assert_eq!(signed_writer(stored.get_ref()).principal, WRITER, "{xfcc:?}");
    }
}

#[tokio::test]
async fn a_malformed_or_unacceptable_forwarded_identity_is_unauthenticated_never_the_proxy() {
    let mut f = Fixture::start().await;
    let (action, result) = action_and_result(&f, "malformed").await;
    for (xfcc, needle) in [
        ("By=x;URI=\"spiffe://provcache.dev/writer", "unterminated quoted value"),
        ("URI=spiffe://provcache.dev/writer;", "malformed x-forwarded-client-cert header"),
        ("Hash=abc;Subject=\"CN=writer\";URI=", "no URI SAN"),
        ("URI=spiffe://elsewhere.example/writer", "not trusted"),
        ("URI=spiffe://provcache.dev/writer;URI=spiffe://provcache.dev/reader", "2 URI SANs"),
    ] {
        let status = update_via(&mut f.proxy, xfcc, &action, result.clone()).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{xfcc:?}: {status:?}");
        assert!(status.message().contains(needle) && status.message().contains(ENVOY), "{xfcc:?}: {status:?}");
        let status = f.proxy.ac.get_action_result(forwarded(get("", &action), xfcc)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "reads too, {xfcc:?}: {status:?}");
    }
}

#[test]
fn trusted_proxies_are_refused_on_a_plaintext_server_and_when_no_certificate_could_name_them() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["--plaintext-insecure", "--trusted-proxy", ENVOY], "trusted_proxies needs mutual TLS"),
        (vec!["--trusted-proxy", "spiffe://elsewhere.example/envoy"], "elsewhere.example"),
        (vec!["--trusted-proxy", "spiffe://provcache.dev/*"], "trusted_proxies (--trusted-proxy)"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_provcache"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {needle:?} not in {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
    }
}
