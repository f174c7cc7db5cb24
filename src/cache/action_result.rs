//! What a cached result is made of: the checks that turn an
//! UpdateActionResult into a storable result (limits, Action and Command
//! present, inlined bytes moved to the CAS, every referenced blob present,
//! canonical form) and the list of blobs a result references, which every
//! read checks again.

use bytes::Bytes;
use prost::Message;

use crate::cache::cas::{Cas, MAX_ACTION_BLOB};
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::error::{Error, Result};
use crate::limits::Enforcer;
use crate::proto::reapi;

/// The largest canonical ActionResult accepted (a stored entry must still fit
/// in a default 4 MiB gRPC message when read back).
pub const MAX_RESULT_BYTES: usize = 3 * 1024 * 1024;

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

/// Checks an UpdateActionResult: within the caller's limits on outputs
/// and referenced blobs (checked before any Tree is read), Action and
/// Command present, inlined bytes moved to the CAS, every referenced blob
/// present.
pub async fn prepare(
    cas: &Cas,
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
    let Some(action_msg) = cas.get_message::<reapi::Action>(instance, action, MAX_ACTION_BLOB).await? else {
        return Err(Error::FailedPrecondition(format!(
            "missing blob {action} (the Action): upload it to the CAS first"
        )));
    };
    let command_digest = Digest::from_proto(f, action_msg.command_digest.as_ref())
        .map_err(|e| Error::InvalidArgument(format!("Action {action} has an invalid command_digest: {e}")))?;
    let input_root_digest =
        match &action_msg.input_root_digest {
            Some(d) => Some(Digest::from_proto(f, Some(d)).map_err(|e| {
                Error::InvalidArgument(format!("Action {action} has an invalid input_root_digest: {e}"))
            })?),
            None => None,
        };
    if let Some(missing) = cas.first_missing(instance, vec![command_digest]).await? {
        return Err(Error::FailedPrecondition(format!(
            "missing blob {missing} (the Command of Action {action}): upload it to the CAS first"
        )));
    }

    // De-inline: raw bytes go to the CAS, the result keeps digests only.
    let stdout = std::mem::take(&mut result.stdout_raw);
    result.stdout_digest = de_inline(cas, instance, f, stdout, result.stdout_digest.take(), "stdout").await?;
    let stderr = std::mem::take(&mut result.stderr_raw);
    result.stderr_digest = de_inline(cas, instance, f, stderr, result.stderr_digest.take(), "stderr").await?;
    for file in &mut result.output_files {
        let contents = std::mem::take(&mut file.contents);
        let what = format!("output file {:?}", file.path);
        if file.digest.is_none() {
            return Err(Error::InvalidArgument(format!("{what} has no digest")));
        }
        file.digest = de_inline(cas, instance, f, contents, file.digest.take(), &what).await?;
    }

    let referenced = referenced_blobs(cas, instance, f, &result, limits).await?;
    if let Some(missing) = cas.first_missing(instance, referenced.iter().map(|(d, _)| *d).collect()).await? {
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

/// Moves inlined bytes to the CAS: the digest to keep in the result, which
/// must match the bytes when the writer gave one as well.
async fn de_inline(
    cas: &Cas,
    instance: &InstanceName,
    f: crate::cache::digest::DigestFunction,
    raw: Bytes,
    given: Option<reapi::Digest>,
    what: &str,
) -> Result<Option<reapi::Digest>> {
    let given = match given {
        Some(d) => Some(Digest::from_proto(f, Some(&d)).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?),
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
    cas.put(instance, computed, raw).await?;
    Ok(Some(computed.to_proto()))
}

/// Every blob a result references, with a description for error messages:
/// output files, stdout/stderr, each output directory's Tree and every
/// file inside it; at most `limits.max_referenced_blobs` of them, counted
/// before each Tree is decoded, because every read of the result checks
/// them all.
pub async fn referenced_blobs(
    cas: &Cas,
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
        limits.at_most("max_referenced_blobs", "the action result references too many blobs", out.len() as u64, max)?;
        let left = max - out.len() as u64;
        let Some(tree) = cas.get_tree_message(instance, tree_digest, left, limits).await? else {
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

/// Sorted, without duplicates or the empty blob (always present).
pub fn dedup(mut v: Vec<Digest>) -> Vec<Digest> {
    v.sort();
    v.dedup();
    v.retain(|d| !d.is_empty_blob());
    v
}
