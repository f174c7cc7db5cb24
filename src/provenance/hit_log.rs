//! The per-invocation hit log (docs/signing.md, "The hit log"): what the
//! server answered to each GetActionResult of a build, for `verify-build`.
//!
//! Readers cause these records, so nothing a reader sends may decide what an
//! auditor concludes: the reader principal is the server-attested one, the
//! reader's claims (mnemonic, target) are capped and marked, the records one
//! principal can add to an invocation are bounded, and every record is
//! signed with the server's key and chained to its predecessor (sequence
//! without gaps, hash of the previous payload), so deleting, reordering or
//! altering one at rest is a finding, not a silent pass.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use prost::Message;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::limits::LimitHits;
use crate::proto::prov::{Envelope, HitRecord, SignedHitRecord};
use crate::proto::reapi;
use crate::provenance::signing::{self, SigningKey, HIT_RECORD_PAYLOAD_TYPE};
use crate::store::hit_log_store::HitRow;

use super::notary::{Origin, Subject};

/// The verdict of the last record a principal gets in an invocation once it
/// reached `limits.max_hit_records_per_principal`.
pub const VERDICT_RECORD_LIMIT: &str = "record_limit_reached";
/// The name of the limit, as counted by [`LimitHits`].
pub const RECORD_LIMIT: &str = "max_hit_records_per_principal";
/// Longest reader claim (mnemonic, target) kept in a record; longer ones are
/// cut and the record says so (`claims_truncated`).
pub const MAX_CLAIM_BYTES: usize = 256;
/// Records per listing page when the caller does not say.
pub const PAGE_DEFAULT: usize = 1000;
/// Most records per listing page.
pub const PAGE_MAX: usize = 10_000;
/// Most stored bytes per listing page (one record always fits), so a page
/// stays far below a 4 MiB client receive limit whatever the records hold.
pub const PAGE_MAX_BYTES: usize = 2 << 20;

/// What the server answered to one GetActionResult.
#[derive(Debug)]
pub struct Answer<'a> {
    /// The lookup.
    pub subject: &'a Subject<'a>,
    /// "hit", or the failure reason label.
    pub verdict: &'a str,
    /// From the verified statement (none when verification failed).
    pub origin: Option<&'a Origin>,
    /// Whether the result was served.
    pub served: bool,
    /// The reader's certificate identity.
    pub reader: &'a str,
}

/// The record of an answer, before it is placed in its chain: `None` when
/// the reader named no invocation (nothing to audit it under).
pub fn record_of(answer: &Answer<'_>, claims: Option<&reapi::RequestMetadata>, at: SystemTime) -> Option<HitRecord> {
    let claims = claims.filter(|c| !c.tool_invocation_id.is_empty())?;
    let origin = answer.origin.cloned().unwrap_or_default();
    let mut action_mnemonic = claims.action_mnemonic.clone();
    let mut target_id = claims.target_id.clone();
    let cut_mnemonic = signing::truncate_utf8(&mut action_mnemonic, MAX_CLAIM_BYTES);
    let cut_target = signing::truncate_utf8(&mut target_id, MAX_CLAIM_BYTES);
    Some(HitRecord {
        tool_invocation_id: claims.tool_invocation_id.clone(),
        instance_name: answer.subject.instance.as_str().to_string(),
        digest_function: answer.subject.digest_function,
        action_digest: Some(answer.subject.action.to_proto()),
        verdict: answer.verdict.to_string(),
        writer_principal: origin.writer_principal,
        origin_invocation_id: origin.origin_invocation_id,
        signed_at: origin.signed_at.map(prost_types::Timestamp::from),
        key_id: origin.key_id,
        reader_principal: answer.reader.to_string(),
        answered_at: Some(prost_types::Timestamp::from(at)),
        action_mnemonic,
        target_id,
        served: answer.served,
        sequence: 0,
        previous_sha256: Bytes::new(),
        claims_truncated: cut_mnemonic || cut_target,
    })
}

/// Where an invocation's chain stands: what the next record needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// The sequence the next record gets (1 for a new invocation).
    pub next_sequence: u64,
    /// SHA-256 of the last record's signed payload (empty before the first).
    pub previous_sha256: Vec<u8>,
    /// Records written per reader principal (for the per-principal cap).
    pub records_by_principal: HashMap<String, u64>,
}

impl Default for ChainHead {
    fn default() -> Self {
        ChainHead { next_sequence: 1, previous_sha256: Vec::new(), records_by_principal: HashMap::new() }
    }
}

/// A record placed in its chain and signed, ready to store; the head moves
/// past it ([`ChainHead::advance`]) only once it is stored.
#[derive(Debug)]
pub struct Link {
    /// Its sequence in the chain.
    pub sequence: u64,
    /// When the server answered (ns), for purging.
    pub answered_at_nanos: u64,
    /// The encoded envelope to store.
    pub envelope: Vec<u8>,
    payload_sha256: Vec<u8>,
    principal: String,
}

impl ChainHead {
    /// Counts one stored row in (a head not in memory is read back from the
    /// stored chain: a new invocation, a restart, or one dropped from the
    /// bounded map). Records written before chaining do not count.
    pub fn absorb(&mut self, row: &HitRow) {
        let Some(sequence) = row.sequence else { return };
        let payload = Envelope::decode(&row.value[..]).map(|e| e.payload).unwrap_or_default();
        if let Ok(record) = HitRecord::decode(payload.as_ref()) {
            *self.records_by_principal.entry(record.reader_principal).or_default() += 1;
        }
        if sequence >= self.next_sequence {
            self.next_sequence = sequence + 1;
            self.previous_sha256 = Sha256::digest(&payload).to_vec();
        }
    }

    /// Places a record after this head: gives it the next sequence and its
    /// predecessor's hash and signs it (unsigned when the server has no
    /// usable key: listed, and flagged by verify-build). A principal's
    /// `max_per_principal`-th record in an invocation is replaced by one with
    /// verdict [`VERDICT_RECORD_LIMIT`]; later ones are dropped (`None`);
    /// both are counted.
    pub fn link(
        &self,
        signer: Option<&SigningKey>,
        max_per_principal: u64,
        limit_hits: &LimitHits,
        mut record: HitRecord,
    ) -> Option<Link> {
        let invocation = &record.tool_invocation_id;
        let principal = record.reader_principal.clone();
        let written = self.records_by_principal.get(&principal).copied().unwrap_or(0);
        if written >= max_per_principal {
            limit_hits.hit(RECORD_LIMIT, &principal, format_args!("hit record dropped for invocation {invocation:?}"));
            return None;
        }
        if written + 1 == max_per_principal {
            limit_hits.hit(
                RECORD_LIMIT,
                &principal,
                format_args!("{max_per_principal} hit records in invocation {invocation:?}; recording no more"),
            );
            record.verdict = VERDICT_RECORD_LIMIT.to_string();
        }
        record.sequence = self.next_sequence;
        record.previous_sha256 = Bytes::from(self.previous_sha256.clone());
        let payload = Bytes::from(record.encode_to_vec());
        let payload_sha256 = Sha256::digest(&payload).to_vec();
        let envelope = match signer {
            Some(key) => key.sign_payload(HIT_RECORD_PAYLOAD_TYPE, payload),
            None => unsigned(payload),
        };
        Some(Link {
            sequence: record.sequence,
            answered_at_nanos: answered_nanos(&record),
            envelope: envelope.encode_to_vec(),
            payload_sha256,
            principal,
        })
    }

    /// Moves past a stored link.
    pub fn advance(&mut self, link: Link) {
        self.next_sequence += 1;
        self.previous_sha256 = link.payload_sha256;
        *self.records_by_principal.entry(link.principal).or_default() += 1;
    }
}

fn answered_nanos(record: &HitRecord) -> u64 {
    record.answered_at.as_ref().map(|t| (t.seconds.max(0) as u64) * 1_000_000_000 + t.nanos.max(0) as u64).unwrap_or(0)
}

/// One listed record, with the instance it is about (for authorization).
#[derive(Debug)]
pub struct Listed {
    /// The record's instance, read from its (not yet verified) payload.
    pub instance_name: String,
    /// The record as stored: a signed envelope, or a record from before
    /// signing wrapped in an envelope without signatures.
    pub record: SignedHitRecord,
}

/// One page of an invocation's hit log.
#[derive(Debug, Default)]
pub struct ListPage {
    /// The records, in chain order.
    pub records: Vec<Listed>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// The records per listing page a caller asks for: 0 is
/// [`PAGE_DEFAULT`], more than [`PAGE_MAX`] is [`PAGE_MAX`].
pub fn page_limit(page_size: i32) -> Result<usize> {
    match page_size {
        n if n < 0 => Err(Error::InvalidArgument(format!("page_size {n} is negative"))),
        0 => Ok(PAGE_DEFAULT),
        n => Ok((n as usize).min(PAGE_MAX)),
    }
}

/// A stored row as listed: its envelope (unsigned for records from before
/// signing or undecodable ones) and the instance it names.
pub fn listed(row: HitRow) -> Listed {
    let envelope = match row.sequence {
        Some(_) => Envelope::decode(&row.value[..]).unwrap_or_else(|_| unsigned(Bytes::from(row.value))),
        None => unsigned(Bytes::from(row.value)),
    };
    let instance_name = HitRecord::decode(envelope.payload.as_ref()).map(|r| r.instance_name).unwrap_or_default();
    Listed { instance_name, record: SignedHitRecord { envelope: Some(envelope) } }
}

/// A stored value listed as an envelope without signatures (records from
/// before signing, or damaged ones): verify-build reports it as unsigned.
fn unsigned(payload: Bytes) -> Envelope {
    Envelope { payload, payload_type: HIT_RECORD_PAYLOAD_TYPE.to_string(), signatures: vec![] }
}
