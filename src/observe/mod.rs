//! What operators watch: Prometheus metrics ([`metrics`]), the request
//! log ([`request_log`]), whether a replica's object store answers
//! ([`store_health`]) and systemd's readiness protocol ([`notify`]).

pub mod metrics;
pub mod notify;
pub mod request_log;
pub mod store_health;
