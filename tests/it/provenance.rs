//! Signed provenance end to end (docs/signing.md; docs/threat-model.md T3-T8,
//! T13, T14, R10): real servers on 127.0.0.1:0, with stored entries tampered
//! at rest through the live store while the server runs.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use provcache::cache::digest::{Digest, DigestFunction};
use provcache::cache::resource::InstanceName;
use provcache::proto::prov::storage::StoredActionEntry;
use provcache::proto::prov::{ActionResultStatement, ClientClaims, Envelope, VerificationStatus};
use provcache::proto::reapi;
use provcache::provenance::signing::{self, SigningKey, ENVELOPE_TYPE_URL, STATUS_TYPE_URL};
use provcache::provenance::trust::KeyState;
use provcache::provenance::verify::{verify_served, verify_stored, Expected, Reason};
use provcache::provenance::Mode;
use provcache::service::REQUEST_METADATA_HEADER;
use provcache::store::rocks::Key;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::Code;

use crate::common::*;

/// The dev PKI writer's principal (from its certificate's URI SAN).
const WRITER: &str = "spiffe://provcache.dev/writer";
/// How long a test waits for the server to pick up a changed key or policy
/// file (it looks every 2 s).
const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// Polls the async condition `$cond` every 100 ms until it holds, for at most
/// [`RELOAD_WAIT`].
macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = Instant::now() + RELOAD_WAIT;
        loop {
            if $cond.await {
                break;
            }
            assert!(Instant::now() < deadline, "not within {RELOAD_WAIT:?}: {}", $what);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

// ---------------------------------------------------------------- helpers

fn key(instance: &str, action: &reapi::Digest) -> Key {
    Key::new(
        &InstanceName::parse(instance).unwrap(),
        &Digest::from_proto(DigestFunction::Sha256, Some(action)).unwrap(),
    )
}

fn blob_key(instance: &str, blob: &reapi::Digest) -> Key {
    key(instance, blob)
}

fn expected(instance: &str, action: &reapi::Digest) -> Expected {
    Expected { instance: instance.into(), digest_function: 0, action_digest: action.clone() }
}

/// Asserts the result carries exactly one envelope; returns its raw bytes and
/// the envelope decoded.
fn one_envelope(result: &reapi::ActionResult) -> (Vec<u8>, Envelope) {
    let raw = signing::envelopes(result);
    assert_eq!(raw.len(), 1, "expected exactly one {ENVELOPE_TYPE_URL} entry: {result:?}");
    (raw[0].to_vec(), Envelope::decode(raw[0]).unwrap())
}

/// The statement signed in the result's one envelope.
fn statement(result: &reapi::ActionResult) -> ActionResultStatement {
    ActionResultStatement::decode(one_envelope(result).1.payload.as_ref()).unwrap()
}

/// The flag-mode marks a served result carries.
fn statuses(result: &reapi::ActionResult) -> Vec<VerificationStatus> {
    result
        .execution_metadata
        .iter()
        .flat_map(|m| &m.auxiliary_metadata)
        .filter(|a| a.type_url == STATUS_TYPE_URL)
        .map(|a| VerificationStatus::decode(a.value.as_slice()).unwrap())
        .collect()
}

fn stored(server: &TestServer, k: &Key) -> StoredActionEntry {
    StoredActionEntry::decode(&server.store.ac_get(k).unwrap().expect("a stored entry")[..]).unwrap()
}

fn put_stored(server: &TestServer, k: &Key, entry: &StoredActionEntry) {
    server.store.ac_put_raw(k.as_bytes(), &entry.encode_to_vec()).unwrap();
}

/// Flips the lowest bit of the first byte of `needle` inside `bytes`.
fn flip_in(bytes: &[u8], needle: &[u8]) -> Bytes {
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("needle present");
    let mut out = bytes.to_vec();
    out[at] ^= 1;
    Bytes::from(out)
}

fn failed(server: &TestServer, reason: Reason) -> u64 {
    server.provenance.counters().failed(reason)
}

/// A result whose one output file holds `contents` (uploaded first), with
/// inlined stdout (which the server moves to the CAS before signing).
async fn result_with_output(c: &mut Clients, instance: &str, contents: &[u8]) -> reapi::ActionResult {
    let stdout_raw = Bytes::from(format!("stdout of {}", String::from_utf8_lossy(contents)));
    reapi::ActionResult { stdout_raw, ..c.result_with_output(instance, contents).await }
}

/// Uploads an action and its output and writes its result; returns the
/// action digest and the reply.
async fn write_result(c: &mut Clients, instance: &str, salt: &str) -> (reapi::Digest, reapi::ActionResult) {
    let action = upload_action(c, instance, salt).await;
    let result = result_with_output(c, instance, format!("output of {salt}").as_bytes()).await;
    let reply = c.update_result(instance, &action, result).await.unwrap();
    (action, reply)
}

/// A directory holding a signing key file and a trust policy file, for
/// servers whose key and policy a test changes.
struct KeyFiles {
    _dir: tempfile::TempDir,
    key: PathBuf,
    policy: PathBuf,
}

impl KeyFiles {
    fn new(key: &[u8], policy: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = KeyFiles { key: dir.path().join("signing.key"), policy: dir.path().join("trust.toml"), _dir: dir };
        write_atomically(&files.key, key);
        write_atomically(&files.policy, policy.as_bytes());
        files
    }

    fn options(&self) -> TestOptions {
        TestOptions {
            signing_key: Some(self.key.clone()),
            trust_policy: Some(self.policy.clone()),
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------- every entry is signed

#[tokio::test]
async fn every_entry_carries_one_envelope_naming_action_instance_function_and_writer() {
    let server = TestServer::start_opts(TestOptions { tls: true, ..Default::default() }).await;
    let mut w = server.dev_clients("writer").await;
    let instance = "main";
    let [action, command, input_root] = upload_action_parts(&mut w, instance, "envelope").await;
    let result = result_with_output(&mut w, instance, b"signed output").await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let reply = w.ac.update_action_result(update(instance, &action, result)).await.unwrap().into_inner();
    let got =
        server.dev_clients("reader").await.ac.get_action_result(get(instance, &action)).await.unwrap().into_inner();
    let after = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(reply, got, "the reply is the stored result, envelope included");

    let entry = stored(&server, &key(instance, &action));
    let signer = SigningKey::load(&server.pki_dir().join("signing.key")).unwrap();
    let writer_cert = CertificateDer::from_pem_file(server.pki_dir().join("writer.pem")).unwrap();
    let writer_cert = Sha256::digest(writer_cert.as_ref()).to_vec();
    let policy = server.provenance.trust_policy();
    for (what, served) in [("UpdateActionResult reply", &reply), ("GetActionResult", &got)] {
        let (raw, envelope) = one_envelope(served);
        assert_eq!(raw, entry.envelope.to_vec(), "{what}: the stored envelope bytes, never re-encoded");
        assert_eq!(envelope.signatures.len(), 1, "{what}");
        assert_eq!(envelope.signatures[0].keyid, signer.key_id(), "{what}");
        assert!(statuses(served).is_empty(), "{what}: no verification mark on a good entry");

        let verified = verify_served(&policy, served, &expected(instance, &action), SystemTime::now())
            .unwrap_or_else(|r| panic!("{what}: verify-build's check fails: {r:?}"));
        assert_eq!(verified.key_name, "dev-signing");
        let s = verified.statement;
        assert_eq!(s, statement(served));
        assert_eq!(s.statement_type, signing::STATEMENT_TYPE);
        assert_eq!(s.instance_name, instance, "{what}");
        assert_eq!(s.digest_function, reapi::digest_function::Value::Sha256 as i32, "{what}: unset means SHA-256");
        assert_eq!(s.action_digest.as_ref(), Some(&action), "{what}");
        assert_eq!(s.command_digest.as_ref(), Some(&command), "{what}");
        assert_eq!(s.input_root_digest.as_ref(), Some(&input_root), "{what}");
        assert_eq!(s.action_result_sha256.as_ref(), Sha256::digest(&entry.canonical_result).as_slice());
        assert_eq!(s.action_result_size, entry.canonical_result.len() as i64);
        assert_eq!(s.key_id, signer.key_id());
        assert_eq!(s.server_id, "test");
        let signed_at = SystemTime::try_from(s.signed_at.unwrap()).unwrap();
        assert!(before <= signed_at && signed_at <= after, "{what}: signed_at {signed_at:?} is the server's now");
        let writer = s.origin.as_ref().and_then(|o| o.writer.clone()).expect("a writer");
        assert_eq!(writer.principal, WRITER, "{what}: the writer comes from the client certificate");
        assert_eq!(writer.rule, "dev-writer");
        assert_eq!(writer.leaf_cert_sha256.to_vec(), writer_cert, "{what}: the writer's leaf certificate");
        assert!(writer.cert_not_after.is_some());
        assert_eq!(s.origin.as_ref().unwrap().claims, None, "{what}: no RequestMetadata was sent");
    }
    // The canonical bytes stored are the served result without its envelope.
    assert_eq!(signing::canonical_bytes(&got), entry.canonical_result.to_vec());
    assert!(signing::envelopes(&reapi::ActionResult::decode(entry.canonical_result.clone()).unwrap()).is_empty());

    // A plaintext server signs too; its gate's principal is "anonymous".
    let plain = TestServer::start().await;
    let mut c = plain.clients().await;
    let (action, reply) = write_result(&mut c, "", "plaintext").await;
    let got = c.lookup("", &action).await.unwrap();
    assert_eq!(reply, got);
    let v = verify_served(&plain.provenance.trust_policy(), &got, &expected("", &action), SystemTime::now()).unwrap();
    let writer = v.statement.origin.unwrap().writer.unwrap();
    assert_eq!((writer.principal.as_str(), writer.rule.as_str()), ("anonymous", "allow-all"));
    assert!(writer.leaf_cert_sha256.is_empty() && writer.cert_not_after.is_none(), "no certificate, none recorded");
    assert_eq!(v.statement.instance_name, "");
}

// ---------------------------------------------------------------- T3, T4, T5

#[tokio::test]
async fn t3_a_stripped_envelope_is_a_miss_counted_as_unsigned() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let (action, _) = write_result(&mut c, "", "t3").await;
    let k = key("", &action);
    let original = stored(&server, &k);
    c.lookup("", &action).await.unwrap();

    let stripped = StoredActionEntry { envelope: Bytes::new(), ..original.clone() };
    put_stored(&server, &k, &stripped);
    let unsigned = failed(&server, Reason::Unsigned);
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound);
    assert_eq!(failed(&server, Reason::Unsigned), unsigned + 1);

    // An envelope with its signatures removed is unsigned too.
    let mut envelope = Envelope::decode(original.envelope.clone()).unwrap();
    envelope.signatures.clear();
    put_stored(&server, &k, &StoredActionEntry { envelope: envelope.encode_to_vec().into(), ..original.clone() });
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound);
    assert_eq!(failed(&server, Reason::Unsigned), unsigned + 2);

    // Nothing else changed: putting the original back makes it a hit again.
    put_stored(&server, &k, &original);
    c.lookup("", &action).await.unwrap();
}

#[tokio::test]
async fn t4_a_signed_value_replayed_under_another_action_instance_or_function_is_a_miss() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let (action, _) = write_result(&mut c, "", "t4").await;
    let value = server.store.ac_get(&key("", &action)).unwrap().unwrap();
    let other_action = upload_action(&mut c, "", "t4-other").await;
    let other_size = reapi::Digest { size_bytes: action.size_bytes + 1, ..action.clone() };
    let blake3_action = Digest::parse(DigestFunction::Blake3, &action.hash, action.size_bytes).unwrap();

    let cases: [(&str, Key, reapi::GetActionResultRequest, Reason); 4] = [
        ("another action", key("", &other_action), get("", &other_action), Reason::ActionDigestMismatch),
        ("another size", key("", &other_size), get("", &other_size), Reason::ActionDigestMismatch),
        ("another instance", key("other/instance", &action), get("other/instance", &action), Reason::InstanceMismatch),
        (
            "another digest function",
            Key::new(&InstanceName::default(), &blake3_action),
            reapi::GetActionResultRequest {
                digest_function: reapi::digest_function::Value::Blake3 as i32,
                ..get("", &action)
            },
            Reason::DigestFunctionMismatch,
        ),
    ];
    for (what, k, request, reason) in cases {
        server.store.ac_put_raw(k.as_bytes(), &value).unwrap();
        let before = failed(&server, reason);
        let err = c.ac.get_action_result(request).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
        assert_eq!(failed(&server, reason), before + 1, "{what}: counted as {}", reason.as_str());
    }
    // The original is untouched and still a hit.
    c.lookup("", &action).await.unwrap();
}

#[tokio::test]
async fn t5_a_smuggled_envelope_is_replaced_by_one_naming_the_new_action_and_uploader() {
    let server = TestServer::start_opts(TestOptions { tls: true, ..Default::default() }).await;
    let mut w = server.dev_clients("writer").await;
    let (victim, victim_reply) = write_result(&mut w, "main", "t5-victim").await;
    let (victim_raw, _) = one_envelope(&victim_reply);

    // A result for another action carrying the victim's envelope twice and a
    // forged "verified" mark.
    let action = upload_action(&mut w, "main", "t5-smuggler").await;
    let mut forged = result_with_output(&mut w, "main", b"smuggled output").await;
    for _ in 0..2 {
        signing::attach_envelope_bytes(&mut forged, victim_raw.clone());
    }
    signing::attach_status(&mut forged, &VerificationStatus { reason: "ok".into(), detail: "trust me".into() });
    let reply = w.ac.update_action_result(update("main", &action, forged)).await.unwrap().into_inner();
    let got = w.lookup("main", &action).await.unwrap();
    assert_eq!(reply, got);

    let policy = server.provenance.trust_policy();
    for served in [&reply, &got] {
        let (raw, _) = one_envelope(served);
        assert_ne!(raw, victim_raw, "the client's envelope was dropped");
        assert!(statuses(served).is_empty(), "the client's verification mark was dropped");
        let v = verify_served(&policy, served, &expected("main", &action), SystemTime::now()).unwrap();
        assert_eq!(v.statement.action_digest.as_ref(), Some(&action));
        assert_eq!(v.statement.origin.unwrap().writer.unwrap().principal, WRITER);
    }
    let entry = stored(&server, &key("main", &action));
    let canonical = reapi::ActionResult::decode(entry.canonical_result.clone()).unwrap();
    assert!(signing::envelopes(&canonical).is_empty() && statuses(&canonical).is_empty());
    // The victim's entry is unchanged.
    assert_eq!(w.lookup("main", &victim).await.unwrap(), victim_reply);
}

// ---------------------------------------------------------------- T6

/// Request headers a client might hope would switch verification off.
fn odd_metadata<T>(mut request: tonic::Request<T>, variant: usize) -> tonic::Request<T> {
    let md = request.metadata_mut();
    match variant {
        0 => {}
        1 => {
            for (name, value) in [
                ("x-provcache-verify-mode", "flag"),
                ("provcache-mode", "flag"),
                ("verify-mode", "off"),
                ("x-verification", "disabled"),
                ("x-unsafe-no-verify", "true"),
            ] {
                md.insert(name, MetadataValue::from_static(value));
            }
        }
        2 => {
            md.insert_bin("provcache-mode-bin", BinaryMetadataValue::from_bytes(b"flag"));
            md.insert_bin("provcache.v1.verificationstatus-bin", BinaryMetadataValue::from_bytes(b"\n\x02ok"));
        }
        3 => {
            let claims = reapi::RequestMetadata {
                tool_details: Some(reapi::ToolDetails {
                    tool_name: "provcache verify-build".into(),
                    tool_version: "--verify-mode=flag".into(),
                }),
                tool_invocation_id: "flag".into(),
                correlated_invocations_id: "unsafe-no-verify".into(),
                ..Default::default()
            };
            md.insert_bin(REQUEST_METADATA_HEADER, BinaryMetadataValue::from_bytes(&claims.encode_to_vec()));
        }
        _ => {
            md.insert_bin(REQUEST_METADATA_HEADER, BinaryMetadataValue::from_bytes(b"\xff\xff not protobuf"));
        }
    }
    request
}

#[tokio::test]
async fn t6_no_request_metadata_changes_the_outcome_of_a_reject_mode_server() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let (good, good_reply) = write_result(&mut c, "", "t6-good").await;
    let (bad, _) = write_result(&mut c, "", "t6-bad").await;
    let k = key("", &bad);
    let entry = stored(&server, &k);
    put_stored(
        &server,
        &k,
        &StoredActionEntry { canonical_result: flip_in(&entry.canonical_result, b"out.txt"), ..entry },
    );
    assert_eq!(server.provenance.mode(), Mode::Reject);
    for variant in 0..5 {
        let hit = c.ac.get_action_result(odd_metadata(tonic::Request::new(get("", &good)), variant)).await;
        assert_eq!(hit.unwrap().into_inner(), good_reply, "variant {variant}");
        let miss = c.ac.get_action_result(odd_metadata(tonic::Request::new(get("", &bad)), variant)).await;
        assert_eq!(miss.unwrap_err().code(), Code::NotFound, "variant {variant}");
    }
    assert_eq!(server.provenance.mode(), Mode::Reject);
}

#[tokio::test]
async fn t6_a_flag_mode_server_serves_tampered_entries_marked_and_verify_build_still_fails_them() {
    let server = TestServer::start_opts(TestOptions { mode: Mode::Flag, ..Default::default() }).await;
    let mut c = server.clients().await;
    let (good, good_reply) = write_result(&mut c, "", "t6-flag-good").await;
    let (flipped, _) = write_result(&mut c, "", "t6-flag-flipped").await;
    let (unsigned, _) = write_result(&mut c, "", "t6-flag-unsigned").await;
    let policy = server.provenance.trust_policy();
    let now = SystemTime::now();

    let served = c.lookup("", &good).await.unwrap();
    assert_eq!(served, good_reply);
    assert!(statuses(&served).is_empty(), "a good entry carries no mark in flag mode");
    verify_served(&policy, &served, &expected("", &good), now).unwrap();

    let k = key("", &flipped);
    let entry = stored(&server, &k);
    let tampered = flip_in(&entry.canonical_result, b"out.txt");
    put_stored(&server, &k, &StoredActionEntry { canonical_result: tampered, ..entry });
    let k = key("", &unsigned);
    put_stored(&server, &k, &StoredActionEntry { envelope: Bytes::new(), ..stored(&server, &k) });

    for (action, reason) in [(&flipped, Reason::ResultMismatch), (&unsigned, Reason::Unsigned)] {
        let before = failed(&server, reason);
        let served = c.lookup("", action).await.expect("flag mode serves what fails verification");
        assert_eq!(failed(&server, reason), before + 1, "counted in flag mode too");
        let marks = statuses(&served);
        assert_eq!(marks.len(), 1, "{marks:?}");
        assert_eq!(marks[0].reason, reason.as_str());
        assert!(!marks[0].detail.is_empty());
        let verdict = verify_served(&policy, &served, &expected("", action), now);
        assert!(verdict.is_err(), "verify-build must fail what the server flagged ({}): {verdict:?}", reason.as_str());
        // And the same result without the server's mark fails for the server's reason.
        let mut unmarked = served.clone();
        if let Some(meta) = unmarked.execution_metadata.as_mut() {
            meta.auxiliary_metadata.retain(|a| a.type_url != STATUS_TYPE_URL);
        }
        let canonical = signing::canonical_bytes(&unmarked);
        let envelopes = signing::envelopes(&unmarked);
        assert_eq!(verify_stored(&policy, &envelopes, &canonical, &expected("", action), now).unwrap_err(), reason);
    }
}

// ---------------------------------------------------------------- T7

#[tokio::test]
async fn t7_revoked_keys_miss_and_rotation_keeps_verify_only_entries() {
    let old = SigningKey::generate().unwrap();
    let files = KeyFiles::new(&pem(&old), &policy_toml(1, &[("old", &old, KeyState::Active)]));
    let server = TestServer::start_opts(files.options()).await;
    let mut c = server.clients().await;
    let (old_entry, reply) = write_result(&mut c, "", "t7-old").await;
    assert_eq!(statement(&reply).key_id, old.key_id());
    c.lookup("", &old_entry).await.unwrap();

    // Key compromise: revoke it. Its entries become misses.
    write_atomically(&files.policy, policy_toml(2, &[("old", &old, KeyState::Revoked)]).as_bytes());
    eventually!("entries of the revoked key miss", async { c.lookup("", &old_entry).await == Err(Code::NotFound) });
    assert!(failed(&server, Reason::KeyRevoked) >= 1);

    // Rotation: the new key is active, the old one verify_only ...
    let new = SigningKey::generate().unwrap();
    let rotated = [("old", &old, KeyState::VerifyOnly), ("new", &new, KeyState::Active)];
    write_atomically(&files.policy, policy_toml(3, &rotated).as_bytes());
    eventually!("verify_only entries hit", async { c.lookup("", &old_entry).await.is_ok() });
    // ... and the server signs with the new key once its file is replaced.
    write_atomically(&files.key, &pem(&new));
    let new_entry = upload_action(&mut c, "", "t7-new").await;
    eventually!("the server signs with the new key", async {
        let result = result_with_output(&mut c, "", b"t7 new output").await;
        let reply = c.ac.update_action_result(update("", &new_entry, result)).await.unwrap().into_inner();
        statement(&reply).key_id == new.key_id()
    });
    let served = c.lookup("", &new_entry).await.unwrap();
    assert_eq!(statement(&served).key_id, new.key_id());
    assert_eq!(statement(&c.lookup("", &old_entry).await.unwrap()).key_id, old.key_id());

    // Finally the old key is revoked: its entries miss, the new key's hit.
    let revoked = [("old", &old, KeyState::Revoked), ("new", &new, KeyState::Active)];
    write_atomically(&files.policy, policy_toml(4, &revoked).as_bytes());
    eventually!("the old key's entries miss again", async { c.lookup("", &old_entry).await == Err(Code::NotFound) });
    assert_eq!(statement(&c.lookup("", &new_entry).await.unwrap()).key_id, new.key_id());
}

// ---------------------------------------------------------------- T8

#[tokio::test]
async fn t8_a_flipped_byte_in_a_stored_ac_value_is_never_served() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let (action, reply) = write_result(&mut c, "", "t8-ac").await;
    let k = key("", &action);
    let original = server.store.ac_get(&k).unwrap().unwrap();
    let entry = StoredActionEntry::decode(&original[..]).unwrap();

    // A byte of the canonical result: the signed hash no longer matches.
    let flipped = StoredActionEntry { canonical_result: flip_in(&entry.canonical_result, b"out.txt"), ..entry.clone() };
    let before = failed(&server, Reason::ResultMismatch);
    put_stored(&server, &k, &flipped);
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound);
    assert_eq!(failed(&server, Reason::ResultMismatch), before + 1);

    // A byte of the signature, or of the signed statement: the signature fails.
    let mut envelope = Envelope::decode(entry.envelope.clone()).unwrap();
    let mut sig = envelope.signatures[0].sig.to_vec();
    sig[7] ^= 1;
    envelope.signatures[0].sig = sig.into();
    let bad_sig = StoredActionEntry { envelope: envelope.encode_to_vec().into(), ..entry.clone() };
    let mut envelope = Envelope::decode(entry.envelope.clone()).unwrap();
    envelope.payload = flip_in(&envelope.payload, action.hash.as_bytes());
    let bad_payload = StoredActionEntry { envelope: envelope.encode_to_vec().into(), ..entry.clone() };
    for (what, tampered) in [("signature", bad_sig), ("statement", bad_payload)] {
        let before = failed(&server, Reason::BadSignature);
        put_stored(&server, &k, &tampered);
        assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound, "{what}");
        assert_eq!(failed(&server, Reason::BadSignature), before + 1, "{what}");
    }

    // Every single-byte flip anywhere in the stored value: a miss, or exactly
    // the signed result (a flip in bookkeeping the signature does not cover,
    // such as the stored-at time or the unsigned key-id hint).
    let policy = server.provenance.trust_policy();
    let (mut served, mut missed) = (0, 0);
    for i in 0..original.len() {
        for mask in [0x01u8, 0x80] {
            let mut value = original.clone();
            value[i] ^= mask;
            server.store.ac_put_raw(k.as_bytes(), &value).unwrap();
            match c.ac.get_action_result(get("", &action)).await {
                Ok(result) => {
                    let result = result.into_inner();
                    assert_eq!(
                        signing::canonical_bytes(&result),
                        entry.canonical_result.to_vec(),
                        "byte {i} ^ {mask:#x}: a changed result was served"
                    );
                    verify_served(&policy, &result, &expected("", &action), SystemTime::now())
                        .unwrap_or_else(|r| panic!("byte {i} ^ {mask:#x}: served, but verify-build fails it: {r:?}"));
                    served += 1;
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::NotFound, "byte {i} ^ {mask:#x}: {status:?}");
                    missed += 1;
                }
            }
        }
    }
    eprintln!(
        "{} flips of a {}-byte value: {missed} misses, {served} served unchanged",
        2 * original.len(),
        original.len()
    );
    assert!(missed > served, "most flips must be misses");
    server.store.ac_put_raw(k.as_bytes(), &original).unwrap();
    assert_eq!(c.lookup("", &action).await.unwrap(), reply);
}

/// Reads through ByteStream; on success asserts the bytes are `want`.
async fn read_is_error_or_right(c: &mut Clients, d: &reapi::Digest, offset: usize, limit: usize, want: &[u8]) -> bool {
    match c.read(&format!("blobs/{}", rn(d)), offset as i64, limit as i64).await {
        Ok(data) => {
            let end = if limit == 0 { want.len() } else { (offset + limit).min(want.len()) };
            assert!(data == want[offset..end], "ByteStream served wrong bytes for [{offset}, {end}) of {}", d.hash);
            true
        }
        Err(status) => {
            assert!(matches!(status.code(), Code::DataLoss | Code::NotFound), "{status:?}");
            false
        }
    }
}

#[tokio::test]
async fn t8_a_flipped_byte_in_a_cas_blob_is_never_served_and_results_using_it_miss() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;

    // A one-chunk blob, and one of three chunks.
    let small = noise(1000, 1);
    let big = noise(provcache::store::rocks::CHUNK_SIZE * 2 + 12345, 2);
    let mut actions = Vec::new();
    for (salt, data) in [("t8-small", &small), ("t8-big", &big)] {
        let d = sha(data);
        c.write(&format!("uploads/{}/blobs/{}", uuid::Uuid::new_v4(), rn(&d)), data, 64 * 1024).await.unwrap();
        let action = upload_action(&mut c, "", salt).await;
        c.update_result("", &action, output_result(&d)).await.unwrap();
        c.lookup("", &action).await.unwrap();
        actions.push((action, d, data.clone()));
    }
    let tamper = |d: &reapi::Digest, index: u32, data: &[u8], at: usize| {
        let chunk_start = index as usize * provcache::store::rocks::CHUNK_SIZE;
        let chunk_end = (chunk_start + provcache::store::rocks::CHUNK_SIZE).min(data.len());
        let mut chunk = data[chunk_start..chunk_end].to_vec();
        chunk[at] ^= 0x20;
        server.store.tamper_chunk_for_tests(&blob_key("", d), index, &chunk).unwrap();
    };

    // The small blob: any read fails, and the blob is then gone for good.
    let (small_action, small_d, _) = &actions[0];
    tamper(small_d, 0, &small, 500);
    assert!(!read_is_error_or_right(&mut c, small_d, 100, 10, &small).await, "a ranged read of a corrupt blob");
    assert_eq!(
        c.missing("", std::slice::from_ref(small_d)).await,
        vec![small_d.clone()],
        "the corrupt blob was dropped"
    );
    assert!(!read_is_error_or_right(&mut c, small_d, 0, 0, &small).await);
    let missing = failed(&server, Reason::MissingBlob);
    assert_eq!(c.lookup("", small_action).await.unwrap_err(), Code::NotFound, "its result is a miss");
    assert_eq!(failed(&server, Reason::MissingBlob), missing + 1);

    // The big blob, tampered in its first chunk: no read, ranged or whole,
    // succeeds with wrong bytes; a read over the tampered byte fails, and
    // afterwards the blob is gone.
    let (big_action, big_d, _) = &actions[1];
    tamper(big_d, 0, &big, 10);
    assert!(!read_is_error_or_right(&mut c, big_d, 0, 100, &big).await, "a ranged read over the tampered byte");
    for (offset, limit) in [(5, 1000), (provcache::store::rocks::CHUNK_SIZE + 7, 100), (0, 0)] {
        read_is_error_or_right(&mut c, big_d, offset, limit, &big).await;
    }
    assert!(!read_is_error_or_right(&mut c, big_d, 0, 0, &big).await, "a whole read of a corrupt blob");
    assert_eq!(c.missing("", std::slice::from_ref(big_d)).await, vec![big_d.clone()], "the corrupt blob was dropped");
    assert_eq!(c.lookup("", big_action).await.unwrap_err(), Code::NotFound, "its result is a miss");
}

#[tokio::test]
async fn t8_a_corrupt_blob_met_while_inlining_makes_the_result_a_miss() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let (action, reply) = write_result(&mut c, "", "t8-inline").await;
    let out = reply.output_files[0].digest.clone().unwrap();
    let data = b"output of t8-inline";
    let mut bad = data.to_vec();
    bad[0] ^= 1;
    server.store.tamper_chunk_for_tests(&blob_key("", &out), 0, &bad).unwrap();

    let mut ask = get("", &action);
    ask.inline_output_files = vec!["out.txt".into()];
    let missing = failed(&server, Reason::MissingBlob);
    let err = c.ac.get_action_result(ask.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a result whose output is corrupt is a miss: {err:?}");
    assert_eq!(failed(&server, Reason::MissingBlob), missing + 1);
    assert_eq!(c.ac.get_action_result(ask).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound);
}

// ---------------------------------------------------------------- T13, T14

#[tokio::test]
async fn t13_forged_request_metadata_is_recorded_as_claims_and_never_changes_the_writer() {
    let server = TestServer::start_opts(TestOptions { tls: true, ..Default::default() }).await;
    let mut w = server.dev_clients("writer").await;
    let action = upload_action(&mut w, "main", "t13").await;
    let long = "x".repeat(5000);
    let forged = reapi::RequestMetadata {
        tool_details: Some(reapi::ToolDetails { tool_name: "bazel".into(), tool_version: "99.0".into() }),
        action_id: "forged-action-id".into(),
        tool_invocation_id: "forged-invocation-of-another-build".into(),
        correlated_invocations_id: "spiffe://provcache.dev/release-builder".into(),
        action_mnemonic: "Genrule".into(),
        target_id: "//release:signed".into(),
        configuration_id: long.clone(),
    };
    let result = result_with_output(&mut w, "main", b"t13 output").await;
    let mut request = with_request_metadata(tonic::Request::new(update("main", &action, result)), &forged);
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", MetadataValue::from_static("URI=spiffe://provcache.dev/admin"));
    let reply = w.ac.update_action_result(request).await.unwrap().into_inner();
    let got = w.lookup("main", &action).await.unwrap();
    assert_eq!(reply, got);

    let v =
        verify_served(&server.provenance.trust_policy(), &got, &expected("main", &action), SystemTime::now()).unwrap();
    let origin = v.statement.origin.unwrap();
    assert_eq!(origin.writer.unwrap().principal, WRITER, "the writer is the certificate's, whatever the claims say");
    let claims = origin.claims.expect("the claims are recorded");
    assert_eq!(
        claims,
        ClientClaims {
            tool_name: "bazel".into(),
            tool_version: "99.0".into(),
            tool_invocation_id: "forged-invocation-of-another-build".into(),
            correlated_invocations_id: "spiffe://provcache.dev/release-builder".into(),
            action_id: "forged-action-id".into(),
            action_mnemonic: "Genrule".into(),
            target_id: "//release:signed".into(),
            configuration_id: long[..signing::MAX_CLAIM_BYTES].to_string(),
        },
        "claims are kept as sent (cut to {} bytes)",
        signing::MAX_CLAIM_BYTES
    );

    // An undecodable header records no claims and changes nothing else.
    let action = upload_action(&mut w, "main", "t13-garbage").await;
    let result = result_with_output(&mut w, "main", b"t13 garbage output").await;
    let mut request = tonic::Request::new(update("main", &action, result));
    request.metadata_mut().insert_bin(REQUEST_METADATA_HEADER, BinaryMetadataValue::from_bytes(b"\xff\xfe\xfd"));
    let reply = w.ac.update_action_result(request).await.unwrap().into_inner();
    let origin = statement(&reply).origin.unwrap();
    assert_eq!((origin.writer.unwrap().principal.as_str(), origin.claims), (WRITER, None));
}

#[tokio::test]
async fn t14_results_need_every_blob_on_write_and_miss_when_one_is_deleted() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "", "t14").await;
    let never_uploaded = sha(b"t14 never uploaded");
    let err = c.update_result("", &action, output_result(&never_uploaded)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&never_uploaded.hash), "{}", err.message());
    assert!(server.store.ac_get(&key("", &action)).unwrap().is_none(), "nothing stored");

    let result = result_with_output(&mut c, "", b"t14 output").await;
    let out = result.output_files[0].digest.clone().unwrap();
    c.ac.update_action_result(update("", &action, result)).await.unwrap();
    c.lookup("", &action).await.unwrap();
    server.store.delete_blob(&blob_key("", &out)).unwrap();
    let before = failed(&server, Reason::MissingBlob);
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound);
    assert_eq!(failed(&server, Reason::MissingBlob), before + 1);
    // The signature itself still verifies: the miss is only the missing blob.
    assert_eq!(failed(&server, Reason::ResultMismatch) + failed(&server, Reason::BadSignature), 0);
}

// ---------------------------------------------------------------- R10, history

#[tokio::test]
async fn r10_without_a_usable_signing_key_writes_fail_closed_and_reads_go_on() {
    let signer = SigningKey::generate().unwrap();
    let files = KeyFiles::new(b"this is not a PKCS#8 key\n", &policy_toml(1, &[("k", &signer, KeyState::Active)]));
    let server = TestServer::start_opts(files.options()).await;
    let mut c = server.clients().await;

    // Garbage from the start: UNAVAILABLE before any work, nothing stored,
    // not even the inlined stdout.
    let attempt = |c: &Clients, salt: &'static str| {
        let mut c = c.clone();
        async move {
            let action = upload_action(&mut c, "", salt).await;
            let result =
                reapi::ActionResult { stdout_raw: Bytes::from(format!("stdout of {salt}")), ..Default::default() };
            let outcome = c.ac.update_action_result(update("", &action, result)).await;
            (action, outcome.map(|r| r.into_inner()).map_err(|s| s.code()))
        }
    };
    let refused = server.provenance.counters().sign_refused();
    let (action, outcome) = attempt(&c, "r10-garbage").await;
    assert_eq!(outcome.unwrap_err(), Code::Unavailable);
    assert!(server.store.ac_get(&key("", &action)).unwrap().is_none());
    assert!(server.store.ac_history(&key("", &action)).unwrap().is_empty());
    assert_eq!(c.missing("", &[sha(b"stdout of r10-garbage")]).await.len(), 1, "no work was done");
    assert_eq!(server.provenance.counters().sign_refused(), refused + 1);

    // The key is fixed: writes resume.
    write_atomically(&files.key, &pem(&signer));
    let mut written = None;
    eventually!("writes resume with a usable key", async {
        let (action, outcome) = attempt(&c, "r10-good").await;
        written = outcome.ok().map(|reply| (action, reply));
        written.is_some()
    });
    let (good, reply) = written.unwrap();
    assert_eq!(statement(&reply).key_id, signer.key_id());

    // The key file disappears (unreadable): writes fail closed again ...
    std::fs::remove_file(&files.key).unwrap();
    eventually!("writes fail closed without the key file", async {
        attempt(&c, "r10-gone").await.1 == Err(Code::Unavailable)
    });
    let (gone, outcome) = attempt(&c, "r10-after-gone").await;
    assert_eq!(outcome.unwrap_err(), Code::Unavailable);
    assert!(server.store.ac_get(&key("", &gone)).unwrap().is_none());
    // ... and reads of existing entries are unaffected.
    assert_eq!(c.lookup("", &good).await.unwrap(), reply);
}

#[tokio::test]
async fn history_keeps_every_signed_write_of_an_action() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "", "history").await;
    let k = key("", &action);
    let mut replies = Vec::new();
    for (exit_code, output) in [(0, &b"first output"[..]), (3, &b"second output"[..])] {
        let result = reapi::ActionResult { exit_code, ..result_with_output(&mut c, "", output).await };
        replies.push(c.ac.update_action_result(update("", &action, result)).await.unwrap().into_inner());
    }
    let history = server.store.ac_history(&k).unwrap();
    assert_eq!(history.len(), 2, "both writes are kept");
    assert!(history[0].0 < history[1].0, "oldest first");
    assert_eq!(history[1].1, server.store.ac_get(&k).unwrap().unwrap(), "the latest is the current entry");
    let policy = server.provenance.trust_policy();
    for ((_, value), reply) in history.iter().zip(&replies) {
        let entry = StoredActionEntry::decode(&value[..]).unwrap();
        let v = verify_stored(
            &policy,
            &[entry.envelope.as_ref()],
            &entry.canonical_result,
            &expected("", &action),
            SystemTime::now(),
        )
        .expect("every history record is a fully signed entry");
        assert_eq!(entry.envelope.to_vec(), one_envelope(reply).0);
        assert_eq!(v.statement.action_digest.as_ref(), Some(&action));
    }
    assert_eq!(c.lookup("", &action).await.unwrap(), replies[1]);
}
