//! What operators watch: Prometheus metrics ([`metrics`]), the request
//! log ([`request_log`]) and whether a replica's object store answers
//! ([`store_health`]).

pub mod metrics;
pub mod request_log;
pub mod store_health;
