//! The cache's domain: the rules of the Action Cache ([`action_cache`]), the
//! CAS ([`cas`]) and resumable uploads ([`upload`]), over the storage traits
//! in [`crate::store`]; and the REAPI value types every layer speaks
//! ([`digest`], [`resource`]), which need no storage.

#[cfg(feature = "server")]
pub mod action_cache;
#[cfg(feature = "server")]
pub mod cas;
pub mod digest;
pub mod resource;
#[cfg(feature = "server")]
pub mod upload;
