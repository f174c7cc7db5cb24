//! provcache: a Remote Execution API v2 cache that signs where every cached
//! result came from.
//!
//! A request travels: TLS accept → [`auth`] (identity and permission, one gate
//! for every RPC) → [`service`] (one thin file per gRPC service: parse at the
//! edge into [`digest::Digest`] and [`resource`] types, call the domain, map
//! errors through [`error`]) → the domain ([`action_cache`], [`cas`],
//! [`upload`]) → [`store`] (RocksDB, on the blocking pool).
//! [`server`] wires these together; `main.rs` is the command line.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod action_cache;
pub mod auth;
pub mod authz;
pub mod bench;
pub mod cas;
pub mod client;
pub mod digest;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod pki;
pub mod proto;
pub mod provenance;
pub mod resource;
pub mod server;
pub mod service;
pub mod signing;
pub mod store;
pub mod tls;
pub mod trust;
pub mod units;
pub mod upload;
pub mod verify_build;
