//! What operators watch: the log set-up ([`logging`]), what is learned about
//! a call while it runs ([`call`]), TLS handshake failures and certificate
//! expiry ([`tls`]), Prometheus metrics ([`metrics`]), the request and access
//! logs ([`request_log`]), whether a replica's object store answers
//! ([`store_health`]) and systemd's readiness protocol ([`notify`]).
//!
//! `logging`, `call` and `tls` are used by the access layer, which is built
//! without the `server` feature too (the fuzz targets); the rest needs it.

pub mod call;
pub mod logging;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod notify;
#[cfg(feature = "server")]
pub mod request_log;
#[cfg(feature = "server")]
pub mod store_health;
pub mod tls;
