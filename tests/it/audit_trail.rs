//! The audit trail a reader cannot forge and an auditor cannot misread
//! (issue 14, the server half): signed, chained hit records with the
//! server-attested reader, capped claims and a per-principal cap; listings
//! and stored-entry histories paged under a 4 MiB client limit; consistent
//! authorization; a completeness check that trusts only signed data; no
//! trust-policy rollback; no decoy envelopes. Real mTLS servers on
//! 127.0.0.1:0, tampering at rest through the live store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prost::Message;
use provcache::cache::digest::{Digest, DigestFunction};
use provcache::cache::resource::InstanceName;
use provcache::limits::Limits;
use provcache::proto::prov::audit_client::AuditClient;
use provcache::proto::prov::storage::StoredActionEntry;
use provcache::proto::prov::{Envelope, GetStoredEntryRequest, HitRecord, ListInvocationHitsResponse};
use provcache::proto::reapi;
use provcache::provenance::hit_log::{MAX_CLAIM_BYTES, VERDICT_RECORD_LIMIT};
use provcache::provenance::signing::{self, SigningKey, ENVELOPE_TYPE_URL, HIT_RECORD_PAYLOAD_TYPE};
use provcache::provenance::trust::{render_key_entry, KeyState, TrustPolicy};
use provcache::provenance::verify::{verify_hit_record, verify_served, Expected};
use provcache::provenance::Mode;
use provcache::store::rocks::Key;
use sha2::{Digest as _, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Code;

use crate::common::*;

const READER: &str = "spiffe://provcache.dev/reader";
const AUDITOR: &str = "spiffe://provcache.dev/auditor";
/// A default gRPC client's receive limit, which verify-build keeps.
const CLIENT_LIMIT: usize = 4 << 20;
/// How long a test waits for something the server does in the background
/// (hit records are written off the request path; policies reload every 2 s).
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- helpers

async fn tls_server(extra: TestOptions) -> TestServer {
    TestServer::start_opts(TestOptions { tls: true, ..extra }).await
}

/// An Audit client with a default (4 MiB) receive limit, as verify-build has.
async fn audit_as(server: &TestServer, name: &str) -> AuditClient<Channel> {
    AuditClient::new(server.dev_channel(name).await).max_decoding_message_size(CLIENT_LIMIT)
}

/// Every page of an invocation's hit log; asserts each reply's size stays
/// under the client limit (the client would refuse it otherwise).
async fn list_pages(
    audit: &mut AuditClient<Channel>,
    invocation: &str,
    page_size: i32,
) -> Result<Vec<ListInvocationHitsResponse>, tonic::Status> {
    let pages = list_hit_pages(audit, invocation, page_size).await?;
    for page in &pages {
        assert!(page.encoded_len() < CLIENT_LIMIT, "a page of {} bytes", page.encoded_len());
    }
    Ok(pages)
}

/// Waits until the invocation lists `n` records; returns their envelopes.
async fn wait_for_records(audit: &mut AuditClient<Channel>, invocation: &str, n: usize) -> Vec<Envelope> {
    let envelopes = wait_for_hit_envelopes(audit, invocation, n, WAIT).await;
    assert_eq!(envelopes.len(), n, "records of {invocation:.40}");
    envelopes
}

/// Verifies every record's signature under `policy` and the chain (sequence
/// 1..n, each naming its predecessor's payload hash); returns the records.
fn verified_chain(policy: &TrustPolicy, envelopes: &[Envelope], key_id: &str) -> Vec<HitRecord> {
    let mut previous: Vec<u8> = Vec::new();
    let mut records = Vec::new();
    for (i, envelope) in envelopes.iter().enumerate() {
        assert_eq!(envelope.payload_type, HIT_RECORD_PAYLOAD_TYPE);
        let (record, signer) = verify_hit_record(policy, envelope).expect("a record signed by a trusted key");
        assert_eq!(signer, key_id, "signed by the server's key");
        assert_eq!(record.sequence, i as u64 + 1, "sequence without gaps, in order");
        assert_eq!(record.previous_sha256.to_vec(), previous, "record {} names its predecessor", record.sequence);
        previous = Sha256::digest(&envelope.payload).to_vec();
        records.push(record);
    }
    records
}

/// The dev signing key's id (the key the server signs with).
fn dev_key_id(server: &TestServer) -> String {
    SigningKey::load(&server.pki_dir().join("signing.key")).unwrap().key_id().to_string()
}

fn key(instance: &str, action: &reapi::Digest) -> Key {
    Key::new(
        &InstanceName::parse(instance).unwrap(),
        &Digest::from_proto(DigestFunction::Sha256, Some(action)).unwrap(),
    )
}

fn stored(server: &TestServer, k: &Key) -> StoredActionEntry {
    StoredActionEntry::decode(&server.store.ac_get(k).unwrap().expect("a stored entry")[..]).unwrap()
}

fn put_stored(server: &TestServer, k: &Key, entry: &StoredActionEntry) {
    server.store.ac_put_raw(k.as_bytes(), &entry.encode_to_vec()).unwrap();
}

fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------- the hit log

#[tokio::test]
async fn records_of_one_invocation_are_signed_by_the_server_key_in_order_and_chained_across_two_readers() {
    let server = tls_server(TestOptions::default()).await;
    let mut w = server.dev_clients("writer").await;
    let (a, _) = w.store_entry("main", "chain-a").await;
    let (b, _) = w.store_entry("main", "chain-b").await;
    let mut reader = server.dev_clients("reader").await;
    let mut auditor = server.dev_clients("auditor").await;
    let meta = request_metadata("inv-chain", "Genrule", "//pkg:gen");
    for _ in 0..3 {
        reader.lookup_as("main", &a, &meta).await.unwrap();
        auditor.lookup_as("main", &b, &meta).await.unwrap();
    }
    // Another invocation's lookups are not part of this chain.
    reader.lookup_as("main", &a, &request_metadata("inv-other", "", "")).await.unwrap();

    let mut audit = audit_as(&server, "auditor").await;
    let envelopes = wait_for_records(&mut audit, "inv-chain", 6).await;
    let records = verified_chain(&server.provenance.trust_policy(), &envelopes, &dev_key_id(&server));
    let mut by_reader: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *by_reader.entry(r.reader_principal.as_str()).or_default() += 1;
        assert_eq!((r.verdict.as_str(), r.served), ("hit", true));
        assert_eq!(r.writer_principal, "spiffe://provcache.dev/writer");
        assert_eq!(
            (r.action_mnemonic.as_str(), r.target_id.as_str(), r.claims_truncated),
            ("Genrule", "//pkg:gen", false)
        );
        let want = if r.reader_principal == READER { &a } else { &b };
        assert_eq!(r.action_digest.as_ref(), Some(want));
    }
    assert_eq!(by_reader, BTreeMap::from([(AUDITOR, 3), (READER, 3)]));

    // Small pages list the same chain.
    let pages = list_pages(&mut audit, "inv-chain", 4).await.unwrap();
    assert_eq!(pages.len(), 2);
    assert_eq!(envelopes_of(&pages), envelopes);

    // A later lookup continues the same chain.
    reader.lookup_as("main", &a, &meta).await.unwrap();
    let envelopes = wait_for_records(&mut audit, "inv-chain", 7).await;
    verified_chain(&server.provenance.trust_policy(), &envelopes, &dev_key_id(&server));
}

#[tokio::test]
async fn the_reader_principal_is_the_certificates_and_oversized_claims_are_cut_and_marked() {
    let server = tls_server(TestOptions::default()).await;
    let mut w = server.dev_clients("writer").await;
    let (action, _) = w.store_entry("main", "claims").await;
    let mut reader = server.dev_clients("reader").await;
    // Claims naming someone else, and far over the cap.
    let forged = reapi::RequestMetadata {
        tool_invocation_id: "inv-claims".into(),
        correlated_invocations_id: "spiffe://provcache.dev/writer".into(),
        action_mnemonic: "M".repeat(4000),
        target_id: format!("//evil:backdoor{}", "é".repeat(2000)),
        ..Default::default()
    };
    let mut request = with_request_metadata(tonic::Request::new(get("main", &action)), &forged);
    request
        .metadata_mut()
        .insert("x-forwarded-client-cert", MetadataValue::from_static("URI=spiffe://provcache.dev/auditor"));
    reader.ac.get_action_result(request).await.unwrap();
    // Short claims are kept whole.
    reader.lookup_as("main", &action, &request_metadata("inv-claims", "CppCompile", "//a:b")).await.unwrap();

    let mut audit = audit_as(&server, "auditor").await;
    let envelopes = wait_for_records(&mut audit, "inv-claims", 2).await;
    let records = verified_chain(&server.provenance.trust_policy(), &envelopes, &dev_key_id(&server));
    let cut = records.iter().find(|r| r.claims_truncated).expect("the oversized claims are marked as cut");
    assert_eq!(cut.reader_principal, READER, "the certificate's identity, whatever the headers claim");
    assert_eq!(cut.action_mnemonic, "M".repeat(MAX_CLAIM_BYTES));
    assert!(cut.target_id.starts_with("//evil:backdoor") && cut.target_id.len() <= MAX_CLAIM_BYTES);
    assert!(cut.target_id.len() > MAX_CLAIM_BYTES - 2, "cut at a character boundary, not shorter");
    let whole = records.iter().find(|r| !r.claims_truncated).unwrap();
    assert_eq!((whole.action_mnemonic.as_str(), whole.target_id.as_str()), ("CppCompile", "//a:b"));
    assert_eq!(whole.reader_principal, READER);
}

#[tokio::test]
async fn the_per_principal_cap_writes_one_record_limit_reached_and_then_nothing_more() {
    let limits = Limits { max_hit_records_per_principal: 3, ..Limits::default() };
    let server = tls_server(TestOptions { limits: Some(limits), metrics: true, ..Default::default() }).await;
    let mut w = server.dev_clients("writer").await;
    let (action, _) = w.store_entry("main", "cap").await;
    let mut reader = server.dev_clients("reader").await;
    let mut auditor = server.dev_clients("auditor").await;
    let meta = request_metadata("inv-cap", "Genrule", "//x");
    for _ in 0..8 {
        reader.lookup_as("main", &action, &meta).await.unwrap();
    }
    for _ in 0..2 {
        auditor.lookup_as("main", &action, &meta).await.unwrap();
    }

    let mut audit = audit_as(&server, "auditor").await;
    let envelopes = wait_for_records(&mut audit, "inv-cap", 5).await;
    // Give late writes a chance to show up (there must be none).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(envelopes_of(&list_pages(&mut audit, "inv-cap", 0).await.unwrap()).len(), 5);
    let records = verified_chain(&server.provenance.trust_policy(), &envelopes, &dev_key_id(&server));
    let readers: Vec<&HitRecord> = records.iter().filter(|r| r.reader_principal == READER).collect();
    assert_eq!(readers.len(), 3, "at most the cap per principal");
    let verdicts: Vec<&str> = readers.iter().map(|r| r.verdict.as_str()).collect();
    assert_eq!(verdicts, ["hit", "hit", VERDICT_RECORD_LIMIT], "the last one says the cap was reached");
    let others: Vec<&str> =
        records.iter().filter(|r| r.reader_principal == AUDITOR).map(|r| r.verdict.as_str()).collect();
    assert_eq!(others, ["hit", "hit"], "another principal is not affected");

    let (_, metrics) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    let series =
        format!("provcache_limit_hits_total{{limit=\"max_hit_records_per_principal\",principal=\"{READER}\"}} ");
    let hits: f64 = metrics.lines().find_map(|l| l.strip_prefix(&series)).expect(&series).trim().parse().unwrap();
    assert_eq!(hits, 6.0, "the cap record and the five dropped lookups are counted");
}

#[tokio::test]
async fn records_written_before_signing_are_listed_unsigned_not_dropped() {
    let server = tls_server(TestOptions::default()).await;
    let old = HitRecord {
        tool_invocation_id: "inv-old".into(),
        verdict: "hit".into(),
        reader_principal: READER.into(),
        ..Default::default()
    };
    // Answered now: the retention purge, which runs at start, must not take it.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    server.store.audit_put_legacy("inv-old", now, &old.encode_to_vec()).unwrap();
    let mut audit = audit_as(&server, "auditor").await;
    let envelopes = envelopes_of(&list_pages(&mut audit, "inv-old", 0).await.unwrap());
    assert_eq!(envelopes.len(), 1);
    assert!(envelopes[0].signatures.is_empty(), "listed as unsigned");
    assert_eq!(HitRecord::decode(envelopes[0].payload.as_ref()).unwrap(), old);
    assert!(verify_hit_record(&server.provenance.trust_policy(), &envelopes[0]).is_err());
}

// ---------------------------------------------------------------- authorization

#[tokio::test]
async fn an_unknown_invocation_and_a_known_one_are_both_refused_to_a_caller_without_audit_read() {
    let server = tls_server(TestOptions::default()).await;
    let mut w = server.dev_clients("writer").await;
    let (action, _) = w.store_entry("main", "authz").await;
    let mut reader = server.dev_clients("reader").await;
    reader.lookup_as("main", &action, &request_metadata("inv-known", "", "")).await.unwrap();
    let mut auditor = audit_as(&server, "auditor").await;
    wait_for_records(&mut auditor, "inv-known", 1).await;

    let mut as_reader = audit_as(&server, "reader").await;
    for invocation in ["inv-known", "inv-never-seen"] {
        let err = list_pages(&mut as_reader, invocation, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{invocation}: {err:?}");
        assert!(err.message().contains("audit:read"), "{}", err.message());
    }
    // The auditor gets an (empty) answer for the unknown one.
    assert!(envelopes_of(&list_pages(&mut auditor, "inv-never-seen", 0).await.unwrap()).is_empty());
}

#[tokio::test]
async fn a_record_on_an_instance_the_caller_may_not_audit_refuses_the_whole_listing() {
    // The auditor may audit "main" only.
    let policy = r#"
        [[rules]]
        name = "writer"
        principals = ["spiffe://provcache.dev/writer"]
        instances = ["*"]
        permissions = ["ac:read", "ac:write", "cas:read", "cas:write"]
        [[rules]]
        name = "reader"
        principals = ["spiffe://provcache.dev/reader"]
        instances = ["*"]
        permissions = ["ac:read", "cas:read"]
        [[rules]]
        name = "auditor-of-main"
        principals = ["spiffe://provcache.dev/auditor"]
        instances = ["main"]
        permissions = ["ac:read", "cas:read", "audit:read"]
    "#;
    let server = tls_server(TestOptions { policy: Some(policy.into()), ..Default::default() }).await;
    let mut w = server.dev_clients("writer").await;
    let (on_main, _) = w.store_entry("main", "scoped-main").await;
    let (on_other, _) = w.store_entry("other", "scoped-other").await;
    let mut reader = server.dev_clients("reader").await;
    let meta = request_metadata("inv-scoped", "", "");
    reader.lookup_as("main", &on_main, &meta).await.unwrap();
    let mut auditor = audit_as(&server, "auditor").await;
    wait_for_records(&mut auditor, "inv-scoped", 1).await;

    reader.lookup_as("other", &on_other, &meta).await.unwrap();
    reader.lookup_as("main", &on_main, &meta).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match list_pages(&mut auditor, "inv-scoped", 0).await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "the listing is still answered"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.code(), Code::PermissionDenied, "never a silently filtered, gapped chain: {err:?}");
}

// ---------------------------------------------------------------- sizes

#[tokio::test]
async fn a_listing_of_400_records_with_maximal_claims_pages_under_4_mib() {
    let server = tls_server(TestOptions::default()).await;
    let mut w = server.dev_clients("writer").await;
    let (action, _) = w.store_entry("main", "big-listing").await;
    let reader = server.dev_clients("reader").await;
    // As large as a 16 KiB header allows: a long invocation id and claims.
    let invocation = format!("inv-{}", "i".repeat(6 * 1024));
    let meta = request_metadata(&invocation, &"m".repeat(1024), &"t".repeat(1024));
    let mut tasks = Vec::new();
    for part in 0..8 {
        let (mut c, action, meta) = (reader.clone(), action.clone(), meta.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                c.lookup_as("main", &action, &meta).await.unwrap();
            }
            part
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut audit = audit_as(&server, "auditor").await;
    let envelopes = wait_for_records(&mut audit, &invocation, 400).await;
    let pages = list_pages(&mut audit, &invocation, 0).await.unwrap();
    let total: usize = pages.iter().map(|p| p.encoded_len()).sum();
    assert!(total > CLIENT_LIMIT / 2, "the records are large ({total} bytes)");
    assert!(pages.len() >= 2, "paged by bytes, not only by count: {} page(s)", pages.len());
    let records = verified_chain(&server.provenance.trust_policy(), &envelopes, &dev_key_id(&server));
    assert!(records.iter().all(|r| r.claims_truncated && r.reader_principal == READER));
}

#[tokio::test]
async fn get_stored_entry_of_a_2_7_mb_result_pages_its_history_under_4_mib_per_reply() {
    let server = tls_server(TestOptions::default()).await;
    let mut w = server.dev_clients("writer").await;
    let action = upload_action(&mut w, "main", "large-result").await;
    let out = w.upload("main", &[b"one shared output"]).await.remove(0);
    // 2,700 outputs with 1,000-byte paths: a legal result of about 2.7 MB.
    let result = |version: u8| reapi::ActionResult {
        output_files: (0..2700).map(|i| output(&format!("v{version}/{i:05}/{}", "p".repeat(990)), &out)).collect(),
        ..Default::default()
    };
    for version in 0..2 {
        w.ac.update_action_result(update("main", &action, result(version))).await.unwrap();
    }
    let mut audit = audit_as(&server, "auditor").await;
    let mut token = String::new();
    let (mut current, mut history, mut pages) = (None, Vec::new(), 0);
    loop {
        let reply = audit
            .get_stored_entry(GetStoredEntryRequest {
                instance_name: "main".into(),
                action_digest: Some(action.clone()),
                history_page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("every reply fits the 4 MiB client limit")
            .into_inner();
        assert!(reply.encoded_len() < CLIENT_LIMIT);
        assert_eq!(reply.current.is_some(), pages == 0, "only the first page carries current");
        pages += 1;
        current = current.or(reply.current);
        history.extend(reply.history);
        token = reply.next_history_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3, "current, then one 2.7 MB version per page");
    let current = current.unwrap().result.unwrap();
    assert!(current.encoded_len() > 2_700_000, "{} bytes", current.encoded_len());
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].result.as_ref(), Some(&current), "the newest version is the current one");
    let expected = Expected { instance: "main".into(), digest_function: 0, action_digest: action.clone() };
    for entry in &history {
        verify_served(&server.provenance.trust_policy(), entry.result.as_ref().unwrap(), &expected, SystemTime::now())
            .expect("every version verifies");
    }
}

// ---------------------------------------------------------------- completeness

#[tokio::test]
async fn a_cleared_blob_list_at_rest_and_a_deleted_output_make_a_miss_in_reject_and_flag_mode() {
    for mode in [Mode::Reject, Mode::Flag] {
        let server = TestServer::start_opts(TestOptions { mode, ..Default::default() }).await;
        let mut c = server.clients().await;
        let (action, out) = c.store_entry("", "cleared-list").await;
        let (other, other_out) = c.store_entry("", "cleared-list-and-signature").await;
        c.lookup("", &action).await.unwrap();

        // The unsigned list alone is cleared: the signed one no longer
        // matches it, so the list is derived from the result (still a hit).
        let k = key("", &action);
        let mut entry = stored(&server, &k);
        assert!(!entry.references_envelope.is_empty(), "new entries carry a signed list");
        entry.referenced_blobs.clear();
        put_stored(&server, &k, &entry);
        c.lookup("", &action).await.expect("a complete result still hits");
        // ... and its output is deleted: a miss, never served.
        server.store.delete_blob(&key("", &out)).unwrap();
        assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound, "{mode:?}");

        // The list and its signature both cleared (as in data from before
        // the list was signed): derived from the result too.
        let k = key("", &other);
        let mut entry = stored(&server, &k);
        entry.referenced_blobs.clear();
        entry.references_envelope = Bytes::new();
        put_stored(&server, &k, &entry);
        c.lookup("", &other).await.expect("a complete result still hits");
        server.store.delete_blob(&key("", &other_out)).unwrap();
        assert_eq!(c.lookup("", &other).await.unwrap_err(), Code::NotFound, "{mode:?}");
        server.stop().await;
    }
}

// ---------------------------------------------------------------- trust-policy rollback

/// A trust policy listing one key, valid from a day ago for a day.
fn policy_toml(version: u64, key: &SigningKey, state: KeyState) -> String {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    format!(
        "policy_version = {version}\nclock_skew = \"5m\"\n\n{}\n",
        render_key_entry("k", &key.verifying_key(), state, now - day, now + day)
    )
}

#[tokio::test]
async fn a_reload_with_a_lower_policy_version_keeps_the_newer_policy_and_a_revoked_key_stays_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let signer = SigningKey::generate().unwrap();
    let (key_path, policy_path): (PathBuf, PathBuf) = (dir.path().join("signing.key"), dir.path().join("trust.toml"));
    write_atomically(&key_path, signer.to_pkcs8_pem().unwrap().as_bytes());
    write_atomically(&policy_path, policy_toml(1, &signer, KeyState::Active).as_bytes());
    let server = TestServer::start_opts(TestOptions {
        signing_key: Some(key_path),
        trust_policy: Some(policy_path.clone()),
        ..Default::default()
    })
    .await;
    let mut c = server.clients().await;
    let (action, _) = c.store_entry("", "rollback").await;
    c.lookup("", &action).await.unwrap();

    // The key is revoked (version 2): its entries miss.
    write_atomically(&policy_path, policy_toml(2, &signer, KeyState::Revoked).as_bytes());
    let deadline = Instant::now() + WAIT;
    while c.lookup("", &action).await.is_ok() {
        assert!(Instant::now() < deadline, "the revocation was not loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The version-1 file comes back (a restored backup, an attacker): refused.
    let refused = server.provenance.counters().policy_rollbacks_refused();
    write_atomically(&policy_path, policy_toml(1, &signer, KeyState::Active).as_bytes());
    let deadline = Instant::now() + WAIT;
    while server.provenance.counters().policy_rollbacks_refused() == refused {
        assert!(Instant::now() < deadline, "the rollback was neither refused nor counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.provenance.trust_policy().policy_version, 2);
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound, "the revoked key stays revoked");

    // A newer version is loaded as usual.
    write_atomically(&policy_path, policy_toml(3, &signer, KeyState::VerifyOnly).as_bytes());
    let deadline = Instant::now() + WAIT;
    while c.lookup("", &action).await.is_err() {
        assert!(Instant::now() < deadline, "version 3 was not loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.provenance.trust_policy().policy_version, 3);
}

// ---------------------------------------------------------------- decoys

#[tokio::test]
async fn a_decoy_envelope_under_any_host_and_a_status_message_sent_by_a_writer_are_neither_stored_nor_served() {
    let server = tls_server(TestOptions::default()).await;
    let mut w = server.dev_clients("writer").await;
    // A real envelope, copied from another action's reply.
    let donor = upload_action(&mut w, "main", "decoy-donor").await;
    let out = w.upload("main", &[b"decoy output"]).await.remove(0);
    let plain = reapi::ActionResult { output_files: vec![output("out.txt", &out)], ..Default::default() };
    let donor_reply = w.ac.update_action_result(update("main", &donor, plain.clone())).await.unwrap().into_inner();
    let copied = signing::envelopes(&donor_reply)[0].to_vec();

    let action = upload_action(&mut w, "main", "decoy").await;
    let any = |url: &str, value: Vec<u8>| prost_types::Any { type_url: url.into(), value };
    let status = provcache::proto::prov::VerificationStatus { reason: "hit".into(), detail: "verified".into() };
    let sent = reapi::ActionResult {
        execution_metadata: Some(reapi::ExecutedActionMetadata {
            worker: "w1".into(),
            auxiliary_metadata: vec![
                any("example.com/io.intoto.Envelope", copied.clone()),
                any("x.y/provcache.v1.VerificationStatus", status.encode_to_vec()),
                any("example.com/build.tool.Stats", b"kept".to_vec()),
            ],
            ..Default::default()
        }),
        ..plain
    };
    let reply = w.ac.update_action_result(update("main", &action, sent)).await.unwrap().into_inner();
    let served = w.lookup("main", &action).await.unwrap();
    let canonical = stored(&server, &key("main", &action)).canonical_result;
    assert!(!canonical.windows(copied.len()).any(|win| win == copied.as_slice()), "the copied envelope is not stored");
    for result in [&reply, &served] {
        let urls: Vec<&str> =
            result.execution_metadata.iter().flat_map(|m| &m.auxiliary_metadata).map(|a| a.type_url.as_str()).collect();
        assert_eq!(urls, ["example.com/build.tool.Stats", ENVELOPE_TYPE_URL], "only the server's envelope is added");
        let expected = Expected { instance: "main".into(), digest_function: 0, action_digest: action.clone() };
        verify_served(&server.provenance.trust_policy(), result, &expected, SystemTime::now()).unwrap();
    }
}
