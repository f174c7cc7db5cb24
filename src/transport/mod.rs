//! What a caller can cost the transport before a handler runs: the buffered
//! request bytes of messages being received ([`budget`]), refusal of calls
//! the caller could never be allowed before their bodies are read, request
//! deadlines and idle cut-offs ([`layer`]). The HTTP/2 settings and the TLS
//! handshake limits are applied where connections are made (`server`, `tls`).
//! [`coalesce`] gathers each connection's small writes into fewer socket
//! writes.
//! docs/operations.md, "Limits", says what each limit protects.

pub mod budget;
pub mod coalesce;
pub mod layer;
pub mod units;

pub use budget::{RequestBudget, Share};
pub use layer::{method_permission, TransportLayer, TransportService};
