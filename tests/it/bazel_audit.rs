//! verify-build against real Bazel builds: a writer build W fills the cache,
//! a reader build R gets every action from it, and an auditor with only the
//! trust policy checks R's hits and their lineage; over mTLS, lookups another
//! identity injects under R's invocation id are named, and `--reader` audits
//! R's own.

use std::path::Path;
use std::process::{Command, Output};

use std::time::Duration;

use prost::Message;
use provcache::proto::prov::audit_client::AuditClient;
use provcache::proto::prov::storage::StoredActionEntry;
use provcache::proto::prov::HitRecord;
use provcache::store::rocks::{Key, RocksStore};

use crate::bazel::BazelWorkspace;
use crate::bazel_tls::{netty_tcnative_startup_flags, refs, verify_build_as, DevPkiFlags};
use crate::common::{records_of, request_metadata, wait_for_hit_envelopes, Clients, ServerProcess};

struct Audit {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Audit {
    fn of(out: Output) -> Self {
        Audit {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

fn verify_build(server: &ServerProcess, policy: &Path, args: &[&str]) -> Audit {
    let out = Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(["verify-build", "--server", &server.url(), "--policy"])
        .arg(policy)
        .args(args)
        .output()
        .expect("running verify-build");
    Audit::of(out)
}

fn json_hits(a: &Audit) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&a.stdout).unwrap_or_else(|e| panic!("verify-build --json: {e}\n{}", a.stdout));
    v["hits"].as_array().cloned().unwrap_or_default()
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn verify_build_audits_a_real_build_and_names_what_fails() {
    let mut server = ServerProcess::start_plaintext();
    let mut ws = BazelWorkspace::new();
    let flag = server.remote_cache_flag();
    let writer = ws.build(&[&flag]);
    assert_eq!(writer.remote_cache_hits(), 0, "the writer builds cold");
    ws.fresh_output_base();
    let reader = ws.build(&[&flag, "--remote_upload_local_results=false"]);
    let (hits, spawns) = reader.hits();
    assert_eq!(hits, spawns, "the reader gets every action from the cache");
    let r_id = reader.run.invocation_id.clone();
    let w_id = writer.run.invocation_id.clone();
    let policy = server.pki_dir().join("trust-policy.toml");

    // By invocation: exit 0, every hit traced to the writer build W.
    let a = verify_build(&server, &policy, &["--invocation", &r_id]);
    assert_eq!(a.code, 0, "verify-build failed:\n{}\n{}", a.stdout, a.stderr);
    assert!(a.stdout.contains(&w_id), "the writer's invocation is named as origin:\n{}", a.stdout);
    println!("verify-build --invocation {r_id}\n{}", a.stdout);
    assert!(a.stdout.contains(&format!("{hits} cache hits audited: {hits} verified, 0 failed")), "{}", a.stdout);
    let j = verify_build(&server, &policy, &["--invocation", &r_id, "--json"]);
    assert_eq!(j.code, 0, "{}", j.stderr);
    let entries = json_hits(&j);
    assert_eq!(entries.len(), hits);
    for h in &entries {
        assert_eq!(h["claims"]["origin_invocation_id"], w_id.as_str(), "the writer's claim, marked as one: {h}");
        assert_eq!(h["writer"], "plaintext", "the plaintext server's principal signs as writer: {h}");
        assert!(h["findings"].as_array().unwrap().is_empty(), "{h}");
    }

    // With the execution log (outputs compared) and --deep (blobs re-hashed).
    let exec_log = reader.run.exec_log.to_string_lossy().into_owned();
    let a = verify_build(&server, &policy, &["--invocation", &r_id, "--exec-log", &exec_log, "--deep"]);
    assert_eq!(a.code, 0, "with --exec-log --deep:\n{}\n{}", a.stdout, a.stderr);
    // A Bazel 4 execution log alone has no action digests: the audit cannot run.
    let a = verify_build(&server, &policy, &["--exec-log", &exec_log]);
    assert_eq!(a.code, 2, "{}\n{}", a.stdout, a.stderr);

    // The auditor revokes the key: every hit is a finding (exit 1), whatever the server thinks.
    let revoked = tempfile::NamedTempFile::new().unwrap();
    let text = std::fs::read_to_string(&policy).unwrap().replace("state = \"active\"", "state = \"revoked\"");
    std::fs::write(revoked.path(), text).unwrap();
    let a = verify_build(&server, revoked.path(), &["--invocation", &r_id, "--json"]);
    assert_eq!(a.code, 1, "{}", a.stderr);
    for h in json_hits(&a) {
        let codes: Vec<(&str, &str)> = h["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["code"].as_str().unwrap(), f["reason"].as_str().unwrap_or("")))
            .collect();
        assert_eq!(codes, vec![("served_entry_invalid", "key_revoked")], "the revocation, not a vanished entry: {h}");
    }

    // Alter one stored entry at rest (server stopped): exactly that action is named.
    server.stop();
    let altered = {
        let store = RocksStore::open(&provcache::server::db_path(server.data_dir()), &Default::default()).unwrap();
        let (key, value) = store.ac_entries().next().unwrap().unwrap();
        let mut entry = StoredActionEntry::decode(&value[..]).unwrap();
        let mut bytes = entry.canonical_result.to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        entry.canonical_result = bytes.into();
        store.ac_put_raw(&key, &entry.encode_to_vec()).unwrap();
        let (_, digest) = Key::decode(&key).unwrap();
        digest.hash_hex()
    };
    server.start_again();
    let j = verify_build(&server, &policy, &["--invocation", &r_id, "--json"]);
    assert_eq!(j.code, 1, "{}\n{}", j.stdout, j.stderr);
    let failed: Vec<String> = json_hits(&j)
        .iter()
        .filter(|h| !h["findings"].as_array().unwrap().is_empty())
        .map(|h| h["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed.len(), 1, "exactly one action fails: {failed:?}");
    println!(
        "after altering {altered}: verify-build --invocation {r_id}\n{}",
        verify_build(&server, &policy, &["--invocation", &r_id]).stdout
    );
    assert!(failed[0].starts_with(&altered), "{failed:?} names {altered}");

    // The next reader build rebuilds exactly that action, and its audit names it.
    let flag = server.remote_cache_flag();
    ws.fresh_output_base();
    let again = ws.build(&[&flag, "--remote_upload_local_results=false"]);
    assert_eq!(again.hits(), (spawns - 1, spawns), "exactly the altered action is rebuilt");
    let a = verify_build(&server, &policy, &["--invocation", &again.run.invocation_id, "--json"]);
    assert_eq!(a.code, 1, "{}", a.stderr);
    let named: Vec<String> = json_hits(&a)
        .iter()
        .filter(|h| !h["findings"].as_array().unwrap().is_empty())
        .map(|h| h["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(named.len(), 1, "{named:?}");
    assert!(named[0].starts_with(&altered));
    ws.shutdown();
}

/// The dev PKI's principals (certificate URI SANs).
const READER: &str = "spiffe://provcache.dev/reader";
const WRITER: &str = "spiffe://provcache.dev/writer";

/// The invocation's hit-log records, read as the auditor, once at least `n`
/// are there (or after 10 s).
async fn hit_records(server: &ServerProcess, invocation: &str, n: usize) -> Vec<HitRecord> {
    let mut audit = AuditClient::new(server.dev_channel("auditor").await).max_decoding_message_size(8 << 20);
    records_of(&wait_for_hit_envelopes(&mut audit, invocation, n, Duration::from_secs(10)).await)
}

/// `verify-build --invocation INVOCATION ARGS` as the dev PKI's auditor.
fn verify_build_mtls(server: &ServerProcess, pki: &DevPkiFlags, invocation: &str, args: &[&str]) -> Audit {
    Audit::of(verify_build_as(server, pki, "auditor", invocation, args))
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn lookups_injected_under_a_real_builds_invocation_are_named_and_reader_keeps_the_honest_result() {
    let server = ServerProcess::start(Vec::<String>::new());
    let pki = DevPkiFlags::of(&server);
    let jni = tempfile::tempdir().unwrap();
    let mut ws = BazelWorkspace::new();
    ws.set_startup_flags(netty_tcnative_startup_flags(jni.path()));
    let writer = ws.build(&refs(&pki.client("writer", false)));
    assert_eq!(writer.remote_cache_hits(), 0, "the writer builds cold");
    ws.fresh_output_base();
    let reader = ws.build(&refs(&pki.client("reader", true)));
    let (hits, spawns) = reader.hits();
    assert_eq!(hits, spawns, "the developer build gets every action from the cache");
    let r_id = reader.run.invocation_id.clone();

    // A second client (the CI writer's identity) looks up two of the build's
    // actions under the build's invocation id, with forged claims.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let records = hit_records(&server, &r_id, hits).await;
        assert_eq!(records.len(), hits);
        let mut injector = Clients::new(server.dev_channel("writer").await);
        let claims = request_metadata(&r_id, "Forged", "//evil:backdoor");
        for record in records.iter().take(2) {
            let action = record.action_digest.as_ref().unwrap();
            injector.lookup_as(&record.instance_name, action, &claims).await.expect("the injected lookup is a hit");
        }
        let recorded = hit_records(&server, &r_id, hits + 2).await.len();
        assert!(recorded >= hits + 2, "the injected lookups are recorded within 10 s");
    });

    // The audit of the whole invocation names the injector and fails.
    let a = verify_build_mtls(&server, &pki, &r_id, &[]);
    println!("verify-build --invocation {r_id} (with injected lookups)\n{}", a.stdout);
    assert_eq!(a.code, 1, "{}\n{}", a.stdout, a.stderr);
    assert!(a.stdout.contains(&format!("{WRITER} (2 lookups)")), "the injector is named: {}", a.stdout);
    assert!(a.stdout.contains(&format!("{READER} ({hits} lookups)")), "{}", a.stdout);
    let j = verify_build_mtls(&server, &pki, &r_id, &["--json"]);
    let injected: Vec<serde_json::Value> = json_hits(&j).into_iter().filter(|h| h["reader"] == WRITER).collect();
    assert_eq!(injected.len(), 2);
    assert!(injected.iter().all(|h| h["claims"]["target_id"] == "//evil:backdoor"), "{injected:?}");

    // Audited as the build's own identity, the honest result stands.
    let a = verify_build_mtls(&server, &pki, &r_id, &["--reader", READER]);
    println!("verify-build --invocation {r_id} --reader {READER}\n{}", a.stdout);
    assert_eq!(a.code, 0, "{}\n{}", a.stdout, a.stderr);
    assert!(a.stdout.contains(&format!("{hits} cache hits audited: {hits} verified, 0 failed")), "{}", a.stdout);
    let j = verify_build_mtls(&server, &pki, &r_id, &["--reader", READER, "--json"]);
    let entries = json_hits(&j);
    assert_eq!(entries.len(), hits);
    for h in &entries {
        assert_eq!(h["reader"], READER, "{h}");
        assert_eq!(h["writer"], WRITER, "{h}");
        assert_eq!(h["claims"]["origin_invocation_id"], writer.run.invocation_id.as_str(), "{h}");
    }
    ws.shutdown();
}
