//! What every integration suite shares, one file per concern, so that a
//! suite holds its tests and the few helpers only it needs:
//!
//! - [`server`]: [`TestServer`], a server running in this process on a real
//!   socket, started from [`TestOptions`];
//! - [`process`]: [`ServerProcess`], the real `provcache` binary spawned,
//!   stopped, killed and restarted on its data directory;
//! - [`certs`]: client certificates (the dev PKI's, newly issued ones, and
//!   deliberately malformed ones) and the mTLS channels made with them;
//! - [`clients`]: [`Clients`], the REAPI clients of one channel with the
//!   Action Cache and CAS calls the suites make, and request builders;
//! - [`http`]: plain HTTP GETs of the metrics listener;
//! - [`keys`]: signing keys and trust policies written as files;
//! - [`hit_log`]: paging through an invocation's hit log as an auditor;
//! - [`seaweed`]: [`Seaweed`], a real S3-compatible object store (SeaweedFS)
//!   with a bucket per test, for the replica suites.
#![allow(dead_code)]

pub mod certs;
pub mod clients;
pub mod hit_log;
pub mod http;
pub mod keys;
pub mod process;
pub mod seaweed;
pub mod server;

pub use certs::*;
pub use clients::*;
pub use hit_log::*;
pub use http::*;
pub use keys::*;
pub use process::*;
pub use seaweed::*;
pub use server::*;

use provcache::cache::digest::{Digest, DigestFunction};
use provcache::proto::reapi;

/// The largest gRPC message the test clients send or accept (the server's
/// own limit is lower): a test must see the server's refusal, not its own.
pub const MAX_MSG: usize = 64 << 20;

/// The SHA-256 digest of `data`, as REAPI messages carry it.
pub fn sha(data: &[u8]) -> reapi::Digest {
    Digest::of(DigestFunction::Sha256, data).to_proto()
}

/// The BLAKE3 digest of `data`, for the second digest function.
pub fn blake3(data: &[u8]) -> reapi::Digest {
    Digest::of(DigestFunction::Blake3, data).to_proto()
}

/// `hash/size`, the tail of a ByteStream resource name.
pub fn rn(d: &reapi::Digest) -> String {
    format!("{}/{}", d.hash, d.size_bytes)
}

/// Deterministic pseudo-random bytes: large test data regenerated from a
/// seed instead of kept in memory, and incompressible.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    provcache::tools::bench::pseudo_random_bytes(seed, len).to_vec()
}
