//! What is learned about one gRPC call while it runs: who is calling and on
//! which instance. The request span names the principal once from it, and
//! the access log reads it when the call ends.
//!
//! The record is a task-local of the call's future, so the gate, deep in a
//! handler, can fill it in without the record being passed through every
//! signature (as the request span itself is found through `tracing`).

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

/// One call's facts, set once each.
#[derive(Debug, Default)]
pub struct CallRecord {
    /// `Service/Method`.
    rpc: String,
    principal: OnceLock<String>,
    instance: OnceLock<String>,
    invocation: OnceLock<String>,
    /// Request body bytes received (messages with their framing); counted
    /// by the metrics layer, which needs the `server` feature.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) bytes_in: AtomicU64,
}

tokio::task_local! {
    static CURRENT: Arc<CallRecord>;
}

impl CallRecord {
    /// The record of a new call of `rpc` (`Service/Method`).
    pub fn new(rpc: &str) -> Self {
        CallRecord { rpc: rpc.to_owned(), ..Default::default() }
    }

    /// `Service/Method`.
    pub fn rpc(&self) -> &str {
        &self.rpc
    }

    /// The caller, once a gate has authenticated them.
    pub fn principal(&self) -> Option<&str> {
        self.principal.get().map(String::as_str)
    }

    /// The instance the call was authorized on (the first one asked about).
    pub fn instance(&self) -> Option<&str> {
        self.instance.get().map(String::as_str)
    }

    /// The client's `tool_invocation_id`, when it sent one.
    pub fn invocation(&self) -> Option<&str> {
        self.invocation.get().map(String::as_str)
    }

    /// Notes the client's invocation id.
    pub fn set_invocation(&self, invocation: &str) {
        let _ = self.invocation.set(invocation.to_owned());
    }

    /// Runs `fut` with `self` as the current call's record.
    pub fn scope<F: Future>(self: Arc<Self>, fut: F) -> tokio::task::futures::TaskLocalFuture<Arc<Self>, F> {
        CURRENT.scope(self, fut)
    }

    /// Runs `f` (the synchronous part of a service call) with `self` as the
    /// current call's record.
    pub fn sync_scope<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self.clone(), f)
    }
}

/// Notes the caller of the current call. True the first time in a call (and
/// outside any call), false when the caller was already known.
pub fn note_principal(principal: &str) -> bool {
    CURRENT.try_with(|c| c.principal.set(principal.to_owned()).is_ok()).unwrap_or(true)
}

/// Notes the instance the current call is authorized on; the first wins.
pub fn note_instance(instance: &str) {
    let _ = CURRENT.try_with(|c| c.instance.set(instance.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_principal_is_noted_once_per_call_and_always_outside_one() {
        let record = Arc::new(CallRecord::default());
        let firsts = record
            .clone()
            .scope(async { [note_principal("spiffe://a"), note_principal("spiffe://a"), note_principal("spiffe://a")] })
            .await;
        assert_eq!(firsts, [true, false, false]);
        assert_eq!(record.principal(), Some("spiffe://a"));
        assert!(record.sync_scope(|| !note_principal("spiffe://a")));
        assert!(note_principal("spiffe://a"), "outside a call there is nothing to remember");
    }
}
