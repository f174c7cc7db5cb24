//! `provcache verify-build` against real mTLS servers (issue 14): an audit of
//! nothing never passes, injected lookups are attributed to their reader, the
//! signed hit-log chain exposes rows deleted at rest, large results audit,
//! and the JSON is stable. The audit runs in-process (`verify_build::run`)
//! or as the real binary where the exit status and output are the point.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use provcache::cache::digest::{Digest, DigestFunction};
use provcache::cache::resource::InstanceName;
use provcache::proto::prov::audit_client::AuditClient;
use provcache::proto::prov::storage::StoredActionEntry;
use provcache::proto::prov::HitRecord;
use provcache::proto::reapi;
use provcache::store::rocks::Key;
use provcache::tools::client::Target;
use provcache::tools::verify_build::{self, Code, NothingToAudit, Options, Report};
use sha2::{Digest as _, Sha256};

use crate::common::*;

/// The build's own identity (the dev PKI's reader certificate).
const VICTIM: &str = "spiffe://provcache.dev/reader";
/// Another identity allowed to read the cache, injecting lookups.
const MALLORY: &str = "spiffe://provcache.dev/mallory";
/// The dev PKI writer, which fills the cache.
const WRITER: &str = "spiffe://provcache.dev/writer";

/// An mTLS server whose policy also lets `mallory` read, and clients for
/// the writer, the victim reader and mallory.
struct Fixture {
    server: TestServer,
    writer: Clients,
    victim: Clients,
    mallory: Clients,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_in(provcache::provenance::Mode::Reject).await
    }

    /// A server in reject (default) or flag mode.
    async fn start_in(mode: provcache::provenance::Mode) -> Self {
        let policy = format!(
            "{}\n[[rules]]\nname = \"mallory\"\nprincipals = [\"{MALLORY}\"]\ninstances = [\"*\"]\n\
             permissions = [\"ac:read\", \"cas:read\"]\n",
            provcache::access::pki::dev_policy_toml()
        );
        let server =
            TestServer::start_opts(TestOptions { tls: true, policy: Some(policy), mode, ..Default::default() }).await;
        let mallory = Clients::new(server.channel_as(MALLORY).await);
        let writer = server.dev_clients("writer").await;
        let victim = server.dev_clients("reader").await;
        Fixture { server, writer, victim, mallory }
    }

    fn policy(&self) -> PathBuf {
        self.server.pki_dir().join("trust-policy.toml")
    }

    /// Audit options as the dev PKI's auditor, with the dev trust policy.
    fn options(&self, invocation: Option<&str>) -> Options {
        let pki = self.server.pki_dir();
        Options {
            target: Target {
                url: format!("grpcs://{}", self.server.addr),
                tls: Some((pki.join("ca.pem"), pki.join("auditor.pem"), pki.join("auditor.key"))),
                instance: String::new(),
            },
            policy: self.policy(),
            invocation: invocation.map(str::to_string),
            exec_log: None,
            deep: false,
            reader: None,
        }
    }

    /// Uploads an action and its output and stores its result as the writer.
    async fn write(&mut self, salt: &str) -> reapi::Digest {
        self.writer.store_entry("", salt).await.0
    }

    /// The records the server lists for `invocation`, once at least `n` are
    /// there (the hit log is written off the request path).
    async fn records(&self, invocation: &str, n: usize) -> Vec<HitRecord> {
        let mut audit = AuditClient::new(self.server.dev_channel("auditor").await).max_decoding_message_size(MAX_MSG);
        let envelopes = wait_for_hit_envelopes(&mut audit, invocation, n, Duration::from_secs(10)).await;
        assert!(envelopes.len() >= n, "{} of {n} hit records of {invocation} within 10 s", envelopes.len());
        records_of(&envelopes)
    }

    fn key(&self, action: &reapi::Digest) -> Key {
        Key::new(&InstanceName::default(), &Digest::from_proto(DigestFunction::Sha256, Some(action)).unwrap())
    }

    fn stored(&self, action: &reapi::Digest) -> StoredActionEntry {
        StoredActionEntry::decode(&self.server.store.ac_get(&self.key(action)).unwrap().unwrap()[..]).unwrap()
    }

    fn put_stored(&self, action: &reapi::Digest, entry: &StoredActionEntry) {
        self.server.store.ac_put_raw(self.key(action).as_bytes(), &entry.encode_to_vec()).unwrap();
    }

    /// Alters the stored result at rest: one bit of its output's path, so it
    /// still decodes and references the same blobs, but is not what was signed.
    fn alter_at_rest(&self, action: &reapi::Digest) {
        let entry = self.stored(action);
        let mut bytes = entry.canonical_result.to_vec();
        let at = bytes.windows(7).position(|w| w == b"out.txt").expect("the output path");
        bytes[at] ^= 1;
        self.put_stored(action, &StoredActionEntry { canonical_result: bytes.into(), ..entry });
    }
}

/// GetActionResult under `invocation` with the reader's claims.
async fn lookup(
    c: &mut Clients,
    invocation: &str,
    action: &reapi::Digest,
    claims: (&str, &str),
) -> Result<reapi::ActionResult, tonic::Code> {
    c.lookup_as("", action, &request_metadata(invocation, claims.0, claims.1)).await
}

async fn audit(opts: &Options) -> Report {
    verify_build::run(opts).await.unwrap_or_else(|e| panic!("the audit could not run: {e:#}"))
}

fn assert_clean(report: &Report) {
    assert_eq!(report.exit_code(), 0, "{}", verify_build::to_text(report));
}

/// The real binary's exit status, stdout and stderr, given the trust policy
/// with `--policy`, the old spelling (so these tests also keep the alias working).
async fn binary(opts: &Options, extra: &[&str]) -> (i32, String, String) {
    binary_with(opts, "--policy", extra).await
}

/// [`binary`], naming the trust-policy flag.
async fn binary_with(opts: &Options, policy_flag: &str, extra: &[&str]) -> (i32, String, String) {
    let (ca, cert, key) = opts.target.tls.clone().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provcache"));
    cmd.args(["verify-build", "--server", &opts.target.url])
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(policy_flag)
        .arg(&opts.policy);
    if let Some(id) = &opts.invocation {
        cmd.args(["--invocation", id]);
    }
    let out = cmd.args(extra).output().await.expect("running verify-build");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A JSON execution log with one remote cache hit per (action, output).
fn exec_log(dir: &Path, hits: &[(&reapi::Digest, &reapi::Digest)]) -> PathBuf {
    let mut text = String::new();
    for (action, out) in hits {
        text.push_str(
            &serde_json::json!({
                "remoteCacheHit": true,
                "digest": { "hash": action.hash, "sizeBytes": action.size_bytes.to_string() },
                "actualOutputs": [{ "path": "out.txt", "digest": { "hash": out.hash, "sizeBytes": out.size_bytes } }],
            })
            .to_string(),
        );
        text.push('\n');
    }
    let path = dir.join("exec.json");
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------- point 1

#[tokio::test]
async fn an_unknown_invocation_exits_2_with_a_hint_never_a_clean_audit_of_nothing() {
    let f = Fixture::start().await;
    let opts = f.options(Some("no-such-invocation"));
    let err = verify_build::run(&opts).await.expect_err("an audit of nothing must not pass");
    assert!(err.downcast_ref::<NothingToAudit>().is_some(), "{err:#}");

    let (code, stdout, stderr) = binary(&opts, &[]).await;
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    for hint in ["nothing to audit", "no-such-invocation", "--invocation_id", "--history-retention", "--server"] {
        assert!(stderr.contains(hint), "the hint names {hint:?}: {stderr}");
    }
    assert!(!stdout.contains("0 cache hits audited"), "{stdout}");
    let (code, stdout, _) = binary(&opts, &["--json"]).await;
    assert_eq!(code, 2);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["error"]["code"], "nothing_to_audit", "{doc}");
    assert_eq!(doc["summary"]["exit_code"], 2, "{doc}");
}

// ---------------------------------------------------------------- point 2

#[tokio::test]
async fn lookups_injected_under_a_victims_invocation_name_the_injector_and_reader_audits_the_victim_alone() {
    let mut f = Fixture::start().await;
    let (a, b) = (f.write("inject-a").await, f.write("inject-b").await);
    let bad = f.write("inject-bad").await;
    f.alter_at_rest(&bad);

    let id = "victim-build";
    lookup(&mut f.victim, id, &a, ("Genrule", "//app:a")).await.unwrap();
    lookup(&mut f.victim, id, &b, ("Genrule", "//app:b")).await.unwrap();
    // Mallory's lookups: one of a good entry with forged claims, one of a failing entry.
    lookup(&mut f.mallory, id, &a, ("Forged", "//evil:backdoor")).await.unwrap();
    assert_eq!(lookup(&mut f.mallory, id, &bad, ("Genrule", "//evil:fail")).await.unwrap_err(), tonic::Code::NotFound);
    f.records(id, 4).await;

    let report = audit(&f.options(Some(id))).await;
    assert_eq!(report.exit_code(), 1, "{}", verify_build::to_text(&report));
    let multiple: Vec<_> = report.findings.iter().filter(|x| x.code == Code::MultipleReaders).collect();
    assert_eq!(multiple.len(), 1, "{:?}", report.findings);
    assert!(multiple[0].detail.contains(&format!("{MALLORY} (2 lookups)")), "{}", multiple[0].detail);
    assert!(multiple[0].detail.contains(&format!("{VICTIM} (2 lookups)")), "{}", multiple[0].detail);
    let forged = report.hits.iter().find(|h| h.claims.target_id == "//evil:backdoor").expect("the forged lookup");
    assert_eq!((forged.reader.as_str(), forged.claims.action_mnemonic.as_str()), (MALLORY, "Forged"));
    assert!(verify_build::to_text(&report).contains(MALLORY), "the table names the injector");

    let mut only_victim = f.options(Some(id));
    only_victim.reader = Some(VICTIM.into());
    let report = audit(&only_victim).await;
    assert_clean(&report);
    assert_eq!(report.hits.len(), 2);
    assert!(report.hits.iter().all(|h| h.reader == VICTIM && h.writer == WRITER), "{:?}", report.hits);
    assert!(report.readers.iter().any(|r| r.principal == MALLORY && r.hits == 2 && !r.audited), "{:?}", report.readers);

    only_victim.reader = Some("spiffe://provcache.dev/nobody".into());
    let err = verify_build::run(&only_victim).await.unwrap_err();
    assert!(err.downcast_ref::<NothingToAudit>().is_some() && format!("{err:#}").contains(MALLORY), "{err:#}");
}

// ---------------------------------------------------------------- point 4

#[tokio::test]
async fn a_result_of_2_7_mb_with_its_history_is_auditable() {
    let mut f = Fixture::start().await;
    let action = upload_action(&mut f.writer, "", "large").await;
    // What makes the result large does not matter to the audit; one
    // metadata entry keeps the test independent of output-count caps.
    let stats =
        prost_types::Any { type_url: "type.googleapis.com/example.BuildStats".into(), value: noise(2_700_000, 7) };
    let result = reapi::ActionResult {
        execution_metadata: Some(reapi::ExecutedActionMetadata {
            auxiliary_metadata: vec![stats],
            ..Default::default()
        }),
        ..Default::default()
    };
    f.writer.ac.update_action_result(update("", &action, result)).await.unwrap();
    assert!(f.stored(&action).canonical_result.len() > 2_700_000);
    lookup(&mut f.victim, "large-build", &action, ("Genrule", "//:large")).await.unwrap();
    f.records("large-build", 1).await;
    let report = audit(&f.options(Some("large-build"))).await;
    assert_clean(&report);
    assert_eq!(report.hits.len(), 1);
}

// ---------------------------------------------------------------- point 8

#[tokio::test]
async fn an_execution_log_alone_audits_a_valid_build_clean() {
    let mut f = Fixture::start().await;
    let mut hits = Vec::new();
    for salt in ["exec-a", "exec-b"] {
        let action = f.write(salt).await;
        let out = sha(format!("output of {salt}").as_bytes());
        lookup(&mut f.victim, "exec-build", &action, ("Genrule", salt)).await.unwrap();
        hits.push((action, out));
    }
    let dir = tempfile::tempdir().unwrap();
    let log = exec_log(dir.path(), &hits.iter().map(|(a, o)| (a, o)).collect::<Vec<_>>());
    let mut opts = f.options(None);
    opts.exec_log = Some(log);
    let report = audit(&opts).await;
    assert_clean(&report);
    assert_eq!(report.hits.len(), 2);
    assert!(report.hits.iter().all(|h| h.writer == WRITER), "{:?}", report.hits);
}

#[tokio::test]
async fn a_key_revoked_in_the_auditors_policy_is_the_revocation_finding_not_a_vanished_version() {
    let mut f = Fixture::start().await;
    let action = f.write("revoked").await;
    lookup(&mut f.victim, "revoked-build", &action, ("Genrule", "//:r")).await.unwrap();
    f.records("revoked-build", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let revoked = dir.path().join("revoked.toml");
    let text = std::fs::read_to_string(f.policy()).unwrap().replace("state = \"active\"", "state = \"revoked\"");
    std::fs::write(&revoked, text).unwrap();
    let mut opts = f.options(Some("revoked-build"));
    opts.policy = revoked;
    let report = audit(&opts).await;
    assert_eq!(report.exit_code(), 1);
    let hit = &report.hits[0];
    let codes: Vec<(Code, Option<&str>)> = hit.findings.iter().map(|x| (x.code, x.reason.as_deref())).collect();
    assert_eq!(codes, vec![(Code::ServedEntryInvalid, Some("key_revoked"))], "{:?}", hit.findings);
}

#[tokio::test]
async fn an_unknown_field_in_the_stored_canonical_bytes_fails_verify_builds_own_check() {
    let mut f = Fixture::start().await;
    let action = f.write("unknown-field").await;
    lookup(&mut f.victim, "unknown-field-build", &action, ("Genrule", "//:u")).await.unwrap();
    f.records("unknown-field-build", 1).await;
    assert_clean(&audit(&f.options(Some("unknown-field-build"))).await);

    // Field 999 (varint 1) appended at rest: a decoder drops it, the hash does not.
    let entry = f.stored(&action);
    let mut bytes = entry.canonical_result.to_vec();
    bytes.extend_from_slice(&[0xb8, 0x3e, 0x01]);
    assert_eq!(reapi::ActionResult::decode(&bytes[..]).unwrap().encode_to_vec(), entry.canonical_result.to_vec());
    f.put_stored(&action, &StoredActionEntry { canonical_result: Bytes::from(bytes), ..entry });
    assert_eq!(
        lookup(&mut f.writer, "", &action, ("", "")).await.unwrap_err(),
        tonic::Code::NotFound,
        "the server rejects it"
    );

    let report = audit(&f.options(Some("unknown-field-build"))).await;
    let findings: Vec<(Code, Option<&str>)> =
        report.hits[0].findings.iter().map(|x| (x.code, x.reason.as_deref())).collect();
    assert_eq!(findings, vec![(Code::StoredEntryInvalid, Some("result_mismatch"))], "{:?}", report.hits);
}

#[tokio::test]
async fn two_lookups_of_one_action_are_both_audited() {
    let mut f = Fixture::start().await;
    let action = f.write("twice").await;
    for _ in 0..2 {
        lookup(&mut f.victim, "twice-build", &action, ("Genrule", "//:t")).await.unwrap();
    }
    f.records("twice-build", 2).await;
    let report = audit(&f.options(Some("twice-build"))).await;
    assert_clean(&report);
    let sequences: Vec<Option<u64>> = report.hits.iter().map(|h| h.sequence).collect();
    assert_eq!(sequences, vec![Some(1), Some(2)]);
}

#[tokio::test]
async fn the_trust_policy_flag_is_named_as_serves_and_audits_a_build_clean() {
    let mut f = Fixture::start().await;
    let action = f.write("renamed").await;
    lookup(&mut f.victim, "renamed-build", &action, ("Genrule", "//:r")).await.unwrap();
    f.records("renamed-build", 1).await;
    let (code, stdout, stderr) = binary_with(&f.options(Some("renamed-build")), "--trust-policy", &[]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}

// ---------------------------------------------------------------- point 9

#[tokio::test]
async fn the_json_is_versioned_with_reason_codes_policy_server_time_options_and_marked_claims() {
    let mut f = Fixture::start().await;
    let action = f.write("json").await;
    lookup(&mut f.victim, "json-build", &action, ("Genrule", "//:j")).await.unwrap();
    lookup(&mut f.mallory, "json-build", &action, ("Forged", "//evil:x")).await.unwrap();
    f.records("json-build", 2).await;
    let opts = f.options(Some("json-build"));
    let (code, stdout, stderr) = binary(&opts, &["--json", "--deep"]).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["schema_version"], 1);
    assert_eq!(doc["invocation"], "json-build");
    assert_eq!(doc["server"], opts.target.url.as_str());
    assert!(humantime::parse_rfc3339(doc["audited_at"].as_str().unwrap()).is_ok(), "{doc}");
    let policy_sha = hex::encode(Sha256::digest(std::fs::read(f.policy()).unwrap()));
    assert_eq!(doc["policy"]["sha256"], policy_sha.as_str());
    assert_eq!(doc["policy"]["policy_version"], 1);
    assert_eq!(doc["options"], serde_json::json!({ "deep": true, "reader": null, "exec_log": false }));
    assert_eq!(doc["findings"][0]["code"], "multiple_readers", "{doc}");
    assert_eq!(doc["summary"]["exit_code"], 1);
    let hits = doc["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0]["reader"], VICTIM);
    assert_eq!(hits[1]["reader"], MALLORY);
    assert_eq!(hits[1]["claims"]["action_mnemonic"], "Forged", "claims are marked as claims: {}", hits[1]);
    assert_eq!(hits[1]["claims"]["target_id"], "//evil:x");
    assert!(hits[0].get("mnemonic").is_none() && hits[0].get("target").is_none(), "no unmarked claims");
    assert_eq!(hits[0]["verdict"], "ok");
    assert_eq!(hits[0]["writer"], WRITER);

    let mut victim_only = opts.clone();
    victim_only.reader = Some(VICTIM.into());
    let (code, stdout, _) = binary(&victim_only, &["--json", "--reader", VICTIM]).await;
    assert_eq!(code, 0, "{stdout}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["options"]["reader"], VICTIM);
    assert_eq!(doc["summary"]["clean"], true);
}

// ---------------------------------------------------------------- point 3

/// Deletes the hit-log row of `invocation` with `sequence` from the live store.
fn delete_hit_record(server: &TestServer, invocation: &str, sequence: u64) {
    let page = server.store.audit_list(invocation, None, usize::MAX, usize::MAX).unwrap();
    let row = page.rows.iter().find(|r| r.sequence == Some(sequence)).expect("the row to delete");
    server.store.audit_delete_raw(&row.key).unwrap();
}

/// Three lookups of a build, recorded: the actions and their outputs. With
/// `altered`, the second entry is altered at rest before its lookup.
async fn three_hits(f: &mut Fixture, invocation: &str, altered: bool) -> Vec<(reapi::Digest, reapi::Digest)> {
    let mut hits = Vec::new();
    for i in 0..3 {
        let salt = format!("{invocation}-{i}");
        let action = f.write(&salt).await;
        if altered && i == 1 {
            f.alter_at_rest(&action);
        }
        lookup(&mut f.victim, invocation, &action, ("Genrule", &salt)).await.unwrap();
        hits.push((action, sha(format!("output of {salt}").as_bytes())));
    }
    f.records(invocation, 3).await;
    hits
}

#[tokio::test]
async fn a_served_tamper_hidden_by_deleting_its_hit_record_at_rest_is_a_gap_naming_it() {
    // Issue 14 point 3: a flag-mode server serves an altered entry (record
    // 2); the audit fails. Then record 2's row is deleted at rest.
    let mut f = Fixture::start_in(provcache::provenance::Mode::Flag).await;
    three_hits(&mut f, "deleted-middle", true).await;
    let report = audit(&f.options(Some("deleted-middle"))).await;
    assert_eq!(report.hits[1].findings[0].code, Code::ServerFlagged, "{}", verify_build::to_text(&report));

    delete_hit_record(&f.server, "deleted-middle", 2);
    let report = audit(&f.options(Some("deleted-middle"))).await;
    assert_eq!(report.exit_code(), 1, "{}", verify_build::to_text(&report));
    assert_eq!(report.hits.len(), 2, "the remaining hits are audited, and are clean");
    assert!(report.hits.iter().all(|h| h.findings.is_empty()), "{:?}", report.hits);
    let gaps: Vec<&str> =
        report.findings.iter().filter(|x| x.code == Code::HitChainGap).map(|x| x.detail.as_str()).collect();
    assert_eq!(gaps.len(), 1, "{:?}", report.findings);
    assert!(gaps[0].contains("hit records 2 are missing"), "the gap is named: {}", gaps[0]);
}

#[tokio::test]
async fn a_deleted_tail_of_the_chain_is_visible_only_with_the_execution_log() {
    let mut f = Fixture::start().await;
    let hits = three_hits(&mut f, "deleted-tail", false).await;
    delete_hit_record(&f.server, "deleted-tail", 3);

    // A shorter chain is a valid chain: the limit docs/audit.md states.
    let report = audit(&f.options(Some("deleted-tail"))).await;
    assert_clean(&report);
    assert_eq!(report.hits.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let mut opts = f.options(Some("deleted-tail"));
    opts.exec_log = Some(exec_log(dir.path(), &hits.iter().map(|(a, o)| (a, o)).collect::<Vec<_>>()));
    let report = audit(&opts).await;
    assert_eq!(report.exit_code(), 1);
    let missing: Vec<&str> =
        report.findings.iter().filter(|x| x.code == Code::ExecLogHitNotInHitLog).map(|x| x.detail.as_str()).collect();
    assert_eq!(missing.len(), 1, "{:?}", report.findings);
    assert!(missing[0].contains(&hits[2].0.hash), "names the unrecorded action: {}", missing[0]);
}
