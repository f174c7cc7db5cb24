//! Audit: the per-invocation hit log and the stored entries behind it, for
//! `provcache verify-build`. Every call needs `audit:read`; the reads are
//! [`crate::cache::audit::AuditLog`]'s.

use std::collections::BTreeSet;

use crate::access::gate::{Peer, Permission};
use crate::cache::cas::parse_digest;
use crate::cache::resource::InstanceName;
use crate::error::Error;
use crate::proto::prov;
use crate::proto::prov::audit_server::Audit;

use super::Context;

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditService(pub Context);

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
        let page = self.0.audit.list_hits(&req.tool_invocation_id, req.page_size, &req.page_token).await?;
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
        let audit = &self.0.audit;
        let entry = audit.stored_entry(&instance, &action, req.history_page_size, &req.history_page_token).await?;
        Ok(tonic::Response::new(entry))
    }
}
