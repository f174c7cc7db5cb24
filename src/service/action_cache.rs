//! ActionCache: GetActionResult (verified on every read) and
//! UpdateActionResult (signed on every write).

use prost::Message;

use crate::access::gate::{Peer, Permission};
use crate::cache::action_cache::InlineRequest;
use crate::cache::cas::parse_digest;
use crate::cache::resource::InstanceName;
use crate::error::Error;
use crate::proto::reapi::{self, action_cache_server::ActionCache};
use crate::provenance::hit_log::{self, Answer};
use crate::provenance::signing;
use crate::provenance::verify::Reason;
use crate::provenance::{Mode, Origin, Subject};
use crate::store::Key;

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
        let limits = self.0.enforcer(&caller.principal);
        let ask = InlineRequest::new(req.inline_stdout, req.inline_stderr, req.inline_output_files, &limits)?;

        let (ac, prov) = (&self.0.ac, &self.0.provenance);
        let Some((raw, entry)) = ac.load(&instance, action).await? else {
            return Err(Error::NotFound(format!("action {action} is not in the cache")).into());
        };
        let key = Key::new(&instance, &action);
        let function = signing::effective_digest_function(req.digest_function);
        let mut flagged = None;
        let subject = Subject { instance: &instance, digest_function: function, action };
        let log = HitLog { ctx: &self.0, claims: &claims, subject: &subject, reader: &caller.principal };
        let origin = match prov.verify(&subject, key.as_bytes(), &raw, &entry) {
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
        let references_signed = origin.as_ref().is_some_and(|o| o.references_signed);
        if let Err(e) =
            ac.check_complete(&instance, action, &entry, references_signed, &self.0.enforcer(&caller.principal)).await
        {
            prov.counters().record_failure(Reason::MissingBlob);
            log.record(Reason::MissingBlob.as_str(), origin.as_deref(), false);
            return Err(e.into());
        }
        log.record(flagged.map(|r| r.as_str()).unwrap_or("hit"), origin.as_deref(), true);
        let mut result = reapi::ActionResult::decode(entry.canonical_result.clone())
            .map_err(|_| Error::NotFound(format!("action {action} has an undecodable stored result")))?;
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
        let prepared = ac.prepare(&instance, action, result, &self.0.enforcer(&caller.principal)).await?;
        crate::failpoint::crash_point("ac-after-prepare");
        let canonical = prepared.result.encode_to_vec();
        let function = signing::effective_digest_function(req.digest_function);
        let subject = Subject { instance: &instance, digest_function: function, action };
        let envelope = self.0.provenance.sign(&signer, &subject, &prepared, &canonical, &caller, claims);
        let referenced: Vec<reapi::Digest> = prepared.referenced.iter().map(|d| d.to_proto()).collect();
        let references = self.0.provenance.sign_references(&signer, &subject, &canonical, &referenced);
        crate::failpoint::crash_point("ac-after-sign");
        ac.store(&instance, action, &prepared, canonical, envelope.clone(), references).await?;
        let mut reply = prepared.result;
        signing::attach_envelope_bytes(&mut reply, envelope);
        Ok(tonic::Response::new(reply))
    }
}

/// Records answered GetActionResult calls in the per-invocation hit log
/// (the rules are in [`hit_log`]).
struct HitLog<'a> {
    ctx: &'a Context,
    claims: &'a Option<reapi::RequestMetadata>,
    subject: &'a Subject<'a>,
    reader: &'a str,
}

impl HitLog<'_> {
    fn record(&self, verdict: &str, origin: Option<&Origin>, served: bool) {
        let answer = Answer { subject: self.subject, verdict, origin, served, reader: self.reader };
        let Some(record) = hit_log::record_of(&answer, self.claims.as_ref(), std::time::SystemTime::now()) else {
            return;
        };
        let store = self.ctx.cas.store().clone();
        let signer = self.ctx.provenance.hit_signer();
        let max = self.ctx.limits.max_hit_records_per_principal;
        let limit_hits = self.ctx.limit_hits.clone();
        // Off the request path: chaining, signing and storing must not add
        // latency to hits.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = hit_log::append(&store, signer.as_deref(), max, &limit_hits, record) {
                tracing::warn!(error = %e, "could not record a hit in the audit log");
            }
        });
    }
}
