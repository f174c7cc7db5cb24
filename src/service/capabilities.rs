//! Capabilities: what this cache offers, computed per caller.

use crate::access::gate::{Peer, Permission};
use crate::cache::cas::MAX_BATCH_TOTAL_BYTES;
use crate::cache::digest::DigestFunction;
use crate::cache::resource::InstanceName;
use crate::proto::build::bazel::semver::SemVer;
use crate::proto::reapi::{
    self, capabilities_server::Capabilities, compressor, priority_capabilities::PriorityRange,
    symlink_absolute_path_strategy,
};

use super::Context;

/// The Capabilities service.
#[derive(Debug, Clone)]
pub struct CapabilitiesService(pub Context);

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: tonic::Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<tonic::Response<reapi::ServerCapabilities>, tonic::Status> {
        let peer = Peer::of(&request);
        let instance = InstanceName::parse(&request.get_ref().instance_name).map_err(crate::error::Error::from)?;
        let gate = &self.0.gate;
        if !Permission::ALL.iter().any(|p| gate.allows(&peer, &instance, *p)) {
            // Surface the precise reason (unauthenticated, or no permission at all).
            gate.authorize(&peer, &instance, Permission::CasRead)?;
        }
        let update_enabled = gate.allows(&peer, &instance, Permission::AcWrite);
        let zstd = vec![compressor::Value::Zstd as i32];
        let version = |minor| Some(SemVer { major: 2, minor, patch: 0, prerelease: String::new() });
        Ok(tonic::Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto()).collect(),
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities { update_enabled }),
                cache_priority_capabilities: Some(reapi::PriorityCapabilities {
                    priorities: vec![PriorityRange { min_priority: 0, max_priority: 0 }],
                }),
                max_batch_total_size_bytes: MAX_BATCH_TOTAL_BYTES as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: zstd.clone(),
                supported_batch_update_compressors: zstd,
                max_cas_blob_size_bytes: 0,
            }),
            execution_capabilities: None,
            deprecated_api_version: None,
            low_api_version: version(0),
            high_api_version: version(3),
        }))
    }
}
