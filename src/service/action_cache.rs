//! ActionCache: GetActionResult and UpdateActionResult.

use prost::Message;

use crate::action_cache::InlineRequest;
use crate::auth::{Peer, Permission};
use crate::cas::parse_digest;
use crate::error::Error;
use crate::proto::reapi::{self, action_cache_server::ActionCache};
use crate::resource::InstanceName;

use super::Context;

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
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let action = parse_digest(req.digest_function, req.action_digest.as_ref())?;
        self.0.gate.authorize(&peer, &instance, Permission::AcRead)?;

        let ac = &self.0.ac;
        let Some(entry) = ac.load(&instance, action).await? else {
            return Err(Error::NotFound(format!("action {action} is not in the cache")).into());
        };
        ac.check_complete(&instance, action, &entry).await?;
        let mut result = reapi::ActionResult::decode(entry.canonical_result.clone())
            .map_err(|_| Error::NotFound(format!("action {action} has an undecodable stored result")))?;
        let ask =
            InlineRequest { stdout: req.inline_stdout, stderr: req.inline_stderr, files: req.inline_output_files };
        ac.inline(&instance, action, &mut result, &ask).await?;
        Ok(tonic::Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: tonic::Request<reapi::UpdateActionResultRequest>,
    ) -> Result<tonic::Response<reapi::ActionResult>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let action = parse_digest(req.digest_function, req.action_digest.as_ref())?;
        let _caller = self.0.gate.authorize(&peer, &instance, Permission::AcWrite)?;
        let result = req
            .action_result
            .ok_or_else(|| Error::InvalidArgument("UpdateActionResult without an action_result".into()))?;
        let ac = &self.0.ac;
        let prepared = ac.prepare(&instance, action, result).await?;
        ac.store(&instance, action, &prepared, Vec::new()).await?;
        Ok(tonic::Response::new(prepared.result))
    }
}
