//! The cache's domain: the rules of the Action Cache ([`action_cache`],
//! with the write-side checks in [`action_result`]), the CAS ([`cas`]),
//! resumable uploads ([`upload`]) and the audit log ([`audit`]: recording
//! answered hits, the auditor's reads), over the storage traits in
//! [`crate::store`]; and the REAPI value types every layer speaks
//! ([`digest`], [`resource`]), which need no storage.

#[cfg(feature = "server")]
pub mod action_cache;
#[cfg(all(test, feature = "server"))]
mod action_cache_tests;
#[cfg(feature = "server")]
pub mod action_result;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod cas;
pub mod digest;
pub mod resource;
#[cfg(feature = "server")]
pub mod upload;
