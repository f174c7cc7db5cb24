//! Who is calling and what they may do: TLS with client certificates
//! ([`tls`]), the identity read from a certificate ([`identity`]), the
//! authorization policy ([`policy`]), the one gate every RPC passes
//! ([`gate`]), the identities a trusted proxy forwards ([`proxy`]) and the
//! development PKI ([`pki`]); [`accept`] runs the TLS handshakes of new
//! connections and [`reload`] follows the files they all read.

pub mod accept;
pub mod gate;
pub mod identity;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod tls;
