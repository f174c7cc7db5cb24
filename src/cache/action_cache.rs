//! The Action Cache domain: its two use cases, signed writes and verified,
//! completeness-checked reads, whole (the gRPC handlers only parse,
//! authorize and map errors).
//!
//! Writes require the Action and its Command in the CAS and every blob the
//! result references ([`crate::cache::action_result`]); the stored value is the
//! canonical result and the envelope that signs it. Reads never return a
//! result whose blobs are gone, nor (in reject mode) one that fails
//! verification; every answer is recorded in the hit log.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::access::gate::Caller;
use crate::cache::action_result::{self, dedup, PreparedResult};
use crate::cache::audit::AuditLog;
use crate::cache::cas::Cas;
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::limits::Enforcer;
use crate::proto::prov::storage::StoredActionEntry;
use crate::proto::reapi;
use crate::provenance::hit_log::{self, Answer};
use crate::provenance::signing;
use crate::provenance::verify::Reason;
use crate::provenance::{Mode, Origin, Provenance, Subject};
use crate::store::action_store::ActionStore;

/// Inlined bytes in a GetActionResult reply stay within this budget.
pub const INLINE_BUDGET: usize = 3 * 1024 * 1024;

/// Loops over a result's outputs let other calls run this often.
const YIELD_EVERY: usize = 1024;

/// What GetActionResult asks to inline.
#[derive(Debug, Default, Clone)]
pub struct InlineRequest {
    /// Inline stdout.
    pub stdout: bool,
    /// Inline stderr.
    pub stderr: bool,
    /// Output file paths to inline, as a set: inlining costs one lookup per
    /// output, never outputs × names.
    pub files: HashSet<String>,
}

impl InlineRequest {
    /// The inlining a GetActionResult asks for, refused (INVALID_ARGUMENT
    /// naming `limits.max_inline_names`) when it names more output files
    /// than that: a request can otherwise make the server compare hundreds
    /// of thousands of names.
    pub fn new(stdout: bool, stderr: bool, files: Vec<String>, limits: &Enforcer) -> Result<Self> {
        let max = limits.limits().max_inline_names as u64;
        limits.at_most("max_inline_names", "inline_output_files names too many files", files.len() as u64, max)?;
        Ok(InlineRequest { stdout, stderr, files: files.into_iter().collect() })
    }
}

/// The Action Cache: its two use cases, GetActionResult ([`ActionCache::get`])
/// and UpdateActionResult ([`ActionCache::update`]), whole, so they can be
/// tested without gRPC.
#[derive(Debug)]
pub struct ActionCache {
    cas: Arc<Cas>,
    actions: Arc<dyn ActionStore>,
    provenance: Arc<Provenance>,
    audit: Arc<AuditLog>,
}

/// A GetActionResult, parsed and authorized.
#[derive(Debug)]
pub struct Lookup<'a> {
    /// The instance.
    pub instance: &'a InstanceName,
    /// The digest function as the request named it (unset means SHA-256):
    /// the signed statement must name the same.
    pub digest_function: i32,
    /// The action.
    pub action: Digest,
    /// What to inline.
    pub inline: InlineRequest,
    /// The reader's server-attested identity, for the hit log.
    pub reader: &'a str,
    /// The reader's claims (`RequestMetadata`), for the hit log.
    pub claims: Option<reapi::RequestMetadata>,
    /// The reader's limits.
    pub limits: &'a Enforcer,
}

/// An UpdateActionResult, parsed and authorized.
#[derive(Debug)]
pub struct Update<'a> {
    /// The instance.
    pub instance: &'a InstanceName,
    /// The digest function as the request named it (unset means SHA-256).
    pub digest_function: i32,
    /// The action.
    pub action: Digest,
    /// The result as sent; absent is INVALID_ARGUMENT, but only after the
    /// signer check (a server that cannot sign says so first).
    pub result: Option<reapi::ActionResult>,
    /// The writer, recorded in the signed statement.
    pub caller: &'a Caller,
    /// The writer's claims, recorded (as claims) in the signed statement.
    pub claims: Option<reapi::RequestMetadata>,
    /// The writer's limits.
    pub limits: &'a Enforcer,
}

impl ActionCache {
    /// An Action Cache whose entries are in `actions`, whose results
    /// reference blobs in `cas`, signed and verified by `provenance`, and
    /// whose answers are recorded in `audit`.
    pub fn new(
        cas: Arc<Cas>,
        actions: Arc<dyn ActionStore>,
        provenance: Arc<Provenance>,
        audit: Arc<AuditLog>,
    ) -> Self {
        ActionCache { cas, actions, provenance, audit }
    }

    /// GetActionResult after authorization: load, verify (a failure is a
    /// miss in reject mode, flagged in flag mode), check that every
    /// referenced blob is present, record the answer in the hit log, inline
    /// what was asked, attach the envelope (and the flag). A miss is
    /// `Error::NotFound`, so the client rebuilds.
    pub async fn get(&self, lookup: Lookup<'_>) -> Result<reapi::ActionResult> {
        let (instance, action) = (lookup.instance, lookup.action);
        let Some((raw, entry)) = self.load(instance, action).await? else {
            return Err(Error::NotFound(format!("action {action} is not in the cache")));
        };
        let function = signing::effective_digest_function(lookup.digest_function);
        let subject = Subject { instance, digest_function: function, action };
        let hits =
            Hits { audit: &self.audit, claims: lookup.claims.as_ref(), subject: &subject, reader: lookup.reader };
        let (origin, flagged) = self.verify(&subject, &raw, &entry, &hits)?;
        let references_signed = origin.as_ref().is_some_and(|o| o.references_signed);
        if let Err(e) = self.check_complete(instance, action, &entry, references_signed, lookup.limits).await {
            self.provenance.counters().record_failure(Reason::MissingBlob);
            hits.record(Reason::MissingBlob.as_str(), origin.as_deref(), false);
            return Err(e);
        }
        hits.record(flagged.map(|r| r.as_str()).unwrap_or("hit"), origin.as_deref(), true);
        let mut result = reapi::ActionResult::decode(entry.canonical_result.clone())
            .map_err(|_| Error::NotFound(format!("action {action} has an undecodable stored result")))?;
        match self.inline(instance, action, &mut result, &lookup.inline).await {
            Ok(()) => {}
            // A referenced blob found corrupt while inlining was just removed
            // from the CAS: the result is incomplete now, so it is a miss
            // (read-path check 9), not an error the client cannot act on.
            Err(Error::DataLoss(detail)) => {
                self.provenance.counters().record_failure(Reason::MissingBlob);
                tracing::warn!(%action, instance = %instance, %detail, "a blob of a stored result is corrupt");
                return Err(Error::NotFound(format!("action {action} references a corrupt blob: {detail}")));
            }
            Err(e) => return Err(e),
        }
        if !entry.envelope.is_empty() {
            signing::attach_envelope_bytes(&mut result, entry.envelope.to_vec());
        }
        if let Some(reason) = flagged {
            signing::attach_status(&mut result, &reason.to_status());
        }
        Ok(result)
    }

    /// Read-path checks 1-8 ([`Provenance::verify`]): the entry's origin
    /// when it verifies. When it does not: in reject mode a miss (recorded
    /// in the hit log), in flag mode no origin and the reason to flag.
    fn verify(
        &self,
        subject: &Subject<'_>,
        raw: &[u8],
        entry: &StoredActionEntry,
        hits: &Hits<'_>,
    ) -> Result<(Option<Arc<Origin>>, Option<Reason>)> {
        let (instance, action) = (subject.instance, subject.action);
        match self.provenance.verify(subject, &verification_key(instance, &action), raw, entry) {
            Ok(origin) => Ok((Some(origin), None)),
            Err(reason) => {
                tracing::warn!(%action, instance = %instance, reason = reason.as_str(), "stored result failed verification");
                match self.provenance.mode() {
                    Mode::Reject => {
                        hits.record(reason.as_str(), None, false);
                        Err(Error::NotFound(format!(
                            "action {action}: the stored result failed verification ({reason}) and is treated as a miss"
                        )))
                    }
                    Mode::Flag => Ok((None, Some(reason))),
                }
            }
        }
    }

    /// UpdateActionResult after authorization: refuse at once without a
    /// usable signing key, then prepare (completeness, de-inlining,
    /// canonical form), sign the result and its list of referenced blobs,
    /// store both. Returns the stored result with its envelope. The crash
    /// points (crash tests, R3) sit between the steps.
    pub async fn update(&self, update: Update<'_>) -> Result<reapi::ActionResult> {
        let (instance, action) = (update.instance, update.action);
        // Fail closed before any work: no usable key, no Action Cache writes.
        let signer = self.provenance.require_signer()?;
        let result = update
            .result
            .ok_or_else(|| Error::InvalidArgument("UpdateActionResult without an action_result".into()))?;
        let prepared = action_result::prepare(&self.cas, instance, action, result, update.limits).await?;
        crash_point("ac-after-prepare");
        let canonical = prepared.result.encode_to_vec();
        let function = signing::effective_digest_function(update.digest_function);
        let subject = Subject { instance, digest_function: function, action };
        let envelope = self.provenance.sign(&signer, &subject, &prepared, &canonical, update.caller, update.claims);
        let referenced: Vec<reapi::Digest> = prepared.referenced.iter().map(|d| d.to_proto()).collect();
        let references = self.provenance.sign_references(&signer, &subject, &canonical, &referenced);
        crash_point("ac-after-sign");
        self.store(instance, action, &prepared, canonical, envelope.clone(), references).await?;
        let mut reply = prepared.result;
        signing::attach_envelope_bytes(&mut reply, envelope);
        Ok(reply)
    }

    /// Stores a prepared result: its canonical bytes and the envelope that
    /// signs them, side by side, with a history record, in one synced batch.
    async fn store(
        &self,
        instance: &InstanceName,
        action: Digest,
        prepared: &PreparedResult,
        canonical: Vec<u8>,
        envelope: Vec<u8>,
        references_envelope: Vec<u8>,
    ) -> Result<StoredActionEntry> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let entry = StoredActionEntry {
            canonical_result: Bytes::from(canonical),
            envelope: Bytes::from(envelope),
            stored_at_unix: now.as_secs() as i64,
            referenced_blobs: prepared.referenced.iter().map(Digest::to_proto).collect(),
            references_envelope: Bytes::from(references_envelope),
        };
        self.actions.put(instance, &action, entry.encode_to_vec(), now.as_nanos() as u64).await?;
        Ok(entry)
    }

    /// Loads the stored entry of an action: the raw stored bytes and the
    /// decoded entry. `Ok(None)` on a miss.
    async fn load(&self, instance: &InstanceName, action: Digest) -> Result<Option<(Vec<u8>, StoredActionEntry)>> {
        let value = match self.actions.get(instance, &action).await {
            Ok(Some(value)) => value,
            Ok(None) => return Ok(None),
            // Damaged storage (a block failing its checksum) loses this
            // entry: a miss, so the client rebuilds (threat model R8).
            Err(e) if e.code() == tonic::Code::DataLoss => {
                tracing::error!(%action, error = %e, "Action Cache value unreadable; treating as a miss");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        match StoredActionEntry::decode(&value[..]) {
            Ok(entry) => Ok(Some((value, entry))),
            Err(e) => {
                tracing::warn!(%action, error = %e, "undecodable Action Cache value; treating as a miss");
                Ok(None)
            }
        }
    }

    /// Checks that every blob a stored entry references is still present.
    /// A complete entry (and each of its blobs) counts as used.
    ///
    /// The stored `referenced_blobs` list is used only when
    /// `references_signed` (its signature verified with the entry's, see
    /// [`crate::provenance::Origin::references_signed`]); otherwise the list
    /// is derived from the canonical result about to be served (outputs,
    /// stdout/stderr, each output directory's Tree and the files it names),
    /// so a list cleared or altered at rest never makes an incomplete result
    /// a hit.
    async fn check_complete(
        &self,
        instance: &InstanceName,
        action: Digest,
        entry: &StoredActionEntry,
        references_signed: bool,
        limits: &Enforcer,
    ) -> Result<()> {
        let digests = if references_signed {
            let mut digests = Vec::with_capacity(entry.referenced_blobs.len());
            for d in &entry.referenced_blobs {
                digests.push(Digest::from_proto(action.function, Some(d)).map_err(|_| {
                    Error::NotFound(format!("action result {action} has a corrupt blob list; treating as a miss"))
                })?);
            }
            digests
        } else {
            let result = reapi::ActionResult::decode(entry.canonical_result.clone())
                .map_err(|_| Error::NotFound(format!("action {action} has an undecodable stored result")))?;
            let derived = action_result::referenced_blobs(&self.cas, instance, action.function, &result, limits)
                .await
                .map_err(|e| match e {
                    Error::InvalidArgument(e) | Error::DataLoss(e) => Error::NotFound(format!(
                        "action result {action} names an unusable blob ({e}); treating as a miss"
                    )),
                    other => other,
                })?;
            dedup(derived.into_iter().map(|(d, _)| d).collect())
        };
        if let Some(missing) = self.cas.first_missing(instance, digests).await? {
            return Err(Error::NotFound(format!("action result {action} references missing blob {missing}")));
        }
        self.actions.touch(instance, &action);
        Ok(())
    }

    /// Fills inlined bytes the client asked for, within [`INLINE_BUDGET`].
    async fn inline(
        &self,
        instance: &InstanceName,
        action: Digest,
        result: &mut reapi::ActionResult,
        ask: &InlineRequest,
    ) -> Result<()> {
        let f = action.function;
        let mut budget = INLINE_BUDGET.saturating_sub(result.encoded_len());
        if ask.stdout {
            if let Some(d) = fits(f, result.stdout_digest.as_ref(), &mut budget) {
                if let Some(data) = self.cas.get(instance, d, d.size).await? {
                    result.stdout_raw = data;
                }
            }
        }
        if ask.stderr {
            if let Some(d) = fits(f, result.stderr_digest.as_ref(), &mut budget) {
                if let Some(data) = self.cas.get(instance, d, d.size).await? {
                    result.stderr_raw = data;
                }
            }
        }
        for (i, file) in result.output_files.iter_mut().enumerate() {
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
            if ask.files.contains(&file.path) {
                if let Some(d) = fits(f, file.digest.as_ref(), &mut budget) {
                    if let Some(data) = self.cas.get(instance, d, d.size).await? {
                        file.contents = data;
                    }
                }
            }
        }
        Ok(())
    }
}

fn fits(f: crate::cache::digest::DigestFunction, d: Option<&reapi::Digest>, budget: &mut usize) -> Option<Digest> {
    let d = Digest::from_proto(f, d).ok()?;
    if d.size as usize <= *budget {
        *budget -= d.size as usize;
        Some(d)
    } else {
        None
    }
}

/// What keys the verifier's cache of verified entries for one action (with
/// the stored bytes): an entry copied to another action is verified afresh.
fn verification_key(instance: &InstanceName, action: &Digest) -> Vec<u8> {
    let name = instance.as_str().as_bytes();
    let mut key = Vec::with_capacity(8 + name.len() + 1 + 32 + 8);
    key.extend_from_slice(&(name.len() as u64).to_be_bytes());
    key.extend_from_slice(name);
    key.push(action.function.storage_code());
    key.extend_from_slice(&action.hash);
    key.extend_from_slice(&action.size.to_be_bytes());
    key
}

/// Records the answers of one GetActionResult in the hit log (the rules are
/// in [`hit_log`]).
struct Hits<'a> {
    audit: &'a Arc<AuditLog>,
    claims: Option<&'a reapi::RequestMetadata>,
    subject: &'a Subject<'a>,
    reader: &'a str,
}

impl Hits<'_> {
    fn record(&self, verdict: &str, origin: Option<&Origin>, served: bool) {
        let answer = Answer { subject: self.subject, verdict, origin, served, reader: self.reader };
        if let Some(record) = hit_log::record_of(&answer, self.claims, std::time::SystemTime::now()) {
            self.audit.record(record);
        }
    }
}
