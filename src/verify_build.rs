//! `provcache verify-build`: an auditor's independent check that every remote
//! cache hit of a build was signed by a trusted key, with lineage.
//!
//! It trusts nothing the server says about verification: it fetches each
//! entry the build used and runs the read-path checks locally with the
//! auditor's trust policy (whatever mode the server runs in), compares the
//! build's outputs with the signed results (with `--exec-log`), and checks
//! that the referenced blobs exist (`--deep`: downloads and re-hashes them
//! and the Action).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use prost::Message;
use serde_json::json;
use tonic::transport::Channel;

use crate::client::{connect, Target};
use crate::digest::{Digest, DigestFunction};
use crate::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use crate::proto::prov::audit_client::AuditClient;
use crate::proto::prov::{GetStoredEntryRequest, HitRecord, ListInvocationHitsRequest};
use crate::proto::reapi::{self, content_addressable_storage_client::ContentAddressableStorageClient};
use crate::trust::verify::{verify_served, Expected, Verified};
use crate::trust::TrustPolicy;

/// What to audit and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Server URL and client credentials (an auditor certificate).
    pub target: Target,
    /// The trust policy holding the public keys to trust.
    pub policy: PathBuf,
    /// The build's invocation id (Bazel `--invocation_id`, BEP `started.uuid`).
    pub invocation: Option<String>,
    /// Bazel's `--execution_log_json_file` of the build.
    pub exec_log: Option<PathBuf>,
    /// Download and re-hash every referenced blob and the Action.
    pub deep: bool,
}

/// One audited cache hit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditedHit {
    /// Instance name.
    pub instance: String,
    /// Action digest, `hash/size`.
    pub action: String,
    /// The reader's claimed mnemonic and target (unverified).
    pub mnemonic: String,
    /// See `mnemonic`.
    pub target: String,
    /// Writer principal from the locally verified statement (or the server's record).
    pub writer: String,
    /// The writer's claimed invocation id: UNVERIFIED.
    pub origin_invocation: String,
    /// Signing key id.
    pub key_id: String,
    /// Signing time (RFC 3339).
    pub signed_at: String,
    /// "ok" or the first finding's reason.
    pub verdict: String,
    /// Everything wrong with this hit.
    pub findings: Vec<String>,
}

/// The result of an audit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The audited invocation, if given.
    pub invocation: Option<String>,
    /// Every hit.
    pub hits: Vec<AuditedHit>,
    /// Findings not tied to one hit (for example unmatched exec-log hits).
    pub other_findings: Vec<String>,
}

impl Report {
    /// Whether anything failed.
    pub fn clean(&self) -> bool {
        self.other_findings.is_empty() && self.hits.iter().all(|h| h.findings.is_empty())
    }
}

/// Output path → (hash, size).
type Outputs = BTreeMap<String, (String, i64)>;

/// A remote cache hit as Bazel's execution log shows it.
#[derive(Debug, Clone)]
struct LoggedHit {
    outputs: Outputs,
    action_digest: Option<reapi::Digest>,
}

fn parse_exec_log(path: &PathBuf) -> anyhow::Result<Vec<LoggedHit>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hits = Vec::new();
    for value in serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>() {
        let value = value.with_context(|| format!("{} is not a Bazel JSON execution log", path.display()))?;
        if value.get("remoteCacheHit").and_then(|v| v.as_bool()) != Some(true) {
            continue;
        }
        let mut outputs = BTreeMap::new();
        for o in value.get("actualOutputs").and_then(|v| v.as_array()).into_iter().flatten() {
            let (Some(p), Some(d)) = (o.get("path").and_then(|v| v.as_str()), o.get("digest")) else { continue };
            let hash = d.get("hash").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let size = d
                .get("sizeBytes")
                .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
                .unwrap_or(0);
            outputs.insert(p.to_string(), (hash, size));
        }
        // Newer Bazel logs carry the spawn's action digest.
        let action_digest = value.get("digest").and_then(|d| {
            Some(reapi::Digest {
                hash: d.get("hash")?.as_str()?.to_string(),
                size_bytes: d
                    .get("sizeBytes")
                    .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))?,
            })
        });
        hits.push(LoggedHit { outputs, action_digest });
    }
    Ok(hits)
}

fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default()
}

fn ts(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

/// The output files a result declares, by path (files inside output
/// directories are not listed by Bazel's execution log either).
fn result_outputs(result: &reapi::ActionResult) -> Outputs {
    result
        .output_files
        .iter()
        .filter_map(|f| f.digest.as_ref().map(|d| (f.path.clone(), (d.hash.clone(), d.size_bytes))))
        .collect()
}

struct Auditor {
    ch: Channel,
    policy: TrustPolicy,
    deep: bool,
}

impl Auditor {
    /// Audits one action the build used.
    async fn audit(&self, record: &HitRecord) -> anyhow::Result<(AuditedHit, Option<reapi::ActionResult>)> {
        let action = record.action_digest.clone().unwrap_or_default();
        let mut hit = AuditedHit {
            instance: record.instance_name.clone(),
            action: format!("{}/{}", action.hash, action.size_bytes),
            mnemonic: record.action_mnemonic.clone(),
            target: record.target_id.clone(),
            writer: record.writer_principal.clone(),
            origin_invocation: record.origin_invocation_id.clone(),
            key_id: record.key_id.clone(),
            signed_at: rfc3339(ts(&record.signed_at)),
            verdict: "ok".into(),
            findings: vec![],
        };
        if record.verdict != "hit" {
            hit.findings.push(format!(
                "the server {} this entry: {}",
                if record.served { "served (flag mode) a failing" } else { "rejected" },
                record.verdict
            ));
        }
        let resp = AuditClient::new(self.ch.clone())
            .get_stored_entry(GetStoredEntryRequest {
                instance_name: record.instance_name.clone(),
                action_digest: Some(action.clone()),
                digest_function: record.digest_function,
                ..Default::default()
            })
            .await
            .with_context(|| format!("fetching the stored entry of {}", hit.action))?
            .into_inner();
        let expected = Expected {
            instance: record.instance_name.clone(),
            digest_function: record.digest_function,
            action_digest: action.clone(),
        };
        let now = SystemTime::now();
        // The version the build was served: the one signed at the recorded time.
        let recorded_at = ts(&record.signed_at);
        let mut used: Option<(reapi::ActionResult, Result<Verified, crate::trust::verify::Reason>)> = None;
        for entry in resp.history.iter().chain(resp.current.iter()) {
            let Some(result) = &entry.result else { continue };
            let v = verify_served(&self.policy, result, &expected, now);
            let matches = match (&v, recorded_at) {
                (Ok(v), Some(at)) => v.signed_at == at && v.key_id == record.key_id,
                _ => false,
            };
            if matches {
                used = Some((result.clone(), v));
                break;
            }
        }
        let current = resp.current.as_ref().and_then(|e| e.result.clone());
        match &current {
            None => hit.findings.push("the action has no stored entry any more".into()),
            Some(result) => {
                if let Err(reason) = verify_served(&self.policy, result, &expected, now) {
                    hit.findings.push(format!("the stored entry fails verification: {}", reason.as_str()));
                }
            }
        }
        let (result, verified) = match used {
            Some((r, v)) => (Some(r), v.ok()),
            None => {
                if record.served && record.verdict == "hit" {
                    hit.findings.push("the entry the build was served is no longer stored".into());
                }
                let v = current.as_ref().and_then(|r| verify_served(&self.policy, r, &expected, now).ok());
                (current.clone(), v)
            }
        };
        if let Some(v) = &verified {
            let origin = v.statement.origin.clone().unwrap_or_default();
            hit.writer = origin.writer.map(|w| w.principal).unwrap_or_default();
            hit.origin_invocation = origin.claims.map(|c| c.tool_invocation_id).unwrap_or_default();
            hit.key_id = v.key_id.clone();
            hit.signed_at = rfc3339(Some(v.signed_at));
        }
        if let Some(r) = &result {
            self.check_blobs(record, r, &mut hit).await?;
        }
        if let Some(first) = hit.findings.first() {
            hit.verdict = first.clone();
        }
        Ok((hit, result))
    }

    async fn check_blobs(
        &self,
        record: &HitRecord,
        result: &reapi::ActionResult,
        hit: &mut AuditedHit,
    ) -> anyhow::Result<()> {
        let function = DigestFunction::from_proto(record.digest_function).unwrap_or(DigestFunction::Sha256);
        let mut digests: Vec<reapi::Digest> = result.output_files.iter().filter_map(|f| f.digest.clone()).collect();
        digests.extend(result.output_directories.iter().filter_map(|d| d.tree_digest.clone()));
        digests.extend(result.stdout_digest.clone());
        digests.extend(result.stderr_digest.clone());
        if let Some(a) = &record.action_digest {
            digests.push(a.clone());
        }
        let missing = ContentAddressableStorageClient::new(self.ch.clone())
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: record.instance_name.clone(),
                blob_digests: digests.clone(),
                digest_function: record.digest_function,
            })
            .await
            .context("FindMissingBlobs")?
            .into_inner()
            .missing_blob_digests;
        for m in &missing {
            hit.findings.push(format!("referenced blob {}/{} is missing", m.hash, m.size_bytes));
        }
        if self.deep {
            let missing: HashSet<String> = missing.iter().map(|d| d.hash.clone()).collect();
            for d in digests.iter().filter(|d| !missing.contains(&d.hash)) {
                if let Err(e) = self.rehash(&record.instance_name, function, d).await {
                    hit.findings.push(format!("blob {}/{} does not re-hash: {e:#}", d.hash, d.size_bytes));
                }
            }
        }
        Ok(())
    }

    async fn rehash(&self, instance: &str, function: DigestFunction, d: &reapi::Digest) -> anyhow::Result<()> {
        let want = Digest::from_proto(function, Some(d))?;
        let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
        let fname = if function == DigestFunction::Sha256 { String::new() } else { format!("{}/", function.name()) };
        let name = format!("{prefix}blobs/{fname}{}/{}", d.hash, d.size_bytes);
        let mut stream = ByteStreamClient::new(self.ch.clone())
            .max_decoding_message_size(64 << 20)
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

async fn list_hits(ch: &Channel, invocation: &str) -> anyhow::Result<Vec<HitRecord>> {
    let mut client = AuditClient::new(ch.clone());
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_invocation_hits(ListInvocationHitsRequest {
                tool_invocation_id: invocation.to_string(),
                page_size: 1000,
                page_token: token.clone(),
            })
            .await
            .context("listing the invocation's hits (ListInvocationHits)")?
            .into_inner();
        // Transitional: the records' signatures and chain are checked in a later step.
        for signed in page.records {
            let payload = signed.envelope.map(|e| e.payload).unwrap_or_default();
            out.push(HitRecord::decode(payload).context("an undecodable hit record")?);
        }
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Runs an audit. `Err` means the audit could not run (exit 2).
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let policy =
        TrustPolicy::load(&opts.policy).map_err(|e| anyhow::anyhow!("trust policy {}: {e}", opts.policy.display()))?;
    let logged = match &opts.exec_log {
        Some(p) => Some(parse_exec_log(p)?),
        None => None,
    };
    if opts.invocation.is_none() {
        match &logged {
            None => bail!("give --invocation ID and/or --exec-log FILE"),
            Some(l) if l.iter().any(|h| h.action_digest.is_none()) => bail!(
                "this execution log carries no action digests (Bazel 4 logs do not); \
                 also pass --invocation with the build's --invocation_id"
            ),
            _ => {}
        }
    }
    let ch = connect(&opts.target).await.with_context(|| format!("connecting to {}", opts.target.url))?;
    let mut records: Vec<HitRecord> = match &opts.invocation {
        Some(id) => list_hits(&ch, id).await?,
        None => Vec::new(),
    };
    // Exec-log hits that name their action digest and the hit log does not list.
    if let Some(logged) = &logged {
        let known: HashSet<String> =
            records.iter().filter_map(|r| r.action_digest.as_ref().map(|d| d.hash.clone())).collect();
        for l in logged {
            if let Some(d) = &l.action_digest {
                if !known.contains(&d.hash) {
                    records.push(HitRecord {
                        instance_name: opts.target.instance.clone(),
                        action_digest: Some(d.clone()),
                        verdict: "hit".into(),
                        served: true,
                        ..Default::default()
                    });
                }
            }
        }
    }
    // One audit per action (a build may ask for an action more than once).
    let mut seen = HashSet::new();
    records.retain(|r| seen.insert((r.instance_name.clone(), r.action_digest.clone().map(|d| d.hash))));

    let auditor = Auditor { ch, policy, deep: opts.deep };
    let bar = indicatif::ProgressBar::new(records.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} auditing {pos}/{len} hits [{bar:30}] {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut hits = Vec::new();
    let mut results: HashMap<String, reapi::ActionResult> = HashMap::new();
    for r in &records {
        let (hit, result) = auditor.audit(r).await?;
        if let Some(result) = result {
            results.insert(hit.action.clone(), result);
        }
        hits.push(hit);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut other_findings = Vec::new();
    if let Some(logged) = &logged {
        // Every remote cache hit in the log must match a signed result of this audit.
        let signed: Vec<Outputs> = results.values().map(result_outputs).collect();
        for l in logged {
            let matched = match &l.action_digest {
                Some(d) => results.get(&format!("{}/{}", d.hash, d.size_bytes)).map(|r| result_outputs(r) == l.outputs),
                None => Some(signed.contains(&l.outputs)),
            };
            if matched != Some(true) {
                let paths: Vec<&String> = l.outputs.keys().collect();
                other_findings.push(format!(
                    "the execution log shows a remote cache hit whose outputs {paths:?} match no signed result of this audit"
                ));
            }
        }
    }
    Ok(Report { invocation: opts.invocation.clone(), hits, other_findings })
}

/// The report as JSON.
pub fn to_json(report: &Report) -> serde_json::Value {
    let failed = report.hits.iter().filter(|h| !h.findings.is_empty()).count();
    json!({
        "invocation": report.invocation,
        "hits": report.hits,
        "other_findings": report.other_findings,
        "summary": {
            "hits": report.hits.len(),
            "verified": report.hits.len() - failed,
            "failed": failed,
            "clean": report.clean(),
        },
    })
}

/// The report as a readable table grouped by origin.
pub fn to_text(report: &Report) -> String {
    let mut groups: BTreeMap<(String, String, String), Vec<&AuditedHit>> = BTreeMap::new();
    for h in &report.hits {
        groups.entry((h.writer.clone(), h.origin_invocation.clone(), h.key_id.clone())).or_default().push(h);
    }
    let mut out = String::new();
    if let Some(id) = &report.invocation {
        out.push_str(&format!("Audit of invocation {id}\n\n"));
    }
    out.push_str(&format!(
        "{:<40} {:<38} {:<14} {:<22} {:>5}  {}\n",
        "WRITER", "ORIGIN INVOCATION (unverified)", "KEY", "SIGNED AT (last)", "HITS", "VERDICT"
    ));
    for ((writer, origin, key), hits) in &groups {
        let failed = hits.iter().filter(|h| !h.findings.is_empty()).count();
        let last = hits.iter().map(|h| h.signed_at.as_str()).max().unwrap_or("");
        let verdict = if failed == 0 { "ok".to_string() } else { format!("{failed} FAILED") };
        out.push_str(&format!(
            "{:<40} {:<38} {:<14} {:<22} {:>5}  {}\n",
            if writer.is_empty() { "(unknown)" } else { writer },
            if origin.is_empty() { "-" } else { origin },
            if key.is_empty() { "-".to_string() } else { key.chars().take(12).collect() },
            last,
            hits.len(),
            verdict
        ));
    }
    let failed: Vec<&AuditedHit> = report.hits.iter().filter(|h| !h.findings.is_empty()).collect();
    if !failed.is_empty() || !report.other_findings.is_empty() {
        out.push_str("\nFindings:\n");
        for h in failed {
            out.push_str(&format!("  {} {} {}\n", h.action, h.mnemonic, h.target));
            for f in &h.findings {
                out.push_str(&format!("      {f}\n"));
            }
        }
        for f in &report.other_findings {
            out.push_str(&format!("  {f}\n"));
        }
    }
    let bad = report.hits.iter().filter(|h| !h.findings.is_empty()).count();
    out.push_str(&format!(
        "\n{} cache hits audited: {} verified, {} failed{}\n",
        report.hits.len(),
        report.hits.len() - bad,
        bad,
        if report.other_findings.is_empty() {
            String::new()
        } else {
            format!(", {} other findings", report.other_findings.len())
        }
    ));
    out
}

/// Decodes an Envelope from a served result (for tools and tests).
pub fn envelope_of(result: &reapi::ActionResult) -> Option<crate::proto::prov::Envelope> {
    crate::signing::envelopes(result).first().and_then(|b| crate::proto::prov::Envelope::decode(*b).ok())
}
