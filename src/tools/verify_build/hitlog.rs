//! The server's per-invocation hit log, as an auditor must read it: every
//! page listed, every record's DSSE signature verified with the trust
//! policy's keys, and the chain checked (sequence 1, 2, ... without gaps,
//! each record naming the SHA-256 of the previous record's payload).
//!
//! The server signs each record, so a record altered at rest no longer
//! verifies; the chain makes a deleted, reordered or replaced record visible
//! even though each remaining record verifies on its own. Deleting the *tail*
//! of a chain leaves a shorter, valid chain: only the build's execution log
//! (`--exec-log`) can show that (docs/audit.md).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use anyhow::Context as _;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

use super::report::{ranges, Code, Finding, HitLogSummary};
use super::MAX_REPLY_BYTES;
use crate::proto::prov::audit_client::AuditClient;
use crate::proto::prov::{Envelope, HitRecord, ListInvocationHitsRequest, SignedHitRecord};
use crate::provenance::signing::{pae, HIT_RECORD_PAYLOAD_TYPE};
use crate::provenance::trust::{KeyState, TrustPolicy};

/// Records asked for per page (the server also caps a page by bytes).
const PAGE_SIZE: i32 = 1000;

/// Lists every record of `invocation`, page by page, in chain order.
pub async fn list(ch: &Channel, invocation: &str) -> anyhow::Result<Vec<SignedHitRecord>> {
    let mut client = AuditClient::new(ch.clone()).max_decoding_message_size(MAX_REPLY_BYTES);
    let mut out = Vec::new();
    let mut tokens = HashSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_invocation_hits(ListInvocationHitsRequest {
                tool_invocation_id: invocation.to_string(),
                page_size: PAGE_SIZE,
                page_token: token.clone(),
            })
            .await
            .context("listing the invocation's hits (ListInvocationHits)")?
            .into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        anyhow::ensure!(
            tokens.insert(page.next_page_token.clone()),
            "the server returned the same page token twice while listing the hit log"
        );
        token = page.next_page_token;
    }
}

/// The hit log after its signatures and chain were checked.
#[derive(Debug, Default)]
pub struct CheckedLog {
    /// Every decodable record, in listing order (findings say which are not
    /// to be trusted).
    pub records: Vec<HitRecord>,
    /// What is wrong with the log itself.
    pub findings: Vec<Finding>,
    /// Counts for the report.
    pub summary: HitLogSummary,
}

/// Why one record's signature is not accepted.
enum SignatureProblem {
    /// No signature at all.
    Unsigned,
    /// Signed, but not verifiably by a trusted key.
    Untrusted(String),
}

/// Verifies one record's DSSE signature under the policy's active or
/// verify-only keys; a revoked key's signature is not accepted.
fn check_signature(policy: &TrustPolicy, envelope: &Envelope) -> Result<(), SignatureProblem> {
    if envelope.signatures.is_empty() {
        return Err(SignatureProblem::Unsigned);
    }
    let message = pae(HIT_RECORD_PAYLOAD_TYPE, &envelope.payload);
    let signatures: Vec<ed25519_dalek::Signature> =
        envelope.signatures.iter().filter_map(|s| ed25519_dalek::Signature::from_slice(&s.sig).ok()).collect();
    let verifies = |key: &crate::provenance::trust::TrustedKey| {
        signatures.iter().any(|sig| key.public_key.verify_strict(&message, sig).is_ok())
    };
    if policy.keys.iter().any(|k| k.state.trusted() && verifies(k)) {
        return Ok(());
    }
    if let Some(k) = policy.keys.iter().find(|k| k.state == KeyState::Revoked && verifies(k)) {
        return Err(SignatureProblem::Untrusted(format!("signed by key {:?}, which the trust policy revokes", k.name)));
    }
    let hinted = envelope.signatures.iter().any(|s| policy.keys.iter().any(|k| k.key_id == s.keyid));
    Err(SignatureProblem::Untrusted(if hinted {
        "the signature does not verify (the record was altered)".to_string()
    } else {
        "signed by a key the trust policy does not list".to_string()
    }))
}

/// Checks every record's signature and the chain, and decodes the records.
pub fn check(policy: &TrustPolicy, invocation: &str, listed: &[SignedHitRecord]) -> CheckedLog {
    let mut log = CheckedLog::default();
    let mut unsigned: Vec<u64> = Vec::new();
    let mut untrusted: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut invalid: Vec<String> = Vec::new();
    // (sequence, SHA-256 of the payload, previous_sha256) in listing order.
    let mut chain: Vec<(u64, [u8; 32], Vec<u8>)> = Vec::new();

    for (i, signed) in listed.iter().enumerate() {
        let position = i + 1;
        let Some(envelope) = &signed.envelope else {
            invalid.push(format!("listing position {position} carries no envelope"));
            continue;
        };
        if envelope.payload_type != HIT_RECORD_PAYLOAD_TYPE {
            invalid.push(format!("listing position {position} has payload type {:?}", envelope.payload_type));
            continue;
        }
        let Ok(record) = HitRecord::decode(envelope.payload.as_ref()) else {
            invalid.push(format!("listing position {position} does not decode as a hit record"));
            continue;
        };
        let sequence = record.sequence;
        match check_signature(policy, envelope) {
            Ok(()) => log.summary.signed += 1,
            Err(SignatureProblem::Unsigned) => unsigned.push(sequence),
            Err(SignatureProblem::Untrusted(why)) => untrusted.entry(why).or_default().push(sequence),
        }
        if record.tool_invocation_id != invocation {
            invalid.push(format!(
                "record {sequence} belongs to invocation {:?}, not the audited one",
                record.tool_invocation_id
            ));
            continue;
        }
        chain.push((sequence, Sha256::digest(&envelope.payload).into(), record.previous_sha256.to_vec()));
        log.records.push(record);
    }
    log.summary.records = listed.len();
    log.summary.last_sequence = chain.iter().map(|c| c.0).max().unwrap_or(0);

    if !unsigned.is_empty() {
        log.findings.push(Finding::new(
            Code::HitRecordUnsigned,
            format!(
                "hit records {} carry no signature (a server older than signed hit logs, or stripped at rest): \
                 they could have been written by anyone with access to the data directory",
                name_records(&mut unsigned)
            ),
        ));
    }
    for (why, mut sequences) in untrusted {
        let named = name_records(&mut sequences);
        log.findings.push(Finding::new(Code::HitRecordUntrusted, format!("hit records {named}: {why}")));
    }
    for detail in invalid {
        log.findings.push(Finding::new(Code::HitRecordInvalid, detail));
    }
    log.findings.extend(check_chain(&chain));
    log
}

/// Names records by sequence number as ranges (`1-3, 7`); records without
/// one (an unchained log) are counted instead.
fn name_records(sequences: &mut Vec<u64>) -> String {
    sequences.sort_unstable();
    let unnumbered = sequences.iter().take_while(|s| **s == 0).count();
    sequences.dedup();
    sequences.retain(|s| *s > 0);
    match (unnumbered, sequences.is_empty()) {
        (0, _) => ranges(sequences),
        (n, true) => format!("({n} without sequence numbers)"),
        (n, false) => format!("{} (and {n} without sequence numbers)", ranges(sequences)),
    }
}

/// The chain rules: sequences 1..n each once, in order, each naming its
/// predecessor's payload hash. Records without a sequence (0) come from a
/// server that does not chain.
fn check_chain(chain: &[(u64, [u8; 32], Vec<u8>)]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let unchained = chain.iter().filter(|c| c.0 == 0).count();
    if unchained > 0 {
        findings.push(Finding::new(
            Code::HitChainMissing,
            format!(
                "{unchained} hit records carry no sequence number (a server that does not chain its hit log): \
                 deleted records cannot be detected"
            ),
        ));
    }
    let chained: Vec<&(u64, [u8; 32], Vec<u8>)> = chain.iter().filter(|c| c.0 > 0).collect();

    // Gaps: every number from 1 to the highest listed must be present.
    let present: BTreeSet<u64> = chained.iter().map(|c| c.0).collect();
    let mut missing: Vec<String> = Vec::new();
    let mut next = 1u64;
    for &s in &present {
        if s > next {
            missing.push(if s - 1 == next { next.to_string() } else { format!("{next}-{}", s - 1) });
        }
        next = s + 1;
    }
    if !missing.is_empty() {
        findings.push(Finding::new(
            Code::HitChainGap,
            format!(
                "hit records {} are missing from the chain (deleted at rest, or withheld by the server)",
                missing.join(", ")
            ),
        ));
    }

    // Order: each listed sequence must be above the previous one.
    for pair in chained.windows(2) {
        let (before, after) = (pair[0].0, pair[1].0);
        if after <= before {
            let what =
                if after == before { "appears twice".to_string() } else { format!("is listed after record {before}") };
            findings.push(Finding::new(
                Code::HitChainOutOfOrder,
                format!("hit record {after} {what} (records reordered or duplicated at rest)"),
            ));
        }
    }

    // Links: each record names the SHA-256 of its predecessor's payload.
    let mut hash_of: HashMap<u64, [u8; 32]> = HashMap::new();
    for c in &chained {
        hash_of.entry(c.0).or_insert(c.1);
    }
    let mut broken: Vec<u64> = Vec::new();
    for (sequence, _, previous) in &chained {
        let ok = if *sequence == 1 {
            previous.is_empty()
        } else {
            match hash_of.get(&(sequence - 1)) {
                Some(h) => previous.as_slice() == h.as_slice(),
                None => true, // the predecessor is missing: reported as a gap
            }
        };
        if !ok {
            broken.push(*sequence);
        }
    }
    if !broken.is_empty() {
        broken.sort_unstable();
        broken.dedup();
        let altered: Vec<u64> = broken.iter().map(|s| s.saturating_sub(1)).collect();
        findings.push(Finding::new(
            Code::HitChainBroken,
            format!(
                "hit records {} do not name the hash of their predecessor: records {} were altered or replaced",
                ranges(&broken),
                ranges(&altered)
            ),
        ));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::prov::Signature;
    use crate::provenance::trust::render_key_entry;
    use ed25519_dalek::Signer;
    use std::time::{Duration, SystemTime};

    const INVOCATION: &str = "inv-1";

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
    }

    fn policy(state: KeyState) -> TrustPolicy {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let text = format!(
            "policy_version = 1\nclock_skew = \"5m\"\n{}",
            render_key_entry("server", &key().verifying_key(), state, now - day, now + day)
        );
        TrustPolicy::from_toml(&text).unwrap()
    }

    fn sign(payload: Vec<u8>) -> SignedHitRecord {
        let sig = key().sign(&pae(HIT_RECORD_PAYLOAD_TYPE, &payload));
        SignedHitRecord {
            envelope: Some(Envelope {
                payload: payload.into(),
                payload_type: HIT_RECORD_PAYLOAD_TYPE.into(),
                signatures: vec![Signature {
                    sig: sig.to_bytes().to_vec().into(),
                    keyid: crate::provenance::signing::key_id(&key().verifying_key()),
                }],
            }),
        }
    }

    /// A valid signed chain of `n` records.
    fn chain(n: u64) -> Vec<SignedHitRecord> {
        let mut previous = Vec::new();
        (1..=n)
            .map(|sequence| {
                let record = HitRecord {
                    tool_invocation_id: INVOCATION.into(),
                    sequence,
                    previous_sha256: previous.clone().into(),
                    reader_principal: "spiffe://x/reader".into(),
                    verdict: "hit".into(),
                    ..Default::default()
                };
                let payload = record.encode_to_vec();
                previous = Sha256::digest(&payload).to_vec();
                sign(payload)
            })
            .collect()
    }

    fn codes(log: &CheckedLog) -> Vec<Code> {
        log.findings.iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_valid_signed_chain_has_no_findings() {
        let log = check(&policy(KeyState::Active), INVOCATION, &chain(5));
        assert!(log.findings.is_empty(), "{:?}", log.findings);
        assert_eq!((log.records.len(), log.summary.signed, log.summary.last_sequence), (5, 5, 5));
    }

    #[test]
    fn a_deleted_middle_record_is_a_gap_naming_its_sequence() {
        let mut listed = chain(5);
        listed.remove(2);
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitChainGap]);
        assert!(log.findings[0].detail.contains("hit records 3 are missing"), "{}", log.findings[0].detail);
    }

    #[test]
    fn a_deleted_head_is_a_gap_from_one() {
        let listed = chain(4).split_off(2);
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitChainGap]);
        assert!(log.findings[0].detail.contains("1-2"), "{}", log.findings[0].detail);
    }

    #[test]
    fn swapped_records_are_out_of_order() {
        let mut listed = chain(4);
        listed.swap(1, 2);
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitChainOutOfOrder]);
        assert!(log.findings[0].detail.contains("hit record 2 is listed after record 3"), "{:?}", log.findings);
    }

    #[test]
    fn an_altered_record_fails_its_signature_and_breaks_the_next_link() {
        let mut listed = chain(3);
        let env = listed[1].envelope.as_mut().unwrap();
        let mut record = HitRecord::decode(env.payload.as_ref()).unwrap();
        record.reader_principal = "spiffe://x/someone-else".into();
        env.payload = record.encode_to_vec().into();
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitRecordUntrusted, Code::HitChainBroken]);
        assert!(log.findings[0].detail.contains("hit records 2: the signature does not verify"), "{:?}", log.findings);
        assert!(log.findings[1].detail.contains("records 2 were altered"), "{:?}", log.findings);
    }

    #[test]
    fn a_record_re_signed_by_an_attacker_still_breaks_the_chain() {
        // A replaced record 2 (new content, consistent own signature by
        // someone holding the key would be undetectable; without the key the
        // signature fails). Here the link of record 3 exposes the swap.
        let mut listed = chain(3);
        let record = HitRecord {
            tool_invocation_id: INVOCATION.into(),
            sequence: 2,
            previous_sha256: vec![0u8; 32].into(),
            ..Default::default()
        };
        listed[1] = sign(record.encode_to_vec());
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitChainBroken]);
        assert!(log.findings[0].detail.contains("hit records 2-3 do not name"), "{:?}", log.findings);
    }

    #[test]
    fn unsigned_records_and_revoked_keys_are_findings() {
        let mut listed = chain(3);
        listed[0].envelope.as_mut().unwrap().signatures.clear();
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitRecordUnsigned]);
        assert!(log.findings[0].detail.contains("hit records 1 carry no signature"));
        let log = check(&policy(KeyState::Revoked), INVOCATION, &chain(2));
        assert_eq!(codes(&log), vec![Code::HitRecordUntrusted]);
        assert!(log.findings[0].detail.contains("revokes"), "{:?}", log.findings);
        let empty = TrustPolicy::from_toml("policy_version = 1\nclock_skew = \"5m\"\n").unwrap();
        let log = check(&empty, INVOCATION, &chain(1));
        assert!(log.findings[0].detail.contains("does not list"), "{:?}", log.findings);
    }

    #[test]
    fn records_of_another_invocation_and_garbage_are_invalid() {
        let mut listed = chain(2);
        listed[1].envelope.as_mut().unwrap().payload = vec![0xff, 0xff].into();
        let log = check(&policy(KeyState::Active), "another", &listed[..1]);
        assert_eq!(codes(&log), vec![Code::HitRecordInvalid]);
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert!(codes(&log).contains(&Code::HitRecordInvalid), "{:?}", log.findings);
    }

    #[test]
    fn an_unchained_log_from_an_older_server_is_one_finding() {
        let listed: Vec<SignedHitRecord> = (0..3)
            .map(|_| {
                let r = HitRecord { tool_invocation_id: INVOCATION.into(), ..Default::default() };
                SignedHitRecord {
                    envelope: Some(Envelope {
                        payload: r.encode_to_vec().into(),
                        payload_type: HIT_RECORD_PAYLOAD_TYPE.into(),
                        signatures: vec![],
                    }),
                }
            })
            .collect();
        let log = check(&policy(KeyState::Active), INVOCATION, &listed);
        assert_eq!(codes(&log), vec![Code::HitRecordUnsigned, Code::HitChainMissing]);
        assert_eq!(log.records.len(), 3, "still audited");
    }
}
