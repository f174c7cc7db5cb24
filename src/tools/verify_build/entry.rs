//! Auditing one lookup: fetch every stored version of the action (paged),
//! find the version the build was served, verify it and the version stored
//! now with the auditor's trust policy, and check the blobs it references.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use prost::Message;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

use super::exec_log::{result_outputs, Outputs};
use super::report::{AuditedHit, Claims, Code, Finding};
use super::MAX_REPLY_BYTES;
use crate::cache::digest::{Digest, DigestFunction};
use crate::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use crate::proto::prov::audit_client::AuditClient;
use crate::proto::prov::{ActionResultStatement, Envelope, GetStoredEntryRequest, HitRecord, StoredEntry};
use crate::proto::reapi::{self, content_addressable_storage_client::ContentAddressableStorageClient};
use crate::provenance::signing;
use crate::provenance::trust::TrustPolicy;
use crate::provenance::verify::{verify_stored, Expected, Reason, Verified};

/// Where a lookup to audit comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A record of the server's hit log.
    HitLog,
    /// A remote cache hit of the execution log that the hit log lacks; the
    /// version used is the one whose outputs the log shows.
    ExecLog(Outputs),
}

/// One stored version of an entry, as the auditor checks it.
#[derive(Debug)]
pub struct Version {
    /// The result with its envelope attached.
    pub result: reapi::ActionResult,
    /// The canonical bytes to verify: the stored bytes when the server sent
    /// them (they differ from the re-encoding, e.g. an unknown field at
    /// rest), else `canon(result)`.
    canonical: Vec<u8>,
}

impl Version {
    fn new(entry: StoredEntry) -> Option<Self> {
        let result = entry.result?;
        let canonical = if entry.stored_canonical_result.is_empty() {
            signing::canonical_bytes(&result)
        } else {
            entry.stored_canonical_result.to_vec()
        };
        Some(Version { result, canonical })
    }

    /// Read-path checks 1-8 on exactly these bytes, as the server runs them.
    fn verify(&self, policy: &TrustPolicy, expected: &Expected, now: SystemTime) -> Result<Verified, Reason> {
        verify_stored(policy, &signing::envelopes(&self.result), &self.canonical, expected, now)
    }

    /// The statement, decoded without verification: only to find which
    /// version a hit record names, never to trust it.
    fn unverified_statement(&self) -> Option<ActionResultStatement> {
        let raw = signing::envelopes(&self.result);
        let envelope = Envelope::decode(*raw.first()?).ok()?;
        ActionResultStatement::decode(envelope.payload.as_ref()).ok()
    }

    fn same_as(&self, other: &Version) -> bool {
        self.canonical == other.canonical && signing::envelopes(&self.result) == signing::envelopes(&other.result)
    }
}

/// Every stored version of one action.
#[derive(Debug, Default)]
pub struct Versions {
    /// The entry as stored now.
    pub current: Option<Version>,
    /// Earlier (and the current) versions, oldest first.
    pub history: Vec<Version>,
}

/// Bytes of fetched versions kept for repeated lookups of one action; past
/// this the cache starts over, so a build of many large results cannot
/// exhaust the auditor's memory.
const VERSION_CACHE_BYTES: usize = 256 << 20;

/// Audits lookups, fetching each action's versions once.
pub struct EntryAuditor {
    ch: Channel,
    policy: TrustPolicy,
    deep: bool,
    now: SystemTime,
    versions: HashMap<(String, i32, String, i64), Arc<Versions>>,
    versions_bytes: usize,
    blob_findings: HashMap<(String, [u8; 32]), Vec<Finding>>,
    rehashed: HashMap<(String, String), Option<String>>,
}

fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default()
}

fn ts(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

impl EntryAuditor {
    /// An auditor over one channel with the auditor's trust policy.
    pub fn new(ch: Channel, policy: TrustPolicy, deep: bool, now: SystemTime) -> Self {
        EntryAuditor {
            ch,
            policy,
            deep,
            now,
            versions: HashMap::new(),
            versions_bytes: 0,
            blob_findings: HashMap::new(),
            rehashed: HashMap::new(),
        }
    }

    /// Every stored version of the record's action, all history pages.
    async fn versions(&mut self, record: &HitRecord) -> anyhow::Result<Arc<Versions>> {
        let action = record.action_digest.clone().unwrap_or_default();
        let memo = (record.instance_name.clone(), record.digest_function, action.hash.clone(), action.size_bytes);
        if let Some(v) = self.versions.get(&memo) {
            return Ok(v.clone());
        }
        let mut client = AuditClient::new(self.ch.clone()).max_decoding_message_size(MAX_REPLY_BYTES);
        let mut out = Versions::default();
        let mut token = String::new();
        let mut tokens = HashSet::new();
        loop {
            let page = client
                .get_stored_entry(GetStoredEntryRequest {
                    instance_name: record.instance_name.clone(),
                    action_digest: Some(action.clone()),
                    digest_function: record.digest_function,
                    history_page_size: 0,
                    history_page_token: token.clone(),
                })
                .await
                .with_context(|| format!("fetching the stored entry of {}/{}", action.hash, action.size_bytes))?
                .into_inner();
            if token.is_empty() {
                out.current = page.current.and_then(Version::new);
            }
            out.history.extend(page.history.into_iter().filter_map(Version::new));
            if page.next_history_page_token.is_empty() {
                break;
            }
            if !tokens.insert(page.next_history_page_token.clone()) {
                bail!("the server returned the same history page token twice");
            }
            token = page.next_history_page_token;
        }
        let bytes: usize = out.history.iter().chain(out.current.iter()).map(|v| v.canonical.len()).sum();
        if self.versions_bytes + bytes > VERSION_CACHE_BYTES {
            self.versions.clear();
            self.versions_bytes = 0;
        }
        self.versions_bytes += bytes;
        let out = Arc::new(out);
        self.versions.insert(memo, out.clone());
        Ok(out)
    }

    /// Audits one lookup of the build; also returns the result of the version
    /// the build was served, when it is still stored.
    pub async fn audit(
        &mut self,
        record: &HitRecord,
        source: &Source,
    ) -> anyhow::Result<(AuditedHit, Option<reapi::ActionResult>)> {
        let action = record.action_digest.clone().unwrap_or_default();
        let mut hit = AuditedHit {
            sequence: matches!(source, Source::HitLog).then_some(record.sequence),
            reader: record.reader_principal.clone(),
            instance: record.instance_name.clone(),
            action: format!("{}/{}", action.hash, action.size_bytes),
            answered_at: rfc3339(ts(&record.answered_at)),
            server_verdict: record.verdict.clone(),
            served: record.served,
            claims: Claims {
                action_mnemonic: record.action_mnemonic.clone(),
                target_id: record.target_id.clone(),
                truncated: record.claims_truncated,
                origin_invocation_id: record.origin_invocation_id.clone(),
            },
            writer: record.writer_principal.clone(),
            key_id: record.key_id.clone(),
            signed_at: rfc3339(ts(&record.signed_at)),
            verdict: "ok",
            findings: vec![],
        };
        if record.verdict != "hit" {
            let (code, what) = if record.served {
                (Code::ServerFlagged, "served (flag mode) a stored entry that failed its verification")
            } else {
                (Code::ServerRejected, "rejected the stored entry (a miss; the build did not use it)")
            };
            hit.findings.push(Finding::with_reason(
                code,
                &record.verdict,
                format!("the server {what}: {}", record.verdict),
            ));
        }
        let versions = self.versions(record).await?;
        let expected = Expected {
            instance: record.instance_name.clone(),
            digest_function: record.digest_function,
            action_digest: action.clone(),
        };
        let all = || versions.history.iter().chain(versions.current.iter());
        let served: Option<&Version> = match source {
            Source::HitLog if record.served && record.signed_at.is_some() => {
                // The version signed at the recorded time by the recorded key.
                let named = |v: &&Version| {
                    v.unverified_statement()
                        .is_some_and(|s| ts(&s.signed_at) == ts(&record.signed_at) && s.key_id == record.key_id)
                };
                // History first: it keeps the bytes as written, while the
                // current entry under the same envelope may be altered since.
                versions.history.iter().rev().find(named).or_else(|| versions.current.iter().find(named))
            }
            Source::HitLog => None,
            Source::ExecLog(outputs) => all()
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .find(|v| &result_outputs(&v.result) == outputs)
                .or(versions.current.as_ref()),
        };
        if all().next().is_none() {
            hit.findings.push(Finding::new(
                Code::EntryGone,
                "nothing is stored for this action in any version (evicted, or older than the server's \
                 --history-retention): it cannot be verified",
            ));
        } else if served.is_none() && record.served && matches!(source, Source::HitLog) {
            hit.findings.push(Finding::new(
                Code::ServedVersionGone,
                format!(
                    "the version the build was served (signed at {} with key {}) is no longer stored \
                     (older than the server's --history-retention, or deleted): it cannot be verified",
                    if hit.signed_at.is_empty() { "an unrecorded time" } else { &hit.signed_at },
                    if record.key_id.is_empty() { "-" } else { &record.key_id[..record.key_id.len().min(12)] },
                ),
            ));
        }
        if let Some(version) = served {
            match version.verify(&self.policy, &expected, self.now) {
                Ok(v) => {
                    let origin = v.statement.origin.clone().unwrap_or_default();
                    hit.writer = origin.writer.map(|w| w.principal).unwrap_or_default();
                    hit.claims.origin_invocation_id = origin.claims.map(|c| c.tool_invocation_id).unwrap_or_default();
                    hit.key_id = v.key_id.clone();
                    hit.signed_at = rfc3339(Some(v.signed_at));
                }
                Err(reason) => hit.findings.push(Finding::with_reason(
                    Code::ServedEntryInvalid,
                    reason.as_str(),
                    format!("the version the build was served fails verification: {reason} ({})", reason.as_str()),
                )),
            }
        }
        if let Some(current) = &versions.current {
            if !served.is_some_and(|s| s.same_as(current)) {
                if let Err(reason) = current.verify(&self.policy, &expected, self.now) {
                    hit.findings.push(Finding::with_reason(
                        Code::StoredEntryInvalid,
                        reason.as_str(),
                        format!("the entry as stored now fails verification: {reason} ({})", reason.as_str()),
                    ));
                }
            }
        }
        if let Some(version) = served {
            let findings = self.check_blobs(record, version).await?;
            hit.findings.extend(findings);
        }
        if !hit.findings.is_empty() {
            hit.verdict = "failed";
        }
        Ok((hit, served.map(|v| v.result.clone())))
    }

    /// Referenced blobs (outputs, trees, stdout/stderr, the Action) exist;
    /// with `--deep` they are downloaded and re-hashed. Once per version.
    async fn check_blobs(&mut self, record: &HitRecord, version: &Version) -> anyhow::Result<Vec<Finding>> {
        let memo = (record.instance_name.clone(), Sha256::digest(&version.canonical).into());
        if let Some(f) = self.blob_findings.get(&memo) {
            return Ok(f.clone());
        }
        let result = &version.result;
        let function = DigestFunction::from_proto(record.digest_function).unwrap_or(DigestFunction::Sha256);
        let mut digests: Vec<reapi::Digest> = result.output_files.iter().filter_map(|f| f.digest.clone()).collect();
        digests.extend(result.output_directories.iter().filter_map(|d| d.tree_digest.clone()));
        digests.extend(result.stdout_digest.clone());
        digests.extend(result.stderr_digest.clone());
        digests.extend(record.action_digest.clone());
        let mut seen = HashSet::new();
        digests.retain(|d| seen.insert((d.hash.clone(), d.size_bytes)));
        let missing = ContentAddressableStorageClient::new(self.ch.clone())
            .max_decoding_message_size(MAX_REPLY_BYTES)
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: record.instance_name.clone(),
                blob_digests: digests.clone(),
                digest_function: record.digest_function,
            })
            .await
            .context("FindMissingBlobs")?
            .into_inner()
            .missing_blob_digests;
        let mut findings: Vec<Finding> = missing
            .iter()
            .map(|m| Finding::new(Code::BlobMissing, format!("referenced blob {}/{} is missing", m.hash, m.size_bytes)))
            .collect();
        if self.deep {
            let missing: HashSet<&str> = missing.iter().map(|d| d.hash.as_str()).collect();
            for d in digests.iter().filter(|d| !missing.contains(d.hash.as_str())) {
                let key = (record.instance_name.clone(), d.hash.clone());
                if !self.rehashed.contains_key(&key) {
                    let outcome = self.rehash(&record.instance_name, function, d).await.err().map(|e| format!("{e:#}"));
                    self.rehashed.insert(key.clone(), outcome);
                }
                if let Some(Some(e)) = self.rehashed.get(&key) {
                    findings.push(Finding::new(
                        Code::BlobCorrupt,
                        format!("blob {}/{} does not re-hash: {e}", d.hash, d.size_bytes),
                    ));
                }
            }
        }
        self.blob_findings.insert(memo, findings.clone());
        Ok(findings)
    }

    async fn rehash(&self, instance: &str, function: DigestFunction, d: &reapi::Digest) -> anyhow::Result<()> {
        let want = Digest::from_proto(function, Some(d))?;
        let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
        let fname = if function == DigestFunction::Sha256 { String::new() } else { format!("{}/", function.name()) };
        let name = format!("{prefix}blobs/{fname}{}/{}", d.hash, d.size_bytes);
        let mut stream = ByteStreamClient::new(self.ch.clone())
            .max_decoding_message_size(MAX_REPLY_BYTES)
            .read(ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 })
            .await?
            .into_inner();
        let mut h = function.hasher();
        let mut n = 0u64;
        while let Some(m) = stream.message().await? {
            n += m.data.len() as u64;
            h.update(&m.data);
        }
        if n != want.size || h.finalize() != want.hash {
            bail!("downloaded bytes do not match the digest");
        }
        Ok(())
    }
}
