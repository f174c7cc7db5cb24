//! provcache: a Remote Execution API v2 cache that signs where every cached
//! result came from. See README.md and docs/architecture.md for the map.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod digest;
pub mod error;
pub mod proto;
pub mod resource;
pub mod signing;
pub mod trust;
