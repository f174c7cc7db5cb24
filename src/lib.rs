//! provcache: a Remote Execution API v2 cache that signs where every cached
//! result came from.
//!
//! A request travels: TLS accept → [`auth`] (identity and permission, one gate
//! for every RPC) → [`service`] (one thin file per gRPC service: parse at the
//! edge into [`digest::Digest`] and [`resource`] types, call the domain, map
//! errors through [`error`]) → the domain ([`action_cache`], [`cas`],
//! [`upload`]) → [`store`] (storage traits; RocksDB behind them).
//! [`server`] wires these together; `main.rs` is the command line.
//!
//! The storage and everything built on it need the `server` feature (on by
//! default); without it the crate is its parsers and verifiers alone, which
//! is what the fuzz targets (tests/fuzz) build.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "server")]
pub mod action_cache;
#[cfg(all(test, feature = "server"))]
mod action_cache_tests;
#[cfg(feature = "server")]
pub mod action_result;
pub mod attack;
#[cfg(feature = "server")]
pub mod audit_log;
pub mod auth;
pub mod authz;
pub mod bench;
#[cfg(feature = "server")]
pub mod cas;
pub mod client;
pub mod config;
pub mod digest;
pub mod error;
pub mod failpoint;
pub mod identity;
pub mod limits;
#[cfg(feature = "server")]
pub mod metrics;
pub mod pki;
pub mod proto;
#[cfg(feature = "server")]
pub mod provenance;
#[cfg(feature = "server")]
pub mod request_log;
pub mod resource;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
pub mod signing;
pub mod soak;
#[cfg(feature = "server")]
pub mod store;
pub mod tls;
pub mod transport;
pub mod trust;
pub mod units;
#[cfg(feature = "server")]
pub mod upload;
pub mod verify_build;
