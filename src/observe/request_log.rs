//! One `tracing` span per gRPC call, so every log line about a request
//! carries its `rpc`, the caller's `principal` and the client's
//! `invocation` id.
//!
//! [`RequestSpanLayer`] opens the span in front of every service, with the
//! method and the `tool_invocation_id` of the REAPI `RequestMetadata` header;
//! the gate records the principal into it once it knows the caller
//! ([`crate::access::gate::record_principal`]); [`LoggingGate`] logs refused calls.
//! With `--access-log`, [`access_line`] logs every finished call.
//! Nothing secret is logged: no key material, certificates or blob contents.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;
use tracing::instrument::{Instrument, Instrumented};

use crate::observe::call::{note_instance, CallRecord};

use crate::access::gate::{Caller, Gate, Peer, Permission, SharedGate};
use crate::cache::resource::InstanceName;
use crate::error::Error;

/// Opens the request span around every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestSpanLayer;

impl<S> tower_layer::Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan(inner)
    }
}

/// See [`RequestSpanLayer`].
#[derive(Clone, Debug)]
pub struct RequestSpan<S>(S);

impl<S, B> tower_service::Service<http::Request<B>> for RequestSpan<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<TaskLocalFuture<Arc<CallRecord>, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let rpc = rpc_name(req.uri().path());
        let record = Arc::new(CallRecord::new(rpc));
        let span =
            tracing::info_span!("request", rpc, principal = tracing::field::Empty, invocation = tracing::field::Empty,);
        if !span.is_disabled() {
            let metadata = crate::service::request_metadata_from_headers(req.headers());
            if let Some(m) = metadata.as_ref().filter(|m| !m.tool_invocation_id.is_empty()) {
                span.record("invocation", m.tool_invocation_id.as_str());
                record.set_invocation(&m.tool_invocation_id);
            }
            // Decoded once: the handler takes it from here.
            req.extensions_mut().insert(crate::service::DecodedRequestMetadata(metadata));
        }
        req.extensions_mut().insert(record.clone());
        let fut = span.in_scope(|| record.sync_scope(|| self.0.call(req)));
        record.scope(fut).instrument(span)
    }
}

/// `/build.bazel.remote.execution.v2.ActionCache/GetActionResult` →
/// `ActionCache/GetActionResult`.
fn rpc_name(path: &str) -> &str {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, _)) => &path[service.rfind('.').map_or(0, |i| i + 1)..],
        None => path,
    }
}

/// The access log's line for a finished call (target `provcache::access`,
/// at info, outside the request span: the line names the call itself).
pub(crate) fn access_line(call: &CallRecord, code: i32, elapsed: Duration, bytes_out: u64) {
    tracing::info!(
        target: "provcache::access",
        parent: None,
        rpc = call.rpc(),
        instance = call.instance(),
        principal = call.principal(),
        invocation = call.invocation(),
        code = crate::observe::metrics::code_name(code),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        bytes_in = call.bytes_in.load(Ordering::Relaxed),
        bytes_out,
        "call finished"
    );
}

/// Logs every refused call (at info: the caller learns why from the status),
/// and notes the instance of every authorized one for the access log.
pub struct LoggingGate(pub SharedGate);

impl LoggingGate {
    /// Wraps `inner`.
    pub fn wrap(inner: SharedGate) -> SharedGate {
        std::sync::Arc::new(LoggingGate(inner))
    }
}

impl Gate for LoggingGate {
    fn authorize(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> Result<Caller, Error> {
        let result = self.0.authorize(peer, instance, permission);
        note_instance(instance.as_str());
        if let Err(e) = &result {
            tracing::info!(instance = %instance, %permission, error = %e, "call refused");
        }
        result
    }

    fn allows(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> bool {
        self.0.allows(peer, instance, permission)
    }

    fn authorize_anywhere(&self, peer: &Peer, permission: Permission) -> Result<Caller, Error> {
        let result = self.0.authorize_anywhere(peer, permission);
        if let Err(e) = &result {
            tracing::info!(instance = "*", %permission, error = %e, "call refused");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::rpc_name;

    #[test]
    fn rpc_names_are_service_and_method() {
        assert_eq!(
            rpc_name("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"),
            "ActionCache/GetActionResult"
        );
        assert_eq!(rpc_name("/google.bytestream.ByteStream/Write"), "ByteStream/Write");
        assert_eq!(rpc_name("/odd"), "odd");
    }
}
