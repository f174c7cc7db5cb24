//! Audit: the per-invocation hit log and the stored entries behind it, for
//! `provcache verify-build`. Every call needs `audit:read`.

use prost::Message;

use crate::auth::{Peer, Permission};
use crate::cas::{blocking, parse_digest};
use crate::error::Error;
use crate::proto::prov::audit_server::Audit;
use crate::proto::prov::storage::StoredActionEntry;
use crate::proto::prov::{self, HitRecord};
use crate::proto::reapi;
use crate::resource::InstanceName;
use crate::signing;
use crate::store::Key;

use super::Context;

const PAGE_DEFAULT: usize = 1000;
const PAGE_MAX: usize = 10_000;

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

#[tonic::async_trait]
impl Audit for AuditService {
    async fn list_invocation_hits(
        &self,
        request: tonic::Request<prov::ListInvocationHitsRequest>,
    ) -> Result<tonic::Response<prov::ListInvocationHitsResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        if req.tool_invocation_id.is_empty() {
            return Err(Error::InvalidArgument("tool_invocation_id is required".into()).into());
        }
        if req.page_size < 0 {
            return Err(Error::InvalidArgument(format!("page_size {} is negative", req.page_size)).into());
        }
        let gate = &self.0.gate;
        // Surfaces UNAUTHENTICATED at once; permission is then checked per record's instance.
        if let Err(e) = gate.authorize(&peer, &InstanceName::default(), Permission::AuditRead) {
            if matches!(e, Error::Unauthenticated(_)) {
                return Err(e.into());
            }
        }
        let limit = if req.page_size == 0 { PAGE_DEFAULT } else { (req.page_size as usize).min(PAGE_MAX) };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(
                hex::decode(&req.page_token)
                    .map_err(|_| Error::InvalidArgument("page_token was not issued by this server".into()))?,
            )
        };
        let store = self.0.cas.store().clone();
        let invocation = req.tool_invocation_id.clone();
        let rows = blocking(move || store.audit_list(&invocation, after.as_deref(), limit)).await?;
        let next_page_token = if rows.len() == limit { rows.last().map(|(k, _)| hex::encode(k)) } else { None };
        let mut hits = Vec::with_capacity(rows.len());
        let mut denied = None;
        for (_, value) in &rows {
            let Ok(record) = HitRecord::decode(&value[..]) else { continue };
            let instance = InstanceName::parse(&record.instance_name).unwrap_or_default();
            match gate.authorize(&peer, &instance, Permission::AuditRead) {
                Ok(_) => hits.push(record),
                Err(e) => denied = Some(e),
            }
        }
        if hits.is_empty() {
            if let Some(e) = denied {
                return Err(e.into());
            }
        }
        // Transitional: records are wrapped unsigned; signing and chaining come next.
        let records = hits
            .iter()
            .map(|h| prov::SignedHitRecord {
                envelope: Some(prov::Envelope {
                    payload: h.encode_to_vec().into(),
                    payload_type: signing::HIT_RECORD_PAYLOAD_TYPE.to_string(),
                    signatures: vec![],
                }),
            })
            .collect();
        Ok(tonic::Response::new(prov::ListInvocationHitsResponse {
            records,
            next_page_token: next_page_token.unwrap_or_default(),
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
        let key = Key::new(&instance, &action);
        let store = self.0.cas.store().clone();
        let (current, history) = blocking(move || Ok((store.ac_get(&key)?, store.ac_history(&key)?))).await?;
        let decode = |bytes: &[u8]| StoredActionEntry::decode(bytes).ok().and_then(|e| served_form(&e));
        Ok(tonic::Response::new(prov::GetStoredEntryResponse {
            current: current.as_deref().and_then(decode),
            history: history.iter().filter_map(|(_, v)| decode(v)).collect(),
            next_history_page_token: String::new(),
        }))
    }
}
