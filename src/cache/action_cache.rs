//! The Action Cache domain: completeness-checked writes and reads.
//!
//! Writes require the Action and its Command in the CAS and every blob the
//! result references; inlined bytes are moved into the CAS; the stored value
//! is the canonical result. Reads never return a result whose blobs are gone.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::cache::cas::{blocking, Cas, MAX_ACTION_BLOB};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::limits::Enforcer;
use crate::proto::prov::storage::StoredActionEntry;
use crate::proto::reapi;
use crate::store::{Key, Kind};

/// The largest canonical ActionResult accepted (a stored entry must still fit
/// in a default 4 MiB gRPC message when read back).
pub const MAX_RESULT_BYTES: usize = 3 * 1024 * 1024;
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

/// The Action Cache.
#[derive(Debug)]
pub struct ActionCache {
    cas: Arc<Cas>,
}

/// A validated UpdateActionResult, ready to be stored.
#[derive(Debug)]
pub struct PreparedResult {
    /// The canonical result (no inlined bytes, no envelopes).
    pub result: reapi::ActionResult,
    /// Every CAS blob it references.
    pub referenced: Vec<Digest>,
    /// From the Action blob.
    pub command_digest: Digest,
    /// From the Action blob.
    pub input_root_digest: Option<Digest>,
}

impl ActionCache {
    /// An Action Cache whose results reference blobs in `cas`.
    pub fn new(cas: Arc<Cas>) -> Self {
        ActionCache { cas }
    }

    /// Checks an UpdateActionResult: within the caller's limits on outputs
    /// and referenced blobs (checked before any Tree is read), Action and
    /// Command present, inlined bytes moved to the CAS, every referenced blob
    /// present.
    pub async fn prepare(
        &self,
        instance: &InstanceName,
        action: Digest,
        mut result: reapi::ActionResult,
        limits: &Enforcer,
    ) -> Result<PreparedResult> {
        let f = action.function;
        let outputs = result.output_files.len()
            + result.output_file_symlinks.len()
            + result.output_symlinks.len()
            + result.output_directories.len()
            + result.output_directory_symlinks.len();
        let max = limits.limits().max_result_outputs as u64;
        limits.at_most("max_result_outputs", "the action result lists too many outputs", outputs as u64, max)?;
        let Some(action_msg) = self.cas.get_message::<reapi::Action>(instance, action, MAX_ACTION_BLOB).await? else {
            return Err(Error::FailedPrecondition(format!(
                "missing blob {action} (the Action): upload it to the CAS first"
            )));
        };
        let command_digest = Digest::from_proto(f, action_msg.command_digest.as_ref())
            .map_err(|e| Error::InvalidArgument(format!("Action {action} has an invalid command_digest: {e}")))?;
        let input_root_digest = match &action_msg.input_root_digest {
            Some(d) => Some(Digest::from_proto(f, Some(d)).map_err(|e| {
                Error::InvalidArgument(format!("Action {action} has an invalid input_root_digest: {e}"))
            })?),
            None => None,
        };
        if let Some(missing) = self.cas.first_missing(instance, vec![command_digest]).await? {
            return Err(Error::FailedPrecondition(format!(
                "missing blob {missing} (the Command of Action {action}): upload it to the CAS first"
            )));
        }

        // De-inline: raw bytes go to the CAS, the result keeps digests only.
        let stdout = std::mem::take(&mut result.stdout_raw);
        result.stdout_digest = self.de_inline(instance, f, stdout, result.stdout_digest.take(), "stdout").await?;
        let stderr = std::mem::take(&mut result.stderr_raw);
        result.stderr_digest = self.de_inline(instance, f, stderr, result.stderr_digest.take(), "stderr").await?;
        for file in &mut result.output_files {
            let contents = std::mem::take(&mut file.contents);
            let what = format!("output file {:?}", file.path);
            if file.digest.is_none() {
                return Err(Error::InvalidArgument(format!("{what} has no digest")));
            }
            file.digest = self.de_inline(instance, f, contents, file.digest.take(), &what).await?;
        }

        let referenced = self.referenced_blobs(instance, f, &result, limits).await?;
        if let Some(missing) = self.cas.first_missing(instance, referenced.iter().map(|(d, _)| *d).collect()).await? {
            let what = referenced.iter().find(|(d, _)| *d == missing).map(|(_, w)| w.as_str()).unwrap_or("a blob");
            return Err(Error::FailedPrecondition(format!(
                "missing blob {missing} ({what}): upload every output to the CAS before UpdateActionResult"
            )));
        }
        // A writer cannot smuggle in signatures or verification marks, whatever the host of their type URL.
        crate::provenance::signing::strip_writer_marks(&mut result);
        let result = crate::provenance::signing::canonicalize(&result);
        if result.encoded_len() > MAX_RESULT_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the action result encodes to {} bytes, over the {MAX_RESULT_BYTES}-byte limit",
                result.encoded_len()
            )));
        }
        Ok(PreparedResult {
            result,
            referenced: dedup(referenced.into_iter().map(|(d, _)| d).collect()),
            command_digest,
            input_root_digest,
        })
    }

    /// Stores a prepared result: its canonical bytes and the envelope that
    /// signs them, side by side, with a history record, in one synced batch.
    pub async fn store(
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
        let key = Key::new(instance, &action);
        let store = self.cas.store().clone();
        let value = entry.encode_to_vec();
        let nanos = now.as_nanos() as u64;
        blocking(move || store.ac_put(&key, &value, nanos)).await?;
        Ok(entry)
    }

    /// Loads the stored entry of an action: the raw stored bytes and the
    /// decoded entry. `Ok(None)` on a miss.
    pub async fn load(&self, instance: &InstanceName, action: Digest) -> Result<Option<(Vec<u8>, StoredActionEntry)>> {
        let key = Key::new(instance, &action);
        // From memory on this thread when possible (see Store::ac_get_cached).
        let value = match self.cas.store().ac_get_cached(&key) {
            Some(value) => value,
            None => {
                let store = self.cas.store().clone();
                blocking(move || store.ac_get(&key)).await
            }
        };
        let value = match value {
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
    pub async fn check_complete(
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
            let derived =
                self.referenced_blobs(instance, action.function, &result, limits).await.map_err(|e| match e {
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
        self.cas.store().touch(Kind::Action, &Key::new(instance, &action));
        Ok(())
    }

    /// Fills inlined bytes the client asked for, within [`INLINE_BUDGET`].
    pub async fn inline(
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

    async fn de_inline(
        &self,
        instance: &InstanceName,
        f: crate::cache::digest::DigestFunction,
        raw: Bytes,
        given: Option<reapi::Digest>,
        what: &str,
    ) -> Result<Option<reapi::Digest>> {
        let given = match given {
            Some(d) => {
                Some(Digest::from_proto(f, Some(&d)).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?)
            }
            None => None,
        };
        if raw.is_empty() {
            return Ok(given.map(|d| d.to_proto()));
        }
        let computed = Digest::of(f, &raw);
        if let Some(g) = given {
            if g != computed {
                return Err(Error::InvalidArgument(format!(
                    "{what}: inlined bytes hash to {computed}, but the digest given is {g}"
                )));
            }
        }
        self.cas.put(instance, computed, raw).await?;
        Ok(Some(computed.to_proto()))
    }

    /// Every blob a result references, with a description for error messages:
    /// output files, stdout/stderr, each output directory's Tree and every
    /// file inside it; at most `limits.max_referenced_blobs` of them, counted
    /// before each Tree is decoded, because every read of the result checks
    /// them all.
    async fn referenced_blobs(
        &self,
        instance: &InstanceName,
        f: crate::cache::digest::DigestFunction,
        result: &reapi::ActionResult,
        limits: &Enforcer,
    ) -> Result<Vec<(Digest, String)>> {
        let max = limits.limits().max_referenced_blobs as u64;
        let parse = |d: Option<&reapi::Digest>, what: &str| {
            Digest::from_proto(f, d).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))
        };
        let mut out = Vec::new();
        for file in &result.output_files {
            let what = format!("output file {:?}", file.path);
            out.push((parse(file.digest.as_ref(), &what)?, what));
        }
        if let Some(d) = &result.stdout_digest {
            out.push((parse(Some(d), "stdout")?, "stdout".into()));
        }
        if let Some(d) = &result.stderr_digest {
            out.push((parse(Some(d), "stderr")?, "stderr".into()));
        }
        for dir in &result.output_directories {
            let what = format!("tree of output directory {:?}", dir.path);
            let tree_digest = parse(dir.tree_digest.as_ref(), &what)?;
            out.push((tree_digest, what.clone()));
            limits.at_most(
                "max_referenced_blobs",
                "the action result references too many blobs",
                out.len() as u64,
                max,
            )?;
            let left = max - out.len() as u64;
            let Some(tree) = self.cas.get_tree_message(instance, tree_digest, left, limits).await? else {
                continue; // reported as missing by the caller
            };
            for d in tree.root.iter().chain(tree.children.iter()) {
                for file in &d.files {
                    let what = format!("file {:?} in output directory {:?}", file.name, dir.path);
                    out.push((parse(file.digest.as_ref(), &what)?, what));
                }
            }
        }
        limits.at_most("max_referenced_blobs", "the action result references too many blobs", out.len() as u64, max)?;
        Ok(out)
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

fn dedup(mut v: Vec<Digest>) -> Vec<Digest> {
    v.sort();
    v.dedup();
    v.retain(|d| !d.is_empty_blob());
    v
}
