//! Read-path checks 1-8 of docs/signing.md, in order, stopping at the first
//! failure. Check 9 (referenced blobs still in CAS) needs the store and is the
//! caller's; [`Reason::MissingBlob`] exists so that it is counted alike.
//!
//! Two entry points that share one implementation, so they always agree:
//! [`verify_stored`] (the server: canonical bytes and envelope kept side by
//! side, never re-encoded) and [`verify_served`] (verify-build: recomputes the
//! canonical bytes from the result it received).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sha2::{Digest as _, Sha256};

use super::trust::{KeyState, TrustPolicy, TrustedKey};
use crate::proto::prov::storage::{ReferencedBlobs, ReferencesStatement};
use crate::proto::prov::{ActionResultStatement, Envelope, HitRecord, VerificationStatus};
use crate::proto::reapi::{self, ActionResult};
use crate::provenance::signing::{
    self, HIT_RECORD_PAYLOAD_TYPE, PAYLOAD_TYPE, REFERENCES_PAYLOAD_TYPE, STATEMENT_TYPE,
};

/// Largest encoded envelope that is decoded at all.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// Largest statement payload accepted.
pub const MAX_PAYLOAD_BYTES: usize = 32 * 1024;
/// Most signatures one envelope may carry.
pub const MAX_SIGNATURES: usize = 4;

/// Why an entry failed verification. [`Reason::as_str`] is the stable metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reason {
    /// Check 1: no envelope (or an envelope without signatures).
    #[error("the entry carries no signature")]
    Unsigned,
    /// Check 1: more than one envelope.
    #[error("the entry carries more than one envelope")]
    Ambiguous,
    /// Check 2: the envelope, its payload or its signature list exceeds a cap.
    #[error("the envelope exceeds a size cap")]
    TooLarge,
    /// Check 2: the envelope bytes are not an Envelope message.
    #[error("the envelope does not decode")]
    UndecodableEnvelope,
    /// Check 2: the payload type is not the statement's.
    #[error("the envelope's payload type is not {PAYLOAD_TYPE}")]
    WrongPayloadType,
    /// Check 3: no signature verifies under any key the policy knows.
    #[error("no signature verifies under a key the trust policy knows")]
    UnknownKey,
    /// Check 3: a signature verifies, but only under a revoked key.
    #[error("the signing key is revoked")]
    KeyRevoked,
    /// Check 3: a signature verifies, but only under a key not scoped to this instance.
    #[error("the signing key is not trusted for this instance")]
    KeyNotForInstance,
    /// Check 3: the envelope names a known key, but no signature verifies.
    #[error("the signature does not verify")]
    BadSignature,
    /// Check 4: the verified payload is not a statement (or lacks `signed_at`).
    #[error("the signed statement does not decode")]
    UndecodableStatement,
    /// Check 4: the statement type is not this version's.
    #[error("the statement type is not {STATEMENT_TYPE}")]
    WrongStatementType,
    /// Check 5: signed for another instance.
    #[error("the statement names another instance")]
    InstanceMismatch,
    /// Check 5: signed for another digest function.
    #[error("the statement names another digest function")]
    DigestFunctionMismatch,
    /// Check 5: signed for another action (hash or size).
    #[error("the statement names another action digest")]
    ActionDigestMismatch,
    /// Check 5: the statement's key id is not the key that verified it.
    #[error("the statement's key id is not the verifying key's")]
    KeyIdMismatch,
    /// Check 6: signed outside the key's validity window.
    #[error("signed outside the key's validity window")]
    OutsideKeyWindow,
    /// Check 6: signed in the future (beyond the allowed clock skew).
    #[error("signed in the future")]
    FutureSignedAt,
    /// Check 6: older than `max_age`.
    #[error("older than the policy's max_age")]
    TooOld,
    /// Check 6: signed before the poisoning cut-off `not_before`.
    #[error("signed before the policy's not_before cut-off")]
    BeforeCutoff,
    /// Check 7: written by a writer inside a revoked window.
    #[error("the writer was revoked when this was signed")]
    WriterRevoked,
    /// Check 7: the action is quarantined.
    #[error("the action is quarantined")]
    Quarantined,
    /// Check 8: the result bytes are not the ones signed.
    #[error("the result does not match the signed hash and size")]
    ResultMismatch,
    /// Check 9 (the caller's): a referenced blob is no longer in CAS.
    #[error("a referenced blob is missing from CAS")]
    MissingBlob,
}

impl Reason {
    /// Every reason, in check order.
    pub const ALL: [Reason; 23] = [
        Reason::Unsigned,
        Reason::Ambiguous,
        Reason::TooLarge,
        Reason::UndecodableEnvelope,
        Reason::WrongPayloadType,
        Reason::UnknownKey,
        Reason::KeyRevoked,
        Reason::KeyNotForInstance,
        Reason::BadSignature,
        Reason::UndecodableStatement,
        Reason::WrongStatementType,
        Reason::InstanceMismatch,
        Reason::DigestFunctionMismatch,
        Reason::ActionDigestMismatch,
        Reason::KeyIdMismatch,
        Reason::OutsideKeyWindow,
        Reason::FutureSignedAt,
        Reason::TooOld,
        Reason::BeforeCutoff,
        Reason::WriterRevoked,
        Reason::Quarantined,
        Reason::ResultMismatch,
        Reason::MissingBlob,
    ];

    /// The stable snake_case label used in metrics, the audit log and
    /// `VerificationStatus.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unsigned => "unsigned",
            Reason::Ambiguous => "ambiguous",
            Reason::TooLarge => "too_large",
            Reason::UndecodableEnvelope => "undecodable_envelope",
            Reason::WrongPayloadType => "wrong_payload_type",
            Reason::UnknownKey => "unknown_key",
            Reason::KeyRevoked => "key_revoked",
            Reason::KeyNotForInstance => "key_not_for_instance",
            Reason::BadSignature => "bad_signature",
            Reason::UndecodableStatement => "undecodable_statement",
            Reason::WrongStatementType => "wrong_statement_type",
            Reason::InstanceMismatch => "instance_mismatch",
            Reason::DigestFunctionMismatch => "digest_function_mismatch",
            Reason::ActionDigestMismatch => "action_digest_mismatch",
            Reason::KeyIdMismatch => "key_id_mismatch",
            Reason::OutsideKeyWindow => "outside_key_window",
            Reason::FutureSignedAt => "future_signed_at",
            Reason::TooOld => "too_old",
            Reason::BeforeCutoff => "before_cutoff",
            Reason::WriterRevoked => "writer_revoked",
            Reason::Quarantined => "quarantined",
            Reason::ResultMismatch => "result_mismatch",
            Reason::MissingBlob => "missing_blob",
        }
    }

    /// The inverse of [`Reason::as_str`].
    pub fn from_label(label: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == label)
    }

    /// The status attached to a served result in flag mode.
    pub fn to_status(self) -> VerificationStatus {
        VerificationStatus { reason: self.as_str().to_string(), detail: self.to_string() }
    }
}

/// What the request asked for; the statement must name exactly this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The request's instance name.
    pub instance: String,
    /// The request's digest function (`UNKNOWN` is taken as SHA-256).
    pub digest_function: i32,
    /// The request's action digest (hash and size).
    pub action_digest: reapi::Digest,
}

/// A verified entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    /// The statement, decoded from the verified payload bytes.
    pub statement: ActionResultStatement,
    /// The policy name of the key that verified it.
    pub key_name: String,
    /// That key's id.
    pub key_id: String,
    /// The statement's `signed_at`.
    pub signed_at: SystemTime,
}

/// The server's path: the stored encoded envelope(s) (empty ones count as
/// absent) and the stored canonical ActionResult bytes, exactly as stored.
pub fn verify_stored(
    policy: &TrustPolicy,
    envelopes: &[&[u8]],
    canonical_result: &[u8],
    expected: &Expected,
    now: SystemTime,
) -> Result<Verified, Reason> {
    // 1. Exactly one envelope.
    let mut present = envelopes.iter().copied().filter(|e| !e.is_empty());
    let raw = match (present.next(), present.next()) {
        (None, _) => return Err(Reason::Unsigned),
        (Some(_), Some(_)) => return Err(Reason::Ambiguous),
        (Some(raw), None) => raw,
    };

    // 2. Size caps and the payload type.
    if raw.len() > MAX_ENVELOPE_BYTES {
        return Err(Reason::TooLarge);
    }
    let envelope = Envelope::decode(raw).map_err(|_| Reason::UndecodableEnvelope)?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(Reason::WrongPayloadType);
    }
    if envelope.payload.len() > MAX_PAYLOAD_BYTES || envelope.signatures.len() > MAX_SIGNATURES {
        return Err(Reason::TooLarge);
    }
    if envelope.signatures.is_empty() {
        return Err(Reason::Unsigned);
    }

    // 3. A trusted key verifies a signature.
    let key = find_signer(policy, PAYLOAD_TYPE, &envelope, &expected.instance)?;

    // 4. The statement, from the verified payload bytes only.
    let statement =
        ActionResultStatement::decode(envelope.payload.as_ref()).map_err(|_| Reason::UndecodableStatement)?;
    if statement.statement_type != STATEMENT_TYPE {
        return Err(Reason::WrongStatementType);
    }

    // 5. It names what was asked for, and the key that verified it.
    if statement.instance_name != expected.instance {
        return Err(Reason::InstanceMismatch);
    }
    if statement.digest_function != signing::effective_digest_function(expected.digest_function) {
        return Err(Reason::DigestFunctionMismatch);
    }
    match &statement.action_digest {
        Some(d) if d.hash == expected.action_digest.hash && d.size_bytes == expected.action_digest.size_bytes => {}
        _ => return Err(Reason::ActionDigestMismatch),
    }
    if statement.key_id != key.key_id {
        return Err(Reason::KeyIdMismatch);
    }

    // 6. Time.
    let signed_at = statement.signed_at.as_ref().and_then(to_system_time).ok_or(Reason::UndecodableStatement)?;
    check_time(policy, key, signed_at, now)?;

    // 7. Revoked writers and quarantined actions.
    let principal = statement.origin.as_ref().and_then(|o| o.writer.as_ref()).map_or("", |w| w.principal.as_str());
    if policy.writer_revoked(principal, signed_at) {
        return Err(Reason::WriterRevoked);
    }
    if policy.quarantined(&expected.instance, &expected.action_digest.hash, expected.action_digest.size_bytes) {
        return Err(Reason::Quarantined);
    }

    // 8. The result is the one signed.
    let hash = Sha256::digest(canonical_result);
    if statement.action_result_sha256.as_ref() != hash.as_slice()
        || i64::try_from(canonical_result.len()).ok() != Some(statement.action_result_size)
    {
        return Err(Reason::ResultMismatch);
    }

    Ok(Verified { key_name: key.name.clone(), key_id: key.key_id.clone(), signed_at, statement })
}

/// verify-build's path: the result as served (envelope attached, possibly
/// with inlined bytes); the canonical bytes are recomputed from it.
pub fn verify_served(
    policy: &TrustPolicy,
    result: &ActionResult,
    expected: &Expected,
    now: SystemTime,
) -> Result<Verified, Reason> {
    let envelopes = signing::envelopes(result);
    verify_stored(policy, &envelopes, &signing::canonical_bytes(result), expected, now)
}

/// The encoded envelope decoded, within the size caps, with `payload_type`
/// and at least one signature (checks 1-2 for any payload type).
fn decode_envelope(raw: &[u8], payload_type: &str) -> Result<Envelope, Reason> {
    if raw.is_empty() {
        return Err(Reason::Unsigned);
    }
    if raw.len() > MAX_ENVELOPE_BYTES {
        return Err(Reason::TooLarge);
    }
    let envelope = Envelope::decode(raw).map_err(|_| Reason::UndecodableEnvelope)?;
    if envelope.payload_type != payload_type {
        return Err(Reason::WrongPayloadType);
    }
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(Reason::TooLarge);
    }
    if envelope.signatures.is_empty() {
        return Err(Reason::Unsigned);
    }
    Ok(envelope)
}

/// Checks an entry's signed list of referenced blobs
/// (`StoredActionEntry.references_envelope`) against its already verified
/// statement: signed by the key that signed the statement, naming the same
/// instance, digest function, action and result bytes, and hashing to
/// exactly `referenced_blobs`. Only then may the completeness check trust
/// the stored list; otherwise it derives the list from the result itself.
pub fn verify_references(
    policy: &TrustPolicy,
    envelope: &[u8],
    expected: &Expected,
    verified: &Verified,
    referenced_blobs: &[reapi::Digest],
) -> Result<(), Reason> {
    let envelope = decode_envelope(envelope, REFERENCES_PAYLOAD_TYPE)?;
    let key = find_signer(policy, REFERENCES_PAYLOAD_TYPE, &envelope, &expected.instance)?;
    if key.key_id != verified.key_id {
        return Err(Reason::KeyIdMismatch);
    }
    let statement = ReferencesStatement::decode(envelope.payload.as_ref()).map_err(|_| Reason::UndecodableStatement)?;
    if statement.instance_name != expected.instance {
        return Err(Reason::InstanceMismatch);
    }
    if statement.digest_function != signing::effective_digest_function(expected.digest_function) {
        return Err(Reason::DigestFunctionMismatch);
    }
    if statement.action_digest.as_ref() != Some(&expected.action_digest) {
        return Err(Reason::ActionDigestMismatch);
    }
    let list = ReferencedBlobs { blobs: referenced_blobs.to_vec() }.encode_to_vec();
    if statement.action_result_sha256 != verified.statement.action_result_sha256
        || statement.referenced_blobs_sha256.as_ref() != Sha256::digest(&list).as_slice()
    {
        return Err(Reason::ResultMismatch);
    }
    Ok(())
}

/// Checks a signed hit record (ListInvocationHits) and decodes it from the
/// verified payload: signed by a key the policy trusts for the record's
/// instance. The chain (sequence, previous hash) is the caller's to check
/// across records.
pub fn verify_hit_record(policy: &TrustPolicy, envelope: &Envelope) -> Result<(HitRecord, String), Reason> {
    if envelope.payload_type != HIT_RECORD_PAYLOAD_TYPE {
        return Err(Reason::WrongPayloadType);
    }
    if envelope.signatures.is_empty() {
        return Err(Reason::Unsigned);
    }
    if envelope.payload.len() > MAX_ENVELOPE_BYTES || envelope.signatures.len() > MAX_SIGNATURES {
        return Err(Reason::TooLarge);
    }
    // The instance only narrows which keys may vouch; the record is trusted
    // once a key in scope for the instance it names has signed it.
    let claimed = HitRecord::decode(envelope.payload.as_ref()).map_err(|_| Reason::UndecodableStatement)?;
    let key = find_signer(policy, HIT_RECORD_PAYLOAD_TYPE, envelope, &claimed.instance_name)?;
    Ok((claimed, key.key_id.clone()))
}

/// Check 3. Only keys that are active or verify_only and in scope for the
/// instance are trusted. Signature key ids only decide which keys are tried
/// first; a failure is then classified for the metric.
fn find_signer<'p>(
    policy: &'p TrustPolicy,
    payload_type: &str,
    envelope: &Envelope,
    instance: &str,
) -> Result<&'p TrustedKey, Reason> {
    let message = signing::pae(payload_type, &envelope.payload);
    let signatures: Vec<ed25519_dalek::Signature> =
        envelope.signatures.iter().filter_map(|s| ed25519_dalek::Signature::from_slice(&s.sig).ok()).collect();
    let verifies = |key: &TrustedKey| signatures.iter().any(|sig| key.public_key.verify_strict(&message, sig).is_ok());
    let hinted = |key: &TrustedKey| envelope.signatures.iter().any(|s| s.keyid == key.key_id);
    let trusted = |key: &&TrustedKey| key.state.trusted() && key.in_scope(instance);

    let hinted_first = policy.keys.iter().filter(trusted).filter(|k| hinted(k));
    let others = policy.keys.iter().filter(trusted).filter(|k| !hinted(k));
    if let Some(key) = hinted_first.chain(others).find(|k| verifies(k)) {
        return Ok(key);
    }

    if policy.keys.iter().any(|k| k.state == KeyState::Revoked && verifies(k)) {
        return Err(Reason::KeyRevoked);
    }
    if policy.keys.iter().any(|k| k.state.trusted() && !k.in_scope(instance) && verifies(k)) {
        return Err(Reason::KeyNotForInstance);
    }
    if policy.keys.iter().any(hinted) {
        return Err(Reason::BadSignature);
    }
    Err(Reason::UnknownKey)
}

/// Check 6, in the documented order.
fn check_time(policy: &TrustPolicy, key: &TrustedKey, signed_at: SystemTime, now: SystemTime) -> Result<(), Reason> {
    if !key.in_window(signed_at) {
        return Err(Reason::OutsideKeyWindow);
    }
    if now.checked_add(policy.clock_skew).is_some_and(|latest| signed_at > latest) {
        return Err(Reason::FutureSignedAt);
    }
    if let Some(max_age) = policy.max_age {
        if now.duration_since(signed_at).is_ok_and(|age| age > max_age) {
            return Err(Reason::TooOld);
        }
    }
    if policy.not_before.is_some_and(|cutoff| signed_at < cutoff) {
        return Err(Reason::BeforeCutoff);
    }
    Ok(())
}

/// A protobuf timestamp as a `SystemTime`; `None` when out of range.
fn to_system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let nanos = Duration::from_nanos(u64::try_from(ts.nanos).ok().filter(|n| *n < 1_000_000_000)?);
    let whole = Duration::from_secs(ts.seconds.unsigned_abs());
    let base = if ts.seconds >= 0 { UNIX_EPOCH.checked_add(whole)? } else { UNIX_EPOCH.checked_sub(whole)? };
    base.checked_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r:?}");
            assert_eq!(Reason::from_label(r.as_str()), Some(r));
            assert!(r.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(Reason::Unsigned.as_str(), "unsigned");
        assert_eq!(Reason::BadSignature.to_status().reason, "bad_signature");
    }

    #[test]
    fn timestamps_out_of_range_are_refused() {
        assert!(to_system_time(&prost_types::Timestamp { seconds: 0, nanos: -1 }).is_none());
        assert!(to_system_time(&prost_types::Timestamp { seconds: 0, nanos: 1_000_000_000 }).is_none());
        // Extremes are either representable or refused; never a panic.
        for seconds in [i64::MIN, i64::MAX] {
            let _ = to_system_time(&prost_types::Timestamp { seconds, nanos: 999_999_999 });
        }
        let t = to_system_time(&prost_types::Timestamp { seconds: 10, nanos: 5 }).unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::new(10, 5));
    }

    #[test]
    fn hostile_envelopes_never_panic() {
        let policy = TrustPolicy::from_toml("policy_version = 1\nclock_skew = \"5m\"\n").unwrap();
        let expected = Expected {
            instance: String::new(),
            digest_function: 0,
            action_digest: reapi::Digest { hash: String::new(), size_bytes: 0 },
        };
        let now = SystemTime::now();
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(verify_stored(&policy, &[&big], b"", &expected, now), Err(Reason::TooLarge));
        assert_eq!(verify_stored(&policy, &[&[0xff, 0xff]], b"", &expected, now), Err(Reason::UndecodableEnvelope));
        assert_eq!(verify_stored(&policy, &[], b"", &expected, now), Err(Reason::Unsigned));
        assert_eq!(verify_stored(&policy, &[b""], b"", &expected, now), Err(Reason::Unsigned));
        let no_sigs = Envelope { payload_type: PAYLOAD_TYPE.into(), ..Default::default() }.encode_to_vec();
        assert_eq!(verify_stored(&policy, &[&no_sigs], b"", &expected, now), Err(Reason::Unsigned));
        let many = Envelope {
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![Default::default(); MAX_SIGNATURES + 1],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(verify_stored(&policy, &[&many], b"", &expected, now), Err(Reason::TooLarge));
        let short_sig = Envelope {
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![crate::proto::prov::Signature { sig: vec![1, 2, 3].into(), keyid: "x".into() }],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(verify_stored(&policy, &[&short_sig], b"", &expected, now), Err(Reason::UnknownKey));
        // Arbitrary byte strings.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            assert!(verify_stored(&policy, &[&bytes], &bytes, &expected, now).is_err());
        }
    }
}
