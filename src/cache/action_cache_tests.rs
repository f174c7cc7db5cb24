//! Unit tests of the Action Cache use cases ([`ActionCache::get`] and
//! [`ActionCache::update`]) and the hit log they write, without a server or
//! gRPC: entries and hit records in [`MemoryActions`], blobs in a
//! [`MemoryStore`] ([`memory_cas`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::access::gate::Caller;
use crate::cache::action_cache::{ActionCache, InlineRequest, Lookup, Update};
use crate::cache::audit::AuditLog;
use crate::cache::cas::Cas;
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::InstanceName;
use crate::error::Error;
use crate::limits::{Enforcer, LimitHits, Limits};
use crate::proto::prov::storage::StoredActionEntry;
use crate::proto::prov::HitRecord;
use crate::proto::reapi;
use crate::provenance::verify::Reason;
use crate::provenance::{Mode, Provenance, ProvenanceConfig};
use crate::store::action_store::ActionStore;
use crate::store::memory::MemoryStore;
use crate::store::memory_actions::MemoryActions;

const WRITER: &str = "spiffe://provcache.dev/writer";
const READER: &str = "spiffe://provcache.dev/reader";

/// An empty CAS in memory.
fn memory_cas() -> Arc<Cas> {
    Arc::new(Cas::new(Arc::new(MemoryStore::new(None))))
}

/// An Action Cache over in-memory entries, and what its calls need.
struct Fixture {
    _pki: tempfile::TempDir,
    cas: Arc<Cas>,
    actions: Arc<MemoryActions>,
    provenance: Arc<Provenance>,
    audit: Arc<AuditLog>,
    ac: ActionCache,
    limits: Enforcer,
    instance: InstanceName,
}

impl Fixture {
    fn new(mode: Mode) -> Self {
        let actions = Arc::new(MemoryActions::new());
        let dir = tempfile::tempdir().unwrap();
        let (signing_key, trust_policy) = crate::access::pki::ensure_dev_signing(&dir.path().join("pki")).unwrap();
        let config = ProvenanceConfig {
            signing_key,
            trust_policy,
            mode,
            server_id: "unit".into(),
            verification_disabled: false,
            signing_disabled: false,
        };
        let provenance = Arc::new(Provenance::new(config, Arc::new(std::time::SystemTime::now)).unwrap());
        let (limits, limit_hits) = (Arc::new(Limits::default()), Arc::new(LimitHits::default()));
        let max = limits.max_hit_records_per_principal;
        let audit =
            Arc::new(AuditLog::new(actions.clone(), actions.clone(), provenance.clone(), max, limit_hits.clone()));
        let cas = memory_cas();
        let ac = ActionCache::new(cas.clone(), actions.clone(), provenance.clone(), audit.clone());
        let limits = Enforcer::new(limits, limit_hits, READER);
        Fixture { _pki: dir, cas, actions, provenance, audit, ac, limits, instance: InstanceName::default() }
    }

    /// Uploads an Action, its Command and one output file; returns the
    /// action and a result naming the output.
    async fn action_with_output(&self, output: &[u8]) -> (Digest, reapi::ActionResult) {
        let command = reapi::Command { arguments: vec!["true".into()], ..Default::default() }.encode_to_vec();
        let command_digest = self.put(command).await;
        let action = reapi::Action { command_digest: Some(command_digest.to_proto()), ..Default::default() };
        let action = self.put(action.encode_to_vec()).await;
        let file = self.put(output.to_vec()).await;
        let output = reapi::OutputFile { path: "out".into(), digest: Some(file.to_proto()), ..Default::default() };
        (action, reapi::ActionResult { output_files: vec![output], exit_code: 0, ..Default::default() })
    }

    async fn put(&self, data: Vec<u8>) -> Digest {
        let digest = Digest::of(DigestFunction::Sha256, &data);
        self.cas.put(&self.instance, digest, Bytes::from(data)).await.unwrap();
        digest
    }

    /// Another Action Cache sharing this one's keys, trust and hit log.
    fn action_cache(&self, cas: Arc<Cas>, actions: Arc<dyn ActionStore>) -> ActionCache {
        ActionCache::new(cas, actions, self.provenance.clone(), self.audit.clone())
    }

    async fn update_in(
        &self,
        ac: &ActionCache,
        action: Digest,
        result: reapi::ActionResult,
    ) -> Result<reapi::ActionResult, Error> {
        let caller = Caller { principal: WRITER.into(), rule: "writers".into(), cert: None };
        let (instance, limits) = (&self.instance, &self.limits);
        let update = Update {
            instance,
            digest_function: 0,
            action,
            result: Some(result),
            caller: &caller,
            claims: None,
            limits,
        };
        ac.update(update).await
    }

    async fn update(&self, action: Digest, result: reapi::ActionResult) -> reapi::ActionResult {
        self.update_in(&self.ac, action, result).await.unwrap()
    }

    async fn get_from(&self, ac: &ActionCache, action: Digest, invocation: &str) -> Result<reapi::ActionResult, Error> {
        let claims = reapi::RequestMetadata { tool_invocation_id: invocation.into(), ..Default::default() };
        let inline = InlineRequest::default();
        let (instance, limits) = (&self.instance, &self.limits);
        let lookup =
            Lookup { instance, digest_function: 0, action, inline, reader: READER, claims: Some(claims), limits };
        ac.get(lookup).await
    }

    async fn get(&self, action: Digest, invocation: &str) -> Result<reapi::ActionResult, Error> {
        self.get_from(&self.ac, action, invocation).await
    }

    /// Rewrites the stored entry of `action` as an attacker with write
    /// access to the storage would.
    async fn alter_at_rest(&self, action: Digest, alter: impl FnOnce(&mut reapi::ActionResult)) {
        let raw = self.actions.get(&self.instance, &action).await.unwrap().unwrap();
        let mut entry = StoredActionEntry::decode(&raw[..]).unwrap();
        let mut result = reapi::ActionResult::decode(entry.canonical_result.clone()).unwrap();
        alter(&mut result);
        entry.canonical_result = Bytes::from(result.encode_to_vec());
        self.actions.put(&self.instance, &action, entry.encode_to_vec(), 0).await.unwrap();
    }

    /// The hit records of `invocation`, once `count` are stored (they are
    /// written off the request path).
    async fn hit_records(&self, invocation: &str, count: usize) -> Vec<(HitRecord, usize)> {
        for _ in 0..500 {
            let page = self.audit.list_hits(invocation, 0, "").await.unwrap();
            if page.records.len() >= count {
                let envelopes = page.records.into_iter().map(|l| l.record.envelope.unwrap());
                return envelopes.map(|e| (HitRecord::decode(e.payload).unwrap(), e.signatures.len())).collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{count} hit records of {invocation:?} never arrived");
    }
}

#[tokio::test]
async fn a_signed_entry_round_trips_from_update_to_get() {
    let f = Fixture::new(Mode::Reject);
    let (action, result) = f.action_with_output(b"output bytes").await;
    let stored = f.update(action, result.clone()).await;
    assert_eq!(crate::provenance::signing::envelopes(&stored).len(), 1, "the reply carries the signed envelope");
    let served = f.get(action, "").await.unwrap();
    assert_eq!(served, stored);
    assert_eq!(served.output_files, result.output_files);
    assert_eq!(f.actions.history(&f.instance, &action).await.unwrap().len(), 1);
    assert_eq!(f.actions.touches(&f.instance, &action), 1, "a hit counts the entry as used");
    assert_eq!(f.provenance.counters().signed(), 1);
    assert_eq!(f.provenance.counters().verified(), 1);
}

#[tokio::test]
async fn an_entry_altered_at_rest_is_a_miss_in_reject_mode() {
    let f = Fixture::new(Mode::Reject);
    let (action, result) = f.action_with_output(b"output bytes").await;
    f.update(action, result).await;
    f.alter_at_rest(action, |r| r.exit_code = 1).await;
    match f.get(action, "inv-altered").await {
        Err(Error::NotFound(message)) => assert!(message.contains("failed verification"), "{message}"),
        other => panic!("an altered entry was not a miss: {other:?}"),
    }
    let (record, _) = f.hit_records("inv-altered", 1).await.remove(0);
    assert!(!record.served && record.verdict != "hit", "{record:?}");
}

#[tokio::test]
async fn an_entry_altered_at_rest_is_served_flagged_in_flag_mode() {
    let f = Fixture::new(Mode::Flag);
    let (action, result) = f.action_with_output(b"output bytes").await;
    f.update(action, result).await;
    f.alter_at_rest(action, |r| r.exit_code = 1).await;
    let served = f.get(action, "").await.unwrap();
    assert_eq!(served.exit_code, 1, "flag mode serves the entry as stored");
    let metadata = served.execution_metadata.unwrap_or_default();
    let flags = metadata
        .auxiliary_metadata
        .iter()
        .filter(|a| a.type_url == crate::provenance::signing::STATUS_TYPE_URL)
        .count();
    assert_eq!(flags, 1, "the served result says why it failed verification");
}

#[tokio::test]
async fn a_result_whose_referenced_blob_is_missing_is_a_miss() {
    let f = Fixture::new(Mode::Reject);
    let (action, result) = f.action_with_output(b"an output that will be lost").await;
    f.update(action, result).await;
    // The same entries over a CAS that never held the output.
    let empty = f.action_cache(memory_cas(), f.actions.clone());
    match f.get_from(&empty, action, "inv-missing").await {
        Err(Error::NotFound(message)) => assert!(message.contains("references missing blob"), "{message}"),
        other => panic!("an incomplete entry was not a miss: {other:?}"),
    }
    assert_eq!(f.provenance.counters().failed(Reason::MissingBlob), 1);
    let (record, _) = f.hit_records("inv-missing", 1).await.remove(0);
    assert_eq!((record.verdict.as_str(), record.served), (Reason::MissingBlob.as_str(), false));
}

#[tokio::test]
async fn a_hit_is_recorded_in_the_hit_log_with_the_reader() {
    let f = Fixture::new(Mode::Reject);
    let (action, result) = f.action_with_output(b"output bytes").await;
    f.update(action, result).await;
    f.get(action, "inv-hit").await.unwrap();
    f.get(action, "inv-hit").await.unwrap();
    let records = f.hit_records("inv-hit", 2).await;
    for (i, (record, signatures)) in records.iter().enumerate() {
        assert_eq!(record.reader_principal, READER);
        assert_eq!(record.writer_principal, WRITER);
        assert_eq!((record.verdict.as_str(), record.served), ("hit", true));
        assert_eq!(record.action_digest, Some(action.to_proto()));
        assert_eq!(record.sequence, i as u64 + 1, "records are chained in order");
        assert_eq!(*signatures, 1, "records are signed with the server's key");
    }
    let first = f.audit.list_hits("inv-hit", 1, "").await.unwrap();
    assert_eq!(first.records.len(), 1);
    let second = f.audit.list_hits("inv-hit", 1, &first.next_page_token).await.unwrap();
    assert_eq!(second.records.len(), 1, "the page token continues the listing");
    assert!(f.audit.list_hits("inv-other", 1, &first.next_page_token).await.is_err(), "a token is for one invocation");
}

/// Retention purges whole chains: an invocation whose records are all older
/// than the cut-off goes, and its id, reused, starts a new chain at 1; a
/// live invocation's chain continues where it was.
#[tokio::test]
async fn a_purged_invocation_starts_a_new_chain_and_a_live_one_continues() {
    let f = Fixture::new(Mode::Reject);
    let (action, result) = f.action_with_output(b"output bytes").await;
    f.update(action, result).await;
    f.get(action, "inv-old").await.unwrap();
    f.hit_records("inv-old", 1).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    f.get(action, "inv-live").await.unwrap();
    f.hit_records("inv-live", 1).await;
    f.audit.purge(cutoff).await.unwrap();
    f.get(action, "inv-old").await.unwrap();
    f.get(action, "inv-live").await.unwrap();
    let sequences = |records: Vec<(HitRecord, usize)>| records.iter().map(|(r, _)| r.sequence).collect::<Vec<_>>();
    assert_eq!(sequences(f.hit_records("inv-old", 1).await), [1], "a reused id starts a new chain");
    assert_eq!(sequences(f.hit_records("inv-live", 2).await), [1, 2], "a live chain continues");
}

/// A crash between signing and storing (the `ac-after-sign` crash point)
/// leaves no entry and no history. The crash aborts the process, so the
/// test runs itself again in a child process with the crash point armed,
/// over a RocksDB action store that outlives the child.
#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_crash_between_signing_and_storing_leaves_no_entry() {
    use crate::store::rocks::{RocksStore, StoreOptions};
    use std::path::Path;
    const CHILD_DIR: &str = "PROVCACHE_UNIT_CRASH_DIR";
    // The trait is implemented on the shared handle the server holds.
    let open_actions = |dir: &Path| -> Arc<dyn ActionStore> {
        let store =
            RocksStore::open(&dir.join("actions"), &StoreOptions { sync: false, ..Default::default() }).unwrap();
        Arc::new(Arc::new(store))
    };
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let (f, dir) = (Fixture::new(Mode::Reject), std::path::PathBuf::from(dir));
        let (action, result) = f.action_with_output(b"output bytes").await;
        let ac = f.action_cache(f.cas.clone(), open_actions(&dir));
        std::fs::write(dir.join("action"), action.to_proto().encode_to_vec()).unwrap();
        let outcome = f.update_in(&ac, action, result).await;
        panic!("the crash point did not abort the process: {outcome:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("{}::a_crash_between_signing_and_storing_leaves_no_entry", test_module()),
            "--nocapture",
        ])
        .env(CHILD_DIR, dir.path())
        .env("PROVCACHE_FAILPOINT", "ac-after-sign")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&child.stderr);
    assert!(stderr.contains("aborting at ac-after-sign"), "the child did not crash at the point: {stderr}");
    let action = reapi::Digest::decode(&std::fs::read(dir.path().join("action")).unwrap()[..]).unwrap();
    let action = Digest::from_proto(DigestFunction::Sha256, Some(&action)).unwrap();
    let actions = open_actions(dir.path());
    let instance = InstanceName::default();
    assert_eq!(actions.get(&instance, &action).await.unwrap(), None, "no entry after the crash");
    assert!(actions.history(&instance, &action).await.unwrap().is_empty(), "no history after the crash");
}

/// This module's path as the test harness names tests (without the crate).
#[cfg(feature = "failpoints")]
fn test_module() -> &'static str {
    module_path!().split_once("::").map_or("", |(_, path)| path)
}
