//! `provcache verify-build`: an auditor's independent check that every remote
//! cache hit of a build was signed by a trusted key, with lineage.
//!
//! It trusts nothing the server says about verification: it reads the
//! server-signed, chained hit log of the invocation ([`hitlog`]) and checks
//! its signatures and chain, fetches every entry version the build used and
//! runs the read-path checks locally with the auditor's trust policy
//! ([`entry`]), compares the build's outputs with the signed results (with
//! `--exec-log`, [`exec_log`]), and checks that the referenced blobs exist
//! (`--deep`: downloads and re-hashes them and the Action). [`report`] holds
//! the findings and their renderings. docs/audit.md is the user's guide.

pub mod entry;
pub mod exec_log;
pub mod hitlog;
pub mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::proto::prov::HitRecord;
use crate::proto::reapi;
use crate::provenance::trust::TrustPolicy;
use crate::tools::client::{connect, Target};

pub use report::{error_json, to_json, to_text, AuditedHit, Code, Finding, Report};

/// The largest reply verify-build accepts: the server's `MAX_MESSAGE_BYTES`,
/// so that one maximal page (a 3 MiB result with its history, or a page of
/// hit records) always fits.
pub const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

/// The hit-record verdict with which the server marks that it stopped
/// recording a reader's lookups (its per-principal cap).
pub const RECORD_LIMIT_VERDICT: &str = "record_limit_reached";

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
    /// Audit only this reader principal's hits (the chain is still checked
    /// in full), so an honest build can be audited although another identity
    /// injected lookups under its invocation id.
    pub reader: Option<String>,
}

/// The audit had nothing to audit (exit 2, like an audit that could not
/// run): a CI gate must never pass on an empty audit.
#[derive(Debug, thiserror::Error)]
#[error("nothing to audit: {0}")]
pub struct NothingToAudit(pub String);

/// The hint for an invocation without records.
fn no_records_hint(invocation: &str, server: &str) -> String {
    format!(
        "the server {server} has no hit records for invocation {invocation}. Check that the id is the build's \
         (Bazel --invocation_id, or started.uuid in its build event file), that the build is younger than the \
         server's --history-retention (30 days by default), and that --server names the cache the build used"
    )
}

fn principal_counts(records: &[HitRecord]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in records.iter().filter(|r| r.verdict != RECORD_LIMIT_VERDICT) {
        *counts.entry(r.reader_principal.clone()).or_insert(0) += 1;
    }
    counts
}

/// Runs an audit. `Err` means exit 2: the audit could not run, or there was
/// nothing to audit ([`NothingToAudit`]).
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let named = || format!("--trust-policy {}", opts.policy.display());
    let policy_bytes = std::fs::read(&opts.policy).with_context(|| format!("{}: cannot read it", named()))?;
    let policy = std::str::from_utf8(&policy_bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .and_then(|text| TrustPolicy::from_toml(text).map_err(|e| anyhow::anyhow!("{e}")))
        .with_context(|| format!("{}: not a trust policy", named()))?;
    let policy_info = report::PolicyInfo {
        sha256: hex::encode(Sha256::digest(&policy_bytes)),
        policy_version: policy.policy_version,
    };
    let logged = opts.exec_log.as_deref().map(exec_log::parse).transpose()?;
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
    let now = SystemTime::now();
    let ch = connect(&opts.target).await.with_context(|| format!("connecting to {}", opts.target.url))?;

    // The hit log: listed in full, signatures and chain checked on everything.
    let mut findings = Vec::new();
    let mut log = hitlog::CheckedLog::default();
    if let Some(id) = &opts.invocation {
        let listed = hitlog::list(&ch, id).await?;
        log = hitlog::check(&policy, id, &listed);
        if log.records.is_empty() && listed.is_empty() && logged.as_ref().is_none_or(|l| l.is_empty()) {
            return Err(NothingToAudit(no_records_hint(id, &opts.target.url)).into());
        }
        findings.append(&mut log.findings);
    }
    for r in log.records.iter().filter(|r| r.verdict == RECORD_LIMIT_VERDICT) {
        findings.push(Finding::new(
            Code::HitLogIncomplete,
            format!(
                "the server stopped recording lookups of {} at record {} (its per-reader record cap): \
                 later lookups of that reader are not in the hit log",
                r.reader_principal, r.sequence
            ),
        ));
    }

    // Readers: who made the lookups, and whose are audited.
    let counts = principal_counts(&log.records);
    if let Some(reader) = &opts.reader {
        if !counts.contains_key(reader) && opts.invocation.is_some() {
            let seen: Vec<String> = counts.iter().map(|(p, n)| format!("{p} ({n})")).collect();
            return Err(NothingToAudit(format!(
                "no hit records of reader {reader} for this invocation; readers seen: {}",
                if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
            ))
            .into());
        }
    } else if counts.len() > 1 {
        let each: Vec<String> = counts.iter().map(|(p, n)| format!("{p} ({n} lookups)")).collect();
        findings.push(Finding::new(
            Code::MultipleReaders,
            format!(
                "lookups from {} reader principals under this one invocation id: {}. Another identity may have \
                 injected lookups; audit the build's own identity with --reader PRINCIPAL",
                counts.len(),
                each.join(", ")
            ),
        ));
    }
    let readers: Vec<report::ReaderCount> = counts
        .iter()
        .map(|(p, n)| report::ReaderCount {
            principal: p.clone(),
            hits: *n,
            audited: opts.reader.as_ref().is_none_or(|r| r == p),
        })
        .collect();
    let mut todo: Vec<(HitRecord, entry::Source)> = log
        .records
        .iter()
        .filter(|r| r.verdict != RECORD_LIMIT_VERDICT)
        .filter(|r| opts.reader.as_ref().is_none_or(|p| &r.reader_principal == p))
        .map(|r| (r.clone(), entry::Source::HitLog))
        .collect();

    // Execution-log hits that name their action and the hit log lacks.
    if let Some(logged) = &logged {
        let known: HashSet<String> =
            todo.iter().filter_map(|(r, _)| r.action_digest.as_ref().map(|d| d.hash.clone())).collect();
        for l in logged {
            let Some(d) = &l.action_digest else { continue };
            if known.contains(&d.hash) {
                continue;
            }
            if opts.invocation.is_some() {
                findings.push(Finding::new(
                    Code::ExecLogHitNotInHitLog,
                    format!(
                        "the execution log shows a remote cache hit of action {}/{} that the server's hit log \
                         does not record (its tail deleted, or another invocation id)",
                        d.hash, d.size_bytes
                    ),
                ));
            }
            let record = HitRecord {
                instance_name: opts.target.instance.clone(),
                action_digest: Some(d.clone()),
                verdict: "hit".into(),
                served: true,
                ..Default::default()
            };
            todo.push((record, entry::Source::ExecLog(l.outputs.clone())));
        }
    }
    if todo.is_empty() {
        return Err(NothingToAudit(match &opts.invocation {
            Some(id) => no_records_hint(id, &opts.target.url),
            None => "the execution log shows no remote cache hits".to_string(),
        })
        .into());
    }

    // Every lookup is audited (each action's versions are fetched once).
    let mut auditor = entry::EntryAuditor::new(ch, policy, opts.deep, now);
    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} auditing {pos}/{len} hits [{bar:30}] {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut hits = Vec::with_capacity(todo.len());
    let mut used: HashMap<String, Vec<exec_log::Outputs>> = HashMap::new();
    for (record, source) in &todo {
        let (hit, result) = auditor.audit(record, source).await?;
        if let Some(result) = result {
            used.entry(hit.action.clone()).or_default().push(exec_log::result_outputs(&result));
        }
        hits.push(hit);
        bar.inc(1);
    }
    bar.finish_and_clear();

    if let Some(logged) = &logged {
        findings.extend(compare_exec_log(logged, &used));
    }
    Ok(Report {
        invocation: opts.invocation.clone(),
        server: opts.target.url.clone(),
        audited_at: humantime::format_rfc3339_seconds(now).to_string(),
        policy: policy_info,
        options: report::AuditOptions {
            deep: opts.deep,
            reader: opts.reader.clone(),
            exec_log: opts.exec_log.is_some(),
        },
        hit_log: log.summary,
        readers,
        hits,
        findings,
    })
}

/// Every remote cache hit of the execution log must have the outputs of a
/// result this audit used (its own action's, when the log names it).
fn compare_exec_log(logged: &[exec_log::LoggedHit], used: &HashMap<String, Vec<exec_log::Outputs>>) -> Vec<Finding> {
    let mut findings = Vec::new();
    for l in logged {
        let matched = match &l.action_digest {
            Some(d) => used.get(&format!("{}/{}", d.hash, d.size_bytes)).is_some_and(|o| o.contains(&l.outputs)),
            None => used.values().flatten().any(|o| o == &l.outputs),
        };
        if !matched {
            let paths: Vec<&String> = l.outputs.keys().collect();
            findings.push(Finding::new(
                Code::ExecLogHitUnmatched,
                format!(
                    "the execution log shows a remote cache hit whose outputs {paths:?} match no signed result \
                     of this audit"
                ),
            ));
        }
    }
    findings
}

/// Decodes an Envelope from a served result (for tools and tests).
pub fn envelope_of(result: &reapi::ActionResult) -> Option<crate::proto::prov::Envelope> {
    crate::provenance::signing::envelopes(result).first().and_then(|b| crate::proto::prov::Envelope::decode(*b).ok())
}
