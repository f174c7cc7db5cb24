//! The S3-compatible object store as the replicas' shared source of truth
//! (docs of the scale-out issue): the client and its settings here, the
//! backends over the bucket beside it.

pub mod client;
