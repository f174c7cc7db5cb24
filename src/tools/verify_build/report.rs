//! What an audit found, and its two renderings: a table for people and a
//! stable JSON document for machines (schema in docs/audit.md).
//!
//! Findings carry a [`Code`] from a closed set so that a CI gate can act on
//! the kind of problem without parsing English; the `detail` is for people.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

/// Version of the JSON document [`to_json`] prints. Raised whenever a field
/// changes meaning or disappears; new fields may appear without a raise.
pub const SCHEMA_VERSION: u32 = 1;

/// Every kind of finding, each documented in docs/audit.md. The JSON carries
/// [`Code::as_str`]; the set is closed so machines can match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    // ------------------------------------------------------------ the hit log
    /// A hit record carries no signature (a server older than signed hit logs).
    HitRecordUnsigned,
    /// A hit record's signature does not verify under a key the policy trusts
    /// (unknown or revoked key, altered record).
    HitRecordUntrusted,
    /// A hit record is not a decodable record of the audited invocation.
    HitRecordInvalid,
    /// Sequence numbers are missing: records were deleted (or the chain does
    /// not start at 1).
    HitChainGap,
    /// A record's sequence number is not after the previous one's: records
    /// were reordered or duplicated.
    HitChainOutOfOrder,
    /// A record's `previous_sha256` does not match the previous record: a
    /// record was altered or replaced.
    HitChainBroken,
    /// The server does not chain its hit records (an older server): deletions
    /// cannot be detected.
    HitChainMissing,
    /// The server stopped recording a reader's lookups (its per-principal
    /// record cap): the hit log is incomplete.
    HitLogIncomplete,
    /// Lookups from more than one reader principal under one invocation id.
    MultipleReaders,
    // ------------------------------------------------------------ one hit
    /// The server rejected the stored entry (a miss; the build rebuilt it).
    ServerRejected,
    /// The server served a stored entry that failed its own verification
    /// (flag mode).
    ServerFlagged,
    /// The version the build was served fails the auditor's verification.
    ServedEntryInvalid,
    /// The version the build was served is no longer stored (history
    /// retention, or deleted), so it cannot be verified.
    ServedVersionGone,
    /// The entry as stored now fails the auditor's verification.
    StoredEntryInvalid,
    /// Nothing is stored for the action any more, in no version.
    EntryGone,
    /// A blob the result references is missing from the CAS.
    BlobMissing,
    /// `--deep`: a referenced blob does not re-hash to its digest.
    BlobCorrupt,
    // ------------------------------------------------------------ the execution log
    /// A remote cache hit in the execution log matches no signed result of the audit.
    ExecLogHitUnmatched,
    /// A remote cache hit in the execution log (with its action digest) has no
    /// record in the server's hit log: a deleted tail, or another invocation id.
    ExecLogHitNotInHitLog,
}

impl Code {
    /// Every code, in documentation order.
    pub const ALL: [Code; 19] = [
        Code::HitRecordUnsigned,
        Code::HitRecordUntrusted,
        Code::HitRecordInvalid,
        Code::HitChainGap,
        Code::HitChainOutOfOrder,
        Code::HitChainBroken,
        Code::HitChainMissing,
        Code::HitLogIncomplete,
        Code::MultipleReaders,
        Code::ServerRejected,
        Code::ServerFlagged,
        Code::ServedEntryInvalid,
        Code::ServedVersionGone,
        Code::StoredEntryInvalid,
        Code::EntryGone,
        Code::BlobMissing,
        Code::BlobCorrupt,
        Code::ExecLogHitUnmatched,
        Code::ExecLogHitNotInHitLog,
    ];

    /// The stable snake_case label the JSON carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::HitRecordUnsigned => "hit_record_unsigned",
            Code::HitRecordUntrusted => "hit_record_untrusted",
            Code::HitRecordInvalid => "hit_record_invalid",
            Code::HitChainGap => "hit_chain_gap",
            Code::HitChainOutOfOrder => "hit_chain_out_of_order",
            Code::HitChainBroken => "hit_chain_broken",
            Code::HitChainMissing => "hit_chain_missing",
            Code::HitLogIncomplete => "hit_log_incomplete",
            Code::MultipleReaders => "multiple_readers",
            Code::ServerRejected => "server_rejected",
            Code::ServerFlagged => "server_flagged",
            Code::ServedEntryInvalid => "served_entry_invalid",
            Code::ServedVersionGone => "served_version_gone",
            Code::StoredEntryInvalid => "stored_entry_invalid",
            Code::EntryGone => "entry_gone",
            Code::BlobMissing => "blob_missing",
            Code::BlobCorrupt => "blob_corrupt",
            Code::ExecLogHitUnmatched => "exec_log_hit_unmatched",
            Code::ExecLogHitNotInHitLog => "exec_log_hit_not_in_hit_log",
        }
    }
}

/// One thing wrong, with the code machines act on and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What kind of problem.
    pub code: Code,
    /// For `*_entry_invalid` and `server_*`: the read-path reason label of
    /// docs/signing.md (`key_revoked`, `result_mismatch`, ...), so a gate can
    /// tell a revoked key from tampering without parsing `detail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence naming what is wrong (sequence numbers, principals, digests).
    pub detail: String,
}

impl Finding {
    /// A finding without a read-path reason.
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Finding { code, reason: None, detail: detail.into() }
    }

    /// A finding that carries a read-path reason label.
    pub fn with_reason(code: Code, reason: &str, detail: impl Into<String>) -> Self {
        Finding { code, reason: Some(reason.to_string()), detail: detail.into() }
    }
}

/// What a reader and a writer *claimed* about a hit. Nothing here is checked
/// by anyone: the reader and the writer chose these strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// The reader's claimed action mnemonic (e.g. `Genrule`).
    pub action_mnemonic: String,
    /// The reader's claimed target (e.g. `//:a`).
    pub target_id: String,
    /// The server cut the reader's claims to its cap.
    pub truncated: bool,
    /// The invocation id the writer claimed when it stored the result.
    pub origin_invocation_id: String,
}

/// One audited lookup of the build.
#[derive(Clone, Debug, Serialize)]
pub struct AuditedHit {
    /// The record's place in the invocation's hit-log chain (`None` for a hit
    /// found only in the execution log).
    pub sequence: Option<u64>,
    /// The server-attested principal that made the lookup (empty for a hit
    /// found only in the execution log).
    pub reader: String,
    /// Instance name.
    pub instance: String,
    /// Action digest, `hash/size`.
    pub action: String,
    /// When the server answered (RFC 3339), from the hit record.
    pub answered_at: String,
    /// What the server answered: `hit`, or its read-path reason label.
    pub server_verdict: String,
    /// Whether the server served a result.
    pub served: bool,
    /// Unverified claims of the reader and the writer.
    pub claims: Claims,
    /// The writer principal (server-attested and signed when the served
    /// version verifies; otherwise as the server recorded it).
    pub writer: String,
    /// Id of the key that signed the version used.
    pub key_id: String,
    /// When that version was signed (RFC 3339).
    pub signed_at: String,
    /// `ok` or `failed`.
    pub verdict: &'static str,
    /// Everything wrong with this hit.
    pub findings: Vec<Finding>,
}

/// How many hits one reader made, and whether they were audited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReaderCount {
    /// The server-attested principal.
    pub principal: String,
    /// Its records in the hit log.
    pub hits: usize,
    /// Whether its hits are in this audit (`--reader` audits one).
    pub audited: bool,
}

/// The trust policy an audit used, so a result can be tied to it later.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyInfo {
    /// SHA-256 (hex) of the policy file's bytes.
    pub sha256: String,
    /// Its `policy_version`.
    pub policy_version: u64,
}

/// What the audit was asked to do.
#[derive(Clone, Debug, Serialize)]
pub struct AuditOptions {
    /// `--deep`: blobs downloaded and re-hashed.
    pub deep: bool,
    /// `--reader`: only this principal's hits audited.
    pub reader: Option<String>,
    /// `--exec-log` given.
    pub exec_log: bool,
}

/// The hit log as listed and checked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HitLogSummary {
    /// Records listed.
    pub records: usize,
    /// Records whose signature verified under a trusted key.
    pub signed: usize,
    /// Highest sequence number listed (0 when none).
    pub last_sequence: u64,
}

/// The result of an audit.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The audited invocation, if given.
    pub invocation: Option<String>,
    /// The server URL.
    pub server: String,
    /// When the audit ran (RFC 3339).
    pub audited_at: String,
    /// The trust policy used.
    pub policy: PolicyInfo,
    /// The options.
    pub options: AuditOptions,
    /// The hit log.
    pub hit_log: HitLogSummary,
    /// Every reader principal of the invocation, with its hit count.
    pub readers: Vec<ReaderCount>,
    /// Every audited hit, in chain order.
    pub hits: Vec<AuditedHit>,
    /// Findings not tied to one hit (the hit log, readers, the execution log).
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether nothing was found.
    pub fn clean(&self) -> bool {
        self.findings.is_empty() && self.hits.iter().all(|h| h.findings.is_empty())
    }

    /// The process exit status: 0 clean, 1 findings (2, could not run or
    /// nothing to audit, never comes from a report).
    pub fn exit_code(&self) -> i32 {
        if self.clean() {
            0
        } else {
            1
        }
    }

    /// Every finding's code, hits' and the audit's, for tests and gates.
    pub fn codes(&self) -> Vec<Code> {
        self.findings.iter().chain(self.hits.iter().flat_map(|h| &h.findings)).map(|f| f.code).collect()
    }

    fn failed(&self) -> usize {
        self.hits.iter().filter(|h| !h.findings.is_empty()).count()
    }
}

/// The report as the stable JSON document of docs/audit.md.
pub fn to_json(report: &Report) -> serde_json::Value {
    let failed = report.failed();
    json!({
        "schema_version": SCHEMA_VERSION,
        "invocation": report.invocation,
        "server": report.server,
        "audited_at": report.audited_at,
        "policy": report.policy,
        "options": report.options,
        "hit_log": report.hit_log,
        "readers": report.readers,
        "hits": report.hits,
        "findings": report.findings,
        "summary": {
            "hits": report.hits.len(),
            "verified": report.hits.len() - failed,
            "failed": failed,
            "findings": report.codes().len(),
            "clean": report.clean(),
            "exit_code": report.exit_code(),
        },
    })
}

/// The JSON printed when the audit could not run or had nothing to audit
/// (exit 2), so that a machine reading stdout always gets a document.
pub fn error_json(nothing_to_audit: bool, detail: &str) -> serde_json::Value {
    json!({
        "schema_version": SCHEMA_VERSION,
        "error": {
            "code": if nothing_to_audit { "nothing_to_audit" } else { "could_not_run" },
            "detail": detail,
        },
        "summary": { "clean": false, "exit_code": 2 },
    })
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The report as a readable table grouped by reader and origin.
pub fn to_text(report: &Report) -> String {
    let mut out = String::new();
    if let Some(id) = &report.invocation {
        out.push_str(&format!("Audit of invocation {id}\n"));
    }
    out.push_str(&format!(
        "server {}, policy version {} (sha256 {}), at {}\n\n",
        report.server,
        report.policy.policy_version,
        &report.policy.sha256[..report.policy.sha256.len().min(12)],
        report.audited_at
    ));
    if !report.readers.is_empty() {
        out.push_str("Readers (server-attested):\n");
        for r in &report.readers {
            let note = if r.audited { "" } else { "  (not audited: --reader)" };
            out.push_str(&format!("  {:<48} {:>6} hits{note}\n", r.principal, r.hits));
        }
        out.push('\n');
    }
    let mut groups: BTreeMap<(&str, &str, &str, &str), Vec<&AuditedHit>> = BTreeMap::new();
    for h in &report.hits {
        groups
            .entry((h.reader.as_str(), h.writer.as_str(), h.claims.origin_invocation_id.as_str(), h.key_id.as_str()))
            .or_default()
            .push(h);
    }
    out.push_str(&format!(
        "{:<32} {:<32} {:<38} {:<14} {:<22} {:>5}  {}\n",
        "READER", "WRITER", "ORIGIN INVOCATION (claimed)", "KEY", "SIGNED AT (last)", "HITS", "VERDICT"
    ));
    for ((reader, writer, origin, key), hits) in &groups {
        let failed = hits.iter().filter(|h| !h.findings.is_empty()).count();
        let last = hits.iter().map(|h| h.signed_at.as_str()).max().unwrap_or("");
        let verdict = if failed == 0 { "ok".to_string() } else { format!("{failed} FAILED") };
        out.push_str(&format!(
            "{:<32} {:<32} {:<38} {:<14} {:<22} {:>5}  {}\n",
            if reader.is_empty() { "(execution log)" } else { reader },
            if writer.is_empty() { "(unknown)" } else { writer },
            or_dash(origin),
            or_dash(&key.chars().take(12).collect::<String>()),
            last,
            hits.len(),
            verdict
        ));
    }
    let failed: Vec<&AuditedHit> = report.hits.iter().filter(|h| !h.findings.is_empty()).collect();
    if !failed.is_empty() || !report.findings.is_empty() {
        out.push_str("\nFindings:\n");
        for f in &report.findings {
            out.push_str(&format!("  [{}] {}\n", f.code.as_str(), f.detail));
        }
        for h in failed {
            let seq = h.sequence.map(|s| format!("#{s} ")).unwrap_or_default();
            out.push_str(&format!(
                "  {seq}{} read by {} (claimed: {} {})\n",
                h.action,
                or_dash(&h.reader),
                or_dash(&h.claims.action_mnemonic),
                or_dash(&h.claims.target_id)
            ));
            for f in &h.findings {
                out.push_str(&format!("      [{}] {}\n", f.code.as_str(), f.detail));
            }
        }
    }
    let bad = report.failed();
    out.push_str(&format!(
        "\n{} cache hits audited: {} verified, {} failed{}\n",
        report.hits.len(),
        report.hits.len() - bad,
        bad,
        if report.findings.is_empty() { String::new() } else { format!(", {} other findings", report.findings.len()) }
    ));
    out
}

/// Renders sorted sequence numbers as ranges: `3, 5-7`.
pub(crate) fn ranges(numbers: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let start = numbers[i];
        let mut end = start;
        while i + 1 < numbers.len() && numbers[i + 1] == end + 1 {
            i += 1;
            end = numbers[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_serialize_as_their_label() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "{c:?}");
            assert!(c.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{c:?}");
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[test]
    fn every_code_is_documented_in_docs_audit_md() {
        let doc = include_str!("../../../docs/audit.md");
        for c in Code::ALL {
            assert!(doc.contains(&format!("`{}`", c.as_str())), "docs/audit.md does not document {}", c.as_str());
        }
    }

    #[test]
    fn sequence_numbers_are_rendered_as_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[4]), "4");
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
    }
}
