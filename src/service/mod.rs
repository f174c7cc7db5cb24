//! The gRPC services, one thin file each: parse the request at the edge,
//! pass the one authorization gate, call the domain, map errors.

use std::sync::Arc;

use prost::Message;

use crate::action_cache::ActionCache;
use crate::auth::SharedGate;
use crate::cas::Cas;
use crate::proto::reapi;
use crate::upload::Uploads;

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
    /// Uploads in progress.
    pub uploads: Arc<Uploads>,
    /// Signing and verification of Action Cache entries.
    pub provenance: Arc<crate::provenance::Provenance>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("uploads", &self.uploads).finish_non_exhaustive()
    }
}

/// The client's `RequestMetadata`, if it sent a decodable one.
pub fn request_metadata<T>(request: &tonic::Request<T>) -> Option<reapi::RequestMetadata> {
    let value = request.metadata().get_bin(REQUEST_METADATA_HEADER)?;
    let bytes = value.to_bytes().ok()?;
    reapi::RequestMetadata::decode(bytes).ok()
}
