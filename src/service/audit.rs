//! Audit: the per-invocation hit log and the stored entries behind it, for
//! `provcache verify-build`. Every call needs `audit:read`.

use std::collections::BTreeSet;

use prost::Message;

use crate::access::gate::{Peer, Permission};
use crate::cache::cas::{blocking, parse_digest};
use crate::cache::resource::InstanceName;
use crate::error::Error;
use crate::proto::prov;
use crate::proto::prov::audit_server::Audit;
use crate::proto::prov::storage::StoredActionEntry;
use crate::proto::reapi;
use crate::provenance::hit_log;
use crate::provenance::signing;
use crate::store::Key;

use super::Context;

/// History versions per GetStoredEntry page when the caller does not say.
const HISTORY_PAGE_DEFAULT: usize = 100;
/// Most history versions per page.
const HISTORY_PAGE_MAX: usize = 1000;
/// Most stored bytes per GetStoredEntry page, `current` included; a single
/// version (at most a 3 MiB result and its envelope) always fits, so every
/// reply stays under a 4 MiB client receive limit.
const HISTORY_PAGE_MAX_BYTES: usize = 3 << 20;

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditService(pub Context);

fn served_form(entry: &StoredActionEntry) -> Option<prov::StoredEntry> {
    let mut result = reapi::ActionResult::decode(entry.canonical_result.clone()).ok()?;
    // verify-build checks the stored bytes when a re-encoding would hide a difference.
    let reencoded = signing::canonical_bytes(&result) == entry.canonical_result[..];
    let stored_canonical_result = if reencoded { Default::default() } else { entry.canonical_result.clone() };
    if !entry.envelope.is_empty() {
        signing::attach_envelope_bytes(&mut result, entry.envelope.to_vec());
    }
    Some(prov::StoredEntry {
        result: Some(result),
        stored_at: Some(prost_types::Timestamp { seconds: entry.stored_at_unix, nanos: 0 }),
        stored_canonical_result,
    })
}

fn decode_served(bytes: &[u8]) -> Option<prov::StoredEntry> {
    StoredActionEntry::decode(bytes).ok().and_then(|e| served_form(&e))
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn list_invocation_hits(
        &self,
        request: tonic::Request<prov::ListInvocationHitsRequest>,
    ) -> Result<tonic::Response<prov::ListInvocationHitsResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let gate = &self.0.gate;
        // Before any read: a caller who may audit nothing is refused alike
        // for an unknown invocation and a known one.
        gate.authorize_anywhere(&peer, Permission::AuditRead)?;
        let store = self.0.cas.store().clone();
        let page =
            blocking(move || hit_log::list(&store, &req.tool_invocation_id, req.page_size, &req.page_token)).await?;
        // Every record's instance must be auditable by the caller: a chain
        // with records silently left out would read as tampering (or hide it).
        let instances: BTreeSet<&str> = page.records.iter().map(|r| r.instance_name.as_str()).collect();
        for name in instances {
            let instance = InstanceName::parse(name).unwrap_or_default();
            gate.authorize(&peer, &instance, Permission::AuditRead)?;
        }
        Ok(tonic::Response::new(prov::ListInvocationHitsResponse {
            records: page.records.into_iter().map(|r| r.record).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_stored_entry(
        &self,
        request: tonic::Request<prov::GetStoredEntryRequest>,
    ) -> Result<tonic::Response<prov::GetStoredEntryResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let action = parse_digest(req.digest_function, req.action_digest.as_ref())?;
        self.0.gate.authorize(&peer, &instance, Permission::AuditRead)?;
        let count = match req.history_page_size {
            n if n < 0 => return Err(Error::InvalidArgument(format!("history_page_size {n} is negative")).into()),
            0 => HISTORY_PAGE_DEFAULT,
            n => (n as usize).min(HISTORY_PAGE_MAX),
        };
        // The token is the history time (u64 BE, hex) the page starts at.
        let from = if req.history_page_token.is_empty() {
            None
        } else {
            let raw = hex::decode(&req.history_page_token).ok().and_then(|b| <[u8; 8]>::try_from(b).ok());
            Some(u64::from_be_bytes(
                raw.ok_or_else(|| Error::InvalidArgument("history_page_token was not issued by this server".into()))?,
            ))
        };
        let key = Key::new(&instance, &action);
        let store = self.0.cas.store().clone();
        let (current, page) = blocking(move || {
            // Only the first page carries the current entry, and it counts
            // against the page's bytes (the page may then hold no history).
            let current = if from.is_none() { store.ac_get(&key)? } else { None };
            let budget = HISTORY_PAGE_MAX_BYTES.saturating_sub(current.as_ref().map_or(0, Vec::len));
            let page = store.ac_history_page(&key, from.unwrap_or(0), count, budget, current.is_none())?;
            Ok((current, page))
        })
        .await?;
        Ok(tonic::Response::new(prov::GetStoredEntryResponse {
            current: current.as_deref().and_then(decode_served),
            history: page.rows.iter().filter_map(|(_, v)| decode_served(v)).collect(),
            next_history_page_token: page.next.map(hex::encode).unwrap_or_default(),
        }))
    }
}
