//! provcache: a Remote Execution API v2 cache that signs where every cached
//! result came from.
//!
//! The folders name the layers (docs/architecture.md has the map). A request
//! travels: TLS accept and identity ([`access`]) → request budgets and
//! deadlines ([`transport`]) → one thin gRPC handler per service
//! ([`service`]: parse, authorize, call the domain, map errors through
//! [`error`]) → the domain ([`cache`]: Action Cache, CAS, uploads, hit log)
//! → the storage traits ([`store`]; RocksDB behind them). Signing and
//! verification live in [`provenance`]; metrics and the request log in
//! [`observe`]; the auditor's and operator's tools in [`tools`].
//! [`server`] wires these together from a validated [`config`]; `main.rs` is
//! the command line.
//!
//! The storage and everything built on it need the `server` feature (on by
//! default); without it the crate is its parsers and verifiers alone, which
//! is what the fuzz targets (tests/fuzz) build.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod cache;
pub mod clock;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod limits;
pub mod observe;
pub mod proto;
pub mod provenance;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod stores;
pub mod tools;
pub mod transport;
pub mod units;
