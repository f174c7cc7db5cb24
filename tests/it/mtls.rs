//! Mutual TLS against real in-process servers on 127.0.0.1:0: every RPC for
//! every kind of client, and the threats of the certificate layer (T1,
//! T9–T12 of docs/threat-model.md).
//!
//! A refused handshake is told apart from a refused call by where the error
//! comes from: a status the server sent has no source, a failed connection
//! carries the client's TLS error (with the server's alert) as its source.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use provcache::proto::bytestream::QueryWriteStatusRequest;
use provcache::proto::reapi;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tonic::Code;

use crate::common::*;

const WRITER: &str = "spiffe://provcache.dev/writer";
const READER: &str = "spiffe://provcache.dev/reader";
const AUDITOR: &str = "spiffe://provcache.dev/auditor";
/// Bound on any single call, so a hang fails one cell instead of the test run.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// A movable clock
// ---------------------------------------------------------------------------

/// The server's clock: real time plus an offset the test moves.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn starting_at(offset: Duration) -> Self {
        let clock = TestClock::default();
        clock.set(offset);
        clock
    }

    fn set(&self, offset: Duration) {
        self.0.store(offset.as_secs() as i64, Ordering::SeqCst);
    }

    fn clock(&self) -> provcache::clock::Clock {
        let offset = self.0.clone();
        Arc::new(move || SystemTime::now() + Duration::from_secs(offset.load(Ordering::SeqCst).unsigned_abs()))
    }
}

// ---------------------------------------------------------------------------
// Outcomes
// ---------------------------------------------------------------------------

/// An error and all its sources, joined.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(" <- ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What became of one call.
#[derive(Debug)]
enum Outcome {
    /// The call reached the domain and got the answer an allowed caller gets.
    Reached,
    /// The call succeeded but the answer was not the expected one.
    Wrong(String),
    /// The server answered with this status.
    Status(Code, String),
    /// The connection failed: the client's error chain.
    Transport(String),
}

impl Outcome {
    fn of<T>(result: Result<Result<T, String>, tonic::Status>) -> Self {
        match result {
            Ok(Ok(_)) => Outcome::Reached,
            Ok(Err(wrong)) => Outcome::Wrong(wrong),
            Err(status) if std::error::Error::source(&status).is_some() => Outcome::Transport(error_chain(&status)),
            Err(status) => Outcome::Status(status.code(), status.message().to_string()),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reached => f.write_str("reached the domain"),
            Outcome::Wrong(why) => write!(f, "succeeded with a wrong answer: {why}"),
            Outcome::Status(code, msg) => write!(f, "{code:?}: {msg}"),
            Outcome::Transport(chain) => write!(f, "connection failed: {chain}"),
        }
    }
}

/// What a call must come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Reaches the domain.
    Allowed,
    /// PERMISSION_DENIED naming the principal and this permission.
    Denied(&'static str),
    /// UNAUTHENTICATED with this text in the message.
    Unauthenticated(&'static str),
    /// The handshake fails: the client's error names this TLS alert.
    Refused(&'static str),
}

impl Expect {
    /// A short label for the printed table.
    fn label(self) -> &'static str {
        match self {
            Expect::Allowed => "ok",
            Expect::Denied(_) => "DENIED",
            Expect::Unauthenticated(_) => "UNAUTH",
            Expect::Refused(_) => "REFUSED",
        }
    }

    /// Whether `outcome` is this expectation; `principal` must appear in a
    /// denial.
    fn check(self, outcome: &Outcome, principal: &str) -> Result<(), String> {
        let ok = match (self, outcome) {
            (Expect::Allowed, Outcome::Reached) => true,
            (Expect::Denied(permission), Outcome::Status(Code::PermissionDenied, msg)) => {
                msg.contains(principal) && msg.contains(permission)
            }
            (Expect::Unauthenticated(needle), Outcome::Status(Code::Unauthenticated, msg)) => msg.contains(needle),
            (Expect::Refused(alert), Outcome::Transport(chain)) => chain.contains(alert),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("expected {self:?}, got {outcome}"))
        }
    }
}

/// Collects the cells of a table and fails the test naming every bad one.
#[derive(Default)]
struct Cells {
    table: Vec<String>,
    failures: Vec<String>,
}

impl Cells {
    fn record(&mut self, row: &str, column: &str, expect: Expect, outcome: &Outcome, principal: &str) -> bool {
        match expect.check(outcome, principal) {
            Ok(()) => {
                self.table.push(format!("{row:<22} {column:<18} {:<8} {}", expect.label(), short(outcome)));
                true
            }
            Err(why) => {
                self.table.push(format!("{row:<22} {column:<18} FAILED   {why}"));
                self.failures.push(format!("[{row} × {column}] {why}"));
                false
            }
        }
    }

    /// A plain check: `Ok(what was seen)` or `Err(why it is wrong)`.
    fn fact(&mut self, row: &str, column: &str, result: Result<String, String>) {
        match result {
            Ok(seen) => self.table.push(format!("{row:<22} {column:<18} ok       {seen}")),
            Err(why) => {
                self.table.push(format!("{row:<22} {column:<18} FAILED   {why}"));
                self.failures.push(format!("[{row} × {column}] {why}"));
            }
        }
    }

    fn finish(self, title: &str) {
        eprintln!("---- {title} ----\n{}", self.table.join("\n"));
        assert!(
            self.failures.is_empty(),
            "{title}: {} cell(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

fn short(outcome: &Outcome) -> String {
    let text = match outcome {
        // The innermost error names the TLS alert.
        Outcome::Transport(chain) => format!("handshake refused: {}", chain.rsplit(" <- ").next().unwrap_or_default()),
        other => other.to_string(),
    };
    if text.len() > 110 {
        format!("{}...", &text[..text.char_indices().nth(107).map_or(text.len(), |(i, _)| i)])
    } else {
        text
    }
}

/// Runs `call` on a new connection made with `identity`, within
/// [`CALL_TIMEOUT`].
async fn on_new_connection<F, Fut, T>(server: &TestServer, identity: Option<&CertFiles>, call: F) -> Outcome
where
    F: FnOnce(Clients) -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, String>, tonic::Status>>,
{
    let attempt = async {
        match server.tls_channel(identity).await {
            Ok(channel) => Outcome::of(call(Clients::new(channel)).await),
            Err(e) => Outcome::Transport(error_chain(&e)),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Outcome::Wrong(format!("no answer within {CALL_TIMEOUT:?}")))
}

fn expect_that(condition: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(why())
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

fn upload_name(instance: &str, d: &reapi::Digest) -> String {
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    format!("{prefix}uploads/{}/blobs/{}", uuid::Uuid::new_v4(), rn(d))
}

async fn update_enabled(c: &mut Clients) -> Result<bool, tonic::Status> {
    let caps = c.caps.get_capabilities(reapi::GetCapabilitiesRequest { instance_name: String::new() }).await?;
    Ok(caps
        .into_inner()
        .cache_capabilities
        .and_then(|c| c.action_cache_update_capabilities)
        .is_some_and(|u| u.update_enabled))
}

// ---------------------------------------------------------------------------
// The matrix: every RPC × every kind of client
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    GetCapabilities,
    GetActionResult,
    UpdateActionResult,
    FindMissingBlobs,
    BatchUpdateBlobs,
    BatchReadBlobs,
    GetTree,
    Read,
    Write,
    QueryWriteStatus,
}

impl Rpc {
    const ALL: [Rpc; 10] = [
        Rpc::GetCapabilities,
        Rpc::GetActionResult,
        Rpc::UpdateActionResult,
        Rpc::FindMissingBlobs,
        Rpc::BatchUpdateBlobs,
        Rpc::BatchReadBlobs,
        Rpc::GetTree,
        Rpc::Read,
        Rpc::Write,
        Rpc::QueryWriteStatus,
    ];

    /// The permission a write RPC needs; `None` for reads.
    fn write_permission(self) -> Option<&'static str> {
        match self {
            Rpc::UpdateActionResult => Some("ac:write"),
            Rpc::BatchUpdateBlobs | Rpc::Write | Rpc::QueryWriteStatus => Some("cas:write"),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Writer,
    Reader,
    Auditor,
    NoCertificate,
    OtherCa,
    Expired,
    ExpiredForTls,
    Revoked,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::Writer,
        Kind::Reader,
        Kind::Auditor,
        Kind::NoCertificate,
        Kind::OtherCa,
        Kind::Expired,
        Kind::ExpiredForTls,
        Kind::Revoked,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Writer => "writer",
            Kind::Reader => "reader",
            Kind::Auditor => "auditor",
            Kind::NoCertificate => "no certificate",
            Kind::OtherCa => "other CA",
            Kind::Expired => "expired",
            Kind::ExpiredForTls => "expired, real time",
            Kind::Revoked => "revoked",
        }
    }

    /// The principal the certificate names. The foreign, expired and revoked
    /// certificates all claim to be the writer: only the certificate's
    /// standing can stop them.
    fn principal(self) -> &'static str {
        match self {
            Kind::Reader => READER,
            Kind::Auditor => AUDITOR,
            _ => WRITER,
        }
    }

    fn expect(self, rpc: Rpc) -> Expect {
        match self {
            Kind::Writer => Expect::Allowed,
            Kind::Reader | Kind::Auditor => rpc.write_permission().map_or(Expect::Allowed, Expect::Denied),
            Kind::NoCertificate => Expect::Refused("CertificateRequired"),
            Kind::OtherCa => Expect::Refused("UnknownCA"),
            Kind::Expired => Expect::Unauthenticated("expired"),
            Kind::ExpiredForTls => Expect::Refused("CertificateExpired"),
            Kind::Revoked => Expect::Refused("CertificateRevoked"),
        }
    }
}

/// What the writer stored before the matrix, and what each kind of client
/// tries to add.
struct Fixture {
    /// A stored blob, the output of `action`.
    blob: Vec<u8>,
    /// An action whose result is stored.
    action: reapi::Digest,
    /// The root of a stored two-directory tree.
    tree: reapi::Digest,
    /// Never stored.
    absent: reapi::Digest,
    /// Per kind: an uploaded action without a result, a blob for
    /// BatchUpdateBlobs and one for ByteStream Write (neither uploaded).
    targets: Vec<(Kind, Targets)>,
}

struct Targets {
    action: reapi::Digest,
    batch_blob: Vec<u8>,
    stream_blob: Vec<u8>,
}

impl Fixture {
    async fn store(writer: &mut Clients) -> Self {
        let blob = b"a blob every reader may read".to_vec();
        let out = writer.upload("", &[&blob]).await.remove(0);
        let action = upload_action(writer, "", "matrix: stored").await;
        writer.update_result("", &action, output_result(&out)).await.unwrap();
        let sub = writer.upload_msg("", &reapi::Directory::default()).await;
        let root = reapi::Directory {
            files: vec![reapi::FileNode { name: "f".into(), digest: Some(out.clone()), ..Default::default() }],
            directories: vec![reapi::DirectoryNode { name: "d".into(), digest: Some(sub) }],
            ..Default::default()
        };
        let tree = writer.upload_msg("", &root).await;
        let mut targets = Vec::new();
        for kind in Kind::ALL {
            let t = Targets {
                action: upload_action(writer, "", &format!("matrix: written by {}", kind.name())).await,
                batch_blob: format!("BatchUpdateBlobs by {}", kind.name()).into_bytes(),
                stream_blob: format!("ByteStream Write by {}", kind.name()).into_bytes(),
            };
            targets.push((kind, t));
        }
        Fixture { blob, action, tree, absent: sha(b"never stored"), targets }
    }

    fn targets(&self, kind: Kind) -> &Targets {
        &self.targets.iter().find(|(k, _)| *k == kind).unwrap().1
    }

    /// Makes `rpc` as `kind` would; Ok(Ok) when the answer is what an
    /// allowed caller gets.
    async fn call(&self, c: &mut Clients, kind: Kind, rpc: Rpc) -> Result<Result<(), String>, tonic::Status> {
        let t = self.targets(kind);
        let blob = sha(&self.blob);
        Ok(match rpc {
            Rpc::GetCapabilities => {
                let enabled = update_enabled(c).await?;
                let want = kind == Kind::Writer;
                expect_that(enabled == want, || format!("update_enabled is {enabled}, want {want}"))
            }
            Rpc::GetActionResult => {
                let result = c.get_result("", &self.action).await?;
                let outputs: Vec<_> = result.output_files.iter().filter_map(|f| f.digest.clone()).collect();
                expect_that(outputs == [blob.clone()], || format!("outputs {outputs:?}"))
            }
            Rpc::UpdateActionResult => {
                let stored = c.update_result("", &t.action, output_result(&blob)).await?;
                expect_that(stored.output_files.len() == 1, || format!("stored {stored:?}"))
            }
            Rpc::FindMissingBlobs => {
                let missing = c.find_missing("", &[blob, self.absent.clone()]).await?;
                expect_that(missing == [self.absent.clone()], || format!("missing {missing:?}"))
            }
            Rpc::BatchUpdateBlobs => {
                let codes = c.batch_update("", &[&t.batch_blob]).await?;
                expect_that(codes == [0], || format!("per-blob codes {codes:?}"))
            }
            Rpc::BatchReadBlobs => {
                let request = reapi::BatchReadBlobsRequest {
                    instance_name: String::new(),
                    digests: vec![blob],
                    acceptable_compressors: vec![],
                    digest_function: 0,
                };
                let reply = c.cas.batch_read_blobs(request).await?.into_inner();
                let got: Vec<_> =
                    reply.responses.iter().map(|r| (r.status.as_ref().map(|s| s.code), r.data.to_vec())).collect();
                expect_that(got == [(Some(0), self.blob.clone())], || format!("responses {got:?}"))
            }
            Rpc::GetTree => {
                let request = reapi::GetTreeRequest {
                    instance_name: String::new(),
                    root_digest: Some(self.tree.clone()),
                    page_size: 0,
                    page_token: String::new(),
                    digest_function: 0,
                };
                let mut stream = c.cas.get_tree(request).await?.into_inner();
                let mut directories = 0;
                while let Some(page) = stream.message().await? {
                    directories += page.directories.len();
                }
                expect_that(directories == 2, || format!("{directories} directories"))
            }
            Rpc::Read => {
                let data = c.read(&format!("blobs/{}", rn(&blob)), 0, 0).await?;
                expect_that(data == self.blob, || format!("read {} bytes", data.len()))
            }
            Rpc::Write => {
                let d = sha(&t.stream_blob);
                let committed = c.write(&upload_name("", &d), &t.stream_blob, 8).await?;
                expect_that(committed == d.size_bytes, || format!("committed_size {committed}"))
            }
            Rpc::QueryWriteStatus => {
                let request = QueryWriteStatusRequest { resource_name: upload_name("", &blob) };
                let status = c.bs.query_write_status(request).await?.into_inner();
                expect_that(status.complete && status.committed_size == blob.size_bytes, || format!("{status:?}"))
            }
        })
    }
}

/// Waits until a new connection with `identity` is refused with `alert`;
/// returns how long that took.
async fn wait_until_refused(server: &TestServer, identity: &CertFiles, alert: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let outcome =
            on_new_connection(server, Some(identity), |mut c| async move { update_enabled(&mut c).await.map(Ok) })
                .await;
        match &outcome {
            Outcome::Transport(chain) if chain.contains(alert) => return started.elapsed(),
            _ if started.elapsed() > within => {
                panic!("{} is still not refused with {alert} after {within:?}: {outcome}", identity.cert.display())
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Every RPC × {writer, reader, auditor, no certificate, another CA's
/// certificate, expired (for the server's clock only, and in real time),
/// revoked}. Allowed calls must reach the domain, and
/// afterwards nothing a refused caller tried to write exists (T1).
#[tokio::test]
async fn every_rpc_allows_denies_or_refuses_each_kind_of_client_as_expected() {
    let crls = tempfile::tempdir().unwrap();
    // The server lives a day ahead: the "expired" certificate is still valid
    // for the TLS layer (real time) but not for the gate, so its calls must
    // be refused per call.
    let clock = TestClock::starting_at(Duration::from_secs(24 * 3600));
    let server = TestServer::start_opts(TestOptions {
        tls: true,
        crls: vec![crls.path().to_path_buf()],
        clock: Some(clock.clock()),
        ..Default::default()
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let ca = dev_ca(&server.pki_dir());

    let mut identities: Vec<(Kind, Option<CertFiles>)> = Vec::new();
    for kind in Kind::ALL {
        let files = match kind {
            Kind::Writer | Kind::Reader | Kind::Auditor => Some(CertFiles::dev(&server.pki_dir(), kind.name())),
            Kind::NoCertificate => None,
            Kind::OtherCa => Some(CertFiles::sign(
                &other_ca(),
                &client_params("writer", vec![uri(WRITER)]),
                certs.path(),
                "other-ca",
            )),
            Kind::Expired => {
                let mut params = client_params("writer", vec![uri(WRITER)]);
                params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
                Some(CertFiles::sign(&ca, &params, certs.path(), "expired"))
            }
            Kind::ExpiredForTls => {
                let mut params = client_params("writer", vec![uri(WRITER)]);
                params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(2 * 3600);
                params.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
                Some(CertFiles::sign(&ca, &params, certs.path(), "expired-for-tls"))
            }
            Kind::Revoked => {
                Some(CertFiles::sign(&ca, &client_params("writer", vec![uri(WRITER)]), certs.path(), "revoked"))
            }
        };
        identities.push((kind, files));
    }
    let revoked = identities.iter().find(|(k, _)| *k == Kind::Revoked).and_then(|(_, f)| f.clone()).unwrap();
    write_crl(&ca, crls.path(), &[revoked.serial()], 1);
    wait_until_refused(&server, &revoked, "CertificateRevoked", Duration::from_secs(10)).await;

    let mut writer = server.dev_clients("writer").await;
    let fx = Fixture::store(&mut writer).await;

    let mut cells = Cells::default();
    for rpc in Rpc::ALL {
        for (kind, files) in &identities {
            // A new connection per cell: every refusal is a real handshake.
            let outcome = on_new_connection(&server, files.as_ref(), |mut c| {
                let fx = &fx;
                async move { fx.call(&mut c, *kind, rpc).await }
            })
            .await;
            cells.record(&format!("{rpc:?}"), kind.name(), kind.expect(rpc), &outcome, kind.principal());
        }
    }

    // T1: what a refused caller tried to write is absent; the writer's is there.
    for (kind, t) in &fx.targets {
        let allowed = *kind == Kind::Writer;
        let stored = match writer.get_result("", &t.action).await {
            Ok(_) if allowed => Ok("stored".to_string()),
            Err(e) if !allowed && e.code() == Code::NotFound => Ok("absent".to_string()),
            other => Err(format!("GetActionResult by the writer: {other:?}")),
        };
        cells.fact("after: AC key", kind.name(), stored);
        let digests = [sha(&t.batch_blob), sha(&t.stream_blob)];
        let missing = writer.find_missing("", &digests).await.unwrap();
        let want: Vec<_> = if allowed { vec![] } else { digests.to_vec() };
        let blobs = if missing == want {
            Ok(if allowed { "both stored" } else { "both absent" }.to_string())
        } else {
            Err(format!("missing after the matrix: {missing:?}, want {want:?}"))
        };
        cells.fact("after: CAS blobs", kind.name(), blobs);
    }
    cells.finish("mTLS matrix (row × client: expected, outcome)");
}

// ---------------------------------------------------------------------------
// T1: a reader cannot write, and the cache says so up front
// ---------------------------------------------------------------------------

#[tokio::test]
async fn t1_reader_writes_are_denied_and_leave_nothing_behind() {
    let server = TestServer::start_opts(TestOptions { tls: true, ..Default::default() }).await;
    let mut writer = server.dev_clients("writer").await;
    let mut reader = server.dev_clients("reader").await;
    assert!(update_enabled(&mut writer).await.unwrap(), "the writer may update the cache");
    assert!(!update_enabled(&mut reader).await.unwrap(), "the reader may not update the cache");

    let action = upload_action(&mut writer, "", "t1").await;
    let out = writer.upload("", &[b"t1 output"]).await.remove(0);
    let poison = b"poisoned output".to_vec();
    let denied = |e: tonic::Status, permission: &str| {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains(READER) && e.message().contains(permission), "{e:?}");
    };

    denied(reader.update_result("", &action, output_result(&out)).await.unwrap_err(), "ac:write");
    denied(reader.batch_update("", &[&poison]).await.unwrap_err(), "cas:write");
    // A multi-message stream: refused as a whole, nothing committed.
    let resource = upload_name("", &sha(&poison));
    denied(reader.write(&resource, &poison, 4).await.unwrap_err(), "cas:write");
    denied(
        reader.bs.query_write_status(QueryWriteStatusRequest { resource_name: resource }).await.unwrap_err(),
        "cas:write",
    );

    assert_eq!(writer.get_result("", &action).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(writer.find_missing("", &[sha(&poison)]).await.unwrap(), [sha(&poison)]);
    assert!(reader.get_result("", &action).await.is_err_and(|e| e.code() == Code::NotFound));

    // The same writes by the writer succeed and the reader sees them.
    writer.update_result("", &action, output_result(&out)).await.unwrap();
    assert_eq!(reader.get_result("", &action).await.unwrap().output_files[0].digest, Some(out));
}

// ---------------------------------------------------------------------------
// T9: instances are authorization boundaries
// ---------------------------------------------------------------------------

#[tokio::test]
async fn t9_a_writer_limited_to_dev_cannot_touch_main() {
    const DEV_WRITER: &str = "spiffe://provcache.dev/dev-writer";
    let policy = format!(
        "{}\n[[rules]]\nname = \"dev-only-writer\"\nprincipals = [\"{DEV_WRITER}\"]\ninstances = [\"dev/*\"]\n\
         permissions = [\"ac:read\", \"ac:write\", \"cas:read\", \"cas:write\"]\n",
        provcache::access::pki::dev_policy_toml()
    );
    let server = TestServer::start_opts(TestOptions { tls: true, policy: Some(policy), ..Default::default() }).await;
    let mut dev = Clients::new(server.channel_as(DEV_WRITER).await);
    let mut writer = server.dev_clients("writer").await;

    // Allowed in dev/x.
    let action = upload_action(&mut dev, "dev/x", "t9").await;
    let out = dev.upload("dev/x", &[b"t9 output"]).await.remove(0);
    dev.update_result("dev/x", &action, output_result(&out)).await.unwrap();
    assert_eq!(dev.get_result("dev/x", &action).await.unwrap().output_files[0].digest, Some(out.clone()));

    // Denied on main (and on "dev" itself, which is not under dev/), naming
    // the principal, the permission and the instance.
    for instance in ["main", "dev", ""] {
        let checks: [(&str, tonic::Status); 4] = [
            ("ac:write", dev.update_result(instance, &action, output_result(&out)).await.unwrap_err()),
            ("cas:write", dev.batch_update(instance, &[b"t9 output"]).await.unwrap_err()),
            ("ac:read", dev.get_result(instance, &action).await.unwrap_err()),
            ("cas:read", dev.find_missing(instance, std::slice::from_ref(&out)).await.unwrap_err()),
        ];
        for (permission, e) in checks {
            assert_eq!(e.code(), Code::PermissionDenied, "{instance:?} {permission}: {e:?}");
            let msg = e.message();
            assert!(msg.contains(DEV_WRITER) && msg.contains(permission), "{instance:?}: {msg}");
            assert!(msg.contains(&format!("{instance:?}")), "the instance is named: {msg}");
        }
    }

    // The entry written in dev/x is a miss in main, and so are its blobs.
    assert_eq!(writer.get_result("main", &action).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(writer.find_missing("main", std::slice::from_ref(&out)).await.unwrap(), vec![out.clone()]);
    // The writer sees it in dev/x.
    assert!(writer.get_result("dev/x", &action).await.is_ok());
}

// ---------------------------------------------------------------------------
// T10: certificates that must not establish an identity
// ---------------------------------------------------------------------------

#[tokio::test]
async fn t10_spoofed_identities_are_refused_by_the_real_server() {
    let server = TestServer::start_opts(TestOptions { tls: true, ..Default::default() }).await;
    let ca = dev_ca(&server.pki_dir());
    let certs = tempfile::tempdir().unwrap();
    let mut writer = server.dev_clients("writer").await;
    let action = upload_action(&mut writer, "", "t10").await;
    let out = writer.upload("", &[b"t10 output"]).await.remove(0);

    let cn_only = {
        let mut p = client_params(WRITER, vec![]);
        p.distinguished_name.push(DnType::CommonName, WRITER);
        p
    };
    let two_uris = client_params("writer", vec![uri(WRITER), uri(READER)]);
    let wrong_domain = client_params("writer", vec![uri("spiffe://evil.example/writer")]);
    let server_auth = {
        let mut p = client_params("writer", vec![uri(WRITER)]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p
    };
    let no_eku = {
        let mut p = client_params("writer", vec![uri(WRITER)]);
        p.extended_key_usages = vec![];
        p
    };
    let ca_as_leaf = {
        let mut p = client_params("writer", vec![uri(WRITER)]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
        p
    };
    // (certificate, what the server's TLS verifier says, what the client sees)
    let cases: [(&str, CertificateParams, Option<&str>, Expect); 6] = [
        ("CN only", cn_only, None, Expect::Unauthenticated("no URI SAN")),
        ("two URI SANs", two_uris, None, Expect::Unauthenticated("2 URI SANs")),
        ("wrong trust domain", wrong_domain, None, Expect::Unauthenticated("trust domain \"evil.example\"")),
        ("serverAuth-only EKU", server_auth, Some("InvalidPurpose"), Expect::Refused("UnsupportedCertificate")),
        // WebPKI accepts a leaf without any EKU extension; the identity layer
        // insists on an explicit clientAuth.
        ("no EKU extension", no_eku, None, Expect::Unauthenticated("no clientAuth")),
        ("CA certificate as leaf", ca_as_leaf, Some("CaUsedAsEndEntity"), Expect::Refused("CertificateUnknown")),
    ];
    // The verifier the server's handshakes use, built the same way.
    let verifier = provcache::access::tls::ClientVerifier::new(&[server.pki_dir().join("ca.pem")], &[], false).unwrap();

    let mut cells = Cells::default();
    for (i, (name, params, tls_error, expect)) in cases.into_iter().enumerate() {
        let files = CertFiles::sign(&ca, &params, certs.path(), &format!("t10-{i}"));
        let der = CertificateDer::from_pem_file(&files.cert).unwrap();
        let verdict = verifier.check_chain(&[der], SystemTime::now());
        let seen = format!("{verdict:?}");
        cells.fact(
            name,
            "TLS verifier",
            match (tls_error, &verdict) {
                (None, Ok(())) => Ok("accepts".into()),
                (Some(needle), Err(_)) if seen.contains(needle) => Ok(seen),
                _ => Err(format!("TLS verifier says {seen}, want {}", tls_error.unwrap_or("Ok"))),
            },
        );
        // The first call on a new connection: an Action Cache write.
        let outcome = on_new_connection(&server, Some(&files), |mut c| {
            let (action, out) = (&action, &out);
            async move { c.update_result("", action, output_result(out)).await.map(|_| Ok::<(), String>(())) }
        })
        .await;
        cells.record(name, "UpdateActionResult", expect, &outcome, WRITER);
        let outcome =
            on_new_connection(&server, Some(&files), |mut c| async move { update_enabled(&mut c).await.map(Ok) }).await;
        cells.record(name, "GetCapabilities", expect, &outcome, WRITER);
    }
    // None of them wrote.
    let stored = match writer.get_result("", &action).await {
        Err(e) if e.code() == Code::NotFound => Ok("absent".to_string()),
        other => Err(format!("GetActionResult by the writer: {other:?}")),
    };
    cells.fact("after: AC key", "writer's view", stored);
    cells.finish("T10 (certificate × call: expected, outcome)");
}

// ---------------------------------------------------------------------------
// T11: revocation takes effect on new and open connections
// ---------------------------------------------------------------------------

#[tokio::test]
async fn t11_a_crl_update_refuses_new_handshakes_and_open_connections() {
    /// TestServer's CRL reload interval.
    const RELOAD_INTERVAL: Duration = Duration::from_millis(200);
    let crls = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_opts(TestOptions { tls: true, crls: vec![crls.path().to_path_buf()], ..Default::default() })
            .await;
    let ca = dev_ca(&server.pki_dir());
    let writer_files = CertFiles::dev(&server.pki_dir(), "writer");
    let mut open = server.dev_clients("writer").await;
    let mut reader = server.dev_clients("reader").await;
    let action = upload_action(&mut open, "", "t11").await;
    let out = open.upload("", &[b"t11 output"]).await.remove(0);
    open.update_result("", &action, output_result(&out)).await.unwrap();

    // Revoke the writer's certificate.
    let revoked_at = Instant::now();
    write_crl(&ca, crls.path(), &[writer_files.serial()], 1);
    let handshake_refused =
        wait_until_refused(&server, &writer_files, "CertificateRevoked", Duration::from_secs(10)).await;

    // The open connection's next call is refused too.
    let e = open.get_result("", &action).await.unwrap_err();
    let call_refused = revoked_at.elapsed();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Revoked") && e.message().contains(WRITER), "{e:?}");
    let e = open.update_result("", &action, output_result(&out)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    eprintln!(
        "T11: new handshakes refused {handshake_refused:?} and the open connection {call_refused:?} after the CRL \
         was written (reload interval {RELOAD_INTERVAL:?})"
    );
    // Polling adds a little; far below this means "within the interval".
    assert!(handshake_refused < RELOAD_INTERVAL * 5, "{handshake_refused:?}");
    assert!(call_refused < RELOAD_INTERVAL * 5, "{call_refused:?}");

    // Others are unaffected, on open and new connections.
    assert!(reader.get_result("", &action).await.is_ok());
    let mut new_reader = server.dev_clients("reader").await;
    assert!(new_reader.get_result("", &action).await.is_ok());
}

// ---------------------------------------------------------------------------
// T12: expiry is re-checked on every call
// ---------------------------------------------------------------------------

#[tokio::test]
async fn t12_a_certificate_expiring_mid_connection_is_refused_on_the_next_call() {
    let clock = TestClock::default();
    let server =
        TestServer::start_opts(TestOptions { tls: true, clock: Some(clock.clock()), ..Default::default() }).await;
    // A certificate of its own, valid for an hour.
    let mut c = Clients::new(server.channel_as(WRITER).await);
    let action = upload_action(&mut c, "", "t12").await;
    let out = c.upload("", &[b"t12 output"]).await.remove(0);
    c.update_result("", &action, output_result(&out)).await.unwrap();
    assert!(c.get_result("", &action).await.is_ok());

    // Two hours later, on the same connection.
    clock.set(Duration::from_secs(2 * 3600));
    let e = c.get_result("", &action).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired") && e.message().contains(WRITER), "{e:?}");
    let e = c.update_result("", &action, output_result(&out)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The same principal with a certificate still valid carries on.
    let mut writer = server.dev_clients("writer").await;
    assert!(writer.get_result("", &action).await.is_ok());
}
