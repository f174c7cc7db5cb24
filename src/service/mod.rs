//! The gRPC services, one thin file each: parse the request at the edge,
//! pass the one authorization gate, call the domain, map errors.

use std::sync::Arc;

use prost::Message;

use crate::access::gate::SharedGate;
use crate::cache::action_cache::ActionCache;
use crate::cache::audit::AuditLog;
use crate::cache::cas::Cas;
use crate::cache::upload::Uploads;
use crate::proto::reapi;

pub mod action_cache;
pub mod audit;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod execution;

/// The header that carries a binary `RequestMetadata`.
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// Everything the services share.
#[derive(Clone)]
pub struct Context {
    /// The authorization gate.
    pub gate: SharedGate,
    /// The CAS.
    pub cas: Arc<Cas>,
    /// The Action Cache.
    pub ac: Arc<ActionCache>,
    /// The hit log and the stored versions of entries, for auditors.
    pub audit: Arc<AuditLog>,
    /// Uploads in progress.
    pub uploads: Arc<Uploads>,
    /// Signing and verification of Action Cache entries.
    pub provenance: Arc<crate::provenance::Provenance>,
    /// What one caller may cost.
    pub limits: Arc<crate::limits::Limits>,
    /// Counts (and logs) every refusal by a limit.
    pub limit_hits: Arc<crate::limits::LimitHits>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("uploads", &self.uploads).finish_non_exhaustive()
    }
}

impl Context {
    /// The limits as they apply to `principal`'s call: the domain checks
    /// through it, and every refusal is counted for that principal.
    pub fn enforcer(&self, principal: &str) -> crate::limits::Enforcer {
        crate::limits::Enforcer::new(self.limits.clone(), self.limit_hits.clone(), principal)
    }
}

/// A `RequestMetadata` header already decoded in front of the services (by
/// [`crate::observe::request_log::RequestSpan`]), carried in the request's extensions
/// so the handler does not decode it a second time.
#[derive(Clone, Debug)]
pub struct DecodedRequestMetadata(pub Option<reapi::RequestMetadata>);

/// The client's `RequestMetadata`, if it sent a decodable one.
pub fn request_metadata<T>(request: &tonic::Request<T>) -> Option<reapi::RequestMetadata> {
    if let Some(DecodedRequestMetadata(decoded)) = request.extensions().get::<DecodedRequestMetadata>() {
        return decoded.clone();
    }
    let value = request.metadata().get_bin(REQUEST_METADATA_HEADER)?;
    let bytes = value.to_bytes().ok()?;
    reapi::RequestMetadata::decode(bytes).ok()
}

/// [`request_metadata`] from the raw HTTP headers, before tonic sees the call
/// (the request span reads the invocation id from them).
pub fn request_metadata_from_headers(headers: &http::HeaderMap) -> Option<reapi::RequestMetadata> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
    use base64::Engine as _;
    // gRPC sends `-bin` values as base64, with or without padding.
    const B64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = B64.decode(headers.get(REQUEST_METADATA_HEADER)?.as_bytes()).ok()?;
    reapi::RequestMetadata::decode(bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The raw-header decoder agrees with tonic's.
    #[test]
    fn request_metadata_from_raw_headers() {
        let sent = reapi::RequestMetadata { tool_invocation_id: "inv-1".into(), ..Default::default() };
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert_bin(REQUEST_METADATA_HEADER, tonic::metadata::MetadataValue::from_bytes(&sent.encode_to_vec()));
        let headers = request.metadata().clone().into_headers();
        assert_eq!(request_metadata_from_headers(&headers), Some(sent.clone()));
        assert_eq!(request_metadata(&request), Some(sent));
        assert_eq!(request_metadata_from_headers(&http::HeaderMap::new()), None);
    }

    /// A value decoded in front of the service is used as is (the header is
    /// not decoded again).
    #[test]
    fn request_metadata_prefers_the_decoded_extension() {
        let sent = reapi::RequestMetadata { tool_invocation_id: "from-header".into(), ..Default::default() };
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert_bin(REQUEST_METADATA_HEADER, tonic::metadata::MetadataValue::from_bytes(&sent.encode_to_vec()));
        let decoded = reapi::RequestMetadata { tool_invocation_id: "decoded".into(), ..Default::default() };
        request.extensions_mut().insert(DecodedRequestMetadata(Some(decoded.clone())));
        assert_eq!(request_metadata(&request), Some(decoded));
        request.extensions_mut().insert(DecodedRequestMetadata(None));
        assert_eq!(request_metadata(&request), None);
    }
}
