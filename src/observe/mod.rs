//! What operators watch: Prometheus metrics ([`metrics`]) and the request
//! log ([`request_log`]).

pub mod metrics;
pub mod request_log;
