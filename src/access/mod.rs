//! Who is calling and what they may do: TLS with client certificates
//! ([`tls`]), the identity read from a certificate ([`identity`]), the
//! authorization policy ([`policy`]), the one gate every RPC passes
//! ([`gate`]), the identities a trusted proxy forwards ([`proxy`]) and the
//! development PKI ([`pki`]).

pub mod gate;
pub mod identity;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod tls;
