//! ActionCache: GetActionResult (verified on every read) and
//! UpdateActionResult (signed on every write).

use prost::Message;

use crate::action_cache::InlineRequest;
use crate::auth::{Peer, Permission};
use crate::cas::parse_digest;
use crate::error::Error;
use crate::proto::prov::HitRecord;
use crate::proto::reapi::{self, action_cache_server::ActionCache};
use crate::provenance::{Mode, Origin, Subject};
use crate::resource::InstanceName;
use crate::signing;
use crate::store::Key;
use crate::trust::verify::Reason;

use super::{request_metadata, Context};

/// The ActionCache service.
#[derive(Debug, Clone)]
pub struct ActionCacheService(pub Context);

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: tonic::Request<reapi::GetActionResultRequest>,
    ) -> Result<tonic::Response<reapi::ActionResult>, tonic::Status> {
        let peer = Peer::of(&request);
        let claims = request_metadata(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let action = parse_digest(req.digest_function, req.action_digest.as_ref())?;
        let caller = self.0.gate.authorize(&peer, &instance, Permission::AcRead)?;

        let (ac, prov) = (&self.0.ac, &self.0.provenance);
        let Some((raw, entry)) = ac.load(&instance, action).await? else {
            return Err(Error::NotFound(format!("action {action} is not in the cache")).into());
        };
        let key = Key::new(&instance, &action);
        let function = signing::effective_digest_function(req.digest_function);
        let mut flagged = None;
        let subject = Subject { instance: &instance, digest_function: function, action };
        let log = HitLog { ctx: &self.0, claims: &claims, subject: &subject, reader: &caller.principal };
        let origin = match prov.verify(&subject, key.as_bytes(), &raw, &entry.canonical_result, &entry.envelope) {
            Ok(origin) => Some(origin),
            Err(reason) => {
                tracing::warn!(%action, instance = %instance, reason = reason.as_str(), "stored result failed verification");
                match prov.mode() {
                    Mode::Reject => {
                        log.record(reason.as_str(), None, false);
                        return Err(Error::NotFound(format!(
                            "action {action}: the stored result failed verification ({reason}) and is treated as a miss"
                        ))
                        .into());
                    }
                    Mode::Flag => flagged = Some(reason),
                }
                None
            }
        };
        if let Err(e) = ac.check_complete(&instance, action, &entry).await {
            prov.counters().record_failure(Reason::MissingBlob);
            log.record(Reason::MissingBlob.as_str(), origin.as_deref(), false);
            return Err(e.into());
        }
        log.record(flagged.map(|r| r.as_str()).unwrap_or("hit"), origin.as_deref(), true);
        let mut result = reapi::ActionResult::decode(entry.canonical_result.clone())
            .map_err(|_| Error::NotFound(format!("action {action} has an undecodable stored result")))?;
        let ask =
            InlineRequest { stdout: req.inline_stdout, stderr: req.inline_stderr, files: req.inline_output_files };
        match ac.inline(&instance, action, &mut result, &ask).await {
            Ok(()) => {}
            // A referenced blob found corrupt while inlining was just removed
            // from the CAS: the result is incomplete now, so it is a miss
            // (read-path check 9), not an error the client cannot act on.
            Err(Error::DataLoss(detail)) => {
                prov.counters().record_failure(Reason::MissingBlob);
                tracing::warn!(%action, instance = %instance, %detail, "a blob of a stored result is corrupt");
                return Err(Error::NotFound(format!("action {action} references a corrupt blob: {detail}")).into());
            }
            Err(e) => return Err(e.into()),
        }
        if !entry.envelope.is_empty() {
            signing::attach_envelope_bytes(&mut result, entry.envelope.to_vec());
        }
        if let Some(reason) = flagged {
            signing::attach_status(&mut result, &reason.to_status());
        }
        Ok(tonic::Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: tonic::Request<reapi::UpdateActionResultRequest>,
    ) -> Result<tonic::Response<reapi::ActionResult>, tonic::Status> {
        let peer = Peer::of(&request);
        let claims = request_metadata(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let action = parse_digest(req.digest_function, req.action_digest.as_ref())?;
        let caller = self.0.gate.authorize(&peer, &instance, Permission::AcWrite)?;
        // Fail closed before any work: no usable key, no Action Cache writes.
        let signer = self.0.provenance.require_signer()?;
        let result = req
            .action_result
            .ok_or_else(|| Error::InvalidArgument("UpdateActionResult without an action_result".into()))?;
        let ac = &self.0.ac;
        let prepared = ac.prepare(&instance, action, result).await?;
        crate::failpoint::crash_point("ac-after-prepare");
        let canonical = prepared.result.encode_to_vec();
        let function = signing::effective_digest_function(req.digest_function);
        let subject = Subject { instance: &instance, digest_function: function, action };
        let envelope = self.0.provenance.sign(&signer, &subject, &prepared, &canonical, &caller, claims);
        crate::failpoint::crash_point("ac-after-sign");
        ac.store(&instance, action, &prepared, canonical, envelope.clone()).await?;
        let mut reply = prepared.result;
        signing::attach_envelope_bytes(&mut reply, envelope);
        Ok(tonic::Response::new(reply))
    }
}

/// Records answered GetActionResult calls in the per-invocation hit log.
struct HitLog<'a> {
    ctx: &'a Context,
    claims: &'a Option<reapi::RequestMetadata>,
    subject: &'a Subject<'a>,
    reader: &'a str,
}

impl HitLog<'_> {
    fn record(&self, verdict: &str, origin: Option<&Origin>, served: bool) {
        let Some(claims) = self.claims.as_ref().filter(|c| !c.tool_invocation_id.is_empty()) else { return };
        let now = std::time::SystemTime::now();
        let origin = origin.cloned().unwrap_or_default();
        let record = HitRecord {
            tool_invocation_id: claims.tool_invocation_id.clone(),
            instance_name: self.subject.instance.as_str().to_string(),
            digest_function: self.subject.digest_function,
            action_digest: Some(self.subject.action.to_proto()),
            verdict: verdict.to_string(),
            writer_principal: origin.writer_principal,
            origin_invocation_id: origin.origin_invocation_id,
            signed_at: origin.signed_at.map(prost_types::Timestamp::from),
            key_id: origin.key_id,
            reader_principal: self.reader.to_string(),
            answered_at: Some(prost_types::Timestamp::from(now)),
            action_mnemonic: claims.action_mnemonic.clone(),
            target_id: claims.target_id.clone(),
            served,
            ..Default::default()
        };
        let nanos = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let store = self.ctx.cas.store().clone();
        let invocation = record.tool_invocation_id.clone();
        let bytes = record.encode_to_vec();
        // Off the request path: the hit log must not add latency to hits.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.audit_put(&invocation, nanos, &bytes) {
                tracing::warn!(error = %e, "could not record a hit in the audit log");
            }
        });
    }
}
