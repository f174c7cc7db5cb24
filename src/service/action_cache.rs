//! ActionCache: GetActionResult (verified on every read) and
//! UpdateActionResult (signed on every write). The use cases are
//! [`crate::cache::action_cache::ActionCache::get`] and `update`.

use crate::access::gate::{Peer, Permission};
use crate::cache::action_cache::{InlineRequest, Lookup, Update};
use crate::cache::cas::parse_digest;
use crate::cache::resource::InstanceName;
use crate::error::Error;
use crate::proto::reapi::{self, action_cache_server::ActionCache};

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
        let inline = InlineRequest::new(req.inline_stdout, req.inline_stderr, req.inline_output_files, &limits)?;
        let digest_function = req.digest_function;
        let reader = &caller.principal;
        let lookup = Lookup { instance: &instance, digest_function, action, inline, reader, claims, limits: &limits };
        Ok(tonic::Response::new(self.0.ac.get(lookup).await?))
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
        let limits = self.0.enforcer(&caller.principal);
        let (digest_function, result) = (req.digest_function, req.action_result);
        let update =
            Update { instance: &instance, digest_function, action, result, caller: &caller, claims, limits: &limits };
        Ok(tonic::Response::new(self.0.ac.update(update).await?))
    }
}
