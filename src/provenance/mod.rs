//! Where a cached result came from, and the proof: the signing contract
//! ([`signing`], docs/signing.md), the trust policy that says which keys to
//! believe ([`trust`]), the checks an entry must pass ([`verify`]), the
//! server's signer and verifier ([`notary`]) and the signed per-invocation
//! hit log ([`hit_log`]).

#[cfg(feature = "server")]
pub mod hit_log;
#[cfg(feature = "server")]
pub mod notary;
pub mod signing;
pub mod trust;
pub mod verify;

#[cfg(feature = "server")]
pub use notary::*;
